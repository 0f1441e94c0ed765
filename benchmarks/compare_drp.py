"""Run ``drp`` on a simulated survey and compare every output of two runs (refactor guard).

A behaviour-preserving change must leave every output of the pipeline unchanged: calexp
pixels, ``src`` tables, warps, coadds, differences, DIA tables. This script makes the two
runs and says, dataset by dataset, what differs.

Make a run (synchronous, in this process, so float summation order is fixed)::

    .venv/bin/python benchmarks/compare_drp.py run /tmp/before --recipe tiny
    .venv/bin/python benchmarks/compare_drp.py run /tmp/before-small --recipe small --detectors 3,4,5 \
        --visits 1,2,3,4,11,12,13,14 --radius 0.2 --patch-inner 4000

Compare two runs made by two versions of the code (run the second with the new code)::

    .venv/bin/python benchmarks/compare_drp.py compare /tmp/before /tmp/after

The comparison reads the stored files directly (Zarr arrays and attributes, Parquet
columns, JSON), not through procsky's readers, so it does not depend on the code under
test. Arrays must be bit-identical or differ by less than ``--rtol`` relative to the
array's largest absolute value (float summation order); metadata keys that record time,
host or code version are ignored. A dataset whose every old value is unchanged but which
gained an attribute or a plane is reported as ``extended`` (listed, not a failure).
Exit status 1 when anything else differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

RUN = "cmp/drp"
#: Metadata keys whose values legitimately change between two runs of the same code.
VOLATILE = (
    "time",
    "seconds",
    "host",
    "code_version",
    "version",
    "created",
    "pid",
    "worker",
    "date",
    "uuid",
    "elapsed",
    "cpu",
    "memory",
    "peak",
    "started",
    "finished",
    "run_id",
    "id",
)


def make_run(out: Path, recipe: str, detectors, visits, workers: int, radius: float, patch_inner: int) -> None:
    import shutil

    from procsky.instruments import ingest_files
    from procsky.pipeline import run_pipeline
    from procsky.refcat import ingest_refcat
    from procsky.repo import Repo
    from procsky.sim import simulate
    from procsky.skymap import discrete_skymap, register_skymap

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    sim = simulate(
        recipe, out / "sim", mode="calibrated", workers=workers, detectors=detectors, visits=visits, progress=False
    )
    repo = Repo.create(out / "repo")
    ingest_files(repo, sorted((out / "sim" / "images").glob("*.fits")), "simcam", run="simcam/raw", progress=False)
    ingest_refcat(repo, [out / "sim" / "refcat" / "refcat.parquet"], name="sim")
    ra, dec = sim.recipe.field.ra, sim.recipe.field.dec
    register_skymap(
        repo, discrete_skymap([(ra, dec)], radius=radius, name="default", patch_inner=patch_inner), tracts=True
    )
    print(f"simulated and ingested in {time.time() - t0:.0f} s", flush=True)
    t1 = time.time()
    result = run_pipeline(repo, "drp", where="instrument='simcam'", output=RUN, client=None, progress=False)
    print(result)
    print(f"drp took {time.time() - t1:.0f} s", flush=True)


def _datasets(root: Path) -> dict[tuple, tuple[str, Path]]:
    """``(dataset_type, data_id)`` -> (storage class, path) of every dataset in the run."""
    from procsky.repo import Repo

    repo = Repo(root / "repo")
    out = {}
    for ref in repo.query(None, None, run=RUN):
        key = (ref.dataset_type, json.dumps(dict(ref.data_id), sort_keys=True, default=str))
        out[key] = (ref.storage_class, repo.path(ref))
    return out


def _volatile(key: str) -> bool:
    k = key.lower()
    return any(v == k or k.endswith("_" + v) or k.startswith(v + "_") for v in VOLATILE)


def _cmp_json(a, b, path: str, rtol: float, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _volatile(str(k)):
                continue
            if k not in a:
                diffs.append(f"ADDED {path}.{k}")
                continue
            if k not in b:
                diffs.append(f"{path}.{k}: only in before")
                continue
            _cmp_json(a[k], b[k], f"{path}.{k}", rtol, diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: length {len(a)} -> {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _cmp_json(x, y, f"{path}[{i}]", rtol, diffs)
    elif isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * max(abs(a), abs(b))):
            diffs.append(f"{path}: {a!r} -> {b!r}")
    elif a != b:
        diffs.append(f"{path}: {str(a)[:80]!r} -> {str(b)[:80]!r}")


def _cmp_array(a: np.ndarray, b: np.ndarray, name: str, rtol: float) -> tuple[str, str | None]:
    """('identical' | 'close' | 'different', message)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return "different", f"{name}: shape/dtype {a.shape} {a.dtype} -> {b.shape} {b.dtype}"
    if a.dtype.kind not in "fc":
        n = int(np.count_nonzero(a != b))
        return ("identical", None) if n == 0 else ("different", f"{name}: {n} of {a.size} values differ")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return "identical", None
    nan_mismatch = int(np.count_nonzero(np.isnan(a) != np.isnan(b)))
    fin = np.isfinite(a) & np.isfinite(b)
    scale = float(np.max(np.abs(a[fin]))) if fin.any() else 1.0
    worst = float(np.max(np.abs(a[fin].astype(np.float64) - b[fin]))) / (scale or 1.0) if fin.any() else 0.0
    msg = (
        f"{name}: {int((~same).sum())} of {a.size} differ, max |diff|/max|a| = {worst:.2e}, "
        f"NaN mismatches {nan_mismatch}"
    )
    return ("close" if worst < rtol and nan_mismatch == 0 else "different"), msg


