"""Sky background: clipped statistics on a mesh of boxes, spline-interpolated back.

The estimator follows SExtractor (Bertin & Arnouts 1996, section 3.1) and sep:

1. the image is cut into boxes (default 128 x 128 px, LSST's default bin size);
2. in each box the unmasked pixels are sigma-clipped around their median until stable, and
   the background is the mode estimate ``2.5 median - 1.5 mean`` (or the median when the
   distribution is strongly skewed, ``|mean - median| / sigma > 0.3``, i.e. crowded); the
   box RMS is the clipped standard deviation;
3. boxes with too few good pixels are filled from their neighbours, then the mesh is
   median-filtered (3 x 3 boxes) to remove boxes spoiled by bright objects;
4. the mesh is interpolated to every pixel with a natural bicubic spline through the box
   centres, first along y for every mesh column, then along x (as SExtractor's
   ``makeback``/``backline``).

All heavy loops are numba kernels (O(N) in the number of pixels: the per-box median uses
numba's selection-based ``np.median``). To iterate with detection, pass the detection
footprints in ``ignore`` (or the DETECTED bit in ``bad_bits``) and call again.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import numba
import numpy as np

from ._bits import BAD_PIXEL_BITS

__all__ = [
    "Background",
    "estimate_background",
    "mesh_statistics",
    "fill_and_filter_mesh",
    "interpolate_mesh",
    "clipped_mode",
]


class Background(NamedTuple):
    """Result of :func:`estimate_background` (all arrays in image units, counts).

    Attributes
    ----------
    background : ndarray (ny, nx) float32
        Smooth background model.
    rms : ndarray (ny, nx) float32 or None
        Smooth background RMS model (per pixel noise of the sky); None when not interpolated to
        every pixel (``estimate_background(rms_plane=False)``): :meth:`rms_at` gives it where needed.
    mesh_background, mesh_rms : ndarray (nby, nbx) float64
        Filtered per-box values the maps are interpolated from.
    global_background, global_rms : float
        Medians of the mesh values.
    box_size : tuple of int
        (box_y, box_x) in pixels.
    """

    background: np.ndarray
    rms: np.ndarray | None
    mesh_background: np.ndarray
    mesh_rms: np.ndarray
    global_background: float
    global_rms: float
    box_size: tuple

    def rms_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The RMS map at integer pixels (y, x), float32: the same values as ``rms[y, x]``, computed
        from the mesh when the map was not made."""
        y = np.asarray(y, dtype=np.int64)
        x = np.asarray(x, dtype=np.int64)
        if self.rms is not None:
            return self.rms[y, x]
        ny, nx = self.background.shape
        by, bx = self.box_size
        return interpolate_mesh_at(
            np.asarray(self.mesh_rms, dtype=np.float64), ny, nx, by, bx, y.ravel(), x.ravel()
        ).reshape(y.shape)


