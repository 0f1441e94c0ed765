"""Pipelines: an ordered list of configured tasks, read from YAML.

A pipeline file looks like::

    description: Data release production
    tasks:
      - label: calibrate
        task: calibrate                          # registered name ...
        config: {detection_threshold: 5.0}   # nested fields: {psf: {order: 2}} or {psf.order: 2}
      - label: warp
        task: procsky.tasks.warp:WarpTask        # ... or "module:Class"

(the mapping form ``tasks: {calibrate: {task: ..., config: ...}}`` is accepted too; a task
given without ``task`` uses its label as the registered name). Packaged pipelines live in
``procsky/pipelines/<name>.yaml`` and are found by name (``drp``, ``ap``).

Configuration is overridden with ``label.field=value`` strings (``-c`` on the command line),
nested configurations with more dots (``assemble_coadd.coadd.memory_budget=1e9``); values
are parsed as YAML scalars (``5``, ``1e-3``, ``true``, ``[1, 2]``, ``'text'``). Overrides
build new frozen configurations (:func:`procsky.tasks.base.override_config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError
from procsky.tasks.base import Task, TaskConfig, build_config, get_task_class, override_config

__all__ = ["PipelineTask", "Pipeline", "load_pipeline", "parse_overrides", "pipeline_path"]

_PACKAGED = Path(__file__).resolve().parent.parent / "pipelines"


@dataclass
class PipelineTask:
    """A task with its label and validated configuration inside a pipeline.

    Parameters
    ----------
    label : str
        Name of the task in this pipeline (unique).
    task_class : type
        The :class:`~procsky.tasks.base.Task` subclass.
    config : TaskConfig
        Frozen configuration.
    class_path : str
        ``"module:Class"`` path of ``task_class`` (importable on workers).
    """

    label: str
    task_class: type[Task]
    config: TaskConfig
    class_path: str

    def make_task(self) -> Task:
        """Instantiate the task with its configuration."""
        return self.task_class(self.config)

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()


class Pipeline:
    """An ordered sequence of :class:`PipelineTask`.

    Parameters
    ----------
    tasks : list of PipelineTask
        In execution order; a task consuming a dataset type produced by another task must
        come after it (checked).
    description : str
        Free text.
    name : str
        Short name (file stem).
    """

    def __init__(self, tasks: list[PipelineTask], *, description: str = "", name: str = "pipeline"):
        self.tasks = list(tasks)
        self.description = description
        self.name = name
        labels = [t.label for t in self.tasks]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ProcskyValueError(f"pipeline {name!r}: duplicate task labels {sorted(dup)}.")
        self._check_order()

    def _check_order(self) -> None:
        producer: dict[str, str] = {}
        for t in self.tasks:
            for out in t.task_class.outputs.values():
                if out.dataset_type in producer:
                    raise ProcskyValueError(
                        f"pipeline {self.name!r}: dataset type {out.dataset_type!r} is produced by "
                        f"both {producer[out.dataset_type]!r} and {t.label!r}; rename one output."
                    )
                producer[out.dataset_type] = t.label
        seen: set[str] = set()
        for t in self.tasks:
            for inp in t.task_class.inputs.values():
                p = producer.get(inp.dataset_type)
                if p is not None and p not in seen and p != t.label:
                    raise ProcskyValueError(
                        f"pipeline {self.name!r}: task {t.label!r} reads {inp.dataset_type!r}, "
                        f"produced by {p!r} which is listed after it; reorder the tasks."
                    )
            seen.add(t.label)

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.tasks]

    def __getitem__(self, label: str) -> PipelineTask:
        for t in self.tasks:
            if t.label == label:
                return t
        raise ProcskyKeyError(f"pipeline {self.name!r} has no task {label!r} (tasks: {self.labels}).")

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self):
        return len(self.tasks)

    def subset(self, labels: Iterable[str]) -> Pipeline:
        """The pipeline restricted to ``labels`` (kept in pipeline order)."""
        labels = list(labels)
        for label in labels:
            self[label]  # raises a helpful error for unknown labels
        return Pipeline([t for t in self.tasks if t.label in labels], description=self.description, name=self.name)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Pipeline:
        """A copy whose task configurations are updated from ``{label: {field: value}}``.

        Fields may be nested (``{"assemble_coadd": {"coadd": {"memory_budget": 1e9}}}``) or
        dotted (``{"assemble_coadd": {"coadd.memory_budget": 1e9}}``); the configurations
        are rebuilt, never changed in place.
        """
        tasks = []
        for t in self.tasks:
            extra = overrides.get(t.label)
            config = _update_config(t, extra) if extra else t.config
            tasks.append(PipelineTask(t.label, t.task_class, config, t.class_path))
        unknown = set(overrides) - set(self.labels)
        if unknown:
            raise ProcskyKeyError(
                f"config override for unknown task(s) {sorted(unknown)}; pipeline {self.name!r} has {self.labels}."
            )
        return Pipeline(tasks, description=self.description, name=self.name)

    def to_dict(self) -> dict:
        """Plain description (labels, class paths, full configs) for provenance."""
        return {
            "name": self.name,
            "description": self.description,
            "tasks": [
                {
                    "label": t.label,
                    "task": t.class_path,
                    "config": t.config.model_dump(mode="json"),
                    "config_hash": t.config_hash,
                }
                for t in self.tasks
            ],
        }

    @classmethod
    def from_tasks(cls, tasks: Iterable, *, name: str = "pipeline") -> Pipeline:
        """Build a pipeline from task classes or ``(label, class, config)`` tuples (notebooks)."""
        items = []
        for item in tasks:
            if isinstance(item, type) and issubclass(item, Task):
                label, klass, config = (item.task_name or item.__name__), item, None
            else:
                label, klass, config = (tuple(item) + (None,))[:3]
            items.append(_make_pipeline_task(label, klass, config or {}, name))
        return cls(items, name=name)


def _update_config(t: PipelineTask, extra: Mapping[str, Any]) -> TaskConfig:
    return override_config(t.config, extra, what=f"task {t.label!r} ({t.task_class.__name__})")


def _class_path(klass: type) -> str:
    return f"{klass.__module__}:{klass.__qualname__}"


def _make_pipeline_task(
    label: str, klass: type[Task] | str, config: Mapping[str, Any] | TaskConfig, pipeline_name: str
) -> PipelineTask:
    if isinstance(klass, str):
        klass = get_task_class(klass)
    klass.validate_declaration()
    if isinstance(config, klass.Config):
        return PipelineTask(label, klass, config, _class_path(klass))
    if not isinstance(config, Mapping):
        raise ProcskyValueError(
            f"pipeline {pipeline_name!r}, task {label!r}: 'config' must be a mapping of fields, "
            f"not {type(config).__name__}."
        )
    cfg = build_config(klass.Config, config, what=f"pipeline {pipeline_name!r}, task {label!r}")
    return PipelineTask(label, klass, cfg, _class_path(klass))


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Parse ``label.field=value`` strings into ``{label: {field: value}}``.

    Nested fields use more dots (``calibrate.psf.order=2``). Values are YAML scalars.

    Parameters
    ----------
    items : iterable of str
        Override strings.

    Returns
    -------
    dict
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ProcskyValueError(
                f"config override {item!r} is not of the form task.field=value (e.g. -c calibrate.detection.nsigma=4)."
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
            if isinstance(value, str) and value == text.strip():
                value = _yaml11_float(value)  # PyYAML reads "1e3" as a string
        except yaml.YAMLError as exc:
            raise ProcskyValueError(f"config override {item!r}: value is not valid YAML ({exc}).") from exc
        node = out.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _yaml11_float(text: str):
    try:
        return float(text) if any(c.isdigit() for c in text) else text
    except ValueError:
        return text


def pipeline_path(name: str | Path) -> Path:
    """Resolve a packaged pipeline name (``"drp"``) or a YAML path to a file path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ProcskyFileError(f"pipeline file {str(p)!r} does not exist.")
        return p
    packaged = _PACKAGED / f"{name}.yaml"
    if packaged.exists():
        return packaged
    known = sorted(x.stem for x in _PACKAGED.glob("*.yaml"))
    raise ProcskyKeyError(f"no pipeline {str(name)!r}: not a file and not a packaged pipeline (packaged: {known}).")


