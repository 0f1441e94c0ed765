"""Resampling kernels: Lanczos warping of image, variance and mask planes.

Everything here works on plain numpy blocks; the WCS arithmetic that produces the pixel
mapping lives in :mod:`procsky.warp`.

Warping (after LSST ``afw.math.warpExposure`` and SWarp's resampling):

* the output pixel ``(i, j)`` samples the input at ``(xin[j, i], yin[j, i])`` (0-based input
  pixel coordinates) with a separable Lanczos kernel of order ``a`` (Lanczos3 by default),
  ``L(t) = sinc(t) sinc(t / a)`` for ``|t| < a``; the ``2a x 2a`` weights are normalised to
  sum to one so a constant stays constant; the taps are interpolated linearly in a table at
  1/1024 px (:func:`tap_table`; a few 1e-6 of the image rms from the exact evaluation,
  ``exact=True``, which costs ~2.5x more per sample);
* variance is propagated with the squared weights, ``V_out = sum w^2 V_in`` (the marginal
  variance of each output pixel for uncorrelated input noise; neighbouring output pixels
  become correlated, see :func:`lanczos_noise_correlation`);
* the mask is the OR of every input pixel within ``mask_radius`` of the sample point
  (the whole kernel footprint by default);
* output pixels whose kernel footprint leaves the input, or touches a NO_DATA or
  non-finite input pixel, are NO_DATA (image and variance NaN);
* each output pixel is multiplied by ``scale[j, i]``: the photometric calibration (nJy per
  count) times the ratio of output to input pixel area, so that pixel values are
  *flux per output pixel* and the sum over a source is its total flux in nJy, whatever
  the two pixel scales (flux, not surface brightness, is conserved).

The pixel mapping may be evaluated exactly for every pixel, or on a coarse grid and
interpolated with bicubic splines (:func:`interpolate_grid`), which is accurate to well
below 0.001 px for grids of ~32 px on survey WCSs (tested). :func:`warp_planes_grid` takes
the grid itself and evaluates the splines, and the pixel area ratio from their derivatives
at the nodes, inside the kernel row by row (no full-resolution mapping arrays);
:func:`warp_grid_accumulate` adds each warped row straight into a weighted mean's sums
(the coadd's fused warp, no warped planes).
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import numba
import numpy as np

from ._bits import NO_DATA, bit

__all__ = [
    "NO_DATA_BIT",
    "area_ratio",
    "interpolate_grid",
    "interpolate_mapping",
    "lanczos",
    "lanczos_noise_correlation",
    "tap_table",
    "warp_kernel_image",
    "warp_planes",
    "warp_grid_accumulate",
    "warp_planes_grid",
]

NO_DATA_BIT = bit(NO_DATA)


@numba.njit(nogil=True, cache=True)
def _lanczos(t, a):
    if t == 0.0:
        return 1.0
    if t <= -a or t >= a:
        return 0.0
    pt = math.pi * t
    return a * math.sin(pt) * math.sin(pt / a) / (pt * pt)


def lanczos(t, order: int = 3):
    """Lanczos kernel of order ``order`` at offsets ``t`` (pixels); numpy vectorised."""
    t = np.asarray(t, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(t == 0, 1.0, order * np.sin(np.pi * t) * np.sin(np.pi * t / order) / (np.pi * t) ** 2)
    return np.where(np.abs(t) < order, v, 0.0)


# Tabulated taps (as the kernel cache of LSST afw's ``WarpingControl``, ``cacheSize``): the
# separable Lanczos weights of the 2a taps are tabulated at TAP_TABLE_STEPS sub-pixel phases
# per pixel and interpolated linearly, instead of two ``sin`` per tap and sample.
# Linear interpolation errs by at most h^2/8 max|L''| < 5e-7 per tap at h = 1/1024 px
# (|L''| <= pi^2 (1 + 1/a^2) / 3), far below float32 resolution of the weighted sum.
TAP_TABLE_STEPS = 1024


@functools.lru_cache(maxsize=8)
def tap_table(order: int = 3, steps: int = TAP_TABLE_STEPS) -> np.ndarray:
    """Lanczos taps ``L(f + order - 1 - k)``, ``k = 0 .. 2 order - 1``, at phases ``f = p / steps``.

    Row ``p`` holds the (unnormalised) weights of the ``2 order`` input pixels ``floor(x) - order + 1 + k``
    for a sample at ``x`` with ``x - floor(x) = p / steps``; shape ``(steps + 1, 2 order)``, read-only.
    """
    phase = np.arange(steps + 1) / steps
    table = lanczos(phase[:, None] + (order - 1 - np.arange(2 * order)), order)
    table.flags.writeable = False
    return table


_EXACT = np.empty((0, 0))  # an empty tap table: evaluate the taps exactly


@numba.njit(nogil=True, cache=True)
def _scratch(order):
    n = 2 * order
    return np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.uint32), np.empty(n, np.uint32)


# Lanczos3 (the default) has its 6 x 6 taps written out (SIMD-friendly straight-line code
# that keeps the taps in registers): the same operations in the same order as the general
# loops below, so the results are bit-identical to them.
@numba.njit(inline="always")
def _taps6(table, p, u):
    """The 6 tap weights at phase row ``p`` + ``u`` of the table, normalised to sum 1."""
    t0 = table[p]
    t1 = table[p + 1]
    a0 = t0[0] + u * (t1[0] - t0[0])
    a1 = t0[1] + u * (t1[1] - t0[1])
    a2 = t0[2] + u * (t1[2] - t0[2])
    a3 = t0[3] + u * (t1[3] - t0[3])
    a4 = t0[4] + u * (t1[4] - t0[4])
    a5 = t0[5] + u * (t1[5] - t0[5])
    ia = 1.0 / (a0 + a1 + a2 + a3 + a4 + a5)
    return (a0 * ia, a1 * ia, a2 * ia, a3 * ia, a4 * ia, a5 * ia)


@numba.njit(inline="always")
def _dot6(plane, yy, x0, w):
    r = plane[yy]
    return w[0] * r[x0] + w[1] * r[x0 + 1] + w[2] * r[x0 + 2] + w[3] * r[x0 + 3] + w[4] * r[x0 + 4] + w[5] * r[x0 + 5]


@numba.njit(inline="always")
def _or6(plane, yy, x0):
    r = plane[yy]
    return r[x0] | r[x0 + 1] | r[x0 + 2] | r[x0 + 3] | r[x0 + 4] | r[x0 + 5]


@numba.njit(inline="always")
def _sample6(image, variance, mask, x0, y0, wx, wy):
    """Image, variance and mask OR of one Lanczos3 sample whose 36 taps all have weight."""
    wx2 = (wx[0] * wx[0], wx[1] * wx[1], wx[2] * wx[2], wx[3] * wx[3], wx[4] * wx[4], wx[5] * wx[5])
    s = wy[0] * _dot6(image, y0, x0, wx)
    s += wy[1] * _dot6(image, y0 + 1, x0, wx)
    s += wy[2] * _dot6(image, y0 + 2, x0, wx)
    s += wy[3] * _dot6(image, y0 + 3, x0, wx)
    s += wy[4] * _dot6(image, y0 + 4, x0, wx)
    s += wy[5] * _dot6(image, y0 + 5, x0, wx)
    v = wy[0] * wy[0] * _dot6(variance, y0, x0, wx2)
    v += wy[1] * wy[1] * _dot6(variance, y0 + 1, x0, wx2)
    v += wy[2] * wy[2] * _dot6(variance, y0 + 2, x0, wx2)
    v += wy[3] * wy[3] * _dot6(variance, y0 + 3, x0, wx2)
    v += wy[4] * wy[4] * _dot6(variance, y0 + 4, x0, wx2)
    v += wy[5] * wy[5] * _dot6(variance, y0 + 5, x0, wx2)
    m = _or6(mask, y0, x0) | _or6(mask, y0 + 1, x0) | _or6(mask, y0 + 2, x0)
    m |= _or6(mask, y0 + 3, x0) | _or6(mask, y0 + 4, x0) | _or6(mask, y0 + 5, x0)
    return s, v, m


# Multiply-adds may be fused (FMA contraction): ~13 % faster per sample; it changes the
# float64 sums by ~1e-16 relative, below float32 output resolution.
@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _warp_row(image, variance, mask, xrow, yrow, srow, order, mask_radius, no_data, table, oi, ov, om, scratch):
    """Warp one output row: samples at (xrow[i], yrow[i]) scaled by srow[i] into oi, ov, om."""
    wx, wy, wx2, near_x, near_y = scratch
    h, w = image.shape
    n = 2 * order
    full = mask_radius >= order
    steps = table.shape[0] - 1
    ones = np.uint32(0xFFFFFFFF)
    zero = np.uint32(0)
    nan = np.nan
    for i in range(xrow.size):
        x = xrow[i]
        y = yrow[i]
        if not (math.isfinite(x) and math.isfinite(y)):
            oi[i] = nan
            ov[i] = nan
            om[i] = no_data
            continue
        ix = int(math.floor(x))
        iy = int(math.floor(y))
        x0 = ix - order + 1
        y0 = iy - order + 1
        if x0 < 0 or y0 < 0 or x0 + n > w or y0 + n > h:
            oi[i] = nan
            ov[i] = nan
            om[i] = no_data
            continue
        # Normalised taps per axis (written out here: a call per sample costs more than
        # the interpolation). The table path interpolates linearly between the phases
        # p / steps and (p + 1) / steps; with no table the taps are evaluated exactly.
        if steps > 0 and order == 3 and full and x != ix and y != iy:
            pos = (x - ix) * steps
            p = int(pos)
            if p >= steps:  # x - ix rounded up to 1.0
                p = steps - 1
            posy = (y - iy) * steps
            py = int(posy)
            if py >= steps:
                py = steps - 1
            s, v, m = _sample6(image, variance, mask, x0, y0, _taps6(table, p, pos - p), _taps6(table, py, posy - py))
            if (m & no_data) != 0 or not (math.isfinite(s) and math.isfinite(v)):
                oi[i] = nan
                ov[i] = nan
                om[i] = m | no_data
                continue
            f = srow[i]
            oi[i] = s * f
            ov[i] = v * f * f
            om[i] = m
            continue
        if steps > 0:
            pos = (x - ix) * steps
            p = int(pos)
            if p >= steps:  # x - ix rounded up to 1.0
                p = steps - 1
            u = pos - p
            posy = (y - iy) * steps
            py = int(posy)
            if py >= steps:
                py = steps - 1
            uy = posy - py
            sa = 0.0
            sb = 0.0
            for k in range(n):
                t0 = table[p, k]
                wk = t0 + u * (table[p + 1, k] - t0)
                wx[k] = wk
                sa += wk
                t1 = table[py, k]
                wk = t1 + uy * (table[py + 1, k] - t1)
                wy[k] = wk
                sb += wk
        else:
            sa = 0.0
            sb = 0.0
            for k in range(n):
                wk = _lanczos(x - (ix - order + 1 + k), order)
                wx[k] = wk
                sa += wk
                wk = _lanczos(y - (iy - order + 1 + k), order)
                wy[k] = wk
                sb += wk
        ia = 1.0 / sa
        ib = 1.0 / sb
        for k in range(n):
            wx[k] *= ia
            wy[k] *= ib
            wx2[k] = wx[k] * wx[k]
        m = zero
        s = 0.0
        v = 0.0
        if full and x != ix and y != iy:
            # Every tap has weight and lies within the mask radius (the usual case).
            for q in range(n):
                yy = y0 + q
                rs = 0.0
                rv = 0.0
                for p in range(n):
                    xx = x0 + p
                    m |= mask[yy, xx]
                    rs += wx[p] * image[yy, xx]
                    rv += wx2[p] * variance[yy, xx]
                s += wy[q] * rs
                v += wy[q] * wy[q] * rv
            m_used = m
        else:
            for k in range(n):
                near_x[k] = ones if abs(x0 + k - x) <= mask_radius else zero
                near_y[k] = ones if abs(y0 + k - y) <= mask_radius else zero
            # L(t) vanishes only at |t| = order: the last tap of a sample on an integer
            # position has weight 0 and its pixel neither contributes nor spoils the sample.
            nxw = n - 1 if x == ix else n
            nyw = n - 1 if y == iy else n
            m_used = zero
            for q in range(n):
                yy = y0 + q
                ny_q = near_y[q]
                for p in range(n):
                    m |= mask[yy, x0 + p] & near_x[p] & ny_q
                if q < nyw:
                    rs = 0.0
                    rv = 0.0
                    for p in range(nxw):
                        xx = x0 + p
                        m_used |= mask[yy, xx]
                        rs += wx[p] * image[yy, xx]
                        rv += wx2[p] * variance[yy, xx]
                    s += wy[q] * rs
                    v += wy[q] * wy[q] * rv
        if (m_used & no_data) != 0 or not (math.isfinite(s) and math.isfinite(v)):
            oi[i] = nan
            ov[i] = nan
            om[i] = m | no_data
            continue
        f = srow[i]
        oi[i] = s * f
        ov[i] = v * f * f
        om[i] = m


@numba.njit(nogil=True, cache=True)
def _warp(image, variance, mask, xin, yin, scale, order, mask_radius, no_data, table, out_img, out_var, out_mask):
    scratch = _scratch(order)
    for j in range(xin.shape[0]):
        _warp_row(
            image,
            variance,
            mask,
            xin[j],
            yin[j],
            scale[j],
            order,
            mask_radius,
            no_data,
            table,
            out_img[j],
            out_var[j],
            out_mask[j],
            scratch,
        )


@numba.njit(inline="always")
def _grid_row(j, cx, cy, bx_idx, bx_val, by_idx, by_val, x_off, y_off, det, ax_i, ax_f, ay_i, ay_f, calibration, rows):
    """Mapping (``xrow``, ``yrow``) and scale (``srow``) of output row ``j`` from the grid's
    B-spline coefficients and the bilinear area ratio; ``rows = (rx, ry, xrow, yrow, srow)``."""
    rx, ry, xrow, yrow, srow = rows
    kx = bx_val.shape[1]
    ky = by_val.shape[1]
    r0 = by_idx[j]
    for m in range(cx.shape[1]):
        sx = 0.0
        sy = 0.0
        for a in range(ky):
            b = by_val[j, a]
            sx += b * cx[r0 + a, m]
            sy += b * cy[r0 + a, m]
        rx[m] = sx
        ry[m] = sy
    a0 = ay_i[j]
    v = ay_f[j]
    for i in range(xrow.size):
        c0 = bx_idx[i]
        sx = 0.0
        sy = 0.0
        for a in range(kx):
            b = bx_val[i, a]
            sx += b * rx[c0 + a]
            sy += b * ry[c0 + a]
        xrow[i] = sx - x_off
        yrow[i] = sy - y_off
        b0 = ax_i[i]
        u = ax_f[i]
        lo = det[a0, b0] + u * (det[a0, b0 + 1] - det[a0, b0])
        hi = det[a0 + 1, b0] + u * (det[a0 + 1, b0 + 1] - det[a0 + 1, b0])
        srow[i] = calibration * (lo + v * (hi - lo))


@numba.njit(nogil=True, cache=True)
def _row_buffers(ncol, nx):
    return np.empty(ncol), np.empty(ncol), np.empty(nx), np.empty(nx), np.empty(nx)


@numba.njit(nogil=True, cache=True)
def _warp_grid(
    image,
    variance,
    mask,
    cx,
    cy,
    bx_idx,
    bx_val,
    by_idx,
    by_val,
    x_off,
    y_off,
    det,
    ax_i,
    ax_f,
    ay_i,
    ay_f,
    calibration,
    order,
    mask_radius,
    no_data,
    table,
    out_img,
    out_var,
    out_mask,
):
    """:func:`_warp` with the mapping a tensor-product B-spline (coefficients ``cx, cy``,
    basis values of each output column ``bx_val`` from coefficient ``bx_idx`` on, of each
    row ``by_val`` from ``by_idx``) and the scale ``calibration`` times a bilinear
    interpolation of ``det`` (cells ``ax_i, ay_i``, fractions ``ax_f, ay_f``), evaluated
    row by row: no full-resolution mapping or scale arrays."""
    ny, nx = out_img.shape
    rows = _row_buffers(cx.shape[1], nx)
    scratch = _scratch(order)
    for j in range(ny):
        _grid_row(
            j, cx, cy, bx_idx, bx_val, by_idx, by_val, x_off, y_off, det, ax_i, ax_f, ay_i, ay_f, calibration, rows
        )
        _warp_row(
            image,
            variance,
            mask,
            rows[2],
            rows[3],
            rows[4],
            order,
            mask_radius,
            no_data,
            table,
            out_img[j],
            out_var[j],
            out_mask[j],
            scratch,
        )


@numba.njit(nogil=True, cache=True)
def _warp_grid_accumulate(
    image,
    variance,
    mask,
    cx,
    cy,
    bx_idx,
    bx_val,
    by_idx,
    by_val,
    x_off,
    y_off,
    det,
    ax_i,
    ax_f,
    ay_i,
    ay_f,
    calibration,
    order,
    mask_radius,
    no_data,
    table,
    ny,
    sw,
    swi,
    sw2v,
    mask_or,
    n,
    oy,
    ox,
    weight,
    bad_bits,
):
    """:func:`_warp_grid` adding each warped row straight into the weighted-mean
    accumulators (``sum w``, ``sum w i``, ``sum w^2 v``, mask OR, count) at rows ``oy + j``,
    columns ``ox + i``: the same float32 samples, added as
    :func:`procsky.kernels.coadd._accumulate` adds a warped plane (pixels with a
    ``bad_bits`` mask bit or a non-finite value left out), without the planes."""
    nx = bx_idx.size
    rows = _row_buffers(cx.shape[1], nx)
    scratch = _scratch(order)
    oi = np.empty(nx, np.float32)
    ov = np.empty(nx, np.float32)
    om = np.empty(nx, np.uint32)
    w2 = weight * weight
    for j in range(ny):
        _grid_row(
            j, cx, cy, bx_idx, bx_val, by_idx, by_val, x_off, y_off, det, ax_i, ax_f, ay_i, ay_f, calibration, rows
        )
        _warp_row(
            image, variance, mask, rows[2], rows[3], rows[4], order, mask_radius, no_data, table, oi, ov, om, scratch
        )
        jj = oy + j
        for i in range(nx):
            if (om[i] & bad_bits) == 0 and math.isfinite(oi[i]) and math.isfinite(ov[i]):
                k = ox + i
                sw[jj, k] += weight
                swi[jj, k] += weight * oi[i]
                sw2v[jj, k] += w2 * ov[i]
                mask_or[jj, k] |= om[i]
                n[jj, k] += 1


def warp_planes(
    image,
    variance,
    mask,
    xin,
    yin,
    scale=1.0,
    *,
    order: int = 3,
    mask_radius: float | None = None,
    no_data_bit: int = NO_DATA_BIT,
    exact: bool = False,
):
    """Lanczos-resample image, variance and mask onto output positions.

    Parameters
    ----------
    image, variance : ndarray (h, w), float
        Input planes (image units, image units squared).
    mask : ndarray (h, w), uint32
        Input mask bits.
    xin, yin : ndarray (ny, nx), float64
        Input pixel coordinates (0-based, of ``image``) sampled by each output pixel.
    scale : float or ndarray (ny, nx)
        Multiplies the output image (and its square the variance): calibration times
        pixel-area ratio (see the module docstring).
    order : int
        Lanczos order (3 = Lanczos3).
    mask_radius : float, pixels, optional
        Input pixels within this distance (per axis) of the sample point contribute their
        mask bits; default ``order`` (the whole kernel footprint).
    no_data_bit : int
        Value of the NO_DATA mask bit.
    exact : bool
        Evaluate every tap exactly (two ``sin`` each) instead of interpolating it in the
        :func:`tap_table` at 1/1024 px (~2.5x faster per sample; the outputs differ by a
        few 1e-6 of the image rms, masks are identical).

    Returns
    -------
    image, variance : ndarray (ny, nx) float32
    mask : ndarray (ny, nx) uint32
    """
    if order < 1:
        raise ValueError(f"Lanczos order must be >= 1, got {order}")
    xin = np.ascontiguousarray(xin, dtype=np.float64)
    yin = np.ascontiguousarray(yin, dtype=np.float64)
    if xin.shape != yin.shape:
        raise ValueError(f"xin {xin.shape} and yin {yin.shape} must have the same shape")
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), xin.shape)
    scale = np.ascontiguousarray(scale)
    out_img = np.empty(xin.shape, np.float32)
    out_var = np.empty(xin.shape, np.float32)
    out_mask = np.empty(xin.shape, np.uint32)
    radius = float(order if mask_radius is None else mask_radius)
    _warp(
        np.ascontiguousarray(image, dtype=np.float32),
        np.ascontiguousarray(variance, dtype=np.float32),
        np.ascontiguousarray(mask, dtype=np.uint32),
        xin,
        yin,
        scale,
        int(order),
        radius,
        np.uint32(no_data_bit),
        _EXACT if exact else tap_table(int(order)),
        out_img,
        out_var,
        out_mask,
    )
    return out_img, out_var, out_mask


def interpolate_grid(gx, gy, values, x, y):
    """Bicubic-spline interpolation of a function sampled on a rectangular grid.

    Parameters
    ----------
    gx : ndarray (m,)
        Increasing grid x positions (output pixels).
    gy : ndarray (k,)
        Increasing grid y positions.
    values : ndarray (k, m)
        Function values at ``(gy[j], gx[i])``.
    x, y : ndarray
        1-d output pixel positions along x and along y.

    Returns
    -------
    ndarray (len(y), len(x))
    """
    from scipy.interpolate import RectBivariateSpline

    kx = min(3, len(gx) - 1)
    ky = min(3, len(gy) - 1)
    spline = RectBivariateSpline(gy, gx, values, kx=ky, ky=kx, s=0)
    return spline(np.asarray(y, float), np.asarray(x, float), grid=True)


def _mapping_splines(gx, gy, xi, yi):
    """Bicubic interpolating splines of a gridded mapping, and ``|det J|`` at the nodes."""
    from scipy.interpolate import RectBivariateSpline

    kx = min(3, len(gx) - 1)
    ky = min(3, len(gy) - 1)
    sx = RectBivariateSpline(gy, gx, xi, kx=ky, ky=kx, s=0)
    sy = RectBivariateSpline(gy, gx, yi, kx=ky, ky=kx, s=0)
    # The splines' first coordinate is y: dx= differentiates along y, dy= along x.
    det = np.abs(sx(gy, gx, dy=1) * sy(gy, gx, dx=1) - sx(gy, gx, dx=1) * sy(gy, gx, dy=1))
    return sx, sy, det


def interpolate_mapping(gx, gy, xi, yi, x, y):
    """Pixel mapping and output-to-input pixel area ratio from a mapping sampled on a grid.

    Parameters
    ----------
    gx, gy : ndarray (m,), (k,)
        Increasing grid positions (output pixels).
    xi, yi : ndarray (k, m)
        Input pixel coordinates at the grid nodes.
    x, y : ndarray
        1-d output pixel positions along x and along y.

    Returns
    -------
    xin, yin : ndarray (len(y), len(x))
        Bicubic-spline interpolation of the mapping (as :func:`interpolate_grid`).
    area : ndarray (len(y), len(x))
        ``|det d(xin, yin) / d(x, y)|`` from the splines' derivatives at the grid nodes,
        interpolated bilinearly in between: the area ratio varies slowly (by ~1e-3 across a
        detector), so this differs from central differences of the exact mapping at every
        pixel by ~4e-8 relative (tested). :func:`warp_planes_grid` evaluates the same inside
        the kernel; this is its numpy reference.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    sx, sy, det = _mapping_splines(gx, gy, xi, yi)
    area = np.empty((y.size, x.size))
    ix, fx = _cells(np.asarray(gx, float), x)
    iy, fy = _cells(np.asarray(gy, float), y)
    _bilinear(det, ix, fx, iy, fy, area)
    return sx(y, x, grid=True), sy(y, x, grid=True), area


