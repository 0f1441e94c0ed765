"""`procsky run` checks everything it can before a cluster starts, bounds the wait for
workers, shows the dashboard link only when it works, and ends quietly on Ctrl-C."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import toytasks as toy
from procsky.cli import main
from procsky.errors import ProcskyError, ProcskyFileError
from procsky.pipeline import clusters
from procsky.pipeline.graph import graph_tables
from procsky.repo import Repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(toy_repo):
    return toy_repo


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if anything tries to start a cluster."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started before the checks failed")

    monkeypatch.setattr(clusters, "connect", refuse)
    monkeypatch.setattr(clusters, "open_cluster", refuse)


def _stored(repo, run: str) -> int:
    """Quanta and run rows stored for ``run``."""
    import sqlalchemy as sa

    t = graph_tables(repo)
    with repo.registry.engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count()).select_from(t["quantum"]).where(t["quantum"].c.run == run)
        ).scalar_one()
        n += conn.execute(sa.select(sa.func.count()).select_from(t["run"]).where(t["run"].c.run == run)).scalar_one()
    return n


def _bin_dir(tmp_path, stubs=()) -> Path:
    """A PATH directory holding only python (and shell stubs that log their calls)."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "python").symlink_to(sys.executable)
    for name in stubs:
        p = d / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls.log"\necho "Submitted batch job 4242"\n')
        p.chmod(0o755)
    return d


# -- missing batch system / package ----------------------------------------------------------


def test_missing_sbatch_fails_fast_and_stores_nothing(tmp_path, monkeypatch, no_cluster):
    pytest.importorskip("dask_jobqueue")
    r = Repo.create(tmp_path / "empty")
    monkeypatch.setenv("PATH", str(_bin_dir(tmp_path)))
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        main, ["run", "drp", "--repo", str(r.root), "--output", "o", "--cluster", "slurm", "--no-progress"]
    )
    elapsed = time.perf_counter() - t0
    print(f"slurm-missing error after {elapsed:.2f} s")
    assert res.exit_code not in (0, None), res.output
    assert "sbatch" in res.output and "slurm-wlm" in res.output and "apt-get install" in res.output
    assert "Traceback" not in res.output
    assert elapsed < 10
    assert _stored(r, "o") == 0


@pytest.mark.parametrize(
    "kind, words",
    [
        ("slurm", ["sbatch", "slurm-client", "slurm-wlm"]),
        ("pbs", ["qsub", "OpenPBS", "Torque"]),
        ("htcondor", ["condor_submit", "htcondor"]),
        ("lsf", ["bsub", "no Debian package"]),
        ("sge", ["qsub", "gridengine-client"]),
    ],
)
def test_batch_tool_messages(tmp_path, monkeypatch, kind, words):
    monkeypatch.setenv("PATH", str(_bin_dir(tmp_path)))
    with pytest.raises(ProcskyFileError) as info:
        clusters.require_batch_tools(kind, kind)
    for w in words + ["--cluster local"]:
        assert w in str(info.value)


def test_missing_jobqueue_names_the_extra(monkeypatch, no_cluster):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import raises ImportError
    with pytest.raises(ProcskyError, match=re.escape("pip install 'procsky[hpc]'")):
        clusters.check_profile("slurm", require_tools=False)


# -- everything else is checked before a cluster starts ------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--where", "visit = = 1"], "visit = = 1"),  # does not parse
        (["--where", "vist=1"], "did you mean 'visit'"),  # unknown dimension
        (["-c", "measure.nope=3"], "nope"),  # unknown config field
        (["-c", "gather.threshold=[1"], "not valid YAML"),  # unreadable value
        (["-c", "nosuchtask.x=1"], "unknown task"),
        (["--tasks", "mesure"], "no task 'mesure'"),
        (["--cluster", "nosuchprofile"], "no cluster profile 'nosuchprofile'"),
        (["--resume"], "no quanta to resume"),
    ],
)
def test_bad_arguments_fail_before_any_cluster(repo, toy_yaml, no_cluster, extra, message):
    res = CliRunner().invoke(
        main, ["run", str(toy_yaml), "--repo", str(repo.root), "--output", "o", "--no-progress", *extra]
    )
    assert res.exit_code not in (0, None), res.output
    assert message in res.output, res.output
    assert _stored(repo, "o") == 0


