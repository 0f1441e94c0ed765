"""procsky._malloc.tune_malloc: whole-detector temporaries stop page-faulting in a process
started with dask's MALLOC_TRIM_THRESHOLD_ (counted in minor page faults, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds (Linux)")

CHILD = r"""
import json, resource, sys
import numpy as np
from procsky._malloc import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "1" else False
a = np.ones(1 << 19)  # 4 MiB: above glibc's 128 KiB start threshold, below 32 MiB
del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a = np.ones(1 << 19)
    del a
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _faults(env: dict, tune: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PROCSKY_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, tune], env={**base, **env}, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_malloc_stops_refaulting_large_temporaries():
    pages = (1 << 22) // 4096  # pages of one 4 MiB array
    dask = _faults({"MALLOC_TRIM_THRESHOLD_": "65536"}, "0")
    tuned = _faults({"MALLOC_TRIM_THRESHOLD_": "65536"}, "1")
    plain = _faults({}, "0")
    # dask's setting: every array is a fresh mmap, its pages faulted in again each time
    # (the kernel may map a few pages per fault, hence not 50 x pages)
    assert dask["faults"] > 10 * pages
    # tuned (and glibc's own dynamic threshold): the freed block is reused
    assert tuned["tuned"] is True and tuned["faults"] < 5 * pages
    assert plain["faults"] < 5 * pages


def test_tune_malloc_leaves_defaults_and_opt_out_alone():
    assert _faults({}, "1")["tuned"] is False  # nothing set: glibc is dynamic already
    kept = _faults({"MALLOC_TRIM_THRESHOLD_": "65536", "PROCSKY_MALLOC": "keep"}, "1")
    assert kept["tuned"] is False
    big = _faults({"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}, "1")
    assert big["tuned"] is False  # a deliberate large setting is the user's
