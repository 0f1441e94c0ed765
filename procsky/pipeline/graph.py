"""The quantum graph: every unit of work of a pipeline over a data selection.

Built from the registry and a ``--where`` expression:

* quanta of a task whose inputs already exist come from the registry (``repo.query``);
* quanta of later tasks come from the *predicted* outputs of earlier ones, grouped by
  :meth:`procsky.tasks.base.Task.quanta` (which a task overrides to map dimensions,
  e.g. visit/detector -> tract/patch);
* the expression is applied with SQL's three-valued logic on each data ID: a data ID is
  dropped only when the expression is *false* on it; an expression that cannot be decided
  (``tract=42`` on a {visit, detector} data ID) keeps it, and once the whole graph is built
  such undecided quanta that feed no kept downstream quantum are pruned.

The graph is stored in the registry (tables ``pipeline_run``, ``pipeline_quantum``,
``pipeline_quantum_input``, ``pipeline_quantum_output`` created on
``repo.registry.engine`` if missing) so that a run can be resumed and reported on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from procsky.errors import ProcskyTypeError, ProcskyValueError, RepoError
from procsky.pipeline.pipeline import Pipeline
from procsky.tasks.base import DatasetKey, QuantumSpec, data_id_key

__all__ = [
    "STATES",
    "TERMINAL_STATES",
    "Where",
    "Quantum",
    "QuantumGraph",
    "build_graph",
    "graph_tables",
]

#: Every state a quantum can be in; ``pending`` until it has run.
STATES = ("pending", "succeeded", "failed", "no_work", "blocked")
TERMINAL_STATES = ("succeeded", "failed", "no_work", "blocked")


class Where:
    """A ``--where`` data-ID expression evaluated with three-valued logic.

    Parameters
    ----------
    text : str or None
        Expression (``"tract=42 AND band IN ('g','r')"``); ``None``/empty matches all.
    """

    def __init__(self, text: str | None):
        self.text = (text or "").strip() or None
        self.expr = None
        if self.text:
            from procsky.repo.query import parse_expression

            self.expr = parse_expression(self.text)

    def decide(self, data_id: Mapping[str, Any]) -> bool | None:
        """``True``/``False`` when decidable on ``data_id``, ``None`` when a name is missing."""
        if self.expr is None:
            return True
        try:
            from procsky.repo.query import _eval  # three-valued evaluation
        except ImportError:  # pragma: no cover - older parser
            missing = self.expr.identifiers - set(data_id)
            return None if missing else self.expr.evaluate(data_id)
        return _eval(self.expr.ast, data_id)

    def __call__(self, data_id: Mapping[str, Any]) -> bool:
        """Keep ``data_id`` unless the expression is definitely false on it."""
        return self.decide(data_id) is not False


@dataclass
class Quantum:
    """One unit of work.

    Attributes
    ----------
    task : str
        Task label.
    data_id : dict
        Quantum data ID (plus implied values).
    key : str
        Canonical data-ID text on the task dimensions (unique per task and run).
    inputs : dict of str -> list of DatasetKey
    outputs : dict of str -> DatasetKey
    id : int or None
        Registry id once stored.
    state : str
        One of :data:`STATES`.
    """

    task: str
    data_id: dict
    key: str
    inputs: dict[str, list[DatasetKey]]
    outputs: dict[str, DatasetKey]
    id: int | None = None
    state: str = "pending"
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.task}{self.data_id}"


def _metadata() -> tuple[sa.MetaData, dict[str, sa.Table]]:
    md = sa.MetaData()
    run = sa.Table(
        "pipeline_run",
        md,
        sa.Column("run", sa.String(512), primary_key=True),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("where_text", sa.Text),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    quantum = sa.Table(
        "pipeline_quantum",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run", sa.String(512), nullable=False, index=True),
        sa.Column("task", sa.String(256), nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("data_id_key", sa.Text, nullable=False),
        sa.Column("data_id", sa.Text, nullable=False),
        sa.Column("task_class", sa.Text, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("error_class", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("host", sa.Text),
        sa.Column("start_time", sa.Float),
        sa.Column("end_time", sa.Float),
        sa.Column("cpu_seconds", sa.Float),
        sa.Column("peak_memory", sa.BigInteger),
        sa.Column("code_version", sa.Text),
        sa.Column("provenance", sa.Text),
        sa.UniqueConstraint("run", "task", "data_id_key", name="uq_pipeline_quantum"),
    )
    qin = sa.Table(
        "pipeline_quantum_input",
        md,
        sa.Column("quantum_id", sa.Integer, nullable=False, index=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("dataset_type", sa.String(256), nullable=False),
        sa.Column("data_id", sa.Text, nullable=False),
        sa.Column("run", sa.String(512)),
        sa.Column("dataset_id", sa.String(64)),
        sa.Column("producer_id", sa.Integer),
    )
    qout = sa.Table(
        "pipeline_quantum_output",
        md,
        sa.Column("quantum_id", sa.Integer, nullable=False, index=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("dataset_type", sa.String(256), nullable=False),
        sa.Column("data_id_key", sa.Text, nullable=False),
        sa.Column("data_id", sa.Text, nullable=False),
        sa.Column("dataset_id", sa.String(64)),
    )
    return md, {"run": run, "quantum": quantum, "input": qin, "output": qout}


_MD, _TABLES = _metadata()


_CREATED: set[str] = set()


def graph_tables(repo=None) -> dict[str, sa.Table]:
    """The pipeline tables, created in ``repo``'s registry if given and missing."""
    if repo is not None:
        url = str(repo.registry.engine.url)
        if url not in _CREATED:
            if not all(sa.inspect(repo.registry.engine).has_table(t.name) for t in _TABLES.values()):
                with repo.registry.transaction() as conn:
                    _MD.create_all(conn, checkfirst=True)
            _CREATED.add(url)
    return _TABLES