@numba.njit(nogil=True, cache=True)
def _select(a, n, k):
    """k-th smallest of a[:n] (0-based), in place (Hoare quickselect, median-of-3 pivot)."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three as pivot
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@numba.njit(nogil=True, cache=True)
def _median_inplace(a, n):
    """Median of a[:n]; reorders a[:n]."""
    if n <= 32:
        # insertion sort beats selection on the tiny windows of the CR and filter kernels
        for i in range(1, n):
            v = a[i]
            j = i - 1
            while j >= 0 and a[j] > v:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = v
        if n % 2 == 1:
            return a[n // 2]
        return 0.5 * (a[n // 2 - 1] + a[n // 2])
    k = n // 2
    hi = _select(a, n, k)
    if n % 2 == 1:
        return hi
    # the lower middle is the maximum of the part left of k after selection
    lo = a[0]
    for i in range(1, k):
        if a[i] > lo:
            lo = a[i]
    return 0.5 * (lo + hi)


@numba.njit(nogil=True, cache=True)
def clipped_mode(values, nsigma=3.0, max_iter=20):
    """Sigma-clipped mode estimate and RMS of a 1-D sample (SExtractor's estimator).

    Parameters
    ----------
    values : ndarray (n,) float
        Sample (modified: it is used as scratch space).
    nsigma : float
        Clipping half-width in units of the standard deviation, around the median.
    max_iter : int
        Maximum clipping iterations.

    Returns
    -------
    mode, sigma : float
        ``2.5 median - 1.5 mean`` of the clipped sample (the median when
        ``|mean - median| >= 0.3 sigma``), and its clipped standard deviation. NaN when the
        sample is empty.
    n : int
        Number of values kept after clipping.
    """
    n = values.size
    total = 0.0
    for i in range(n):
        total += values[i]
    return _clipped_mode_sum(values, n, total, nsigma, max_iter)


@numba.njit(nogil=True, cache=True)
def _clipped_mode_sum(values, n, total, nsigma, max_iter):
    """:func:`clipped_mode` of ``values[:n]`` given ``total``, their sum in index order (float64 from
    0): each pass's sum is taken while the previous pass compacts the sample, in the same order."""
    if n == 0:
        return np.nan, np.nan, 0
    med = 0.0
    mean = 0.0
    sig = 0.0
    last = False
    for it in range(max_iter + 1):
        mean = total / n
        var = 0.0
        for i in range(n):
            d = values[i] - mean
            var += d * d
        sig = np.sqrt(var / max(n - 1, 1))
        med = _median_inplace(values, n)
        if sig <= 0.0 or last or it == max_iter:
            break
        lo = med - nsigma * sig
        hi = med + nsigma * sig
        m = 0
        total = 0.0
        for i in range(n):
            v = values[i]
            if v >= lo and v <= hi:
                values[m] = v
                total += v
                m += 1
        if m == n or m == 0:
            break
        # removing less than 0.1 % of the sample changes the estimate negligibly: one
        # last pass for the statistics of the clipped sample
        last = (n - m) < 0.001 * n
        n = m
    if sig <= 0.0:
        return med, 0.0, n
    if abs(mean - med) / sig < 0.3:
        return 2.5 * med - 1.5 * mean, sig, n
    return med, sig, n


@numba.njit(nogil=True, cache=True)
def mesh_statistics(image, ignore, box_y, box_x, nsigma=3.0, max_iter=20, min_fraction=0.5):
    """Clipped mode and RMS of every box of the mesh.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Image, counts.
    ignore : ndarray (ny, nx) bool
        True for pixels to leave out (masked, detected, non-finite pixels are always left out).
    box_y, box_x : int
        Box size, pixels. The last row/column of boxes may be smaller.
    nsigma, max_iter : float, int
        Clipping parameters (see :func:`clipped_mode`).
    min_fraction : float
        A box with fewer good pixels than this fraction of its area is marked invalid (NaN).

    Returns
    -------
    back, rms : ndarray (nby, nbx) float64
        Per-box background and RMS, NaN for invalid boxes.
    """
    ny, nx = image.shape
    nby = (ny + box_y - 1) // box_y
    nbx = (nx + box_x - 1) // box_x
    back = np.full((nby, nbx), np.nan)
    rms = np.full((nby, nbx), np.nan)
    buf = np.empty(box_y * box_x, dtype=np.float32)
    for by in range(nby):
        y0 = by * box_y
        y1 = min(y0 + box_y, ny)
        for bx in range(nbx):
            x0 = bx * box_x
            x1 = min(x0 + box_x, nx)
            n = 0
            total = 0.0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    v = image[y, x]
                    if not ignore[y, x] and np.isfinite(v):
                        buf[n] = v
                        total += buf[n]
                        n += 1
            area = (y1 - y0) * (x1 - x0)
            if n < 3 or n < min_fraction * area:
                continue
            mode, sig, _ = _clipped_mode_sum(buf, n, total, nsigma, max_iter)
            back[by, bx] = mode
            rms[by, bx] = sig
    return back, rms


@numba.njit(nogil=True, cache=True)
def _fill_invalid(grid):
    """Replace NaN boxes by the mean of the nearest valid boxes (growing rings)."""
    nby, nbx = grid.shape
    out = grid.copy()
    nvalid = 0
    for i in range(nby):
        for j in range(nbx):
            if np.isfinite(grid[i, j]):
                nvalid += 1
    if nvalid == 0:
        return out
    for i in range(nby):
        for j in range(nbx):
            if np.isfinite(grid[i, j]):
                continue
            for r in range(1, max(nby, nbx) + 1):
                s = 0.0
                c = 0
                for ii in range(max(0, i - r), min(nby, i + r + 1)):
                    for jj in range(max(0, j - r), min(nbx, j + r + 1)):
                        if max(abs(ii - i), abs(jj - j)) != r:
                            continue
                        v = grid[ii, jj]
                        if np.isfinite(v):
                            s += v
                            c += 1
                if c > 0:
                    out[i, j] = s / c
                    break
    return out


@numba.njit(nogil=True, cache=True)
def _reflect_value(grid, i, j):
    """Mesh value beyond the edges by point reflection: g(-k) = 2 g(0) - g(k) (linear extrapolation)."""
    nby, nbx = grid.shape
    ci = min(max(i, 0), nby - 1)
    cj = min(max(j, 0), nbx - 1)
    ri = min(max(2 * ci - i, 0), nby - 1)
    rj = min(max(2 * cj - j, 0), nbx - 1)
    return 2.0 * grid[ci, cj] - grid[ri, rj]


@numba.njit(nogil=True, cache=True)
def _median_filter_grid(grid, fy, fx, extrapolate):
    nby, nbx = grid.shape
    out = np.empty_like(grid)
    hy = fy // 2
    hx = fx // 2
    buf = np.empty(fy * fx)
    for i in range(nby):
        for j in range(nbx):
            n = 0
            for ii in range(i - hy, i + hy + 1):
                for jj in range(j - hx, j + hx + 1):
                    if 0 <= ii < nby and 0 <= jj < nbx:
                        buf[n] = grid[ii, jj]
                        n += 1
                    elif extrapolate:
                        buf[n] = _reflect_value(grid, ii, jj)
                        n += 1
            out[i, j] = np.median(buf[:n])
    return out


def fill_and_filter_mesh(back, rms, filter_size=3, extrapolate_edges=True):
    """Fill invalid (NaN) boxes from their neighbours, then median-filter the mesh.

    Parameters
    ----------
    back, rms : ndarray (nby, nbx) float64
        Output of :func:`mesh_statistics`.
    filter_size : int or (int, int)
        Median filter size in boxes (1 = no filtering).
    extrapolate_edges : bool
        Beyond the mesh edges the filter sees linearly extrapolated values, so a sky
        gradient is not flattened in the edge boxes. False shrinks the window at the
        edges instead (SExtractor/sep behaviour).

    Returns
    -------
    back, rms : ndarray (nby, nbx) float64
    """
    # (np.isscalar's type guard does not say which scalar: the sizes are ints)
    fy, fx = cast(tuple[int, int], (filter_size, filter_size) if np.isscalar(filter_size) else filter_size)
    back = _fill_invalid(np.asarray(back, dtype=np.float64))
    rms = _fill_invalid(np.asarray(rms, dtype=np.float64))
    if fy > 1 or fx > 1:
        back = _median_filter_grid(back, int(fy), int(fx), bool(extrapolate_edges))
        rms = _median_filter_grid(rms, int(fy), int(fx), bool(extrapolate_edges))
    return back, rms


@numba.njit(nogil=True, cache=True)
def _spline_d2(yv):
    """Second derivatives of the natural cubic spline through equally spaced nodes (unit step)."""
    n = yv.size
    d2 = np.zeros(n)
    if n < 3:
        return d2
    u = np.zeros(n)
    # tridiagonal solve for unit spacing: d2[i-1] + 4 d2[i] + d2[i+1] = 6 (y[i+1] - 2y[i] + y[i-1])
    for i in range(1, n - 1):
        p = 0.5 * d2[i - 1] + 2.0
        d2[i] = -0.5 / p
        u[i] = (3.0 * (yv[i + 1] - 2.0 * yv[i] + yv[i - 1]) - 0.5 * u[i - 1]) / p
    d2[n - 1] = 0.0
    for i in range(n - 2, -1, -1):
        d2[i] = d2[i] * d2[i + 1] + u[i]
    d2[0] = 0.0
    return d2


@numba.njit(nogil=True, cache=True)
def _spline_eval(yv, d2, t):
    """Evaluate the natural spline (nodes at 0..n-1) at t; outside, extend the end cubic."""
    n = yv.size
    if n == 1:
        return yv[0]
    k = int(np.floor(t))
    if k < 0:
        k = 0
    if k > n - 2:
        k = n - 2
    b = t - k
    a = 1.0 - b
    if n == 2:
        return a * yv[k] + b * yv[k + 1]
    return a * yv[k] + b * yv[k + 1] + ((a * a * a - a) * d2[k] + (b * b * b - b) * d2[k + 1]) / 6.0


@numba.njit(nogil=True, cache=True)
def _mesh_columns(grid, ny, box_y, ys):
    """Step 1 of :func:`interpolate_mesh` (along y, every mesh column) at the rows ``ys``."""
    nby, nbx = grid.shape
    cols = np.empty((ys.size, nbx))
    col = np.empty(nby)
    for j in range(nbx):
        for i in range(nby):
            col[i] = grid[i, j]
        d2 = _spline_d2(col)
        for k in range(ys.size):
            t = (ys[k] + 0.5) / box_y - 0.5
            cols[k, j] = _spline_eval(col, d2, t)
    return cols


@numba.njit(nogil=True, cache=True)
def interpolate_mesh_at(grid, ny, nx, box_y, box_x, ys, xs):
    """:func:`interpolate_mesh` at the pixels (ys, xs) only (integer arrays): the same arithmetic,
    the same float32 values as the full map there."""
    nby, nbx = grid.shape
    cols = _mesh_columns(grid, ny, box_y, ys)
    out = np.empty(ys.size, dtype=np.float32)
    row = np.empty(nbx)
    for n in range(ys.size):
        for j in range(nbx):
            row[j] = cols[n, j]
        if nbx == 1:
            out[n] = row[0]
            continue
        d2 = _spline_d2(row)
        t = (xs[n] + 0.5) / box_x - 0.5
        k = int(np.floor(t))
        if k < 0:
            k = 0
        if k > nbx - 2:
            k = max(nbx - 2, 0)
        b = t - k
        a = 1.0 - b
        if nbx == 2:
            wa, wb, wc, wd = a, b, 0.0, 0.0
        else:
            wa, wb, wc, wd = a, b, (a * a * a - a) / 6.0, (b * b * b - b) / 6.0
        out[n] = wa * row[k] + wb * row[k + 1] + wc * d2[k] + wd * d2[k + 1]
    return out


@numba.njit(nogil=True, cache=True)
def interpolate_mesh(grid, ny, nx, box_y, box_x):
    """Natural bicubic spline interpolation of a box mesh to every pixel.

    Box centres are at ``(i + 0.5) * box - 0.5`` pixels (0-based pixel centres); beyond the
    first/last centre the end cubic segments are extended.

    Parameters
    ----------
    grid : ndarray (nby, nbx) float64
        Mesh values.
    ny, nx : int
        Output shape, pixels.
    box_y, box_x : int
        Box size, pixels.

    Returns
    -------
    ndarray (ny, nx) float32
    """
    nby, nbx = grid.shape
    # step 1: along y for every mesh column -> (ny, nbx)
    cols = np.empty((ny, nbx))
    col = np.empty(nby)
    for j in range(nbx):
        for i in range(nby):
            col[i] = grid[i, j]
        d2 = _spline_d2(col)
        for y in range(ny):
            t = (y + 0.5) / box_y - 0.5
            cols[y, j] = _spline_eval(col, d2, t)
    out = np.empty((ny, nx), dtype=np.float32)
    # the interval and cubic weights along x are the same for every row: compute them once
    kx = np.empty(nx, dtype=np.int64)
    wa = np.empty(nx)
    wb = np.empty(nx)
    wc = np.empty(nx)
    wd = np.empty(nx)
    for x in range(nx):
        t = (x + 0.5) / box_x - 0.5
        k = int(np.floor(t))
        if k < 0:
            k = 0
        if k > nbx - 2:
            k = max(nbx - 2, 0)
        b = t - k
        a = 1.0 - b
        kx[x] = k
        if nbx == 1:
            wa[x] = 1.0
            wb[x] = 0.0
            wc[x] = 0.0
            wd[x] = 0.0
        elif nbx == 2:
            wa[x] = a
            wb[x] = b
            wc[x] = 0.0
            wd[x] = 0.0
        else:
            wa[x] = a
            wb[x] = b
            wc[x] = (a * a * a - a) / 6.0
            wd[x] = (b * b * b - b) / 6.0
    row = np.empty(nbx)
    for y in range(ny):
        for j in range(nbx):
            row[j] = cols[y, j]
        d2 = _spline_d2(row)
        if nbx == 1:
            for x in range(nx):
                out[y, x] = row[0]
            continue
        for x in range(nx):
            k = kx[x]
            out[y, x] = wa[x] * row[k] + wb[x] * row[k + 1] + wc[x] * d2[k] + wd[x] * d2[k + 1]
    return out


def estimate_background(
    image,
    mask=None,
    *,
    ignore=None,
    bad_bits=BAD_PIXEL_BITS,
    box_size=128,
    filter_size=3,
    nsigma=3.0,
    max_iter=20,
    min_fraction=0.5,
    extrapolate_edges=True,
    rms_plane=True,
):
    """Estimate the sky background and its RMS (SExtractor-like mesh + bicubic spline).

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Image, counts.
    mask : ndarray (ny, nx) uint32, optional
        Mask planes (LSST bit order); pixels with any of ``bad_bits`` are left out.
    ignore : ndarray (ny, nx) bool, optional
        Extra pixels to leave out, e.g. detection footprints (grown) from a previous pass.
    bad_bits : int
        Bit mask of planes to leave out (default BAD|SAT|NO_DATA|CR|EDGE; add DETECTED to
        iterate with detection).
    box_size : int or (int, int)
        Box size (y, x), pixels.
    filter_size : int or (int, int)
        Median filter over the mesh, boxes.
    nsigma, max_iter : float, int
        Clipping parameters.
    min_fraction : float
        Minimum fraction of good pixels for a box to be used directly.
    extrapolate_edges : bool
        See :func:`fill_and_filter_mesh` (False = exactly SExtractor's edge handling).
    rms_plane : bool
        Interpolate the RMS to every pixel (``rms``); False leaves ``rms`` None (a whole-frame
        plane less) and :meth:`Background.rms_at` evaluates it where needed.

    Returns
    -------
    Background

    Raises
    ------
    ValueError
        The image has no finite pixel (the task layer turns this into ``NoWorkError``).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (ny, nx), got shape {image.shape}; pass one detector")
    by, bx = cast(tuple[int, int], (box_size, box_size) if np.isscalar(box_size) else box_size)
    by, bx = int(by), int(bx)
    if by < 1 or bx < 1:
        raise ValueError(f"box_size must be >= 1 pixel, got {box_size!r}")
    bad = np.zeros(image.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool).copy()
    if mask is not None and bad_bits:
        bad |= (np.asarray(mask) & np.uint32(bad_bits)) != 0
    img = np.ascontiguousarray(image, dtype=np.float32)
    back_mesh, rms_mesh = mesh_statistics(img, bad, by, bx, float(nsigma), int(max_iter), float(min_fraction))
    if not np.isfinite(back_mesh).any():
        # nothing usable: fall back to all finite pixels so the caller still gets a map
        back_mesh, rms_mesh = mesh_statistics(img, np.zeros_like(bad), by, bx, float(nsigma), int(max_iter), 0.0)
        if not np.isfinite(back_mesh).any():
            raise ValueError(
                f"no finite pixel in this {image.shape[1]}x{image.shape[0]} image: cannot estimate a background "
                "(the caller should treat the exposure as having no usable data)"
            )
    back_mesh, rms_mesh = fill_and_filter_mesh(back_mesh, rms_mesh, filter_size, extrapolate_edges)
    ny, nx = image.shape
    back = interpolate_mesh(back_mesh, ny, nx, by, bx)
    rms = interpolate_mesh(rms_mesh, ny, nx, by, bx) if rms_plane else None
    return Background(
        background=back,
        rms=rms,
        mesh_background=back_mesh,
        mesh_rms=rms_mesh,
        global_background=float(np.nanmedian(back_mesh)),
        global_rms=float(np.nanmedian(rms_mesh)),
        box_size=(by, bx),
    )