def load_pipeline(name: str | Path, overrides: Iterable[str] | Mapping | None = None) -> Pipeline:
    """Read a pipeline by packaged name or YAML path, applying configuration overrides.

    Parameters
    ----------
    name : str or path
        ``"drp"``, ``"ap"`` or a YAML file.
    overrides : list of str or dict, optional
        ``["calibrate.field=value", ...]`` or ``{label: {field: value}}``.

    Returns
    -------
    Pipeline
    """
    path = pipeline_path(name)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProcskyValueError(f"pipeline file {str(path)!r} is not valid YAML: {exc}") from exc
    raw_tasks = doc.get("tasks")
    if isinstance(raw_tasks, Mapping):
        raw_tasks = [dict(v or {}, label=k) for k, v in raw_tasks.items()]
    if not isinstance(raw_tasks, list):
        raise ProcskyValueError(
            f"pipeline file {str(path)!r} needs a 'tasks:' list of {{label, task, config}} entries."
        )
    tasks = []
    for entry in raw_tasks:
        if isinstance(entry, str):
            entry = {"label": entry}
        label = entry.get("label") or entry.get("task")
        if not label:
            raise ProcskyValueError(f"pipeline file {str(path)!r}: entry {entry!r} has no label.")
        tasks.append(_make_pipeline_task(label, entry.get("task", label), entry.get("config") or {}, path.stem))
    pipe = Pipeline(tasks, description=doc.get("description", ""), name=path.stem)
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        pipe = pipe.with_overrides(overrides)
    return pipe
