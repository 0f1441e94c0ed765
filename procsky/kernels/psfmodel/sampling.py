"""Sub-pixel resampling of images and stamps: Lanczos-3 interpolation and Fourier shifts."""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["lanczos_sample", "fourier_shift"]


@numba.njit(nogil=True, cache=True)
def _lanczos3(t):
    if t == 0.0:
        return 1.0
    if t <= -3.0 or t >= 3.0:
        return 0.0
    pt = math.pi * t
    return 3.0 * math.sin(pt) * math.sin(pt / 3.0) / (pt * pt)


@numba.njit(nogil=True, cache=True)
def lanczos_sample(arr, x, y):
    """Lanczos-3 interpolation of ``arr`` at (x, y) (pixels; zeros outside).

    The weights are normalised to sum 1, so a constant is reproduced exactly.
    """
    ny, nx = arr.shape
    fx = int(math.floor(x))
    fy = int(math.floor(y))
    wx = np.empty(6)
    wy = np.empty(6)
    sx = 0.0
    sy = 0.0
    for i in range(6):
        wx[i] = _lanczos3(x - (fx - 2 + i))
        wy[i] = _lanczos3(y - (fy - 2 + i))
        sx += wx[i]
        sy += wy[i]
    s = 0.0
    for j in range(6):
        py = fy - 2 + j
        if py < 0 or py >= ny:
            continue
        for i in range(6):
            px = fx - 2 + i
            if px < 0 or px >= nx:
                continue
            s += wy[j] * wx[i] * arr[py, px]
    return s / (sx * sy)


def fourier_shift(stamps, dx, dy):
    """Shift stamps by (dx, dy) pixels with the Fourier shift theorem (exact for band-limited images).

    Parameters
    ----------
    stamps : ndarray (..., S, S) float, S odd
    dx, dy : float or array (...,), pixels
        Content moves towards +x / +y: ``out(x, y) = in(x - dx, y - dy)``. Flux leaving one
        edge re-enters at the other, so pad the stamps when their edges are not ~0.

    Returns
    -------
    ndarray, same shape, float64
    """
    st = np.asarray(stamps, dtype=np.float64)
    ny, nx = st.shape[-2:]
    fy = np.fft.fftfreq(ny)
    fx = np.fft.rfftfreq(nx)
    dx = np.asarray(dx, float)[..., None, None]
    dy = np.asarray(dy, float)[..., None, None]
    phase = np.exp(-2j * np.pi * (fx[None, :] * dx + fy[:, None] * dy))
    return np.fft.irfft2(np.fft.rfft2(st) * phase, s=(ny, nx))
