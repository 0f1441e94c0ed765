"""Task interface, pipeline YAML, quantum graph, synchronous execution, reports, CLI."""

from __future__ import annotations

import json
import pickle
import time

import pydantic
import pytest
from click.testing import CliRunner

import toytasks as toy
from procsky.errors import (
    NoWorkError,
    ProcskyKeyError,
    ProcskyTypeError,
    ProcskyValueError,
    QuerySyntaxError,
)
from procsky.pipeline import (
    Input,
    Output,
    Pipeline,
    QuantumSpec,
    Task,
    TaskConfig,
    build_graph,
    load_pipeline,
    make_graph,
    parse_overrides,
    register_task,
    run_pipeline,
    run_report,
)
from procsky.pipeline.clusters import cluster_kwargs, find_profile, parse_duration
from procsky.pipeline.graph import Where
from procsky.repo import Repo
from procsky.tasks.base import DatasetKey, default_quanta, get_task_class


@pytest.fixture
def repo(toy_repo):
    return toy_repo


# -- task interface ------------------------------------------------------------------------


def test_config_frozen_and_hashed():
    a = toy.ToyMeasureConfig()
    b = toy.ToyMeasureConfig(clip_sigma=3.0)
    c = toy.ToyMeasureConfig(clip_sigma=4.0)
    assert a.config_hash() == b.config_hash() != c.config_hash()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        a.clip_sigma = 5.0
    with pytest.raises(ProcskyValueError, match="clip_sigmaa"):
        toy.ToyMeasureTask({"clip_sigmaa": 1})


def test_registry_by_name_and_path():
    assert get_task_class("toy_measure") is toy.ToyMeasureTask
    assert get_task_class("toytasks:ToyGatherTask") is toy.ToyGatherTask
    with pytest.raises(ProcskyKeyError, match="no task registered"):
        get_task_class("no_such_task")
    with pytest.raises(ProcskyTypeError):
        register_task("bad")(int)


def test_tasks_are_entry_points_and_broken_ones_raise(monkeypatch):
    import re
    from importlib.metadata import EntryPoint
    from pathlib import Path

    import procsky.tasks.base as base
    from procsky.errors import ProcskyError

    # every task procsky registers is declared as an entry point (found without importing)
    eps = base._entry_points()
    src = Path(base.__file__).parent
    for path in src.rglob("*.py"):
        module = ".".join(("procsky", "tasks", *path.relative_to(src).with_suffix("").parts))
        for name in re.findall(r'^@register_task\("(\w+)"\)', path.read_text(), re.M):
            assert name in eps, f'{module}: task {name!r} is not in [project.entry-points."procsky.tasks"]'
            assert eps[name].value.partition(":")[0] == module
    assert get_task_class("calibrate").__name__ == "CalibrateTask"
    # a task module that fails to import raises, naming the entry point and the cause
    broken = EntryPoint(name="broken", value="procsky_no_such_module:BrokenTask", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "_entry_points", lambda: {**eps, "broken": broken})
    with pytest.raises(ProcskyError, match="broken.*procsky_no_such_module.*ModuleNotFoundError"):
        get_task_class("broken")
    with pytest.raises(ProcskyError, match="procsky_no_such_module"):
        base.registered_tasks()


def test_default_quanta_join_and_gather():
    task = toy.ToyGatherTask()
    stats = [DatasetKey("toy_stats", {"instrument": "c", "visit": v, "detector": d}) for v in (1, 2) for d in (0, 1, 2)]
    specs = default_quanta(task, {"stats": stats})
    assert [s.data_id for s in specs] == [{"instrument": "c", "visit": 1}, {"instrument": "c", "visit": 2}]
    assert [d.data_id["detector"] for d in specs[0].inputs["stats"]] == [0, 1, 2]

    # A per-quantum input matched by several datasets is a declaration error.
    class Bad(Task):
        dimensions = ("instrument", "visit")
        inputs = {"stats": Input("toy_stats", ("instrument", "visit", "detector"))}
        outputs = {}

    with pytest.raises(ProcskyValueError, match="multiple=True"):
        default_quanta(Bad(), {"stats": stats})

    # No input covering the quantum dimensions: the task must map dimensions itself.
    class NeedsMapping(Task):
        dimensions = ("tract", "patch")
        inputs = {"calexp": Input("calexp", ("instrument", "visit", "detector"))}
        outputs = {}

    with pytest.raises(ProcskyTypeError, match="override Task.quanta"):
        default_quanta(NeedsMapping(), {"calexp": stats})


