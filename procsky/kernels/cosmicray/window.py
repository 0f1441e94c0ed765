"""The detection window that the PSF-fit cosmic-ray tests share (:mod:`.sharp`, :mod:`.tracks`)."""

from __future__ import annotations

import numba
import numpy as np

__all__: list[str] = []


@numba.njit(nogil=True, cache=True)
def _window(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, ok):
    """Fill the ``(2 h + 1)^2`` window around pixel (ix, iy): data ``d``, variance ``v``, the
    detection's PSF stamp ``p`` (0 beyond it) and the usable pixels ``ok``; a window that
    crosses the image edge keeps its pixels inside (an edge detection is judged on what the
    detector saw). Returns the number of usable pixels."""
    ny, nx = image.shape
    s = 2 * h + 1
    c0 = stamps.shape[1] // 2
    n = 0
    for j in range(s):
        for i in range(s):
            yy = iy + j - h
            xx = ix + i - h
            p[j, i] = stamps[k, c0 + j - h, c0 + i - h] if abs(j - h) <= c0 and abs(i - h) <= c0 else 0.0
            if 0 <= yy < ny and 0 <= xx < nx:
                d[j, i] = image[yy, xx]
                v[j, i] = variance[yy, xx]
                ok[j, i] = (mask[yy, xx] & bad_bits) == 0 and v[j, i] > 0.0 and np.isfinite(d[j, i])
            else:
                d[j, i] = 0.0
                v[j, i] = 1.0
                ok[j, i] = False
            n += ok[j, i]
    return n
