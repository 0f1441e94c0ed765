"""Per-detector accuracy of ``calibrate`` against the simulator's truth (issue 5 criteria).

Run:  .venv/bin/python benchmarks/eval_calibrate_small.py SIMDIR [--visit 2] [--detectors 0,1,...]

``SIMDIR`` is a ``procsky.sim`` folder (calibrated mode, e.g. the ``small`` recipe). Every
detector of the visit is calibrated against the simulated reference catalogue and compared
with the truth by the same function the slow test uses (``tests/test_calibrate.py::_metrics``),
so the table is exactly what ``test_calibrate_small_all_detectors`` asserts. Criteria:

* astrometry: median offset of bright isolated stars <= 5 mas, scatter <= 10 mas;
* zero point within 3 mmag of truth: judged on the final, visit-level zero point
  (``visit_photometry``, :mod:`procsky.tasks.photometry`: one zero point from the reference
  stars of all detectors of the visit; column ``dzp_mmag``); calibrate's per-detector zero
  point is printed as ``dzp_det_mmag`` for the record. ``--estimator weighted_mean`` tries
  the weighted estimator;
* PSF fluxes of bright isolated stars: |median bias| < 0.5 %, pull std 0.9-1.1 (S/N 50-500;
  judged pooled over the visit by the test; ``psf_sys_%`` is the detector's cross-validated
  PSF-model flux error included in ``psf_flux_err``);
* PSF model FWHM within 1 % of truth, held-back stars' median dT/T below 1 %;
* completeness >= 95 % (truth S/N >= 10), spurious detections < 1 %;
* cosmic-ray pixels (> 5 sigma) recovered >= 95 %, no star core flagged CR.
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
    from procsky.exposure import Exposure
    from procsky.refcat import read_refcat_file
    from procsky.sim.render import image_filename
    from procsky.tasks.calibrate import calibrate_exposure
    from procsky.tasks.photometry import VisitPhotometryConfig, visit_photometric_calibration

    metrics = _load_metrics()
    refcat = read_refcat_file(simdir / "refcat/refcat.parquet")
    if detectors is None:
        dets = pd.read_parquet(simdir / "truth/detectors.parquet")
        detectors = sorted(dets.loc[dets.visit == visit, "detector"].unique())
    rows = []
    pulls, ratios, dts, srcs, summaries, truth = [], [], [], [], [], []
    for det in detectors:
        t0 = time.process_time()
        exp = Exposure.read(simdir / "images" / image_filename("calexp", visit, int(det)))
        calexp, src, summary = calibrate_exposure(exp, refcat)
        cpu = time.process_time() - t0
        m = metrics(simdir, visit, int(det), calexp, src)
        pulls.append(m["pulls_snr50_500"])
        ratios.append(m["flux_ratios"])
        dts.append(np.asarray(calexp.metadata["calibrate"]["psf"].get("reserved_dT", []), float))
        srcs.append(src)
        summaries.append(summary)
        truth.append(m["true_magzero"])
        rows.append({
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
            "compl_%": 100 * m["completeness_all"],
            "compl_star_%": 100 * m["completeness_stars"],
            "spur_%": 100 * m["spurious_fraction"],
            "n_spur": m["n_spurious"],
            "cr_%": 100 * m["cr_recovered"],
            "cr_cores": m["star_cores_flagged_cr"],
            "cpu_s": cpu,
        })
    df = pd.DataFrame(rows)
    rec = visit_photometric_calibration(srcs, [int(d) for d in detectors], summaries,
                                        VisitPhotometryConfig(estimator=estimator), visit=visit)
    final = [rec["detectors"][str(int(d))]["zero_point"] for d in detectors]
    df.insert(2, "dzp_mmag", 1000 * (np.asarray(final) - np.asarray(truth)))
    df.insert(3, "offset_mmag", [1000 * rec["detectors"][str(int(d))]["offset"] for d in detectors])
    df.attrs["visit_photocalib"] = rec
    df.attrs["pooled"] = {"pulls": np.concatenate(pulls), "ratios": np.concatenate(ratios), "dT": np.concatenate(dts)}
    return df


def passes(t: pd.DataFrame) -> pd.Series:
    """Per-criterion pass flags over all detectors."""
    return pd.Series({
        "zero point |dzp| <= 3 mmag (visit-level)": bool((t["dzp_mmag"].abs() <= 3).all()),
        "calibrate per-detector |dzp| <= 3 mmag": bool((t["dzp_det_mmag"].abs() <= 3).all()),
        "PSF FWHM within 1%": bool((t["fwhm_%"].abs() <= 1).all()),
        "held-back |dT/T| < 1%": bool((t["dT_%"].abs() < 1).all()),
        "PSF flux |bias| < 0.5%": bool((t["psf_bias_%"].abs() < 0.5).all()),
        "pull std 0.9-1.1": bool(t["pull_std"].between(0.9, 1.1).all()),
        "astrometry median <= 5 mas": bool((t["astro_med_mas"] <= 5).all()),
        "astrometry scatter <= 10 mas": bool((t["astro_sc_mas"] <= 10).all()),
        "completeness >= 95% (S/N >= 10)": bool((t["compl_%"] >= 95).all()),
        "spurious < 1%": bool((t["spur_%"] < 1).all()),
        "CR recovered >= 95%": bool((t["cr_%"] >= 95).all()),
        "no star core flagged CR": bool((t["cr_cores"] == 0).all()),
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("simdir", type=Path)
    ap.add_argument("--visit", type=int, default=2)
    ap.add_argument("--detectors", type=str, default=None, help="comma-separated (default: all)")
    ap.add_argument("--estimator", default="median", choices=["median", "weighted_mean"],
                    help="visit-level zero point estimator")
    args = ap.parse_args()
    dets = [int(v) for v in args.detectors.split(",")] if args.detectors else None
    t = evaluate(args.simdir, args.visit, dets, args.estimator)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 50)
    print(f"calibrate vs truth: {args.simdir} visit {args.visit}")
    print(t.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print()
    rec = t.attrs["visit_photocalib"]
    print(f"visit zero point ({rec['estimator']}): {rec['zero_point']:.4f} +- {1000 * rec['zero_point_err']:.2f} mmag "
          f"from {rec['n_stars']} of {rec['n_candidates']} stars on {rec['n_detectors']} detectors; rms of calibrate's "
          f"per-detector dzp {np.sqrt(np.mean(t['dzp_det_mmag'] ** 2)):.2f} mmag; aperture-to-total factor of the visit "
          f"{rec.get('aperture_to_total', 1.0):.4f} +- {rec.get('aperture_to_total_err', float('nan')):.4f}")
    print()
    print(passes(t).to_string())
    p = t.attrs["pooled"]
    print()
    print(f"pooled over {len(t)} detectors: PSF-flux pull std (S/N 50-500) {np.std(p['pulls']):.3f} over "
          f"{p['pulls'].size} stars (1.4826 MAD: {1.4826 * np.median(np.abs(p['pulls'] - np.median(p['pulls']))):.3f}); "
          f"median PSF-flux bias {100 * np.median(p['ratios'] - 1):+.3f}% over {p['ratios'].size} stars; "
          f"held-back median dT/T {100 * np.median(p['dT']):+.2f}% over {p['dT'].size} stars")
    print(f"pooled (as the test judges): |bias| < 0.5% {abs(np.median(p['ratios'] - 1)) < 0.005}, "
          f"pull std 0.9-1.1 {0.9 <= np.std(p['pulls']) <= 1.1}")
    print(f"spurious: {int(t['n_spur'].sum())} of {int(t['n_src'].sum())} detections "
          f"({100 * t['n_spur'].sum() / t['n_src'].sum():.2f}%); CPU {t['cpu_s'].sum():.1f} s")


if __name__ == "__main__":
    main()
