"""Degraded-mode notes: a step that falls back says so, and the run summary shows it.

A task step that cannot do its best and falls back to something weaker (the header WCS
kept for want of reference stars, a Gaussian PSF for want of PSF stars, ...) calls
:func:`note_degraded` once. Inside a quantum the note is collected for that quantum: the
executor (:mod:`procsky.pipeline.executor`) opens a collector around the quantum with
:func:`collect_notes`, puts the notes in ``QuantumResult.notes`` and stores them in the
quantum's provenance (key ``"notes"``); ``procsky run`` and ``procsky report`` group them
by code. Outside a quantum (a notebook calling ``calibrate_exposure``) the note is only
logged (``warning`` notes as warnings, ``info`` notes at INFO level).

The collector is a :class:`contextvars.ContextVar`, so it follows the thread that runs the
quantum (a dask worker thread or the caller's thread with ``SyncExecutor``). Notes made in
other threads or dask tasks the quantum spawns are not collected (they are logged).

A note is a dict: ``code`` (stable snake_case; tests and dashboards match on it),
``message`` (a sentence with the numbers), ``severity`` (``"warning"``: a result is less
good than it should be; ``"info"``: a documented, expected simplification) and
``details`` (JSON-able values). This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["SEVERITIES", "note_degraded", "collect_notes"]

log = logging.getLogger(__name__)

#: Allowed severities, most severe first.
SEVERITIES = ("warning", "info")

_CODE = re.compile(r"^[a-z][a-z0-9_]*$")
_NOTES: contextvars.ContextVar[list | None] = contextvars.ContextVar("procsky_notes", default=None)


def _jsonable(v: Any) -> Any:
    """Plain JSON values (numpy scalars and arrays included; non-finite floats as str)."""
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalar or array
        return _jsonable(v.tolist())
    return str(v)


def note_degraded(code: str, message: str, *, severity: str = "warning", **details) -> dict:
    """Record that this quantum fell back to a degraded mode.

    Parameters
    ----------
    code : str
        Stable snake_case identifier (``"header_wcs_kept"``), grouped on in reports.
    message : str
        Human sentence with the figures (``"only 3 reference matches (< 6): header WCS kept"``).
    severity : {"warning", "info"}
    **details
        JSON-able values kept with the note (numpy scalars are converted).

    Returns
    -------
    dict
        The note. Inside a quantum it is collected for the quantum; outside one it is
        logged (as a warning when ``severity="warning"``).
    """
    if not _CODE.match(code):
        raise ValueError(f"note code {code!r} must be snake_case (lower-case letters, digits, '_')")
    if severity not in SEVERITIES:
        raise ValueError(f"note severity {severity!r} must be one of {SEVERITIES}")
    note = {"code": code, "message": str(message), "severity": severity, "details": _jsonable(details)}
    notes = _NOTES.get()
    if notes is None:
        log.log(logging.WARNING if severity == "warning" else logging.INFO, "degraded (%s): %s", code, message)
    else:
        notes.append(note)
        log.debug("degraded (%s): %s", code, message)
    return note


@contextlib.contextmanager
def collect_notes() -> Iterator[list[dict]]:
    """Collect the :func:`note_degraded` calls made in this context (this thread).

    Yields
    ------
    list of dict
        Filled as notes are made; nested collectors each keep their own.
    """
    notes: list[dict] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)
