"""The smaller edges a newcomer meets in the first hour (issue 17).

Misspelled dimensions in ``--where``, command-line errors that name command-line flags,
truncated FITS files at ingest, units that astropy sees in catalogue Parquet files, BUNIT
in exported FITS, cut-outs from ``procsky export``, the git commit in the version, and the
licence and changelog files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from procsky.cli import main
from procsky.errors import ProcskyValueError
from procsky.repo import Repo


@pytest.fixture
def repo(tmp_path):
    return Repo.create(tmp_path / "repo")


def _fill(repo):
    repo.add_dimension_records("visit", [
        {"instrument": "simcam", "visit": v, "band": "g" if v % 2 else "r", "physical_filter": "x"}
        for v in (1, 2)
    ])
    for v in (1, 2):
        repo.put(pd.DataFrame({"v": [v]}), "src", {"instrument": "simcam", "visit": v, "detector": 0}, "run1")
    # a free data-ID key (not a standard dimension) on one dataset type only
    repo.put({"n": 1}, "metrics", {"visit": 1, "day_obs": 20260101}, "run1")


# ------------------------------------------------------------------ 1. unknown names in where
def test_query_refuses_unknown_dimension_with_a_hint(repo):
    _fill(repo)
    with pytest.raises(ProcskyValueError) as info:
        repo.query("src", "vist=1")
    msg = str(info.value)
    assert "'vist' (did you mean 'visit'?)" in msg
    assert "known dimensions:" in msg and "detector" in msg and "band" in msg
    # the error crosses process boundaries like every procsky error
    assert str(pickle.loads(pickle.dumps(info.value))) == msg
    # also under NOT, where a NULL column would have matched nothing as well
    with pytest.raises(ProcskyValueError, match="did you mean 'detector'"):
        repo.query(where="NOT detectr IN (1, 2)")
    # known names still work, including a free data-ID key carried by some dataset
    assert len(repo.query("src", "visit=1")) == 1
    assert len(repo.query("src", "run='run1' AND dataset_type='src'")) == 2
    assert len(repo.query(where="day_obs=20260101")) == 1
    assert len(repo.query("metrics", "day_obs > 0")) == 1
    # ... but not for a dataset type none of whose datasets has that key
    with pytest.raises(ProcskyValueError, match="'day_obs'.*not a dimension of src"):
        repo.query("src", "day_obs=20260101")


def test_cli_query_unknown_dimension(repo):
    _fill(repo)
    res = CliRunner().invoke(main, ["query", str(repo.root), "src", "--where", "vist=1"])
    assert res.exit_code != 0
    assert "did you mean 'visit'?" in res.output
    assert "Traceback" not in res.output
