"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Keep numba/BLAS from oversubscribing the 2-core machines the tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
TESTS = Path(__file__).resolve().parent

# The toy tasks (tests/toytasks.py) are test code, not part of procsky: importing them here
# registers them for every test; dask worker processes and the subprocesses tests start
# (`python -m procsky ...`) find them through PYTHONPATH.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(TESTS) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
import toytasks  # noqa: E402,F401  (registers toy_measure, toy_gather, toy_gather_tolerant, toy_noop)

#: The test files that take longest (minutes: whole campaigns, full `small` visits), longest
#: first. `make test` runs the whole suite in one pytest-xdist session with ``--dist
#: loadfile --no-loadscope-reorder``: files are handed to the workers in collection order, so
#: these start first and the many short files fill the workers' time around them. Only the
#: order changes; a file missing here runs after them in its usual place.
LONGEST_FIRST = (
    "test_readme.py",
    "test_coadd.py",
    "test_calibrate.py",
    "test_coadd_regimes.py",
    "test_sim_regimes.py",
    "test_diffim.py",
    "test_repo_concurrency.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    # A stable sort keeps the order of tests within each file and of the other files.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``; tests using it skip when it is absent (a user's clone)."""
    if not REAL.exists():
        pytest.skip(f"real test data not found at {REAL} (only present in the project workspace)")
    return REAL


def raise_if_dask_computes():
    """Context manager: fail if any dask graph is computed inside it (after xarray's tests)."""
    import dask

    def _fail(*args, **kwargs):
        raise AssertionError("dask computed something where nothing should be computed")

    return dask.config.set(scheduler=_fail)


def shared_draw(tmp_path_factory, name: str, draw) -> Path:
    """A folder ``draw(folder)`` fills once per test session, also when pytest-xdist runs the
    session in several worker processes (``make test`` does): the workers share the base
    temporary folder's parent, and the first to take the lock draws while the others wait."""
    import fcntl

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent
    else:
        root = tmp_path_factory.getbasetemp()
    d = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (d / ".complete").exists():
                if d.exists():
                    import shutil

                    shutil.rmtree(d)  # a draw that died half-way
                d.mkdir()
                draw(d)
                (d / ".complete").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return d


# ----------------------------------------------------------------------------- `small` draws
# The slow tests of calibrate, coadd and diffim share these draws of the `small` recipe so
# CI draws each image once. Pixels of an image do not depend on which subset is drawn.
SMALL_R_VISITS = [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]  # the r-band visits of `small`


@pytest.fixture(scope="session")
def small_r_det4(tmp_path_factory) -> Path:
    """The ten r-band visits of `small`, detector 4, calibrated mode (a simulation folder)."""
    pytest.importorskip("galsim")
    from procsky.sim import simulate

    def draw(d: Path) -> None:
        simulate("small", d, visits=SMALL_R_VISITS, detectors=[4], scheduler="processes", workers=2, progress=False)

    return shared_draw(tmp_path_factory, "small_r_det4", draw)


@pytest.fixture(scope="session")
def small_r_det4_calexps(small_r_det4, tmp_path_factory) -> dict:
    """``{visit: calexp}`` (in memory): the draws of ``small_r_det4`` through calibrate."""
    from procsky.exposure import Exposure
    from procsky.refcat import read_refcat_file
    from procsky.sim.render import image_filename
    from procsky.tasks.calibrate import calibrate_exposure

    def calibrate_all(d: Path) -> None:
        refcat = read_refcat_file(small_r_det4 / "refcat/refcat.parquet")
        for v in SMALL_R_VISITS:
            exp = Exposure.read(small_r_det4 / "images" / image_filename("calexp", v, 4))
            calibrate_exposure(exp, refcat)[0].compute().write(d / f"calexp-{v}.fits")

    # Calibrated once per session and written as FITS (read back into numpy, PSF model,
    # WCS, PhotoCalib and metadata included): the coadd, diffim and streak files run in
    # different xdist workers, and each calibrated the ten visits itself (~50 CPU-s each).
    d = shared_draw(tmp_path_factory, "small_r_det4_calexps", calibrate_all)
    return {v: Exposure.read(d / f"calexp-{v}.fits") for v in SMALL_R_VISITS}


@pytest.fixture
def toy_repo(tmp_path):
    """A fresh repository holding the toy pipeline's inputs (tests/toytasks.py)."""
    import toytasks as toy
    from procsky.repo import Repo

    r = Repo.create(tmp_path / "repo")
    toy.make_toy_inputs(r)
    return r


@pytest.fixture
def toy_yaml(tmp_path):
    """The toy pipeline as a YAML file."""
    import toytasks as toy

    p = tmp_path / "toy.yaml"
    p.write_text(toy.TOY_PIPELINE_YAML)
    return p
