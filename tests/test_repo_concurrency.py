"""Concurrent writers and crashed writers (SQLite and a throw-away PostgreSQL).

8 processes each put 200 small datasets into one repository at the same time, and all
race for the same 10 "shared" data IDs: afterwards every dataset is registered exactly
once, its file is complete (checksum and content), exactly one writer won each shared ID,
and no temporary files are left. A writer SIGKILLed between writing its files and
registering them leaves nothing registered, and the next put of that ID succeeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procsky.repo import Repo
from procsky.repo.butler import PAUSE_ENV

sys.path.insert(0, str(Path(__file__).parent))
import pgserver

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_PROC = 8
N_EACH = 200
N_SHARED = 10

WRITER = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    from procsky.errors import ConflictError
    from procsky.repo import Repo

    root, worker, n_each, n_shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    repo = Repo(root)
    won = []
    for i in range(n_each):
        data_id = {"instrument": "simcam", "visit": worker, "detector": i}
        if i % 20 == 0:  # a few tiny tables among the JSON documents
            repo.put(pd.DataFrame({"worker": [worker], "i": [i]}), "tiny_table", data_id, "run1")
        else:
            repo.put({"worker": worker, "i": i}, "tiny", data_id, "run1",
                     provenance={"task": "writer", "quantum_id": f"q{worker}-{i}"})
        if i < n_shared:
            try:
                repo.put({"worker": worker, "i": i}, "shared",
                         {"instrument": "simcam", "visit": 999, "detector": i}, "run1")
                won.append(i)
            except ConflictError:
                pass
    print(json.dumps(won))
    """
)


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run_writers(root: Path, n_each: int = N_EACH) -> list[list[int]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(w), str(n_each), str(N_SHARED)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for w in range(N_PROC)
    ]
    wins = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"writer failed:\n{err[-3000:]}"
        wins.append(json.loads(out.strip().splitlines()[-1]))
    return wins


def _check_repository(repo: Repo, wins: list[list[int]], n_each: int = N_EACH) -> None:
    refs = repo.query(run="run1")
    n_tables = len(range(0, n_each, 20))
    by_type: dict[str, list] = {}
    for ref in refs:
        by_type.setdefault(ref.dataset_type, []).append(ref)
    # No lost and no duplicated datasets.
    assert len(by_type["tiny"]) == N_PROC * (n_each - n_tables)
    assert len(by_type["tiny_table"]) == N_PROC * n_tables
    assert len(by_type["shared"]) == N_SHARED
    keys = [(r.dataset_type, json.dumps(r.data_id, sort_keys=True)) for r in refs]
    assert len(set(keys)) == len(keys)
    assert len({r.id for r in refs}) == len(refs)
    expected = {(w, i) for w in range(N_PROC) for i in range(n_each)}
    got = {(r.data_id["visit"], r.data_id["detector"]) for r in refs if r.dataset_type != "shared"}
    assert got == expected
    # Exactly one winner per shared data ID, and its file holds the winner's content.
    winners = {}
    for w, won in enumerate(wins):
        for i in won:
            assert i not in winners, f"shared detector {i} won twice"
            winners[i] = w
    assert sorted(winners) == list(range(N_SHARED))
    for ref in by_type["shared"]:
        content = repo.get(ref)
        assert content == {"worker": winners[ref.data_id["detector"]], "i": ref.data_id["detector"]}
    # No half-written datasets: every file is there and matches its checksum.
    assert repo.verify(refs) == []
    for ref in random.Random(1).sample(by_type["tiny"], 50):
        assert repo.get(ref) == {"worker": ref.data_id["visit"], "i": ref.data_id["detector"]}
        assert ref.provenance["quantum_id"] == f"q{ref.data_id['visit']}-{ref.data_id['detector']}"
    for ref in by_type["tiny_table"][:10]:
        df = repo.get(ref)
        assert df["worker"].tolist() == [ref.data_id["visit"]]
    # No temporary or trash files left behind.
    leftovers = [p for p in repo.root.rglob("*") if ".tmp-" in p.name or ".trash-" in p.name]
    assert leftovers == []
    assert repo.orphans(min_age=0) == []


def test_concurrent_writers_sqlite(tmp_path):
    repo = Repo.create(tmp_path / "repo")
    t0 = time.perf_counter()
    wins = _run_writers(repo.root)
    elapsed = time.perf_counter() - t0
    _check_repository(repo, wins)
    print(f"sqlite: {N_PROC * (N_EACH + N_SHARED)} puts by {N_PROC} processes in {elapsed:.1f} s")


