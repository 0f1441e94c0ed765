"""Running a quantum graph, stage by stage, on a ``distributed.Client`` or synchronously.

Design
------
* **Stage by stage.** All quanta of a task run before the next task starts, so a stage can
  be checked before the next begins (and a failed quantum's descendants are known to be
  ``blocked`` before they are submitted).
* **Bounded batches.** At most ``max_in_flight`` quanta are held by the scheduler at any
  time; as results arrive, more are submitted (a sliding window over the stage). Tasks that
  build dask graphs inside a quantum (``Task.parallel``) run under
  ``distributed.worker_client`` so the waiting quantum does not hold a worker thread, but
  only when the stage has fewer quanta than worker threads (see ``DaskExecutor._run_jobs``);
  otherwise the quanta fill the cluster and each runs in the thread that holds it.
* **Who registers.** The worker runs the task and writes the output files with
  ``repo.write_pending`` (complete, verified, unregistered); the *driver* registers them
  with ``repo.register`` in the same registry transaction that marks the quantum
  ``succeeded`` (and records its provenance). The driver is the single registry writer:
  SQLite, the default registry, serialises writers anyway, compute nodes need no database
  connection (often firewalled from PostgreSQL on HPC sites), and results arriving
  together are committed in one transaction. A crash between ``write_pending`` and the
  commit leaves only unregistered files: the quantum is still ``pending`` and is redone on
  resume; nothing registered is ever lost or half-made.
* **Outcomes.** ``succeeded``; ``no_work`` (the task raised :class:`NoWorkError`);
  ``failed`` (error class, message and traceback kept); ``blocked`` (an input's producer
  failed or was blocked). Transient failures (lost worker: ``KilledWorker`` /
  ``CommClosedError``; ``OSError`` from storage other than a malformed file;
  :class:`TransientError`) are retried ``retries`` times before the quantum is failed.
* **Why.** Every step that falls back to a degraded mode calls
  :func:`procsky.notes.note_degraded`; the notes made while a quantum runs (collected per
  quantum with a context variable, see :mod:`procsky.notes`) come back in
  ``QuantumResult.notes`` and are stored in the quantum's ``provenance`` JSON under
  ``"notes"``. :class:`RunSummary` groups the no_work/failed/blocked reasons and the notes
  of the run (:func:`procsky.pipeline.outcomes.group_outcomes`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
import traceback as tb_module
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from procsky._malloc import tune_malloc
from procsky._version import code_version
from procsky.errors import NoWorkError, ProcskyFileError, TransientError
from procsky.notes import collect_notes, note_degraded
from procsky.pipeline.graph import Quantum, QuantumGraph, graph_tables

__all__ = [
    "QuantumJob",
    "QuantumResult",
    "execute_quantum",
    "Executor",
    "SyncExecutor",
    "DaskExecutor",
    "RunSummary",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# What travels to the worker and back
# --------------------------------------------------------------------------------------


@dataclass
class QuantumJob:
    """Everything a worker needs to run one quantum (pickled to the worker).

    Attributes
    ----------
    quantum_id : int
    task : str
        Label.
    task_class : str
        ``"module:Class"``.
    config : dict
        Task configuration (validated again on the worker).
    config_hash : str
    data_id : dict
    inputs : dict of str -> list of (dataset_type, data_id, run)
    multiple : dict of str -> bool
        Whether each input is gathered (a list is passed to ``run``).
    outputs : dict of str -> (dataset_type, data_id)
    run : str
    repo_root : str
    attempt : int
        1 for the first try.
    """

    quantum_id: int
    task: str
    task_class: str
    config: dict
    config_hash: str
    data_id: dict
    inputs: dict[str, list[tuple[str, dict, str | None]]]
    multiple: dict[str, bool]
    outputs: dict[str, tuple[str, dict]]
    run: str
    repo_root: str
    attempt: int = 1
    parallel: bool = False
    missing: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class QuantumResult:
    """What a worker reports about one quantum.

    ``status`` is ``succeeded``, ``no_work``, ``failed`` or ``transient`` (retry).
    ``notes``: the degraded-mode notes the quantum made (:func:`procsky.notes.note_degraded`).
    """

    quantum_id: int
    status: str
    pendings: dict[str, Any] = field(default_factory=dict)
    error_class: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    provenance: dict = field(default_factory=dict)
    notes: list[dict] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def _versions_cached() -> tuple:
    return tuple(_versions_uncached().items())


def _versions() -> dict[str, str]:
    return dict(_versions_cached())


def _versions_uncached() -> dict[str, str]:
    import dask
    import numpy

    out = {
        "procsky": code_version(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "dask": dask.__version__,
    }
    try:
        import distributed

        out["distributed"] = distributed.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


class _RSSMonitor:
    """Resident-set-size high-water marks of this process, per quantum (bytes).

    One daemon thread per process samples the RSS every ``interval`` seconds and raises
    the peak of every open window (on Linux one ``pread`` of ``/proc/self/statm``, about
    5 us; psutil elsewhere: at 50 Hz psutil cost ~2 % of a quantum's CPU); a window is also sampled when it opens and
    closes, so quanta shorter than the interval still get a figure. The process-wide
    ``ru_maxrss`` is only a since-start maximum, so it cannot be attributed to one
    quantum. With several threads per worker a window covers the quanta running
    concurrently in that process.
    """

    _instance: _RSSMonitor | None = None
    _lock = threading.Lock()

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self._pid = os.getpid()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._statm: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
        self.interval = interval
        self._windows: dict[int, int] = {}
        self._wlock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="procsky-rss")
        self._thread.start()

    @classmethod
    def get(cls) -> _RSSMonitor:
        with cls._lock:
            if cls._instance is None or cls._instance._pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def _rss(self) -> int:
        try:
            if self._statm is not None:  # "size resident shared ..." in pages
                return int(os.pread(self._statm, 128, 0).split()[1]) * self._page
            return self._proc.memory_info().rss
        except Exception:  # pragma: no cover
            return 0

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            if not self._windows:
                continue
            rss = self._rss()
            with self._wlock:
                for k, v in self._windows.items():
                    if rss > v:
                        self._windows[k] = rss

    def open(self) -> int:
        token = id(object()) ^ threading.get_ident() ^ time.perf_counter_ns()
        with self._wlock:
            self._windows[token] = self._rss()
        return token

    def close(self, token: int) -> int:
        rss = self._rss()
        with self._wlock:
            return max(self._windows.pop(token, 0), rss)


class _Overlap:
    """Which quanta of this process ran with no other quantum beside them.

    A quantum's CPU is best counted over the whole process: zarr encodes and decodes chunks
    in its own threads, and a quantum's dask graph may run in a thread pool, none of which
    the quantum's thread clock sees (on the demo's coadds that thread clock missed ~30 % of
    the work). The process clock is the quantum's own only while no other quantum runs in
    the process (one thread per worker, the default, or the synchronous executor), so each
    quantum is told whether another one started or was running while it ran.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, bool] = {}  # token -> overlapped

    def open(self) -> int:
        token = id(object()) ^ threading.get_ident() ^ time.perf_counter_ns()
        with self._lock:
            alone = not self._running
            for k in self._running:
                self._running[k] = True
            self._running[token] = not alone
        return token

    def close(self, token: int) -> bool:
        """True if the quantum ran alone in this process."""
        with self._lock:
            return not self._running.pop(token, True)


