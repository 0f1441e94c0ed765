"""Run reports: quantum states per task, failures, timings, memory and metrics.

:func:`run_report` returns a plain dict whose layout is the stable JSON schema documented
in ``docs/report-json.md`` (``"schema": "procsky.report/1"``); :func:`format_table` and
:func:`write_html` render it.

Why quanta did not succeed, and which degraded modes the ones that ran fell back to, are
grouped per task by :func:`group_outcomes` (also used by the end-of-run
:class:`~procsky.pipeline.executor.RunSummary`): failed/blocked/no_work messages by their
text with numbers, data IDs and paths blanked out (:func:`normalise_reason`), the notes of
:func:`procsky.notes.note_degraded` by code.
"""

from __future__ import annotations

import html
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from procsky.pipeline.graph import STATES, graph_tables, load_states
from procsky.pipeline.outcomes import format_data_id, format_outcomes, group_outcomes, normalise_reason

__all__ = [
    "REPORT_SCHEMA",
    "run_report",
    "format_table",
    "write_html",
    "group_outcomes",
    "normalise_reason",
    "format_outcomes",
]

REPORT_SCHEMA = "procsky.report/1"


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "count": len(values),
        "sum": float(sum(values)),
        "mean": float(statistics.fmean(values)),
        "median": float(statistics.median(values)),
        "max": float(max(values)),
    }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _metrics(repo, run: str) -> list[dict]:
    """Contents of the ``metrics`` datasets of ``run`` (empty until metrics exist)."""
    try:
        refs = repo.query("metrics", run=run)
    except Exception:
        return []
    out = []
    for ref in sorted(refs, key=lambda r: json.dumps(r.data_id, sort_keys=True)):
        try:
            values = repo.get(ref)
        except Exception as exc:  # report the problem rather than failing the report
            values = {"error": f"{type(exc).__name__}: {exc}"}
        out.append(
            {
                "data_id": dict(ref.data_id),
                "dataset_id": str(ref.id),
                "values": json.loads(json.dumps(values, default=_json_default)),
            }
        )
    return out


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def run_report(repo, run: str, *, max_failures: int = 1000) -> dict:
    """Summarise a pipeline run.

    Parameters
    ----------
    repo : procsky.repo.Repo or path
    run : str
        Output run of ``procsky run``.
    max_failures : int
        At most this many failed/blocked quanta are listed (``failures_truncated`` tells).

    Returns
    -------
    dict
        See ``docs/report-json.md``.
    """
    from procsky.pipeline.run import open_repo

    repo = open_repo(repo)
    rows = load_states(repo, run)
    t = graph_tables(repo)
    with repo.registry.engine.connect() as conn:
        meta = conn.execute(sa.select(t["run"]).where(t["run"].c.run == run)).mappings().first()
    pipeline = json.loads(meta["pipeline"]) if meta else {}
    order = [x["label"] for x in pipeline.get("tasks", [])]
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    labels = [x for x in order if x in by_task] + sorted(set(by_task) - set(order))
    outcomes = group_outcomes(rows)
    tasks, failures = [], []
    totals = {"quanta": len(rows), **{s: 0 for s in STATES}}
    for label in labels:
        qs = by_task[label]
        counts = {s: 0 for s in STATES}
        for q in qs:
            counts[q["state"]] = counts.get(q["state"], 0) + 1
            totals[q["state"]] = totals.get(q["state"], 0) + 1
        ran = [q for q in qs if q["start_time"] is not None and q["end_time"] is not None]
        starts = [q["start_time"] for q in ran]
        ends = [q["end_time"] for q in ran]
        tasks.append(
            {
                "task": label,
                "task_class": qs[0]["task_class"],
                "config_hash": qs[0]["config_hash"],
                "quanta": len(qs),
                "counts": counts,
                "wall_seconds": _stats([q["end_time"] - q["start_time"] for q in ran]),
                "cpu_seconds": _stats([q["cpu_seconds"] for q in ran]),
                "peak_memory_bytes": _stats([q["peak_memory"] for q in ran]),
                "attempts_max": max((q["attempts"] or 0) for q in qs),
                "first_start": _iso(min(starts)) if starts else None,
                "last_end": _iso(max(ends)) if ends else None,
            }
        )
        # present only when non-empty (docs/report-json.md)
        for key in ("reasons", "degraded"):
            if outcomes.get(label, {}).get(key):
                tasks[-1][key] = outcomes[label][key]
        for q in qs:
            if q["state"] in ("failed", "blocked"):
                failures.append(
                    {
                        "task": label,
                        "quantum_id": q["id"],
                        "data_id": json.loads(q["data_id"]),
                        "state": q["state"],
                        "error_class": q["error_class"],
                        "error_message": q["error_message"],
                        "attempts": q["attempts"],
                        "host": q["host"],
                        "traceback": q["traceback"],
                    }
                )
    return {
        "schema": REPORT_SCHEMA,
        "run": run,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "repo": str(repo.root),
        "where": meta["where_text"] if meta else None,
        "pipeline": pipeline,
        "totals": totals,
        "tasks": tasks,
        "failures": failures[:max_failures],
        "failures_truncated": len(failures) > max_failures,
        "metrics": _metrics(repo, run),
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _fmt_s(st: dict | None, key: str = "mean") -> str:
    return "-" if st is None else f"{st[key]:.2f}"


def format_table(report: dict) -> str:
    """Plain-text rendering of :func:`run_report` (states, timings, memory, failures)."""
    head = [
        "task",
        "quanta",
        "succeeded",
        "failed",
        "no_work",
        "blocked",
        "pending",
        "wall mean s",
        "wall max s",
        "cpu mean s",
        "peak mem max",
    ]
    rows = []
    for t in report["tasks"]:
        c = t["counts"]
        rows.append(
            [
                t["task"],
                str(t["quanta"]),
                str(c["succeeded"]),
                str(c["failed"]),
                str(c["no_work"]),
                str(c["blocked"]),
                str(c["pending"]),
                _fmt_s(t["wall_seconds"]),
                _fmt_s(t["wall_seconds"], "max"),
                _fmt_s(t["cpu_seconds"]),
                _fmt_bytes(t["peak_memory_bytes"]["max"] if t["peak_memory_bytes"] else None),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [
        f"run {report['run']!r}  where: {report['where'] or '(all)'}",
        "  ".join(h.ljust(w) for h, w in zip(head, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    tot = report["totals"]
    lines.append(f"total: {tot['quanta']} quanta, " + ", ".join(f"{s} {tot[s]}" for s in STATES))
    why = [t for t in report["tasks"] if t.get("reasons") or t.get("degraded")]
    if why:
        lines.append("")
        lines.append("why (quanta grouped by reason and by degraded mode; count, example, first data IDs):")
        for t in why:
            lines.append(f"  {t['task']}:")
            lines += format_outcomes(t, indent="    ", width=300)
    if report["failures"]:
        lines.append("")
        lines.append("failures:")
        for f in report["failures"]:
            lines.append(f"  [{f['state']}] {f['task']} {f['data_id']}: {f['error_class']}: {f['error_message']}")
    if report["metrics"]:
        lines.append("")
        lines.append("metrics:")
        for m in report["metrics"]:
            lines.append(f"  {m['data_id']}: {json.dumps(m['values'], sort_keys=True)[:200]}")
    return "\n".join(lines)


def write_html(report: dict, path: str | Path) -> Path:
    """Write a self-contained HTML page of :func:`run_report`; returns the path."""
    e = html.escape
    colours = {"succeeded": "#cfc", "failed": "#fbb", "no_work": "#ddd", "blocked": "#fd9", "pending": "#fff"}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>procsky run {e(report['run'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:3px 8px;text-align:right}th{background:#eee}"
        "td.l{text-align:left}pre{background:#f6f6f6;padding:6px;overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>procsky run <code>{e(report['run'])}</code></h1>",
        f"<p>repository <code>{e(report['repo'])}</code>; where <code>{e(report['where'] or '(all)')}"
        f"</code>; generated {e(report['generated'])}</p>",
        "<h2>Quanta per task</h2><table><tr><th>task</th><th>quanta</th>",
    ]
    parts += [f"<th style='background:{colours[s]}'>{s}</th>" for s in STATES]
    parts.append("<th>wall mean s</th><th>wall max s</th><th>CPU mean s</th><th>peak memory</th></tr>")
    for t in report["tasks"]:
        parts.append(f"<tr><td class='l'>{e(t['task'])}</td><td>{t['quanta']}</td>")
        parts += [f"<td>{t['counts'][s]}</td>" for s in STATES]
        pm = t["peak_memory_bytes"]["max"] if t["peak_memory_bytes"] else None
        parts.append(
            f"<td>{_fmt_s(t['wall_seconds'])}</td><td>{_fmt_s(t['wall_seconds'], 'max')}</td>"
            f"<td>{_fmt_s(t['cpu_seconds'])}</td><td>{_fmt_bytes(pm)}</td></tr>"
        )
    parts.append("</table>")
    why = [t for t in report["tasks"] if t.get("reasons") or t.get("degraded")]
    if why:
        parts.append(
            "<h2>Why: reasons and degraded modes</h2>"
            "<table><tr><th>task</th><th>outcome</th><th>count</th><th>reason / code</th>"
            "<th>example</th><th>first data IDs</th></tr>"
        )
        sev_colours = {"warning": "#fe9", "info": "#def"}
        for t in why:
            for g in t.get("reasons", []) + t.get("degraded", []):
                ids = "<br>".join(e(format_data_id(d)) for d in g["data_ids"])
                if "code" in g:
                    colour = sev_colours.get(g["severity"], "#fff")
                    kind = f"<td class='l' style='background:{colour}'>degraded ({e(g['severity'])})</td>"
                    what = f"<code>{e(g['code'])}</code>"
                else:
                    kind = f"<td class='l' style='background:{colours[g['state']]}'>{e(g['state'])}</td>"
                    what = f"{e(str(g['error_class']))}: {e(g['reason'])}"
                parts.append(
                    f"<tr><td class='l'>{e(t['task'])}</td>{kind}<td>{g['count']}</td>"
                    f"<td class='l'>{what}</td><td class='l'>{e(str(g['example']))}</td>"
                    f"<td class='l'>{ids}</td></tr>"
                )
        parts.append("</table>")
    if report["failures"]:
        parts.append(f"<h2>Failures ({len(report['failures'])})</h2>")
        for f in report["failures"]:
            parts.append(
                f"<h3 style='background:{colours[f['state']]}'>[{f['state']}] {e(f['task'])} "
                f"{e(json.dumps(f['data_id']))}</h3><p><b>{e(str(f['error_class']))}</b>: "
                f"{e(str(f['error_message']))}</p>"
            )
            if f.get("traceback"):
                parts.append(f"<details><summary>traceback</summary><pre>{e(f['traceback'])}</pre></details>")
    if report["metrics"]:
        parts.append("<h2>Metrics</h2><table><tr><th>data ID</th><th>values</th></tr>")
        for m in report["metrics"]:
            parts.append(
                f"<tr><td class='l'>{e(json.dumps(m['data_id']))}</td><td class='l'><pre>"
                f"{e(json.dumps(m['values'], indent=1, sort_keys=True))}</pre></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