def _basis(t, k, x):
    """B-spline basis of degree ``k`` on knots ``t`` at ``x``: first coefficient index (n,)
    and the ``k + 1`` non-zero basis values (n, k + 1) of each point."""
    from scipy.interpolate import BSpline

    d = BSpline.design_matrix(x, t, k)
    idx = np.asarray(d.indices).reshape(x.size, k + 1)
    if not np.all(np.diff(idx, axis=1) == 1):
        raise ValueError("unexpected B-spline design matrix layout")
    return np.ascontiguousarray(idx[:, 0]), np.ascontiguousarray(np.asarray(d.data).reshape(x.size, k + 1))


def warp_planes_grid(
    image,
    variance,
    mask,
    gx,
    gy,
    xi,
    yi,
    x,
    y,
    *,
    offset=(0.0, 0.0),
    calibration: float = 1.0,
    order: int = 3,
    mask_radius: float | None = None,
    no_data_bit: int = NO_DATA_BIT,
):
    """:func:`warp_planes` with the pixel mapping given on a grid: the mapping's bicubic
    splines and the pixel area ratio of :func:`interpolate_mapping` are evaluated inside the
    kernel, row by row (no full-resolution mapping or scale arrays).

    Parameters
    ----------
    image, variance, mask : ndarray (h, w)
        Input planes.
    gx, gy : ndarray (m,), (k,)
        Increasing grid positions (output pixels), at least 4 each.
    xi, yi : ndarray (k, m)
        Input pixel coordinates at the grid nodes.
    x, y : ndarray
        1-d output pixel positions (within the grid) along x and along y.
    offset : (x0, y0), input pixels
        Subtracted from the mapping: position of ``image[0, 0]`` in the input frame.
    calibration : float
        Multiplies the output image (its square the variance), times the area ratio.
    order, mask_radius, no_data_bit
        As :func:`warp_planes`.

    Returns
    -------
    image, variance : ndarray (len(y), len(x)) float32
    mask : ndarray (len(y), len(x)) uint32
    """
    args = _grid_args(image, variance, mask, gx, gy, xi, yi, x, y, offset, calibration, order, mask_radius, no_data_bit)
    ny, nx = args[7].size, args[5].size
    out_img = np.empty((ny, nx), np.float32)
    out_var = np.empty((ny, nx), np.float32)
    out_mask = np.empty((ny, nx), np.uint32)
    cast(Any, _warp_grid)(*args, out_img, out_var, out_mask)  # the arguments are built by _grid_args
    return out_img, out_var, out_mask