_OVERLAP = _Overlap()


def _process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_REPOS: dict[str, Any] = {}
_REPO_LOCK = threading.Lock()


def _open_repo(root: str):
    """One Repo per process and root (workers run many quanta)."""
    with _REPO_LOCK:
        repo = _REPOS.get(root)
        if repo is None:
            from procsky.repo import Repo

            repo = Repo(root)
            _REPOS[root] = repo
        return repo


_TASKS: dict[tuple[str, str], Any] = {}


def _make_task(job: QuantumJob):
    key = (job.task_class, job.config_hash)
    task = _TASKS.get(key)
    if task is None:
        from procsky.tasks.base import get_task_class

        task = get_task_class(job.task_class)(job.config)
        _TASKS[key] = task
    return task


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, ProcskyFileError):  # malformed/truncated file: retrying won't help
        return False
    if isinstance(exc, OSError):
        return True
    name = type(exc).__name__
    return name in ("KilledWorker", "CommClosedError", "StreamClosedError")


def _error(qid: int, status: str, exc: BaseException, where: str, prov: dict) -> QuantumResult:
    message = f"{where}: {exc}" if where else str(exc)
    return QuantumResult(
        qid,
        status,
        error_class=type(exc).__name__,
        error_message=message,
        traceback="".join(tb_module.format_exception(exc)),
        provenance=prov,
    )


