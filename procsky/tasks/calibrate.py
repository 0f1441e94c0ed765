"""Single-frame calibration: ``calibrate`` turns an ``isr_exposure`` (the ISR output, or an
ingested instrument-calibrated frame) into ``calexp``, ``src`` and ``calibrate_summary``.

Chain (LSST ``CalibrateTask`` / ``CharacterizeImageTask`` in one pass, DESIGN.md 7.2):

1. **Background** (128-px mesh, clipped mode, bicubic spline), subtracted; re-estimated
   once with the detection footprints left out.
2. **Cosmic rays** (L.A.Cosmic, then grown along the faint parts of their tracks): CR and
   INTRP planes set, pixels repaired.
3. **Detection** (PSF-matched filter, 5 sigma of the measured spread of the smoothed
   significance away from sources, footprints grown, deblended peaks; one child per
   saturated region): DETECTED plane. **Satellite trails** (``kernels.streak``: Hough
   transform of a binned S/N map, then a fitted Gaussian line profile): STREAK plane where
   the fitted trail exceeds half the pixel noise; the trail is subtracted and the
   detection repeated; sources on it carry ``flag_streak`` and stay out of the fits below.
4. **Measurement**: windowed centroids, adaptive moments, aperture, Kron and (later) PSF
   fluxes, flags.
5. **PSF**: star selection on the size-flux locus; pixelised polynomial PSF fit
   (PSFEx-like) with held-back stars when there are >= 10 stars per polynomial term,
   else the constant pixel model with a size-and-shear warp of order 1 across the detector
   (``kernels.psfmodel.warp_images``: 3 numbers per star instead of an image per term);
   falls back to lower orders, then to a Gaussian of the stars' mean moments when too few
   stars are found (recorded in the metadata).
   Every detection is then tested against the PSF model: faint cosmic-ray tracks that the
   per-pixel L.A.Cosmic test missed (but the matched filter summed into a "source") are
   sharper than the PSF; their sharp pixels are masked CR and repaired and the detection
   is dropped when no significant PSF-shaped signal is left (``find_sharp_sources``). A hit
   on a star (which L.A.Cosmic's fine-structure test protects) is cleaned by the same test
   at ``cr_psf_star_sigma`` and repaired with the star's PSF fit. Fainter tracks still
   (1-4 sigma per pixel) are recognised as a whole: a detection that a line one pixel wide
   fits better than both the PSF and a line as wide as the PSF, with no PSF-shaped signal
   left beside it, is dropped and the track masked (``find_cr_tracks``; the lines are sought
   with the earlier CR pixels at their values before the repair, so that a partly flagged
   track is seen whole). PSF candidates may carry repaired CR pixels away from their centre
   (weighted 0 in the fit); the brightest tenth of them is never held back.
6. **Remeasure** PSF fluxes with the fitted model; **aperture correction** = clipped
   weighted mean of ``ap_flux(r_apcorr) / psf_flux`` over the PSF stars, applied to
   ``psf_flux``. ``psf_flux_err`` is the photon noise of the PSF fit plus, in quadrature,
   the PSF model's fractional flux error ``psf_flux_sys`` (summary) times the flux: the
   excess scatter, beyond their noise, of the PSF stars' aperture/PSF flux ratios when each
   is measured with a model fitted without it (cross-validation,
   ``kernels.psfmodel.cross_validated_flux_scatter``; 0.0-0.8 % on `small`, where a
   2048 x 2048 detector holds only 9-21 PSF stars), plus, with a warp, the warp's own
   fitting noise at each source (``kernels.psfmodel.model_flux_error``, largest where the
   model extrapolates). Estimated on the detector's own data.
   **Aperture to total**: the light outside ``apcorr_radius`` from the growth curve of the
   bright stars (clipped ring means out to 40 px against a local sky, power-law tail;
   ``kernels.growth``), also applied to ``psf_flux``, so that the zero point is that of the
   total flux (``aperture_to_total`` in the summary; ``visit_photometry`` uses the visit's
   mean of it, the per-detector value scattering by ~0.3 %).
7. **Astrometry**: reference stars (shards attached by :meth:`CalibrateTask.quanta`)
   matched by offset voting, TAN-SIP fit (full SIP with enough stars; otherwise a linear
   fit on top of the header SIP distortion). Without a reference catalogue, or with too
   few matches, the header WCS is kept and ``astrometry_status`` says why. The fit's
   coefficient covariance (heteroscedasticity-consistent, from the residuals of the stars
   used; HC1, White 1980) gives the WCS's own error at every source, added to the centroid
   error in ``ra_err``/``dec_err`` (deg, as in the reference catalogues; ~1 mas on `small`,
   where it dominates the error of S/N > 500 stars). It is common to all sources of a
   detector, leaves out errors of a kept header SIP, and is only a rough estimate (±30 % per
   detector) - and no error at all for unmodelled distortion - when few stars force a lower
   fit order.
8. **Photometry**: zero point = clipped median of ``m_ref - m_inst`` (aperture-corrected
   PSF magnitudes of unflagged, unsaturated stars); otherwise the header zero point.
9. **Catalogue** ``src``: fluxes in nJy, positions (ra, dec) from the fitted WCS, flags
   as booleans, units in ``df.attrs["units"]`` (Parquet schema metadata). The stars
   eligible for the zero point carry their reference magnitude (``ref_mag``,
   ``ref_mag_err``, ``calib_photometry_candidate``) and ``df.attrs["meta"]`` the detector
   and header zero points, so that ``visit_photometry`` (:mod:`procsky.tasks.photometry`)
   can fit one zero point per visit from all its detectors (the final PhotoCalib used by
   the warps).

The input image may be in ADU or electrons: all fluxes are "counts" of the input image
until the PhotoCalib turns them into nJy.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd

from procsky import masks as _masks
from procsky.errors import AlgorithmError, NoWorkError
from procsky.exposure import Exposure
from procsky.kernels.astrometry import fit_tan_sip, match_sources, photometric_zero_point, tan_sip_position_error
from procsky.kernels.background import estimate_background
from procsky.kernels.cosmicray import find_cosmic_rays, find_cr_tracks, find_sharp_sources, repair_pixels
from procsky.kernels.detection import detect_sources
from procsky.kernels.measure import FLAG_NAMES, measure_sources
from procsky.kernels.growth import GrowthCorrection, aperture_to_total, weighted_clipped_mean
from procsky.kernels.psfmodel import fit_psf_model, model_flux_error, render_stamps, select_psf_stars
from procsky.kernels.streak import find_streaks
from procsky.notes import note_degraded
from procsky.photocalib import PhotoCalib
from procsky.pipeline.task import Input, Output, Task, TaskConfig, default_quanta, register_task
from procsky.psf import SIGMA_TO_FWHM, GaussianPsf, PolynomialImagePsf
from procsky.wcs import copy_wcs, pixel_scale, wcs_cards, wcs_from_cards

__all__ = ["CalibrateConfig", "CalibrateTask", "calibrate_exposure", "fit_detector_psf", "SRC_UNITS"]

_VD = ("instrument", "visit", "detector")
_BIT = {name: _masks.bit(name) for name in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "NO_DATA", "SUSPECT")}

#: Units of the fixed ``src`` columns (flux columns are nJy, listed at run time).
SRC_UNITS = {
    "x": "pixel", "y": "pixel", "x_err": "pixel", "y_err": "pixel", "ra": "deg", "dec": "deg",
    "ra_err": "deg", "dec_err": "deg",
    "ixx": "pixel2", "iyy": "pixel2", "ixy": "pixel2", "sky": "nJy/pixel", "sky_rms": "nJy/pixel",
    "kron_radius": "pixel", "peak_significance": "sigma", "psf_chi2": "",
}


class CalibrateConfig(TaskConfig):
    """Configuration of :class:`CalibrateTask`."""

    background_box: int = 128
    """Background mesh box size, pixels (LSST default 128)."""
    background_filter: int = 3
    """Median filter over the background mesh, boxes."""
    do_cosmic_rays: bool = True
    """Find and repair cosmic rays (L.A.Cosmic)."""
    do_streaks: bool = True
    """Find satellite trails (:func:`procsky.kernels.streak.find_streaks`): STREAK plane set, the fitted trail
    subtracted from the calexp, sources detected again, and those on the trail flagged ``flag_streak`` and kept
    out of the PSF, astrometric and photometric fits."""
    streak_mask_fraction: float = 0.5
    """The STREAK plane covers the pixels where the fitted trail exceeds this fraction of the pixel noise."""
    cr_sigclip: float = 4.5
    """L.A.Cosmic detection limit (Laplacian / noise)."""
    cr_objlim: float = 5.0
    """L.A.Cosmic contrast limit against fine structure (raise to protect undersampled stars)."""
    cr_grow_sigma: float = 3.5
    """After L.A.Cosmic, CR regions grow along the faint parts of their tracks: a neighbour whose excess over
    the median of its good 5 x 5 surroundings is above this many sigma and 2.5 times its fine structure joins
    (``kernels.cosmicray._grow_tracks``); 0 switches it off. Over the 99 `small` detectors of 11 visits the
    missed CR pixels above 5 sigma went from 2653 to 987 of 102070 (worst detector 94.5 -> 97.4 %)."""
    cr_psf_test: bool = True
    """After the PSF model: test every detection against it and treat those sharper than the
    PSF as cosmic rays (``kernels.cosmicray.find_sharp_sources``)."""
    cr_psf_z: float = 2.0
    """PSF-fit chi^2 excess, in sigma of the chi^2 distribution, above which a detection is cleaned."""
    cr_psf_excess: float = 0.5
    """... and above which fraction of the detection's PSF significance squared."""
    cr_psf_pixel_sigma: float = 3.0
    """Residual (and contrast against opposite neighbours) of a pixel flagged sharper than the PSF, sigma."""
    cr_psf_star_sigma: float = 5.0
    """The same for a cosmic ray on a star (L.A.Cosmic's fine-structure test protects star cores), against
    the noise plus ``cr_psf_model_error`` of the star's model; 0 leaves stars alone. The hit is repaired
    with the clean PSF fit (on ``small`` r visit 8 one star of S/N 107 hit by a 9-pixel track measured
    +13.6 %, pull +9, unflagged)."""
    cr_psf_model_error: float = 0.05
    """Fractional PSF-model error allowed for on a star's pixels (value and curvature) in that test."""
    cr_track_test: bool = True
    """Then test the detections below ``cr_track_nu_max`` for faint cosmic-ray tracks, lines sharper than the
    PSF (``kernels.cosmicray.find_cr_tracks``); a detection a track explains, with no PSF-shaped signal left
    beside it, is removed and its track masked CR."""
    cr_track_nu_max: float = 30.0
    """PSF significance above which a detection is not tested for a track."""
    cr_track_rho_max: float = 4.0
    """Largest distance of a tested line from the detection's centroid, pixels. 4 rather than 2: once the
    growth flags a track's bright pixels before detection, what is left to detect is a noise peak lifted by
    the track's faint pixels 3-4 px beside it (small r visit 20 detector 0: a S/N 5.3 detection, 3.8 sigma
    without the simulated track)."""
    cr_track_min_gain: float = 12.0
    """Chi^2 by which the best sharp line must beat the PSF and the best PSF-wide line, each ..."""
    cr_track_min_total: float = 28.0
    """... and both summed."""
    cr_track_star_gain: float = 25.0
    """On a detection above ``cr_track_nu_max``: chi^2 by which a sharp line must improve the PSF fit, and
    beat a PSF-wide line, for a track across the star (flagged CR and repaired, the star kept); 0 leaves
    bright detections alone. On ``small`` r visit 23 a S/N 477 star crossed by an unflagged 2146-count track
    measured +1.4 %, pull +5.4; it is now flagged and repaired (the visit's pooled pull std 1.18 -> 1.04)."""
    cr_track_model_error: float = 0.02
    """Fractional PSF-model error allowed for on a bright detection's pixels in that test."""
    detection_nsigma: float = 5.0
    """Detection threshold in units of the smoothed noise."""
    detection_threshold: str = "empirical"
    """``"empirical"``: the threshold is ``detection_nsigma`` times the measured spread of the smoothed
    significance away from sources, above its median (LSST's ``pixel_stdev`` with a temporary local
    background); ``"variance"``: in units of the noise the variance plane predicts. On ``small`` g band
    the light of sources below the threshold shifts the significance by +0.23 and widens it by 2 %, which
    the variance-plane threshold turned into 2-4 noise bumps per detector (1.1-1.4 % spurious)."""
    initial_fwhm_arcsec: float = 1.0
    """First guess of the seeing FWHM when the input has no PSF, arcsec."""
    aperture_radii: tuple[float, ...] = (3.0, 4.5, 6.0, 9.0, 12.0, 17.0)
    """Circular aperture radii, pixels."""
    apcorr_radius: float = 17.0
    """Aperture (one of ``aperture_radii``) the PSF fluxes are corrected to, pixels."""
    total_flux_correction: bool = True
    """Also correct PSF fluxes from the ``apcorr_radius`` aperture to the total flux, measured on the
    growth curve of the bright stars out to ``growth_edges`` with a local sky in ``growth_sky_annulus``
    (``kernels.growth.aperture_to_total``). Without it the zero point, fitted against total reference
    magnitudes, absorbs the light outside the aperture: on `small` r visit 23 (Moffat beta 3.36,
    FWHM 5.9 px) 0.4 % of the flux, a zero point 4.2 mmag below the truth."""
    growth_edges: tuple[float, ...] = (17.0, 21.0, 26.0, 32.0, 40.0)
    """Ring edges of the growth curve, pixels (the first is ``apcorr_radius``)."""
    growth_sky_annulus: tuple[float, float] = (48.0, 64.0)
    """Local sky annulus of the growth curve, pixels."""
    growth_min_snr: float = 100.0
    """Minimum aperture S/N of the stars whose growth curve is measured."""
    psf_min_snr: float = 50.0
    """Minimum S/N of PSF star candidates."""
    psf_isolation_radius: float = 10.0
    """No other detection within this radius of a PSF star, pixels."""
    psf_locus_max_excess: float = 0.05
    """With fewer than 5 candidates above ``psf_min_snr`` the S/N cut drops to 20 around the bright stars'
    locus (when at least 2 bright candidates give it); those fainter candidates must also lie less than this
    (dex in ``T = ixx + iyy``) above it, since
    compact galaxies outnumber stars there (``kernels.psfmodel.select_psf_stars``, ``max_excess``). On
    ``small`` r visit 23 detector 8 two galaxies at S/N 23-27 with T 0.13 dex above the locus were 2 of the 6
    PSF stars and the model FWHM came out 1.4 % wide."""
    psf_order: int = 2
    """Polynomial order of the PSF spatial variation (lowered automatically with few stars)."""
    psf_stamp_size: int = 25
    """PSF model stamp size, pixels (odd)."""
    psf_min_stars_per_term: float = 3.0
    """A PSF model with n > 1 polynomial terms needs ``psf_min_stars_per_term * n + 3`` stars, a
    constant one 5 (every
    pixel of the model is a polynomial fit: with 2 stars per term, a 2048 x 2048 detector of
    `small` with ~15 stars got order-2 models that extrapolated 1-10 % wrong PSF fluxes into
    the corners; 3 per term keeps order <= 1 there, measured pull std 1.17 instead of 2.6)."""
    psf_warp_order: int = 1
    """Order of the size-and-shear warp of the PSF model (``kernels.psfmodel.warp_images``)
    that follows the PSF's spatial variation when the stars are too few for a pixel
    polynomial of that order (-1: pixel polynomials only). Each star constrains three
    numbers (size, two shears) rather than a whole image per term: on the `small` cache
    (5-24 stars per detector) the PSF-flux error of the model against the true PSF dropped
    from 0.40 % to 0.25 % rms over 99 detectors (``psf_warp_prior`` 0.01)."""
    psf_warp_prior: float = 0.01
    """Gaussian prior width of the warp's non-constant terms (fractional size or shear change
    at the detector edge): with few, faint stars a compact galaxy or noise otherwise makes a
    gradient of several per cent. Against the true PSF of the 99 detectors of the `small` cache
    the model's PSF-flux error was 0.25 % rms with 0.01, 0.32 % with 0.02 (one detector, 6
    stars of which 2 compact galaxies: 0.8 % against 2.0 %)."""
    psf_pixel_stars_per_term: float = 10.0
    """With the warp on, a pixel polynomial of order > 0 needs this many stars per term (plus
    3): it replaces the warp only where there are enough stars to fit whole images per term."""
    psf_flux_sys_error: bool = True
    """Add the PSF model's cross-validated fractional flux error (``summary["psf_flux_sys"]``,
    estimated from this detector's PSF stars) in quadrature to ``psf_flux_err``."""
    psf_reserve_fraction: float = 0.2
    """Fraction of PSF stars held back for validation."""
    psf_fallback_gaussian: bool = True
    """With too few stars for a pixel model, use a Gaussian of the stars' moments (else AlgorithmError)."""
    refcat_name: str | None = None
    """Reference catalogue to use (None: the only one attached; error if several)."""
    refcat_visit_radius_deg: float = 1.5
    """Radius around the visit boresight within which shards are attached to a quantum, deg."""
    refcat_band_map: dict[str, str] = {}
    """Band -> reference magnitude column suffix (e.g. {"z": "RP"}); default ``mag_<band>``."""
    match_max_offset: float = 100.0
    """Largest header-WCS error searched by the matcher, pixels."""
    match_max_rotation: float = 1.0
    """Largest header-WCS rotation error searched, degrees."""
    match_radius: float = 1.5
    """Final matching radius, pixels."""
    min_astrometry_matches: int = 5
    """Fewer matches: keep the header WCS (or fail, see ``astrometry_fallback``)."""
    max_astrometry_rms_arcsec: float = 0.3
    """A fit with a larger rms is rejected (header WCS kept, or AlgorithmError), arcsec."""
    sip_order: int = 3
    """SIP order of a full TAN-SIP fit."""
    min_stars_per_sip_coefficient: float = 3.0
    """A full fit needs this many matches per coefficient; else linear on the header SIP."""
    astrometry_fallback: Literal["header", "fail"] = "header"
    """What to do with too few reference matches: keep the header WCS, or AlgorithmError."""
    photometry_min_snr: float = 20.0
    """Minimum S/N of stars used for the zero point."""
    min_photometry_stars: int = 3
    """Fewer stars: keep the header zero point (or fail, see ``photometry_fallback``)."""
    photometry_fallback: Literal["header", "fail"] = "header"
    """What to do without a zero point from the reference catalogue."""
    min_usable_pixels: int = 10000
    """Fewer unmasked pixels than this: NoWorkError (tiny cut-outs)."""
    min_pixels_for_psf_failure: int = 512 * 512
    """Images smaller than this without any usable star end NoWorkError (a cut-out), larger
    ones AlgorithmError (a real failure)."""
    apply_proper_motion: bool = True
    """Move reference positions to the visit epoch when proper motions are given."""