def warp_grid_accumulate(
    image,
    variance,
    mask,
    gx,
    gy,
    xi,
    yi,
    x,
    y,
    accumulators,
    origin,
    weight: float,
    bad_bits: int,
    *,
    offset=(0.0, 0.0),
    calibration: float = 1.0,
    order: int = 3,
    mask_radius: float | None = None,
    no_data_bit: int = NO_DATA_BIT,
):
    """:func:`warp_planes_grid` added straight into weighted-mean accumulators, one warped
    row at a time (no warped planes: the fused warp-into-coadd of a streaming mean).

    Parameters
    ----------
    image, variance, mask, gx, gy, xi, yi, x, y
        As :func:`warp_planes_grid`.
    accumulators : (sw, swi, sw2v, mask_or, n)
        2-d float64, float64, float64, uint32 and int32 planes: ``sum w``, ``sum w i``,
        ``sum w^2 v``, the OR of the masks and the number of inputs of each pixel
        (:class:`procsky.kernels.coadd.MeanAccumulator`'s planes), updated in place.
    origin : (y0, x0)
        Accumulator pixel of output pixel ``(y[0], x[0])``.
    weight : float
        This input's weight.
    bad_bits : int
        Samples with any of these mask bits, or a non-finite value, are left out.
    offset, calibration, order, mask_radius, no_data_bit
        As :func:`warp_planes_grid`.

    The sums are those of warping with :func:`warp_planes_grid` and adding the planes with
    :meth:`procsky.kernels.coadd.MeanAccumulator.add`, bit for bit.
    """
    sw, swi, sw2v, mask_or, n = accumulators
    args = _grid_args(image, variance, mask, gx, gy, xi, yi, x, y, offset, calibration, order, mask_radius, no_data_bit)
    ny, nx = args[7].size, args[5].size
    oy, ox = int(origin[0]), int(origin[1])
    if oy < 0 or ox < 0 or oy + ny > sw.shape[0] or ox + nx > sw.shape[1]:
        raise ValueError(f"rows {oy}..{oy + ny}, columns {ox}..{ox + nx} exceed the accumulators {sw.shape}")
    cast(Any, _warp_grid_accumulate)(*args, ny, sw, swi, sw2v, mask_or, n, oy, ox, float(weight), np.uint32(bad_bits))


