"""Timers and peer-tool runs shared by the benchmarks (imported as ``_peers`` by the
scripts in this folder, which run with it on ``sys.path``)."""

from __future__ import annotations

import time

import numpy as np


def cpu(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), CPU seconds of this process, wall seconds)``."""
    t0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0, time.perf_counter() - w0


def sep_extract(image, variance, sigma: float, *, radius: float = 6.0, pixstack: int = 10_000_000):
    """sep's equivalent of procsky's background + detection + aperture photometry.

    Background (128 px meshes, 3x3 median filter), 5-sigma extraction with a matched
    Gaussian filter of ``sigma`` px, then circular apertures of ``radius`` px.
    Returns ``(objects, aperture fluxes)``.
    """
    import sep

    data = np.asarray(image, dtype=np.float64)
    err = np.sqrt(np.asarray(variance, dtype=np.float64))
    s = data - sep.Background(data, bw=128, bh=128, fw=3, fh=3).back()
    sep.set_extract_pixstack(pixstack)
    sep.set_sub_object_limit(4096)
    g = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)
    objs = sep.extract(s, 5.0, err=err, filter_kernel=np.outer(g, g), filter_type="matched")
    flux, _, _ = sep.sum_circle(s, objs["x"], objs["y"], radius, err=err, subpix=0)
    return objs, flux
