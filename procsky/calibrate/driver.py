"""The calibrate chain: the steps of :mod:`procsky.calibrate` run in order on one detector."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from procsky.calibrate.astrometry import fit_astrometry
from procsky.calibrate.background import refine_background, subtract_background
from procsky.calibrate.catalogue import make_calexp, make_catalogue, make_summary
from procsky.calibrate.config import CalibrationConfig
from procsky.calibrate.cosmicrays import find_cosmic_ray_pixels, remove_sharp_sources
from procsky.calibrate.detection import detect, detect_first, initial_sigma, measure_seeing
from procsky.calibrate.measurement import aperture_corrections, measure, measure_with_psf, psf_flux_errors
from procsky.calibrate.photometry import fit_zero_point
from procsky.calibrate.psf import model_psf
from procsky.calibrate.state import (
    PLANE_NAMES,
    CalibrateState,
    StepProfile,
    release_background_plane,
    restore_background_plane,
    timed,
)
from procsky.errors import NoWorkError
from procsky.exposure import Exposure
from procsky.masks import DEFAULT_PLANES, MaskPlanes
from procsky.psf import SIGMA_TO_FWHM

__all__ = [
    "calibrate_exposure",
    "make_state",
    "process_arrays",
    "run_detection_steps",
    "run_pixel_steps",
    "state_from_exposure",
]


def make_state(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, planes: MaskPlanes, min_usable_pixels: int
) -> CalibrateState:
    """The initial state of the steps: float32 image and variance (``var_det``) and a uint32 mask (copies),
    with the STREAK plane added; pixels with a non-finite value or a variance <= 0 are NO_DATA (value 0,
    variance 0 in ``var_det``, inf in the calexp's). NoWorkError with fewer than ``min_usable_pixels``
    usable pixels.

    The image is only read by the steps: a float32 input without unusable pixels is used as it is
    (no whole-frame copy); otherwise the state holds a copy with those pixels set to 0."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    var_det = np.array(variance, dtype=np.float32)
    mask = np.zeros(image.shape, np.uint32) if mask is None else np.array(mask, dtype=np.uint32)
    ny, nx = image.shape
    if "STREAK" not in planes:
        planes = planes.with_plane("STREAK")
    bit = {n: 1 << planes[n] for n in PLANE_NAMES}
    bad_input = ~np.isfinite(image) | ~np.isfinite(var_det) | ~(var_det > 0)
    bad_ys, bad_xs = np.nonzero(bad_input)
    del bad_input
    if bad_ys.size:
        mask[bad_ys, bad_xs] |= np.uint32(bit["NO_DATA"])
        image = np.array(image)
        image[bad_ys, bad_xs] = 0.0
        # the only variance plane of the steps: 0 there (the calexp's has inf, ``CalibrateState.variance``)
        var_det[bad_ys, bad_xs] = 0.0
    n_usable = nx * ny - int(np.count_nonzero(mask & np.uint32(bit["NO_DATA"] | bit["BAD"])))
    if n_usable < min_usable_pixels:
        raise NoWorkError(
            f"only {n_usable} usable pixels in this {nx}x{ny} image (< min_usable_pixels="
            f"{min_usable_pixels}); too small to calibrate"
        )
    return CalibrateState(image=image, mask=mask, planes=planes, bit=bit, bad_input=(bad_ys, bad_xs), var_det=var_det)


def state_from_exposure(exposure: Exposure, config: CalibrationConfig) -> CalibrateState:
    """The initial state of the steps from an exposure (computed): its planes, and the first seeing
    guess from its PSF or WCS."""
    exp = exposure.compute()
    state = make_state(exp.image, exp.variance, exp.mask, exp.mask_planes, config.min_usable_pixels)
    # the state holds its own variance and mask: the exposure it keeps (for its metadata) holds none
    # of the input's (read-only placeholders of the shape, no memory), so that a computed input is
    # freed when its caller does not hold it
    released = {
        "variance": np.broadcast_to(np.float32(np.nan), exp.shape),
        "mask": np.broadcast_to(np.uint32(0), exp.shape),
    }
    state.exposure, state.xy0 = exp._replace(**released), exp.xy0
    state.sigma0 = initial_sigma(exp, config.detection)
    return state


def run_detection_steps(state: CalibrateState, config: CalibrationConfig) -> None:
    """Background, cosmic rays, detection and the first measurement (without a PSF model).
    ``state.sigma0`` (the first seeing guess) must be set."""
    prof = state.profile
    # background first pass, then cosmic rays (before detection, so that hits do not become sources)
    with timed(prof, "background"):
        subtract_background(state, config.background)
    with timed(prof, "cosmic rays: L.A.Cosmic"):
        find_cosmic_ray_pixels(state, config.cosmic_rays)
    # a first detection at the guessed seeing masks the sources for the final background
    with timed(prof, "detection"):
        det0 = detect_first(state, config.detection)
    with timed(prof, "background"):
        refine_background(state, config.background, det0.detected)
        # the model is read at a few pixels from here on (``state.background_at``): not its whole plane
        state.background = release_background_plane(state.background)
    with timed(prof, "measurement"):
        measure_seeing(state, det0, config.measurement.aperture_radii)
    del det0
    with timed(prof, "detection"):
        detect(state, config.detection)
    with timed(prof, "measurement"):
        measure(state, config.measurement)


def run_pixel_steps(state: CalibrateState, config: CalibrationConfig) -> None:
    """:func:`run_detection_steps`, then the PSF model, the detections sharper than it and the corrected
    PSF fluxes: every step that needs neither a reference catalogue nor the exposure's metadata."""
    prof = state.profile
    run_detection_steps(state, config)
    with timed(prof, "PSF model"):
        model_psf(state, config.psf)
    # named sub-steps inside ("cosmic rays: PSF-sharp tests", "cosmic rays: tracks")
    with timed(prof, "cosmic rays: PSF-sharp tests"):
        remove_sharp_sources(state, config.cosmic_rays, nu_keep=config.detection.nsigma)
    with timed(prof, "PSF fluxes"):
        measure_with_psf(state, config.measurement)
    with timed(prof, "aperture correction"):
        aperture_corrections(state, config.measurement)
        psf_flux_errors(state, config.psf)


def calibrate_exposure(
    exposure: Exposure, refcat: Any = None, config: CalibrationConfig | None = None, profile: StepProfile | None = None
) -> tuple[Exposure, pd.DataFrame, dict[str, Any]]:
    """Calibrate one detector exposure (see :mod:`procsky.calibrate`).

    Parameters
    ----------
    exposure : Exposure
        Instrument-calibrated image (counts: ADU or electrons) with variance and mask.
    refcat : pandas.DataFrame or list of DataFrame, optional
        Reference catalogue (normalised :mod:`procsky.refcat` schema) or its shards.
    config : CalibrationConfig, optional
        (or the task's :class:`procsky.tasks.calibrate.CalibrateConfig`, which is one)
    profile : StepProfile, optional
        Records the CPU, wall time and peak memory of each step (``profile.table()``); the rows
        add up to the whole call, ``"other"`` being what no named step covers.

    Returns
    -------
    calexp : Exposure
    src : pandas.DataFrame
    summary : dict

    Raises
    ------
    NoWorkError
        Too few usable pixels (tiny cut-out, all NO_DATA).
    AlgorithmError
        No star usable for a PSF model, or too few reference matches when the fallback is
        ``"fail"``.
    """
    config = config or CalibrationConfig()
    with timed(profile, "other"):
        state = state_from_exposure(exposure, config)
        state.profile = profile
        run_pixel_steps(state, config)
        with timed(profile, "astrometry"):
            fit_astrometry(state, refcat, config)
        with timed(profile, "photometry"):
            fit_zero_point(state, config.photometry, match_radius=config.astrometry.match_radius)
        src = make_catalogue(state, config)
        calexp = make_calexp(state, config)
        summary = make_summary(state, src)
    return calexp, src, summary


def process_arrays(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    psf_fwhm: float | None = None,
    config: CalibrationConfig | None = None,
    planes: MaskPlanes = DEFAULT_PLANES,
    profile: StepProfile | None = None,
) -> CalibrateState:
    """The pixel steps of :func:`calibrate_exposure` on bare arrays (no WCS, no reference catalogue).

    Background, cosmic rays, detection, measurement, PSF model, the detections sharper than the PSF,
    PSF fluxes with their aperture and aperture-to-total corrections: the chain calibrate runs, for
    notebooks, tests and benchmarks on synthetic frames.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Image (sky not subtracted) and its variance, counts.
    mask : ndarray (ny, nx) uint32, optional
        Input mask planes (``planes``: LSST bit order by default).
    psf_fwhm : float, optional
        First guess of the seeing FWHM, pixels; default ``config.detection.initial_fwhm_arcsec``
        at 0.2"/pixel.
    config : CalibrationConfig, optional
    profile : StepProfile, optional
        Records each step's CPU, wall time and peak memory (see :func:`calibrate_exposure`).

    Returns
    -------
    CalibrateState
        ``sub`` (background-subtracted, cosmic rays repaired), ``variance``, ``mask``, ``background``,
        ``cosmic_rays``, ``det``, ``meas`` (PSF fluxes as measured; ``psf_flux``/``psf_flux_err``
        corrected), ``psf_model``, ``psf`` and ``psf_info``, ``cand``/``used``/``reserved``.
    """
    config = config or CalibrationConfig()
    with timed(profile, "other"):
        state = make_state(image, variance, mask, planes, config.min_usable_pixels)
        state.profile = profile
        if psf_fwhm is not None:
            state.sigma0 = float(psf_fwhm) / SIGMA_TO_FWHM
        else:
            state.sigma0 = max(config.detection.initial_fwhm_arcsec / 0.2 / SIGMA_TO_FWHM, 0.7)
        run_pixel_steps(state, config)
        # the caller gets the background model's plane (the steps read it at a few pixels only)
        state.background = restore_background_plane(state.background)
    return state
