"""The dask executor on a LocalCluster (2 worker processes): same outputs as a synchronous
run, bounded submission, a worker killed mid-run, a corrupted input, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

import toytasks as toy  # noqa: E402
from procsky.pipeline import DaskExecutor, Pipeline, run_pipeline, run_report  # noqa: E402
from procsky.pipeline.graph import load_states  # noqa: E402
from procsky.repo import Repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="2GiB"
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _repo(tmp_path, name="repo", **kw):
    r = Repo.create(tmp_path / name)
    toy.make_toy_inputs(r, **kw)
    return r


def _yaml(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(toy.TOY_PIPELINE_YAML)
    return p


def _checksums(repo, run):
    """{(dataset type, data ID): checksum} of every dataset of ``run``."""
    return {(r.dataset_type, json.dumps(r.data_id, sort_keys=True)): r.checksum for r in repo.query(run=run)}


def test_dask_matches_sync(client, tmp_path):
    repo = _repo(tmp_path)
    pipe = _yaml(tmp_path)
    s_sync = run_pipeline(repo, pipe, output="sync")
    ex_summary = run_pipeline(repo, pipe, output="dask", client=client, max_in_flight=2)
    assert s_sync.ok and ex_summary.ok
    assert ex_summary.counts == s_sync.counts
    a, b = _checksums(repo, "sync"), _checksums(repo, "dask")
    assert len(a) == 8 and a == b  # bit-identical files
    # provenance: work really ran on the worker processes
    rows = load_states(repo, "dask")
    pids = {json.loads(r["provenance"])["pid"] for r in rows}
    worker_pids = set(client.run(os.getpid).values())
    assert pids <= worker_pids and os.getpid() not in pids
    assert all(r["peak_memory"] > 0 and r["cpu_seconds"] >= 0 for r in rows)
    # dask's nanny set MALLOC_TRIM_THRESHOLD_ in the workers; running a quantum raised it
    # (procsky._malloc.tune_malloc) where the quantum ran
    ran = client.run(lambda: __import__("procsky._malloc", fromlist=["_done"])._done)
    assert any(ran[w] is True for w in ran), ran


def test_bounded_window(client, tmp_path):
    repo = Repo.create(tmp_path / "r")
    pipe = Pipeline.from_tasks([("noop", toy.ToyNoopTask, {"n": 60})])
    from procsky.pipeline.graph import build_graph

    graph = build_graph(repo, pipe, run="w")
    graph.save(repo)
    seen = []
    stop = threading.Event()

    def watch():  # the scheduler's task count, sampled while the run goes on
        while not stop.is_set():
            seen.append(len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))))
            time.sleep(0.01)

    th = threading.Thread(target=watch)
    th.start()
    ex = DaskExecutor(client, max_in_flight=5)
    try:
        summary = ex.execute(repo, graph)
    finally:
        stop.set()
        th.join()
    assert summary.counts["noop"]["succeeded"] == 60
    assert ex.max_seen_in_flight == 5
    assert max(seen) <= 5


def test_corrupted_input_fails_and_blocks(client, tmp_path):
    repo = _repo(tmp_path)
    bad = repo.find("toy_raw", {"instrument": "toycam", "visit": 1, "detector": 2})
    repo.path(bad).write_bytes(b"\x00garbage\x00" * 10)
    s = run_pipeline(repo, _yaml(tmp_path), output="o", client=client)
    assert s.counts["measure"]["succeeded"] == 5 and s.counts["measure"]["failed"] == 1
    assert s.counts["gather"]["succeeded"] == 1 and s.counts["gather"]["blocked"] == 1
    rep = run_report(repo, "o")
    (failed,) = [f for f in rep["failures"] if f["state"] == "failed"]
    assert failed["data_id"]["detector"] == 2 and failed["error_class"] == "ProcskyFileError"
    assert "cannot read Parquet" in failed["error_message"]
    (blocked,) = [f for f in rep["failures"] if f["state"] == "blocked"]
    assert blocked["data_id"] == {"instrument": "toycam", "visit": 1}


def test_worker_killed_mid_run(client, tmp_path):
    repo = _repo(tmp_path, visits=(1, 2, 3))
    pipe = _yaml(tmp_path)
    run_pipeline(repo, pipe, output="ref")
    worker_pids = client.run(os.getpid)
    result = {}

    def go():
        result["s"] = run_pipeline(repo, pipe, output="killed", client=client, config=["measure.sleep=0.4"])

    th = threading.Thread(target=go)
    th.start()
    # Wait until a quantum is running on the victim, then SIGKILL its process.
    victim_addr, victim_pid = sorted(worker_pids.items())[0]
    deadline = time.time() + 30
    while time.time() < deadline:
        processing = client.processing()
        if any(str(k).startswith("quantum-measure") for k in processing.get(victim_addr, ())):
            break
        time.sleep(0.05)
    time.sleep(0.1)
    os.kill(victim_pid, signal.SIGKILL)
    th.join(timeout=120)
    assert not th.is_alive()
    s = result["s"]
    assert s.ok, s
    # the nanny restarted the worker; every output identical to the undisturbed run
    client.wait_for_workers(2, timeout=30)
    assert _checksums(repo, "killed") == _checksums(repo, "ref")
    assert victim_pid not in client.run(os.getpid).values()


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "procsky", *args],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


@pytest.mark.slow  # two CLI processes, each starting its own LocalCluster (~40 s)
def test_driver_killed_and_resumed(tmp_path):
    repo = _repo(tmp_path, visits=(1, 2, 3))
    pipe = _yaml(tmp_path)
    args = [
        "run",
        str(pipe),
        "--repo",
        str(repo.root),
        "--output",
        "o",
        "--workers",
        "2",
        "--no-progress",
        "-c",
        "measure.sleep=0.3",
    ]
    # The subprocess starts its own LocalCluster; kill it once some quanta succeeded.
    proc = _cli(args, start_new_session=True)
    deadline = time.time() + 90
    done = []
    while time.time() < deadline and proc.poll() is None:
        try:
            done = [r for r in load_states(repo, "o") if r["state"] == "succeeded"]
        except Exception:
            done = []
        if len(done) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)  # driver and its worker processes
    proc.wait()
    before = {r["id"]: (r["end_time"], r["provenance"]) for r in load_states(repo, "o") if r["state"] == "succeeded"}
    assert 3 <= len(before) < 12
    # Restart with --resume: nothing that succeeded is redone; all outputs complete.
    proc = _cli(args + ["--resume"])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out.decode()
    rows = load_states(repo, "o")
    assert all(r["state"] == "succeeded" for r in rows) and len(rows) == 12
    after = {r["id"]: (r["end_time"], r["provenance"]) for r in rows}
    for qid, val in before.items():
        assert after[qid] == val
    ref = _repo(tmp_path, name="ref", visits=(1, 2, 3))
    run_pipeline(ref, pipe, output="o")
    assert _checksums(repo, "o") == _checksums(ref, "o")


def test_cli_on_running_scheduler(client, tmp_path):
    from click.testing import CliRunner

    from procsky.cli import main

    repo = _repo(tmp_path, visits=(1,))
    sched_file = tmp_path / "scheduler.json"
    # (Client.write_scheduler_file fails once workers report tuple-keyed metrics.)
    sched_file.write_text(json.dumps({"type": "Scheduler", "address": client.scheduler.address}))
    runner = CliRunner()
    for i, target in enumerate((client.scheduler.address, str(sched_file))):
        res = runner.invoke(
            main,
            [
                "run",
                str(_yaml(tmp_path)),
                "--repo",
                str(repo.root),
                "--output",
                f"cli{i}",
                "--scheduler",
                target,
                "--no-progress",
            ],
        )
        assert res.exit_code == 0, res.output
        assert "dask dashboard: http" in res.output and "measure: succeeded 3" in res.output
    assert _checksums(repo, "cli0") == _checksums(repo, "cli1")


def test_transient_classification():
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    from procsky.errors import AlgorithmError, ProcskyFileError, TransientError
    from procsky.pipeline.executor import _is_transient

    assert _is_transient(KilledWorker("k", "w", 3))
    assert _is_transient(CommClosedError("gone"))
    assert _is_transient(TransientError("flaky"))
    assert _is_transient(OSError(5, "Input/output error"))
    assert not _is_transient(ProcskyFileError("truncated parquet"))
    assert not _is_transient(AlgorithmError("too few stars"))
    assert not _is_transient(ValueError("bad"))


def test_tolerate_missing_runs_on_the_survivors(tmp_path):
    """A gathered input with ``tolerate_missing`` runs on the detectors that succeeded and
    lists the missing ones in its provenance; it is still blocked when all of them failed."""
    repo = _repo(tmp_path)
    for det in (0, 1, 2):  # visit 2: every detector broken
        bad = repo.find("toy_raw", {"instrument": "toycam", "visit": 2, "detector": det})
        repo.path(bad).write_bytes(b"\x00garbage\x00" * 10)
    bad = repo.find("toy_raw", {"instrument": "toycam", "visit": 1, "detector": 2})
    repo.path(bad).write_bytes(b"\x00garbage\x00" * 10)
    pipe = Pipeline.from_tasks([("measure", toy.ToyMeasureTask), ("gather", toy.ToyGatherTolerantTask)])
    s = run_pipeline(repo, pipe, output="t")
    assert s.counts["measure"] == {**s.counts["measure"], "succeeded": 2, "failed": 4}
    assert s.counts["gather"]["succeeded"] == 1 and s.counts["gather"]["blocked"] == 1
    summary = repo.get("toy_visit", {"instrument": "toycam", "visit": 1}, run="t")
    assert summary["detectors"] == [0, 1]
    (row,) = [r for r in load_states(repo, "t") if r["task"] == "gather" and r["state"] == "succeeded"]
    prov = json.loads(row["provenance"])
    assert prov["missing_inputs"] == {"stats": [{"instrument": "toycam", "visit": 1, "detector": 2}]}
    with pytest.raises(ValueError, match="tolerate_missing needs multiple"):
        toy.Input("toy_stats", ("visit",), tolerate_missing=True)


class _LazyNoWorkTask(toy.Task):
    """Returns a lazy exposure whose computation finds nothing to do (as a difference image
    whose template turns out not to overlap does)."""

    dimensions = ("instrument", "visit", "detector")
    inputs = {"raw": toy.Input("toy_raw", ("instrument", "visit", "detector"))}
    outputs = {"image": toy.Output("toy_lazy_image", ("instrument", "visit", "detector"))}
    Config = toy.TaskConfig

    def run(self, raw):
        import dask
        import dask.array as da

        from procsky.errors import NoWorkError
        from procsky.exposure import Exposure

        def fail():
            raise NoWorkError("nothing overlaps")

        image = da.from_delayed(dask.delayed(fail)(), shape=(8, 8), dtype="float32")
        return {"image": Exposure(image)}


def test_no_work_found_while_writing_a_lazy_output(tmp_path):
    """A NoWorkError raised while the executor computes a lazy output is the quantum's
    no_work outcome, not a write failure, and leaves no file behind."""
    repo = _repo(tmp_path)
    pipe = Pipeline.from_tasks([("lazy", _LazyNoWorkTask)])
    s = run_pipeline(repo, pipe, output="t", where="visit = 1")
    assert s.counts["lazy"] == {**s.counts["lazy"], "no_work": 3}
    assert not s.counts["lazy"].get("failed")
    assert not list((repo.root / "t").rglob("*.zarr"))