def test_implied_values_narrow_other_inputs():
    class Isr(Task):
        dimensions = ("instrument", "visit", "detector")
        inputs = {
            "raw": Input("raw", ("instrument", "visit", "detector")),
            "flat": Input("flat", ("instrument", "detector"), optional=True),
        }
        outputs = {}

    raws = [
        DatasetKey("raw", {"instrument": "c", "visit": v, "detector": 0, "physical_filter": f})
        for v, f in ((1, "g"), (2, "r"))
    ]
    flats = [DatasetKey("flat", {"instrument": "c", "detector": 0, "physical_filter": f}) for f in "gr"]
    specs = default_quanta(Isr(), {"raw": raws, "flat": flats})
    assert [s.inputs["flat"][0].data_id["physical_filter"] for s in specs] == ["g", "r"]


def test_implied_output_dimensions():
    class Band(Task):
        dimensions = ("instrument", "visit")
        inputs = {"x": Input("x", ("instrument", "visit", "detector"), multiple=True)}
        outputs = {"y": Output("y", ("instrument", "visit", "band"))}

    xs = [DatasetKey("x", {"instrument": "c", "visit": 1, "detector": d, "band": "g"}) for d in (0, 1)]
    (spec,) = default_quanta(Band(), {"x": xs})
    assert spec.data_id == {"instrument": "c", "visit": 1, "band": "g"}


# -- pipeline YAML and overrides -----------------------------------------------------------


def test_parse_overrides_yaml_scalars():
    o = parse_overrides(
        ["measure.clip_sigma=2.5", "measure.min_rows=3", "gather.threshold=1e3", "a.b.c=true", "a.name='x y'"]
    )
    assert o == {
        "measure": {"clip_sigma": 2.5, "min_rows": 3},
        "gather": {"threshold": 1000.0},
        "a": {"b": {"c": True}, "name": "x y"},
    }
    with pytest.raises(ProcskyValueError, match="task.field=value"):
        parse_overrides(["clip_sigma=2"])


def test_load_pipeline_with_overrides(toy_yaml):
    pipe = load_pipeline(toy_yaml, ["measure.clip_sigma=2.5"])
    assert pipe.labels == ["measure", "gather"]
    assert pipe["measure"].config.clip_sigma == 2.5
    assert pipe["measure"].config_hash != load_pipeline(toy_yaml)["measure"].config_hash
    with pytest.raises(ProcskyValueError, match="clip_sigma"):
        load_pipeline(toy_yaml, ["measure.clip_sigma=abc"])
    with pytest.raises(ProcskyKeyError, match="unknown task"):
        load_pipeline(toy_yaml, ["nosuch.x=1"])
    with pytest.raises(ProcskyKeyError, match="packaged"):
        load_pipeline("no_such_pipeline")


