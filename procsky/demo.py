"""``python -m procsky.demo`` (``make demo``): the tiny end-to-end campaign.

Runs what exists, on the embedded defaults (SQLite registry, local Zarr, a LocalCluster):

1. create a fresh repository in ``demo-out/repo``;
2. simulate the ``tiny`` survey (``procsky sim tiny``) and ingest it with ``simcam``;
3. ingest the real DECam/90prime/Mosaic3 samples from ``../shared/data/real`` when present;
4. register the default rings sky map and run the ``drp`` pipeline (ISR, calibrate,
   visit-level photometric calibration, warp, coadd; the difference-imaging stages need
   larger detectors than `tiny`) over the simulated data, then write the HTML report;
5. print what it did.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from procsky.errors import ProcskyError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "legacysurvey"


#: drp stages the demo runs (see the note in :func:`run`).
DEMO_TASKS = ["isr", "calibrate", "visit_photometry", "warp", "assemble_coadd"]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _real_files(pattern: str) -> list[Path]:
    return sorted(p for p in REAL.rglob(pattern) if "/calib/" not in str(p))


def run(out: Path, *, workers: int = 2, pipeline: bool = True) -> int:
    from procsky.instruments import ingest_files
    from procsky.repo import Repo

    t0 = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    repo = Repo.create(out / "repo")
    _say(f"created repository {repo.root} (SQLite registry)")

    summary = []
    sim_ok = False
    try:
        from procsky.sim import simulate
    except ImportError as e:  # GalSim missing: the `sim` extra is not installed
        _say(f"simulator not available ({e}); skipping the simulated survey")
    else:
        _say("simulating the 'tiny' survey ...")
        simulate("tiny", out / "sim", seed=1, mode="calibrated", progress=True)
        images = sorted((out / "sim" / "images").glob("*.fits"))
        refs = ingest_files(repo, images, "simcam", run="simcam/raw", progress=True)
        summary.append(f"simulated + ingested {len(refs)} simcam detector images (run simcam/raw)")
        from procsky.refcat import ingest_refcat

        ingest_refcat(repo, [out / "sim" / "refcat" / "refcat.parquet"], name="sim")
        summary.append("ingested the simulated reference catalogue as refcat 'sim'")
        sim_ok = True

    if REAL.exists():
        for inst, pat in (("decam-cp", "c4d_*_ooi_*.fits"), ("90prime-cp", "ksb_*_ooi_*.fits"), ("mosaic3-cp", "k4m_*_ooi_*.fits")):
            files = _real_files(pat)
            if files:
                refs = ingest_files(repo, files, inst, progress=False)
                summary.append(f"ingested {len(refs)} real {inst} CCD cut-outs (run {inst}/raw)")
    else:
        _say(f"no real data at {REAL}; skipping the real samples")

    if pipeline and sim_ok:
        from distributed import Client

        from procsky.pipeline import open_cluster, run_pipeline, run_report
        from procsky.pipeline.report import write_html
        from procsky.skymap import register_skymap, rings_skymap

        register_skymap(repo, rings_skymap(name="default"))
        summary.append("registered the rings sky map 'default' (1.5 deg tracts, 4000 px patches, 0.2\"/px)")

        _say(f"running the drp pipeline on the simulated survey with a LocalCluster of {workers} workers ...")
        with open_cluster("local", n_workers=workers) as cluster, Client(cluster) as client:
            _say(f"dask dashboard: {client.dashboard_link}")
            # The difference-imaging stages of drp need more kernel stars than a 512 px
            # `tiny` detector holds (2-3); they run on `small` and real-sized detectors.
            result = run_pipeline(repo, "drp", where="instrument='simcam'", output="demo/drp", client=client,
                                  tasks=DEMO_TASKS, progress=True)
        print(result, flush=True)
        html = write_html(run_report(repo, "demo/drp"), out / "report.html")
        summary.append(f"ran drp into run demo/drp ({'all quanta succeeded' if result.ok else 'SOME QUANTA FAILED'})")
        summary.append(f"HTML report: {html}")
        if not result.ok:
            for line in summary:
                _say(line)
            return 1

    _say("datasets in the repository:")
    counts: dict[tuple[str, str], int] = {}
    for ref in repo.query():
        counts[(ref.run, ref.dataset_type)] = counts.get((ref.run, ref.dataset_type), 0) + 1
    for (run_name, dt), n in sorted(counts.items()):
        print(f"    {run_name:24s} {dt:18s} {n:5d}")
    for line in summary:
        _say(line)
    _say(f"done in {time.time() - t0:.1f} s. Explore with: procsky query {repo.root} --format table")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m procsky.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="output folder (replaced)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-pipeline", action="store_true", help="stop after ingest")
    args = ap.parse_args(argv)
    try:
        return run(Path(args.out), workers=args.workers, pipeline=not args.no_pipeline)
    except ProcskyError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
