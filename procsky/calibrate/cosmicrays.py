"""Cosmic-ray steps: L.A.Cosmic before detection, then the detections the PSF model shows to be sharper.

L.A.Cosmic (van Dokkum 2001, ``kernels.cosmicray.find_cosmic_rays``) tests pixel by pixel and
protects star cores by their fine structure; what it misses, the matched filter of the detection
step sums into "sources". Once the PSF is known, every detection is tested against it: faint
tracks sharper than the PSF have their sharp pixels masked CR and repaired, and the detection is
dropped when no significant PSF-shaped signal is left (``find_sharp_sources``). A hit on a star
is cleaned by the same test at ``psf_star_sigma`` and repaired with the star's PSF fit. Fainter
tracks still (1-4 sigma per pixel) are recognised as a whole: a detection that a line one pixel
wide fits better than both the PSF and a line as wide as the PSF, with no PSF-shaped signal left
beside it, is dropped and the track masked (``find_cr_tracks``; the lines are sought with the
earlier CR pixels at their values before the repair, so that a partly flagged track is seen whole).

On every frame, what these PSF-model tests flag is held to LSST's ``findCosmicRays`` criterion
(``kernels.cosmicray.psfsharp``) with the PSF model's peak-to-neighbour ratio: a detection whose
peak provably has the PSF's shape is no cosmic ray, and a pixel near a detection kept is flagged
only when sharper along a row, a column or a diagonal than the PSF allows. A residual sharper than
its neighbours' residuals is not enough: in a crowded field the PSF + plane fit of one detection
leaves its blended neighbours in the residual, peaks exactly as sharp as the PSF (the ``crowded``
recipe: 2986 pixels, 1.2 % of the frame, and 74 star cores flagged, no true hit among them).

Undersampled PSFs (FWHM below ``undersampled_fwhm``, 2.5 px): a star core is then about as sharp
as a hit, L.A.Cosmic's fine-structure test no longer protects it and a PSF model is least exact
there, so every flag is also held to LSST's ``findCosmicRays`` criterion (``kernels.cosmicray.
psfsharp``): sharper along a row, a column or a diagonal than the sharpest star of the frame
allows, and L.A.Cosmic's growth stops at pixels that provably peak like the PSF. The PSF is, before
the PSF model, the smaller of the seeing guess and the locus of the frame's bright peaks; after it,
also the model's. Noted ``cr_undersampled``.
"""

from __future__ import annotations

import numpy as np

from procsky.calibrate.config import CosmicRayConfig
from procsky.calibrate.state import CalibrateState, timed
from procsky.kernels.cosmicray import find_cosmic_rays, find_cr_tracks, find_sharp_sources, repair_pixels
from procsky.kernels.cosmicray.psfsharp import (
    estimate_peak_ratio,
    fwhm_of_peak_ratio,
    gaussian_peak_ratio,
    psf_shaped_peaks,
    sharper_than_psf,
)
from procsky.notes import note_degraded
from procsky.psf import SIGMA_TO_FWHM

__all__ = ["find_cosmic_ray_pixels", "remove_sharp_sources"]


def _sharpest_ratio(*ratios: float) -> float:
    """The smallest finite positive centred-peak ratio (the sharpest PSF) of ``ratios``, NaN if none."""
    ok = [r for r in ratios if np.isfinite(r) and r > 0.0]
    return min(ok) if ok else float("nan")


def _note_undersampled(ratio: float, config: CosmicRayConfig, source: str) -> None:
    note_degraded(
        "cr_undersampled",
        f"undersampled PSF (FWHM {fwhm_of_peak_ratio(ratio):.2f} px from {source}, < {config.undersampled_fwhm:g} px):"
        f" a cosmic-ray pixel must be sharper than {config.undersampled_margin:g} x that PSF's peak-to-neighbour"
        f" ratio {ratio:.3f} allows, by {config.undersampled_sigma:g} sigma (LSST's criterion); faint hits on"
        " star cores may stay unflagged",
        severity="info",
        fwhm=fwhm_of_peak_ratio(ratio),
        psf_ratio=ratio,
    )


