"""The task interface: what a pipeline step declares and how the executor calls it.

A task is a class that declares

* ``dimensions``: the dimensions of one unit of work (a *quantum*), e.g.
  ``("instrument", "visit", "detector")`` for calibration or
  ``("skymap", "tract", "patch", "band")`` for coaddition;
* ``inputs`` and ``outputs``: mappings from the keyword name used by :meth:`Task.run` to a
  :class:`Input` / :class:`Output` that names the dataset type and its dimensions. An input
  is either *per quantum* (exactly one dataset whose data ID matches the quantum, e.g. one
  ``raw`` per {visit, detector}) or *gathered* (``multiple=True``: every dataset whose data
  ID matches the quantum on the shared dimensions, e.g. all ``warp`` of a patch and band);
* ``Config``: a frozen pydantic model; its hash goes into the provenance of every quantum;
* :meth:`Task.run`: pure computation on in-memory inputs returning a dict of outputs.

Tasks do no I/O and open no cluster: the executor reads the inputs, calls ``run`` and
writes the outputs. A task that needs to map dimensions (visit/detector -> tract/patch)
overrides :meth:`Task.quanta`.

Tasks are found by name. Packages declare theirs as entry points of the group
``procsky.tasks`` (``calibrate = "procsky.tasks.calibrate:CalibrateTask"`` in
``pyproject.toml``), so a user's package adds a task by installing it; a module is imported
only when one of its tasks is asked for, and a module that fails to import raises. A class
defined elsewhere (a notebook, a test) registers with ``@register_task("name")``, and any
class can be named as ``"package.module:Class"`` in a pipeline YAML.

Configurations are frozen pydantic models and are never changed in place:
:func:`build_config` validates a mapping and :func:`override_config` returns a new
configuration with fields changed at any nesting depth (``coadd.memory_budget``).

This module sits below :mod:`procsky.pipeline`: it imports nothing from it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pydantic

from procsky.errors import ProcskyError, ProcskyKeyError, ProcskyTypeError, ProcskyValueError

__all__ = [
    "Input",
    "Output",
    "TaskConfig",
    "Task",
    "DatasetKey",
    "QuantumSpec",
    "register_task",
    "get_task_class",
    "registered_tasks",
    "data_id_key",
    "default_quanta",
    "complete_data_id",
    "build_config",
    "override_config",
    "ENTRY_POINT_GROUP",
]

M = TypeVar("M", bound=pydantic.BaseModel)


def data_id_key(data_id: Mapping[str, Any]) -> str:
    """Canonical text of a data ID (sorted keys, JSON), usable as a dictionary/database key.

    Parameters
    ----------
    data_id : mapping
        Dimension name -> value (int or str).

    Returns
    -------
    str
        ``'{"detector":3,"visit":12}'``-style canonical JSON (the same text as the
        registry's ``procsky.repo.dimensions.data_id_key``).
    """
    return json.dumps({k: _plain(v) for k, v in data_id.items()}, sort_keys=True, separators=(",", ":"))


def _plain(value: Any) -> Any:
    """Turn numpy scalars into Python ones so data IDs serialise identically."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


@dataclass(frozen=True)
class Input:
    """One input connection of a task.

    Parameters
    ----------
    dataset_type : str
        Name of the dataset type in the repository (``"calexp"``).
    dimensions : tuple of str
        Dimensions of that dataset type's data IDs.
    multiple : bool
        ``False``: exactly one dataset per quantum, passed as the object itself.
        ``True``: all datasets matching the quantum on the shared dimensions (gathered),
        passed as a list ordered by data ID.
    optional : bool
        The quantum still runs when no dataset matches (``None`` or ``[]`` is passed).
    tolerate_missing : bool
        Only for gathered (``multiple``) inputs. When the quanta producing some of the
        datasets failed or were blocked, run on the rest instead of being blocked (a coadd
        of the visits that did calibrate, say). The provenance of the quantum lists the
        missing data IDs under ``missing_inputs``. When every producer failed the quantum
        is still blocked.
    """

    dataset_type: str
    dimensions: tuple[str, ...]
    multiple: bool = False
    optional: bool = False
    tolerate_missing: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        if self.tolerate_missing and not self.multiple:
            raise ValueError(f"Input({self.dataset_type!r}): tolerate_missing needs multiple=True")


@dataclass(frozen=True)
class Output:
    """One output connection of a task.

    Parameters
    ----------
    dataset_type : str
        Name of the dataset type written (``"calexp"``).
    dimensions : tuple of str
        Dimensions of its data IDs; they must be quantum dimensions or dimensions whose
        value is the same for every input of the quantum (e.g. ``band`` of a visit).
    """

    dataset_type: str
    dimensions: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "dimensions", tuple(self.dimensions))


