"""One call to build, store and execute a pipeline over a data selection.

A run is planned before anything is started: :func:`plan_run` opens the repository,
loads the pipeline with its overrides, and builds the quantum graph (which parses
``--where``, checks its names, and asks every task for its quanta, so a missing sky map or
an empty selection is reported here). Only then does ``procsky run`` start a cluster, and
:func:`execute_plan` stores the graph and runs it. :func:`run_pipeline` does both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from procsky.errors import ProcskyValueError, RepoError
from procsky.pipeline.executor import DaskExecutor, RunSummary, SyncExecutor
from procsky.pipeline.graph import QuantumGraph, build_graph, graph_tables
from procsky.pipeline.pipeline import Pipeline, load_pipeline, parse_overrides

__all__ = ["run_pipeline", "make_graph", "open_repo", "RunPlan", "plan_run", "execute_plan"]


def open_repo(repo):
    """A :class:`procsky.repo.Repo` from a Repo or a path."""
    if isinstance(repo, (str, os.PathLike)):
        from procsky.repo import Repo

        return Repo(repo)
    return repo


def _resolve_pipeline(pipeline, config, tasks) -> Pipeline:
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline, config)
    elif config:
        pipeline = pipeline.with_overrides(config if isinstance(config, Mapping) else parse_overrides(config))
    if tasks:
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        pipeline = pipeline.subset(tasks)
    return pipeline


def _stored_quanta(repo, run: str) -> int:
    t = graph_tables(repo)
    with repo.registry.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(t["quantum"]).where(t["quantum"].c.run == run)
        ).scalar_one()


def make_graph(
    repo,
    pipeline,
    *,
    where: str | None = None,
    output: str,
    config: Iterable[str] | dict | None = None,
    tasks: Sequence[str] | str | None = None,
    collections: Sequence[str] | None = None,
    save: bool = False,
) -> QuantumGraph:
    """Build (and optionally store) the quantum graph of a pipeline.

    Parameters
    ----------
    repo : Repo or path
    pipeline : Pipeline, packaged name or YAML path
    where : str, optional
        Data-ID expression.
    output : str
        Output run.
    config : list of ``"task.field=value"`` or dict, optional
    tasks : list of str or comma-separated str, optional
        Subset of task labels (their inputs must already exist).
    collections : list of str, optional
        Input runs searched after ``output`` (default: every run).
    save : bool
        Store it in the registry (merging with the states already stored for ``output``);
        otherwise states of already stored quanta are only read.

    Returns
    -------
    QuantumGraph
    """
    repo = open_repo(repo)
    pipe = _resolve_pipeline(pipeline, config, tasks)
    graph = build_graph(repo, pipe, where=where, run=output, collections=collections)
    if save:
        graph.save(repo)
    else:
        _load_states(repo, graph)
    return graph


def _load_states(repo, graph: QuantumGraph) -> None:
    t = graph_tables(repo)
    with repo.registry.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t["quantum"].c.id, t["quantum"].c.task, t["quantum"].c.data_id_key, t["quantum"].c.state).where(
                t["quantum"].c.run == graph.run
            )
        ).all()
    stored = {(r.task, r.data_id_key): r for r in rows}
    for q in graph:
        r = stored.get((q.task, q.key))
        if r is not None:
            q.id, q.state = r.id, r.state


@dataclass
class RunPlan:
    """A checked, not yet stored, quantum graph and what to say before running it.

    Attributes
    ----------
    repo : procsky.repo.Repo
    graph : QuantumGraph
        Built, states of already stored quanta loaded; not saved.
    warnings : list of str
        One-line notes for the user (e.g. calibrate without a reference catalogue).
    """

    repo: object
    graph: QuantumGraph
    warnings: list[str] = field(default_factory=list)

    @property
    def todo(self) -> int:
        """Quanta not finished yet (``pending``)."""
        return sum(1 for q in self.graph if q.state == "pending")


def plan_run(
    repo,
    pipeline,
    *,
    where: str | None = None,
    output: str,
    config: Iterable[str] | dict | None = None,
    tasks: Sequence[str] | str | None = None,
    collections: Sequence[str] | None = None,
    resume: bool | None = None,
) -> RunPlan:
    """Check everything a run needs and build its quantum graph, storing nothing.

    Parameters are those of :func:`run_pipeline`.

    Returns
    -------
    RunPlan

    Raises
    ------
    ProcskyError
        The repository does not open, the pipeline or an override is invalid, a ``--tasks``
        label is unknown, ``--where`` does not parse or names no known dimension, a task
        cannot form its quanta (e.g. the sky map is not registered), ``resume`` does not
        match the stored run, or there is nothing to run.
    """
    repo = open_repo(repo)
    pipe = _resolve_pipeline(pipeline, config, tasks)
    existing = _stored_quanta(repo, output)
    if resume is True and existing == 0:
        raise RepoError(
            f"--resume: run {output!r} has no quanta to resume; check the run name or drop --resume to start it."
        )
    if resume is False and existing:
        raise ProcskyValueError(
            f"run {output!r} already has {existing} quanta; pass --resume to continue it or choose a new --output run."
        )
    graph = build_graph(repo, pipe, where=where, run=output, collections=collections)
    if len(graph) == 0:
        raise ProcskyValueError(
            f"nothing to run for {pipe.name!r} in run {output!r}: {graph.explain_empty()}; "
            "check --where and --inputs, or ingest the input data first "
            "(`procsky query REPO DATASET_TYPE` lists what exists)."
        )
    if existing:
        _load_states(repo, graph)
    return RunPlan(repo, graph, _plan_warnings(repo, graph))


def _plan_warnings(repo, graph: QuantumGraph) -> list[str]:
    """Degraded modes known before running: calibrate quanta without reference stars."""
    import sys

    calibrate = sys.modules.get("procsky.tasks.calibrate")  # loaded if the pipeline uses it
    notes = []
    for pt in graph.pipeline:
        if calibrate is None or not issubclass(pt.task_class, calibrate.CalibrateTask):
            continue
        todo = [q for q in graph.quanta[pt.label] if q.state == "pending"]
        bare = [q for q in todo if not q.inputs.get("refcat")]
        if not bare:
            continue
        which = (
            f"no reference catalogue in {repo.root}"
            if len(bare) == len(todo)
            else f"no reference catalogue shard near {len(bare)} of its {len(todo)} quanta"
        )
        notes.append(
            f"{pt.label}: {which}; those detectors keep their header WCS and zero point "
            "(ingest one with `procsky ingest-refcat REPO FILES --name NAME`)."
        )
    return notes


def execute_plan(
    plan: RunPlan,
    *,
    client=None,
    retry_failed: bool = False,
    retries: int = 2,
    max_in_flight: int = 2000,
    progress: bool = False,
) -> RunSummary:
    """Store the graph of ``plan`` (merging with the run's stored states) and execute it.

    Parameters
    ----------
    plan : RunPlan
        From :func:`plan_run`.
    client : distributed.Client or None
        ``None`` runs synchronously in this process.
    retry_failed, retries, max_in_flight, progress
        As in :func:`run_pipeline`.

    Returns
    -------
    RunSummary
    """
    plan.graph.save(plan.repo)
    executor: SyncExecutor | DaskExecutor
    if client is None:
        executor = SyncExecutor(retries=retries, progress=progress)
    else:
        executor = DaskExecutor(client, max_in_flight=max_in_flight, retries=retries, progress=progress)
    return executor.execute(plan.repo, plan.graph, retry_failed=retry_failed)


def run_pipeline(
    repo,
    pipeline,
    *,
    where: str | None = None,
    output: str,
    client=None,
    config: Iterable[str] | dict | None = None,
    tasks: Sequence[str] | str | None = None,
    collections: Sequence[str] | None = None,
    resume: bool | None = None,
    retry_failed: bool = False,
    retries: int = 2,
    max_in_flight: int = 2000,
    progress: bool = False,
) -> RunSummary:
    """Build, store and execute a pipeline; resumable.

    Parameters
    ----------
    repo : Repo or path
    pipeline : Pipeline, packaged name (``"drp"``) or YAML path
    where : str, optional
        Data-ID expression selecting the data.
    output : str
        Output run. Rerunning on the same run skips ``succeeded`` (and ``no_work``) quanta.
    client : distributed.Client or None
        ``None`` runs synchronously in this process (notebooks, debugging).
    config : list of ``"task.field=value"`` or dict, optional
        Configuration overrides.
    tasks : list of str, optional
        Run only these tasks (inputs must exist in the repository).
    collections : list of str, optional
        Input runs searched after ``output``; default every run.
    resume : bool or None
        ``None``: continue ``output`` if it has quanta, else start it. ``True``: require a
        stored graph for ``output`` (guards against a mistyped run). ``False``: require
        that ``output`` has no quanta yet.
    retry_failed : bool
        Rerun ``failed`` quanta (and re-examine ``blocked`` ones).
    retries : int
        Extra attempts after a transient failure.
    max_in_flight : int
        Most quanta held by the scheduler at once.
    progress : bool
        tqdm bar per stage.

    Returns
    -------
    RunSummary
    """
    plan = plan_run(
        repo, pipeline, where=where, output=output, config=config, tasks=tasks, collections=collections, resume=resume
    )
    return execute_plan(
        plan, client=client, retry_failed=retry_failed, retries=retries, max_in_flight=max_in_flight, progress=progress
    )
