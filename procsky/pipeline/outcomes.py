"""Why quanta did not succeed, and which degraded modes the ones that ran fell back to.

:func:`group_outcomes` groups the failed/blocked/no_work quanta of a run by their message
with numbers, data IDs and paths blanked out (:func:`normalise_reason`), and the notes of
:func:`procsky.notes.note_degraded` by code; :func:`format_outcomes` renders one task's
groups as text. Used by the end-of-run :class:`~procsky.pipeline.executor.RunSummary` and by
:mod:`procsky.pipeline.report`; it imports nothing else of the pipeline, so the executor
and the report both depend on it and not on each other.
"""

from __future__ import annotations

import json
import re

__all__ = ["group_outcomes", "normalise_reason", "format_outcomes", "format_data_id", "N_EXAMPLES"]

#: Data IDs kept per group (the first ones, in stage and quantum order).
N_EXAMPLES = 3
_REASON_STATES = ("failed", "blocked", "no_work")
_SUBS = [
    (re.compile(r"\{[^{}]*\}"), "{...}"),  # data IDs and other dicts (innermost first)
    (re.compile(r"\{[^{}]*\}"), "{...}"),
    (re.compile(r"(?<![\w/])(?:[A-Za-z]:)?(?:/[^\s:'\",;()]+){2,}"), "<path>"),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<id>"),
    (re.compile(r"\b[0-9a-f]{16,}\b"), "<id>"),
    (re.compile(r"(?<![\w.])\d+(?:x\d+)+(?!\w)"), "NxN"),  # image sizes 512x512
    (re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w])"), "N"),
    (re.compile(r"(?<![\w.])[-+]?(?:nan|inf)(?!\w)"), "N"),
    (re.compile(r"\[N(?:, N)*\]"), "[N, ...]"),
]


def normalise_reason(message: str | None) -> str:
    """``message`` with data IDs, paths, ids and numbers blanked (the grouping key).

    ``"no calexp overlaps patch {'tract': 0, 'patch': 5}"`` and ``"... {'tract': 0, 'patch': 6}"``
    both become ``"no calexp overlaps patch {...}"``; ``"only 3 rows (< min_rows=5)"``
    becomes ``"only N rows (< min_rows=N)"``.
    """
    text = (message or "").strip()
    for pattern, sub in _SUBS:
        text = pattern.sub(sub, text)
    return text


def _data_id(value) -> dict:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {"data_id": value}
    return dict(value or {})


def _notes_of(provenance) -> list[dict]:
    if not provenance:
        return []
    if isinstance(provenance, str):
        if '"notes"' not in provenance:
            return []
        try:
            provenance = json.loads(provenance)
        except ValueError:
            return []
    notes = provenance.get("notes") if isinstance(provenance, dict) else None
    return [n for n in notes if isinstance(n, dict) and n.get("code")] if isinstance(notes, list) else []


def group_outcomes(rows) -> dict[str, dict]:
    """Group quanta by why they did not succeed and by the degraded modes they noted.

    Parameters
    ----------
    rows : iterable of dict
        Quantum rows (``task``, ``data_id`` (JSON text or dict), ``state``, ``error_class``,
        ``error_message``, ``provenance`` (JSON text or dict)), in the order examples are
        wanted (stage, then quantum id).

    Returns
    -------
    dict
        Per task label with any group, ``{"reasons": [...], "degraded": [...]}``:

        * ``reasons``: ``{state, error_class, reason, count, data_ids, example}`` per
          (state, error class, normalised message), most frequent first;
        * ``degraded``: ``{code, severity, count, data_ids, example}`` per note code,
          ``count`` being the number of quanta that made the note, ``severity`` the most
          severe one seen; most frequent first.

        ``data_ids`` holds the first :data:`N_EXAMPLES` data IDs, ``example`` the first
        message.
    """
    from procsky.notes import SEVERITIES

    reasons: dict[str, dict[tuple, dict]] = {}
    degraded: dict[str, dict[str, dict]] = {}
    for r in rows:
        task = r["task"]
        did = None
        if r.get("state") in _REASON_STATES:
            did = _data_id(r.get("data_id"))
            key = (r["state"], r.get("error_class") or "", normalise_reason(r.get("error_message")))
            g = reasons.setdefault(task, {}).setdefault(
                key,
                {
                    "state": key[0],
                    "error_class": r.get("error_class"),
                    "reason": key[2],
                    "count": 0,
                    "data_ids": [],
                    "example": r.get("error_message"),
                },
            )
            g["count"] += 1
            if len(g["data_ids"]) < N_EXAMPLES:
                g["data_ids"].append(did)
        seen = set()
        for n in _notes_of(r.get("provenance")):
            code = str(n["code"])
            if code in seen:
                continue
            seen.add(code)
            did = did if did is not None else _data_id(r.get("data_id"))
            sev = n.get("severity") if n.get("severity") in SEVERITIES else "warning"
            g = degraded.setdefault(task, {}).setdefault(
                code, {"code": code, "severity": sev, "count": 0, "data_ids": [], "example": n.get("message")}
            )
            g["count"] += 1
            if SEVERITIES.index(sev) < SEVERITIES.index(g["severity"]):
                g["severity"] = sev
            if len(g["data_ids"]) < N_EXAMPLES:
                g["data_ids"].append(did)
    out: dict[str, dict] = {}
    order = {s: i for i, s in enumerate(_REASON_STATES)}
    for task in list(reasons) + [t for t in degraded if t not in reasons]:
        rs = list(reasons.get(task, {}).values())
        rs.sort(key=lambda g: (order[g["state"]], -g["count"]))  # stable: first seen first
        ds = sorted(degraded.get(task, {}).values(), key=lambda g: (SEVERITIES.index(g["severity"]), -g["count"]))
        out[task] = {"reasons": rs, "degraded": ds}
    return out


def format_data_id(did: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in did.items()) or "{}"


def _clip(text: str | None, n: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def format_outcomes(outcome: dict, *, indent: str = "  ", max_groups: int | None = None, width: int = 160) -> list[str]:
    """Text lines of one task's :func:`group_outcomes` entry, one line per group.

    ``no_work 2 x NoWorkError: only 3 rows (< min_rows=5)  [visit=1 detector=0; ...]``,
    ``degraded 3 x few_psf_stars (warning): ...``; at most ``max_groups`` lines, then
    ``... and N more``.
    """
    lines = []
    groups = list(outcome.get("reasons", [])) + list(outcome.get("degraded", []))
    for g in groups:
        ids = "; ".join(format_data_id(d) for d in g["data_ids"]) + ("; ..." if g["count"] > len(g["data_ids"]) else "")
        if "code" in g:
            head = f"degraded {g['count']} x {g['code']} ({g['severity']})"
        else:
            head = f"{g['state']} {g['count']} x {g['error_class']}"
        lines.append(f"{indent}{head}: {_clip(g['example'], width)}  [{ids}]")
    if max_groups is not None and len(lines) > max_groups:
        lines = lines[:max_groups] + [f"{indent}... and {len(lines) - max_groups} more"]
    return lines
