"""CPU seconds per stage of a pipeline run, per quantum and per detector-visit, from the registry.

Run:  .venv/bin/python benchmarks/stage_cpu.py REPO RUN [--per-visit-task calibrate]

For every task of RUN (in pipeline order): quanta, summed CPU seconds, median CPU per
quantum, CPU per detector-visit (the summed CPU divided by the number of quanta of
``--per-visit-task``, one per detector-visit), the stage's span (first start to last end,
wall) and the summed wall time of its quanta (busy). CPU is each quantum's own
``cpu_seconds``: the whole worker process's CPU when no other quantum ran in it meanwhile
(``cpu_scope: process``), its thread's otherwise; the table says which.

A tract-scale figure (issue 20): a subset of the ``medium`` recipe, drawn and processed
synchronously by ``benchmarks/compare_drp.py``::

    .venv/bin/python benchmarks/compare_drp.py run /tmp/medium-sub --recipe medium \\
        --detectors 11,12,13 --visits 1,2,4,5,7,8,10,11 --radius 0.35 --patch-inner 4000
    .venv/bin/python benchmarks/stage_cpu.py /tmp/medium-sub/repo cmp/drp
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def stage_rows(repo_root: str, run: str) -> list[dict]:
    """One dict per task of ``run``: quanta, cpu, cpu_median, span, busy, scopes."""
    from procsky.pipeline.graph import load_states
    from procsky.repo import Repo

    repo = Repo(repo_root)
    rows: dict[str, dict] = {}
    for r in load_states(repo, run):
        if r["start_time"] is None or r["end_time"] is None or r["state"] != "succeeded":
            continue
        prov = json.loads(r["provenance"] or "{}")
        d = rows.setdefault(
            r["task"],
            {"task": r["task"], "stage": r.get("stage", 0), "cpu": [], "start": [], "end": [], "scopes": set()},
        )
        d["cpu"].append(float(r["cpu_seconds"] or 0.0))
        d["start"].append(r["start_time"])
        d["end"].append(r["end_time"])
        d["scopes"].add(prov.get("cpu_scope", "thread"))
    out = []
    for d in sorted(rows.values(), key=lambda d: (d["stage"], min(d["start"]))):
        out.append(
            {
                "task": d["task"],
                "quanta": len(d["cpu"]),
                "cpu": sum(d["cpu"]),
                "cpu_median": statistics.median(d["cpu"]),
                "span": max(d["end"]) - min(d["start"]),
                "busy": sum(e - s for s, e in zip(d["start"], d["end"])),
                "scope": "/".join(sorted(d["scopes"])),
                "first_start": min(d["start"]),
                "last_end": max(d["end"]),
            }
        )
    return out


def format_rows(rows: list[dict], per_visit_task: str = "calibrate") -> str:
    n_dv = next((r["quanta"] for r in rows if r["task"] == per_visit_task), 0)
    lines = [
        f"{'task':18s} {'quanta':>6s} {'CPU-s':>8s} {'per quantum':>11s} {'per det-visit':>13s} "
        f"{'span s':>7s} {'busy s':>7s} scope",
    ]
    for r in rows:
        per_dv = f"{r['cpu'] / n_dv:13.2f}" if n_dv else f"{'-':>13s}"
        lines.append(
            f"{r['task']:18s} {r['quanta']:6d} {r['cpu']:8.1f} {r['cpu_median']:11.2f} {per_dv} "
            f"{r['span']:7.1f} {r['busy']:7.1f} {r['scope']}"
        )
    total = sum(r["cpu"] for r in rows)
    per_dv = f"{total / n_dv:13.2f}" if n_dv else f"{'-':>13s}"
    lines.append(f"{'all':18s} {sum(r['quanta'] for r in rows):6d} {total:8.1f} {'':>11s} {per_dv}")
    if n_dv:
        lines.append(f"(per detector-visit: divided by the {n_dv} quanta of {per_visit_task!r})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo")
    ap.add_argument("run")
    ap.add_argument("--per-visit-task", default="calibrate", help="the task with one quantum per detector-visit")
    args = ap.parse_args(argv)
    rows = stage_rows(args.repo, args.run)
    if not rows:
        print(f"no finished quanta in run {args.run!r} of {args.repo}", file=sys.stderr)
        return 1
    print(format_rows(rows, args.per_visit_task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