# ------------------------------------------------------------------------------ helpers
def _initial_sigma(exp: Exposure, config) -> float:
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


def _stellar_sigma(meas: dict, snr_min: float, fallback: float) -> float:
    """Gaussian sigma of the stellar locus from adaptive moments of bright, clean sources."""
    T = meas["ixx"] + meas["iyy"]
    flux = meas[_ap_name(meas, 6.0)]
    err = meas[_ap_name(meas, 6.0) + "_err"]
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


def _subset_detections(det, keep):
    """Detections ``keep`` of a DetectionResult (maps unchanged; blended recomputed)."""
    parent = det.parent[keep]
    _, inv, cnt = np.unique(parent, return_inverse=True, return_counts=True)
    return det._replace(x=det.x[keep], y=det.y[keep], peak_significance=det.peak_significance[keep],
                        parent=parent, blended=(cnt[inv] > 1).reshape(-1))


def _on_plane(mask, x, y, bit_value) -> np.ndarray:
    """Whether any of the 3 x 3 pixels around each centroid has ``bit_value`` set."""
    ny, nx = mask.shape
    ok = np.isfinite(x) & np.isfinite(y)
    ix = np.round(np.where(ok, x, 0.0)).astype(np.int64)
    iy = np.round(np.where(ok, y, 0.0)).astype(np.int64)
    out = np.zeros(len(ix), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= (mask[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)] & np.uint32(bit_value)) != 0
    return out & ok