def execute_quantum(job: QuantumJob, repo=None) -> QuantumResult:
    """Run one quantum: read inputs, ``task.run``, write outputs as pending datasets.

    Parameters
    ----------
    job : QuantumJob
    repo : procsky.repo.Repo, optional
        Repository; opened from ``job.repo_root`` when not given (on workers).

    Returns
    -------
    QuantumResult
        Never raises for task errors: they are captured in the result. Only failures of
        the worker itself (killed, lost connection) surface as exceptions on the future.
    """
    tune_malloc()  # undo dask's MALLOC_TRIM_THRESHOLD_ page-fault cost (procsky/_malloc.py)
    start = time.time()
    overlap = _OVERLAP.open()
    cpu0, pcpu0 = time.thread_time(), _process_cpu()
    prov: dict = {
        "quantum_id": job.quantum_id,
        "task": job.task,
        "task_class": job.task_class,
        "config_hash": job.config_hash,
        "code_version": code_version(),
        "run": job.run,
        "data_id": job.data_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "attempt": job.attempt,
        "start": start,
    }
    if job.missing:
        prov["missing_inputs"] = job.missing
    try:
        from distributed import get_worker

        prov["worker"] = get_worker().address
    except Exception:
        prov["worker"] = None
    monitor = _RSSMonitor.get()
    token = monitor.open()
    try:
        with collect_notes() as notes:
            if job.missing:
                n = sum(len(v) for v in job.missing.values())
                note_degraded(
                    "inputs_missing",
                    f"ran without {n} input(s) of {sorted(job.missing)} whose quanta failed (tolerated)",
                    missing=job.missing,
                )
            result = _execute(job, repo, prov)
    finally:
        peak = monitor.close(token)
    end = time.time()
    thread_cpu, process_cpu = time.thread_time() - cpu0, _process_cpu() - pcpu0
    if _OVERLAP.close(overlap):  # alone in the process: its helper threads count too
        prov.update(cpu_seconds=process_cpu, cpu_scope="process", thread_cpu_seconds=thread_cpu)
    else:
        prov.update(cpu_seconds=thread_cpu, cpu_scope="thread")
    prov.update(end=end, peak_memory=peak, versions=_versions())
    if notes:
        prov["notes"] = notes
    result.provenance = prov
    result.notes = notes
    return result


