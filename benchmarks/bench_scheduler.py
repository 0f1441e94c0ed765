"""Scheduler load: N trivial quanta through the dask executor in bounded batches.

Starts a separate ``dask scheduler`` process and ``dask worker`` processes (so that the
driver's and the scheduler's memory can be measured apart), builds and stores a graph of
``toy_noop`` quanta in a fresh repository, runs it with ``DaskExecutor`` and reports:

* graph build and store time, execution wall time, per-quantum overhead (s);
* the most quanta the scheduler held at once (must stay <= --max-in-flight);
* driver and scheduler resident memory (RSS high-water, sampled every 50 ms).

Usage::

    python benchmarks/bench_scheduler.py [--n 20000] [--max-in-flight 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"  # the toy tasks (tests/toytasks.py) are test code, not part of procsky
sys.path.insert(0, str(ROOT))


class Sampler(threading.Thread):
    """Peak RSS (bytes) of some processes, sampled every ``interval`` s."""

    def __init__(self, pids, interval=0.05):
        super().__init__(daemon=True)
        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.peak = {k: 0 for k in pids}
        self.interval = interval
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            for k, p in self.procs.items():
                try:
                    self.peak[k] = max(self.peak[k], p.memory_info().rss)
                except psutil.Error:
                    pass


def _noop(i):
    return i


def _bare_window(client, n, window):
    """Run ``n`` no-op tasks with at most ``window`` in flight; returns ``n``."""
    from distributed import as_completed

    it = iter(range(n))
    first = [next(it) for _ in range(min(window, n))]
    ac = as_completed(client.map(_noop, first, pure=False))
    done = 0
    for batch in ac.batches():
        client.gather(batch)
        done += len(batch)
        more = [i for _, i in zip(range(len(batch)), it)]
        if more:
            ac.update(client.map(_noop, more, pure=False))
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="number of quanta")
    ap.add_argument("--max-in-flight", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import distributed

    from procsky.pipeline import DaskExecutor, Pipeline, build_graph

    sys.path.insert(0, str(TESTS))
    import toytasks as toy
    from procsky.repo import Repo

    tmp = Path(tempfile.mkdtemp(prefix="procsky-bench-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), OMP_NUM_THREADS="1")
    sched_file = tmp / "scheduler.json"
    sched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--scheduler-file",
            str(sched_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = None
    try:
        while not sched_file.exists():
            time.sleep(0.1)
        workers = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(sched_file),
                "--nworkers",
                str(args.workers),
                "--nthreads",
                "1",
                "--memory-limit",
                "2GiB",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = distributed.Client(scheduler_file=str(sched_file))
        client.wait_for_workers(args.workers, timeout=120)
        sampler = Sampler({"driver": os.getpid(), "scheduler": sched.pid})
        sampler.start()
        base = {"driver": psutil.Process().memory_info().rss, "scheduler": psutil.Process(sched.pid).memory_info().rss}

        repo = Repo.create(tmp / "repo")
        pipe = Pipeline.from_tasks([("noop", toy.ToyNoopTask, {"n": args.n})])
        t0 = time.perf_counter()
        graph = build_graph(repo, pipe, run="bench")
        t1 = time.perf_counter()
        graph.save(repo)
        t2 = time.perf_counter()

        held = []
        stop = threading.Event()

        def watch():
            while not stop.wait(0.2):
                held.append(client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        ex = DaskExecutor(client, max_in_flight=args.max_in_flight)
        t3 = time.perf_counter()
        summary = ex.execute(repo, graph)
        t4 = time.perf_counter()
        stop.set()
        w.join()
        sampler.stop.set()
        sampler.join()
        # Reference on the same cluster: bare distributed tasks (no registry, no provenance),
        # submitted with the same window.
        t5 = time.perf_counter()
        bare = _bare_window(client, args.n, args.max_in_flight)
        t6 = time.perf_counter()
        client.close()
        assert summary.counts["noop"]["succeeded"] == args.n, summary
        from procsky.pipeline import run_report

        task_rep = run_report(repo, "bench")["tasks"][0]
        res = {
            "quanta": args.n,
            "workers": args.workers,
            "max_in_flight": args.max_in_flight,
            "graph_build_s": round(t1 - t0, 3),
            "graph_store_s": round(t2 - t1, 3),
            "execute_s": round(t4 - t3, 3),
            "per_quantum_overhead_ms": round(1000 * (t4 - t3) / args.n, 3),
            "quanta_per_s": round(args.n / (t4 - t3), 1),
            "worker_side_ms_per_quantum": round(1000 * task_rep["wall_seconds"]["mean"], 3),
            "bare_distributed_ms_per_task": round(1000 * (t6 - t5) / bare, 3),
            "max_quanta_in_flight_executor": ex.max_seen_in_flight,
            "max_tasks_on_scheduler_sampled": max(held) if held else None,
            "driver_rss_start_mib": round(base["driver"] / 2**20, 1),
            "driver_rss_peak_mib": round(sampler.peak["driver"] / 2**20, 1),
            "scheduler_rss_start_mib": round(base["scheduler"] / 2**20, 1),
            "scheduler_rss_peak_mib": round(sampler.peak["scheduler"] / 2**20, 1),
        }
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        for p in (workers, sched):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