def _cmp_zarr(pa: Path, pb: Path, rtol: float):
    import zarr

    ga, gb = zarr.open_group(str(pa), mode="r"), zarr.open_group(str(pb), mode="r")
    status, msgs = "identical", []
    attr_diffs: list[str] = []
    _cmp_json(dict(ga.attrs), dict(gb.attrs), "attrs", rtol, attr_diffs)
    added = [d for d in attr_diffs if d.startswith("ADDED ")]
    if len(added) < len(attr_diffs):
        status = "different"
    elif added:
        status = "extended"
    msgs += attr_diffs[:5]
    names_a = sorted(k for k, _ in ga.arrays())
    names_b = sorted(k for k, _ in gb.arrays())
    if not set(names_a) <= set(names_b):
        return "different", [f"planes {names_a} -> {names_b}"]
    if names_b != names_a:
        msgs.append(f"ADDED planes {sorted(set(names_b) - set(names_a))}")
        status = "extended" if status == "identical" else status
    for n in names_a:
        s, m = _cmp_array(np.asarray(ga[n][...]), np.asarray(gb[n][...]), n, rtol)
        if m:
            msgs.append(m)
        if s == "different" or (s == "close" and status in ("identical", "extended")):
            status = s
    return status, msgs


def _cmp_parquet(pa: Path, pb: Path, rtol: float):
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(str(pa)), pq.read_table(str(pb))
    if ta.column_names != tb.column_names:
        return "different", [f"columns {set(ta.column_names) ^ set(tb.column_names)}"]
    if ta.num_rows != tb.num_rows:
        return "different", [f"rows {ta.num_rows} -> {tb.num_rows}"]
    status, msgs = "identical", []
    for name in ta.column_names:
        try:
            a, b = ta[name].to_numpy(zero_copy_only=False), tb[name].to_numpy(zero_copy_only=False)
        except Exception:
            a, b = np.asarray(ta[name].to_pylist(), dtype=object), np.asarray(tb[name].to_pylist(), dtype=object)
        if a.dtype == object:
            if list(map(str, a)) != list(map(str, b)):
                status = "different"
                msgs.append(f"{name}: values differ")
            continue
        s, m = _cmp_array(a, b, name, rtol)
        if m:
            msgs.append(m)
        if s == "different" or (s == "close" and status == "identical"):
            status = s
    return status, msgs


def compare(a: Path, b: Path, rtol: float) -> int:
    da_, db_ = _datasets(a), _datasets(b)
    bad = 0
    for k in sorted(set(da_) ^ set(db_)):
        print(f"ONLY IN {'before' if k in da_ else 'after'}: {k[0]} {k[1]}")
        bad += 1
    counts: dict[str, dict[str, int]] = {}
    for k in sorted(set(da_) & set(db_)):
        (sc, pa), (_, pb) = da_[k], db_[k]
        if sc == "Exposure":
            status, msgs = _cmp_zarr(pa, pb, rtol)
        elif sc == "DataFrame":
            status, msgs = _cmp_parquet(pa, pb, rtol)
        else:
            diffs: list[str] = []
            _cmp_json(json.loads(pa.read_text()), json.loads(pb.read_text()), "", rtol, diffs)
            status, msgs = ("identical" if not diffs else "different"), diffs[:8]
        counts.setdefault(k[0], {}).setdefault(status, 0)
        counts[k[0]][status] += 1
        if status != "identical":
            print(f"{status.upper():9s} {k[0]} {k[1]}")
            for m in msgs[:8]:
                print(f"          {m}")
        bad += status == "different"
    print("\nper dataset type (identical / close / extended / different):")
    for t, c in sorted(counts.items()):
        print(
            f"  {t:24s} {c.get('identical', 0):4d} {c.get('close', 0):4d} {c.get('extended', 0):4d} "
            f"{c.get('different', 0):4d}"
        )
    print("RESULT:", "unchanged" if not bad else f"{bad} dataset(s) differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--recipe", default="tiny")
    r.add_argument("--detectors", default=None, help="comma-separated detector ids")
    r.add_argument("--visits", default=None, help="comma-separated visit ids")
    r.add_argument("--workers", type=int, default=2, help="simulation processes")
    r.add_argument("--radius", type=float, default=0.065, help="sky map tract radius (deg)")
    r.add_argument("--patch-inner", type=int, default=2400, help="patch size without border (px)")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        ids = lambda s: None if s is None else [int(x) for x in s.split(",")]  # noqa: E731
        make_run(
            args.out, args.recipe, ids(args.detectors), ids(args.visits), args.workers, args.radius, args.patch_inner
        )
        return 0
    return compare(args.before, args.after, args.rtol)


if __name__ == "__main__":
    sys.exit(main())