def _ap_name(meas: dict, r: float) -> str:
    radii = sorted(float(k[8:].replace("p", ".")) for k in meas if k.startswith("ap_flux_") and not k.endswith("_err")
                   and k[8:].replace("p", "").isdigit())
    best = min(radii, key=lambda q: abs(q - r))
    return "ap_flux_" + f"{best:g}".replace(".", "p")


def _psf_from_arrays(model, xy0) -> PolynomialImagePsf:
    """procsky PSF model from the kernel's PsfModelArrays (oversample 1), in parent pixels."""
    if model.oversample != 1:
        raise AlgorithmError("PSF models with oversample != 1 cannot be stored yet; fit with oversample=1")
    return PolynomialImagePsf(model.coeffs, model.order, model.x_center + xy0[0], model.y_center + xy0[1],
                              model.x_scale, model.y_scale)


def _header_sip(wcs):
    """(crpix0, a, b) of a WCS's SIP terms, or None."""
    if wcs is None or wcs.sip is None:
        return None
    return (np.array(wcs.sip.crpix, float) - 1.0, np.array(wcs.sip.a, float), np.array(wcs.sip.b, float))


def _apply_sip(a, b, u, v):
    fu = np.zeros_like(u)
    fv = np.zeros_like(v)
    for p in range(a.shape[0]):
        for q in range(a.shape[1]):
            if a[p, q] != 0:
                fu += a[p, q] * u**p * v**q
    for p in range(b.shape[0]):
        for q in range(b.shape[1]):
            if b[p, q] != 0:
                fv += b[p, q] * u**p * v**q
    return fu, fv


