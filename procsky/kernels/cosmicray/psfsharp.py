"""Sharper than the PSF allows: the pixel criterion of LSST's ``findCosmicRays`` for undersampled data.

L.A.Cosmic (:mod:`.lacosmic`) protects star cores by their fine structure, which is only as
curved as the Laplacian when the PSF is well sampled; at FWHM 1.2-2 px the core of a star is
nearly as sharp as a hit and L.A.Cosmic's ``objlim`` no longer tells them apart. The test that
does is the one of LSST's ``meas_algorithms`` (``findCosmicRays``, condition 3; idea from
the SDSS photo pipeline, Lupton et al. 2001): a pixel can only be a cosmic ray if, along some
line through it, the mean of its two opposite neighbours is lower than the PSF permits.

For a PSF sampled by pixels, the ratio ``(I(x-1) + I(x+1)) / (2 I(x))`` is smallest at the
peak of a star centred on a pixel, and larger at every other pixel phase and at every other
pixel of the star (for a Gaussian it is ``exp(-1/2s^2) cosh(x/s^2)`` before pixel integration;
a Moffat of the same FWHM has a larger one). So with ``r`` that centred-peak ratio of the
sharpest PSF the frame can hold, a pixel ``I0`` with neighbours of mean ``p`` along a row or a
column is sharper than any PSF-shaped peak when

    ``d = f r I0 - p > k sqrt(f^2 r^2 var(I0) + var(p))``

(``f`` <= 1 a margin for the PSF estimate, LSST's ``cond3_fac2``; ``k`` the significance).
Along a diagonal the same holds with ``r^2`` (a Gaussian's diagonal ratio, LSST's ``thres_d``),
which finds the corners of a track's staircase. A hit, one pixel wide, always has a dark pair
across its track; a star has none (:func:`peak_verdict`).

The same test, read the other way, protects stars from the growth of a hit beside them (L.A.Cosmic
adds the neighbours of a hit whatever their shape, and a star core 2-3 px away is as sharp): a pixel
that along no line is sharper than the PSF, and along one is bright enough that a hit would be,
provably peaks like the PSF, and so does the flank of such a peak
(:func:`.lacosmic._psf_shaped_at`).

``r`` comes from the PSF (:func:`gaussian_peak_ratio` of its FWHM) and, before a PSF is
fitted, also from the data: :func:`estimate_peak_ratio` takes the locus of the bright local
maxima that are not sharp in any direction (the stars).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "estimate_peak_ratio",
    "fwhm_of_peak_ratio",
    "gaussian_peak_ratio",
    "peak_verdict",
    "psf_shaped_peaks",
    "sharper_than_psf",
]


def gaussian_peak_ratio(fwhm: float) -> float:
    """Mean of the two row (or column) neighbours over the peak pixel of a pixel-integrated
    Gaussian of ``fwhm`` (pixels) centred on a pixel: the smallest such ratio a star of that
    PSF shows at any pixel phase."""
    s = max(float(fwhm), 1e-3) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    a = math.erf(0.5 / (s * math.sqrt(2.0)))
    b = math.erf(1.5 / (s * math.sqrt(2.0)))
    return 0.5 * (b - a) / a


def fwhm_of_peak_ratio(ratio: float) -> float:
    """Inverse of :func:`gaussian_peak_ratio` (bisection), pixels; 0 for ratio <= 0."""
    if not ratio > 0.0:
        return 0.0
    lo, hi = 0.05, 50.0
    if ratio >= gaussian_peak_ratio(hi):
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if gaussian_peak_ratio(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@numba.njit(nogil=True, cache=True, inline="always")
def _px(image, variance, bad, use_bad, y, x):
    """(bad, value, variance) of pixel (y, x) as the kernels see it: float64, and (True, 0, 0) where
    ``bad`` (with ``use_bad``) or either plane is not finite. Read where needed, so that no
    whole-frame cleaned copy is built for tests that look at a few pixels."""
    i = np.float64(image[y, x])
    v = np.float64(variance[y, x])
    if (use_bad and bad[y, x]) or not np.isfinite(i) or not np.isfinite(v):
        return True, 0.0, 0.0
    return False, i, v


@numba.njit(nogil=True, cache=True)
def _peak_ratios(image, variance, bad, use_bad, snr_min):
    """(ratio, its noise) of every local maximum (8 neighbours, none bad) with peak/noise above
    ``snr_min``: ratio = the smallest of the row, column and (square-rooted) diagonal
    neighbour-mean over peak ratios."""
    ny, nx = image.shape
    out_r = np.empty(ny * nx // 9 + 1)
    out_e = np.empty(ny * nx // 9 + 1)
    n = 0
    for y in range(1, ny - 1):
        for x in range(1, nx - 1):
            if not image[y, x] > 0.0:
                # not positive, or NaN: its cleaned value is <= 0 as well (the test below)
                continue
            b0, v, var0 = _px(image, variance, bad, use_bad, y, x)
            if v <= 0.0 or b0 or not var0 > 0.0:
                continue
            if v < snr_min * math.sqrt(var0):
                continue
            ok = True
            for yy in range(y - 1, y + 2):
                for xx in range(x - 1, x + 2):
                    if yy != y or xx != x:
                        bn, vn, _ = _px(image, variance, bad, use_bad, yy, xx)
                        if bn or vn >= v:
                            ok = False
            if not ok or n >= out_r.size:
                continue
            # row, column, and the two diagonals (whose ratio is about the square of the row's
            # for a centred star: compared through its square root)
            best = np.inf
            err = 0.0
            for k in range(4):
                if k == 0:
                    _, a, va = _px(image, variance, bad, use_bad, y, x - 1)
                    _, b, vb = _px(image, variance, bad, use_bad, y, x + 1)
                elif k == 1:
                    _, a, va = _px(image, variance, bad, use_bad, y - 1, x)
                    _, b, vb = _px(image, variance, bad, use_bad, y + 1, x)
                elif k == 2:
                    _, a, va = _px(image, variance, bad, use_bad, y - 1, x - 1)
                    _, b, vb = _px(image, variance, bad, use_bad, y + 1, x + 1)
                else:
                    _, a, va = _px(image, variance, bad, use_bad, y - 1, x + 1)
                    _, b, vb = _px(image, variance, bad, use_bad, y + 1, x - 1)
                q = 0.5 * (a + b) / v
                e = 0.5 * math.sqrt(va + vb) / v
                if k >= 2:
                    # sqrt(q) and its noise e / (2 sqrt(q)), with q floored at the noise
                    qq = max(q, e)
                    q = math.sqrt(qq) if q > 0.0 else q
                    e = e / (2.0 * math.sqrt(qq))
                if q < best:
                    best = q
                    err = e
            out_r[n] = best
            out_e[n] = err
            n += 1
    return out_r[:n], out_e[:n]


def _raw_planes(image, variance, bad):
    """The kernels' inputs: image and variance as float32 or float64 (no copy when already), the
    ``bad`` mask at their shape (a (1, 1) placeholder without one) and whether it is used. The
    kernels clean each pixel as they read it (:func:`_px`)."""
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValueError(f"image and variance must be 2-D of one shape, got {image.shape} and {variance.shape}")
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float64)
    if variance.dtype not in (np.float32, np.float64):
        variance = variance.astype(np.float64)
    use_bad = bad is not None
    badm = np.asarray(bad, dtype=bool) if use_bad else np.zeros((1, 1), dtype=bool)
    if use_bad and badm.shape != image.shape:
        badm = np.ascontiguousarray(np.broadcast_to(badm, image.shape))
    return image, variance, badm, use_bad


def estimate_peak_ratio(
    image: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    snr_min: float = 30.0,
    min_ratio: float = 0.08,
    quantile: float = 0.1,
    min_peaks: int = 8,
) -> tuple[float, int]:
    """The sharpest star-like peak ratio of a frame, from the data.

    Local maxima brighter than ``snr_min`` times their noise have a ratio ``q`` (the smaller of
    the row and column neighbour-mean over the peak, and of the square roots of the diagonal
    ones). Cosmic rays (single pixels or tracks)
    have a dark pair across them: ``q`` within noise of 0. Stars have ``q`` at least the
    centred-peak ratio of the PSF, more at other pixel phases. The peaks with
    ``q > max(min_ratio, 5 noise)`` are star-like; the ``quantile`` of their ``q`` is the
    sharpest PSF-shaped peak (a low quantile: the phases near a pixel centre), robust to the
    rare hit on a star or pair of hits.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image.
    variance : ndarray (ny, nx)
    bad : ndarray (ny, nx) bool, optional
        Pixels not to use (a maximum touching one is skipped).

    Returns
    -------
    ratio : float
        NaN with fewer than ``min_peaks`` star-like peaks.
    n : int
        Number of star-like peaks.
    """
    img, var, badm, use_bad = _raw_planes(image, variance, bad)
    q, e = _peak_ratios(img, var, badm, use_bad, float(snr_min))
    star = q > np.maximum(min_ratio, 5.0 * e)
    n = int(star.sum())
    if n < min_peaks:
        return float("nan"), n
    return float(np.quantile(q[star], quantile)), n


@numba.njit(nogil=True, cache=True, inline="always")
def _line_ends(d, y, x, rf, rf_diag):
    """The two neighbours of (y, x) along line ``d`` (row, column, two diagonals) and the ratio
    the line is held to."""
    if d == 0:
        dy, dx, r = 0, 1, rf
    elif d == 1:
        dy, dx, r = 1, 0, rf
    elif d == 2:
        dy, dx, r = 1, 1, rf_diag
    else:
        dy, dx, r = 1, -1, rf_diag
    return y - dy, x - dx, y + dy, x + dx, r


@numba.njit(nogil=True, cache=True, inline="always")
def _line_test(r, v0, var0, i1, i2, v1, v2, nsigma):
    """One line's verdict: -1 sharper than the PSF allows, 1 bright enough to show a hit's dark
    pair (decisive), 0 neither (see :func:`peak_verdict`)."""
    p = 0.5 * (i1 + i2)
    sd = math.sqrt(r * r * var0 + 0.25 * (max(v1, 0.0) + max(v2, 0.0)))
    if r * v0 - p > nsigma * sd:
        return -1
    if r * v0 > 2.0 * nsigma * sd:
        return 1
    return 0


@numba.njit(nogil=True, cache=True)
def peak_verdict(img, var, ignore, f1, f2, f3, y, x, rf, rf_diag, nsigma):
    """LSST's test on the four lines through (y, x): row and column against ``rf``, the diagonals
    against ``rf_diag`` (the PSF's diagonal ratio, the square of the row's for a Gaussian; LSST's
    ``thres_d``).

    Returns -1 when sharper than the PSF allows along some line (``r I0`` above the mean of the
    two neighbours by ``nsigma`` times the noise of the difference); 1 when along none, and along
    at least one it is bright enough that a hit would show its dark pair there (``r I0`` above
    ``2 nsigma`` times the noise of the contrast), so it provably peaks like the PSF; 0 otherwise
    (no verdict). A line through a pixel ``ignore``-d or flagged in ``f1``, ``f2`` or ``f3``
    (cosmic rays, raw or repaired) gives none."""
    ny, nx = img.shape
    v0 = img[y, x]
    if v0 <= 0.0:
        return 0
    var0 = var[y, x] if var[y, x] > 0.0 else 0.0
    decisive = False
    for d in range(4):
        y1, x1, y2, x2, r = _line_ends(d, y, x, rf, rf_diag)
        if min(y1, y2) < 0 or min(x1, x2) < 0 or max(y1, y2) >= ny or max(x1, x2) >= nx:
            continue
        if ignore[y1, x1] or ignore[y2, x2] or f1[y1, x1] or f1[y2, x2] or f2[y1, x1] or f2[y2, x2]:
            continue
        if f3[y1, x1] or f3[y2, x2]:
            continue
        t = _line_test(r, v0, var0, img[y1, x1], img[y2, x2], var[y1, x1], var[y2, x2], nsigma)
        if t < 0:
            return -1
        decisive = decisive or t > 0
    return 1 if decisive else 0


@numba.njit(nogil=True, cache=True)
def _raw_verdict(image, variance, bad, use_bad, y, x, rf, rf_diag, nsigma):
    """:func:`peak_verdict` with ``bad`` as ignore and flags, reading the planes through :func:`_px`."""
    ny, nx = image.shape
    _, v0, var0 = _px(image, variance, bad, use_bad, y, x)
    if v0 <= 0.0:
        return 0
    var0 = var0 if var0 > 0.0 else 0.0
    decisive = False
    for d in range(4):
        y1, x1, y2, x2, r = _line_ends(d, y, x, rf, rf_diag)
        if min(y1, y2) < 0 or min(x1, x2) < 0 or max(y1, y2) >= ny or max(x1, x2) >= nx:
            continue
        b1, i1, v1 = _px(image, variance, bad, use_bad, y1, x1)
        b2, i2, v2 = _px(image, variance, bad, use_bad, y2, x2)
        if b1 or b2:
            continue
        t = _line_test(r, v0, var0, i1, i2, v1, v2, nsigma)
        if t < 0:
            return -1
        decisive = decisive or t > 0
    return 1 if decisive else 0


@numba.njit(nogil=True, cache=True)
def _sharper_than_psf(image, variance, bad, use_bad, cand, rf, rf_diag, nsigma, out):
    ny, nx = image.shape
    for y in range(ny):
        for x in range(nx):
            if cand[y, x]:
                _, _, v = _px(image, variance, bad, use_bad, y, x)
                if v > 0.0:
                    out[y, x] = _raw_verdict(image, variance, bad, use_bad, y, x, rf, rf_diag, nsigma) < 0


def sharper_than_psf(
    image: np.ndarray,
    variance: np.ndarray,
    candidates: np.ndarray,
    ratio: float,
    *,
    bad: np.ndarray | None = None,
    margin: float = 0.7,
    nsigma: float = 3.0,
) -> np.ndarray:
    """Which ``candidates`` pixels are sharper than a PSF of centred-peak ratio ``ratio`` allows.

    A candidate passes when along its row or its column ``margin * ratio * I0`` (along a diagonal
    ``margin * ratio^2 * I0``, a Gaussian's diagonal ratio) exceeds the mean of the two neighbours
    by ``nsigma`` times the noise of that difference (module docstring, :func:`peak_verdict`).
    Neighbours that are ``bad`` (e.g. already flagged and repaired) give no verdict along their
    line.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image (the cosmic rays not yet repaired) and its variance.
    candidates : ndarray (ny, nx) bool
    ratio : float
        :func:`gaussian_peak_ratio` of the sharpest PSF the frame holds.
    margin : float
        Fraction of ``ratio`` used (LSST's ``cond3_fac2``), for the error of the PSF estimate.
    nsigma : float
        Significance of the contrast (LSST's ``cond3_fac``).

    Returns
    -------
    ndarray (ny, nx) bool
    """
    img, var, badm, use_bad = _raw_planes(image, variance, bad)
    out = np.zeros(img.shape, bool)
    _sharper_than_psf(
        img,
        var,
        badm,
        use_bad,
        np.ascontiguousarray(candidates, dtype=bool),
        float(margin) * float(ratio),
        float(margin) * float(ratio) ** 2,
        float(nsigma),
        out,
    )
    return out


@numba.njit(nogil=True, cache=True)
def _psf_shaped_peaks(image, variance, bad, use_bad, xs, ys, rf, rf_diag, nsigma, out):
    ny, nx = image.shape
    for k in range(xs.size):
        if not (np.isfinite(xs[k]) and np.isfinite(ys[k])):
            continue
        cx = int(math.floor(xs[k] + 0.5))
        cy = int(math.floor(ys[k] + 0.5))
        # the brightest good pixel of the 3 x 3 around the centroid
        by = -1
        bx = -1
        best = -np.inf
        for yy in range(max(1, cy - 1), min(ny - 1, cy + 2)):
            for xx in range(max(1, cx - 1), min(nx - 1, cx + 2)):
                bb, vv, _ = _px(image, variance, bad, use_bad, yy, xx)
                if not bb and vv > best:
                    best = vv
                    by = yy
                    bx = xx
        if by < 0 or not best > 0.0:
            continue
        _, _, var0 = _px(image, variance, bad, use_bad, by, bx)
        if not var0 > 0.0:
            continue
        shaped = True
        for d in range(2):
            y1 = by - d
            x1 = bx - (1 - d)
            y2 = by + d
            x2 = bx + (1 - d)
            b1, i1, v1 = _px(image, variance, bad, use_bad, y1, x1)
            b2, i2, v2 = _px(image, variance, bad, use_bad, y2, x2)
            if b1 or b2:
                shaped = False
                break
            p = 0.5 * (i1 + i2)
            sd = math.sqrt(rf * rf * var0 + 0.25 * (v1 + v2))
            # decisive (a hit this bright would show its dark pair) and not sharper than the PSF
            if rf * best <= 2.0 * nsigma * sd or rf * best - p > nsigma * sd:
                shaped = False
                break
        # nor sharper along a diagonal (a hit crossing the pixel grid at 45 degrees)
        if shaped and _raw_verdict(image, variance, bad, use_bad, by, bx, rf, rf_diag, nsigma) < 0:
            shaped = False
        out[k] = shaped


def psf_shaped_peaks(
    image: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    ratio: float,
    *,
    bad: np.ndarray | None = None,
    margin: float = 0.7,
    nsigma: float = 3.0,
) -> np.ndarray:
    """Which detections at (x, y) peak like the PSF, provably: the brightest pixel of the 3 x 3
    around the centroid is bright enough that a hit there would be found sharper than the PSF
    (``margin * ratio * I0`` above ``2 nsigma`` times the noise of the contrast) and yet, along
    its row, its column and its diagonals, it is not (:func:`sharper_than_psf`). Such a detection is a
    star, whatever a PSF model fitted to it says; faint detections are never counted as such.

    Returns
    -------
    ndarray (n,) bool
    """
    img, var, badm, use_bad = _raw_planes(image, variance, bad)
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    out = np.zeros(xs.size, bool)
    _psf_shaped_peaks(
        img,
        var,
        badm,
        use_bad,
        xs,
        ys,
        float(margin) * float(ratio),
        float(margin) * float(ratio) ** 2,
        float(nsigma),
        out,
    )
    return out
