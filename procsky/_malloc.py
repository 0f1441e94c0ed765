"""glibc ``malloc`` thresholds for processes that run quanta.

dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to the operating
system at once. Setting any of glibc's thresholds also turns off its *dynamic* mmap
threshold (glibc ``malloc/malloc.c``, ``mp_.no_dyn_threshold``). Then every allocation above
128 KiB is a fresh ``mmap``: its pages are zero-filled by the kernel on first touch and
unmapped again on ``free``. A quantum makes hundreds of whole-detector temporaries, so each
one pays those page faults again, as system time.

Measured in one worker-like thread (6 ``calibrate`` quanta of the demo survey's 1024x1024
detectors, ``benchmarks/bench_malloc.py``, with and without the variable):
1.5-1.9 CPU-s of system time and ~630,000 minor page faults with dask's setting, against
0.06-0.1 CPU-s and ~10,000 faults with glibc's defaults, for 5-7 CPU-s of user time; peak
resident memory 460-550 MB either way.

:func:`tune_malloc` restores what glibc's dynamic threshold would reach: allocations up to
32 MiB (glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) are served from the heap and
reused, larger ones are still mapped and returned at once, and free memory at the top of
the heap is returned beyond 64 MiB. It acts only where a small threshold was set through
the environment (a dask worker, or a job script that exports one); elsewhere glibc's
defaults are already dynamic and are left alone. ``PROCSKY_MALLOC=keep`` leaves the
process as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Largest block served from the heap: glibc's ceiling of its dynamic mmap threshold.
MMAP_THRESHOLD = 32 << 20
#: Free memory kept at the top of the heap before it is returned (glibc: twice the above).
TRIM_THRESHOLD = 64 << 20
#: Environment variables that turn glibc's dynamic threshold off.
_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_done: bool | None = None


def _small_threshold_set() -> bool:
    for var in _VARS:
        if var in os.environ:
            try:
                value = int(os.environ[var])
            except ValueError:
                return True
            if var == "MALLOC_MMAP_MAX_" or value < MMAP_THRESHOLD:
                return True
    return False


def tune_malloc() -> bool:
    """Raise glibc's malloc thresholds in this process if a small one was set (once).

    Returns
    -------
    bool
        Whether the thresholds were changed (now or by an earlier call).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("PROCSKY_MALLOC", "").lower() == "keep" or not sys.platform.startswith("linux"):
        return False
    if not _small_threshold_set():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