def test_nested_overrides_build_new_frozen_configs(tmp_path):
    pipe = Pipeline.from_tasks([("nested", toy.ToyNestedTask)])
    before = pipe["nested"].config
    pipe2 = pipe.with_overrides(
        parse_overrides(["nested.inner.leaf.budget=1e9", "nested.inner.name=b", "nested.inner.weights.r=2"])
    )
    cfg = pipe2["nested"].config
    assert cfg.inner.leaf.budget == 1e9 and cfg.inner.leaf.order == 2 and cfg.inner.name == "b"
    assert cfg.inner.weights == {"g": 1.0, "r": 2.0}  # dict fields merge key by key
    assert before.inner.leaf.budget == 64.0 and before.inner.name == "a"  # nothing changed in place
    assert cfg.config_hash() != before.config_hash()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.inner.leaf.budget = 1.0
    # dotted keys in a mapping, and the same result from a nested mapping
    dotted = pipe.with_overrides({"nested": {"inner.leaf.budget": 1e9, "inner.name": "b", "inner.weights.r": 2}})[
        "nested"
    ].config
    nested = pipe.with_overrides({"nested": {"inner": {"leaf": {"budget": 1e9}, "name": "b", "weights": {"r": 2}}}})[
        "nested"
    ].config
    assert dotted == nested == cfg and dotted.config_hash() == cfg.config_hash()
    # unknown fields name the valid ones, at the level where they are wrong
    with pytest.raises(ProcskyValueError, match="budgt.*valid fields of inner.leaf: budget, order"):
        pipe.with_overrides({"nested": {"inner.leaf.budgt": 1}})
    with pytest.raises(ProcskyValueError, match="valid fields: inner, n"):
        pipe.with_overrides({"nested": {"innr.name": "x"}})
    with pytest.raises(ProcskyValueError, match="order"):
        pipe.with_overrides({"nested": {"inner.leaf.order": "many"}})
    # YAML config blocks accept nested mappings and dotted keys
    p = tmp_path / "nested.yaml"
    p.write_text(
        "tasks:\n  - label: nested\n    task: toy_nested\n"
        "    config: {inner: {name: b, weights: {g: 1.0, r: 2.0}}, inner.leaf.budget: 1.0e+9}\n"
    )
    assert load_pipeline(p)["nested"].config == cfg
    p.write_text("tasks:\n  - label: nested\n    task: toy_nested\n    config: {inner: {nme: b}}\n")
    with pytest.raises(ProcskyValueError, match="nme.*valid fields of inner: leaf, name, weights"):
        load_pipeline(p)
    # what the executor ships to a worker (model_dump) rebuilds the same configuration
    assert toy.ToyNestedTask(cfg.model_dump()).config == cfg
    assert json.loads(json.dumps(pipe2.to_dict()))["tasks"][0]["config"]["inner"]["leaf"]["budget"] == 1e9


def test_nested_override_changes_the_stored_hash(repo, tmp_path):
    pipe = Pipeline.from_tasks([("nested", toy.ToyNestedTask)])
    run_pipeline(repo, pipe, output="nested")
    with pytest.raises(ProcskyValueError, match="new --output"):
        run_pipeline(repo, pipe, output="nested", config=["nested.inner.leaf.order=3"])
    run_pipeline(repo, pipe, output="nested", config={"nested": {"inner": {"leaf": {"order": 2}}}})


def test_pipeline_order_checked():
    with pytest.raises(ProcskyValueError, match="reorder"):
        Pipeline.from_tasks([("gather", toy.ToyGatherTask), ("measure", toy.ToyMeasureTask)])


def test_packaged_pipelines_load():
    for name in ("drp", "ap"):
        pipe = load_pipeline(name)
        assert len(pipe) >= 1
        for pt in pipe:
            assert issubclass(pt.task_class, Task)


# -- quantum graph -------------------------------------------------------------------------


def test_where_three_valued():
    w = Where("tract=42 AND visit=1")
    assert w({"visit": 1}) is True  # undecided -> kept
    assert w.decide({"visit": 1}) is None
    assert w({"visit": 2}) is False  # decided false on what is known
    with pytest.raises(QuerySyntaxError):
        Where("visit = = 1")


def test_graph_build_and_export(repo, toy_yaml):
    g = make_graph(repo, toy_yaml, output="out", where="visit=2")
    assert g.counts()["measure"]["pending"] == 3
    assert g.counts()["gather"]["pending"] == 1
    (gq,) = g.quanta["gather"]
    assert sorted(p.data_id["detector"] for p in g.producers(gq)) == [0, 1, 2]
    d = json.loads(g.to_json())
    assert d["run"] == "out" and len(d["quanta"]) == 4
    gather = [q for q in d["quanta"] if q["task"] == "gather"][0]
    assert len(gather["depends_on"]) == 3
    dot = g.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == 3
    # existing inputs carry their registry ids
    mq = g.quanta["measure"][0]
    assert mq.inputs["raw"][0].id is not None


def test_where_typo_is_refused_with_a_hint(repo, toy_yaml):
    with pytest.raises(ProcskyValueError, match="'vist' \\(did you mean 'visit'\\?\\)"):
        make_graph(repo, toy_yaml, output="out", where="vist=2")


def test_graph_prunes_undecided_quanta(repo, toy_yaml):
    # 'detector' is unknown to the gather quanta; visit is known everywhere.
    g = make_graph(repo, toy_yaml, output="out", where="visit=1 AND detector IN (0, 1)")
    assert [q.data_id["detector"] for q in g.quanta["measure"]] == [0, 1]
    assert len(g.quanta["gather"]) == 1


