"""Star stamps on the model grid, centred on each star's sub-pixel centroid, and their fit weights."""

from __future__ import annotations

import math

import numba
import numpy as np

from .sampling import fourier_shift, lanczos_sample

__all__ = []


@numba.njit(nogil=True, cache=True)
def _extract_stamps(image, variance, mask, xs, ys, m, oversample, bad_bits, resample, zero_bits):
    """Resample star images on the model grid centred on each star (Lanczos-3, when
    ``resample``); weights 1/var, 0 on pixels with ``zero_bits`` (repaired cosmic rays);
    usability (inside the image, no bad pixel)."""
    n = xs.size
    ny, nx = image.shape
    hm = m // 2
    data = np.zeros((n, m, m))
    wts = np.zeros((n, m, m))
    usable = np.ones(n, dtype=np.bool_)
    reach = hm / oversample + 4.0
    for k in range(n):
        x = xs[k]
        y = ys[k]
        if x - reach < 0 or y - reach < 0 or x + reach > nx - 1 or y + reach > ny - 1:
            usable[k] = False
            continue
        # any bad pixel in the cutout excludes the star
        for py in range(int(y - reach), int(y + reach) + 1):
            for px in range(int(x - reach), int(x + reach) + 1):
                if mask[py, px] & bad_bits:
                    usable[k] = False
        if not usable[k]:
            continue
        for j in range(m):
            for i in range(m):
                sx = x + (i - hm) / oversample
                sy = y + (j - hm) / oversample
                if resample:
                    data[k, j, i] = lanczos_sample(image, sx, sy)
                py = int(math.floor(sy + 0.5))
                px = int(math.floor(sx + 0.5))
                v = variance[py, px]
                wts[k, j, i] = 1.0 / v if v > 0 and not (mask[py, px] & zero_bits) else 0.0
    return data, wts, usable


def _extract_stamps_fourier(img, xs, ys, m, usable, fill=None):
    """Centre star cutouts on their sub-pixel centroids with a Fourier shift (see render_stamps).

    ``fill`` (ny, nx) bool marks pixels (repaired cosmic rays, weighted 0 in the fit) whose
    values are replaced, before the shift, by the star's value at the point reflection about
    its centroid (bilinear; a PSF is nearly symmetric): the shift spreads any error of such a
    pixel into its neighbours, and a median repair near a core is 10 % low.
    """
    n = xs.size
    pad = m // 2 + 4
    big = 2 * pad + 1
    cut = np.zeros((n, big, big))
    ix = np.floor(xs + 0.5).astype(np.int64)
    iy = np.floor(ys + 0.5).astype(np.int64)
    ny, nx = img.shape
    for k in range(n):
        if not usable[k] or iy[k] - pad < 0 or ix[k] - pad < 0 or iy[k] + pad >= ny or ix[k] + pad >= nx:
            continue
        cut[k] = img[iy[k] - pad : iy[k] + pad + 1, ix[k] - pad : ix[k] + pad + 1]
        if fill is None:
            continue
        f = fill[iy[k] - pad : iy[k] + pad + 1, ix[k] - pad : ix[k] + pad + 1]
        if not f.any():
            continue
        src = cut[k].copy()
        cx = pad + (xs[k] - ix[k])
        cy = pad + (ys[k] - iy[k])
        for j, i in zip(*np.nonzero(f)):
            rx, ry = 2 * cx - i, 2 * cy - j
            x0, y0 = int(np.floor(rx)), int(np.floor(ry))
            if x0 < 0 or y0 < 0 or x0 + 1 >= big or y0 + 1 >= big or f[y0 : y0 + 2, x0 : x0 + 2].any():
                continue
            tx, ty = rx - x0, ry - y0
            cut[k, j, i] = (1 - ty) * ((1 - tx) * src[y0, x0] + tx * src[y0, x0 + 1]) + ty * (
                (1 - tx) * src[y0 + 1, x0] + tx * src[y0 + 1, x0 + 1]
            )
    shifted = fourier_shift(cut, -(xs - ix), -(ys - iy))
    c = pad - m // 2
    return np.ascontiguousarray(shifted[:, c : c + m, c : c + m])


def _floored_weights(data, wts, accuracy):
    """Weights ``1 / (V + (accuracy I)^2)`` from inverse variances ``wts`` (PSFEx's accuracy floor)."""
    if not accuracy > 0:
        return wts
    with np.errstate(divide="ignore"):
        return np.where(
            wts > 0, 1.0 / (1.0 / np.where(wts > 0, wts, 1.0) + (accuracy * np.maximum(data, 0.0)) ** 2), 0.0
        )