@pytest.fixture(scope="module")
def pg():
    reason = pgserver.skip_reason()
    if reason:
        pytest.skip(reason)
    server = pgserver.PgServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "n_each", [pytest.param(50, id="8x50"), pytest.param(N_EACH, id="8x200", marks=pytest.mark.slow)]
)
def test_concurrent_writers_postgres(tmp_path, pg, n_each):
    repo = Repo.create(tmp_path / "repo", registry=pg.create_database())
    t0 = time.perf_counter()
    wins = _run_writers(repo.root, n_each)
    elapsed = time.perf_counter() - t0
    _check_repository(repo, wins, n_each)
    repo.registry.close()
    print(f"postgres: {N_PROC * (n_each + N_SHARED)} puts by {N_PROC} processes in {elapsed:.1f} s")


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from procsky.repo import Repo
    repo = Repo(sys.argv[1])
    repo.put({"writer": "killed"}, "tiny", {"instrument": "simcam", "visit": 1, "detector": 1}, "run1")
    """
)


def _killed_put(repo: Repo) -> Path:
    """Start a put that pauses before registering; SIGKILL it once its file is in place."""
    final = repo.root / "run1/tiny/instrument=simcam/visit=1/detector=1.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(repo.root)],
        env=_env(**{PAUSE_ENV: "60"}),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not final.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "writer never wrote its file"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return final


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_writer_killed_before_registration(tmp_path, backend, request):
    registry = None
    if backend == "postgres":
        registry = request.getfixturevalue("pg").create_database()
    repo = Repo.create(tmp_path / "repo", registry=registry)
    final = _killed_put(repo)
    # The complete file is there, but nothing is registered: the dataset does not exist.
    assert final.exists()
    reopened = Repo(repo.root)
    assert reopened.query("tiny") == []
    assert reopened.find("tiny", {"instrument": "simcam", "visit": 1, "detector": 1}) is None
    assert reopened.orphans(min_age=0) == [final]
    # The repository still accepts the next put of the same data ID (leftover replaced).
    ref = reopened.put({"writer": "next"}, "tiny", {"instrument": "simcam", "visit": 1, "detector": 1}, "run1")
    assert reopened.get("tiny", {"instrument": "simcam", "visit": 1, "detector": 1}) == {"writer": "next"}
    assert reopened.verify([ref]) == []
    assert reopened.orphans(min_age=0) == []
    reopened.registry.close()
    repo.registry.close()


KILL_LOOP_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import pandas as pd
    from procsky.errors import ConflictError
    from procsky.repo import Repo
    repo = Repo(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    for i in range(100000):
        data_id = {"instrument": "simcam", "visit": int(rng.integers(0, 2)), "detector": int(rng.integers(0, 12))}
        try:
            repo.put(pd.DataFrame({"v": rng.normal(size=200)}), "tiny_table", data_id, "run1")
        except ConflictError:
            pass
        if i == 0:
            print("started", flush=True)
    """
)


def test_writers_killed_at_random_times(tmp_path):
    """SIGKILL writers at random moments; every registered dataset stays complete."""
    repo = Repo.create(tmp_path / "repo")
    rng = random.Random(42)
    for attempt in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", KILL_LOOP_WRITER, str(repo.root), str(attempt * 10 + k)],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for k in range(2)
        ]
        for p in procs:  # wait until both have done one put, then kill at a random moment
            assert p.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.0, 0.5))
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
            p.stdout.close()
        reopened = Repo(repo.root)
        refs = reopened.query("tiny_table") if any(dt.name == "tiny_table" for dt in reopened.dataset_types()) else []
        assert reopened.verify(refs) == []
        for ref in refs[:5]:
            assert len(reopened.get(ref)) == 200
    # The repository still opens and accepts new puts, including over leftovers.
    n_before = len(repo.query("tiny_table"))
    assert n_before > 0, "no writer got far enough to register anything"
    for visit in range(2):
        for det in range(12):
            if repo.find("tiny_table", {"instrument": "simcam", "visit": visit, "detector": det}) is None:
                import pandas as pd

                repo.put(
                    pd.DataFrame({"v": [1.0]}),
                    "tiny_table",
                    {"instrument": "simcam", "visit": visit, "detector": det},
                    "run1",
                )
    refs = repo.query("tiny_table")
    assert len(refs) == 2 * 12
    assert repo.verify(refs) == []
    leftovers = [p for p in repo.root.rglob("*") if ".tmp-" in p.name]
    # Temporary files of killed writers may remain (they are never registered) and are
    # reported by orphans() for cleanup.
    assert set(leftovers) <= set(repo.orphans(min_age=0))
