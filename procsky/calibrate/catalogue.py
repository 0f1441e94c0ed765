"""Catalogue step: the ``src`` table, the calexp and the summary of one calibrated detector.

``src``: fluxes in nJy, positions (ra, dec) from the fitted WCS, flags as booleans, units in
``df.attrs["units"]`` (Parquet schema metadata), the detector and header zero points in
``df.attrs["meta"]``. The input image may be in ADU or electrons: all fluxes are "counts" of the
input image until the PhotoCalib turns them into nJy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from procsky.calibrate.astrometry import band
from procsky.calibrate.config import CalibrationConfig
from procsky.calibrate.state import CalibrateState
from procsky.exposure import Exposure
from procsky.kernels.measure import FLAG_NAMES
from procsky.wcs import copy_wcs, pixel_scale

__all__ = ["SRC_UNITS", "make_calexp", "make_catalogue", "make_summary"]

#: Units of the fixed ``src`` columns (flux columns are nJy, listed at run time).
SRC_UNITS = {
    "x": "pixel",
    "y": "pixel",
    "x_err": "pixel",
    "y_err": "pixel",
    "ra": "deg",
    "dec": "deg",
    "ra_err": "deg",
    "dec_err": "deg",
    "ixx": "pixel2",
    "iyy": "pixel2",
    "ixy": "pixel2",
    "sky": "nJy/pixel",
    "sky_rms": "nJy/pixel",
    "kron_radius": "pixel",
    "peak_significance": "sigma",
    "psf_chi2": "",
}


def _sky_errors(
    meas: dict[str, np.ndarray], wcs: Any, xs: np.ndarray, ys: np.ndarray, position_error: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """1-sigma sky position errors (deg) along RA cos(dec) and Dec: the centroid covariance through
    the WCS's linear part (CD; the SIP terms change the local scale by ~0.1-0.5 % across a
    detector), plus the fitted WCS's own error (``position_error(x, y)`` -> arcsec per axis, from
    the astrometric fit) in quadrature. The RA-Dec covariance is not kept."""
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


def _apcorr_radius(state: CalibrateState, config: CalibrationConfig) -> float:
    """The aperture PSF fluxes were corrected to (the configured one when no correction ran)."""
    r = float(state.apcorr_radius)
    return r if np.isfinite(r) else float(config.measurement.apcorr_radius)


def make_catalogue(state: CalibrateState, config: CalibrationConfig) -> pd.DataFrame:
    """The ``src`` table of the detector (fluxes calibrated by ``state.photocalib``)."""
    meas, det, exp, bkg, wcs = state.meas, state.det, state.exposure, state.background, state.wcs
    cal = state.photocalib.calibration
    position_error = state.astro.get("position_error")
    astro_used = state.astro.get("used_index")
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
        # unique per (visit, detector): (visit * 1000 + detector) * 10^6 + running number
        "id": (np.int64(visit) * 1000 + detector) * 1_000_000 + np.arange(1, n + 1, dtype=np.int64),
        "parent": det.parent.astype(np.int64),
        "x": x + exp.xy0[0],
        "y": y + exp.xy0[1],
        "x_err": meas["x_err"],
        "y_err": meas["y_err"],
        "ra": np.asarray(ra, float),
        "dec": np.asarray(dec, float),
        "ra_err": ra_err,
        "dec_err": dec_err,
        "psf_flux": state.psf_flux * cal,
        "psf_flux_err": state.psf_flux_err * cal,
        "psf_chi2": meas["psf_chi2"],
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
    cols["sky"] = state.background_at(iy, ix).astype(np.float64) * cal
    cols["sky_rms"] = bkg.rms_at(iy, ix).astype(np.float64) * cal
    cols["peak_significance"] = det.peak_significance
    for name in FLAG_NAMES:
        cols[name] = np.asarray(meas[name], bool)
    cols["flag_streak"] = np.asarray(meas["flag_streak"], bool)
    cols["calib_psf_candidate"] = np.asarray(state.cand, bool)
    cols["calib_psf_used"] = np.asarray(state.used, bool)
    cols["calib_psf_reserved"] = np.asarray(state.reserved, bool)
    au = np.zeros(n, bool)
    if astro_used is not None:
        au[np.asarray(astro_used, int)] = True
    cols["calib_astrometry_used"] = au
    cols["calib_photometry_used"] = np.asarray(state.phot_used, bool)
    df = pd.DataFrame(cols)
    df.attrs["units"] = units
    df.attrs["meta"] = {
        "flux_unit": "nJy",
        "apcorr_radius_px": _apcorr_radius(state, config),
        "psf_flux_aperture_corrected": True,
        "psf_flux_sys": float(state.flux_sys),
        "psf_flux_err": "photon noise of the PSF fit (x aperture correction) plus, in quadrature, "
        "psf_flux_sys x psf_flux: the PSF model's cross-validated fractional flux "
        "error on this detector's PSF stars",
        "ra_err": "1-sigma sky position errors, deg (as in the reference catalogues), ra_err of "
        "ra cos(dec): the centroid error through the WCS plus, in quadrature, the fitted "
        "WCS's own error at the source (covariance of the TAN-SIP fit; common to all "
        "sources of the detector, so it cancels in relative positions); the centroid error "
        "alone when the header WCS is kept (ra_err_includes_wcs False)",
        "ra_err_includes_wcs": position_error is not None,
    }
    # reference magnitudes of the stars eligible for the zero point: the visit-level calibration
    # (``procsky.tasks.photometry``) pools them over the detectors of a visit
    df["ref_mag"] = state.ref_mag
    df["ref_mag_err"] = state.ref_mag_err
    df["calib_photometry_candidate"] = state.phot_cand
    df.attrs["units"].update(ref_mag="mag", ref_mag_err="mag")
    photocalib = state.photocalib
    df.attrs["meta"].update(
        zero_point=float(photocalib.zero_point),
        zero_point_err=float(photocalib.zero_point_err),
        header_zero_point=state.header_zp,
        photometry_status=state.phot["status"],
    )
    return df


def make_calexp(state: CalibrateState, config: CalibrationConfig) -> Exposure:
    """The calibrated exposure: working image, variance and mask with the fitted PSF, WCS and
    PhotoCalib, and what the steps found in ``metadata["calibrate"]``."""
    exp, bkg, growth = state.exposure, state.background, state.growth
    state.astro.pop("used_index", None)
    state.astro.pop("position_error", None)
    metadata = dict(exp.metadata)
    metadata.update(
        {
            "calibrate": {
                "background_level": bkg.global_background,
                "background_rms": bkg.global_rms,
                "background_box": list(bkg.box_size),
                "background_mesh": bkg.mesh_background.tolist(),
                "psf": state.psf_info,
                "apcorr": state.apcorr,
                "apcorr_radius": _apcorr_radius(state, config),
                "growth": growth.to_dict(),
                "astrometry": state.astro,
                "photometry": state.phot,
                "n_cr_pixels": int(state.n_cr),
                "n_cr_sources": state.n_cr_sources,
                "streaks": state.streaks,
            },
        }
    )
    return Exposure(
        state.sub,
        state.variance,
        state.mask,
        wcs=state.wcs,
        wcs_cards=state.wcs_cards or None,
        psf=state.psf,
        photocalib=state.photocalib,
        visit_info=exp.visit_info,
        detector=exp.detector,
        metadata=metadata,
        mask_planes=state.planes,
        xy0=exp.xy0,
    )


def make_summary(state: CalibrateState, src: pd.DataFrame) -> dict[str, Any]:
    """One row of figures of merit of the detector (the ``calibrate_summary`` dataset)."""
    exp, det, bkg, psf_info, astro, phot = (
        state.exposure,
        state.det,
        state.background,
        state.psf_info,
        state.astro,
        state.phot,
    )
    ny, nx = state.shape
    wcs, photocalib, growth = state.wcs, state.photocalib, state.growth
    scale = pixel_scale(copy_wcs(wcs), 0.5 * nx, 0.5 * ny) if wcs is not None else float("nan")
    return {
        "visit": exp.visit_info.visit if exp.visit_info else None,
        "detector": exp.detector.get("id"),
        "band": band(exp),
        "n_sources": int(len(src)),
        "detection_threshold_nu": float(det.threshold),
        "detection_nu_offset": float(det.nu_offset),
        "detection_nu_scale": float(det.nu_scale),
        "n_cr_pixels": int(state.n_cr),
        "n_cr_sources": state.n_cr_sources,
        "n_streaks": len(state.streaks),
        "sky_level": float(bkg.global_background),
        "sky_rms": float(bkg.global_rms),
        "psf_model": psf_info.get("model"),
        "psf_fwhm_px": float(psf_info.get("fwhm_px", np.nan)),
        "psf_fwhm_arcsec": float(psf_info.get("fwhm_px", np.nan) * scale),
        "psf_moment_fwhm_px": float(psf_info.get("moment_fwhm_px", np.nan)),
        "psf_n_stars": int(psf_info.get("n_stars", 0)),
        "psf_reserved_dT_median": float(psf_info.get("reserved_dT_median", np.nan)),
        "psf_reserved_dT_std": float(psf_info.get("reserved_dT_std", np.nan)),
        "psf_flux_sys": float(psf_info.get("flux_sys_applied", 0.0)),
        "apcorr": float(state.apcorr),
        "apcorr_err": float(state.apcorr_err),
        "apcorr_n_stars": int(state.n_apcorr),
        "aperture_to_total": float(growth.correction),
        "aperture_to_total_err": float(growth.error),
        "aperture_to_total_n_stars": int(growth.n_stars),
        "zero_point": float(photocalib.zero_point),
        "zero_point_err": float(photocalib.zero_point_err),
        "zero_point_n_stars": int(phot.get("n_stars", 0)),
        "header_zero_point": state.header_zp,
        "photometry_status": phot["status"],
        "astrometry_status": astro["status"],
        "astrometry_n_matches": int(astro.get("n_matches", 0)),
        "astrometry_n_used": int(astro.get("n_used", 0)),
        "astrometry_rms_mas": float(astro.get("rms_mas", np.nan)),
        "astrometry_scatter_mas": float(astro.get("scatter_mas", np.nan)),
        "astrometry_wcs_err_max_mas": float(astro.get("wcs_err_max_mas", np.nan)),
        "pixel_scale_arcsec": float(scale),
    }