def test_missing_repo_and_skymap_fail_before_any_cluster(tmp_path, no_cluster):
    runner = CliRunner()
    res = runner.invoke(main, ["run", "drp", "--repo", str(tmp_path / "nope"), "--output", "o"])
    assert res.exit_code not in (0, None) and "no repository" in res.output, res.output
    r = Repo.create(tmp_path / "empty")
    res = runner.invoke(main, ["run", "drp", "--repo", str(r.root), "--output", "o", "--no-progress"])
    assert res.exit_code not in (0, None), res.output
    assert "no 'skymap' dataset named 'default'" in res.output
    assert "procsky skymap register" in res.output
    res = runner.invoke(main, ["run", "drp", "--repo", str(r.root), "--output", "o", "-c", "calibrate.threshold=5"])
    assert res.exit_code not in (0, None) and "threshold" in res.output, res.output
    assert _stored(r, "o") == 0


def test_run_help_config_examples_are_valid():
    from procsky.cli.pipeline_cmds import run_cmd
    from procsky.pipeline import load_pipeline

    examples = [line.strip() for line in run_cmd.help.splitlines() if line.strip().startswith("procsky run")]
    with_c = [e for e in examples if " -c " in e]
    assert with_c, examples
    for example in with_c:
        words = shlex.split(example)
        pipeline = words[2]
        overrides = [words[i + 1] for i, w in enumerate(words) if w in ("-c", "--config")]
        load_pipeline(pipeline, overrides)  # raises on an unknown task or field


# -- bounded wait for workers ---------------------------------------------------------------------


def _profile(tmp_path, text: str) -> Path:
    p = tmp_path / "profile.yaml"
    p.write_text(text)
    return p


def test_local_cluster_without_workers_times_out(repo, toy_yaml, tmp_path):
    prof = _profile(tmp_path, "cluster: local\noptions: {n_workers: 0, processes: false, dashboard_address: ':0'}\n")
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(toy_yaml),
            "--repo",
            str(repo.root),
            "--output",
            "o",
            "--cluster",
            str(prof),
            "--worker-timeout",
            "2",
            "--no-progress",
        ],
    )
    elapsed = time.perf_counter() - t0
    print(f"local worker timeout (2 s) reported after {elapsed:.1f} s")
    assert res.exit_code not in (0, None), res.output
    assert "no dask worker started within 2 s" in res.output
    assert elapsed < 30
    assert _stored(repo, "o") == 0  # nothing half-made: the graph is stored only once a worker joined


def test_batch_jobs_that_never_start_time_out_and_are_cancelled(repo, toy_yaml, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("PATH", str(_bin_dir(tmp_path, ("sbatch", "squeue", "scancel"))))
    prof = _profile(
        tmp_path,
        """\
cluster: slurm
options: {cores: 1, processes: 1, memory: 1GiB, walltime: "01:00:00",
          scheduler_options: {dashboard_address: ":0"}}
scale: {jobs: 1}
worker_timeout: 3
""",
    )
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        main, ["run", str(toy_yaml), "--repo", str(repo.root), "--output", "o", "--cluster", str(prof), "--no-progress"]
    )
    elapsed = time.perf_counter() - t0
    print(f"batch worker timeout (3 s) reported after {elapsed:.1f} s")
    assert res.exit_code not in (0, None), res.output
    assert "no dask worker joined within 3 s" in res.output and "1 job(s) submitted" in res.output
    assert "squeue" in res.output and "--worker-timeout" in res.output
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("sbatch")
    assert any(c.startswith("scancel") and "4242" in c for c in calls), calls  # job cancelled
    assert elapsed < 60
    assert _stored(repo, "o") == 0


def test_worker_timeout_from_profile_and_default():
    assert clusters.check_profile("local").worker_timeout == 60
    spec = clusters.check_profile("slurm", require_tools=False)
    assert spec.worker_timeout == 300 and spec.min_workers == 1
    assert clusters.check_profile("local", worker_timeout="2m").worker_timeout == 120


# -- dashboard ----------------------------------------------------------------------------------------


class _FakeClient:
    dashboard_link = "http://127.0.0.1:8787/status"

    def __init__(self, serves):
        self.serves = serves

    def run_on_scheduler(self, func):
        return self.serves


def test_dashboard_link_only_when_served():
    assert clusters.dashboard_status(_FakeClient(True)) == (_FakeClient.dashboard_link, None)
    link, hint = clusters.dashboard_status(_FakeClient(False))
    assert link is None and "bokeh>=3.1" in hint and "dashboard" in hint


