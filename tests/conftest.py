"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep numba/BLAS from oversubscribing the 2-core machines the tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


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
