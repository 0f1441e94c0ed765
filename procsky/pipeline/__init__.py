"""Pipelines on dask: tasks, pipeline YAML files, the quantum graph, executors, clusters.

Public names::

    Task, TaskConfig, Input, Output, register_task     the task interface (procsky.tasks.base)
    Pipeline, load_pipeline                            pipelines from YAML (pipeline.py)
    build_graph, QuantumGraph                          the quantum graph (graph.py)
    run_pipeline, make_graph                           build + store + execute (run.py)
    SyncExecutor, DaskExecutor                         executors (executor.py)
    open_cluster                                       cluster profiles (clusters.py)
    run_report                                         reports (report.py)

Example (notebook)::

    from distributed import Client
    from procsky.pipeline import open_cluster, run_pipeline
    with Client(open_cluster("local", n_workers=2)) as client:
        summary = run_pipeline("REPO", "drp", where="tract=0", output="run1", client=client)
    print(summary)
"""

from procsky.pipeline.clusters import open_cluster
from procsky.pipeline.executor import DaskExecutor, RunSummary, SyncExecutor
from procsky.pipeline.graph import STATES, QuantumGraph, build_graph
from procsky.pipeline.pipeline import Pipeline, load_pipeline, parse_overrides
from procsky.pipeline.report import run_report
from procsky.pipeline.run import make_graph, run_pipeline
from procsky.tasks.base import (
    DatasetKey,
    Input,
    Output,
    QuantumSpec,
    Task,
    TaskConfig,
    get_task_class,
    register_task,
)

__all__ = [
    "Task",
    "TaskConfig",
    "Input",
    "Output",
    "DatasetKey",
    "QuantumSpec",
    "register_task",
    "get_task_class",
    "Pipeline",
    "load_pipeline",
    "parse_overrides",
    "QuantumGraph",
    "build_graph",
    "STATES",
    "run_pipeline",
    "make_graph",
    "SyncExecutor",
    "DaskExecutor",
    "RunSummary",
    "open_cluster",
    "run_report",
]
