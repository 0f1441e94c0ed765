"""``python -m procsky.demo`` (``make demo``): the whole mission on a small simulated survey.

On the embedded defaults (SQLite registry, local Zarr, a LocalCluster), in a few minutes on
2 cores:

1. create a fresh repository in ``demo-out/repo``;
2. simulate the ``demo`` recipe (2x2 detectors of 1024x1024 px, g and r, 4 visits each,
   variable stars and transients, with truth tables) and ingest its images and its
   reference catalogue;
3. register the sky map and run every stage of ``drp``: calibrate, visit photometry, warp,
   coadd, template, subtract, DIA association and forced photometry on the differences;
4. print the run summary (with the reasons of every no-work, failed or degraded quantum),
   then the figures a scientist checks first, measured against the simulation's truth
   (:func:`procsky.sim.evaluate.evaluate_run`), and write the HTML report.

The real DECam/90prime/Mosaic-3 cut-outs of ``../shared/data/real`` are not used: at
41x51 to 245x251 px with 1-3 stars each they are too small for a PSF model or an
astrometric fit, so calibrate has nothing to do on them (the tests exercise them).

Exit status 0 only when every quantum succeeded or had no work, the DIA purity is sane
(at most ``--max-false`` DIA objects with no truth counterpart per detector-visit) and at
least half of the truth variables and transients on the differenced detectors were
recovered.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from procsky.errors import ProcskyError

#: The simulated survey the demo draws.
DEMO_RECIPE = "demo"
#: Output run of the demo's drp.
DEMO_RUN = "demo/drp"
#: The sky map the drp warp task is configured with (``procsky/pipelines/drp.yaml``).
SKYMAP = "default"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _timing_text(report: dict) -> str:
    """Per stage: quanta, median wall and CPU seconds per quantum, and their ratio."""
    lines = ["time per quantum (median wall / CPU seconds; a ratio far above 1 means waiting):"]
    for t in report.get("tasks", []):
        wall, cpu = t.get("wall_seconds") or {}, t.get("cpu_seconds") or {}
        if not wall or not cpu:
            continue
        ratio = wall["median"] / cpu["median"] if cpu.get("median") else float("nan")
        lines.append(
            f"  {t['task']:18s} {t['quanta']:4d} quanta  wall {wall['median']:6.2f} s  "
            f"CPU {cpu['median']:6.2f} s  wall/CPU {ratio:4.1f}"
        )
    return "\n".join(lines)


def ingest_survey(repo, sim_dir: Path) -> int:
    """Ingest a simulated survey's images and reference catalogue; returns the image count."""
    from procsky.instruments import ingest_files
    from procsky.refcat import ingest_refcat

    images = sorted((sim_dir / "images").glob("*.fits"))
    refs = ingest_files(repo, images, "simcam", run="simcam/raw", progress=False)
    ingest_refcat(repo, [sim_dir / "refcat" / "refcat.parquet"], name="sim")
    return len(refs)


def register_demo_skymap(repo, recipe) -> tuple[float, float]:
    """Register the demo's sky map on ``recipe``'s field; returns the field centre.

    A discrete sky map (one tract on the field, as for any small field): one 2600 px patch
    holds the whole focal plane and its dithers, where a rings patch of 4200 px would be
    three quarters empty.
    """
    from procsky.skymap import discrete_skymap, register_skymap

    ra, dec = recipe.field.ra, recipe.field.dec
    register_skymap(repo, discrete_skymap([(ra, dec)], radius=0.065, name=SKYMAP, patch_inner=2400), tracts=True)
    return ra, dec


def run_drp(repo, *, workers: int = 2, output: str = DEMO_RUN, progress: bool = True):
    """Every stage of ``drp`` on a LocalCluster of ``workers``; returns (summary, wall seconds).

    The wall time counts the cluster's start as well as the run (what a user waits for).
    """
    from distributed import Client

    from procsky.pipeline import open_cluster, run_pipeline

    t1 = time.time()
    with open_cluster("local", n_workers=workers) as cluster, Client(cluster) as client:
        result = run_pipeline(repo, "drp", where="instrument='simcam'", output=output, client=client, progress=progress)
    return result, time.time() - t1


