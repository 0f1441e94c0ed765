"""The demo campaign's drp on 1 and on 2 workers: wall time, speed-up and where it goes.

Run:  .venv/bin/python benchmarks/bench_workers.py [--out DIR] [--order 2,1,2,1] [--warm-up]

The ``demo`` survey is simulated once (into ``DIR/sim``); each run then gets a fresh
repository with the same images, reference catalogue and sky map as ``make demo``
(:func:`procsky.demo.ingest_survey`, :func:`procsky.demo.register_demo_skymap`) and runs
the demo's drp on a LocalCluster of N workers (:func:`procsky.demo.run_drp`), in the order
given (interleaved, so that a change of machine load hits both). ``--warm-up`` makes one
untimed 2-worker run first, so that numba's cache is warm (a cold cache costs the first run
~145 s of compilation; see ``RESULTS.md``).

Reported per run: drp wall (cluster start included, as the demo prints it), the quanta's
span (first quantum start to last end), the time outside quanta (start-up, planning, stage
hand-overs), the summed CPU of the quanta, and per stage the span; then the median speed-up
of 2 workers over 1 (issue 20: >= 1.85). ``--threads`` adds where the CPU went beside the
quanta: the driver process's CPU (client, scheduler and, on a LocalCluster, the nannies)
and the workers' CPU per thread (``/proc/self/task``: the task thread, the event loop's
MainThread, zarr's I/O loop and codec threads, procsky's RSS monitor), summed over workers.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stage_cpu import stage_rows  # this folder is on sys.path when run as a script


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by Python thread name (Linux)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        name = re.sub(r"-Threads-\d+-\d+$", "-Threads", names.get(int(tid), "native"))
        name = re.sub(r"^asyncio_\d+$", "asyncio (zarr codecs)", name)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _drp_with_threads(repo, workers: int, tasks=None, profiler: bool = False):
    """``procsky.demo.run_drp`` with the driver's and the workers' per-thread CPU."""
    from distributed import Client

    from procsky.demo import DEMO_RUN
    from procsky.pipeline import open_cluster, run_pipeline

    profile = {"cluster": "local", "options": {"n_workers": workers, "threads_per_worker": 1}}
    if profiler:  # dask's worker profiler back on (procsky turns it off)
        profile["dask_config"] = {"distributed.worker.profile.enabled": True}
    t1 = time.time()
    with open_cluster(profile) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        before, d0 = client.run(_thread_cpu), resource.getrusage(resource.RUSAGE_SELF)
        summary = run_pipeline(
            repo, "drp", where="instrument='simcam'", output=DEMO_RUN, client=client, progress=False, tasks=tasks
        )
        after, d1 = client.run(_thread_cpu), resource.getrusage(resource.RUSAGE_SELF)
    threads: dict[str, float] = {}
    for w, cpu in after.items():
        for name, v in cpu.items():
            threads[name] = threads.get(name, 0.0) + v - before[w].get(name, 0.0)
    driver = (d1.ru_utime + d1.ru_stime) - (d0.ru_utime + d0.ru_stime)
    return summary, time.time() - t1, {"driver": driver, "worker_threads": threads}


def one_run(out: Path, sim_dir: Path, recipe, workers: int, tag: str, threads: bool = False, **kw) -> dict:
    from procsky.demo import DEMO_RUN, ingest_survey, register_demo_skymap, run_drp
    from procsky.repo import Repo

    root = out / f"repo-{tag}"
    if root.exists():
        shutil.rmtree(root)
    repo = Repo.create(root)
    ingest_survey(repo, sim_dir)
    register_demo_skymap(repo, recipe)
    extra: dict = {}
    if threads:
        summary, wall, extra = _drp_with_threads(repo, workers, **kw)
    else:
        summary, wall = run_drp(repo, workers=workers, progress=False)
    if not summary.ok:
        raise SystemExit(f"drp on {workers} workers did not succeed: {summary.counts}")
    rows = stage_rows(str(root), DEMO_RUN)
    span = max(r["last_end"] for r in rows) - min(r["first_start"] for r in rows)
    shutil.rmtree(root)
    return {
        "workers": workers,
        "wall": wall,
        "span": span,
        "outside": wall - span,
        "cpu": sum(r["cpu"] for r in rows),
        "stages": {r["task"]: r["span"] for r in rows},
        **extra,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--order", default="2,1,2,1", help="worker counts of the timed runs, in order")
    ap.add_argument("--warm-up", action="store_true", help="one untimed 2-worker run first (warm numba cache)")
    ap.add_argument("--threads", action="store_true", help="also the driver's CPU and the workers' CPU per thread")
    ap.add_argument("--tasks", help="with --threads: only these drp tasks (comma-separated)")
    ap.add_argument("--worker-profiler", action="store_true", help="with --threads: dask's worker profiler on")
    args = ap.parse_args(argv)
    from procsky.demo import DEMO_RECIPE
    from procsky.sim import simulate

    tmp = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-workers-")
        out = Path(tmp.name)
    sim_dir = out / "sim"
    if not (sim_dir / "images").is_dir():
        simulate(DEMO_RECIPE, sim_dir, mode="calibrated", workers=2, progress=False)
    from procsky.sim.recipe import load_recipe

    recipe = load_recipe(sim_dir / "recipe.yaml")
    if args.warm_up:
        one_run(out, sim_dir, recipe, 2, "warm-up")
    runs = []
    for k, n in enumerate(int(x) for x in args.order.split(",")):
        kw = {"tasks": args.tasks, "profiler": args.worker_profiler} if args.threads else {}
        r = one_run(out, sim_dir, recipe, n, f"{k}-w{n}", threads=args.threads, **kw)
        runs.append(r)
        print(
            f"run {k}: {n} worker(s)  drp wall {r['wall']:6.1f} s  quanta span {r['span']:6.1f} s  "
            f"outside quanta {r['outside']:4.1f} s  quanta CPU {r['cpu']:6.1f} s",
            flush=True,
        )
        if args.threads:
            top = sorted(r["worker_threads"].items(), key=lambda kv: -kv[1])
            print(
                f"        driver CPU {r['driver']:.1f} s; workers' CPU by thread: "
                + ", ".join(f"{name} {v:.1f}" for name, v in top if v >= 0.1),
                flush=True,
            )
    by = {n: [r for r in runs if r["workers"] == n] for n in sorted({r["workers"] for r in runs})}
    print("\nper stage, span in s (median over runs):")
    tasks = list(runs[0]["stages"])
    print(f"{'task':18s} " + " ".join(f"{f'{n} worker(s)':>12s}" for n in by))
    for t in tasks:
        print(f"{t:18s} " + " ".join(f"{statistics.median(r['stages'][t] for r in rs):12.1f}" for rs in by.values()))
    if 1 in by and 2 in by:
        w1 = statistics.median(r["wall"] for r in by[1])
        w2 = statistics.median(r["wall"] for r in by[2])
        s1 = statistics.median(r["span"] for r in by[1])
        s2 = statistics.median(r["span"] for r in by[2])
        print(f"\nspeed-up 1 -> 2 workers: drp wall {w1:.1f} / {w2:.1f} = {w1 / w2:.3f}; quanta span {s1 / s2:.3f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
