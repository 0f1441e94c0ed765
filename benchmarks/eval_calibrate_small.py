"""Per-detector accuracy of ``calibrate`` against the simulator's truth (issue 5 criteria).

Run:  .venv/bin/python benchmarks/eval_calibrate_small.py SIMDIR [--visit 2 | --visit 1,2,5 | --visit all]
                                                         [--detectors 0,1,...] [--workers 2]

``SIMDIR`` is a ``procsky.sim`` folder (calibrated mode, e.g. the ``small`` recipe). Every
detector of each visit is calibrated against the simulated reference catalogue and compared
with the truth by the same function the slow tests use (``tests/test_calibrate.py::_metrics``),
and judged as ``test_calibrate_small_visit_*`` judge it. With several visits, ``--workers``
visits run in parallel processes and a table of one line per visit ends the output.

Criteria, per detector:

* astrometry on bright isolated stars of truth S/N >= 100 (at least 3): median offset
  <= 5 mas, scatter <= 10 mas. For the record: ``astro_sc50_mas`` is the scatter of all
  S/N > 50 stars (at S/N 50 the centroid's photon noise alone is 10-18 mas per axis,
  ``benchmarks/centroid_noise_floor.py``) and ``astro_xs50_mas`` their scatter in excess of
  the reported errors;
* PSF model FWHM within 1 % of truth;
* completeness >= 95 % (truth S/N >= 10); spurious detections < 2 %;
* cosmic-ray pixels (> 5 sigma) recovered >= 95 %, no star core flagged CR.

and per visit (pooled over its detectors, ~10-30 stars or ~250 detections per detector):

* zero point within 3 mmag of truth, judged on the final, visit-level zero point
  (``visit_photometry``, :mod:`procsky.tasks.photometry`; column ``dzp_mmag``); calibrate's
  per-detector zero point is printed as ``dzp_det_mmag`` for the record. ``--estimator
  weighted_mean`` tries the weighted estimator;
* PSF fluxes of bright isolated stars (S/N 50-500): |median bias| < 0.5 %, pull std 0.9-1.1
  (``psf_sys_%`` is the detector's cross-validated PSF-model flux error included in
  ``psf_flux_err``);
* positions of the same stars: pull std (offset / reported error) 0.85-1.2;
* held-back PSF stars' median dT/T below 1 %;
* spurious detections < 1 % of the visit's catalogue.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _load_metrics():
    spec = importlib.util.spec_from_file_location("_test_calibrate", ROOT / "tests" / "test_calibrate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._metrics


def evaluate(simdir: Path, visit: int, detectors=None, estimator: str = "median") -> pd.DataFrame:
    """Calibrate each detector of ``visit`` and return one row of metrics per detector.

    ``df.attrs["pooled"]`` holds the PSF-flux pulls (S/N 50-500), flux ratios and held-back
    stars' dT/T of all detectors together.
    """
    from procsky.calibrate import calibrate_exposure
    from procsky.exposure import Exposure
    from procsky.refcat import read_refcat_file
    from procsky.sim.render import image_filename
    from procsky.tasks.photometry import VisitPhotometryConfig, visit_photometric_calibration

    metrics = _load_metrics()
    refcat = read_refcat_file(simdir / "refcat/refcat.parquet")
    if detectors is None:
        dets = pd.read_parquet(simdir / "truth/detectors.parquet")
        detectors = sorted(dets.loc[dets.visit == visit, "detector"].unique())
    rows = []
    pulls, ratios, dts, apulls, astars, srcs, summaries, truth = [], [], [], [], [], [], [], []
    for det in detectors:
        t0 = time.process_time()
        exp = Exposure.read(simdir / "images" / image_filename("calexp", visit, int(det)))
        calexp, src, summary = calibrate_exposure(exp, refcat)
        cpu = time.process_time() - t0
        m = metrics(simdir, visit, int(det), calexp, src)
        pulls.append(m["pulls_snr50_500"])
        ratios.append(m["flux_ratios"])
        dts.append(np.asarray(calexp.metadata["calibrate"]["psf"].get("reserved_dT", []), float))
        apulls.append(m["astro_pulls_snr50_500"])
        astars.append(m["astro_stars"])
        srcs.append(src)
        summaries.append(summary)
        truth.append(m["true_magzero"])
        rows.append(
            {
                "det": int(det),
                "n_src": m["n_src"],
                "dzp_det_mmag": 1000 * (summary["zero_point"] - m["true_magzero"]),
                "fwhm_%": 100 * (summary["psf_fwhm_px"] / m["true_gauss_fwhm_px"] - 1),
                "dT_%": 100 * summary["psf_reserved_dT_median"],
                "psf_sys_%": 100 * summary.get("psf_flux_sys", np.nan),
                "a2t_%": 100 * (summary.get("aperture_to_total", np.nan) - 1),
                "psf_bias_%": 100 * m["psf_flux_bias"],
                "pull_std": m["pull_std_snr50_500"],
                "n_bright": m["n_bright"],
                "astro_med_mas": m["astro_median_mas"],
                "astro_sc_mas": m["astro_scatter_mas"],
                "n_astro": m["n_astro"],
                "astro_sc50_mas": m["astro_scatter_snr50_mas"],
                "astro_xs50_mas": m["astro_excess_snr50_mas"],
                "compl_%": 100 * m["completeness_all"],
                "compl_star_%": 100 * m["completeness_stars"],
                "spur_%": 100 * m["spurious_fraction"],
                "n_spur": m["n_spurious"],
                "cr_%": 100 * m["cr_recovered"],
                "cr_cores": m["star_cores_flagged_cr"],
                "cpu_s": cpu,
            }
        )
    df = pd.DataFrame(rows)
    rec = visit_photometric_calibration(
        srcs, [int(d) for d in detectors], summaries, VisitPhotometryConfig(estimator=estimator), visit=visit
    )
    final = [rec["detectors"][str(int(d))]["zero_point"] for d in detectors]
    df.insert(2, "dzp_mmag", 1000 * (np.asarray(final) - np.asarray(truth)))
    df.insert(3, "offset_mmag", [1000 * rec["detectors"][str(int(d))]["offset"] for d in detectors])
    df.attrs["visit_photocalib"] = rec
    df.attrs["pooled"] = {
        "pulls": np.concatenate(pulls),
        "ratios": np.concatenate(ratios),
        "dT": np.concatenate(dts),
        "astro_pulls": np.concatenate(apulls),
        "astro_stars": pd.concat(astars, ignore_index=True),
    }
    df.attrs["visit"] = visit
    return df


def passes(t: pd.DataFrame) -> pd.Series:
    """Pass flags of one visit's table, judged as the slow tests judge them."""
    p = t.attrs["pooled"]
    return pd.Series(
        {
            "zero point |dzp| <= 3 mmag (visit-level)": bool((t["dzp_mmag"].abs() <= 3).all()),
            "PSF FWHM within 1% (per detector)": bool((t["fwhm_%"].abs() <= 1).all()),
            "held-back |median dT/T| < 1% (visit)": bool(p["dT"].size > 0 and abs(np.median(p["dT"])) < 0.01),
            "PSF flux |bias| < 0.5% (visit)": bool(abs(np.median(p["ratios"] - 1)) < 0.005),
            "PSF flux pull std 0.9-1.1 (visit)": bool(0.9 <= np.std(p["pulls"]) <= 1.1),
            "astrometry >= 3 stars of S/N >= 100 (per detector)": bool((t["n_astro"] >= 3).all()),
            "astrometry median <= 5 mas (per detector)": bool((t["astro_med_mas"] <= 5).all()),
            "astrometry scatter <= 10 mas (per detector)": bool((t["astro_sc_mas"] <= 10).all()),
            "position pull std 0.85-1.2 (visit)": bool(0.85 <= np.std(p["astro_pulls"]) <= 1.2),
            "completeness >= 95% (S/N >= 10, per detector)": bool((t["compl_%"] >= 95).all()),
            "spurious < 1% (visit)": bool(t["n_spur"].sum() < 0.01 * t["n_src"].sum()),
            "spurious < 2% (per detector)": bool((t["spur_%"] < 2).all()),
            "CR recovered >= 95% (per detector)": bool((t["cr_%"] >= 95).all()),
            "no star core flagged CR": bool((t["cr_cores"] == 0).all()),
        }
    )