def undersampled_ratio(state: CalibrateState, config: CosmicRayConfig) -> float:
    """Before the PSF model: the centred-peak neighbour ratio of the sharpest PSF the frame holds (the
    seeing guess ``sigma0`` or the bright peaks of ``sub``, whichever is sharper) when its FWHM is
    below ``config.undersampled_fwhm``; NaN for a well-sampled frame."""
    if not config.undersampled_fwhm > 0:
        return float("nan")
    bad = (state.mask & np.uint32(state.bit["BAD"] | state.bit["SAT"] | state.bit["NO_DATA"])) != 0
    r_data, _ = estimate_peak_ratio(state.sub, state.var_det, bad, quantile=0.5)
    if not np.isfinite(r_data):
        # a sparse frame (a small space field): fainter peaks, before trusting the seeing guess alone
        r_data, _ = estimate_peak_ratio(state.sub, state.var_det, bad, quantile=0.5, snr_min=15.0)
    r = _sharpest_ratio(r_data, gaussian_peak_ratio(state.sigma0 * SIGMA_TO_FWHM))
    return r if fwhm_of_peak_ratio(r) < config.undersampled_fwhm else float("nan")


def find_cosmic_ray_pixels(state: CalibrateState, config: CosmicRayConfig) -> None:
    """L.A.Cosmic on the background-subtracted image (before detection, so that hits do not become
    sources): CR and INTRP set, ``sub``, ``var_det`` and ``variance`` repaired, ``n_cr`` counted.
    Undersampled frames: candidates held to the sharpest PSF (:func:`undersampled_ratio`)."""
    if not config.enabled:
        return
    bit = state.bit
    ratio = undersampled_ratio(state, config)
    if np.isfinite(ratio):
        _note_undersampled(ratio, config, "the bright peaks of the frame or the seeing guess")
    cr = find_cosmic_rays(
        state.sub,
        state.var_det,
        state.mask,
        sigclip=config.sigclip,
        objlim=config.objlim,
        grow_sigma=config.grow_sigma,
        psf_ratio=ratio,
        psf_margin=config.undersampled_margin,
        psf_nsigma=config.undersampled_sigma,
        # ``sub`` and ``var_det`` are the state's own float32 planes: repaired where they are
        in_place=True,
    )
    state.n_cr = cr.n_pixels
    if state.n_cr:
        state.mask[cr.mask] |= np.uint32(bit["CR"] | bit["INTRP"])
    # the repaired image is ``sub`` and its variance ``var_det``: the result keeps the rest
    state.cosmic_rays = cr._replace(image=None, variance=None)


def _mark_cr(
    state: CalibrateState, pixels: np.ndarray, fit: np.ndarray, var_donor_bits: int, unusable: np.ndarray
) -> int:
    """Flag ``pixels`` not yet CR as CR + INTRP; the image takes the clean fit where there is one,
    else the median of the good neighbours; the variance the median of its neighbours outside
    ``var_donor_bits``. Returns the number of new CR pixels."""
    bit, mask, sub, var_det = state.bit, state.mask, state.sub, state.var_det
    newcr = pixels & ((mask & np.uint32(bit["CR"])) == 0)
    # the new pixels are few: work on their coordinates where no whole-frame plane is needed
    ys, xs = np.nonzero(newcr)
    if ys.size == 0:
        return 0
    mask[ys, xs] |= np.uint32(bit["CR"] | bit["INTRP"])
    donors_bad = unusable  # BAD, SAT or NO_DATA (bits these steps do not change)
    fv = fit[ys, xs]
    ok = np.isfinite(fv)
    fitted = np.zeros(newcr.shape, dtype=bool)
    fitted[ys[ok], xs[ok]] = True
    if not ok.all():
        unfitted = np.zeros(newcr.shape, dtype=bool)
        unfitted[ys[~ok], xs[~ok]] = True
        repair_pixels(sub, unfitted, donors_bad | fitted, 2)
    sub[ys[ok], xs[ok]] = fv[ok]
    unusable_bits = bit["BAD"] | bit["SAT"] | bit["NO_DATA"]
    var_bad = unusable if var_donor_bits == unusable_bits else (mask & np.uint32(var_donor_bits)) != 0
    repair_pixels(var_det, newcr, var_bad & ~newcr, 2)
    return int(ys.size)