def test_custom_quanta_hook(tmp_path):
    r = Repo.create(tmp_path / "r")
    pipe = Pipeline.from_tasks([("noop", toy.ToyNoopTask, {"n": 5})])
    g = build_graph(r, pipe, run="x")
    assert [q.data_id for q in g.quanta["noop"]] == [{"index": i} for i in range(5)]
    g = build_graph(r, pipe, run="x", where="index > 2")
    assert [q.data_id["index"] for q in g.quanta["noop"]] == [3, 4]


# -- synchronous execution, resume, failures -----------------------------------------------


def test_sync_run_outputs_and_provenance(repo, toy_yaml):
    s = run_pipeline(repo, toy_yaml, output="out")
    assert s.ok and s.counts["measure"]["succeeded"] == 6 and s.counts["gather"]["succeeded"] == 2
    summary = repo.get("toy_visit", {"instrument": "toycam", "visit": 1}, run="out")
    stats = [repo.get("toy_stats", {"instrument": "toycam", "visit": 1, "detector": d}, run="out") for d in (0, 1, 2)]
    assert summary["n_rows"] == sum(len(t) for t in stats) == 120
    assert summary["total_flux"] == pytest.approx(sum(t["flux"].sum() for t in stats))
    # provenance of the stored quanta
    rep = run_report(repo, "out")
    assert rep["totals"]["succeeded"] == 8
    ref = repo.find("toy_stats", {"instrument": "toycam", "visit": 1, "detector": 0}, run="out")
    raw = repo.find("toy_raw", {"instrument": "toycam", "visit": 1, "detector": 0})
    from procsky.pipeline.graph import load_states

    rows = {(r["task"], r["data_id"]): r for r in load_states(repo, "out")}
    row = rows[("measure", json.dumps({"detector": 0, "instrument": "toycam", "visit": 1}))]
    prov = json.loads(row["provenance"])
    assert prov["inputs"] == {"raw": [str(raw.id)]}
    assert prov["config_hash"] == toy.ToyMeasureConfig().config_hash()
    assert row["cpu_seconds"] > 0 and row["peak_memory"] > 10_000_000
    # synchronous run: one quantum at a time, so its CPU is the whole process's (helper threads too)
    assert prov["cpu_scope"] == "process" and row["cpu_seconds"] >= prov["thread_cpu_seconds"]
    assert row["end_time"] >= row["start_time"] and row["host"]
    assert ref is not None
    # rerun: nothing redone
    s2 = run_pipeline(repo, toy_yaml, output="out")
    assert s2.counts == s.counts
    rows2 = {(r["task"], r["data_id"]): r["end_time"] for r in load_states(repo, "out")}
    assert rows2 == {k: r["end_time"] for k, r in rows.items()}


def test_no_work_failed_blocked_and_retry(repo, toy_yaml):
    # Corrupt one input table: its quantum fails, its gather is blocked, the rest succeed.
    bad = repo.find("toy_raw", {"instrument": "toycam", "visit": 2, "detector": 1})
    path = repo.path(bad)
    good_bytes = path.read_bytes()
    path.write_bytes(b"not a parquet file")
    s = run_pipeline(repo, toy_yaml, output="out", retries=0)
    assert s.counts["measure"] == {"pending": 0, "succeeded": 5, "failed": 1, "no_work": 0, "blocked": 0}
    assert s.counts["gather"] == {"pending": 0, "succeeded": 1, "failed": 0, "no_work": 0, "blocked": 1}
    rep = run_report(repo, "out")
    failed = [f for f in rep["failures"] if f["state"] == "failed"][0]
    assert failed["data_id"] == {"instrument": "toycam", "visit": 2, "detector": 1}
    assert failed["error_class"] == "ProcskyFileError"
    assert "reading input 'raw'" in failed["error_message"] and "Parquet" in failed["error_message"]
    assert "Traceback" in failed["traceback"]
    blocked = [f for f in rep["failures"] if f["state"] == "blocked"][0]
    assert blocked["data_id"] == {"instrument": "toycam", "visit": 2}
    assert "failed" in blocked["error_message"]
    # Without --retry-failed nothing changes; with it, the repaired input goes through.
    path.write_bytes(good_bytes)
    s = run_pipeline(repo, toy_yaml, output="out")
    assert s.counts["measure"]["failed"] == 1
    s = run_pipeline(repo, toy_yaml, output="out", retry_failed=True)
    assert s.ok and s.counts["gather"]["succeeded"] == 2


