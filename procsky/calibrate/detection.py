"""Detection step: PSF-matched filter at a first seeing guess, the stellar locus, detection at the measured
seeing; satellite trails found, subtracted and the detection repeated.

The threshold is ``nsigma`` times the measured spread of the smoothed significance away from sources
(``kernels.detection.detect_sources``); footprints are grown and deblended into peaks, with one child
per saturated region. Trails (``kernels.streak``: Hough transform of a binned S/N map, then a fitted
Gaussian line profile) set the STREAK plane where the fitted trail exceeds ``streak_mask_fraction`` of
the pixel noise; subtracting the trail before detecting again keeps it from being shredded into
sources or added to the stars under it.
"""

from __future__ import annotations

import math

import numpy as np

from procsky.calibrate.config import DetectionConfig
from procsky.calibrate.state import CalibrateState, timed
from procsky.errors import AlgorithmError
from procsky.exposure import Exposure
from procsky.kernels.detection import DetectionResult, detect_sources
from procsky.kernels.measure import measure_sources
from procsky.kernels.streak import find_streaks
from procsky.psf import SIGMA_TO_FWHM
from procsky.wcs import copy_wcs, pixel_scale

__all__ = ["ap_name", "detect", "detect_first", "initial_sigma", "measure_seeing"]

# what the state's DetectionResult holds in place of the planes it does not keep
_RELEASED_F32 = np.zeros((0, 0), np.float32)
_RELEASED_BOOL = np.zeros((0, 0), bool)


def initial_sigma(exp: Exposure, config: DetectionConfig) -> float:
    """Gaussian sigma (pixels) of the first seeing guess: the input PSF's FWHM, else
    ``initial_fwhm_arcsec`` at the WCS's pixel scale (0.2"/px without one); at least 0.7."""
    if exp.psf is not None:
        try:
            return float(exp.psf.fwhm(0.5 * exp.shape[1], 0.5 * exp.shape[0])) / SIGMA_TO_FWHM
        except Exception:  # a broken input PSF is not fatal: fall back to the seeing guess
            pass
    scale = 0.2
    if exp.wcs is not None:
        try:
            scale = pixel_scale(copy_wcs(exp.wcs), 0.5 * exp.shape[1], 0.5 * exp.shape[0])
        except Exception:
            scale = 0.2
    return max(config.initial_fwhm_arcsec / scale / SIGMA_TO_FWHM, 0.7)


def detect_first(state: CalibrateState, config: DetectionConfig) -> DetectionResult:
    """Detection at the guessed seeing ``state.sigma0``, to mask sources for the final background (its
    ``detected`` plane) and to measure the seeing (its children): the footprint labels are not kept."""
    return detect_sources(
        state.sub,
        state.var_det,
        state.mask,
        psf_sigma=state.sigma0,
        nsigma=config.nsigma,
        threshold=config.threshold,
        timer=_timer(state),
        keep_significance=False,
        keep_footprints=False,
    )


def _timer(state: CalibrateState):
    """The profile's step timer for the phases of ``detect_sources`` (None without a profile)."""
    return None if state.profile is None else state.profile.step


def ap_name(meas: dict[str, np.ndarray], r: float) -> str:
    """Name of the aperture flux column of ``meas`` whose radius is closest to ``r``."""
    radii = sorted(
        float(k[8:].replace("p", "."))
        for k in meas
        if k.startswith("ap_flux_") and not k.endswith("_err") and k[8:].replace("p", "").isdigit()
    )
    best = min(radii, key=lambda q: abs(q - r))
    return "ap_flux_" + f"{best:g}".replace(".", "p")


def _stellar_sigma(meas: dict[str, np.ndarray], snr_min: float, fallback: float) -> float:
    """Gaussian sigma of the stellar locus from adaptive moments of bright, clean sources."""
    T = meas["ixx"] + meas["iyy"]
    flux = meas[ap_name(meas, 6.0)]
    err = meas[ap_name(meas, 6.0) + "_err"]
    bad = meas["flag_saturated"] | meas["flag_edge"] | meas["shape_flag"] | meas["flag_bad_center"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(T) & (T > 0) & ~bad & (flux / err > snr_min)
    if ok.sum() < 3:
        return fallback
    lt = np.sort(np.log10(T[ok]))
    # densest 0.1-dex window: the stellar locus (galaxies are larger and spread out)
    j = np.searchsorted(lt, lt + 0.1, side="right")
    i0 = int(np.argmax(j - np.arange(lt.size)))
    t = 10 ** np.median(lt[i0 : j[i0]])
    return float(math.sqrt(t / 2.0))


def measure_seeing(state: CalibrateState, det0: DetectionResult, aperture_radii: tuple[float, ...]) -> None:
    """``state.sigma``: the stellar locus of the first detections, measured once to refine the seeing guess."""
    meas0 = measure_sources(
        state.sub,
        state.var_det,
        state.mask,
        det0.x,
        det0.y,
        psf_sigma=state.sigma0,
        children=det0.children,
        blended=det0.blended,
        aperture_radii=aperture_radii,
    )
    state.sigma = _stellar_sigma(meas0, 20.0, state.sigma0) if len(det0.x) else state.sigma0


def detect(state: CalibrateState, config: DetectionConfig) -> None:
    """Final detection at the measured seeing ``state.sigma`` (DETECTED plane), after removing
    satellite trails; ``det`` and ``child_ids`` filled. AlgorithmError without any detection."""
    bit, mask = state.bit, state.mask

    def run_detection():
        found = detect_sources(
            state.sub,
            state.var_det,
            mask,
            psf_sigma=state.sigma,
            nsigma=config.nsigma,
            threshold=config.threshold,
            timer=_timer(state),
            keep_significance=False,
            keep_footprints=False,
        )
        mask[found.detected] |= np.uint32(bit["DETECTED"])
        return found

    det = run_detection()
    if config.streaks:
        with timed(state.profile, "streaks"):
            st = find_streaks(
                state.sub,
                state.var_det,
                mask,
                psf_sigma=state.sigma,
                mask_fraction=config.streak_mask_fraction,
                bad_bits=bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"] | bit["EDGE"],
                grow_bits=bit["BAD"] | bit["SAT"],
                detected_bits=bit["DETECTED"],
                saturated_bits=bit["SAT"],
            )
        if len(st.streaks):
            state.streaks = [{k: float(row[k]) for k in st.streaks.dtype.names} for row in st.streaks]
            mask[st.mask] |= np.uint32(bit["STREAK"])
            state.sub = (state.sub - st.model).astype(np.float32, copy=False)
            state.streak_model = st.model
            mask &= ~np.uint32(bit["DETECTED"])
            del det, st  # their whole-frame planes, before the detection is repeated
            det = run_detection()
    # the DETECTED plane holds the grown footprints: the significance and detection planes (a
    # whole-frame float32 and bool) are not kept (empty arrays), nor the footprint labels (int32,
    # ``keep_footprints=False``): every footprint pixel belongs to one child, so a footprint is its
    # children's pixels (``child_parent[children]``)
    state.child_parent = np.concatenate([np.zeros(1, np.int32), det.parent.astype(np.int32)])
    state.det = det._replace(significance=_RELEASED_F32, detected=_RELEASED_BOOL)
    state.child_ids = np.arange(1, len(det.x) + 1)
    if len(det.x) == 0:
        ny, nx = state.shape
        raise AlgorithmError(
            f"no source above {config.nsigma} sigma in this {nx}x{ny} image; cannot model the PSF "
            "(check the variance plane or lower detection.nsigma)"
        )