def visit_line(t: pd.DataFrame) -> dict:
    """One line of the cross-visit table: the worst detector of each per-detector criterion, the
    pooled value of each visit-level one."""
    p = t.attrs["pooled"]
    return {
        "visit": t.attrs["visit"],
        "ndet": len(t),
        "dzp_mmag": float(t["dzp_mmag"].abs().max()),
        "fwhm_worst_%": float(t["fwhm_%"].abs().max(skipna=False)),
        "dT_med_%": 100 * float(np.median(p["dT"])) if p["dT"].size else np.nan,
        "bias_%": 100 * float(np.median(p["ratios"] - 1)),
        "pull_std": float(np.std(p["pulls"])),
        "n_astro_min": int(t["n_astro"].min()),
        "astro_med_max": float(t["astro_med_mas"].max(skipna=False)),
        "astro_sc_max": float(t["astro_sc_mas"].max(skipna=False)),
        "astro_sc50_max": float(t["astro_sc50_mas"].max()),
        "astro_xs50_max": float(t["astro_xs50_mas"].max()),
        "pos_pull_std": float(np.std(p["astro_pulls"])),
        "compl_min_%": float(t["compl_%"].min()),
        "spur_visit_%": 100 * float(t["n_spur"].sum() / t["n_src"].sum()),
        "spur_worst_%": float(t["spur_%"].max()),
        "cr_min_%": float(t["cr_%"].min()),
        "cr_cores": int(t["cr_cores"].sum()),
        "cpu_s": float(t["cpu_s"].sum()),
        "all_pass": bool(passes(t).all()),
    }