def _grid_args(image, variance, mask, gx, gy, xi, yi, x, y, offset, calibration, order, mask_radius, no_data_bit):
    """The arguments of :func:`_warp_grid` before its output planes."""
    if order < 1:
        raise ValueError(f"Lanczos order must be >= 1, got {order}")
    gx = np.asarray(gx, float)
    gy = np.asarray(gy, float)
    if gx.size < 4 or gy.size < 4:
        raise ValueError("warp_planes_grid needs a grid of at least 4 x 4 nodes")
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    sx, sy, det = _mapping_splines(gx, gy, xi, yi)
    (ty, tx, cxf), (_, _, cyf) = sx.tck, sy.tck
    ky, kx = sx.degrees
    shape = (len(ty) - ky - 1, len(tx) - kx - 1)
    bx_idx, bx_val = _basis(tx, kx, x)
    by_idx, by_val = _basis(ty, ky, y)
    ax_i, ax_f = _cells(gx, x)
    ay_i, ay_f = _cells(gy, y)
    radius = float(order if mask_radius is None else mask_radius)
    return (
        np.ascontiguousarray(image, dtype=np.float32),
        np.ascontiguousarray(variance, dtype=np.float32),
        np.ascontiguousarray(mask, dtype=np.uint32),
        np.ascontiguousarray(cxf.reshape(shape)),
        np.ascontiguousarray(cyf.reshape(shape)),
        bx_idx,
        bx_val,
        by_idx,
        by_val,
        float(offset[0]),
        float(offset[1]),
        np.ascontiguousarray(det),
        ax_i,
        ax_f,
        ay_i,
        ay_f,
        float(calibration),
        int(order),
        radius,
        np.uint32(no_data_bit),
        tap_table(int(order)),
    )


