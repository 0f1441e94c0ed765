"""Kernels of detection on coadds: PSF matched filter by FFT, measured noise of a
significance image, sub-pixel peaks and sky-object placement.

* :func:`matched_filter`: ``num = corr(I, k)``, ``den = corr(V, k^2)`` with the PSF kernel
  ``k`` (zero signal and variance at bad pixels and outside the image), so that
  ``nu = num / sqrt(den)`` is the PSF-flux S/N the variance plane predicts at each pixel
  (LSST ``SourceDetectionTask``'s matched filter with the full PSF image rather than a
  Gaussian approximation). ``num / sum(k^2)`` is the unweighted PSF-fit flux of a point
  source centred on the pixel and ``sqrt(den) / sum(k^2)`` its error (LSST ``PsfFlux``).
* :func:`robust_noise`: median and MAD standard deviation of a significance image away from
  its own sources (pixels beyond the grown ``|nu - med| > clip * std`` regions, iterated),
  as LSST's ``thresholdType="pixel_stdev"``: the variance plane of a resampled coadd does
  not describe the correlated noise of the filtered image, the pixels themselves do.
* :func:`refine_peaks`: quadratic interpolation of the 3 x 3 neighbourhood of integer peaks.
* :func:`label_argmax`: the highest pixel of each label; :func:`enclosed_holes`: the bad-pixel
  components enclosed by detections (masked saturated cores).
* :func:`place_separated`: greedy placement of points at random allowed pixels, at least a
  given distance apart (the sky objects of LSST's ``SkyObjectsTask``).
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft

from .detection import grow_mask

__all__ = [
    "matched_filter",
    "matched_filters",
    "robust_noise",
    "clipped_std",
    "refine_peaks",
    "place_separated",
    "label_argmax",
    "lowered_kernel",
    "enclosed_holes",
]


def _correlate_same(image, kernels):
    """``out[y, x] = sum_ji k[j + h, i + h] * image[y + j, x + i]`` with zeros outside, for each
    kernel ``k`` (odd squares), by FFT with one transform of the image (float64 transforms;
    float32 results)."""
    ny, nx = image.shape
    h = max(k.shape[0] for k in kernels) // 2
    shape = (
        scipy.fft.next_fast_len(ny + 2 * h, real=True),
        scipy.fft.next_fast_len(nx + 2 * h, real=True),
    )
    fi = scipy.fft.rfft2(np.asarray(image, dtype=np.float64), s=shape, workers=1)
    outs = []
    for k in kernels:
        kk = np.zeros((2 * h + 1, 2 * h + 1))
        r = k.shape[0] // 2
        kk[h - r : h + r + 1, h - r : h + r + 1] = k
        f = fi * scipy.fft.rfft2(kk[::-1, ::-1], s=shape, workers=1)
        out = scipy.fft.irfft2(f, s=shape, workers=1)
        del f
        outs.append(out[h : h + ny, h : h + nx].astype(np.float32))
    return outs


@numba.njit(nogil=True, cache=True)
def _clean(image, variance, bad):
    ny, nx = image.shape
    img = np.zeros((ny, nx), dtype=np.float32)
    var = np.zeros((ny, nx), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            i = image[y, x]
            v = variance[y, x]
            if not bad[y, x] and np.isfinite(i) and np.isfinite(v) and v > 0:
                img[y, x] = i
                var[y, x] = v
    return img, var


@numba.njit(nogil=True, cache=True)
def _significance(num, den, bad, min_den):
    ny, nx = num.shape
    out = np.zeros((ny, nx), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            d = den[y, x]
            if d > min_den and not bad[y, x]:
                out[y, x] = num[y, x] / np.sqrt(d)
    return out


def matched_filter(image, variance, bad, kernel, normalise=True):
    """PSF matched filter of an image.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Background-subtracted image (nJy per pixel).
    variance : ndarray (ny, nx) float
        Variance plane (nJy^2).
    bad : ndarray (ny, nx) bool
        Pixels without signal (NO_DATA, BAD); non-finite pixels and variance <= 0 count as bad.
    kernel : ndarray (k, k) float, odd side
        PSF image (normalised or not: it is normalised to unit sum here).
    normalise : bool
        False: the kernel is used as given (a zero-sum kernel such as :func:`lowered_kernel`).

    Returns
    -------
    nu : ndarray (ny, nx) float32
        ``num / sqrt(den)``; 0 at bad pixels and where less than 1e-3 of the kernel's
        ``sum(k^2)`` carries variance.
    num, den : ndarray (ny, nx) float32
        ``corr(I, k)`` and ``corr(V, k^2)``.
    k2 : float
        ``sum(k^2)`` of the normalised kernel (1 / effective area, px^-1).
    """
    return matched_filters(image, variance, bad, [kernel], normalise=normalise)[0]


def matched_filters(image, variance, bad, kernels, normalise=True):
    """:func:`matched_filter` with several kernels, sharing the transforms of the planes.

    Returns
    -------
    list of (nu, num, den, k2), one per kernel
    """
    ks = []
    for kernel in kernels:
        k = np.asarray(kernel, dtype=np.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
            raise ValueError(f"a filter kernel must be a square 2-D array of odd side, got shape {k.shape}")
        if normalise:
            s = k.sum()
            if not s > 0:
                raise ValueError(f"the PSF kernel must have a positive sum, got {s!r}")
            k = k / s
        ks.append(k)
    bad = np.asarray(bad, dtype=np.bool_)
    img, var = _clean(np.asarray(image), np.asarray(variance), bad)
    nums = _correlate_same(img, ks)
    dens = _correlate_same(var, [k * k for k in ks])
    pos = var[var > 0]
    typical = float(np.median(pos)) if pos.size else 0.0
    nodata = bad | (var <= 0)
    out = []
    for k, num, den in zip(ks, nums, dens):
        k2 = float((k * k).sum())
        out.append((_significance(num, den, nodata, np.float32(1e-3 * typical * k2)), num, den, k2))
    return out


def robust_noise(nu, bad, *, clip=5.0, grow=3.0, step=2, n_iter=3, min_pixels=500, exclude=None):
    """Median and MAD standard deviation of ``nu`` away from its sources.

    Parameters
    ----------
    nu : ndarray (ny, nx) float32
        Significance image.
    bad : ndarray (ny, nx) bool
        Pixels left out (no data).
    clip : float
        Pixels with ``|nu - med| > clip * std`` are sources (both signs) ...
    grow : float, pixels
        ... grown by this radius before the statistics of the rest are taken.
    step : int
        Every ``step``-th pixel in each axis is sampled.
    n_iter : int
    min_pixels : int
        Fewer usable sampled pixels: ``(nan, nan)``.
    exclude : ndarray (ny, nx) bool, optional
        Source pixels already known (another filter's): one pass beyond them, no clipping.

    Returns
    -------
    (median, std, n) : float, float, int
        ``std = 1.4826 MAD``; ``nan`` when there are too few pixels or the MAD is 0 (an image
        without noise).
    """
    sub_bad = np.asarray(bad)[::step, ::step]
    med, std, n = float("nan"), float("nan"), 0
    src = exclude
    n_pass = 1 if exclude is not None else max(1, n_iter)
    for it in range(n_pass):
        sub = nu[::step, ::step]
        free = ~sub_bad
        if src is not None:
            free &= ~src[::step, ::step]
        v = sub[free]
        n = int(v.size)
        if n < min_pixels:
            return float("nan"), float("nan"), n
        med = float(np.median(v))
        std = 1.4826 * float(np.median(np.abs(v - med)))
        if not (np.isfinite(std) and std > 0):
            return float("nan"), float("nan"), n
        if it == n_pass - 1:
            break
        src = np.abs(nu - np.float32(med)) > np.float32(clip * std)
        if grow > 0:
            src = grow_mask(src, float(grow))
    return med, std, n


def clipped_std(values, *, clip=4.0, n_iter=5):
    """Mean and standard deviation of ``values`` after iterative ``clip``-sigma clipping
    (started from the median and MAD); ``(nan, nan, 0)`` for fewer than 3 finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan"), float("nan"), int(v.size)
    c = float(np.median(v))
    s = 1.4826 * float(np.median(np.abs(v - c)))
    keep = np.ones(v.size, bool)
    for _ in range(n_iter):
        if not s > 0:
            break
        new = np.abs(v - c) <= clip * s
        if new.sum() < 3:
            break
        keep = new
        c = float(v[keep].mean())
        s = float(v[keep].std(ddof=1))
    return c, s, int(keep.sum())


def refine_peaks(img, x, y):
    """Sub-pixel peak positions: the vertex of a parabola through the 3 pixels along each
    axis (a separable quadratic fit of the 3 x 3 neighbourhood), shift clipped to +-0.5 px.

    Parameters
    ----------
    img : ndarray (ny, nx)
    x, y : ndarray (n,) int
        Integer peak pixels.

    Returns
    -------
    xf, yf : ndarray (n,) float64
    """
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    ny, nx = img.shape
    xf = x.astype(np.float64)
    yf = y.astype(np.float64)
    if x.size == 0:
        return xf, yf
    ok = (x > 0) & (x < nx - 1)
    if ok.any():
        c = img[y[ok], x[ok]].astype(np.float64)
        lft = img[y[ok], x[ok] - 1].astype(np.float64)
        rgt = img[y[ok], x[ok] + 1].astype(np.float64)
        d = lft - 2 * c + rgt
        with np.errstate(divide="ignore", invalid="ignore"):
            sh = np.where(d < 0, 0.5 * (lft - rgt) / d, 0.0)
        xf[ok] += np.clip(sh, -0.5, 0.5)
    ok = (y > 0) & (y < ny - 1)
    if ok.any():
        c = img[y[ok], x[ok]].astype(np.float64)
        lo = img[y[ok] - 1, x[ok]].astype(np.float64)
        hi = img[y[ok] + 1, x[ok]].astype(np.float64)
        d = lo - 2 * c + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            sh = np.where(d < 0, 0.5 * (lo - hi) / d, 0.0)
        yf[ok] += np.clip(sh, -0.5, 0.5)
    return xf, yf


@numba.njit(nogil=True, cache=True)
def _greedy(cand_x, cand_y, ny, nx, min_sep, n_max):
    taken = np.zeros((ny, nx), dtype=np.bool_)
    r = int(np.ceil(min_sep))
    r2 = min_sep * min_sep
    out = np.empty(min(n_max, cand_x.size), dtype=np.int64)
    m = 0
    for t in range(cand_x.size):
        if m >= n_max:
            break
        x = cand_x[t]
        y = cand_y[t]
        if taken[y, x]:
            continue
        out[m] = t
        m += 1
        for yy in range(max(0, y - r), min(ny, y + r + 1)):
            for xx in range(max(0, x - r), min(nx, x + r + 1)):
                if (yy - y) * (yy - y) + (xx - x) * (xx - x) < r2:
                    taken[yy, xx] = True
    return out[:m]


def place_separated(allowed, n, min_sep, seed, n_trial_factor=20):
    """Up to ``n`` random allowed pixels, pairwise at least ``min_sep`` pixels apart.

    Candidates are drawn uniformly among the allowed pixels and accepted in turn when no
    accepted point lies closer than ``min_sep`` (greedy random sequential addition).

    Parameters
    ----------
    allowed : ndarray (ny, nx) bool
    n : int
    min_sep : float, pixels
    seed : int
    n_trial_factor : int
        ``n_trial_factor * n`` candidates are drawn.

    Returns
    -------
    x, y : ndarray (m,) int64, m <= n
    """
    allowed = np.asarray(allowed, dtype=np.bool_)
    idx = np.flatnonzero(allowed)
    if idx.size == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    n_trial = min(idx.size, int(n_trial_factor) * int(n))
    pick = idx[rng.choice(idx.size, size=n_trial, replace=False)] if n_trial < idx.size else rng.permutation(idx)
    ny, nx = allowed.shape
    cy, cx = np.divmod(pick, nx)
    keep = _greedy(cx.astype(np.int64), cy.astype(np.int64), ny, nx, float(min_sep), int(n))
    return cx[keep].astype(np.int64), cy[keep].astype(np.int64)


@numba.njit(nogil=True, cache=True)
def label_argmax(values, labels, n):
    """Pixel of the largest ``values`` of each label 1..n.

    Returns
    -------
    ndarray (n + 1, 2) int64
        Rows ``[x, y]``; row 0 and empty labels ``[-1, -1]``.
    """
    ny, nx = values.shape
    out = np.full((n + 1, 2), -1, dtype=np.int64)
    best = np.full(n + 1, -np.inf)
    for y in range(ny):
        for x in range(nx):
            lab = labels[y, x]
            if lab > 0 and values[y, x] > best[lab]:
                best[lab] = values[y, x]
                out[lab, 0] = x
                out[lab, 1] = y
    return out


@numba.njit(nogil=True, cache=True)
def enclosed_holes(bad_labels, n, inside):
    """Which components of a bad-pixel mask are holes inside detections.

    A component is enclosed when it does not touch the array's edge and every good pixel
    next to it (8-connectivity) is ``inside`` (a footprint): the masked core of a saturated
    star, not a chip gap or the coadd's edge, which run out of the footprints.

    Parameters
    ----------
    bad_labels : ndarray (ny, nx) int32
        Labelled bad-pixel components 1..n.
    n : int
    inside : ndarray (ny, nx) bool

    Returns
    -------
    ndarray (n + 1,) bool
        ``True`` for enclosed components (index 0 unused, False).
    """
    ny, nx = bad_labels.shape
    open_ = np.zeros(n + 1, dtype=np.bool_)
    open_[0] = True
    for y in range(ny):
        for x in range(nx):
            lab = bad_labels[y, x]
            if lab == 0 or open_[lab]:
                continue
            if y == 0 or x == 0 or y == ny - 1 or x == nx - 1:
                open_[lab] = True
                continue
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy = y + dy
                    xx = x + dx
                    if bad_labels[yy, xx] == 0 and not inside[yy, xx]:
                        open_[lab] = True
    return ~open_


def lowered_kernel(kernel, radius):
    """The PSF minus its mean inside a disc of ``radius`` pixels, zero outside (DAOFIND's
    "lowered" Gaussian, Stetson 1987, PASP 99, 191, with the PSF image): correlating with it
    fits a point source's amplitude together with a constant local background, so a
    companion on a brighter neighbour's wing gives a maximum of its own.

    Parameters
    ----------
    kernel : ndarray (k, k)
    radius : float, pixels

    Returns
    -------
    ndarray (k', k') float64, odd side ``2 ceil(radius) + 1`` (at most the kernel's)
    """
    k = np.asarray(kernel, dtype=np.float64)
    k = k / k.sum()
    h = k.shape[0] // 2
    r = min(h, int(np.ceil(radius)))
    k = k[h - r : h + r + 1, h - r : h + r + 1]
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    w = (xx * xx + yy * yy) <= radius * radius
    out = np.where(w, k - k[w].mean(), 0.0)
    return out
