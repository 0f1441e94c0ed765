"""A real SLURM run: a one-node slurmctld/slurmd on loopback (tests/slurmserver.py), dask
workers started by sbatch through the ``slurm`` cluster profile, the toy pipeline run on
them, outputs checked against a synchronous run, everything shut down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurmserver import SlurmServer

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = SlurmServer.unavailable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("dask_jobqueue")
    server = SlurmServer(tmp_path_factory.mktemp("slurm"), cpus=2, memory_mb=4000)
    server.start()
    yield server
    server.stop()


def test_pipeline_on_slurm(slurm, tmp_path, monkeypatch):
    import distributed

    import toytasks as toy
    from procsky.pipeline import open_cluster, run_pipeline
    from procsky.pipeline.graph import load_states
    from procsky.repo import Repo

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    repo = Repo.create(tmp_path / "repo")
    toy.make_toy_inputs(repo, visits=(1, 2))
    pipe = tmp_path / "toy.yaml"
    pipe.write_text(toy.TOY_PIPELINE_YAML)
    run_pipeline(repo, pipe, output="ref")

    cluster = open_cluster(
        "slurm",
        queue="debug",
        cores=1,
        processes=1,
        memory="1GiB",
        walltime="00:30:00",
        lifetime_margin="5m",
        jobs=2,
        adapt=None,
        python=sys.executable,
        local_directory=str(tmp_path / "dask-local"),
        log_directory=str(tmp_path / "dask-logs"),
        job_script_prologue=[f"export PYTHONPATH={ROOT}:{ROOT}/tests"],
        scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"},
    )
    try:
        script = cluster.job_script()
        assert "#SBATCH -p debug" in script and "export OMP_NUM_THREADS=1" in script
        assert "--lifetime 1260s --lifetime-stagger 240s" in script
        with distributed.Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            assert "RUNNING" in slurm.squeue()
            summary = run_pipeline(repo, pipe, output="slurm", client=client)
            worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    finally:
        cluster.close()
    assert summary.ok, (summary, slurm.logs())
    ref = {(r.dataset_type, json.dumps(r.data_id, sort_keys=True)): r.checksum for r in repo.query(run="ref")}
    got = {(r.dataset_type, json.dumps(r.data_id, sort_keys=True)): r.checksum for r in repo.query(run="slurm")}
    assert len(got) == 8 and got == ref
    pids = {json.loads(r["provenance"])["pid"] for r in load_states(repo, "slurm")}
    assert pids <= worker_pids  # the quanta ran in the sbatch-started workers