def _cells(g, x):
    """Grid cell index and fractional position in it of each ``x`` (clamped to the grid)."""
    i = np.clip(np.searchsorted(g, x, side="right") - 1, 0, g.size - 2)
    f = np.clip((x - g[i]) / (g[i + 1] - g[i]), 0.0, 1.0)
    return i, f


@numba.njit(nogil=True, cache=True)
def _bilinear(values, ix, fx, iy, fy, out):
    for j in range(iy.size):
        a = iy[j]
        v = fy[j]
        for i in range(ix.size):
            b = ix[i]
            u = fx[i]
            lo = values[a, b] + u * (values[a, b + 1] - values[a, b])
            hi = values[a + 1, b] + u * (values[a + 1, b + 1] - values[a + 1, b])
            out[j, i] = lo + v * (hi - lo)


def area_ratio(xin, yin):
    """Output-to-input pixel area ratio ``|det d(xin, yin) / d(x, y)|`` per output pixel.

    Central differences of the mapping (one-sided at the block edges, second-order
    accurate, exact for the affine part).
    """
    if xin.shape[0] < 2 or xin.shape[1] < 2:
        raise ValueError("area_ratio needs a mapping of at least 2 x 2 pixels")
    dxdy, dxdx = np.gradient(xin)
    dydy, dydx = np.gradient(yin)
    return np.abs(dxdx * dydy - dxdy * dydx)


