"""How close a pipeline run came to the truth of the simulation it processed.

:func:`evaluate_run` reads a run's outputs from a repository (``calibrate_summary``,
``src``, ``visit_photocalib``, ``coadd``, ``diffim_summary``, ``dia_source``,
``dia_object``) and the truth tables of the ``procsky sim`` output that was ingested,
and returns the figures a survey scientist checks first, as a plain dict:

* single frame: sources per detector, PSF FWHM, zero points against the true ones (offset
  and scatter), astrometric residuals of bright stars against their true positions, PSF
  fluxes of bright stars against their true fluxes;
* coadds: 5-sigma point-source depth and number of inputs per band;
* difference imaging: truth variables and transients recovered as DIA objects, DIA objects
  with no truth counterpart (per detector-visit), the template PSF-matching residuals.

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
    return {
        "run": run,
        "single_frame": _single_frame(repo, run, truth),
        "coadd": _coadd_depth(repo, run),
        "dia": _dia(repo, run, truth, match_radius_arcsec),
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
    return "\n".join(lines)