def _execute(job: QuantumJob, repo, prov: dict) -> QuantumResult:
    qid = job.quantum_id
    try:
        if repo is None and (job.inputs or job.outputs):
            repo = _open_repo(job.repo_root)
        task = _make_task(job)
    except Exception as exc:
        return _error(qid, "transient" if _is_transient(exc) else "failed", exc, "setting up the quantum", prov)
    # Read the inputs.
    kwargs: dict[str, Any] = {}
    data_ids: dict[str, Any] = {}
    input_ids: dict[str, list[str]] = {}
    for name, items in job.inputs.items():
        objs, ids, dids = [], [], []
        for dataset_type, data_id, run in items:
            try:
                ref = repo.find(dataset_type, data_id, run=run)
                if ref is None:
                    continue  # an upstream quantum had no work: that input does not exist
                objs.append(repo.get(dataset_type, data_id, run=ref.run))
            except Exception as exc:
                return _error(
                    qid,
                    "transient" if _is_transient(exc) else "failed",
                    exc,
                    f"reading input {name!r} ({dataset_type} {data_id} in run {run!r})",
                    prov,
                )
            ids.append(str(ref.id))
            dids.append(data_id)
        input_ids[name] = ids
        if job.multiple[name]:
            kwargs[name], data_ids[name] = objs, dids
        else:
            kwargs[name] = objs[0] if objs else None
            data_ids[name] = dids[0] if dids else None
    prov["inputs"] = input_ids
    missing = [n for n, items in job.inputs.items() if items and not input_ids[n]]
    if missing:
        no_work = NoWorkError(f"inputs {missing} were not produced (their quanta had no work)")
        return _error(qid, "no_work", no_work, "", prov)
    if _accepts(task.run, "data_ids"):
        kwargs["data_ids"] = data_ids
    if _accepts(task.run, "data_id"):
        kwargs["data_id"] = dict(job.data_id)  # the quantum's own data ID (e.g. which patch)
    # Run the task.
    try:
        # A parallel task spreads its chunks over the cluster (from a worker, through
        # worker_client; elsewhere on the caller's scheduler); the lazy arrays of a serial
        # one are computed in this thread: the cluster already runs one quantum per thread.
        from procsky import _dask

        with _dask.task_scheduler(job.parallel):
            outputs = _write(repo, job, task.run(**kwargs))
    except NoWorkError as exc:
        return _error(qid, "no_work", exc, "", prov)
    except _WriteError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc  # raised "from" the write's error
        return _error(qid, "transient" if _is_transient(cause) else "failed", cause, str(exc), prov)
    except Exception as exc:
        return _error(
            qid,
            "transient" if isinstance(exc, TransientError) else "failed",
            exc,
            f"task {job.task!r} on {job.data_id}",
            prov,
        )
    return QuantumResult(qid, "succeeded", pendings=outputs)


class _WriteError(Exception):
    pass


def _write(repo, job: QuantumJob, outputs) -> dict:
    from procsky.errors import ProcskyTypeError

    if not isinstance(outputs, dict):
        raise ProcskyTypeError(
            f"task {job.task!r} returned {type(outputs).__name__}; run() must return a dict "
            f"with keys {sorted(job.outputs)}."
        )
    missing = set(job.outputs) - set(outputs)
    extra = set(outputs) - set(job.outputs)
    if missing or extra:
        raise ProcskyTypeError(
            f"task {job.task!r} returned outputs {sorted(outputs)}; declared {sorted(job.outputs)} "
            f"(missing {sorted(missing)}, undeclared {sorted(extra)})."
        )
    pendings = {}
    for name, (dataset_type, data_id) in job.outputs.items():
        try:
            pendings[name] = repo.write_pending(outputs[name], dataset_type, data_id, job.run)
        except NoWorkError:
            # A lazy output (a difference image) runs its algorithm while it is written; a
            # "nothing to do" found then is the quantum's outcome, not a write failure.
            repo.discard(list(pendings.values()))
            raise
        except Exception as exc:
            repo.discard(list(pendings.values()))
            raise _WriteError(f"writing output {name!r} ({dataset_type} {data_id})") from exc
    return pendings