def astrometry_by_snr(stars: pd.DataFrame) -> pd.DataFrame:
    """Bright isolated stars binned in truth S/N: rms per axis of the offset on the sky
    (centroid and fitted WCS), of the centroid alone (truth position through the true WCS),
    of the reported centroid errors, and the pull std of each. The sky and centroid rms agree and
    match the centroid errors while the centroid noise dominates; where it does not (S/N > 500)
    the difference is the fitted WCS's own error, which ``src.ra_err``/``dec_err`` include
    (last two columns)."""
    rows = []
    for lo, hi in ((50, 100), (100, 200), (200, 500), (500, 1000), (1000, np.inf)):
        b = stars[(stars.snr >= lo) & (stars.snr < hi)]
        if len(b) < 2:
            continue
        sky = np.r_[b.dra_mas, b.ddec_mas]
        cen = np.r_[b.dx_mas, b.dy_mas]
        err = np.r_[b.err_mas, b.err_mas]
        sky_err = np.r_[b.ra_err_mas, b.dec_err_mas]
        rows.append(
            {
                "snr": f"{lo}-{hi}",
                "n": len(b),
                "sky_rms_mas": float(np.sqrt(np.mean(sky**2))),
                "centroid_rms_mas": float(np.sqrt(np.mean(cen**2))),
                "err_rms_mas": float(np.sqrt(np.mean(err**2))),
                "sky_pull_std": float(np.std(sky / err)),
                "centroid_pull_std": float(np.std(cen / err)),
                "radec_err_rms_mas": float(np.sqrt(np.mean(sky_err**2))),
                "sky_pull_std_radec_err": float(np.std(sky / sky_err)),
            }
        )
    return pd.DataFrame(rows)


def report(t: pd.DataFrame, simdir: Path) -> None:
    """Print one visit's table, its pass flags and pooled figures."""
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 50)
    print(f"calibrate vs truth: {simdir} visit {t.attrs['visit']}")
    print(t.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print()
    rec = t.attrs["visit_photocalib"]
    print(
        f"visit zero point ({rec['estimator']}): {rec['zero_point']:.4f} +- {1000 * rec['zero_point_err']:.2f} mmag "
        f"from {rec['n_stars']} of {rec['n_candidates']} stars on {rec['n_detectors']} detectors; rms of calibrate's "
        f"per-detector dzp {np.sqrt(np.mean(t['dzp_det_mmag'] ** 2)):.2f} mmag; "
        "aperture-to-total factor of the visit "
        f"{rec.get('aperture_to_total', 1.0):.4f} +- {rec.get('aperture_to_total_err', float('nan')):.4f}"
    )
    print()
    print(passes(t).to_string())
    p = t.attrs["pooled"]
    print()
    print(
        f"pooled over {len(t)} detectors: PSF-flux pull std (S/N 50-500) {np.std(p['pulls']):.3f} over "
        f"{p['pulls'].size} stars "
        f"(1.4826 MAD: {1.4826 * np.median(np.abs(p['pulls'] - np.median(p['pulls']))):.3f}); "
        f"median PSF-flux bias {100 * np.median(p['ratios'] - 1):+.3f}% over {p['ratios'].size} stars; "
        f"held-back median dT/T {100 * np.median(p['dT']):+.2f}% over {p['dT'].size} stars; "
        f"position pull std {np.std(p['astro_pulls']):.3f} over {p['astro_pulls'].size // 2} stars"
    )
    print(
        f"spurious: {int(t['n_spur'].sum())} of {int(t['n_src'].sum())} detections "
        f"({100 * t['n_spur'].sum() / t['n_src'].sum():.2f}%); CPU {t['cpu_s'].sum():.1f} s"
    )
    print(flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("simdir", type=Path)
    ap.add_argument("--visit", type=str, default="2", help="a visit, comma-separated visits, or 'all'")
    ap.add_argument("--detectors", type=str, default=None, help="comma-separated (default: all)")
    ap.add_argument(
        "--estimator", default="median", choices=["median", "weighted_mean"], help="visit-level zero point estimator"
    )
    ap.add_argument("--workers", type=int, default=1, help="visits evaluated in parallel processes")
    args = ap.parse_args()
    dets = [int(v) for v in args.detectors.split(",")] if args.detectors else None
    if args.visit == "all":
        visits = sorted(int(v) for v in pd.read_parquet(args.simdir / "truth/detectors.parquet").visit.unique())
    else:
        visits = [int(v) for v in args.visit.split(",")]
    n = len(visits)
    jobs = ([args.simdir] * n, visits, [dets] * n, [args.estimator] * n)
    pool = None
    if args.workers > 1 and n > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.workers)
    tables = []
    for t in (pool.map if pool else map)(evaluate, *jobs):  # in visit order, each printed when done
        report(t, args.simdir)
        tables.append(t)
    if pool:
        pool.shutdown()
    if len(tables) > 1:
        lines = pd.DataFrame([visit_line(t) for t in tables])
        print(f"one line per visit ({len(tables)} visits, {int(lines['ndet'].sum())} detectors):")
        print(lines.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"all criteria pass in {int(lines['all_pass'].sum())} of {len(lines)} visits")
        print()
        print("astrometry of the bright isolated stars of all visits by truth S/N (per axis):")
        stars = pd.concat([t.attrs["pooled"]["astro_stars"] for t in tables], ignore_index=True)
        print(astrometry_by_snr(stars).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