def test_no_work(repo, toy_yaml):
    s = run_pipeline(repo, toy_yaml, output="out", config=["measure.min_rows=1000"])
    assert s.counts["measure"]["no_work"] == 6
    # gather has no inputs left: no work either
    assert s.counts["gather"]["no_work"] == 2
    rep = run_report(repo, "out")
    assert rep["totals"]["no_work"] == 8


def test_config_change_on_same_run_refused(repo, toy_yaml):
    run_pipeline(repo, toy_yaml, output="out")
    with pytest.raises(ProcskyValueError, match="new --output"):
        run_pipeline(repo, toy_yaml, output="out", config=["measure.clip_sigma=2"])


def test_tasks_subset_uses_existing_outputs(repo, toy_yaml):
    run_pipeline(repo, toy_yaml, output="out", tasks=["measure"])
    s = run_pipeline(repo, toy_yaml, output="out2", tasks="gather", collections=["out"])
    assert s.counts == {"gather": {"pending": 0, "succeeded": 2, "failed": 0, "no_work": 0, "blocked": 0}}
    with pytest.raises(Exception, match="no quanta to resume"):
        run_pipeline(repo, toy_yaml, output="nope", resume=True)
    with pytest.raises(ProcskyValueError, match=r"nothing to run.*toy_raw.*visit=99"):
        run_pipeline(repo, toy_yaml, output="empty", where="visit=99")


def test_transient_errors_retried(tmp_path):
    r = Repo.create(tmp_path / "r")
    calls = tmp_path / "calls"

    pipe = Pipeline.from_tasks([("flaky", FlakyTask, {"marker": str(calls), "fail_times": 2})])
    s = run_pipeline(r, pipe, output="o", retries=2)
    assert s.ok and calls.read_text() == "xxx"
    calls.unlink()
    s = run_pipeline(r, pipe.with_overrides({"flaky": {"fail_times": 5}}), output="o2", retries=1)
    assert s.counts["flaky"]["failed"] == 1
    (f,) = run_report(r, "o2")["failures"]
    assert f["error_class"] == "TransientError" and f["attempts"] == 2


class FlakyConfig(TaskConfig):
    marker: str
    fail_times: int = 1


class FlakyTask(Task):
    """Fails with TransientError the first ``fail_times`` calls (counted in a file)."""

    dimensions = ("index",)
    outputs = {"out": Output("flaky_out", ("index",))}
    Config = FlakyConfig

    def quanta(self, repo, inputs, where):
        return [QuantumSpec({"index": 0}, {})]

    def run(self):
        from pathlib import Path

        from procsky.errors import TransientError

        p = Path(self.config.marker)
        n = len(p.read_text()) if p.exists() else 0
        p.write_text("x" * (n + 1))
        if n < self.config.fail_times:
            raise TransientError(f"flaky storage, call {n + 1}")
        return {"out": {"calls": n + 1}}


def test_job_pickles(repo, toy_yaml):
    from procsky.pipeline.executor import QuantumResult, execute_quantum

    g = make_graph(repo, toy_yaml, output="out", save=True)
    from procsky.pipeline.executor import SyncExecutor

    ex = SyncExecutor()
    ex._graph = g
    job = ex._job(g.quanta["measure"][0], g.pipeline["measure"], str(repo.root))
    job2 = pickle.loads(pickle.dumps(job))
    res = execute_quantum(job2)
    assert isinstance(res, QuantumResult) and res.status == "succeeded"
    res2 = pickle.loads(pickle.dumps(res))
    assert res2.pendings["stats"].dataset_type == "toy_stats"
    assert isinstance(NoWorkError("x"), Exception)


# -- reports and CLI -----------------------------------------------------------------------