def _accepts(func: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return name in params


# --------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """Counts of quanta per task and state after a run, the wall time (s), and why.

    ``outcomes``: per task label, ``{"reasons": [...], "degraded": [...]}`` as made by
    :func:`procsky.pipeline.outcomes.group_outcomes`: the failed/blocked/no_work quanta
    grouped by reason and the degraded-mode notes grouped by code, each with a count, the
    first data IDs and an example message. ``str()`` shows at most ``max_groups`` groups
    per task (``procsky report`` lists them all).
    """

    run: str
    counts: dict[str, dict[str, int]]
    wall_seconds: float
    outcomes: dict[str, dict] = field(default_factory=dict)
    max_groups: int = 5

    @property
    def ok(self) -> bool:
        return all(
            c.get("failed", 0) == 0 and c.get("blocked", 0) == 0 and c.get("pending", 0) == 0
            for c in self.counts.values()
        )

    def __str__(self) -> str:
        from procsky.pipeline.outcomes import format_outcomes

        lines = [f"run {self.run!r} ({self.wall_seconds:.1f} s):"]
        for label, c in self.counts.items():
            parts = ", ".join(f"{k} {v}" for k, v in c.items() if v)
            lines.append(f"  {label}: {parts or 'no quanta'}")
            lines += format_outcomes(self.outcomes.get(label) or {}, indent="    ", max_groups=self.max_groups)
        if any(self.outcomes.values()):
            lines.append(f"  (every reason and note: procsky report REPO --run {self.run})")
        return "\n".join(lines)


class Executor:
    """Base class: stage loop, blocking, commits. Subclasses provide the scheduling.

    Parameters
    ----------
    retries : int
        Extra attempts for transient failures.
    progress : bool
        Show a tqdm progress bar per stage.
    """

    def __init__(self, *, retries: int = 2, progress: bool = False):
        self.retries = int(retries)
        self.progress = progress

    # --- to implement --------------------------------------------------------------------
    def _run_jobs(self, jobs: list[QuantumJob], on_results: Callable[[list], None]) -> None:
        raise NotImplementedError

    # --- driver loop ---------------------------------------------------------------------
    def execute(
        self, repo, graph: QuantumGraph, *, retry_failed: bool = False, stages: list[str] | None = None
    ) -> RunSummary:
        """Run every quantum of ``graph`` that is not finished, stage by stage.

        Parameters
        ----------
        repo : procsky.repo.Repo
        graph : QuantumGraph
            Stored (``graph.save(repo)`` done, so quanta have ids and states).
        retry_failed : bool
            Rerun ``failed`` quanta and re-evaluate ``blocked`` ones.
        stages : list of str, optional
            Task labels to run (default all).

        Returns
        -------
        RunSummary
        """
        t0 = time.time()
        self._repo, self._graph = repo, graph
        self._tables = graph_tables(repo)
        root = str(repo.root)
        redo = {"pending"} | ({"failed", "blocked"} if retry_failed else set())
        pt_by_label = {pt.label: pt for pt in graph.pipeline}
        for label in graph.pipeline.labels:
            if stages is not None and label not in stages:
                continue
            pt = pt_by_label[label]
            todo = [q for q in graph.quanta[label] if q.state in redo]
            blocked, nowork, jobs = [], [], []
            for q in todo:
                bad, missing = self._blocking_producers(q, pt.task_class)
                if bad:
                    blocked.append((q, bad[0]))
                    continue
                job = self._job(q, pt, root, missing)
                empty = [
                    n
                    for n, c in pt.task_class.inputs.items()
                    if not c.optional and q.inputs.get(n) and not job.inputs.get(n)
                ]
                if empty:
                    nowork.append((q, f"no {', '.join(empty)} input: every quantum producing them had no work"))
                    continue
                jobs.append(job)
            if blocked:
                self._mark_blocked(blocked)
            if nowork:
                self._mark_no_work(nowork)
            total = len(graph.quanta[label])
            bar = self._bar(label, total, total - len(jobs))
            self._jobs_by_id = {j.quantum_id: j for j in jobs}
            self._quanta_by_id = {q.id: q for q in todo}

            def on_results(results, _bar=bar):
                self._commit(results)
                if _bar is not None:
                    _bar.update(len(results))

            try:
                if jobs:
                    self._run_jobs(jobs, on_results)
            finally:
                if bar is not None:
                    bar.close()
        return RunSummary(graph.run, graph.counts(), time.time() - t0, self._outcomes(graph))

    def _outcomes(self, graph: QuantumGraph) -> dict[str, dict]:
        """Reasons and degraded-mode notes of ``graph``'s quanta, grouped per task (from the
        registry, so quanta finished in earlier sessions of a resumed run count too)."""
        from procsky.pipeline.outcomes import group_outcomes

        try:
            t = self._tables["quantum"]
            ids = {q.id for q in graph if q.id is not None}
            with self._repo.registry.engine.connect() as conn:
                rows = (
                    conn.execute(
                        sa.select(
                            t.c.id, t.c.task, t.c.data_id, t.c.state, t.c.error_class, t.c.error_message, t.c.provenance
                        )
                        .where(
                            t.c.run == graph.run,
                            sa.or_(t.c.state.in_(("failed", "blocked", "no_work")), t.c.provenance.like('%"notes"%')),
                        )
                        .order_by(t.c.stage, t.c.id)
                    )
                    .mappings()
                    .all()
                )
            return group_outcomes([dict(r) for r in rows if r["id"] in ids])
        except Exception as exc:  # pragma: no cover - the summary must not fail a finished run
            log.warning("could not group the reasons of run %r: %s", graph.run, exc)
            return {}

    def _bar(self, label: str, total: int, done: int):
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=done, desc=label, unit="quantum", leave=True)

    def _blocking_producers(self, q: Quantum, klass) -> tuple[list[Quantum], dict[str, list]]:
        """``(blocking producers, tolerated missing datasets)`` of ``q``'s inputs.

        ``q`` can run when the first is empty. A pending producer always blocks. A failed
        or blocked one blocks unless its dataset belongs to a ``tolerate_missing`` input
        that still has another dataset whose producer did not fail; such datasets are
        returned per input name (their DatasetKeys), to be left out of the quantum.
        """
        bad, missing = [], {}
        for name, lst in q.inputs.items():
            conn = klass.inputs.get(name)
            tolerant = conn is not None and conn.tolerate_missing
            failed, alive = [], 0
            for d in lst:
                p = self._graph.producer_of.get((d.dataset_type, d.key))
                if p is None or p is q:
                    alive += 1
                elif p.state == "pending" or (p.state in ("failed", "blocked") and not tolerant):
                    bad.append(p)
                elif p.state in ("failed", "blocked"):
                    failed.append((p, d))
                elif p.state != "no_work":
                    alive += 1
            if failed and alive == 0:
                bad.extend(p for p, _ in failed)
            elif failed:
                missing[name] = [d for _, d in failed]
        return bad, missing

    def _job(self, q: Quantum, pt, root: str, missing: dict[str, list] | None = None) -> QuantumJob:
        """The job of ``q``; ``missing``: tolerated missing inputs (see :meth:`_blocking_producers`)."""
        assert q.id is not None, "quanta get their ids when the graph is saved, before it runs"
        klass = pt.task_class
        missing = missing or {}
        skip = {(d.dataset_type, d.key) for lst in missing.values() for d in lst}
        inputs = {}
        for name, lst in q.inputs.items():
            items = []
            for d in lst:
                producer = self._graph.producer_of.get((d.dataset_type, d.key))
                if (producer is not None and producer.state == "no_work") or (d.dataset_type, d.key) in skip:
                    continue
                items.append((d.dataset_type, d.data_id, self._graph.run if producer else d.run))
            inputs[name] = items
        return QuantumJob(
            quantum_id=q.id,
            task=q.task,
            task_class=pt.class_path,
            config=pt.config.model_dump(),
            config_hash=pt.config_hash,
            data_id=q.data_id,
            inputs=inputs,
            multiple={n: c.multiple for n, c in klass.inputs.items()},
            outputs={n: (d.dataset_type, d.data_id) for n, d in q.outputs.items()},
            run=self._graph.run,
            repo_root=root,
            parallel=bool(getattr(klass, "parallel", False)),
            missing={n: [dict(d.data_id) for d in lst] for n, lst in missing.items()},
        )

    def _retry(self, job: QuantumJob) -> QuantumJob | None:
        """The next attempt of ``job`` or ``None`` when retries are exhausted."""
        if job.attempt > self.retries:
            return None
        nxt = QuantumJob(**{**job.__dict__, "attempt": job.attempt + 1})
        self._jobs_by_id[job.quantum_id] = nxt
        return nxt

    def _mark_blocked(self, pairs: list[tuple[Quantum, Quantum]]) -> None:
        t = self._tables["quantum"]
        with self._repo.registry.transaction() as conn:
            for q, cause in pairs:
                msg = (
                    f"input quantum {cause.task} {cause.data_id} is {cause.state}; "
                    f"rerun with --retry-failed once it is fixed"
                )
                conn.execute(
                    t.update()
                    .where(t.c.id == q.id)
                    .values(state="blocked", error_class="Blocked", error_message=msg, traceback=None)
                )
                q.state = "blocked"
                q.info = {"error_message": msg}

    def _mark_no_work(self, pairs: list[tuple[Quantum, str]]) -> None:
        t = self._tables["quantum"]
        with self._repo.registry.transaction() as conn:
            for q, reason in pairs:
                conn.execute(
                    t.update()
                    .where(t.c.id == q.id)
                    .values(state="no_work", error_class="NoWorkError", error_message=reason, traceback=None)
                )
                q.state = "no_work"

    def _commit(self, results: list[QuantumResult]) -> None:
        """Register outputs and record states; one transaction for the lot if possible."""
        if not results:
            return
        try:
            with self._repo.registry.transaction() as conn:
                updates = [self._record(conn, r) for r in results]
                t = self._tables["quantum"]
                conn.execute(t.update().where(t.c.id == sa.bindparam("qid")), updates)
        except Exception as exc:
            if len(results) == 1:
                r = results[0]
                err = QuantumResult(
                    r.quantum_id,
                    "failed",
                    error_class=type(exc).__name__,
                    error_message=f"registering the outputs: {exc}",
                    traceback="".join(tb_module.format_exception(exc)),
                    provenance=r.provenance,
                )
                with self._repo.registry.transaction() as conn:
                    t = self._tables["quantum"]
                    conn.execute(t.update().where(t.c.id == sa.bindparam("qid")), [self._record(conn, err)])
                self._quanta_by_id[r.quantum_id].state = "failed"
                return
            for r in results:  # find the culprit: commit one by one
                self._commit([r])
            return
        for r in results:
            self._quanta_by_id[r.quantum_id].state = r.status

    def _record(self, conn, r: QuantumResult) -> dict:
        """Register ``r``'s outputs in ``conn``; return the quantum row update."""
        t = self._tables
        prov = dict(r.provenance)
        values = dict(
            qid=r.quantum_id,
            state=r.status,
            attempts=prov.get("attempt", 1),
            error_class=r.error_class,
            error_message=r.error_message,
            traceback=r.traceback,
            host=prov.get("host"),
            start_time=prov.get("start"),
            end_time=prov.get("end"),
            cpu_seconds=prov.get("cpu_seconds"),
            peak_memory=prov.get("peak_memory"),
            code_version=prov.get("code_version"),
            provenance=json.dumps(prov, default=str),
        )
        if r.status == "succeeded" and r.pendings:
            names = list(r.pendings)
            refs = self._repo.register([r.pendings[n] for n in names], provenance=prov, connection=conn)
            for name, ref in zip(names, refs):
                conn.execute(
                    t["output"]
                    .update()
                    .where(t["output"].c.quantum_id == r.quantum_id, t["output"].c.name == name)
                    .values(dataset_id=str(ref.id))
                )
        return values


