"""Forced photometry of the data release's objects on calexps and difference images.

At every object position (the ``object`` table's ``ra``, ``dec``) on every calexp that
covers it, PSF photometry with the calexp's PSF model, position fixed, amplitude fitted
(the estimator of :func:`procsky.diffim.forced_dia_photometry`); the same on the
difference image of that visit and detector when there is one. The calexp flux is
scaled by the calexp's aperture correction and aperture-to-total correction (stored by
calibrate in ``metadata["calibrate"]``), exactly as the ``src`` PSF fluxes are, and
calibrated to nJy with the visit's zero point, so a constant star's forced fluxes agree
with its coadd PSF flux. The errors add, in quadrature, the fractional systematic error
of the epoch: the PSF model's flux error that calibrate measured on its reserved stars
and the zero point's error, so that a constant star's light curve has chi^2/dof ~ 1.

One row per (object, visit, detector), LSST's ``forcedSource``: ``psf_flux`` and
``psf_flux_err`` on the calexp, ``psf_diff_flux`` and ``psf_diff_flux_err`` on the
difference (NaN without one), ``mjd``, ``band``; ``masked_fraction`` is the PSF-weighted
fraction of masked (e.g. saturated) pixels under the fit: rows above a few per cent are
not trustworthy points of a light curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from procsky.notes import note_degraded

__all__ = ["FORCED_SOURCE_UNITS", "forced_photometry", "light_curve_chi2"]

FORCED_SOURCE_UNITS = {
    "psf_flux": "nJy",
    "psf_flux_err": "nJy",
    "psf_diff_flux": "nJy",
    "psf_diff_flux_err": "nJy",
    "ra": "deg",
    "dec": "deg",
    "x": "pixel",
    "y": "pixel",
    "mjd": "d",
}


def _flux_corrections(exp) -> tuple[float, float]:
    """The calexp's aperture correction times its aperture-to-total correction (1 if absent),
    and the fractional systematic flux error of one epoch: the PSF model's cross-validated
    flux error (``psf.flux_sys_applied``, as calibrate adds to ``src``) and the zero point's
    error, in quadrature."""
    cal = (exp.metadata or {}).get("calibrate") or {}
    apcorr = float(cal.get("apcorr", 1.0) or 1.0)
    growth = cal.get("growth") or {}
    total = float(growth.get("correction", 1.0) or 1.0) if isinstance(growth, dict) else 1.0
    out = apcorr * total
    psf = cal.get("psf") or {}
    sys = float(psf.get("flux_sys_applied", 0.0) or 0.0) if isinstance(psf, dict) else 0.0
    pc = exp.photocalib
    zp = float(pc.calibration_err / pc.calibration) if pc is not None and pc.calibration > 0 else 0.0
    frac = float(np.hypot(sys if np.isfinite(sys) else 0.0, zp if np.isfinite(zp) else 0.0))
    return (out if np.isfinite(out) and out > 0 else 1.0), frac


def _on_exposure(exp, ra, dec, ids):
    from procsky.diffim import forced_dia_photometry

    df = forced_dia_photometry(exp, ra, dec, ids)
    return df.rename(columns={"dia_object_id": "object_id"})


def forced_photometry(
    objects: pd.DataFrame,
    calexps: Sequence,
    diffs: Sequence | None = None,
    *,
    data_ids: Sequence | None = None,
) -> pd.DataFrame:
    """Forced PSF photometry of ``objects`` on each calexp (and its difference image).

    Parameters
    ----------
    objects : pandas.DataFrame
        ``object_id``, ``ra``, ``dec`` (deg).
    calexps : sequence of Exposure
        Calibrated single-visit exposures (calibrated to nJy by their ``photocalib``;
        apply :func:`procsky.photometry.apply_visit_photocalib` first for the visit's
        zero point).
    diffs : sequence of Exposure or None, optional
        The difference image of each calexp (same order; None where there is none).
    data_ids : sequence of dict, optional
        The calexps' data IDs (``visit``, ``detector``) when the exposures do not carry them.

    Returns
    -------
    pandas.DataFrame
        One row per object inside each calexp: ``object_id``, ``visit``, ``detector``,
        ``band``, ``mjd``, ``ra``, ``dec``, ``x``, ``y`` (calexp pixels), ``psf_flux``,
        ``psf_flux_err``, ``psf_diff_flux``, ``psf_diff_flux_err`` (nJy), ``psf_chi2``,
        ``masked_fraction``, ``flag_edge``, ``flag_psf_flux``, ``flag_diff``; units in
        ``attrs["units"]``.
    """
    ids = objects["object_id"].to_numpy(np.int64)
    ra = objects["ra"].to_numpy(float)
    dec = objects["dec"].to_numpy(float)
    diffs = list(diffs) if diffs is not None else [None] * len(calexps)
    frames = []
    for k, exp in enumerate(calexps):
        if exp is None:
            continue
        did = dict((data_ids[k] if data_ids is not None else None) or {})
        df = _on_exposure(exp, ra, dec, ids)
        if len(df) == 0:
            continue
        corr, frac = _flux_corrections(exp)
        df["psf_flux"] *= corr
        df["psf_flux_err"] = np.hypot(df["psf_flux_err"] * corr, frac * df["psf_flux"])
        df["psf_diff_flux"] = np.nan
        df["psf_diff_flux_err"] = np.nan
        df["flag_diff"] = True
        diff = diffs[k] if k < len(diffs) else None
        if diff is not None:
            dd = _on_exposure(diff, ra, dec, ids).set_index("object_id")
            common = df["object_id"].isin(dd.index).to_numpy()
            if common.any():
                sel = df.loc[common, "object_id"].to_numpy()
                df.loc[common, "psf_diff_flux"] = dd.loc[sel, "psf_flux"].to_numpy() * corr
                dflux = dd.loc[sel, "psf_flux"].to_numpy() * corr
                df.loc[common, "psf_diff_flux_err"] = np.hypot(
                    dd.loc[sel, "psf_flux_err"].to_numpy() * corr, frac * dflux
                )
                df.loc[common, "flag_diff"] = (
                    dd.loc[sel, "flag_psf_flux"].to_numpy() | dd.loc[sel, "flag_edge"].to_numpy()
                )
        for key in ("visit", "detector"):
            if key not in df and key in did:
                df[key] = np.full(len(df), int(did[key]), dtype=np.int64)
        if "band" in did and (df["band"] == "").all():
            df["band"] = did["band"]
        if exp.photocalib is None:
            note_degraded(
                "forced_uncalibrated",
                "a calexp without a photometric calibration: its forced fluxes are in counts, not nJy",
                severity="warning",
                visit=did.get("visit"),
                detector=did.get("detector"),
            )
        frames.append(df)
    cols = [
        "object_id",
        "visit",
        "detector",
        "band",
        "mjd",
        "ra",
        "dec",
        "x",
        "y",
        "psf_flux",
        "psf_flux_err",
        "psf_diff_flux",
        "psf_diff_flux_err",
        "psf_chi2",
        "masked_fraction",
        "flag_edge",
        "flag_psf_flux",
        "flag_diff",
    ]
    if not frames:
        out = pd.DataFrame({c: [] for c in cols})
    else:
        out = pd.concat(frames, ignore_index=True)
        for c in cols:
            if c not in out:
                out[c] = -1 if c in ("visit", "detector") else np.nan
        out = out[cols]
    for c in ("object_id", "visit", "detector"):
        out[c] = out[c].astype(np.int64)
    for c in ("flag_edge", "flag_psf_flux", "flag_diff"):
        out[c] = out[c].astype(bool)
    out["band"] = out["band"].astype(str)
    out = out.sort_values(["object_id", "mjd", "detector"], kind="stable").reset_index(drop=True)
    out.attrs["units"] = dict(FORCED_SOURCE_UNITS)
    return out


def light_curve_chi2(forced: pd.DataFrame, *, column: str = "psf_flux") -> pd.DataFrame:
    """Per object and band: weighted mean flux and chi^2/dof about it (constant-source test).

    Returns a DataFrame indexed by (``object_id``, ``band``) with ``n``, ``mean_flux``,
    ``chi2_dof`` (NaN for fewer than two points).
    """
    err = forced[f"{column}_err"].to_numpy(float)
    flux = forced[column].to_numpy(float)
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0) & ~forced["flag_psf_flux"].to_numpy(bool)
    df = pd.DataFrame(
        {
            "object_id": forced["object_id"].to_numpy()[ok],
            "band": forced["band"].to_numpy()[ok],
            "f": flux[ok],
            "w": 1.0 / err[ok] ** 2,
        }
    )
    df["fw"] = df["f"] * df["w"]
    g = df.groupby(["object_id", "band"])
    agg = g.agg(n=("f", "size"), sw=("w", "sum"), sfw=("fw", "sum"))
    agg["mean_flux"] = agg["sfw"] / agg["sw"]
    df = df.join(agg["mean_flux"], on=["object_id", "band"])
    df["c"] = (df["f"] - df["mean_flux"]) ** 2 * df["w"]
    chi2 = df.groupby(["object_id", "band"])["c"].sum()
    agg["chi2_dof"] = np.where(agg["n"] > 1, chi2 / np.maximum(agg["n"] - 1, 1), np.nan)
    return agg[["n", "mean_flux", "chi2_dof"]]