REPORT_KEYS = {
    "schema",
    "run",
    "generated",
    "repo",
    "where",
    "pipeline",
    "totals",
    "tasks",
    "failures",
    "failures_truncated",
    "metrics",
}
TASK_KEYS = {
    "task",
    "task_class",
    "config_hash",
    "quanta",
    "counts",
    "wall_seconds",
    "cpu_seconds",
    "peak_memory_bytes",
    "attempts_max",
    "first_start",
    "last_end",
}


def test_cli_run_graph_report(repo, toy_yaml, tmp_path):
    from procsky.cli import main

    runner = CliRunner()
    root = str(repo.root)
    res = runner.invoke(
        main, ["graph", str(toy_yaml), "--repo", root, "--output", "cli", "--where", "visit=1", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["quanta"]) == 4
    res = runner.invoke(main, ["graph", str(toy_yaml), "--repo", root, "--output", "cli", "--format", "dot"])
    assert res.exit_code == 0 and res.output.startswith("digraph")
    res = runner.invoke(
        main,
        [
            "run",
            str(toy_yaml),
            "--repo",
            root,
            "--output",
            "cli",
            "--sync",
            "--no-progress",
            "-c",
            "gather.threshold=50",
            "--html",
            str(tmp_path / "r.html"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "measure: succeeded 6" in res.output
    assert (tmp_path / "r.html").read_text().count("<tr>") >= 3
    res = runner.invoke(main, ["report", root, "--run", "cli", "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert set(rep) == REPORT_KEYS and rep["schema"] == "procsky.report/1"
    assert [t["task"] for t in rep["tasks"]] == ["measure", "gather"]
    for t in rep["tasks"]:
        assert set(t) == TASK_KEYS
        assert set(t["counts"]) == {"pending", "succeeded", "failed", "no_work", "blocked"}
        assert set(t["wall_seconds"]) == {"count", "sum", "mean", "median", "max"}
    assert rep["pipeline"]["tasks"][1]["config"] == {"threshold": 50.0}
    res = runner.invoke(main, ["report", root, "--run", "cli"])
    assert res.exit_code == 0 and "measure" in res.output and "succeeded" in res.output
    res = runner.invoke(main, ["report", root, "--run", "nope"])
    assert res.exit_code != 0 and "no pipeline quanta" in res.output
    res = runner.invoke(main, ["run", str(toy_yaml), "--repo", root, "--output", "cli2", "--sync", "-c", "measure=3"])
    assert res.exit_code != 0 and "task.field=value" in res.output


# -- cluster profiles ----------------------------------------------------------------------


def test_cluster_profiles(tmp_path, monkeypatch):
    for name in ("local", "slurm", "pbs", "htcondor", "lsf"):
        kind, kw, scaling = cluster_kwargs(name)
        assert kind == name
        if name != "local":
            prologue = " ".join(kw["job_script_prologue"])
            for var in ("OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "NUMBA_NUM_THREADS=1"):
                assert var in prologue
            assert "--lifetime" in kw["worker_extra_args"]
            assert "adapt" in scaling
            assert "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in kw["job_script_prologue"]
            assert "export DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL='500ms'" in kw["job_script_prologue"]
        else:
            assert kw["worker_dask_config"]["distributed.worker.profile.enabled"] is False
    kind, kw, _ = cluster_kwargs("slurm", walltime="01:00:00", queue="debug", jobs=3)
    i = kw["worker_extra_args"].index("--lifetime")
    assert kw["worker_extra_args"][i + 1] == f"{3600 - 600 - 240}s"
    assert kw["queue"] == "debug"
    _, kw, _ = cluster_kwargs("lsf")
    i = kw["worker_extra_args"].index("--lifetime")
    assert kw["worker_extra_args"][i + 1] == f"{4 * 3600 - 600 - 240}s"
    assert parse_duration("1-00:00:00") == 86400 and parse_duration("90m") == 5400
    # user profiles shadow packaged ones
    monkeypatch.setenv("PROCSKY_CLUSTERS", str(tmp_path))
    (tmp_path / "mysite.yaml").write_text("cluster: slurm\noptions: {cores: 2, memory: 4GiB}\n")
    assert find_profile("mysite") == tmp_path / "mysite.yaml"
    with pytest.raises(ProcskyKeyError, match="mysite"):
        find_profile("nosuchprofile")


def test_rss_monitor_catches_a_short_peak():
    """The per-quantum RSS high-water mark sees a 200 MB temporary that lives ~0.2 s."""
    import mmap

    import numpy as np
    import psutil

    from procsky.pipeline.executor import _RSSMonitor

    mon = _RSSMonitor.get()
    assert abs(mon._rss() - psutil.Process().memory_info().rss) < 32 * 2**20
    token = mon.open()
    start = mon._rss()
    # fresh anonymous pages, each touched (a malloc'd array could reuse heap pages that are
    # resident already after earlier tests, and then the RSS would not grow)
    buf = mmap.mmap(-1, 200 * 2**20)
    np.frombuffer(buf, dtype=np.uint8)[:: mmap.PAGESIZE] = 1
    time.sleep(0.2)
    buf.close()
    peak = mon.close(token)
    assert peak - start > 180 * 2**20


def test_checkout_profiles_match_packaged_ones():
    """``clusters/`` of a checkout shadows the packaged copies: they must not drift apart."""
    from procsky.pipeline import clusters

    if not clusters._CHECKOUT.is_dir():
        pytest.skip("not a source checkout")
    names = sorted(p.name for p in clusters._CHECKOUT.glob("*.yaml"))
    assert names == sorted(p.name for p in clusters._PACKAGED.glob("*.yaml"))
    for name in names:
        assert (clusters._CHECKOUT / name).read_text() == (clusters._PACKAGED / name).read_text(), name


def test_local_workers_run_without_dask_profiler(tmp_path):
    """Local workers get WORKER_DASK_CONFIG (dask's stack-sampling profiler off) through the
    nanny, and keep the rest of this process's dask config; ``dask_config`` turns it back on."""
    import dask
    import distributed

    from procsky.pipeline import open_cluster

    def state(dask_worker):
        return (
            dask.config.get("distributed.worker.profile.enabled"),
            "profile" in dask_worker.periodic_callbacks,
            dask_worker.memory_manager.memory_monitor_interval,
        )

    with dask.config.set({"distributed.comm.timeouts.connect": "41s"}):
        with open_cluster("local", n_workers=1, dashboard_address=None) as cluster, distributed.Client(cluster) as c:
            (got,) = c.run(state).values()
            (timeout,) = c.run(lambda: dask.config.get("distributed.comm.timeouts.connect")).values()
            nanny_interval = [n.memory_manager.memory_monitor_interval for n in cluster.workers.values()]
    assert got == (False, False, 0.5) and timeout == "41s" and nanny_interval == [0.5]
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's config untouched
    prof = tmp_path / "prof.yaml"
    prof.write_text("cluster: local\ndask_config: {distributed.worker.profile.enabled: true}\n")
    _, kw, _ = cluster_kwargs(str(prof))
    assert kw["worker_dask_config"]["distributed.worker.profile.enabled"] is True


def test_jobqueue_job_script():
    pytest.importorskip("dask_jobqueue")
    from procsky.pipeline import open_cluster

    cluster = open_cluster(
        "slurm", walltime="02:00:00", queue="debug", adapt=None, scheduler_options={"dashboard_address": ":0"}
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p debug" in script and "#SBATCH -t 02:00:00" in script
    assert "export OMP_NUM_THREADS=1" in script
    assert "--lifetime 6360s --lifetime-stagger 240s" in script


def test_quantum_cpu_counts_helper_threads_only_when_alone():
    """A quantum's CPU is the process's while it runs alone in it (zarr codec threads and
    thread pools count), its thread's when another quantum overlapped it."""
    import threading

    from procsky.pipeline.executor import _Overlap

    ov = _Overlap()
    a = ov.open()
    assert ov.close(a) is True  # alone
    a = ov.open()
    b = ov.open()  # b starts while a runs: both overlapped
    assert ov.close(b) is False
    c = ov.open()  # a is still running
    assert ov.close(a) is False and ov.close(c) is False
    d = ov.open()
    assert ov.close(d) is True  # alone again

    # the process clock sees work done in a helper thread, the thread clock does not
    from procsky.pipeline.executor import _process_cpu

    def spin():
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass

    p0, t0 = _process_cpu(), time.thread_time()
    th = threading.Thread(target=spin)
    th.start()
    th.join()
    assert _process_cpu() - p0 >= 0.25 and time.thread_time() - t0 < 0.1
