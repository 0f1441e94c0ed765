"""Astrometry step: reference stars matched by offset voting, TAN-SIP fit.

Full SIP with enough stars; otherwise a linear fit on top of the header SIP distortion. Without a
reference catalogue, or with too few matches, the header WCS is kept and ``astrometry_status``
says why. The fit's coefficient covariance (heteroscedasticity-consistent, from the residuals of
the stars used; HC1, White 1980) gives the WCS's own error at every source, added to the centroid
error in ``ra_err``/``dec_err``. It is common to all sources of a detector, leaves out errors of a
kept header SIP, and is only a rough estimate - and no error at all for unmodelled distortion -
when few stars force a lower fit order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from procsky.calibrate.config import AstrometryConfig, CalibrationConfig
from procsky.calibrate.state import CalibrateState
from procsky.errors import AlgorithmError
from procsky.exposure import Exposure
from procsky.kernels.astrometry import fit_tan_sip, match_sources, tan_sip_position_error
from procsky.notes import note_degraded
from procsky.wcs import copy_wcs, wcs_cards, wcs_from_cards

__all__ = ["band", "fit_astrometry", "mag_column"]


def band(exp: Exposure) -> str:
    """The exposure's band ("" without visit info)."""
    return exp.visit_info.band if exp.visit_info is not None else ""


def mag_column(refs: pd.DataFrame, exp: Exposure, band_map: dict[str, str]) -> str | None:
    """The reference magnitude column of the exposure's band (through ``band_map``), if it has values."""
    b = band(exp)
    name = band_map.get(b, b)
    col = f"mag_{name}"
    if col in refs.columns and np.isfinite(refs[col].to_numpy(dtype=float)).any():
        return col
    return None