def test_dashboard_of_a_real_scheduler():
    distributed = pytest.importorskip("distributed")
    bokeh_ok = True
    try:
        import distributed.dashboard.scheduler
    except ImportError:
        bokeh_ok = False
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cl,
        distributed.Client(cl) as client,
    ):
        link, hint = clusters.dashboard_status(client)
    assert (link is not None and link.startswith("http")) == bokeh_ok
    assert (hint is None) == bokeh_ok


# -- Ctrl-C -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # a CLI process starting its own LocalCluster (~20-40 s on 2 busy cores)
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    from procsky.pipeline.graph import load_states

    r = Repo.create(tmp_path / "repo")
    toy.make_toy_inputs(r, visits=(1, 2))
    pipe = tmp_path / "toy.yaml"
    pipe.write_text(toy.TOY_PIPELINE_YAML)
    prof = _profile(
        tmp_path,
        "cluster: local\noptions: {n_workers: 2, threads_per_worker: 1, "
        "processes: true, memory_limit: 2GiB, dashboard_address: ':0'}\n",
    )
    args = [
        "run",
        str(pipe),
        "--repo",
        str(r.root),
        "--output",
        "o",
        "--cluster",
        str(prof),
        "--no-progress",
        "-c",
        "measure.sleep=1.5",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A new session stands for the terminal's foreground process group: SIGINT to the group
    # reaches the driver and its worker processes, as Ctrl-C does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "procsky", *args],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if any(row["state"] == "succeeded" for row in load_states(r, "o")):
                    break
            except Exception:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"exit {time.time() - t0:.1f} s after SIGINT; stderr:\n{err.decode()}")
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 130, err.decode()
    assert len(lines) < 5, err.decode()
    last = lines[-1]
    assert last.startswith("Interrupted: ") and "pending; resume with `procsky run" in last, last
    assert "--resume`" in last
    n_done, n_pending = map(int, re.findall(r"(\d+) quanta finished, (\d+) pending", last)[0])
    states = [row["state"] for row in load_states(r, "o")]
    assert n_done == sum(s != "pending" for s in states) and n_pending == states.count("pending")
    assert n_done >= 1 and n_pending >= 1
    # no worker process left behind
    time.sleep(2)
    ps = subprocess.run(["ps", "-s", str(proc.pid), "-o", "stat=,pid=,args="], capture_output=True, text=True)
    left = [line for line in ps.stdout.splitlines() if line.strip() and not line.strip().startswith("Z")]
    assert not left, left


# -- degraded modes known in advance ------------------------------------------------------------------


def test_calibrate_without_refcat_is_announced(tmp_path, no_cluster):
    import numpy as np
    from astropy.wcs import WCS

    from procsky.exposure import Exposure, VisitInfo
    from procsky.pipeline.run import plan_run

    r = Repo.create(tmp_path / "repo")
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [30.5, 20.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    vi = VisitInfo(
        exposure_time=30.0,
        mjd=60000.25,
        band="g",
        physical_filter="g_1",
        airmass=1.1,
        boresight_ra=150.0,
        boresight_dec=2.0,
        rotation_angle=0.0,
        observatory="sim",
        instrument="simcam",
        visit=12,
    )
    image = np.full((40, 60), 100.0, np.float32)
    exp = Exposure(image, np.full_like(image, 25.0), np.zeros(image.shape, np.uint32), wcs=wcs, visit_info=vi)
    r.put(exp, "isr_exposure", {"instrument": "simcam", "visit": 12, "detector": 0}, "isr")
    plan = plan_run(r, "drp", tasks="calibrate", output="o")
    assert plan.todo == 1
    assert len(plan.warnings) == 1
    assert "calibrate: no reference catalogue" in plan.warnings[0]
    assert "header WCS and zero point" in plan.warnings[0]
    assert _stored(r, "o") == 0  # planning stores nothing
    res = CliRunner().invoke(
        main, ["run", "drp", "--repo", str(r.root), "--output", "o", "--tasks", "calibrate", "--sync", "--no-progress"]
    )
    warning = [line for line in res.output.splitlines() if line.startswith("warning: calibrate:")]
    assert len(warning) == 1, res.output
    assert res.output.index(warning[0]) < res.output.index("run 'o'")  # before running
