"""How close a pipeline run came to the truth of the simulation it processed.

:func:`evaluate_run` reads a run's outputs from a repository (``calibrate_summary``,
``src``, ``visit_photocalib``, ``coadd``, ``diffim_summary``, ``dia_source``,
``dia_object``, ``object``, ``forced_source``) and the truth tables of the ``procsky sim`` output that was ingested,
and returns the figures a survey scientist checks first, as a plain dict:

* single frame: sources per detector, PSF FWHM, zero points against the true ones (offset
  and scatter), astrometric residuals of bright stars against their true positions, PSF
  fluxes of bright stars against their true fluxes;
* coadds: 5-sigma point-source depth and number of inputs per band;
* difference imaging: truth variables and transients recovered as DIA objects, DIA objects
  with no truth counterpart (per detector-visit), the template PSF-matching residuals;
* objects: completeness for truth objects of coadd S/N >= 10, spurious fraction, PSF-flux
  bias and g-r scatter of isolated stars, extendedness right or wrong, sky-object pulls,
  chi^2/dof of constant stars' forced light curves, variable amplitudes.

:func:`format_evaluation` renders the dict as a short text block (``make demo`` prints it).
Everything is computed from stored datasets; nothing is re-run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["evaluate_run", "format_evaluation"]

log = logging.getLogger(__name__)

#: AB zero point of a flux in nJy: m = 31.4 - 2.5 log10(f / nJy).
_AB_NJY = 31.4


def _sky_match(ra1, dec1, ra2, dec2, radius_arcsec: float):
    """Nearest neighbour of each (ra1, dec1) among (ra2, dec2): (index, separation arcsec);
    index -1 beyond ``radius_arcsec``."""
    from scipy.spatial import cKDTree

    ra1, dec1, ra2, dec2 = (np.asarray(a, float) for a in (ra1, dec1, ra2, dec2))
    if ra1.size == 0 or ra2.size == 0:
        return np.full(ra1.size, -1, int), np.full(ra1.size, np.inf)

    def xyz(ra, dec):
        r, d = np.radians(ra), np.radians(dec)
        return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])

    dist, idx = cKDTree(xyz(ra2, dec2)).query(xyz(ra1, dec1))
    sep = np.degrees(2 * np.arcsin(np.clip(dist / 2, 0, 1))) * 3600.0
    idx = np.where(sep <= radius_arcsec, idx, -1)
    return idx, sep


def _get_all(repo, dataset_type: str, run: str) -> list[tuple[dict, Any]]:
    try:
        refs = repo.query(dataset_type, run=run)
    except Exception as exc:  # noqa: BLE001 - a dataset type this run never produced
        log.debug("no %s datasets in run %r: %s", dataset_type, run, exc)
        return []
    return [(dict(ref.data_id), repo.get(ref)) for ref in sorted(refs, key=lambda r: sorted(r.data_id.items()))]


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return None
    return {
        "n": int(v.size),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "rms": float(np.sqrt(np.mean(v**2))),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    }


def _single_frame(repo, run: str, truth) -> dict:
    summaries = _get_all(repo, "calibrate_summary", run)
    visits = truth.visits.set_index("visit")
    out: dict[str, Any] = {"n_detector_visits": len(summaries)}
    if not summaries:
        return out
    out["sources_per_detector"] = _stats([s.get("n_sources") for _, s in summaries])
    out["psf_fwhm_arcsec"] = _stats([s.get("psf_fwhm_arcsec") for _, s in summaries])
    out["psf_stars_per_detector"] = _stats([s.get("psf_n_stars") for _, s in summaries])
    # Zero points: the calibrated per-detector zero point against the one the simulator drew
    # (``magzero``: ADU of a 0-mag AB source, extinction included).
    dzp = []
    for did, s in summaries:
        v = did.get("visit")
        if v in visits.index and s.get("zero_point") is not None:
            dzp.append(1000.0 * (s["zero_point"] - float(visits.loc[v, "magzero"])))
    out["zero_point_minus_truth_mmag"] = _stats(dzp)
    vpc = _get_all(repo, "visit_photocalib", run)
    # detector zero points about their visit's (one zero point per visit is what the warps use)
    out["detector_zero_point_scatter_mmag"] = _stats(
        [
            1000.0 * (d["detector_zero_point"] - p["zero_point"])
            for _, p in vpc
            for d in (p.get("detectors") or {}).values()
            if d.get("detector_zero_point") is not None
        ]
    )
    out["astrometry_fit_rms_mas"] = _stats([s.get("astrometry_rms_mas") for _, s in summaries])
    out["astrometry_status"] = sorted({str(s.get("astrometry_status")) for _, s in summaries})
    # Bright isolated stars of each src table against truth: position and PSF flux.
    objects = truth.objects.set_index("object_id")
    stars = objects[objects.kind == "star"]
    exposures = truth.exposures
    d_ra, d_dec, dmag = [], [], []
    for did, src in _get_all(repo, "src", run):
        if src is None or len(src) == 0 or "ra" not in src:
            continue
        v, det = did.get("visit"), did.get("detector")
        exp = exposures[(exposures.visit == v) & (exposures.detector == det)]
        on = stars.loc[stars.index.intersection(exp.object_id)]
        if on.empty:
            continue
        snr = src.psf_flux / src.psf_flux_err
        flags = [
            c
            for c in (
                "flag_edge",
                "flag_saturated",
                "flag_interpolated_center",
                "flag_cr_center",
                "flag_blended",
                "centroid_flag",
                "psf_flux_flag",
            )
            if c in src
        ]
        good = (snr > 50).to_numpy() & ~np.any(src[flags].to_numpy(bool), axis=1)
        s = src[good]
        idx, _ = _sky_match(s.ra, s.dec, on.ra, on.dec, 0.5)
        m = idx >= 0
        if not m.any():
            continue
        t = on.iloc[idx[m]]
        cosd = np.cos(np.radians(t.dec.to_numpy()))
        d_ra.extend(((s.ra.to_numpy()[m] - t.ra.to_numpy()) * cosd * 3.6e6).tolist())
        d_dec.extend(((s.dec.to_numpy()[m] - t.dec.to_numpy()) * 3.6e6).tolist())
        tf = exp.set_index("object_id").flux.reindex(t.index).to_numpy()
        ratio = s.psf_flux.to_numpy()[m] / tf
        dmag.extend((1000.0 * -2.5 * np.log10(ratio[ratio > 0])).tolist())
    if d_ra:
        out["bright_star_offset_mas"] = {
            "n": len(d_ra),
            "median_ra": float(np.median(d_ra)),
            "median_dec": float(np.median(d_dec)),
            "rms_per_axis": float(np.sqrt(np.mean(np.square(d_ra + d_dec)))),
        }
        out["bright_star_psf_mag_minus_truth_mmag"] = _stats(dmag)
    return out


def _coadd_depth(repo, run: str) -> dict:
    """5-sigma point-source depth per band from the coadd variance and PSF.

    For a PSF ``p`` normalised to unit sum, the optimal (PSF-weighted) flux error over
    white noise of variance ``v`` per pixel is ``sqrt(v / sum(p^2))``: ``1/sum(p^2)`` is the
    noise-equivalent area. The median over pixels with data is reported.
    """
    out = {}
    for did, co in _get_all(repo, "coadd", run):
        band = did.get("band")
        var = np.asarray(co.variance, dtype=float)
        ok = np.isfinite(var) & (var > 0)
        if not ok.any():
            continue
        ny, nx = var.shape
        yy, xx = np.nonzero(ok)
        cy, cx = float(np.median(yy)), float(np.median(xx))
        nea = float("nan")
        if co.psf is not None:
            try:
                k = np.asarray(co.psf.kernel(co.xy0[0] + cx, co.xy0[1] + cy), float)
                k = k / k.sum()
                nea = 1.0 / float((k**2).sum())
            except Exception:  # noqa: BLE001 - no PSF at the centre: depth unknown
                pass
        sigma = math.sqrt(float(np.median(var[ok])) * nea) if np.isfinite(nea) else float("nan")
        n_in = co.metadata.get("n_inputs_total") if co.metadata else None
        out[band] = {
            "m5": _AB_NJY - 2.5 * math.log10(5 * sigma) if sigma > 0 else float("nan"),
            "n_inputs": n_in,
            "area_fraction": float(ok.mean()),
            "nea_px": nea,
        }
    return out


def _dia(repo, run: str, truth, radius_arcsec: float) -> dict:
    out: dict[str, Any] = {}
    summaries = _get_all(repo, "diffim_summary", run)
    out["n_differences"] = len(summaries)
    if not summaries:
        return out
    out["residual_std_sigma"] = _stats([s.get("residual_std_sigma") for _, s in summaries])
    # The variance plane predicts the noise of a difference from its inputs' noise; where the
    # template was coadded from the science visit too, the shared noise cancels in part and
    # only the measured rescale can know it: those are reported apart.
    shared = [bool(s.get("science_in_template")) for _, s in summaries]
    ratios = [s.get("residual_std_sigma") for _, s in summaries]
    out["residual_std_sigma_independent"] = _stats([r for r, sh in zip(ratios, shared) if not sh])
    out["residual_std_sigma_shared"] = _stats([r for r, sh in zip(ratios, shared) if sh])
    out["n_science_in_template"] = int(sum(shared))
    out["n_variance_rescaled"] = int(sum(s.get("variance_rescale", 1.0) != 1.0 for _, s in summaries))
    out["registration_sigma_px"] = _stats([s.get("registration_sigma_px") for _, s in summaries])
    out["kernel_stamps_used"] = _stats([s.get("n_stamps_used") for _, s in summaries])
    objects = truth.objects
    movers = objects[objects.kind.isin(["variable", "transient"])]
    # truth variables/transients that fall on a differenced detector
    diffed = {(d.get("visit"), d.get("detector")) for d, _ in summaries}
    ex = truth.exposures
    on = ex[[(v, d) in diffed for v, d in zip(ex.visit, ex.detector)]]
    movers = movers[movers.object_id.isin(on.object_id)]
    tables = [o for _, o in _get_all(repo, "dia_object", run) if o is not None and len(o)]
    dia_obj = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    srcs = [s for _, s in _get_all(repo, "dia_source", run) if s is not None]
    n_src = int(sum(len(s) for s in srcs))
    out["n_dia_sources"] = n_src
    out["n_dia_objects"] = int(len(dia_obj))
    per_kind = {}
    if len(dia_obj):
        idx, _ = _sky_match(dia_obj.ra, dia_obj.dec, movers.ra, movers.dec, radius_arcsec)
        matched_truth = set(movers.object_id.to_numpy()[idx[idx >= 0]].tolist())
        false = dia_obj[idx < 0]
    else:
        matched_truth, false = set(), dia_obj
    for kind in ("variable", "transient"):
        ids = movers.object_id[movers.kind == kind]
        per_kind[kind] = {"truth": int(len(ids)), "recovered": int(sum(i in matched_truth for i in ids))}
    out["recovered"] = per_kind
    out["n_false_objects"] = int(len(false))
    out["false_objects_per_detector_visit"] = float(len(false)) / max(len(summaries), 1)
    if len(false):
        # what the false objects sit on: a static star or galaxy (bad subtraction) or nothing
        stat = objects[~objects.kind.isin(["variable", "transient"])]
        j, sep = _sky_match(false.ra, false.dec, stat.ra, stat.dec, radius_arcsec)
        kinds = stat.kind.to_numpy()[j[j >= 0]]
        out["false_on"] = {
            "star": int((kinds == "star").sum()),
            "galaxy": int((kinds == "galaxy").sum()),
            "nothing": int((j < 0).sum()),
        }
        out["false_examples"] = [{"ra": float(r.ra), "dec": float(r.dec)} for r in false.head(5).itertuples()]
    return out


def _isolated(ra, dec, all_ra, all_dec, radius_arcsec: float) -> np.ndarray:
    """True where no other point of (all_ra, all_dec) lies within ``radius_arcsec``."""
    from scipy.spatial import cKDTree

    def xyz(r, d):
        r, d = np.radians(np.asarray(r, float)), np.radians(np.asarray(d, float))
        return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])

    if len(ra) == 0:
        return np.zeros(0, bool)
    chord = 2 * math.sin(math.radians(radius_arcsec / 3600.0) / 2)
    counts = cKDTree(xyz(all_ra, all_dec)).query_ball_point(xyz(ra, dec), chord, return_length=True)
    return np.asarray(counts) <= 1


def _objects(repo, run: str, truth, coadd_depth: dict, radius_arcsec: float = 0.5) -> dict:
    """The object table and forced sources against truth (issue 21's figures)."""
    tables = [t for _, t in _get_all(repo, "object", run) if t is not None and len(t)]
    if not tables:
        return {}
    obj = pd.concat(tables, ignore_index=True)
    sky = obj[obj["sky_object"].to_numpy(bool)] if "sky_object" in obj else obj.iloc[:0]
    prim = obj[obj["is_primary"].to_numpy(bool)]
    bands = sorted(b for b in coadd_depth if f"{b}_psf_flux" in obj)
    out: dict[str, Any] = {"n_objects": int(len(prim)), "n_sky_objects": int(len(sky)), "bands": bands}
    objects = truth.objects
    static = objects[objects.kind.isin(["star", "galaxy", "variable"])].reset_index(drop=True)
    # Truth S/N on the coadd: flux over the 5-sigma depth's sigma, combined over bands.
    snr2 = np.zeros(len(static))
    for b in bands:
        sigma = 10 ** (-0.4 * (coadd_depth[b]["m5"] - _AB_NJY)) / 5.0
        f = static[f"flux_{b}"].to_numpy(float) if f"flux_{b}" in static else np.zeros(len(static))
        snr2 += np.clip(f / sigma, 0, None) ** 2
    static["snr"] = np.sqrt(snr2)
    # Only truth inside the primary objects' footprint on the sky (the coadded area).
    if len(prim):
        ra0, ra1 = np.percentile(prim.ra, [0.5, 99.5])
        de0, de1 = np.percentile(prim.dec, [0.5, 99.5])
        inside = static.ra.between(ra0, ra1) & static.dec.between(de0, de1)
    else:
        inside = np.zeros(len(static), bool)
    t_in = static[inside].reset_index(drop=True)
    idx, _ = _sky_match(t_in.ra, t_in.dec, prim.ra, prim.dec, radius_arcsec)
    bright = t_in.snr.to_numpy() >= 10
    out["completeness_snr10"] = float((idx[bright] >= 0).mean()) if bright.any() else float("nan")
    out["n_truth_snr10"] = int(bright.sum())
    j, _ = _sky_match(prim.ra, prim.dec, static.ra, static.dec, 1.0)
    out["spurious_fraction"] = float((j < 0).mean()) if len(prim) else float("nan")
    # Isolated bright stars: PSF-flux bias per band and g-r colour scatter.
    stars = t_in[(t_in.kind == "star").to_numpy() & (idx >= 0) & (t_in.snr.to_numpy() >= 50)]
    iso = _isolated(stars.ra, stars.dec, static.ra, static.dec, 3.0)
    stars = stars[iso]
    ms = prim.iloc[idx[(t_in.kind == "star").to_numpy() & (idx >= 0) & (t_in.snr.to_numpy() >= 50)][iso]]
    bias = {}
    for b in bands:
        r = ms[f"{b}_psf_flux"].to_numpy(float) / stars[f"flux_{b}"].to_numpy(float) - 1
        bias[b] = _stats(r * 100)
    out["star_psf_flux_bias_percent"] = bias
    if {"g", "r"} <= set(bands) and len(ms):
        with np.errstate(invalid="ignore", divide="ignore"):
            gr = -2.5 * np.log10(ms["g_psf_flux"].to_numpy(float) / ms["r_psf_flux"].to_numpy(float))
            gr_t = -2.5 * np.log10(stars["flux_g"].to_numpy(float) / stars["flux_r"].to_numpy(float))
        d_all = (gr - gr_t) * 1000
        snr_min = np.minimum(
            (ms["g_psf_flux"] / ms["g_psf_flux_err"]).to_numpy(float),
            (ms["r_psf_flux"] / ms["r_psf_flux_err"]).to_numpy(float),
        )
        for key, sel in (
            ("star_gr_minus_truth_mmag", snr_min > 50),
            ("star_gr_minus_truth_mmag_snr500", snr_min > 500),
        ):
            d = d_all[sel & np.isfinite(d_all)]
            if d.size:
                out[key] = {
                    "n": int(d.size),
                    "median": float(np.median(d)),
                    "rms": float(np.sqrt(np.mean((d - np.median(d)) ** 2))),
                }
    # Extendedness above S/N 50.
    col = "ref_extendedness"
    if col in prim:
        sel = (idx >= 0) & (t_in.snr.to_numpy() >= 50) & t_in.kind.isin(["star", "galaxy"]).to_numpy()
        ext = prim[col].to_numpy(float)[idx[sel]]
        is_gal = (t_in.kind.to_numpy()[sel] == "galaxy").astype(float)
        ok = np.isfinite(ext)
        out["extendedness_correct"] = float((ext[ok] == is_gal[ok]).mean()) if ok.any() else float("nan")
        out["extendedness_n"] = int(ok.sum())
    # Sky objects: forced flux / error should scatter as N(0, 1).
    pulls = {}
    for b in bands:
        if len(sky) and f"{b}_psf_flux" in sky:
            p = (sky[f"{b}_psf_flux"] / sky[f"{b}_psf_flux_err"]).to_numpy(float)
            p = p[np.isfinite(p)]
            if p.size > 5:
                pulls[b] = {"n": int(p.size), "std": float(np.std(p)), "mean": float(np.mean(p))}
    out["sky_object_pulls"] = pulls
    out.update(_forced_sources(repo, run, truth, prim, radius_arcsec))
    return out


def _forced_sources(repo, run: str, truth, prim, radius_arcsec: float) -> dict:
    tables = [t for _, t in _get_all(repo, "forced_source", run) if t is not None and len(t)]
    if not tables:
        return {}
    fs = pd.concat(tables, ignore_index=True)
    out: dict[str, Any] = {"n_forced_sources": int(len(fs))}
    objects = truth.objects
    j, _ = _sky_match(prim.ra, prim.dec, objects.ra, objects.dec, radius_arcsec)
    oid_to_truth = dict(zip(prim.object_id.to_numpy()[j >= 0], j[j >= 0]))
    fs = fs[
        fs.object_id.isin(oid_to_truth)
        & ~fs.flag_psf_flux.to_numpy(bool)
        & ~fs.flag_edge.to_numpy(bool)
        & (fs.masked_fraction.to_numpy(float) < 0.02)  # saturated cores, bad columns
    ]
    if fs.empty:
        return out
    t_idx = fs.object_id.map(oid_to_truth).to_numpy()
    kind = objects.kind.to_numpy()[t_idx]
    # Constant stars of S/N > 20 per epoch: chi^2/dof of each light curve about its mean.
    chis = []
    for _key, g in fs[(kind == "star")].groupby(["object_id", "band"]):
        ff, ee = g.psf_flux.to_numpy(float), g.psf_flux_err.to_numpy(float)
        if len(ff) < 3 or np.median(ff / ee) < 20:
            continue
        w = 1 / ee**2
        m = np.sum(w * ff) / np.sum(w)
        chis.append(float(np.sum(w * (ff - m) ** 2) / (len(ff) - 1)))
    if chis:
        out["constant_star_chi2_dof"] = {"n": len(chis), "median": float(np.median(chis)), "mean": float(np.mean(chis))}
    # Variables: amplitude from a linear fit of F (1 + A sin(2 pi (t - t0) / P)) with the true period and phase.
    amps = []
    for oid, g in fs[(kind == "variable")].groupby("object_id"):
        t = objects.iloc[oid_to_truth[oid]]
        for band, gb in g.groupby("band"):
            if len(gb) < 4:
                continue
            s_ = np.sin(2 * np.pi * (gb.mjd.to_numpy(float) - t.t0) / t.period)
            a = np.column_stack([np.ones(len(gb)), s_])
            w = 1 / gb.psf_flux_err.to_numpy(float)
            coef, *_ = np.linalg.lstsq(a * w[:, None], gb.psf_flux.to_numpy(float) * w, rcond=None)
            if coef[0] > 0:
                amps.append(
                    {
                        "object_id": int(oid),
                        "band": band,
                        "amplitude": float(coef[1] / coef[0]),
                        "truth": float(t.amplitude),
                    }
                )
    if amps:
        rel = np.array([a["amplitude"] / a["truth"] - 1 for a in amps])
        out["variable_amplitude_rel_error"] = {
            "n": len(amps),
            "median": float(np.median(rel)),
            "max_abs": float(np.max(np.abs(rel))),
        }
    return out


def evaluate_run(repo, run: str, sim_dir, *, match_radius_arcsec: float = 1.0) -> dict:
    """Figures of ``run`` against the truth of the simulation in ``sim_dir``.

    Parameters
    ----------
    repo : procsky.repo.Repo or path
    run : str
        Output run of ``procsky run``.
    sim_dir : path
        The ``procsky sim --out`` directory whose images the run processed.
    match_radius_arcsec : float, arcsec
        Radius for matching DIA objects to truth variables and transients.

    Returns
    -------
    dict
        ``{"single_frame": ..., "coadd": {band: ...}, "dia": ...}`` (see the module docstring).
    """
    from procsky.pipeline.run import open_repo
    from procsky.sim.truth import SimTruth

    repo = open_repo(repo)
    truth = SimTruth(Path(sim_dir))
    coadd = _coadd_depth(repo, run)
    return {
        "run": run,
        "single_frame": _single_frame(repo, run, truth),
        "coadd": coadd,
        "dia": _dia(repo, run, truth, match_radius_arcsec),
        "objects": _objects(repo, run, truth, coadd),
    }


def _r(s: dict | None, key: str = "median", fmt: str = "{:.2f}") -> str:
    return "n/a" if not s else fmt.format(s[key])


def _span(s: dict | None, fmt: str = "{:.2f}") -> str:
    if not s:
        return "n/a"
    return f"{fmt.format(s['median'])} (range {fmt.format(s['min'])}-{fmt.format(s['max'])})"


def format_evaluation(ev: dict) -> str:
    """A short text block of :func:`evaluate_run`'s figures."""
    sf, co, dia = ev.get("single_frame", {}), ev.get("coadd", {}), ev.get("dia", {})
    lines = [f"run {ev.get('run')!r} against the simulation's truth:"]
    lines.append(f"  single frame ({sf.get('n_detector_visits', 0)} detector-visits)")
    lines.append(f"    sources per detector     {_span(sf.get('sources_per_detector'), '{:.0f}')}")
    lines.append(
        f"    PSF FWHM                 {_span(sf.get('psf_fwhm_arcsec'))} arcsec, "
        f"{_r(sf.get('psf_stars_per_detector'), fmt='{:.0f}')} PSF stars per detector"
    )
    z = sf.get("zero_point_minus_truth_mmag")
    if z:
        lines.append(f"    zero point - truth       median {z['median']:+.1f} mmag, rms {z['rms']:.1f} mmag")
    zs = sf.get("detector_zero_point_scatter_mmag")
    if zs:
        lines.append(
            f"    zero-point scatter       {zs['rms']:.1f} mmag rms of detector zero points about their visit's"
        )
    a = sf.get("bright_star_offset_mas")
    if a:
        lines.append(
            f"    astrometry vs truth      {a['rms_per_axis']:.1f} mas rms per axis over {a['n']} stars of S/N > 50 "
            f"(median offset {a['median_ra']:+.1f}, {a['median_dec']:+.1f} mas)"
        )
    p = sf.get("bright_star_psf_mag_minus_truth_mmag")
    if p:
        lines.append(
            f"    PSF flux vs truth        median {p['median']:+.1f} mmag, rms {p['rms']:.1f} mmag (same stars)"
        )
    if co:
        lines.append("  coadds")
        for band, c in sorted(co.items()):
            n_in = f"{c['n_inputs']} visits" if c.get("n_inputs") is not None else "its inputs"
            lines.append(
                f"    {band}: 5-sigma point-source depth {c['m5']:.2f} AB from {n_in} "
                f"({100 * c['area_fraction']:.0f} % of the patch has data)"
            )
    if dia.get("n_differences"):
        lines.append(f"  difference imaging ({dia['n_differences']} detector-visits)")
        n_sh = dia.get("n_science_in_template", 0)
        if n_sh and dia.get("residual_std_sigma_shared"):
            n_ind = dia["n_differences"] - n_sh
            lines.append(
                f"    noise / variance plane   {_span(dia.get('residual_std_sigma_independent'))} on {n_ind} "
                f"with the science visit not in the template; {_span(dia.get('residual_std_sigma_shared'))} "
                f"on {n_sh} whose template coadds it (shared noise)"
            )
            lines.append(
                f"    variance plane rescaled  on {dia.get('n_variance_rescaled', 0)} of {dia['n_differences']}; "
                f"kernel stamps {_r(dia.get('kernel_stamps_used'), fmt='{:.0f}')} per detector"
            )
        else:
            lines.append(
                f"    noise / variance plane   {_span(dia.get('residual_std_sigma'))} (rescaled on "
                f"{dia.get('n_variance_rescaled', 0)} of {dia['n_differences']}); "
                f"kernel stamps {_r(dia.get('kernel_stamps_used'), fmt='{:.0f}')} per detector"
            )
        if dia.get("registration_sigma_px"):
            lines.append(
                f"    registration noise       {_span(dia.get('registration_sigma_px'), '{:.3f}')} px per axis "
                "at bright stars (in the detection score)"
            )
        rec = dia.get("recovered", {})
        parts = [f"{k}s {v['recovered']}/{v['truth']}" for k, v in rec.items()]
        lines.append(f"    recovered                {', '.join(parts)} (truth objects on the differenced detectors)")
        lines.append(
            f"    DIA objects              {dia['n_dia_objects']} from {dia['n_dia_sources']} DIA sources; "
            f"{dia['n_false_objects']} with no truth counterpart "
            f"({dia['false_objects_per_detector_visit']:.2f} per detector-visit)"
        )
        if dia.get("false_on"):
            f = dia["false_on"]
            lines.append(
                f"    false objects lie on     {f['star']} static stars, {f['galaxy']} galaxies, "
                f"{f['nothing']} empty sky"
            )
    ob = ev.get("objects") or {}
    if ob:
        lines.append(f"  objects ({ob['n_objects']} primary, {ob['n_sky_objects']} sky objects)")
        lines.append(
            f"    completeness             {100 * ob.get('completeness_snr10', float('nan')):.1f} % of "
            f"{ob.get('n_truth_snr10', 0)} truth objects with coadd S/N >= 10; "
            f"{100 * ob.get('spurious_fraction', float('nan')):.2f} % of objects have no truth counterpart"
        )
        bias = ob.get("star_psf_flux_bias_percent") or {}
        parts = [f"{b} {v['median']:+.2f} %" for b, v in sorted(bias.items()) if v]
        if parts:
            n = max(v["n"] for v in bias.values() if v)
            lines.append(f"    star PSF flux - truth    {', '.join(parts)} (median of {n} isolated stars, S/N > 50)")
        c = ob.get("star_gr_minus_truth_mmag")
        if c:
            c5 = ob.get("star_gr_minus_truth_mmag_snr500")
            bright = f"; S/N > 500 in both: rms {c5['rms']:.1f} mmag ({c5['n']} stars)" if c5 else ""
            lines.append(
                f"    star g-r - truth         rms {c['rms']:.1f} mmag, median {c['median']:+.1f} mmag "
                f"({c['n']} stars of S/N > 50){bright}"
            )
        if "extendedness_correct" in ob:
            lines.append(
                f"    extendedness             {100 * ob['extendedness_correct']:.1f} % of {ob['extendedness_n']} "
                "stars and galaxies of S/N > 50 classified right"
            )
        pulls = ob.get("sky_object_pulls") or {}
        if pulls:
            lines.append(
                "    sky-object pull std      "
                + ", ".join(f"{b} {v['std']:.3f}" for b, v in sorted(pulls.items()))
                + " (1 when the errors are right)"
            )
        ch = ob.get("constant_star_chi2_dof")
        if ch:
            lines.append(
                f"    forced light curves      chi^2/dof of {ch['n']} constant stars: median {ch['median']:.2f}"
            )
        va = ob.get("variable_amplitude_rel_error")
        if va:
            lines.append(
                f"    variable amplitudes      median error {100 * va['median']:+.1f} %, worst "
                f"{100 * va['max_abs']:.1f} % ({va['n']} light curves)"
            )
    return "\n".join(lines)
