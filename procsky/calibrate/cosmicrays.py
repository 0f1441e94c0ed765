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
"""

from __future__ import annotations

import numpy as np

from procsky.calibrate.config import CosmicRayConfig
from procsky.calibrate.state import CalibrateState
from procsky.kernels.cosmicray import find_cosmic_rays, find_cr_tracks, find_sharp_sources, repair_pixels
from procsky.notes import note_degraded

__all__ = ["find_cosmic_ray_pixels", "remove_sharp_sources"]


def find_cosmic_ray_pixels(state: CalibrateState, config: CosmicRayConfig) -> None:
    """L.A.Cosmic on the background-subtracted image (before detection, so that hits do not become
    sources): CR and INTRP set, ``sub``, ``var_det`` and ``variance`` repaired, ``n_cr`` counted."""
    if not config.enabled:
        return
    bit = state.bit
    cr = find_cosmic_rays(
        state.sub, state.var_det, state.mask, sigclip=config.sigclip, objlim=config.objlim, grow_sigma=config.grow_sigma
    )
    state.cosmic_rays = cr
    state.n_cr = cr.n_pixels
    if state.n_cr:
        state.mask[cr.mask] |= np.uint32(bit["CR"] | bit["INTRP"])
        state.sub = cr.image
        state.var_det = np.where(cr.mask, cr.variance, state.var_det).astype(np.float32)
        state.variance = np.where(cr.mask, cr.variance, state.variance).astype(np.float32)


def _mark_cr(state: CalibrateState, pixels: np.ndarray, fit: np.ndarray, var_donor_bits: int) -> int:
    """Flag ``pixels`` not yet CR as CR + INTRP; the image takes the clean fit where there is one,
    else the median of the good neighbours; the variance the median of its neighbours outside
    ``var_donor_bits``. Returns the number of new CR pixels."""
    bit, mask, sub, var_det = state.bit, state.mask, state.sub, state.var_det
    newcr = pixels & ((mask & np.uint32(bit["CR"])) == 0)
    if not newcr.any():
        return 0
    mask[newcr] |= np.uint32(bit["CR"] | bit["INTRP"])
    donors_bad = (mask & np.uint32(bit["BAD"] | bit["SAT"] | bit["NO_DATA"])) != 0
    fitted = newcr & np.isfinite(fit)
    if (newcr & ~fitted).any():
        repair_pixels(sub, newcr & ~fitted, donors_bad | fitted, 2)
    sub[fitted] = fit[fitted]
    repair_pixels(var_det, newcr, ((mask & np.uint32(var_donor_bits)) != 0) & ~newcr, 2)
    state.variance = np.where(newcr, var_det, state.variance).astype(np.float32)
    return int(newcr.sum())


def remove_sharp_sources(state: CalibrateState, config: CosmicRayConfig, nu_keep: float) -> None:
    """Test every detection against the PSF model (``state.stamps``); detections that are cosmic rays
    are dropped (with their per-source arrays), their pixels masked CR and repaired. ``nu_keep``:
    PSF significance a cleaned detection must keep to stay (the detection threshold)."""
    bit, mask, meas = state.bit, state.mask, state.meas
    if config.enabled and config.psf_test:
        # detections at the edge are tested too, on the part of the window inside the image
        skip = meas["flag_saturated"] | ~np.isfinite(meas["x"]) | ~np.isfinite(meas["y"])
        hw = int(min(6, max(3, round(2.0 * state.sigma_psf * 1.1774))))
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
        state.n_cr += _mark_cr(state, sharp.cr_pixels, sharp.repair, bit["BAD"] | bit["SAT"] | bit["NO_DATA"])
        is_cr = sharp.is_cr
        if config.track_test:
            # faint tracks: judged with the values of the CR pixels before their repair (a track
            # flagged in part is judged whole); bright stars on their pixels not yet flagged
            crm = (mask & np.uint32(bit["CR"])) != 0
            raw = state.sub.copy()
            raw[crm] = (
                state.image[crm]
                - state.background.background[crm]
                - (state.streak_model[crm] if state.streak_model is not None else 0.0)
            )
            tracks = find_cr_tracks(
                state.sub,
                state.var_det,
                mask,
                meas["x"],
                meas["y"],
                state.stamps,
                state.sigma_psf,
                raw=raw,
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
            # the track pixels all have the joint fit; earlier CR pixels are no variance donors
            state.n_cr += _mark_cr(
                state, tracks.cr_pixels, tracks.repair, bit["BAD"] | bit["SAT"] | bit["NO_DATA"] | bit["CR"]
            )
            is_cr = is_cr | tracks.is_cr
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
        state.mask[np.isin(det.footprints, gone)] &= ~np.uint32(state.bit["DETECTED"])
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