def run(out: Path, *, workers: int = 2, pipeline: bool = True, max_false: float = 2.0) -> int:
    """Run the demo into ``out`` (replaced); returns the exit status."""
    from procsky.repo import Repo

    try:
        from procsky.sim import simulate
    except ImportError as e:  # GalSim missing
        _say(f"the simulator is not available ({e}); install it with: pip install 'procsky[sim]'")
        return 1

    t0 = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    repo = Repo.create(out / "repo")
    _say(f"created repository {repo.root} (SQLite registry)")

    _say(f"simulating the {DEMO_RECIPE!r} survey ...")
    sim_dir = out / "sim"
    sim = simulate(DEMO_RECIPE, sim_dir, mode="calibrated", workers=workers, progress=True)
    n = ingest_survey(repo, sim_dir)
    _say(f"simulated and ingested {n} detector images and the reference catalogue ({sim.seconds:.0f} s)")
    if not pipeline:
        return 0

    from procsky.pipeline import run_report
    from procsky.pipeline.report import write_html
    from procsky.sim.evaluate import evaluate_run, format_evaluation

    ra, dec = register_demo_skymap(repo, sim.recipe)
    _say(f'registered the discrete sky map {SKYMAP!r}: one tract at ({ra}, {dec}), one patch of 2600 px, 0.2"/px')

    _say(f"running every stage of drp on a LocalCluster of {workers} workers ...")
    result, t_run = run_drp(repo, workers=workers)
    print(result, flush=True)
    report = run_report(repo, DEMO_RUN)
    html = write_html(report, out / "report.html")
    print(_timing_text(report), flush=True)

    ev = evaluate_run(repo, DEMO_RUN, sim_dir)
    (out / "evaluation.json").write_text(json.dumps(ev, indent=1, default=float))
    print(format_evaluation(ev), flush=True)

    bad = {label: c for label, c in result.counts.items() if c.get("failed") or c.get("blocked") or c.get("pending")}
    false_rate = ev.get("dia", {}).get("false_objects_per_detector_visit")
    _say(f"drp took {t_run:.0f} s; the whole demo {time.time() - t0:.0f} s")
    _say(f"HTML report: {html}   figures: {out / 'evaluation.json'}")
    _say(f"explore: procsky query {repo.root} --format table;  procsky report {repo.root} --run {DEMO_RUN}")
    status = 0
    if bad:
        _say(f"SOME QUANTA DID NOT SUCCEED: {bad}")
        status = 1
    if false_rate is None:
        _say("no difference images were made: the DIA stages did not run")
        status = 1
    elif false_rate > max_false:
        _say(f"DIA purity check failed: {false_rate:.2f} false DIA objects per detector-visit (> {max_false})")
        status = 1
    rec = ev.get("dia", {}).get("recovered", {})
    n_truth = sum(v["truth"] for v in rec.values())
    n_found = sum(v["recovered"] for v in rec.values())
    if n_truth and 2 * n_found < n_truth:
        _say(f"DIA recovery check failed: {n_found} of {n_truth} truth variables and transients recovered")
        status = 1
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m procsky.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="output folder (replaced)")
    ap.add_argument("--workers", type=int, default=2, help="dask workers (one thread each)")
    ap.add_argument("--no-pipeline", action="store_true", help="stop after the simulation and ingest")
    ap.add_argument(
        "--max-false",
        type=float,
        default=2.0,
        help="most DIA objects with no truth counterpart per detector-visit before failing",
    )
    args = ap.parse_args(argv)
    try:
        return run(Path(args.out), workers=args.workers, pipeline=not args.no_pipeline, max_false=args.max_false)
    except ProcskyError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