def warp_kernel_image(kernel, jacobian, *, order: int = 3, size: int | None = None, offset=(0.0, 0.0)):
    """Resample a PSF kernel image through a local affine pixel mapping.

    Parameters
    ----------
    kernel : ndarray (n, n)
        Input PSF kernel (input pixels), centred on its central pixel plus ``offset``.
    jacobian : (2, 2) array
        ``d(x_in, y_in) / d(x_out, y_out)`` at the position of interest.
    order : int
        Lanczos order.
    size : int, optional
        Output kernel side (odd); default the input side scaled by the Jacobian.
    offset : (dx, dy), input pixels
        Where the PSF's centre lies in ``kernel`` relative to its central pixel: the
        sub-pixel phase at which the image warp samples the input there. The output is
        centred on its central pixel and includes the smoothing that Lanczos interpolation
        at that phase applies to a star (for an undersampled PSF: a lower, wider core at
        half-pixel phases; for a well-sampled one: negligible). With ``(0, 0)`` the
        interpolation at the kernel's own pixels is the identity and adds no smoothing.

    Returns
    -------
    ndarray (size, size)
        Normalised kernel in output pixels, centred on the central pixel.
    """
    k = np.asarray(kernel, dtype=np.float32)
    n = k.shape[0]
    jac = np.asarray(jacobian, dtype=float)
    if size is None:
        stretch = 1.0 / max(np.sqrt(abs(np.linalg.det(jac))), 1e-6)
        size = int(np.ceil(n * stretch)) | 1
    c_out = (size - 1) / 2.0
    c_in = (n - 1) / 2.0
    pad = order + 1
    kp = np.pad(k, pad)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    u, v = xx - c_out, yy - c_out
    xin = jac[0, 0] * u + jac[0, 1] * v + c_in + pad + float(offset[0])
    yin = jac[1, 0] * u + jac[1, 1] * v + c_in + pad + float(offset[1])
    var = np.zeros_like(kp)
    msk = np.zeros(kp.shape, np.uint32)
    img, _, m = warp_planes(kp, var, msk, xin, yin, 1.0, order=order, mask_radius=0.0, exact=True)
    img = np.where(np.isfinite(img), img, 0.0).astype(float)
    s = img.sum()
    return img / s if s != 0 else img


@functools.lru_cache(maxsize=16)
def lanczos_noise_correlation(order: int = 3, n_samples: int = 64) -> float:
    """Mean ratio of a warped white-noise field's pixel variance to its propagated variance.

    ``sum w^2`` is the exact marginal variance of each output pixel, so this is 1; what
    warping changes is the *covariance* between neighbouring output pixels. Returned
    instead: the mean over sub-pixel phases of ``(sum_k w_k)^2 / sum_k w_k^2``, the factor
    by which the variance of a sum over a large aperture exceeds the sum of the pixel
    variances (the "noise correlation factor" SWarp and LSST coadds document).
    """
    phases = (np.arange(n_samples) + 0.5) / n_samples
    sums = []
    for fx in phases:
        t = fx - np.arange(-order + 1, order + 1)
        w = lanczos(t, order)
        w = w / w.sum()
        sums.append(np.sum(w * w))
    # Var(aperture sum) = sum_in V (each input pixel's weights sum to ~1 over the outputs)
    # while sum of output variances = sum_out sum w^2 V: the ratio is 1 / <sum w^2> per axis.
    g = 1.0 / np.mean(sums)
    return float(g * g)
