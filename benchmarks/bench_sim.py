"""Benchmark of the survey simulator (procsky.sim).

Measures the wall time of ``tiny`` serially and with the dask ``threads`` and ``processes``
schedulers with 2 workers (GalSim holds the GIL through much of its drawing, so
processes should scale better), and the time of ``small`` and ``medium``: in full with
``--full``, otherwise estimated as ``fixed + per_image * n_images / speedup`` where
``fixed`` (scene, truth tables) and ``per_image`` come from serial runs of 1 and 3 images
and ``speedup`` is the measured processes/serial ratio on ``tiny``. The printout says which
numbers are measured and which estimated. On a shared machine, note the load average
printed with the results.

Usage::

    python benchmarks/bench_sim.py [--workers 2] [--full small] [--out /tmp/bench_sim]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def _run(recipe, out, **kw):
    from procsky.sim import simulate

    if Path(out).exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = simulate(recipe, out, progress=False, **kw)
    _run.cpu = res.cpu_seconds
    return time.perf_counter() - t0, len(res.images)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/bench_sim")
    ap.add_argument(
        "--full",
        action="append",
        default=[],
        choices=["small", "medium"],
        help="run this recipe in full instead of estimating it from a subset",
    )
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args(argv)
    from procsky.sim import load_recipe

    out = Path(args.out)
    results = {"workers": args.workers, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    speedup = float(args.workers)
    if not args.skip_tiny:
        for sched in ("sync", "threads", "processes"):
            secs, n = _run("tiny", out / f"tiny-{sched}", scheduler=sched, workers=args.workers)
            results[f"tiny_{sched}_s"] = round(secs, 2)
            # process_time() is per process: with threads it counts the other threads too
            cpu = "n/a" if sched == "threads" else f"{_run.cpu:.1f}"
            results[f"tiny_{sched}_image_cpu_s"] = None if sched == "threads" else round(_run.cpu, 2)
            print(
                f"tiny ({n} images of 512x512), {sched:9s} x{args.workers}: {secs:6.1f} s wall, "
                f"{cpu} CPU-s in image tasks (measured)"
            )
        speedup = results["tiny_sync_s"] / results["tiny_processes_s"]
        results["processes_speedup"] = round(speedup, 2)
        results["threads_speedup"] = round(results["tiny_sync_s"] / results["tiny_threads_s"], 2)
    for name, visits, dets in (("small", [1], [0, 4, 8]), ("medium", [1], [0, 12, 24])):
        r = load_recipe(name)
        n_total = r.n_visits * r.n_detectors
        if name in args.full:
            secs, n = _run(name, out / name, scheduler="processes", workers=args.workers)
            results[f"{name}_s"] = round(secs, 1)
            print(f"{name} ({n} images): {secs:.0f} s (measured, full run)")
            continue
        # fixed part (scene, truth tables) + 1 image, then + len(dets) images, serially
        one, _ = _run(name, out / f"{name}-one", scheduler="sync", visits=visits, detectors=dets[:1])
        some, n = _run(name, out / f"{name}-subset", scheduler="sync", visits=visits, detectors=dets)
        cpu_per_image = _run.cpu / n
        results[f"{name}_cpu_per_image_s"] = round(cpu_per_image, 2)
        results[f"{name}_estimated_image_cpu_total_s"] = round(cpu_per_image * n_total, 0)
        print(
            f"{name}: {cpu_per_image:.1f} CPU-s per image (measured on {n}) => {cpu_per_image * n_total / 60:.0f} "
            f"CPU-min for all {n_total} images, ~{cpu_per_image * n_total / 60 / args.workers:.0f} min on "
            f"{args.workers} free cores (estimated)"
        )
        per_image = max(some - one, 1e-3) / (n - 1)
        fixed = max(one - per_image, 0.0)
        est = fixed + per_image * n_total / speedup
        results[f"{name}_per_image_s"] = round(per_image, 2)
        results[f"{name}_fixed_s"] = round(fixed, 1)
        results[f"{name}_estimated_total_s"] = round(est, 0)
        print(
            f"{name}: {per_image:.1f} s per 2048x2048 image serially (measured on {n}), fixed {fixed:.0f} s; "
            f"all {n_total} images on {args.workers} processes (speedup {speedup:.2f}): "
            f"about {est / 60:.0f} min (estimated)"
        )
    results["load_avg_end"] = os.getloadavg()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