def _keep_psf_shaped(
    state: CalibrateState, config: CosmicRayConfig, is_cr: np.ndarray, ratio: float, bad: np.ndarray
) -> np.ndarray:
    """``is_cr`` without the detections whose peak is provably PSF-shaped (``psf_shaped_peaks``): a
    PSF model of an undersampled PSF can be far enough off, and a blended neighbour's residual
    large enough, to leave no PSF-shaped signal in a star once its "sharp" pixels are removed."""
    if not np.isfinite(ratio) or not is_cr.any():
        return is_cr
    idx = np.flatnonzero(is_cr)
    shaped = psf_shaped_peaks(
        state.sub,
        state.var_det,
        state.meas["x"][idx],
        state.meas["y"][idx],
        ratio,
        bad=bad,
        margin=config.undersampled_margin,
        nsigma=config.undersampled_sigma,
    )
    out = is_cr.copy()
    out[idx[shaped]] = False
    return out


def _spare_kept_sources(
    state: CalibrateState,
    config: CosmicRayConfig,
    pixels: np.ndarray,
    is_cr: np.ndarray,
    ratio: float,
    hw: int,
    bad: np.ndarray,
) -> np.ndarray:
    """Of ``pixels``, those within ``hw`` px of a detection kept (not ``is_cr``)
    stay only when sharper than the PSF of centred-peak ratio ``ratio`` allows (on ``sub``, not yet
    repaired there). A detection judged a cosmic ray loses all its pixels (its faint track is not
    significant pixel by pixel)."""
    if not np.isfinite(ratio) or not pixels.any():
        return pixels
    ny, nx = state.shape
    near = np.zeros((ny, nx), bool)
    meas = state.meas
    for x, y in zip(meas["x"][~is_cr], meas["y"][~is_cr]):
        if np.isfinite(x) and np.isfinite(y):
            ix, iy = int(round(float(x))), int(round(float(y)))
            near[max(0, iy - hw) : max(0, iy + hw + 1), max(0, ix - hw) : max(0, ix + hw + 1)] = True
    test = pixels & near
    if not test.any():
        return pixels
    sharp = sharper_than_psf(
        state.sub,
        state.var_det,
        test,
        ratio,
        bad=bad,
        margin=config.undersampled_margin,
        nsigma=config.undersampled_sigma,
    )
    return (pixels & ~near) | sharp