def _header_sip(wcs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(crpix0, a, b) of a WCS's SIP terms, or None."""
    if wcs is None or wcs.sip is None:
        return None
    return (np.array(wcs.sip.crpix, float) - 1.0, np.array(wcs.sip.a, float), np.array(wcs.sip.b, float))


def _apply_sip(a: np.ndarray, b: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _wcs_from_solution(sol: Any, shape: tuple[int, int], extra_sip: tuple[np.ndarray, np.ndarray] | None = None):
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


def _fit_wcs(
    meas: dict[str, np.ndarray],
    m_src: np.ndarray,
    refs_m: pd.DataFrame,
    wcs: Any,
    shape: tuple[int, int],
    config: AstrometryConfig,
    astro: dict[str, Any],
):
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
        assert header_sip is not None  # (full otherwise)
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
    astro.update(
        status=status,
        n_used=int(used.sum()),
        rms_mas=float(np.sqrt(np.mean(r2))),
        scatter_mas=float(1.4826 * np.median(np.sqrt(r2)) / 1.1774),
        median_offset_mas=[float(np.median(dxi[used])), float(np.median(deta[used]))],
        used_index=m_src[used],
        position_error=position_error,
    )
    # the fitted WCS's own error (per axis, mas) at the centre and its largest on a grid over the detector
    gy, gx = np.meshgrid(np.linspace(0, ny - 1, 9), np.linspace(0, nx - 1, 9), indexing="ij")
    exi, eeta = position_error(gx.ravel(), gy.ravel())
    e = 1000.0 * np.sqrt(0.5 * (exi**2 + eeta**2))
    astro.update(wcs_err_centre_mas=float(e[e.size // 2]), wcs_err_max_mas=float(np.max(e)))
    return new_wcs, cards, astro


def fit_astrometry(state: CalibrateState, refcat: Any, config: CalibrationConfig) -> None:
    """Match the sources to the reference stars (``refcat``: a DataFrame or its shards) and fit the WCS:
    ``wcs``, ``wcs_cards``, ``astro`` (status and fit figures), ``refs``, ``ref_on`` (reference stars on
    the detector) and ``bright`` (sources usable for matching) filled. AlgorithmError when the fit fails
    and ``astrometry.fallback`` is ``"fail"``."""
    from procsky.refcat import apply_proper_motion, concat_shards, select_in_footprint

    cfg = config.astrometry
    exp, meas = state.exposure, state.meas
    ny, nx = state.shape
    wcs = copy_wcs(exp.wcs)
    cards = exp.wcs_cards
    refs = None
    if refcat is not None:
        refs = concat_shards(refcat) if isinstance(refcat, (list, tuple)) else refcat
        if refs is not None and len(refs) and "refcat" in refs.columns and config.refcat_name:
            refs = refs[refs["refcat"] == config.refcat_name]
    astro: dict[str, Any] = {"status": "header WCS (no reference catalogue)", "n_matches": 0}
    match = None
    ref_on = None
    bright = ~(
        meas["flag_saturated_center"] | meas["centroid_flag"] | meas["flag_edge"] | meas["flag_streak"]
    ) & np.isfinite(meas["x"])
    if refs is not None and len(refs) and wcs is not None:
        if cfg.apply_proper_motion and exp.visit_info is not None and np.isfinite(exp.visit_info.mjd):
            refs = apply_proper_motion(refs, exp.visit_info.mjd)
        ref_on = select_in_footprint(refs, wcs, (ny, nx), margin_px=cfg.match_max_offset)
        sidx = np.flatnonzero(bright)
        magcol = mag_column(ref_on, exp, config.photometry.refcat_band_map)
        if len(ref_on) >= 1 and sidx.size >= 1:
            match = match_sources(
                meas["x"][sidx],
                meas["y"][sidx],
                ref_on["x"].to_numpy(),
                ref_on["y"].to_numpy(),
                src_flux=state.psf_flux[sidx],
                ref_mag=ref_on[magcol].to_numpy() if magcol else None,
                max_offset=cfg.match_max_offset,
                max_rotation=cfg.match_max_rotation,
                match_radius=cfg.match_radius,
                min_matches=min(cfg.min_matches, 6),
            )
            m_src = sidx[match.src_index]
            m_ref = match.ref_index
        else:
            m_src = m_ref = np.zeros(0, np.int64)
        astro["n_matches"] = int(m_src.size)
        fit_error = None
        if m_src.size >= cfg.min_matches and (match is None or match.ok):
            try:
                new_wcs, new_cards, new_astro = _fit_wcs(
                    meas, m_src, ref_on.iloc[m_ref], wcs, (ny, nx), cfg, dict(astro)
                )
            except (ValueError, np.linalg.LinAlgError) as exc:
                fit_error = f"TAN-SIP fit failed: {exc}"
            else:
                if new_astro["rms_mas"] <= 1000.0 * cfg.max_rms_arcsec:
                    wcs, cards, astro = new_wcs, new_cards, new_astro
                else:
                    # (max_astrometry_rms_arcsec = astrometry.max_rms_arcsec; the status text is stored)
                    fit_error = (
                        f"fit rms {new_astro['rms_mas']:.0f} mas > max_astrometry_rms_arcsec="
                        f"{cfg.max_rms_arcsec} (bad matches?)"
                    )
        if fit_error is not None:
            if cfg.fallback == "fail":
                raise AlgorithmError(f"astrometric calibration failed: {fit_error}")
            astro["status"] = f"header WCS ({fit_error})"
        elif not astro["status"].startswith("fitted"):
            # (status texts name the fields as they were first called: min_astrometry_matches = min_matches)
            reason = (
                match.message
                if match is not None and not match.ok
                else f"only {m_src.size} reference matches (< min_astrometry_matches={cfg.min_matches})"
            )
            if cfg.fallback == "fail":
                raise AlgorithmError(f"astrometric calibration failed: {reason}")
            astro["status"] = f"header WCS ({reason})"
    elif refs is not None and len(refs) and wcs is None:
        astro["status"] = "no WCS (the exposure has none to start the match from)"
    elif refs is not None and len(refs) == 0:
        astro["status"] = "header WCS (no reference stars on this detector)"
        if cfg.fallback == "fail":
            raise AlgorithmError("astrometric calibration failed: no reference stars overlap this detector")

    if astro["status"].startswith("no WCS"):
        note_degraded("no_header_wcs", "the exposure has no WCS: no astrometric match, no sky positions")
    elif astro["status"].startswith("header WCS"):
        why = astro["status"][len("header WCS (") : -1]
        if ref_on is None or not len(ref_on):
            note_degraded("no_refcat", f"{why}: header WCS and header zero point kept")
        else:
            note_degraded(
                "header_wcs_kept",
                f"astrometric fit not used ({why}): header WCS kept",
                n_matches=int(astro.get("n_matches", 0)),
            )
    elif astro["status"].startswith("fitted TAN ("):
        note_degraded(
            "astrometry_header_distortion",
            f"{astro['status']} ({astro.get('n_used', 0)} stars: too few for the full TAN-SIP fit)",
            severity="info",
            n_used=int(astro.get("n_used", 0)),
        )
    state.wcs, state.wcs_cards, state.astro = wcs, cards, astro
    state.refs, state.ref_on, state.bright = refs, ref_on, bright
