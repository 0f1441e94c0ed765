"""What dask's ``MALLOC_TRIM_THRESHOLD_=65536`` costs a quantum, and what ``tune_malloc`` gives back.

Run:  .venv/bin/python benchmarks/bench_malloc.py [--sim DIR] [--quanta 6] [--repeat 2]

Each setting runs in its own child process (the variable must be set before the process
starts), A B C A B C ..., calibrating the same ``--quanta`` detectors one after the other in
one worker-like thread (as a dask worker runs a quantum), after one untimed warm-up quantum:

* ``glibc``: no malloc variable (glibc's dynamic mmap threshold);
* ``dask``: ``MALLOC_TRIM_THRESHOLD_=65536``, as dask's nanny sets for every worker;
* ``dask+tune``: the same, with :func:`procsky._malloc.tune_malloc` called first, as
  :func:`procsky.pipeline.executor.execute_quantum` does.

Reported per setting: user and system CPU seconds, minor page faults and peak resident
memory of the timed quanta. Without ``--sim`` the ``tiny`` recipe is simulated first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import glob, json, resource, sys
from concurrent.futures import ThreadPoolExecutor
if sys.argv[3] == "1":
    from procsky._malloc import tune_malloc
    tune_malloc()
from procsky.exposure import Exposure
from procsky.refcat import read_refcat_file
from procsky.tasks.calibrate import calibrate_exposure

sim, n = sys.argv[1], int(sys.argv[2])
images = sorted(glob.glob(f"{sim}/images/*.fits"))
ref = read_refcat_file(f"{sim}/refcat/refcat.parquet")


def one(path):
    calibrate_exposure(Exposure.read(path), ref)[0].compute()


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


pool = ThreadPoolExecutor(1)
pool.submit(one, images[0]).result()
u0, s0, f0 = usage()
for path in (images[1:] * n)[:n]:
    pool.submit(one, path).result()
u1, s1, f1 = usage()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"user": u1 - u0, "sys": s1 - s0, "minflt": f1 - f0, "peak_mb": peak}))
"""

SETTINGS = {
    "glibc": ({}, "0"),
    "dask": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "0"),
    "dask+tune": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "1"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", help="a simulated survey folder (procsky sim RECIPE --out DIR); default: simulate tiny")
    ap.add_argument("--quanta", type=int, default=6, help="timed calibrate quanta per run")
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting, interleaved")
    args = ap.parse_args(argv)
    tmp = None
    sim = args.sim
    if sim is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-malloc-")
        sim = str(Path(tmp.name) / "sim")
        subprocess.run([sys.executable, "-m", "procsky", "sim", "tiny", "--out", sim], check=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    base.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for _ in range(args.repeat):
        for name, (env, tune) in SETTINGS.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, sim, str(args.quanta), tune],
                env={**base, **env},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.quanta} calibrate quanta per run, {args.repeat} runs per setting (values per run)")
    print(f"{'setting':10s} {'user CPU-s':>18s} {'sys CPU-s':>14s} {'minor faults':>20s} {'peak MB':>12s}")
    for name, rs in rows.items():

        def col(key, fmt, rs=rs):
            return " ".join(fmt.format(r[key]) for r in rs)

        print(
            f"{name:10s} {col('user', '{:6.2f}'):>18s} {col('sys', '{:5.2f}'):>14s} "
            f"{col('minflt', '{:8d}'):>20s} {col('peak_mb', '{:5.0f}'):>12s}"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