class TaskConfig(pydantic.BaseModel):
    """Base class of task configurations: frozen, validated, no unknown fields."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    def config_hash(self) -> str:
        """SHA-256 (hex, first 16 characters) of the canonical JSON of this configuration."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetKey:
    """A dataset as the quantum graph sees it: existing (``id`` set) or predicted.

    Parameters
    ----------
    dataset_type : str
        Dataset type name.
    data_id : dict
        Its data ID.
    run : str or None
        Run holding it (predicted outputs: the output run).
    id : str or int or None
        Registry id of an existing dataset; ``None`` for a predicted one.
    producer : tuple or None
        ``(task label, quantum data-ID key)`` of the quantum that will produce a predicted
        dataset; ``None`` for an existing one.
    """

    dataset_type: str
    data_id: dict = field(compare=False, hash=False)
    run: str | None = field(default=None, compare=False, hash=False)
    id: Any = field(default=None, compare=False, hash=False)
    producer: tuple | None = field(default=None, compare=False, hash=False)
    key: str = field(default="", compare=True)

    def __post_init__(self):
        object.__setattr__(self, "data_id", {k: _plain(v) for k, v in self.data_id.items()})
        if not self.key:
            object.__setattr__(self, "key", data_id_key(self.data_id))


@dataclass
class QuantumSpec:
    """One unit of work before it is stored: data ID and the datasets feeding each input.

    Parameters
    ----------
    data_id : dict
        Quantum data ID (the task's dimensions, plus implied values such as ``band``).
    inputs : dict of str -> list of DatasetKey
        For each input name, the datasets it reads (one for per-quantum inputs).
    """

    data_id: dict
    inputs: dict[str, list[DatasetKey]]


# -- configuration overrides ---------------------------------------------------------------