class QuantumGraph:
    """All quanta of a pipeline run, by task, with producer links.

    Parameters
    ----------
    pipeline : Pipeline
    run : str
        Output run.
    where : str or None
        The data-ID expression it was built from.
    quanta : dict of str -> list of Quantum
        By task label, in pipeline order.
    """

    def __init__(self, pipeline: Pipeline, run: str, where: str | None, quanta: dict[str, list[Quantum]]):
        self.pipeline = pipeline
        self.run = run
        self.where = where
        self.quanta = {label: list(quanta.get(label, [])) for label in pipeline.labels}
        self._index()

    def _index(self) -> None:
        self.by_key: dict[tuple[str, str], Quantum] = {}
        self.producer_of: dict[tuple[str, str], Quantum] = {}
        for label, qs in self.quanta.items():
            for q in qs:
                self.by_key[(label, q.key)] = q
                for out in q.outputs.values():
                    self.producer_of[(out.dataset_type, out.key)] = q

    # -- navigation ---------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(v) for v in self.quanta.values())

    def __iter__(self):
        for qs in self.quanta.values():
            yield from qs

    def producers(self, q: Quantum) -> list[Quantum]:
        """Quanta of this graph producing inputs of ``q``."""
        out = []
        for lst in q.inputs.values():
            for ds in lst:
                p = self.producer_of.get((ds.dataset_type, ds.key))
                if p is not None and p is not q:
                    out.append(p)
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of quanta per task and state."""
        out = {}
        for label, qs in self.quanta.items():
            c = {s: 0 for s in STATES}
            for q in qs:
                c[q.state] = c.get(q.state, 0) + 1
            out[label] = c
        return out

    def explain_empty(self) -> str:
        """Why a task has no quanta: the input dataset types that had no candidates."""
        lines = []
        for pt in self.pipeline:
            if self.quanta[pt.label]:
                continue
            wanted = [c.dataset_type for c in pt.task_class.inputs.values() if not c.optional]
            lines.append(
                f"task {pt.label!r} has no quanta: no datasets of {wanted} match --where {self.where!r}"
                if self.where
                else f"task {pt.label!r} has no quanta: no datasets of {wanted} found"
            )
        return "; ".join(lines)

    # -- export -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able description: pipeline, run, where, and every quantum with its edges."""
        ids = {id(q): i for i, q in enumerate(self)}
        quanta = []
        for q in self:
            quanta.append(
                {
                    "index": ids[id(q)],
                    "id": q.id,
                    "task": q.task,
                    "data_id": q.data_id,
                    "state": q.state,
                    "inputs": {
                        n: [
                            {
                                "dataset_type": d.dataset_type,
                                "data_id": d.data_id,
                                "run": d.run,
                                "dataset_id": None if d.id is None else str(d.id),
                            }
                            for d in lst
                        ]
                        for n, lst in q.inputs.items()
                    },
                    "outputs": {
                        n: {"dataset_type": d.dataset_type, "data_id": d.data_id} for n, d in q.outputs.items()
                    },
                    "depends_on": sorted({ids[id(p)] for p in self.producers(q)}),
                }
            )
        return {
            "run": self.run,
            "where": self.where,
            "pipeline": self.pipeline.to_dict(),
            "counts": self.counts(),
            "quanta": quanta,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_dot(self) -> str:
        """Graphviz text: one node per quantum (coloured by state), edges producer -> consumer."""
        colours = {
            "pending": "white",
            "succeeded": "palegreen",
            "failed": "salmon",
            "no_work": "lightgrey",
            "blocked": "orange",
        }
        lines = ["digraph quanta {", "  rankdir=LR;", "  node [shape=box, style=filled, fontsize=10];"]
        ids = {id(q): i for i, q in enumerate(self)}
        for label, qs in self.quanta.items():
            lines.append(f'  subgraph "cluster_{label}" {{ label="{label}";')
            for q in qs:
                did = ", ".join(f"{k}={v}" for k, v in q.data_id.items())
                lines.append(
                    f'    q{ids[id(q)]} [label="{label}\\n{_dot_escape(did)}", '
                    f"fillcolor={colours.get(q.state, 'white')}];"
                )
            lines.append("  }")
        for q in self:
            for p in sorted({ids[id(p)] for p in self.producers(q)}):
                lines.append(f"  q{p} -> q{ids[id(q)]};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # -- storage ------------------------------------------------------------------------
    def save(self, repo) -> None:
        """Store new quanta in the registry and load the states of known ones.

        Quanta already stored for this run (same task and data ID) keep their state and
        id; their inputs are refreshed unless they succeeded. A stored quantum whose task
        configuration differs raises :class:`ProcskyValueError` (use a new output run).
        """
        t = graph_tables(repo)
        now = time.time()
        pipe_text = json.dumps(self.pipeline.to_dict(), sort_keys=True)
        with repo.registry.transaction() as conn:
            existing_run = conn.execute(sa.select(t["run"].c.run).where(t["run"].c.run == self.run)).first()
            if existing_run is None:
                conn.execute(
                    t["run"]
                    .insert()
                    .values(run=self.run, pipeline=pipe_text, where_text=self.where, created=now, updated=now)
                )
            else:
                conn.execute(
                    t["run"]
                    .update()
                    .where(t["run"].c.run == self.run)
                    .values(pipeline=pipe_text, where_text=self.where, updated=now)
                )
            rows = conn.execute(
                sa.select(
                    t["quantum"].c.id,
                    t["quantum"].c.task,
                    t["quantum"].c.data_id_key,
                    t["quantum"].c.state,
                    t["quantum"].c.config_hash,
                ).where(t["quantum"].c.run == self.run)
            ).all()
            stored = {(r.task, r.data_id_key): r for r in rows}
            hashes = {pt.label: pt.config_hash for pt in self.pipeline}
            for (label, _key), r in stored.items():
                if label in hashes and r.config_hash != hashes[label] and r.state == "succeeded":
                    raise ProcskyValueError(
                        f"run {self.run!r} already holds quanta of task {label!r} made with "
                        f"configuration hash {r.config_hash}, but the configuration now hashes "
                        f"to {hashes[label]}; write to a new --output run (or drop the -c "
                        "overrides that changed it)."
                    )
            new_rows = []
            stage_of = {label: i for i, label in enumerate(self.pipeline.labels)}
            classes = {pt.label: pt.class_path for pt in self.pipeline}
            stale = []
            for q in self:
                r = stored.get((q.task, q.key))
                if r is not None:
                    q.id, q.state = r.id, r.state
                    if r.config_hash != hashes[q.task]:  # not succeeded (checked above)
                        stale.append({"qid": r.id, "config_hash": hashes[q.task]})
                else:
                    new_rows.append(
                        {
                            "run": self.run,
                            "task": q.task,
                            "stage": stage_of[q.task],
                            "data_id_key": q.key,
                            "data_id": json.dumps(q.data_id),
                            "task_class": classes[q.task],
                            "config_hash": hashes[q.task],
                            "state": "pending",
                            "attempts": 0,
                        }
                    )
            if stale:
                conn.execute(t["quantum"].update().where(t["quantum"].c.id == sa.bindparam("qid")), stale)
            if new_rows:
                conn.execute(t["quantum"].insert(), new_rows)
                ids = conn.execute(
                    sa.select(t["quantum"].c.id, t["quantum"].c.task, t["quantum"].c.data_id_key).where(
                        t["quantum"].c.run == self.run
                    )
                ).all()
                idmap = {(r.task, r.data_id_key): r.id for r in ids}
                for q in self:
                    if q.id is None:
                        q.id = idmap[(q.task, q.key)]
            # Edges: (re)write for every quantum that has not succeeded.
            redo = [q.id for q in self if q.state != "succeeded"]
            for i in range(0, len(redo), 500):
                chunk = redo[i : i + 500]
                conn.execute(t["input"].delete().where(t["input"].c.quantum_id.in_(chunk)))
                conn.execute(t["output"].delete().where(t["output"].c.quantum_id.in_(chunk)))
            ins, outs = [], []
            for q in self:
                if q.state == "succeeded":
                    continue
                for name, lst in q.inputs.items():
                    for d in lst:
                        p = self.producer_of.get((d.dataset_type, d.key))
                        ins.append(
                            {
                                "quantum_id": q.id,
                                "name": name,
                                "dataset_type": d.dataset_type,
                                "data_id": json.dumps(d.data_id),
                                "run": d.run,
                                "dataset_id": None if d.id is None else str(d.id),
                                "producer_id": None if p is None else p.id,
                            }
                        )
                for name, d in q.outputs.items():
                    outs.append(
                        {
                            "quantum_id": q.id,
                            "name": name,
                            "dataset_type": d.dataset_type,
                            "data_id_key": d.key,
                            "data_id": json.dumps(d.data_id),
                            "dataset_id": None,
                        }
                    )
            if ins:
                conn.execute(t["input"].insert(), ins)
            if outs:
                conn.execute(t["output"].insert(), outs)


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


def _ref_key(ref) -> DatasetKey:
    return DatasetKey(
        ref.dataset_type if isinstance(ref.dataset_type, str) else ref.dataset_type.name,
        dict(ref.data_id),
        run=ref.run,
        id=ref.id,
    )


def _existing(repo, dataset_type: str, collections: list[str] | None, where: Where, run: str) -> list[DatasetKey]:
    """Existing datasets of a type, first collection wins per data ID, filtered by ``where``.

    With ``collections=None`` every run is searched, the output ``run`` first.
    """
    if repo is None:
        return []
    dtype = repo.registry.get_dataset_type(dataset_type)  # cached by the registry
    if dtype is None:
        return []  # a dataset type never declared has no datasets
    # Let the registry apply ``where`` when it can decide it for this dataset type (its
    # dimensions plus the values their records imply, e.g. the band of a visit): that
    # uses the registry's indexes and implied values. Otherwise filter here (3-valued).
    sql_where = None
    if where.expr is not None:
        from procsky.repo.dimensions import IMPLIED

        dims = set(dtype.dimensions)
        known = dims | {i for d in dims for i in IMPLIED.get(d, ())}
        if where.expr.identifiers <= known:
            sql_where = where.expr
    refs = repo.query(dataset_type, where=sql_where, run=collections)
    order = {r: i for i, r in enumerate(collections or [run])}
    refs = sorted(refs, key=lambda r: order.get(r.run, len(order)))
    seen: dict[str, DatasetKey] = {}
    for ref in refs:
        k = _ref_key(ref)
        if k.key not in seen and where(k.data_id):
            seen[k.key] = k
    return [seen[k] for k in sorted(seen)]


def _check_where_names(flt: Where, pipeline: Pipeline) -> None:
    """Refuse a ``--where`` naming no dimension the pipeline knows (``vist=3``).

    Such a name is absent from every data ID, so the expression would be undecidable on
    all of them and select far more (or less) than the user meant, silently.
    """
    if flt.expr is None:
        return
    from procsky.repo.query import STANDARD_DIMENSION_TYPES, check_identifiers

    known = set(STANDARD_DIMENSION_TYPES)
    for pt in pipeline:
        klass = pt.task_class
        known.update(klass.dimensions)
        for conn in list(klass.inputs.values()) + list(klass.outputs.values()):
            known.update(conn.dimensions)
    check_identifiers(flt.expr, known, label="--where", scope="this pipeline")


def build_graph(
    repo, pipeline: Pipeline, *, where: str | None = None, run: str, collections: Iterable[str] | None = None
) -> QuantumGraph:
    """Build the quantum graph of ``pipeline`` over the data selected by ``where``.

    Parameters
    ----------
    repo : procsky.repo.Repo
        Repository (registry queried for existing inputs).
    pipeline : Pipeline
        Tasks in order (a subset runs only those tasks, taking inputs from the registry).
    where : str, optional
        Data-ID expression.
    run : str
        Output run; its datasets are searched first for inputs.
    collections : iterable of str, optional
        Input runs searched after ``run``; default: every run.

    Returns
    -------
    QuantumGraph
        Not yet stored (see :meth:`QuantumGraph.save`).
    """
    flt = Where(where)
    _check_where_names(flt, pipeline)
    colls = None
    if collections is not None:
        known = set(repo.runs()) if repo is not None else set()
        colls = ([run] if run in known else []) + [c for c in collections if c != run]
    produced: dict[str, list[DatasetKey]] = {}
    quanta: dict[str, list[Quantum]] = {}
    for pt in pipeline:
        task = pt.make_task()
        klass = pt.task_class
        candidates: dict[str, list[DatasetKey]] = {}
        for name, conn in klass.inputs.items():
            if conn.dataset_type in produced:
                candidates[name] = [d for d in produced[conn.dataset_type] if flt(d.data_id)]
            else:
                candidates[name] = _existing(repo, conn.dataset_type, colls, flt, run)
        specs = task.quanta(repo, candidates, flt)
        qs: list[Quantum] = []
        seen_keys: set[str] = set()
        for spec in specs:
            if not isinstance(spec, QuantumSpec):
                raise ProcskyTypeError(f"task {pt.label!r}: quanta() must return QuantumSpec objects, got {spec!r}.")
            if not flt(spec.data_id):
                continue
            qkey = data_id_key({d: spec.data_id[d] for d in klass.dimensions if d in spec.data_id})
            if qkey in seen_keys:
                raise ProcskyValueError(f"task {pt.label!r}: two quanta with data ID {qkey}.")
            seen_keys.add(qkey)
            outputs = {}
            for name, conn in klass.outputs.items():
                missing = [d for d in conn.dimensions if d not in spec.data_id]
                if missing:
                    raise ProcskyValueError(
                        f"task {pt.label!r}: output {name!r} ({conn.dataset_type}) needs dimensions "
                        f"{missing} that quantum {spec.data_id} does not give; add them to the task "
                        "dimensions or make every input agree on them."
                    )
                outputs[name] = DatasetKey(
                    conn.dataset_type, {d: spec.data_id[d] for d in conn.dimensions}, run=run, producer=(pt.label, qkey)
                )
            qs.append(
                Quantum(pt.label, dict(spec.data_id), qkey, {n: list(v) for n, v in spec.inputs.items()}, outputs)
            )
        quanta[pt.label] = qs
        for q in qs:
            for d in q.outputs.values():
                produced.setdefault(d.dataset_type, []).append(d)
    graph = QuantumGraph(pipeline, run, where, quanta)
    if flt.expr is not None:
        _prune_undecided(graph, flt)
    return graph


def _prune_undecided(graph: QuantumGraph, flt: Where) -> None:
    """Drop quanta on which ``where`` is undecided and whose outputs nobody kept consumes.

    E.g. with ``where="tract=42"`` every {visit, detector} quantum is undecided; those whose
    outputs feed no tract-42 quantum downstream are not needed.
    """
    consumed_types = {c.dataset_type for pt in graph.pipeline for c in pt.task_class.inputs.values()}
    labels = graph.pipeline.labels
    for label in reversed(labels):
        used: set[tuple[str, str]] = set()
        for later in labels[labels.index(label) + 1 :]:
            for q in graph.quanta[later]:
                for lst in q.inputs.values():
                    used.update((d.dataset_type, d.key) for d in lst)
        kept = []
        for q in graph.quanta[label]:
            feeds_later = all(d.dataset_type in consumed_types for d in q.outputs.values()) and q.outputs
            if (
                feeds_later
                and flt.decide(q.data_id) is None
                and not any((d.dataset_type, d.key) in used for d in q.outputs.values())
            ):
                continue
            kept.append(q)
        graph.quanta[label] = kept
    graph._index()


def load_states(repo, run: str) -> list[dict]:
    """Every stored quantum row of ``run`` as a dict (for reports)."""
    t = graph_tables(repo)
    with repo.registry.engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(t["quantum"])
                .where(t["quantum"].c.run == run)
                .order_by(t["quantum"].c.stage, t["quantum"].c.id)
            )
            .mappings()
            .all()
        )
    if not rows:
        raise RepoError(
            f"run {run!r} has no pipeline quanta recorded; run `procsky run ... "
            f"--output {run}` first, or check the run name."
        )
    return [dict(r) for r in rows]