def _wcs_from_solution(sol, shape, extra_sip=None):
    """astropy WCS (and cards) from a TanSipSolution; ``extra_sip=(a, b)`` replaces A/B."""
    cards = sol.to_fits_cards()
    if extra_sip is not None:
        a, b = extra_sip
        order = max(a.shape[0], b.shape[0]) - 1
        cards = {k: v for k, v in cards.items() if not k.startswith(("A_", "B_", "AP_", "BP_"))}
        cards["CTYPE1"], cards["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
        cards["A_ORDER"] = cards["B_ORDER"] = int(order)
        for name, arr in (("A", a), ("B", b)):
            for p in range(arr.shape[0]):
                for q in range(arr.shape[1]):
                    if arr[p, q] != 0 and p + q >= 2:
                        cards[f"{name}_{p}_{q}"] = float(arr[p, q])
    cards.setdefault("RADESYS", "ICRS")
    card_list = [(k, v, "") for k, v in cards.items()]
    w = wcs_from_cards(card_list, shape)
    return w, wcs_cards(w) if w is not None else card_list


# ------------------------------------------------------------------------------ the work
def fit_detector_psf(image, variance, mask, x, y, config: CalibrateConfig):
    """The PSF model of one detector from its PSF stars, as calibrate fits it.

    Pixel polynomial orders from ``config.psf_order`` down to 0, the first the stars allow
    (``psf_pixel_stars_per_term`` stars per term with the warp on, else
    ``psf_min_stars_per_term``; 5 for a constant model), with the size-and-shear warp of
    order ``psf_warp_order`` on top where that is higher than the pixel order.

    Returns
    -------
    (PsfModelArrays, used, reserved, pixel order), or ``(None, None, None, reason)`` when no
    order has enough usable stars.
    """
    warp = int(config.psf_warp_order)
    per_term = config.psf_pixel_stars_per_term if warp >= 0 else config.psf_min_stars_per_term
    stamp = int(config.psf_stamp_size) | 1
    reason = "no usable star"
    for order in range(int(config.psf_order), -1, -1):
        nc = (order + 1) * (order + 2) // 2
        try:
            arrays, used, reserved = fit_psf_model(
                image, variance, mask, x, y, stamp_size=stamp, order=order,
                reserve_fraction=config.psf_reserve_fraction,
                min_stars=5 if order == 0 else max(int(per_term * nc) + 3, 5), zero_bits=_BIT["CR"] | _BIT["INTRP"],
                warp_order=warp if warp > order else -1, warp_prior=config.psf_warp_prior)
        except ValueError as exc:
            reason = str(exc)
            continue
        return arrays, used, reserved, order
    return None, None, None, reason


def calibrate_exposure(exposure: Exposure, refcat=None, config: CalibrateConfig | None = None):
    """Calibrate one detector exposure (see the module docstring).

    Parameters
    ----------
    exposure : Exposure
        Instrument-calibrated image (counts: ADU or electrons) with variance and mask.
    refcat : pandas.DataFrame or list of DataFrame, optional
        Reference catalogue (normalised :mod:`procsky.refcat` schema) or its shards.
    config : CalibrateConfig, optional

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
    from procsky.refcat import apply_proper_motion, concat_shards, select_in_footprint

    config = config or CalibrateConfig()
    exp = exposure.compute()
    image = np.array(exp.image, dtype=np.float32)
    variance = np.array(exp.variance, dtype=np.float32)
    mask = np.array(exp.mask, dtype=np.uint32)
    ny, nx = image.shape
    planes = exp.mask_planes
    if "STREAK" not in planes:
        planes = planes.with_plane("STREAK")
    bit = {n: 1 << planes[n] for n in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "NO_DATA", "STREAK")}
    bad_input = ~np.isfinite(image) | ~np.isfinite(variance) | ~(variance > 0)
    mask[bad_input] |= np.uint32(bit["NO_DATA"])
    image[bad_input] = 0.0
    variance[bad_input] = np.float32(np.inf)
    usable = (mask & np.uint32(bit["NO_DATA"] | bit["BAD"])) == 0
    n_usable = int(usable.sum())
    if n_usable < config.min_usable_pixels:
        raise NoWorkError(
            f"only {n_usable} usable pixels in this {nx}x{ny} image (< min_usable_pixels="
            f"{config.min_usable_pixels}); too small to calibrate"
        )
    var_det = np.where(np.isfinite(variance), variance, 0.0).astype(np.float32)

    # 1. background, first pass
    sigma0 = _initial_sigma(exp, config)
    bkg = estimate_background(image, mask, box_size=config.background_box, filter_size=config.background_filter)
    bkg1 = bkg.background
    sub = image - bkg1
    # 2. cosmic rays (before detection, so hits do not become sources)
    n_cr = 0
    if config.do_cosmic_rays:
        cr = find_cosmic_rays(sub, var_det, mask, sigclip=config.cr_sigclip, objlim=config.cr_objlim,
                              grow_sigma=config.cr_grow_sigma)
        n_cr = cr.n_pixels
        if n_cr:
            mask[cr.mask] |= np.uint32(bit["CR"] | bit["INTRP"])
            sub = cr.image
            var_det = np.where(cr.mask, cr.variance, var_det).astype(np.float32)
            variance = np.where(cr.mask, cr.variance, variance).astype(np.float32)
    # 3a. first detection at the guessed seeing, to mask sources for the final background
    det0 = detect_sources(sub, var_det, mask, psf_sigma=sigma0, nsigma=config.detection_nsigma,
                          threshold=config.detection_threshold)
    bkg = estimate_background(image, mask | np.where(det0.detected, np.uint32(bit["DETECTED"]), np.uint32(0)),
                              box_size=config.background_box, filter_size=config.background_filter,
                              bad_bits=int(_BIT["BAD"] | _BIT["SAT"] | _BIT["NO_DATA"] | _BIT["CR"] | _BIT["EDGE"]
                                           | _BIT["DETECTED"]))
    sub = image - bkg.background
    if n_cr:
        # CR pixels keep their repaired values, moved from the first-pass background to this one
        crm = (mask & np.uint32(bit["CR"])) != 0
        sub = np.where(crm, cr.image + bkg1 - bkg.background, sub)
    sub = sub.astype(np.float32)
    sub[bad_input] = 0.0
    # measure the stellar locus once to refine the seeing guess
    meas0 = measure_sources(sub, var_det, mask, det0.x, det0.y, psf_sigma=sigma0, children=det0.children,
                            blended=det0.blended, aperture_radii=config.aperture_radii)
    sigma = _stellar_sigma(meas0, 20.0, sigma0) if len(det0.x) else sigma0
    # 3b. final detection with the measured seeing
    det = detect_sources(sub, var_det, mask, psf_sigma=sigma, nsigma=config.detection_nsigma,
                         threshold=config.detection_threshold)
    mask[det.detected] |= np.uint32(bit["DETECTED"])
    # 3c. satellite trails: mask, subtract the fitted trail, detect again (so the trail is
    # neither shredded into sources nor added to the stars under it)
    streaks = []
    streak_model = None
    if config.do_streaks:
        st = find_streaks(sub, var_det, mask, psf_sigma=sigma, mask_fraction=config.streak_mask_fraction,
                          bad_bits=bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"] | bit["EDGE"],
                          grow_bits=bit["BAD"] | bit["SAT"], detected_bits=bit["DETECTED"],
                          saturated_bits=bit["SAT"])
        if len(st.streaks):
            streaks = [{k: float(row[k]) for k in st.streaks.dtype.names} for row in st.streaks]
            mask[st.mask] |= np.uint32(bit["STREAK"])
            sub = (sub - st.model).astype(np.float32)
            streak_model = st.model
            mask &= ~np.uint32(bit["DETECTED"])
            det = detect_sources(sub, var_det, mask, psf_sigma=sigma, nsigma=config.detection_nsigma,
                                 threshold=config.detection_threshold)
            mask[det.detected] |= np.uint32(bit["DETECTED"])
    child_ids = np.arange(1, len(det.x) + 1)
    n_det = len(det.x)
    if n_det == 0:
        raise AlgorithmError(
            f"no source above {config.detection_nsigma} sigma in this {nx}x{ny} image; cannot model the PSF "
            "(check the variance plane or lower detection_nsigma)"
        )
    # 4. measurement without a PSF model
    meas = measure_sources(sub, var_det, mask, det.x, det.y, psf_sigma=sigma, children=det.children,
                           child_ids=child_ids, blended=det.blended, aperture_radii=config.aperture_radii)
    meas["flag_streak"] = _on_plane(mask, meas["x"], meas["y"], bit["STREAK"])
    # 5. PSF
    apn = _ap_name(meas, 6.0)
    # a cosmic ray (repaired, zero weight in the fit) or a bad pixel away from the centre does not
    # exclude a star: the stamp fit drops stars with bad pixels in their cutout and weights repaired
    # pixels 0. On `small` r visit 23 detector 8, 3 stars of S/N 70-456 were lost to CR hits in their
    # footprints, with 5 candidates left
    bad = (meas["flag_saturated"] | meas["flag_edge"] | meas["flag_blended"] | meas["flag_interpolated_center"]
           | meas["flag_cr_center"] | meas["flag_bad_center"] | meas["shape_flag"] | meas["centroid_flag"]
           | meas["flag_streak"])
    cand = select_psf_stars(meas["x"], meas["y"], meas["ixx"], meas["iyy"], meas[apn], meas[apn + "_err"], bad,
                            min_snr=config.psf_min_snr, isolation_radius=config.psf_isolation_radius)
    if cand.sum() < 5:  # few bright stars (shallow or small image): relax the S/N cut
        # keep the locus the bright stars show: among fainter sources galaxies may outnumber
        # the stars and form the densest size window (small r visit 23, detector 8: 4 stars
        # above S/N 50, then ~40 galaxies against ~3 stars above S/N 20)
        t_bright = (float(np.median(meas["ixx"][cand] + meas["iyy"][cand])) if cand.sum() >= 2 else None)
        cand = select_psf_stars(meas["x"], meas["y"], meas["ixx"], meas["iyy"], meas[apn], meas[apn + "_err"], bad,
                                min_snr=min(20.0, config.psf_min_snr), isolation_radius=config.psf_isolation_radius,
                                locus_T=t_bright, max_excess=config.psf_locus_max_excess)
    psf_model = None
    psf_info = {"n_candidates": int(cand.sum())}
    used = np.zeros(n_det, bool)
    reserved = np.zeros(n_det, bool)
    stamp = int(config.psf_stamp_size) | 1
    idx = np.flatnonzero(cand)
    fitted = fit_detector_psf(sub, var_det, mask, meas["x"][idx], meas["y"][idx], config)
    if fitted[0] is None:
        psf_info["last_error"] = fitted[3]
    else:
        arrays, u, r, order = fitted
        psf_model = arrays
        if order < config.psf_order:
            note_degraded("psf_order_reduced", f"PSF pixel model of order {order} (< psf_order={config.psf_order}): "
                          f"{int(arrays.n_stars)} PSF stars", severity="info", order=order, n_stars=int(arrays.n_stars))
        used[idx[u]] = True
        reserved[idx[r]] = True
        psf_info.update(model="PolynomialImagePsf", order=int(arrays.order), pixel_order=order,
                        warp_order=int(arrays.warp_order), n_stars=int(arrays.n_stars),
                        n_reserved=int(arrays.n_reserved), fwhm_px=float(arrays.fwhm),
                        reserved_dT_median=float(arrays.reserved_dT_median),
                        reserved_dT_std=float(arrays.reserved_dT_std),
                        reserved_dT=[float(v) for v in arrays.reserved_dT],
                        flux_sys=float(arrays.flux_sys), cv_flux_ratio=[float(v) for v in arrays.cv_flux_ratio])
    if psf_model is not None:
        psf = _psf_from_arrays(psf_model, exp.xy0)
        stamps = render_stamps(psf_model, meas["x"], meas["y"], stamp)
    else:
        stars = cand if cand.any() else (~bad & np.isfinite(meas["ixx"]))
        if not stars.any() and nx * ny < config.min_pixels_for_psf_failure:
            raise NoWorkError(
                f"no star usable for a PSF in this {nx}x{ny} cut-out ({n_det} detections, all flagged or "
                f"without moments); too small to calibrate (< min_pixels_for_psf_failure="
                f"{config.min_pixels_for_psf_failure} pixels)"
            )
        if not config.psf_fallback_gaussian or not stars.any():
            raise AlgorithmError(
                f"too few PSF stars ({int(cand.sum())} candidates) to model the PSF of this {nx}x{ny} image "
                f"({psf_info.get('last_error', 'no usable star')}); lower psf_min_snr or psf_order"
            )
        ixx = float(np.nanmedian(meas["ixx"][stars]))
        iyy = float(np.nanmedian(meas["iyy"][stars]))
        ixy = float(np.nanmedian(meas["ixy"][stars]))
        t = ixx + iyy
        det_m = ixx * iyy - ixy * ixy
        if np.isfinite(det_m) and det_m > 0 and t > 0:
            s, e1, e2 = det_m**0.25, (ixx - iyy) / t, 2 * ixy / t
            emag = math.hypot(e1, e2)
            if emag > 0.5:  # a blend or a galaxy dominates: keep the size, drop the shape
                e1 = e2 = 0.0
        else:
            s, e1, e2 = sigma, 0.0, 0.0
        psf = GaussianPsf(float(s), float(e1), float(e2), size=stamp)
        used[stars] = True
        psf_info.update(model="GaussianPsf (fallback: too few stars for a pixel model)", n_stars=int(stars.sum()),
                        fwhm_px=float(psf.fwhm()))
        note_degraded("few_psf_stars", f"too few PSF stars for a pixel model ({int(cand.sum())} candidates; "
                      f"{psf_info.get('last_error', 'no usable star')}): Gaussian PSF of {int(stars.sum())} sources' "
                      "moments used", n_candidates=int(cand.sum()), n_stars=int(stars.sum()))
        stamps = np.stack([psf.render(0, 0, offset=(float(x - np.floor(x + 0.5)), float(y - np.floor(y + 0.5))))
                           for x, y in zip(meas["x"], meas["y"])])
        psf_model = None
    sigma_psf = psf_info["fwhm_px"] / SIGMA_TO_FWHM if np.isfinite(psf_info.get("fwhm_px", np.nan)) else sigma
    # 5b. detections sharper than the PSF: faint cosmic-ray tracks that L.A.Cosmic (a per-pixel
    # test) missed but the matched filter added up. Their sharp pixels become CR and are
    # repaired; detections with no significant PSF-shaped signal left are removed.
    n_cr_sources = 0
    if config.do_cosmic_rays and config.cr_psf_test:
        # detections at the edge are tested too, on the part of the window inside the image
        skip = meas["flag_saturated"] | ~np.isfinite(meas["x"]) | ~np.isfinite(meas["y"])
        hw = int(min(6, max(3, round(2.0 * sigma_psf * 1.1774))))
        sharp = find_sharp_sources(sub, var_det, mask, meas["x"], meas["y"], stamps, skip=skip, half_width=hw,
                                   z_min=config.cr_psf_z, excess_min=config.cr_psf_excess,
                                   pixel_sigma=config.cr_psf_pixel_sigma, nu_keep=config.detection_nsigma,
                                   star_sigma=config.cr_psf_star_sigma, model_error=config.cr_psf_model_error)
        def mark_cr(pixels, fit, var_donor_bits):
            """Flag ``pixels`` not yet CR as CR + INTRP; the image takes the clean fit where
            there is one, else the median of the good neighbours; the variance the median of
            its neighbours outside ``var_donor_bits``. Returns the variance plane and the count."""
            newcr = pixels & ((mask & np.uint32(bit["CR"])) == 0)
            if not newcr.any():
                return variance, 0
            mask[newcr] |= np.uint32(bit["CR"] | bit["INTRP"])
            donors_bad = (mask & np.uint32(bit["BAD"] | bit["SAT"] | bit["NO_DATA"])) != 0
            fitted = newcr & np.isfinite(fit)
            if (newcr & ~fitted).any():
                repair_pixels(sub, newcr & ~fitted, donors_bad | fitted, 2)
            sub[fitted] = fit[fitted]
            repair_pixels(var_det, newcr, ((mask & np.uint32(var_donor_bits)) != 0) & ~newcr, 2)
            return np.where(newcr, var_det, variance).astype(np.float32), int(newcr.sum())

        variance, n_new = mark_cr(sharp.cr_pixels, sharp.repair, bit["BAD"] | bit["SAT"] | bit["NO_DATA"])
        n_cr += n_new
        is_cr = sharp.is_cr
        if config.cr_track_test:
            # faint tracks: judged with the values of the CR pixels before their repair (a track
            # flagged in part is judged whole); bright stars on their pixels not yet flagged
            crm = (mask & np.uint32(bit["CR"])) != 0
            raw = sub.copy()
            raw[crm] = image[crm] - bkg.background[crm] - (streak_model[crm] if streak_model is not None else 0.0)
            tracks = find_cr_tracks(sub, var_det, mask, meas["x"], meas["y"], stamps, sigma_psf,
                                    raw=raw, raw_bits=bit["CR"],
                                    skip=skip | is_cr,
                                    bad_bits=bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"],
                                    nu_max=config.cr_track_nu_max, rho_max=config.cr_track_rho_max,
                                    min_gain=config.cr_track_min_gain,
                                    min_total=config.cr_track_min_total, nu_keep=config.detection_nsigma,
                                    star_gain=config.cr_track_star_gain, model_error=config.cr_track_model_error)
            # the track pixels all have the joint fit; earlier CR pixels are no variance donors
            variance, n_new = mark_cr(tracks.cr_pixels, tracks.repair,
                                      bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"])
            n_cr += n_new
            is_cr = is_cr | tracks.is_cr
        keep = ~is_cr
        n_cr_sources = int((~keep).sum())
        if n_cr_sources:
            gone = np.setdiff1d(det.parent[~keep], det.parent[keep])
            if gone.size:
                mask[np.isin(det.footprints, gone)] &= ~np.uint32(bit["DETECTED"])
            det = _subset_detections(det, keep)
            meas = {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == (n_det,) else v)
                    for k, v in meas.items()}
            cand, used, reserved, stamps = cand[keep], used[keep], reserved[keep], stamps[keep]
            child_ids = child_ids[keep]
            n_det = int(keep.sum())
    if n_cr > 0.01 * nx * ny:
        note_degraded("cr_flagged_fraction_high", f"{n_cr} pixels ({100.0 * n_cr / (nx * ny):.1f} % of the "
                      f"{nx}x{ny} frame, > 1 %) flagged as cosmic rays and repaired", n_cr_pixels=int(n_cr))
    # 6. remeasure with the PSF model: centroids from the first pass, PSF stamps there
    meas = measure_sources(sub, var_det, mask, meas["x"], meas["y"], psf_sigma=sigma_psf, children=det.children,
                           child_ids=child_ids, blended=det.blended, aperture_radii=config.aperture_radii,
                           psf_stamps=stamps)
    meas["flag_streak"] = _on_plane(mask, meas["x"], meas["y"], bit["STREAK"])
    _note_cr_on_bright_stars(meas)
    apc_name = _ap_name(meas, config.apcorr_radius)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = meas[apc_name] / meas["psf_flux"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_err = np.hypot(meas[apc_name + "_err"], ratio * meas["psf_flux_err"]) / meas["psf_flux"]
    ac_stars = (used & np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0) & ~meas["psf_flux_flag"]
                & ~meas["ap_flux_flag"] & ~meas["flag_interpolated"])
    apcorr, apcorr_err, ac_kept = weighted_clipped_mean(ratio[ac_stars], ratio_err[ac_stars])
    n_ac = int(ac_kept.sum())
    if not (np.isfinite(apcorr) and apcorr > 0):
        note_degraded("apcorr_default", f"no aperture correction from {int(ac_stars.sum())} PSF stars: 1 used",
                      n_stars=int(ac_stars.sum()))
        apcorr, apcorr_err, n_ac = 1.0, float("nan"), 0
    # 6b. from the aperture to the total flux: the growth curve of bright stars beyond it
    growth = GrowthCorrection(status="disabled (total_flux_correction=False)")
    if config.total_flux_correction:
        with np.errstate(divide="ignore", invalid="ignore"):
            ap_snr = meas[apc_name] / meas[apc_name + "_err"]
        gstars = ((used | cand) & ~meas["psf_flux_flag"] & ~meas["ap_flux_flag"] & ~meas["flag_saturated"]
                  & ~meas["flag_blended"] & ~meas["flag_streak"] & ~meas["flag_interpolated"]
                  & (ap_snr > config.growth_min_snr))
        gi = np.flatnonzero(gstars)
        inner = {r: (meas[_ap_name(meas, r)][gi], meas[_ap_name(meas, r) + "_err"][gi])
                 for r in config.aperture_radii if 0.5 * config.apcorr_radius <= r < config.apcorr_radius}
        growth = aperture_to_total(sub, var_det, mask, det.children, child_ids[gi], meas["x"][gi], meas["y"][gi],
                                   meas[apc_name][gi], meas[apc_name + "_err"][gi], config.apcorr_radius,
                                   inner_fluxes=inner, edges=config.growth_edges, sky_annulus=config.growth_sky_annulus,
                                   bad_bits=int(_masks.bits("BAD", "SAT", "NO_DATA", "EDGE", "STREAK", "SUSPECT")))
    if config.total_flux_correction and growth.status != "measured":
        note_degraded("aperture_to_total_default", f"no aperture-to-total correction ({growth.status}): 1 used",
                      severity="info")
    apcorr_total = apcorr * growth.correction
    psf_flux = meas["psf_flux"] * apcorr_total
    # PSF-model error where the model was not fitted (cross-validated on this detector's PSF
    # stars, see kernels.psfmodel.cross_validated_flux_scatter), added in quadrature
    flux_sys = float(psf_info.get("flux_sys", np.nan)) if config.psf_flux_sys_error else float("nan")
    if not np.isfinite(flux_sys):
        flux_sys = 0.0
    psf_info["flux_sys_applied"] = flux_sys
    # the warp's own fitting noise at each position (largest where the model extrapolates)
    warp_err = (model_flux_error(psf_model, meas["x"], meas["y"]) if psf_model is not None and config.psf_flux_sys_error
                else np.zeros(n_det))
    psf_flux_err = np.sqrt((meas["psf_flux_err"] * apcorr_total) ** 2 + (flux_sys**2 + warp_err**2) * psf_flux**2)

    # 7. astrometry
    wcs = copy_wcs(exp.wcs)
    cards = exp.wcs_cards
    refs = None
    if refcat is not None:
        refs = concat_shards(refcat) if isinstance(refcat, (list, tuple)) else refcat
        if refs is not None and len(refs) and "refcat" in refs.columns and config.refcat_name:
            refs = refs[refs["refcat"] == config.refcat_name]
    astro = {"status": "header WCS (no reference catalogue)", "n_matches": 0}
    match = None
    ref_on = None
    bright = (~(meas["flag_saturated_center"] | meas["centroid_flag"] | meas["flag_edge"] | meas["flag_streak"])
              & np.isfinite(meas["x"]))
    if refs is not None and len(refs) and wcs is not None:
        if config.apply_proper_motion and exp.visit_info is not None and np.isfinite(exp.visit_info.mjd):
            refs = apply_proper_motion(refs, exp.visit_info.mjd)
        ref_on = select_in_footprint(refs, wcs, (ny, nx), margin_px=config.match_max_offset)
        sidx = np.flatnonzero(bright)
        magcol = _mag_column(ref_on, exp, config)
        if len(ref_on) >= 1 and sidx.size >= 1:
            match = match_sources(meas["x"][sidx], meas["y"][sidx], ref_on["x"].to_numpy(), ref_on["y"].to_numpy(),
                                  src_flux=psf_flux[sidx],
                                  ref_mag=ref_on[magcol].to_numpy() if magcol else None,
                                  max_offset=config.match_max_offset, max_rotation=config.match_max_rotation,
                                  match_radius=config.match_radius,
                                  min_matches=min(config.min_astrometry_matches, 6))
            m_src = sidx[match.src_index]
            m_ref = match.ref_index
        else:
            m_src = m_ref = np.zeros(0, np.int64)
        astro["n_matches"] = int(m_src.size)
        fit_error = None
        if m_src.size >= config.min_astrometry_matches and (match is None or match.ok):
            try:
                new_wcs, new_cards, new_astro = _fit_wcs(meas, m_src, ref_on.iloc[m_ref], wcs, (ny, nx), config,
                                                         dict(astro))
            except (ValueError, np.linalg.LinAlgError) as exc:
                fit_error = f"TAN-SIP fit failed: {exc}"
            else:
                if new_astro["rms_mas"] <= 1000.0 * config.max_astrometry_rms_arcsec:
                    wcs, cards, astro = new_wcs, new_cards, new_astro
                else:
                    fit_error = (f"fit rms {new_astro['rms_mas']:.0f} mas > max_astrometry_rms_arcsec="
                                 f"{config.max_astrometry_rms_arcsec} (bad matches?)")
        if fit_error is not None:
            if config.astrometry_fallback == "fail":
                raise AlgorithmError(f"astrometric calibration failed: {fit_error}")
            astro["status"] = f"header WCS ({fit_error})"
        elif not astro["status"].startswith("fitted"):
            reason = (match.message if match is not None and not match.ok else
                      f"only {m_src.size} reference matches (< min_astrometry_matches={config.min_astrometry_matches})")
            if config.astrometry_fallback == "fail":
                raise AlgorithmError(f"astrometric calibration failed: {reason}")
            astro["status"] = f"header WCS ({reason})"
    elif refs is not None and len(refs) and wcs is None:
        astro["status"] = "no WCS (the exposure has none to start the match from)"
    elif refs is not None and len(refs) == 0:
        astro["status"] = "header WCS (no reference stars on this detector)"
        if config.astrometry_fallback == "fail":
            raise AlgorithmError("astrometric calibration failed: no reference stars overlap this detector")

    if astro["status"].startswith("no WCS"):
        note_degraded("no_header_wcs", "the exposure has no WCS: no astrometric match, no sky positions")
    elif astro["status"].startswith("header WCS"):
        why = astro["status"][len("header WCS ("):-1]
        if ref_on is None or not len(ref_on):
            note_degraded("no_refcat", f"{why}: header WCS and header zero point kept")
        else:
            note_degraded("header_wcs_kept", f"astrometric fit not used ({why}): header WCS kept",
                          n_matches=int(astro.get("n_matches", 0)))
    elif astro["status"].startswith("fitted TAN ("):
        note_degraded("astrometry_header_distortion", f"{astro['status']} ({astro.get('n_used', 0)} stars: too "
                      "few for the full TAN-SIP fit)", severity="info", n_used=int(astro.get("n_used", 0)))
    # 8. photometric zero point
    phot = {"status": "header zero point (no reference catalogue)"}
    photocalib = exp.photocalib
    phot_used = np.zeros(n_det, bool)
    # reference magnitudes of the stars eligible for the zero point (src columns ``ref_mag``,
    # ``ref_mag_err``, ``calib_photometry_candidate``): the visit-level calibration
    # (``procsky.tasks.photometry``) pools them over the detectors of a visit
    ref_mag = np.full(n_det, np.nan)
    ref_mag_err = np.full(n_det, np.nan)
    phot_cand = np.zeros(n_det, bool)
    header_zp = float(exp.photocalib.zero_point) if exp.photocalib is not None else float("nan")
    if ref_on is not None and len(ref_on):
        magcol = _mag_column(ref_on, exp, config)
        rx, ry = copy_wcs(wcs).world_to_pixel_values(ref_on["ra"].to_numpy(), ref_on["dec"].to_numpy())
        from scipy.spatial import cKDTree

        good = bright & np.isfinite(psf_flux) & (psf_flux > 0) & ~meas["flag_saturated"] & ~meas["psf_flux_flag"]
        with np.errstate(divide="ignore", invalid="ignore"):
            good &= psf_flux / psf_flux_err > config.photometry_min_snr
        zp_reason = None
        if magcol is None:
            zp_reason = f"the reference catalogue has no magnitude for band {_band(exp)!r} (set refcat_band_map)"
        elif good.any():
            tree = cKDTree(np.column_stack([rx, ry]))
            d, j = tree.query(np.column_stack([meas["x"][good], meas["y"][good]]), distance_upper_bound=config.match_radius)
            ok = np.isfinite(d)
            gi = np.flatnonzero(good)[ok]
            rj = j[ok]
            if magcol is not None and gi.size:
                ref_mag[gi] = ref_on[magcol].to_numpy(dtype=float)[rj]
                if magcol + "_err" in ref_on.columns:
                    ref_mag_err[gi] = ref_on[magcol + "_err"].to_numpy(dtype=float)[rj]
                phot_cand[gi] = np.isfinite(ref_mag[gi])
            if gi.size >= config.min_photometry_stars:
                inst = -2.5 * np.log10(psf_flux[gi])
                inst_err = 1.0857 * psf_flux_err[gi] / psf_flux[gi]
                try:
                    zp, zp_err, n_zp, zused = photometric_zero_point(
                        ref_on[magcol].to_numpy()[rj], inst, ref_err=ref_on[magcol + "_err"].to_numpy()[rj]
                        if magcol + "_err" in ref_on.columns else None, inst_err=inst_err)
                except ValueError as exc:
                    zp_reason = str(exc)
                else:
                    if n_zp >= config.min_photometry_stars:
                        photocalib = PhotoCalib.from_zero_point(zp, zp_err)
                        phot = {"status": f"fitted against {magcol}", "zero_point": zp, "zero_point_err": zp_err,
                                "n_stars": int(n_zp)}
                        phot_used[gi[zused]] = True
                    else:
                        zp_reason = f"only {n_zp} stars survive clipping"
            else:
                zp_reason = f"only {gi.size} matched stars with S/N > {config.photometry_min_snr}"
        else:
            zp_reason = "no unsaturated star with a good PSF flux"
        if zp_reason is not None:
            if config.photometry_fallback == "fail":
                raise AlgorithmError(f"photometric calibration failed: {zp_reason}")
            phot["status"] = f"header zero point ({zp_reason})"
            note_degraded("header_zero_point_kept", f"{phot['status']} kept")
    if refs is not None and (ref_on is None or not len(ref_on)) and phot["status"].endswith("(no reference catalogue)"):
        phot["status"] = "header zero point (no reference stars on this detector)"
    if photocalib is None:
        phot["status"] += "; no header zero point either: fluxes stay in counts (calibration 1)"
        note_degraded("no_zero_point", phot["status"])
        photocalib = PhotoCalib(1.0)
    cal = photocalib.calibration

    # 9. catalogue
    src = _catalogue(meas, det, psf_flux, psf_flux_err, bkg, cal, wcs, exp, cand, used, reserved, phot_used,
                     astro.get("used_index"), config, flux_sys, astro.get("position_error"))
    src["ref_mag"] = ref_mag
    src["ref_mag_err"] = ref_mag_err
    src["calib_photometry_candidate"] = phot_cand
    src.attrs["units"].update(ref_mag="mag", ref_mag_err="mag")
    src.attrs["meta"].update(zero_point=float(photocalib.zero_point), zero_point_err=float(photocalib.zero_point_err),
                             header_zero_point=header_zp, photometry_status=phot["status"])
    astro.pop("used_index", None)
    astro.pop("position_error", None)
    calexp_mask = mask
    metadata = dict(exp.metadata)
    metadata.update({
        "calibrate": {
            "background_level": bkg.global_background, "background_rms": bkg.global_rms,
            "background_box": list(bkg.box_size), "background_mesh": bkg.mesh_background.tolist(),
            "psf": psf_info, "apcorr": apcorr, "apcorr_radius": float(config.apcorr_radius),
            "growth": growth.to_dict(),
            "astrometry": astro, "photometry": phot, "n_cr_pixels": int(n_cr), "n_cr_sources": n_cr_sources,
            "streaks": streaks,
        },
    })
    calexp = Exposure(sub, variance, calexp_mask, wcs=wcs, wcs_cards=cards or None, psf=psf, photocalib=photocalib,
                      visit_info=exp.visit_info, detector=exp.detector, metadata=metadata,
                      mask_planes=planes, xy0=exp.xy0)
    scale = pixel_scale(copy_wcs(wcs), 0.5 * nx, 0.5 * ny) if wcs is not None else float("nan")
    summary = {
        "visit": exp.visit_info.visit if exp.visit_info else None,
        "detector": exp.detector.get("id"),
        "band": _band(exp),
        "n_sources": int(len(src)),
        "detection_threshold_nu": float(det.threshold),
        "detection_nu_offset": float(det.nu_offset),
        "detection_nu_scale": float(det.nu_scale),
        "n_cr_pixels": int(n_cr),
        "n_cr_sources": n_cr_sources,
        "n_streaks": len(streaks),
        "sky_level": float(bkg.global_background),
        "sky_rms": float(bkg.global_rms),
        "psf_model": psf_info.get("model"),
        "psf_fwhm_px": float(psf_info.get("fwhm_px", np.nan)),
        "psf_fwhm_arcsec": float(psf_info.get("fwhm_px", np.nan) * scale),
        "psf_n_stars": int(psf_info.get("n_stars", 0)),
        "psf_reserved_dT_median": float(psf_info.get("reserved_dT_median", np.nan)),
        "psf_reserved_dT_std": float(psf_info.get("reserved_dT_std", np.nan)),
        "psf_flux_sys": float(psf_info.get("flux_sys_applied", 0.0)),
        "apcorr": float(apcorr),
        "apcorr_err": float(apcorr_err),
        "apcorr_n_stars": int(n_ac),
        "aperture_to_total": float(growth.correction),
        "aperture_to_total_err": float(growth.error),
        "aperture_to_total_n_stars": int(growth.n_stars),
        "zero_point": float(photocalib.zero_point),
        "zero_point_err": float(photocalib.zero_point_err),
        "zero_point_n_stars": int(phot.get("n_stars", 0)),
        "header_zero_point": header_zp,
        "photometry_status": phot["status"],
        "astrometry_status": astro["status"],
        "astrometry_n_matches": int(astro.get("n_matches", 0)),
        "astrometry_n_used": int(astro.get("n_used", 0)),
        "astrometry_rms_mas": float(astro.get("rms_mas", np.nan)),
        "astrometry_scatter_mas": float(astro.get("scatter_mas", np.nan)),
        "astrometry_wcs_err_max_mas": float(astro.get("wcs_err_max_mas", np.nan)),
        "pixel_scale_arcsec": float(scale),
    }
    return calexp, src, summary


def _note_cr_on_bright_stars(meas: dict, snr_min: float = 100.0) -> None:
    """Note when most bright unsaturated sources have a cosmic-ray pixel at their centre
    (the cosmic-ray steps eating stars rather than hits)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = meas["psf_flux"] / meas["psf_flux_err"]
    bright = np.isfinite(snr) & (snr > snr_min) & ~meas["flag_saturated"]
    n, n_cr = int(bright.sum()), int((bright & meas["flag_cr_center"]).sum())
    if n >= 5 and n_cr > 0.5 * n:
        note_degraded("cr_on_bright_stars", f"{n_cr} of {n} sources of S/N > {snr_min:g} have a cosmic-ray "
                      "pixel at their centre", n_bright=n, n_cr_center=n_cr)


def _band(exp: Exposure) -> str:
    return exp.visit_info.band if exp.visit_info is not None else ""


def _mag_column(refs: pd.DataFrame, exp: Exposure, config) -> str | None:
    band = _band(exp)
    name = config.refcat_band_map.get(band, band)
    col = f"mag_{name}"
    if col in refs.columns and np.isfinite(refs[col].to_numpy(dtype=float)).any():
        return col
    return None


def _fit_wcs(meas, m_src, refs_m: pd.DataFrame, wcs, shape, config, astro):
    """TAN-SIP fit of the matched stars; returns (wcs, cards, info)."""
    ny, nx = shape
    x = meas["x"][m_src]
    y = meas["y"][m_src]
    ra = refs_m["ra"].to_numpy()
    dec = refs_m["dec"].to_numpy()
    ncoef = (config.sip_order + 1) * (config.sip_order + 2) // 2
    header_sip = _header_sip(wcs)
    full = m_src.size >= config.min_stars_per_sip_coefficient * ncoef or header_sip is None
    if full:
        order = config.sip_order
        while order > 1 and m_src.size < config.min_stars_per_sip_coefficient * (order + 1) * (order + 2) / 2:
            order -= 1
        crpix = (0.5 * (nx - 1), 0.5 * (ny - 1))
        crval = tuple(float(v) for v in copy_wcs(wcs).pixel_to_world_values(crpix[0], crpix[1]))
        sol = fit_tan_sip(x, y, ra, dec, crpix=crpix, crval=crval, order=order, shape=shape)
        new_wcs, cards = _wcs_from_solution(sol, shape)
        status = f"fitted TAN-SIP order {order}"

        def position_error(px, py):
            return tan_sip_position_error(sol, px, py)
    else:
        # Few stars: keep the header distortion, fit CRVAL and CD on SIP-corrected positions.
        crpix0, a, b = header_sip
        u, v = x - crpix0[0], y - crpix0[1]
        fu, fv = _apply_sip(a, b, u, v)
        crval = tuple(float(q) for q in copy_wcs(wcs).wcs.crval)
        sol = fit_tan_sip(x + fu, y + fv, ra, dec, crpix=tuple(crpix0), crval=crval, order=1, shape=shape)
        new_wcs, cards = _wcs_from_solution(sol, shape, extra_sip=(a, b))
        status = "fitted TAN (CRVAL, CD) on the header SIP distortion"

        def position_error(px, py):
            gu, gv = _apply_sip(a, b, px - crpix0[0], py - crpix0[1])
            return tan_sip_position_error(sol, px + gu, py + gv)
    # residuals through the final WCS (the stored one), milliarcseconds
    fra, fdec = copy_wcs(new_wcs).pixel_to_world_values(x, y)
    dxi = ((ra - fra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec)) * 3.6e6
    deta = (dec - fdec) * 3.6e6
    used = np.asarray(sol.used, bool)
    r2 = dxi[used] ** 2 + deta[used] ** 2
    astro.update(status=status, n_used=int(used.sum()), rms_mas=float(np.sqrt(np.mean(r2))),
                 scatter_mas=float(1.4826 * np.median(np.sqrt(r2)) / 1.1774),
                 median_offset_mas=[float(np.median(dxi[used])), float(np.median(deta[used]))],
                 used_index=m_src[used], position_error=position_error)
    # the fitted WCS's own error (per axis, mas) at the centre and its largest on a grid over the detector
    gy, gx = np.meshgrid(np.linspace(0, ny - 1, 9), np.linspace(0, nx - 1, 9), indexing="ij")
    exi, eeta = position_error(gx.ravel(), gy.ravel())
    e = 1000.0 * np.sqrt(0.5 * (exi**2 + eeta**2))
    astro.update(wcs_err_centre_mas=float(e[e.size // 2]), wcs_err_max_mas=float(np.max(e)))
    return new_wcs, cards, astro


def _catalogue(meas, det, psf_flux, psf_flux_err, bkg, cal, wcs, exp, cand, used, reserved, phot_used,
               astro_used, config, flux_sys=0.0, position_error=None) -> pd.DataFrame:
    n = len(meas["x"])
    x, y = meas["x"], meas["y"]
    if wcs is not None and n:
        xs = np.where(np.isfinite(x), x, det.x)
        ys = np.where(np.isfinite(y), y, det.y)
        ra, dec = copy_wcs(wcs).pixel_to_world_values(xs, ys)
        ra_err, dec_err = _sky_errors(meas, wcs, xs, ys, position_error)
    else:
        ra = dec = ra_err = dec_err = np.full(n, np.nan)
    ix = np.clip(np.round(np.nan_to_num(x, nan=0.0)).astype(int), 0, exp.shape[1] - 1)
    iy = np.clip(np.round(np.nan_to_num(y, nan=0.0)).astype(int), 0, exp.shape[0] - 1)
    visit = exp.visit_info.visit if exp.visit_info is not None and exp.visit_info.visit is not None else 0
    detector = int(exp.detector.get("id", 0) or 0)
    cols = {
        # unique per (visit, detector): visit * 2^24 + detector * 2^16... kept simple and documented
        "id": (np.int64(visit) * 1000 + detector) * 1_000_000 + np.arange(1, n + 1, dtype=np.int64),
        "parent": det.parent.astype(np.int64),
        "x": x + exp.xy0[0], "y": y + exp.xy0[1], "x_err": meas["x_err"], "y_err": meas["y_err"],
        "ra": np.asarray(ra, float), "dec": np.asarray(dec, float), "ra_err": ra_err, "dec_err": dec_err,
        "psf_flux": psf_flux * cal, "psf_flux_err": psf_flux_err * cal, "psf_chi2": meas["psf_chi2"],
    }
    units = dict(SRC_UNITS)
    for k in meas:
        if k.startswith("ap_flux_") and not k.endswith(("_err", "_flag")):
            cols[k] = meas[k] * cal
            cols[k + "_err"] = meas[k + "_err"] * cal
            units[k] = units[k + "_err"] = "nJy"
    cols["kron_flux"] = meas["kron_flux"] * cal
    cols["kron_flux_err"] = meas["kron_flux_err"] * cal
    cols["kron_radius"] = meas["kron_radius"]
    cols["gauss_flux"] = meas["gauss_flux"] * cal
    units.update(psf_flux="nJy", psf_flux_err="nJy", kron_flux="nJy", kron_flux_err="nJy", gauss_flux="nJy")
    cols.update(ixx=meas["ixx"], iyy=meas["iyy"], ixy=meas["ixy"])
    cols["sky"] = bkg.background[iy, ix].astype(np.float64) * cal
    cols["sky_rms"] = bkg.rms[iy, ix].astype(np.float64) * cal
    cols["peak_significance"] = det.peak_significance
    for name in FLAG_NAMES:
        cols[name] = np.asarray(meas[name], bool)
    cols["flag_streak"] = np.asarray(meas["flag_streak"], bool)
    cols["calib_psf_candidate"] = np.asarray(cand, bool)
    cols["calib_psf_used"] = np.asarray(used, bool)
    cols["calib_psf_reserved"] = np.asarray(reserved, bool)
    au = np.zeros(n, bool)
    if astro_used is not None:
        au[np.asarray(astro_used, int)] = True
    cols["calib_astrometry_used"] = au
    cols["calib_photometry_used"] = np.asarray(phot_used, bool)
    df = pd.DataFrame(cols)
    df.attrs["units"] = units
    df.attrs["meta"] = {"flux_unit": "nJy", "apcorr_radius_px": float(config.apcorr_radius),
                        "psf_flux_aperture_corrected": True, "psf_flux_sys": float(flux_sys),
                        "psf_flux_err": "photon noise of the PSF fit (x aperture correction) plus, in quadrature, "
                                        "psf_flux_sys x psf_flux: the PSF model's cross-validated fractional flux "
                                        "error on this detector's PSF stars",
                        "ra_err": "1-sigma sky position errors, deg (as in the reference catalogues), ra_err of "
                                  "ra cos(dec): the centroid error through the WCS plus, in quadrature, the fitted "
                                  "WCS's own error at the source (covariance of the TAN-SIP fit; common to all "
                                  "sources of the detector, so it cancels in relative positions); the centroid error "
                                  "alone when the header WCS is kept (ra_err_includes_wcs False)",
                        "ra_err_includes_wcs": position_error is not None}
    return df


def _sky_errors(meas, wcs, xs, ys, position_error=None):
    """1-sigma sky position errors (deg) along RA cos(dec) and Dec: the centroid covariance through
    the WCS's linear part (CD; the SIP terms change the local scale by ~0.1-0.5 % across a
    detector), plus the fitted WCS's own error (``position_error(x, y)`` -> arcsec per axis, from
    ``_fit_wcs``) in quadrature. The RA-Dec covariance is not kept."""
    j = np.asarray(copy_wcs(wcs).pixel_scale_matrix, float)  # deg / pixel (world axes: RA, Dec)
    xe2 = np.asarray(meas["x_err"], float) ** 2
    ye2 = np.asarray(meas["y_err"], float) ** 2
    xy = np.nan_to_num(np.asarray(meas["xy_cov"], float))
    var_a = j[0, 0] ** 2 * xe2 + 2 * j[0, 0] * j[0, 1] * xy + j[0, 1] ** 2 * ye2
    var_d = j[1, 0] ** 2 * xe2 + 2 * j[1, 0] * j[1, 1] * xy + j[1, 1] ** 2 * ye2
    if position_error is not None:
        exi, eeta = position_error(xs, ys)  # arcsec
        var_a = var_a + (np.nan_to_num(exi) / 3600.0) ** 2
        var_d = var_d + (np.nan_to_num(eeta) / 3600.0) ** 2
    return np.sqrt(var_a), np.sqrt(var_d)


# ------------------------------------------------------------------------------ tasks
@register_task("calibrate")
class CalibrateTask(Task):
    """Calibrate one detector from the ISR output (``isr_exposure``).

    The reference catalogue shards (``refcat`` datasets) within ``refcat_visit_radius_deg``
    of the visit boresight are attached to each quantum by :meth:`quanta`, so :meth:`run`
    does no I/O.
    """

    dimensions = _VD
    inputs = {
        "exposure": Input("isr_exposure", _VD),
        "refcat": Input("refcat", (), multiple=True, optional=True),
    }
    outputs = {
        "calexp": Output("calexp", _VD),
        "src": Output("src", _VD),
        "summary": Output("calibrate_summary", _VD),
    }
    Config = CalibrateConfig

    def quanta(self, repo, inputs, where):
        """Default join on the exposure, then only the refcat shards near the visit."""
        from procsky.refcat import shards_in_cone

        shards = list(inputs.get("refcat", []))
        names = sorted({d.data_id.get("refcat") for d in shards})
        name = self.config.refcat_name
        if name is None and len(names) > 1:
            from procsky.errors import ProcskyValueError

            raise ProcskyValueError(
                f"several reference catalogues are available ({', '.join(map(str, names))}); choose one with "
                f"-c {self.task_name or 'calibrate'}.refcat_name=NAME"
            )
        name = name or (names[0] if names else None)
        specs = default_quanta(self, {**inputs, "refcat": []})
        boresights: dict = {}
        for spec in specs:
            if not shards:
                spec.inputs["refcat"] = []
                continue
            key = (spec.data_id.get("instrument"), spec.data_id.get("visit"))
            if key not in boresights:
                boresights[key] = _boresight(repo, *key)
            bs = boresights[key]
            cand = [d for d in shards if d.data_id.get("refcat") == name]
            if bs is not None:
                keep = shards_in_cone([d.data_id for d in cand], bs[0], bs[1], self.config.refcat_visit_radius_deg, name)
                cand = [cand[i] for i in keep]
            spec.inputs["refcat"] = sorted(cand, key=lambda d: d.key)
        return specs

    def run(self, exposure, refcat=None):
        """Calibrate; returns ``{"calexp", "src", "summary"}``."""
        calexp, src, summary = calibrate_exposure(exposure, refcat or None, self.config)
        return {"calexp": calexp, "src": src, "summary": summary}


def _boresight(repo, instrument, visit):
    """(ra, dec) of a visit from the registry's visit record, or None."""
    if repo is None or visit is None:
        return None
    try:
        recs = repo.dimension_records("visit", f"instrument='{instrument}' AND visit={int(visit)}")
    except Exception:  # no visit records (hand-made repository): attach every shard
        return None
    for r in recs:
        ra, dec = r.get("boresight_ra"), r.get("boresight_dec")
        if ra is not None and dec is not None and np.isfinite(ra) and np.isfinite(dec):
            return float(ra), float(dec)
    return None