class SyncExecutor(Executor):
    """Runs quanta one after the other in this process (notebooks, debugging, tests).

    Exactly the same quantum function as :class:`DaskExecutor`, without pickling.
    """

    def _run_jobs(self, jobs, on_results):
        for job in jobs:
            while True:
                result = execute_quantum(job, repo=self._repo)
                if result.status == "transient":
                    nxt = self._retry(job)
                    if nxt is not None:
                        job = nxt
                        continue
                    result.status = "failed"
                on_results([result])
                break


async def _flush_loop():
    """No-op coroutine: running it on the client loop runs every callback queued before."""
    return None


class DaskExecutor(Executor):
    """Runs quanta on a ``distributed.Client`` in a bounded sliding window.

    Parameters
    ----------
    client : distributed.Client
    max_in_flight : int
        Most quanta held by the scheduler at once.
    retries : int
        Extra attempts for transient failures (lost worker, flaky I/O).
    progress : bool
        tqdm bar per stage.
    """

    def __init__(self, client, *, max_in_flight: int = 2000, retries: int = 2, progress: bool = False):
        super().__init__(retries=retries, progress=progress)
        if max_in_flight < 1:
            from procsky.errors import ProcskyValueError

            raise ProcskyValueError(f"max_in_flight must be >= 1, got {max_in_flight}.")
        self.client = client
        self.max_in_flight = int(max_in_flight)
        self.max_seen_in_flight = 0
        self._token = uuid.uuid4().hex[:8]

    def _submit(self, jobs: list[QuantumJob]) -> list:
        """Submit jobs in one ``client.map`` call (one message to the scheduler)."""
        if not jobs:
            return []
        keys = [f"quantum-{j.task}-{j.quantum_id}-a{j.attempt}-{self._token}" for j in jobs]
        futs = self.client.map(execute_quantum, jobs, key=keys, pure=False, retries=0)
        for fut, job in zip(futs, jobs):
            self._job_of_key[fut.key] = job
        return futs

    def _gather(self, futures) -> dict:
        """Results of finished futures in one round trip (per-future ``result()`` would
        cost one scheduler round trip each)."""
        if not futures:
            return {}
        try:
            values = self.client.gather(futures, errors="raise")
            return {f.key: v for f, v in zip(futures, values)}
        except Exception:
            out = {}
            for f in futures:
                try:
                    out[f.key] = f.result()
                except Exception as exc:
                    out[f.key] = exc
            return out

    def _threads(self) -> int:
        try:
            return int(sum(self.client.nthreads().values()))
        except Exception:  # pragma: no cover - a client that cannot tell
            return 0

    def _run_jobs(self, jobs, on_results):
        from distributed import as_completed

        # Nested parallelism only pays when a stage has fewer quanta than worker threads
        # (one big patch): otherwise the quanta already fill the cluster, and a quantum
        # that secedes to run its graph on the cluster queues behind every other one's
        # (each quantum's wall time becomes the whole stage's) and ships its arrays
        # between workers. Then ``parallel`` tasks run in the thread that holds them.
        threads = self._threads()  # 0: no worker yet (an adaptive cluster still scaling up)
        if len(jobs) >= threads:
            for job in jobs:
                job.parallel = False
        self._job_of_key: dict[str, QuantumJob] = {}
        queue = list(reversed(jobs))  # pop() from the end keeps graph order
        first: list[QuantumJob] = []
        while queue and len(first) < self.max_in_flight:
            first.append(queue.pop())
        initial = self._submit(first)
        in_flight = len(initial)
        self.max_seen_in_flight = max(self.max_seen_in_flight, in_flight)
        ac = as_completed(initial, with_results=False)
        try:
            for batch in ac.batches():
                results, resubmit = [], []
                fetched = self._gather([f for f in batch if f.status == "finished"])
                for fut in batch:
                    job = self._job_of_key.pop(fut.key)
                    qid = job.quantum_id
                    in_flight -= 1
                    if fut.key in fetched:
                        result = fetched[fut.key]
                        if isinstance(result, BaseException):  # pragma: no cover - lost while fetching
                            result = _error(qid, "transient", result, "fetching the result", {"attempt": job.attempt})
                    else:
                        exc = fut.exception()
                        status = "transient" if _is_transient(exc) else "failed"
                        result = _error(
                            qid, status, exc, "running on the cluster", {"attempt": job.attempt, "task": job.task}
                        )
                    fut.release()
                    if result.status == "transient":
                        nxt = self._retry(job)
                        if nxt is not None:
                            log.warning(
                                "quantum %s %s: transient failure (%s: %s); attempt %d of %d",
                                job.task,
                                job.data_id,
                                result.error_class,
                                result.error_message,
                                nxt.attempt,
                                self.retries + 1,
                            )
                            resubmit.append(nxt)
                            continue
                        result.status = "failed"
                    results.append(result)
                on_results(results)
                more = list(resubmit)
                while queue and in_flight + len(more) < self.max_in_flight:
                    more.append(queue.pop())
                if more:
                    # Release messages for this batch are queued on the client's event loop;
                    # let them go out before the new tasks so the scheduler never holds more
                    # than max_in_flight quanta.
                    self.client.sync(_flush_loop)
                new = self._submit(more)
                if new:
                    in_flight += len(new)
                    self.max_seen_in_flight = max(self.max_seen_in_flight, in_flight)
                    ac.update(new)
        finally:
            # Interrupted (Ctrl-C, error in the driver): do not leave quanta running on a
            # shared scheduler; they are still pending in the registry and rerun on resume.
            left = [f for f in ac.futures] if hasattr(ac, "futures") else []
            if left:
                try:
                    self.client.cancel(left)
                except Exception:  # pragma: no cover - client already closed
                    pass