def _model_class(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The pydantic model class inside a field annotation (``Model``, ``Model | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _field_list(model: type[pydantic.BaseModel]) -> str:
    return ", ".join(sorted(model.model_fields)) or "none"


def _expand_dotted(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``{"a.b": 1, "a": {"c": 2}}`` -> ``{"a": {"b": 1, "c": 2}}`` (dotted keys become nesting)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key or not all(key.split(".")):
            raise ProcskyValueError(f"configuration key {where + str(key)!r} is not a field name or dotted path.")
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping):
            value = _expand_dotted(value, f"{where}{head}.")
            if isinstance(out.get(head), dict):
                out[head] = _deep_merge(out[head], value)
                continue
        out[head] = value
    return out


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_fields(model: type[pydantic.BaseModel], values: Mapping[str, Any], where: str) -> None:
    """Raise naming the valid fields when ``values`` (nested dicts) names an unknown field."""
    if model.model_config.get("extra") == "allow":
        return
    for key, value in values.items():
        info = model.model_fields.get(key)
        if info is None:
            raise ProcskyValueError(
                f"{model.__name__} has no field {where + key!r}; valid fields"
                f"{' of ' + where.rstrip('.') if where else ''}: {_field_list(model)}."
            )
        sub = _model_class(info.annotation)
        if sub is not None and isinstance(value, Mapping):
            _check_fields(sub, value, f"{where}{key}.")


def _invalid(model: type[pydantic.BaseModel], exc: pydantic.ValidationError, what: str) -> ProcskyValueError:
    """A :class:`ProcskyValueError` for a failed validation, listing the fields of the model involved."""
    target = model
    path: list[str] = []
    for part in exc.errors()[0].get("loc", ()) if exc.errors() else ():
        info = target.model_fields.get(part) if isinstance(part, str) else None
        sub = _model_class(info.annotation) if info is not None else None
        if sub is None:
            break
        target = sub
        path.append(str(part))
    where = f" of {'.'.join(path)}" if path else ""
    return ProcskyValueError(
        f"invalid configuration for {what}: {exc}\n(fields{where} ({target.__name__}): {_field_list(target)})"
    )


def build_config(model: type[M], values: Mapping[str, Any] | None = None, *, what: str = "") -> M:
    """Validate a mapping (nested dicts and/or dotted keys) into a frozen configuration.

    Parameters
    ----------
    model : type
        The pydantic model (a :class:`TaskConfig` or a library configuration).
    values : mapping, optional
        ``{"field": value, "nested.field": value, "nested": {"field": value}}``.
    what : str
        Names the configuration in error messages (``"task 'coadd'"``).

    Returns
    -------
    pydantic.BaseModel
        A new instance of ``model``; unknown fields raise :class:`ProcskyValueError`
        naming the valid ones.
    """
    what = what or model.__name__
    expanded = _expand_dotted(values or {})
    _check_fields(model, expanded, "")
    try:
        return model.model_validate(expanded)
    except pydantic.ValidationError as exc:
        raise _invalid(model, exc, what) from exc


def override_config(config: M, overrides: Mapping[str, Any], *, what: str = "") -> M:
    """A new configuration: ``config`` with ``overrides`` applied at any nesting depth.

    Nested models named in ``overrides`` are rebuilt from their current values and the
    override (``{"coadd": {"memory_budget": 1e9}}`` or ``{"coadd.memory_budget": 1e9}``);
    a plain ``dict`` field is merged key by key; anything else is replaced. Nothing is
    assigned in place: every changed level is a fresh frozen model (``model_validate``).

    Parameters
    ----------
    config : pydantic.BaseModel
        The current configuration (unchanged).
    overrides : mapping
        Fields to change.
    what : str
        Names the configuration in error messages.

    Returns
    -------
    pydantic.BaseModel
        Of the same class as ``config``.
    """
    model = type(config)
    what = what or model.__name__
    expanded = _expand_dotted(overrides)
    _check_fields(model, expanded, "")
    try:
        return _override(config, expanded)
    except pydantic.ValidationError as exc:
        raise _invalid(model, exc, what) from exc


def _override(config: M, overrides: Mapping[str, Any]) -> M:
    values = {name: getattr(config, name) for name in type(config).model_fields}
    values.update(config.model_extra or {})
    for key, value in overrides.items():
        current = values.get(key)
        if isinstance(value, Mapping) and isinstance(current, pydantic.BaseModel):
            values[key] = _override(current, value)
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            values[key] = _deep_merge(current, value)
        else:
            values[key] = value
    return type(config).model_validate(values)


# -- the registry ---------------------------------------------------------------------------

#: Entry-point group through which packages (procsky's own and a user's) declare tasks:
#: ``[project.entry-points."procsky.tasks"] calibrate = "procsky.tasks.calibrate:CalibrateTask"``.
ENTRY_POINT_GROUP = "procsky.tasks"

_REGISTRY: dict[str, type] = {}


def register_task(name: str):
    """Class decorator registering a :class:`Task` subclass under ``name``.

    Packaged tasks are also declared as entry points (group ``procsky.tasks``) so they are
    found without importing every module; the decorator registers tasks defined anywhere
    else (a notebook, a test).

    Parameters
    ----------
    name : str
        Short name used in pipeline YAML files (``task: calibrate``).
    """

    def decorator(cls):
        _register(name, cls)
        return cls

    return decorator


def _register(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ProcskyTypeError(
            f"task {name!r} is {cls!r}, which is not a procsky Task subclass; derive it from procsky.tasks.base.Task."
        )
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ProcskyValueError(
            f"task name {name!r} is already registered by {old.__module__}:{old.__qualname__}; "
            f"choose another name for {cls.__module__}:{cls.__qualname__}."
        )
    _REGISTRY[name] = cls
    if cls.__dict__.get("task_name") is None:
        cls.task_name = name


def _entry_points() -> dict[str, Any]:
    """Task entry points by name (group :data:`ENTRY_POINT_GROUP`)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(ep: Any) -> type:
    """Import the task an entry point names and register it; import errors are raised."""
    try:
        cls = ep.load()
    except Exception as exc:
        raise ProcskyError(
            f"task {ep.name!r} (entry point {ep.value!r} in group {ENTRY_POINT_GROUP!r}) cannot be "
            f"loaded: {type(exc).__name__}: {exc}"
        ) from exc
    _register(ep.name, cls)
    return cls


def registered_tasks() -> dict[str, type]:
    """Every known task class by name: the entry points (all loaded) and ``@register_task``.

    Raises
    ------
    procsky.errors.ProcskyError
        A task module declared as an entry point fails to import.
    """
    for name, ep in _entry_points().items():
        if name not in _REGISTRY:
            _load_entry_point(ep)
    return dict(_REGISTRY)


def get_task_class(name: str) -> type:
    """Find a task class by registered name, entry-point name or ``"module:Class"`` path.

    Parameters
    ----------
    name : str
        ``"calibrate"`` (registered) or ``"procsky.tasks.calibrate:CalibrateTask"``.

    Returns
    -------
    type
        The :class:`Task` subclass.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ProcskyKeyError(
                f"task {name!r}: cannot import module {module_name!r} ({exc}); check the "
                "spelling and that the package is installed."
            ) from exc
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise ProcskyKeyError(f"task {name!r}: module {module_name!r} has no {attr!r}.")
        if not (isinstance(obj, type) and issubclass(obj, Task)):
            raise ProcskyTypeError(f"task {name!r} is {obj!r}, not a procsky Task subclass.")
        return obj
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        return _load_entry_point(eps[name])
    known = ", ".join(sorted(set(_REGISTRY) | set(eps))) or "none"
    raise ProcskyKeyError(
        f"no task registered as {name!r} (registered: {known}); use a registered name or 'package.module:Class'."
    )


class Task:
    """Base class of pipeline tasks (see the module docstring).

    Subclasses set the class attributes ``dimensions``, ``inputs``, ``outputs`` and
    ``Config`` and implement :meth:`run`. Set ``parallel = True`` when ``run`` builds dask
    graphs that should be computed on the cluster (the executor then runs the quantum
    inside ``distributed.worker_client`` so it does not hold a worker slot while waiting).

    Parameters
    ----------
    config : TaskConfig or mapping, optional
        Configuration; a mapping is validated into ``Config``.
    """

    task_name: ClassVar[str | None] = None
    dimensions: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[Mapping[str, Input]] = {}
    outputs: ClassVar[Mapping[str, Output]] = {}
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    parallel: ClassVar[bool] = False

    def __init__(self, config: TaskConfig | Mapping[str, Any] | None = None):
        if config is None:
            config = self.Config()
        elif isinstance(config, Mapping):
            config = build_config(self.Config, config, what=f"task {type(self).__name__}")
        elif not isinstance(config, self.Config):
            raise ProcskyTypeError(
                f"config of {type(self).__name__} must be a {self.Config.__name__} or a dict, "
                f"not {type(config).__name__}."
            )
        self.config = config

    # -- the computation ------------------------------------------------------------------
    # ``*args, **inputs``: each task declares its own keyword signature (the executor passes
    # the inputs by name), and mypy accepts any signature overriding this one.
    def run(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """Compute the outputs from in-memory inputs.

        Parameters
        ----------
        **inputs
            One keyword per entry of ``inputs``: the dataset (per-quantum) or a list of
            datasets ordered by data ID (gathered). ``data_ids`` is also passed when the
            signature accepts it: a dict input name -> data ID (or list of data IDs).

        Returns
        -------
        dict
            Output name -> object to store.

        Raises
        ------
        procsky.errors.NoWorkError
            Nothing to do for this quantum.
        procsky.errors.AlgorithmError
            The algorithm failed on valid inputs.
        """
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    # -- quantum generation ---------------------------------------------------------------
    def quanta(self, repo, inputs: Mapping[str, list[DatasetKey]], where) -> list[QuantumSpec]:
        """Group candidate input datasets into quanta.

        The default joins inputs on the quantum dimensions: every input whose dimensions
        cover the task's dimensions proposes quanta (the intersection over such inputs is
        kept); each quantum then receives, for every input, the datasets agreeing with it on
        the shared dimensions. Tasks whose quanta need a dimension mapping (visit/detector
        -> tract/patch) override this method.

        Parameters
        ----------
        repo : procsky.repo.Repo or None
            Repository (for dimension records, sky maps ...).
        inputs : dict of str -> list of DatasetKey
            Candidate datasets per input name (existing and predicted).
        where : callable or None
            ``where(data_id) -> bool`` filter (already applied to ``inputs`` on the
            dimensions they have); apply it to any new data IDs built here.

        Returns
        -------
        list of QuantumSpec
        """
        return default_quanta(self, inputs)

    # -- helpers --------------------------------------------------------------------------
    @classmethod
    def validate_declaration(cls) -> None:
        """Check the class attributes; raise :class:`ProcskyTypeError` naming the problem."""
        name = cls.__name__
        if not cls.dimensions and cls.quanta is Task.quanta:
            raise ProcskyTypeError(f"task {name} declares no quantum dimensions.")
        for kind, conns, ctype in (("input", cls.inputs, Input), ("output", cls.outputs, Output)):
            for key, conn in conns.items():
                if not isinstance(conn, ctype):
                    raise ProcskyTypeError(
                        f"task {name}: {kind} {key!r} is {conn!r}; declare it as {ctype.__name__}(...)."
                    )
        clash = set(cls.inputs) & set(cls.outputs)
        if clash:
            raise ProcskyTypeError(f"task {name}: names {sorted(clash)} are both input and output.")
        if not issubclass(cls.Config, TaskConfig):
            raise ProcskyTypeError(f"task {name}: Config must derive from TaskConfig.")

    def config_hash(self) -> str:
        """Hash of the configuration (stored in provenance)."""
        return self.config.config_hash()


def _project(data_id: Mapping[str, Any], dims: Iterable[str]) -> dict:
    return {d: data_id[d] for d in dims if d in data_id}


def _implied(datasets: Iterable[DatasetKey]) -> dict:
    """Keys whose value is the same in every data ID of ``datasets``."""
    common: dict | None = None
    for ds in datasets:
        if common is None:
            common = dict(ds.data_id)
        else:
            for k in list(common):
                if ds.data_id.get(k, _MISSING) != common[k]:
                    del common[k]
    return common or {}


_MISSING = object()


def complete_data_id(task: Task, data_id: Mapping[str, Any], datasets: Iterable[DatasetKey]) -> dict:
    """Quantum data ID plus the implied values its outputs need (e.g. ``band``).

    Parameters
    ----------
    task : Task
        The task (its ``outputs``).
    data_id : mapping
        Quantum data ID on the task dimensions.
    datasets : iterable of DatasetKey
        The quantum's inputs; a dimension whose value is the same in all of them is implied.

    Returns
    -------
    dict
    """
    full = dict(data_id)
    needed = {d for c in type(task).outputs.values() for d in c.dimensions} - set(full)
    if needed:
        implied = _implied(datasets)
        full.update({k: implied[k] for k in sorted(needed) if k in implied})
    return full


def default_quanta(task: Task, inputs: Mapping[str, list[DatasetKey]]) -> list[QuantumSpec]:
    """Default quantum generation by joining inputs on the task dimensions.

    Parameters
    ----------
    task : Task
        The task (its ``dimensions`` and ``inputs``).
    inputs : dict of str -> list of DatasetKey
        Candidate datasets per input name.

    Returns
    -------
    list of QuantumSpec
        Ordered by quantum data ID.
    """
    dims = tuple(task.dimensions)
    conns = type(task).inputs
    covering = [n for n, c in conns.items() if set(dims) <= set(c.dimensions) and not c.optional]
    if not covering:
        raise ProcskyTypeError(
            f"task {type(task).__name__}: no required input has all the quantum dimensions "
            f"{dims}, so quanta cannot be derived by joining; override Task.quanta() to map "
            "dimensions (e.g. visit/detector -> tract/patch)."
        )
    # Index every input by its projection on the shared dimensions.
    index: dict[str, dict[str, list[DatasetKey]]] = {}
    for name, conn in conns.items():
        shared = [d for d in dims if d in conn.dimensions]
        by: dict[str, list[DatasetKey]] = {}
        for ds in inputs.get(name, []):
            by.setdefault(data_id_key(_project(ds.data_id, shared)), []).append(ds)
        index[name] = by
    candidates: set[str] | None = None
    for name in covering:
        keys = set(index[name])
        candidates = keys if candidates is None else candidates & keys
    specs = []
    for qkey in sorted(candidates or ()):
        qid = json.loads(qkey)
        chosen: dict[str, list[DatasetKey]] = {}
        # Values implied by the per-quantum covering inputs (e.g. the physical_filter of a
        # raw) narrow the other inputs (the flat of that filter).
        context = _implied(d for n in covering if not conns[n].multiple for d in index[n].get(qkey, []))
        ok = True
        for name, conn in conns.items():
            shared = [d for d in dims if d in conn.dimensions]
            got = index[name].get(data_id_key(_project(qid, shared)), [])
            if len(got) > 1 and name not in covering and context:
                narrowed = [
                    d for d in got if all(d.data_id[k] == context[k] for k in d.data_id.keys() & context.keys())
                ]
                got = narrowed if (conn.multiple or narrowed) else got
            if not got and not conn.optional:
                ok = False
                break
            if not conn.multiple and len(got) > 1:
                raise ProcskyValueError(
                    f"task {type(task).__name__}: input {name!r} ({conn.dataset_type}) is "
                    f"per-quantum but {len(got)} datasets match quantum {qid} (e.g. "
                    f"{got[0].data_id}, {got[1].data_id}); declare it Input(..., multiple=True) "
                    "or add the missing dimensions to the task."
                )
            chosen[name] = sorted(got, key=lambda d: d.key)
        if not ok:
            continue
        every = [d for lst in chosen.values() for d in lst]
        specs.append(QuantumSpec(data_id=complete_data_id(task, qid, every), inputs=chosen))
    return specs
