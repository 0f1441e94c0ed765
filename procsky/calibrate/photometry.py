"""Photometry step: the detector's zero point against the reference magnitudes.

Zero point = clipped median of ``m_ref - m_inst`` (aperture-corrected PSF magnitudes of unflagged,
unsaturated stars); otherwise the header zero point. The stars eligible for it keep their reference
magnitude (``src`` columns ``ref_mag``, ``ref_mag_err``, ``calib_photometry_candidate``), so that
``visit_photometry`` (:mod:`procsky.tasks.photometry`) can fit one zero point per visit from all its
detectors (the final PhotoCalib used by the warps).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from procsky.calibrate.astrometry import band, mag_column
from procsky.calibrate.config import PhotometryConfig
from procsky.calibrate.state import CalibrateState
from procsky.errors import AlgorithmError
from procsky.kernels.astrometry import photometric_zero_point
from procsky.notes import note_degraded
from procsky.photocalib import PhotoCalib
from procsky.wcs import copy_wcs

__all__ = ["fit_zero_point"]


def fit_zero_point(state: CalibrateState, config: PhotometryConfig, match_radius: float) -> None:
    """Zero point of the detector from the reference stars on it (``state.ref_on``) within
    ``match_radius`` pixels of a source: ``photocalib``, ``phot``, ``phot_used``, ``ref_mag``,
    ``ref_mag_err``, ``phot_cand`` and ``header_zp`` filled. AlgorithmError without one when
    ``fallback`` is ``"fail"``."""
    exp, meas, n_det = state.exposure, state.meas, state.n_det
    psf_flux, psf_flux_err, ref_on = state.psf_flux, state.psf_flux_err, state.ref_on
    phot: dict[str, Any] = {"status": "header zero point (no reference catalogue)"}
    photocalib = exp.photocalib
    phot_used = np.zeros(n_det, bool)
    ref_mag = np.full(n_det, np.nan)
    ref_mag_err = np.full(n_det, np.nan)
    phot_cand = np.zeros(n_det, bool)
    header_zp = float(exp.photocalib.zero_point) if exp.photocalib is not None else float("nan")
    if ref_on is not None and len(ref_on):
        magcol = mag_column(ref_on, exp, config.refcat_band_map)
        rx, ry = copy_wcs(state.wcs).world_to_pixel_values(ref_on["ra"].to_numpy(), ref_on["dec"].to_numpy())
        from scipy.spatial import cKDTree

        good = state.bright & np.isfinite(psf_flux) & (psf_flux > 0) & ~meas["flag_saturated"] & ~meas["psf_flux_flag"]
        with np.errstate(divide="ignore", invalid="ignore"):
            good &= psf_flux / psf_flux_err > config.min_snr
        zp_reason = None
        if magcol is None:
            # (the status text is stored: it names the field as it was first called)
            zp_reason = f"the reference catalogue has no magnitude for band {band(exp)!r} (set refcat_band_map)"
        elif good.any():
            tree = cKDTree(np.column_stack([rx, ry]))
            d, j = tree.query(np.column_stack([meas["x"][good], meas["y"][good]]), distance_upper_bound=match_radius)
            ok = np.isfinite(d)
            gi = np.flatnonzero(good)[ok]
            rj = j[ok]
            if magcol is not None and gi.size:
                ref_mag[gi] = ref_on[magcol].to_numpy(dtype=float)[rj]
                if magcol + "_err" in ref_on.columns:
                    ref_mag_err[gi] = ref_on[magcol + "_err"].to_numpy(dtype=float)[rj]
                phot_cand[gi] = np.isfinite(ref_mag[gi])
            if gi.size >= config.min_stars:
                inst = -2.5 * np.log10(psf_flux[gi])
                inst_err = 1.0857 * psf_flux_err[gi] / psf_flux[gi]
                try:
                    zp, zp_err, n_zp, zused = photometric_zero_point(
                        ref_on[magcol].to_numpy()[rj],
                        inst,
                        ref_err=ref_on[magcol + "_err"].to_numpy()[rj] if magcol + "_err" in ref_on.columns else None,
                        inst_err=inst_err,
                    )
                except ValueError as exc:
                    zp_reason = str(exc)
                else:
                    if n_zp >= config.min_stars:
                        photocalib = PhotoCalib.from_zero_point(zp, zp_err)
                        phot = {
                            "status": f"fitted against {magcol}",
                            "zero_point": zp,
                            "zero_point_err": zp_err,
                            "n_stars": int(n_zp),
                        }
                        phot_used[gi[zused]] = True
                    else:
                        zp_reason = f"only {n_zp} stars survive clipping"
            else:
                zp_reason = f"only {gi.size} matched stars with S/N > {config.min_snr}"
        else:
            zp_reason = "no unsaturated star with a good PSF flux"
        if zp_reason is not None:
            if config.fallback == "fail":
                raise AlgorithmError(f"photometric calibration failed: {zp_reason}")
            phot["status"] = f"header zero point ({zp_reason})"
            note_degraded("header_zero_point_kept", f"{phot['status']} kept")
    if (
        state.refs is not None
        and (ref_on is None or not len(ref_on))
        and phot["status"].endswith("(no reference catalogue)")
    ):
        phot["status"] = "header zero point (no reference stars on this detector)"
    if photocalib is None:
        phot["status"] += "; no header zero point either: fluxes stay in counts (calibration 1)"
        note_degraded("no_zero_point", phot["status"])
        photocalib = PhotoCalib(1.0)
    state.photocalib, state.phot, state.phot_used = photocalib, phot, phot_used
    state.ref_mag, state.ref_mag_err, state.phot_cand, state.header_zp = ref_mag, ref_mag_err, phot_cand, header_zp