def remove_sharp_sources(state: CalibrateState, config: CosmicRayConfig, nu_keep: float) -> None:
    """Test every detection against the PSF model (``state.stamps``); detections that are cosmic rays
    are dropped (with their per-source arrays), their pixels masked CR and repaired. ``nu_keep``:
    PSF significance a cleaned detection must keep to stay (the detection threshold)."""
    bit, mask, meas = state.bit, state.mask, state.meas
    if config.enabled and config.psf_test:
        # detections at the edge are tested too, on the part of the window inside the image
        skip = meas["flag_saturated"] | ~np.isfinite(meas["x"]) | ~np.isfinite(meas["y"])
        hw = int(min(6, max(3, round(2.0 * state.sigma_psf * 1.1774))))
        # every frame: the PSF model's centred-peak ratio, or the sharper PSF L.A.Cosmic was held
        # to on an undersampled frame (the frame's peaks or the seeing guess). A flag of the PSF-model
        # tests must be sharper than that PSF allows: in a crowded field the PSF + plane fit of one
        # detection leaves its undetected or blended neighbours in the residual, PSF-shaped peaks
        # that stand above their own opposite neighbours' residuals (the crowded recipe: 2986 such
        # pixels, 74 star cores, no true hit)
        r1 = state.cosmic_rays.psf_ratio if state.cosmic_rays is not None else float("nan")
        ratio = _sharpest_ratio(r1, gaussian_peak_ratio(state.sigma_psf * SIGMA_TO_FWHM))
        if (
            config.undersampled_fwhm > 0
            and fwhm_of_peak_ratio(ratio) < config.undersampled_fwhm
            and not np.isfinite(r1)
        ):
            _note_undersampled(ratio, config, "the PSF model")
        sharp = find_sharp_sources(
            state.sub,
            state.var_det,
            mask,
            meas["x"],
            meas["y"],
            state.stamps,
            skip=skip,
            half_width=hw,
            z_min=config.psf_z,
            excess_min=config.psf_excess,
            pixel_sigma=config.psf_pixel_sigma,
            nu_keep=nu_keep,
            star_sigma=config.psf_star_sigma,
            model_error=config.psf_model_error,
        )
        # BAD, SAT, NO_DATA: not changed by these tests (they set CR, INTRP and DETECTED)
        unusable = (mask & np.uint32(bit["BAD"] | bit["SAT"] | bit["NO_DATA"])) != 0
        is_cr = _keep_psf_shaped(state, config, sharp.is_cr, ratio, unusable)
        pixels = _spare_kept_sources(state, config, sharp.cr_pixels, is_cr, ratio, hw, unusable)
        state.n_cr += _mark_cr(state, pixels, sharp.repair, bit["BAD"] | bit["SAT"] | bit["NO_DATA"], unusable)
        del sharp, pixels  # their whole-frame planes, before the track test makes its own
        if config.track_test:
            # faint tracks: judged with the values of the CR pixels before their repair (a track
            # flagged in part is judged whole); bright stars on their pixels not yet flagged
            with timed(state.profile, "cosmic rays: tracks"):
                # the CR pixels take their raw values in ``sub`` itself while the test runs (it reads
                # ``sub`` only outside ``bad_bits``, which hold CR): no whole-frame copy
                cys, cxs = np.nonzero((mask & np.uint32(bit["CR"])) != 0)
                repaired = state.sub[cys, cxs]
                raw_values = (
                    state.image[cys, cxs]
                    - state.background_at(cys, cxs)
                    - (state.streak_model[cys, cxs] if state.streak_model is not None else 0.0)
                )
                state.sub[cys, cxs] = raw_values
                try:
                    tracks = find_cr_tracks(
                        state.sub,
                        state.var_det,
                        mask,
                        meas["x"],
                        meas["y"],
                        state.stamps,
                        state.sigma_psf,
                        raw=state.sub,
                        raw_bits=bit["CR"],
                        skip=skip | is_cr,
                        bad_bits=bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"],
                        nu_max=config.track_nu_max,
                        rho_max=config.track_rho_max,
                        min_gain=config.track_min_gain,
                        min_total=config.track_min_total,
                        nu_keep=nu_keep,
                        star_gain=config.track_star_gain,
                        model_error=config.track_model_error,
                    )
                finally:
                    state.sub[cys, cxs] = repaired
                del cys, cxs, repaired, raw_values
                is_cr = is_cr | _keep_psf_shaped(state, config, tracks.is_cr, ratio, unusable)
                pixels = _spare_kept_sources(state, config, tracks.cr_pixels, is_cr, ratio, hw, unusable)
                # the track pixels all have the joint fit; earlier CR pixels are no variance donors
                state.n_cr += _mark_cr(
                    state, pixels, tracks.repair, bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"], unusable
                )
        keep = ~is_cr
        state.n_cr_sources = int((~keep).sum())
        if state.n_cr_sources:
            _drop_detections(state, keep)
    ny, nx = state.shape
    if state.n_cr > 0.01 * nx * ny:
        note_degraded(
            "cr_flagged_fraction_high",
            f"{state.n_cr} pixels ({100.0 * state.n_cr / (nx * ny):.1f} % of "
            f"the {nx}x{ny} frame, > 1 %) flagged as cosmic rays and repaired",
            n_cr_pixels=int(state.n_cr),
        )


def _drop_detections(state: CalibrateState, keep: np.ndarray) -> None:
    """Keep only the detections ``keep``: footprints of vanished parents leave DETECTED, per-source arrays
    shrink."""
    det, n_det = state.det, state.n_det
    gone = np.setdiff1d(det.parent[~keep], det.parent[keep])
    if gone.size:
        # the footprints of the gone parents: the pixels of their children (every child, dropped before
        # or not: ``child_parent`` is indexed by the children plane's labels)
        gone_child = np.isin(state.child_parent, gone)
        gone_child[0] = False
        state.mask[gone_child[det.children]] &= ~np.uint32(state.bit["DETECTED"])
    parent = det.parent[keep]
    _, inv, cnt = np.unique(parent, return_inverse=True, return_counts=True)
    state.det = det._replace(
        x=det.x[keep],
        y=det.y[keep],
        peak_significance=det.peak_significance[keep],
        parent=parent,
        blended=(cnt[inv] > 1).reshape(-1),
    )
    state.meas = {
        k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == (n_det,) else v) for k, v in state.meas.items()
    }
    state.cand, state.used, state.reserved = state.cand[keep], state.used[keep], state.reserved[keep]
    state.stamps = state.stamps[keep]
    state.child_ids = state.child_ids[keep]
