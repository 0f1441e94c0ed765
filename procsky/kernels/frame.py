"""Reference chain of the single-frame pixel kernels (numpy in, numpy out).

:func:`process_frame` strings the kernels together the way the ``calibrate`` task does:
background -> cosmic rays -> detection <-> background (iterated, detections masked) ->
measurement -> PSF star selection and PSF model -> PSF fluxes. It exists for tests and
benchmarks and as the executable specification of the order of operations; the task layer
adds the astrometric and photometric calibration (which need a reference catalogue) and
the I/O.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._bits import BAD, CR, DETECTED, EDGE, INTRP, NO_DATA, SAT, bit
from .background import Background, estimate_background
from .cosmicray import CosmicRayResult, find_cosmic_rays
from .detection import DetectionResult, detect_sources
from .measure import measure_psf_fluxes, measure_sources
from .psfmodel import PsfModelArrays, fit_psf_model, render_stamps, select_psf_stars

__all__ = ["FrameResult", "process_frame", "PSF_STAR_BAD_FLAGS"]

#: catalogue flags that disqualify a source as PSF star
PSF_STAR_BAD_FLAGS = (
    "flag_edge",
    "flag_saturated",
    "flag_interpolated",
    "flag_cr",
    "flag_bad",
    "flag_blended",
    "centroid_flag",
    "shape_flag",
    "ap_flux_flag",
)


class FrameResult(NamedTuple):
    """Output of :func:`process_frame`.

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        Background-subtracted, CR-repaired image, counts.
    variance : ndarray (ny, nx) float32
    mask : ndarray (ny, nx) uint32
        Input mask plus CR, INTRP and DETECTED.
    background : Background
    cosmic_rays : CosmicRayResult or None
    detection : DetectionResult
    catalog : dict of str -> ndarray
        Measurements (see :func:`procsky.kernels.measure.measure_sources`) plus
        ``parent``, ``peak_significance``, ``psf_star`` (used in the PSF fit) and
        ``psf_reserved`` (held back).
    psf : PsfModelArrays or None
    psf_message : str
        Why there is no PSF model ("" when there is one).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    background: Background
    cosmic_rays: CosmicRayResult
    detection: DetectionResult
    catalog: dict
    psf: PsfModelArrays
    psf_message: str


def process_frame(
    image,
    variance,
    mask=None,
    *,
    psf_fwhm,
    box_size=128,
    nsigma=5.0,
    find_crs=True,
    cr_options=None,
    background_iterations=2,
    aperture_radii=(3.0, 4.5, 6.0, 9.0, 12.0),
    fit_psf=True,
    psf_order=2,
    psf_stamp_size=None,
    psf_min_snr=50.0,
    psf_weighted=True,
    deblend=True,
):
    """Run background, cosmic rays, detection, measurement and PSF modelling on one frame.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Image (sky not subtracted), counts.
    variance : ndarray (ny, nx) float
        Variance, counts^2.
    mask : ndarray (ny, nx) uint32, optional
        Input mask planes (BAD, SAT, NO_DATA ... in LSST bit order).
    psf_fwhm : float, pixels
        Approximate PSF FWHM (seeing): detection filter, centroid window.
    box_size : int, pixels
        Background box.
    nsigma : float
        Detection threshold.
    find_crs : bool
    cr_options : dict, optional
        Keyword arguments of :func:`~procsky.kernels.cosmicray.find_cosmic_rays`.
    background_iterations : int
        Detection/background passes (>= 1); each pass masks the detections of the
        previous one when re-estimating the background.
    aperture_radii : sequence of float, pixels
    fit_psf : bool
    psf_order : int
    psf_stamp_size : int, optional
        Default ``2 ceil(3 fwhm) + 1``.
    psf_min_snr : float
    psf_weighted : bool
    deblend : bool

    Returns
    -------
    FrameResult
    """
    img = np.array(image, dtype=np.float32, copy=True)
    var = np.array(variance, dtype=np.float32, copy=True)
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.array(mask, dtype=np.uint32, copy=True)
    sigma = psf_fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    bad_bits = bit(BAD) | bit(SAT) | bit(NO_DATA) | bit(EDGE)
    bkg = estimate_background(img, msk, bad_bits=bad_bits, box_size=box_size)
    crs = None
    if find_crs:
        crs = find_cosmic_rays(img, var, msk, **(cr_options or {}))
        img = crs.image
        var = crs.variance
        msk[crs.mask] |= np.uint32(bit(CR) | bit(INTRP))
    bad_bits |= bit(CR)
    det = None
    for it in range(max(1, background_iterations)):
        if it > 0:
            bkg = estimate_background(img, msk, ignore=det.detected, bad_bits=bad_bits, box_size=box_size)
        last = it == max(1, background_iterations) - 1
        # earlier passes only feed the background mask: no deblending needed there
        det = detect_sources(img - bkg.background, var, msk, psf_sigma=sigma, nsigma=nsigma,
                             deblend=deblend and last)
    sub = img - bkg.background
    msk[det.detected] |= np.uint32(bit(DETECTED))
    child_ids = np.arange(1, det.x.size + 1)
    cat = measure_sources(
        sub, var, msk, det.x, det.y, psf_sigma=sigma, children=det.children, child_ids=child_ids,
        blended=det.blended, aperture_radii=aperture_radii,
    )
    cat["parent"] = det.parent.copy()
    cat["peak_significance"] = det.peak_significance.copy()
    n = det.x.size
    cat["psf_star"] = np.zeros(n, bool)
    cat["psf_reserved"] = np.zeros(n, bool)
    psf = None
    message = "PSF fit not requested"
    if fit_psf:
        radii = np.asarray(aperture_radii, float)
        r = radii[np.argmin(np.abs(radii - 2.0 * psf_fwhm))]
        tag = f"{r:g}".replace(".", "p")
        bad = np.zeros(n, bool)
        for name in PSF_STAR_BAD_FLAGS:
            bad |= cat[name]
        sel = select_psf_stars(
            cat["x"], cat["y"], cat["ixx"], cat["iyy"], cat[f"ap_flux_{tag}"], cat[f"ap_flux_{tag}_err"], bad,
            min_snr=psf_min_snr, isolation_radius=3.0 * psf_fwhm, all_x=cat["x"], all_y=cat["y"],
        )
        stamp = psf_stamp_size or 2 * int(math.ceil(3.0 * psf_fwhm)) + 1
        idx = np.flatnonzero(sel)
        try:
            psf, used, reserved = fit_psf_model(sub, var, msk, cat["x"][idx], cat["y"][idx], stamp_size=stamp,
                                                order=psf_order)
            cat["psf_star"][idx[used]] = True
            cat["psf_reserved"][idx[reserved]] = True
            message = ""
        except ValueError as exc:
            message = str(exc)
        if psf is not None:
            stamps = render_stamps(psf, cat["x"], cat["y"])
            cat.update(measure_psf_fluxes(sub, var, msk, cat["x"], cat["y"], stamps, weighted=psf_weighted))
    return FrameResult(image=sub, variance=var, mask=msk, background=bkg, cosmic_rays=crs, detection=det,
                       catalog=cat, psf=psf, psf_message=message)
