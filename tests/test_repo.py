"""The data repository: creation, put/get round trips for each storage class, queries,
runs and chains, dimension records, pending writes in a caller's transaction, removal,
and the CLI (``procsky repo create``, ``query``, ``show``, ``prune``)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from procsky.cli import main
from procsky.errors import (
    ConflictError,
    ProcskyFileError,
    ProcskyKeyError,
    ProcskyTypeError,
    ProcskyValueError,
    QuerySyntaxError,
)
from procsky.repo import DatasetRef, Repo

VD = {"instrument": "simcam", "visit": 12, "detector": 3}


@pytest.fixture
def repo(tmp_path):
    r = Repo.create(tmp_path / "repo")
    yield r
    r.registry.close()


def _exposure(seed=0, band="g"):
    from astropy.wcs import WCS

    from procsky.exposure import Exposure, VisitInfo

    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, (40, 60)).astype(np.float32)
    variance = np.full_like(image, 25.0)
    mask = np.zeros(image.shape, np.uint32)
    mask[0, :] = 1  # BAD
    mask[5, 7] = 2  # SAT
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [30.5, 20.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    vi = VisitInfo(
        exposure_time=30.0,
        mjd=60000.25,
        band=band,
        physical_filter=f"{band}_1",
        airmass=1.1,
        boresight_ra=150.0,
        boresight_dec=2.0,
        rotation_angle=0.0,
        observatory="sim",
        instrument="simcam",
        visit=12,
    )
    return Exposure(image, variance, mask, wcs=wcs, visit_info=vi, metadata={"note": "x"})


# --------------------------------------------------------------------------- creation
def test_create_and_open(tmp_path):
    root = tmp_path / "r"
    repo = Repo.create(root)
    assert repo.root == root and (root / "procsky.yaml").is_file()
    assert (root / "registry.sqlite3").is_file()
    names = {dt.name for dt in repo.dataset_types()}
    assert {
        "raw",
        "calexp",
        "src",
        "bias",
        "dark",
        "flat",
        "warp",
        "coadd",
        "template",
        "object",
        "forced_source",
        "diff",
        "dia_source",
        "dia_object",
        "dia_forced_source",
        "metrics",
        "summary",
        "refcat",
    } <= names
    assert Repo(root).root == root
    with pytest.raises(ProcskyFileError, match="already a procsky repository"):
        Repo.create(root)
    assert Repo.create(root, exist_ok=True).root == root
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ProcskyFileError, match="not empty"):
        Repo.create(tmp_path / "full")


def test_open_bad_paths(tmp_path):
    with pytest.raises(ProcskyFileError, match="does not exist.*procsky repo create"):
        Repo(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ProcskyFileError, match="not a procsky repository"):
        Repo(tmp_path / "plain")


# --------------------------------------------------------------------------- round trips
def test_put_get_dict(repo):
    ref = repo.put(
        {"n": np.int64(3), "x": np.array([1.5, 2.0]), "s": "a"},
        "metrics",
        {"instrument": "simcam", "visit": 12},
        "run1",
        provenance={"task": "t1"},
    )
    assert isinstance(ref, DatasetRef)
    assert ref.uri == "run1/metrics/instrument=simcam/visit=12.json"
    assert (repo.root / ref.uri).is_file()
    assert ref.storage_class == "StructuredData" and ref.checksum.startswith("sha256:")
    assert ref.provenance["task"] == "t1"
    assert repo.get("metrics", {"instrument": "simcam", "visit": 12}) == {"n": 3, "x": [1.5, 2.0], "s": "a"}
    d = ref.to_dict()
    assert {"dataset_type", "run", "data_id", "uri"} <= set(d)
    json.dumps(d)


def test_put_get_dataframe_with_units(repo):
    df = pd.DataFrame({"ra": [1.0, 2.0, 3.0], "flux": [10.0, 20.0, np.nan], "flag": [True, False, True]})
    df.attrs["units"] = {"ra": "deg", "flux": "nJy"}
    ref = repo.put(df, "src", VD, "run1")
    assert ref.uri == "run1/src/instrument=simcam/visit=12/detector=3.parquet"
    back = repo.get("src", VD)
    pd.testing.assert_frame_equal(back, df, check_like=False)
    assert back.attrs["units"] == {"ra": "deg", "flux": "nJy"}
    # Units are also in the Parquet schema, for astropy/pyarrow readers.
    import pyarrow.parquet as pq

    schema = pq.read_schema(repo.path(ref))
    assert schema.field("flux").metadata[b"unit"] == b"nJy"


def test_put_astropy_table(repo):
    import astropy.units as u
    from astropy.table import Table

    t = Table({"ra": [1.0, 2.0] * u.deg, "mag": [20.5, 21.0]})
    repo.put(t, "object", {"skymap": "sm", "tract": 1, "patch": 2}, "run1")
    back = repo.get("object", {"skymap": "sm", "tract": 1, "patch": 2})
    assert back["ra"].tolist() == [1.0, 2.0]
    assert back.attrs["units"] == {"ra": "deg"}


def test_fsync_repository(tmp_path):
    repo = Repo.create(tmp_path / "durable", fsync=True)
    assert Repo(repo.root).fsync
    ref = repo.put(_exposure(), "calexp", VD, "run1")
    assert repo.verify([ref]) == []
    assert repo.put({"a": 1}, "metrics", {"visit": 1}, "run1").uri.endswith(".json")
    repo.registry.close()


def test_put_get_exposure_lazy(repo):
    import dask.array as da

    exp = _exposure()
    ref = repo.put(exp, "calexp", VD, "run1")
    assert ref.uri.endswith("visit=12/detector=3.zarr") and repo.path(ref).is_dir()
    back = repo.get("calexp", VD)
    assert isinstance(back.image, da.Array)  # lazy
    np.testing.assert_array_equal(back.image.compute(), exp.image)
    np.testing.assert_array_equal(back.mask.compute(), exp.mask)
    assert back.visit_info.band == "g"
    ra, dec = back.pixel_to_sky(29.5, 19.5)
    assert abs(float(ra) - 150.0) < 1e-9 and abs(float(dec) - 2.0) < 1e-9
    assert repo.verify([ref]) == []


def test_storage_class_and_dimension_checks(repo):
    with pytest.raises(ProcskyTypeError, match="stored as Exposure"):
        repo.put({"a": 1}, "calexp", VD, "run1")
    with pytest.raises(ProcskyValueError, match="lacks"):
        repo.put(pd.DataFrame({"a": [1]}), "src", {"visit": 1}, "run1")
    with pytest.raises(ProcskyTypeError, match="must be an integer"):
        repo.put({"a": 1}, "metrics", {"visit": "12"}, "run1")
    with pytest.raises(ProcskyTypeError, match="cannot store"):
        repo.put(object(), "newtype", {"visit": 1}, "run1")
    with pytest.raises(ProcskyValueError, match="run name"):
        repo.put({"a": 1}, "metrics", {"visit": 1}, "../escape")
    # An unknown dataset type is declared on first put from the data ID and the object.
    repo.put(pd.DataFrame({"a": [1]}), "my_table", {"tract": 1, "band": "r"}, "run1")
    dt = {d.name: d for d in repo.dataset_types()}["my_table"]
    assert dt.dimensions == ("tract", "band") and dt.storage_class == "DataFrame"
    with pytest.raises(ProcskyTypeError):
        repo.put({"a": 1}, "my_table", {"tract": 2, "band": "r"}, "run1")
    # Nothing half-written is left by the failed puts.
    assert not [p for p in repo.root.rglob("*") if ".tmp-" in p.name]


def test_conflict_and_remove(repo):
    ref = repo.put({"v": 1}, "metrics", {"visit": 1}, "run1")
    with pytest.raises(ConflictError, match="already registered"):
        repo.put({"v": 2}, "metrics", {"visit": 1}, "run1")
    assert repo.get("metrics", {"visit": 1}) == {"v": 1}
    repo.put({"v": 2}, "metrics", {"visit": 1}, "run2")  # other run: fine
    assert repo.remove([ref]) == 1
    assert not repo.path(ref).exists()
    assert repo.find("metrics", {"visit": 1}, run="run1") is None
    repo.put({"v": 3}, "metrics", {"visit": 1}, "run1")
    assert repo.get("metrics", {"visit": 1}, run="run1") == {"v": 3}


def test_get_missing_raises_with_hint(repo):
    repo.put({"v": 1}, "metrics", {"visit": 1}, "run1")
    with pytest.raises(ProcskyKeyError, match="procsky query"):
        repo.get("metrics", {"visit": 2})
    with pytest.raises(ProcskyKeyError, match="no dataset type 'nosuch'"):
        repo.get("nosuch", {"visit": 2})
    with pytest.raises(ProcskyKeyError, match="no run or chain"):
        repo.get("metrics", {"visit": 1}, run="nosuchrun")


def test_verify_detects_corruption(repo):
    ref = repo.put({"v": 1}, "metrics", {"visit": 1}, "run1")
    repo.path(ref).write_text('{"v": 2}')
    assert repo.verify([ref]) == [(ref, "checksum mismatch")]


# --------------------------------------------------------------------------- queries
def _fill(repo):
    repo.add_dimension_records(
        "visit",
        [
            {"instrument": "simcam", "visit": v, "band": "g" if v % 2 else "r", "physical_filter": "x"}
            for v in range(1, 7)
        ],
    )
    for v in range(1, 7):
        for d in range(2):
            repo.put(
                pd.DataFrame({"v": [v], "d": [d]}), "src", {"instrument": "simcam", "visit": v, "detector": d}, "run1"
            )
    for t in (0, 1):
        for p in range(3):
            repo.put({"t": t, "p": p}, "metrics", {"skymap": "sm", "tract": t, "patch": p, "band": "g"}, "run1")


def test_query_where(repo):
    _fill(repo)
    refs = repo.query("src", "visit > 4 AND detector IN (1)")
    assert sorted(r.data_id["visit"] for r in refs) == [5, 6]
    # band is implied by the visit records, though src data IDs do not carry it.
    refs = repo.query("src", "band = 'g'")
    assert sorted({r.data_id["visit"] for r in refs}) == [1, 3, 5]
    refs = repo.query(where="tract=1 AND band IN ('g','r') AND patch != 0")
    assert {(r.dataset_type, r.data_id["patch"]) for r in refs} == {("metrics", 1), ("metrics", 2)}
    assert len(repo.query()) == 12 + 6
    assert len(repo.query(["src", "metrics"], "visit IN (1..3)")) == 6
    assert repo.query("src", "") == repo.query("src")
    with pytest.raises(QuerySyntaxError) as info:
        repo.query("src", "visit > AND")
    assert info.value.position == 8
    with pytest.raises(ProcskyKeyError, match="no dataset type"):
        repo.query("srcs")
    # Same answers from Python evaluation of the expression on the data IDs.
    from procsky.repo import parse_expression

    e = parse_expression("visit >= 2 AND NOT detector = 0")
    assert {r.id for r in repo.query("src", e)} == {r.id for r in repo.query("src") if e.evaluate(r.data_id)}


def test_get_with_partial_or_implied_data_id(repo):
    _fill(repo)
    # instrument omitted: unique within the run.
    assert repo.get("src", {"visit": 3, "detector": 1})["v"].tolist() == [3]
    # an implied key (band) may be given too.
    assert repo.get("src", {"visit": 3, "detector": 1, "band": "g"})["d"].tolist() == [1]
    with pytest.raises(ProcskyValueError, match="matches 2"):
        repo.get("src", {"visit": 3})


def test_runs_chains_and_search_order(repo):
    repo.put({"v": "old"}, "metrics", {"visit": 1}, "old")
    repo.put({"v": "new"}, "metrics", {"visit": 1}, "new")
    repo.put({"v": "only-old"}, "metrics", {"visit": 2}, "old")
    assert repo.runs() == ["new", "old"]
    assert repo.get("metrics", {"visit": 1}) == {"v": "new"}  # newest run first
    assert repo.get("metrics", {"visit": 1}, run=["old", "new"]) == {"v": "old"}
    repo.define_chain("best", ["old", "new"])
    assert repo.get("metrics", {"visit": 1}, run="best") == {"v": "old"}
    assert repo.get("metrics", {"visit": 2}, run="best") == {"v": "only-old"}
    assert [r.run for r in repo.query("metrics", run="best")] == ["old", "old", "new"]
    repo.define_chain("outer", ["new", "best"])  # chains nest
    assert repo.get("metrics", {"visit": 1}, run="outer") == {"v": "new"}
    with pytest.raises(ProcskyValueError, match="cycle"):
        repo.define_chain("best", ["outer"])
    with pytest.raises(ConflictError, match="chain"):
        repo.put({"v": 0}, "metrics", {"visit": 9}, "best")
    with pytest.raises(ProcskyKeyError):
        repo.define_chain("c2", ["nosuch"])


def test_dimension_records(repo):
    n = repo.add_dimension_records(
        "visit",
        [
            {"instrument": "simcam", "visit": 1, "band": "g", "mjd": 60000.1},
            {"instrument": "simcam", "visit": 2, "band": "r", "mjd": 60000.2},
        ],
    )
    assert n == 2
    assert repo.add_dimension_records("visit", [{"instrument": "simcam", "visit": 1, "band": "g", "mjd": 60000.1}]) == 0
    with pytest.raises(ConflictError, match="replace=True"):
        repo.add_dimension_records("visit", [{"instrument": "simcam", "visit": 1, "band": "i"}])
    repo.add_dimension_records("visit", [{"instrument": "simcam", "visit": 1, "band": "i"}], replace=True)
    assert [r["visit"] for r in repo.dimension_records("visit", "band = 'i' OR mjd > 60000.15")] == [1, 2]
    repo.add_dimension_records("instrument", [{"name": "simcam", "n_detectors": 4}])
    assert repo.dimension_records("instrument")[0]["instrument"] == "simcam"
    with pytest.raises(ProcskyValueError, match="lacks the key"):
        repo.add_dimension_records("detector", [{"instrument": "simcam"}])


# --------------------------------------------------------------------------- pending
def test_pending_registered_in_callers_transaction(repo):
    """The executor's pattern: write outputs, then register them and mark its own
    quantum row done in one transaction; a rollback registers nothing."""
    md = sa.MetaData()
    quanta = sa.Table(
        "test_quantum", md, sa.Column("id", sa.String(40), primary_key=True), sa.Column("state", sa.String(20))
    )
    md.create_all(repo.registry.engine)

    p1 = repo.write_pending({"a": 1}, "metrics", {"visit": 1}, "run1")
    p2 = repo.write_pending(pd.DataFrame({"a": [1]}), "src", VD, "run1")
    assert (repo.root / p1.uri).exists() and (repo.root / p2.uri).exists()
    assert repo.query() == []  # complete on disk, not registered
    p1 = pickle.loads(pickle.dumps(p1))  # a worker may write and the driver register

    with pytest.raises(RuntimeError):
        with repo.registry.transaction() as conn:
            conn.execute(sa.insert(quanta).values(id="q1", state="succeeded"))
            repo.register([p1, p2], provenance={"quantum_id": "q1"}, connection=conn)
            raise RuntimeError("crash before commit")
    assert repo.query() == []
    with repo.registry.engine.connect() as conn:
        assert conn.execute(sa.select(quanta)).all() == []

    with repo.registry.transaction() as conn:
        conn.execute(sa.insert(quanta).values(id="q1", state="succeeded"))
        refs = repo.register([p1, p2], provenance={"quantum_id": "q1", "task": "calibrate"}, connection=conn)
    assert {r.provenance["quantum_id"] for r in repo.query()} == {"q1"}
    assert [r.id for r in refs] == [p1.id, p2.id]
    assert repo.get("metrics", {"visit": 1}) == {"a": 1}


def test_nested_sqlite_write_transaction_fails_fast(repo):
    from procsky.errors import RepoError

    with repo.registry.transaction() as conn:
        with pytest.raises(RepoError, match="already open in this thread"):
            repo.put({"a": 1}, "metrics", {"visit": 1}, "run1")
        conn.execute(sa.text("SELECT 1"))
    assert repo.put({"a": 1}, "metrics", {"visit": 1}, "run1").run == "run1"
    assert repo.orphans(min_age=0) == []


def test_discard_and_leftover_replacement(repo):
    p = repo.write_pending({"a": 1}, "metrics", {"visit": 1}, "run1")
    repo.discard([p])
    assert not (repo.root / p.uri).exists()
    # A leftover from a "crashed" writer (written, never registered) is replaced.
    p = repo.write_pending({"a": "leftover"}, "metrics", {"visit": 2}, "run1")
    ref = repo.put({"a": "fresh"}, "metrics", {"visit": 2}, "run1")
    assert repo.get(ref) == {"a": "fresh"}
    # ... and the stale pending can no longer be registered over it.
    with pytest.raises(ConflictError):
        repo.register([p])
    assert repo.get(ref) == {"a": "fresh"}


def test_threads_share_one_repo(repo):
    """Dask worker threads share a Repo: concurrent puts neither fail nor collide."""
    from concurrent.futures import ThreadPoolExecutor

    def work(t):
        return [repo.put({"t": t, "i": i}, "metrics", {"visit": t, "detector": i}, "run1").id for i in range(15)]

    with ThreadPoolExecutor(4) as pool:
        ids = [i for chunk in pool.map(work, range(4)) for i in chunk]
    refs = repo.query("metrics")
    assert len(ids) == len(set(ids)) == len(refs) == 60
    assert repo.verify(refs) == []
    assert repo.get("metrics", {"visit": 2, "detector": 7}) == {"t": 2, "i": 7}


def test_orphans_cleanup(tmp_path):
    repo = Repo.create(tmp_path / "r")
    ref = repo.put({"a": 1}, "metrics", {"visit": 1}, "run1")
    repo.write_pending({"a": 2}, "metrics", {"visit": 2}, "run1")  # never registered
    tmp = repo.root / "run1/metrics/.visit=3.tmp-dead.json"
    tmp.write_text("{")
    found = repo.orphans(min_age=0)
    assert {p.name for p in found} == {"visit=2.json", ".visit=3.tmp-dead.json"}
    assert repo.orphans(min_age=3600) == []  # young files may belong to a live writer
    res = CliRunner().invoke(main, ["repo", "clean", str(repo.root), "--min-age", "0"])
    assert res.exit_code == 0 and "2 orphaned" in res.output
    assert repo.orphans(min_age=0) == [] and repo.verify([ref]) == []
    repo.registry.close()


def test_pickle_repo_and_ref(repo):
    ref = repo.put({"a": 1}, "metrics", {"visit": 1}, "run1")
    r2 = pickle.loads(pickle.dumps(repo))
    assert r2.root == repo.root
    assert r2.get(pickle.loads(pickle.dumps(ref))) == {"a": 1}
    r2.registry.close()


# --------------------------------------------------------------------------- CLI
def test_cli_create_query_show_prune(tmp_path):
    runner = CliRunner()
    root = tmp_path / "cli"
    res = runner.invoke(main, ["repo", "create", str(root)])
    assert res.exit_code == 0, res.output
    repo = Repo(root)
    repo.put(_exposure(), "calexp", VD, "run1")
    df = pd.DataFrame({"flux": [1.0, 2.0]})
    df.attrs["units"] = {"flux": "nJy"}
    repo.put(df, "src", VD, "run1")

    res = runner.invoke(main, ["query", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout)
    assert {r["dataset_type"] for r in recs} == {"calexp", "src"}
    assert all({"dataset_type", "run", "data_id", "uri"} <= set(r) for r in recs)

    res = runner.invoke(main, ["query", str(root), "src", "--where", "visit=12"])
    assert res.exit_code == 0 and "instrument=simcam visit=12 detector=3" in res.stdout

    res = runner.invoke(main, ["show", str(root), "calexp", "--where", "visit=12 AND detector=3"])
    assert res.exit_code == 0, res.output
    assert "40 x 60" in res.stdout and "band:          g" in res.stdout
    assert "RA 150.0000" in res.stdout and "BAD 60" in res.stdout and "SAT 1" in res.stdout
    res = runner.invoke(main, ["show", str(root), "src", "--where", "visit=12"])
    assert "rows:          2" in res.stdout and "nJy" in res.stdout

    res = runner.invoke(main, ["repo", "info", str(root)])
    assert res.exit_code == 0 and "run1: 2 datasets (calexp 1, src 1)" in res.stdout

    res = runner.invoke(main, ["prune", str(root), "--run", "run1", "--dataset-type", "src"])
    assert res.exit_code == 0 and "removed 1" in res.stdout
    assert [r.dataset_type for r in repo.query()] == ["calexp"]
    repo.registry.close()


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["query", str(tmp_path / "missing")])
    assert res.exit_code != 0
    assert "does not exist" in res.output and "Traceback" not in res.output
    runner.invoke(main, ["repo", "create", str(tmp_path / "r")])
    res = runner.invoke(main, ["query", str(tmp_path / "r"), "--where", "visit >> 3"])
    assert res.exit_code != 0 and "position 7" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["show", str(tmp_path / "r"), "calexp", "--where", "visit=1"])
    assert res.exit_code != 0 and "no calexp matches" in res.output
    res = runner.invoke(main, ["prune", str(tmp_path / "r"), "--run", "x", "--dataset-type", "src"])
    assert res.exit_code != 0 and "no run 'x'" in res.output
    res = runner.invoke(main, ["query", "--help"])
    assert res.exit_code == 0 and "--where" in res.output
