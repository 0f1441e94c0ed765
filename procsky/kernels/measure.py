"""Per-source measurement on numpy blocks: centroids, moments, fluxes, flags.

All algorithms run on a background-subtracted image with its variance and mask and never
raise for one bad source: every quantity has a flag, and failed quantities are NaN.

* **Centroid**: Gaussian-windowed first moments iterated to convergence (SExtractor's
  XWIN_IMAGE; Bertin 2010), window sigma = PSF sigma; error from the variance plane,
  ``sigma_x^2 = 4 sum(w^2 V dx^2) / (sum w I)^2``.
* **Adaptive moments** (Bernstein & Jarvis 2002, AJ 123, 583): elliptical Gaussian weight
  matched to the object, iterated; ``ixx, iyy, ixy`` are the moments of the best-matched
  Gaussian (pixels^2). Each step deconvolves the weight from the weighted moments,
  ``M_new = (M_obs^-1 - M_w^-1)^-1``, which converges in a few steps for near-Gaussian
  objects; falls back to ``2 M_obs`` when that is not positive definite.
* **Aperture fluxes**: circular apertures with the exact area of overlap of the circle and
  each pixel (as sep/photutils ``method='exact'``), error ``sqrt(sum a^2 V)``.
* **Kron flux**: circular aperture of radius ``k r1`` (k = 2.5) with ``r1`` the first
  radial moment within 6 object sigmas (Kron 1980).
* **PSF flux**: linear fit of the PSF stamp at the centroid,
  ``F = sum(P I / V) / sum(P^2 / V)``, ``sigma_F = 1 / sqrt(sum(P^2 / V))``; saturated
  and no-data pixels are left out (the wings of a saturated star still give its flux) and
  ``psf_flux_flag`` is set when they carry more than 10 % of the PSF weight. The stamp is
  normalised within its extent: flux outside it is the task's aperture correction.
* **Neighbour-subtracted PSF flux** (``neighbour_iterations > 0``): every source's fitted PSF
  model is subtracted from the image and each source refitted on the residual with its own
  model added back, in turn, updating the residual as it goes (Gauss-Seidel sweeps over the
  joint linear least-squares problem of all amplitudes, which the individual fits converge
  to); the neighbour subtraction of DAOPHOT's NSTAR/ALLSTAR (Stetson 1987, PASP 99, 191),
  with positions fixed. Neighbours' light then no longer enters a star's fit.
* **Isolated aperture** (:func:`isolated_apertures`, for aperture corrections): the aperture of a
  star on the image minus every other source's fitted model, its residual taken at clipped ring
  levels beyond the core, so that neither neighbours nor stars hidden in its wings enter it.
* **Local background**: sigma-clipped median in an annulus, excluding pixels of any source.
* **Flags**: edge, saturated, interpolated, cr, bad (anywhere in the footprint and at the
  centre), blended, and per-algorithm failure flags.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._bits import BAD, CR, EDGE, INTRP, NO_DATA, SAT, SUSPECT, bit
from .background import _median_inplace

__all__ = [
    "circle_pixel_overlap",
    "aperture_weights",
    "aperture_flux",
    "windowed_centroid",
    "adaptive_moments",
    "psf_flux",
    "measure_sources",
    "measure_psf_fluxes",
    "neighbour_subtracted_psf_fluxes",
    "isolated_apertures",
    "FLAG_NAMES",
]

_NODATA = bit(NO_DATA)
_BADBITS = bit(BAD) | bit(NO_DATA)
_SATB = bit(SAT)
#: pixels left out of the PSF fit: no data, and saturated (their values are clipped; the
#: wings still constrain the amplitude, and ``psf_flux_flag`` reports the lost weight)
_PSFBAD = bit(BAD) | bit(NO_DATA) | bit(SAT)
_INTB = bit(INTRP)
_CRB = bit(CR)
_EDGEB = bit(EDGE)
_SUSB = bit(SUSPECT)
#: the model argument of :func:`_psf_fit` when there is none
_NO_MODEL = np.zeros((1, 1), np.float32)


# ----------------------------------------------------------------------- exact overlap
@numba.njit(nogil=True, cache=True)
def _prim(x, r):
    """Primitive of sqrt(r^2 - x^2) on [-r, r]."""
    if x <= -r:
        x = -r
    elif x >= r:
        x = r
    return 0.5 * (x * math.sqrt(max(r * r - x * x, 0.0)) + r * r * math.asin(x / r))


@numba.njit(nogil=True, cache=True)
def _quadrant_area(x, y, r):
    """Area of {X <= x, Y <= y} inside the circle of radius r centred at the origin."""
    if y <= -r or x <= -r:
        return 0.0
    if x > r:
        x = r
    if y >= r:
        return 2.0 * (_prim(x, r) - _prim(-r, r))
    c = math.sqrt(r * r - y * y)
    area = 0.0
    # |X| < c: vertical extent from -s(X) to y
    if x > -c:
        xm = min(x, c)
        area += y * (xm + c) + _prim(xm, r) - _prim(-c, r)
    if y > 0:
        # |X| >= c: full chord 2 s(X)
        area += 2.0 * (_prim(min(x, -c), r) - _prim(-r, r))
        if x > c:
            area += 2.0 * (_prim(x, r) - _prim(c, r))
    return area


@numba.njit(nogil=True, cache=True)
def circle_pixel_overlap(x0, y0, x1, y1, r):
    """Exact area of the rectangle [x0, x1] x [y0, y1] inside the circle of radius r at 0.

    Parameters
    ----------
    x0, y0, x1, y1 : float, pixels
        Rectangle corners relative to the circle centre.
    r : float, pixels

    Returns
    -------
    float, pixels^2
    """
    a = _quadrant_area(x1, y1, r) - _quadrant_area(x0, y1, r) - _quadrant_area(x1, y0, r) + _quadrant_area(x0, y0, r)
    if a < 0.0:
        return 0.0
    return a


@numba.njit(nogil=True, cache=True)
def _pixel_weight(dx, dy, r):
    """Overlap of the unit pixel centred at (dx, dy) with the circle of radius r at 0."""
    adx = abs(dx)
    ady = abs(dy)
    fx = adx + 0.5
    fy = ady + 0.5
    if fx * fx + fy * fy <= r * r:
        return 1.0
    nx_ = max(adx - 0.5, 0.0)
    ny_ = max(ady - 0.5, 0.0)
    if nx_ * nx_ + ny_ * ny_ >= r * r:
        return 0.0
    return circle_pixel_overlap(dx - 0.5, dy - 0.5, dx + 0.5, dy + 0.5, r)


def aperture_weights(shape, x, y, r):
    """Exact overlap weights of a circular aperture with every pixel (for tests/plots).

    Parameters
    ----------
    shape : (int, int)
    x, y : float, pixels (0-based pixel centres)
    r : float, pixels

    Returns
    -------
    ndarray (ny, nx) float64
    """
    out = np.zeros(shape)
    _fill_weights(out, float(x), float(y), float(r))
    return out


@numba.njit(nogil=True, cache=True)
def _fill_weights(out, x, y, r):
    ny, nx = out.shape
    for py in range(max(0, int(math.floor(y - r - 1))), min(ny, int(math.ceil(y + r + 2)))):
        for px in range(max(0, int(math.floor(x - r - 1))), min(nx, int(math.ceil(x + r + 2)))):
            out[py, px] = _pixel_weight(px - x, py - y, r)


@numba.njit(nogil=True, cache=True)
def aperture_flux(image, variance, mask, x, y, r, bad_bits):
    """Sum in a circular aperture with exact pixel overlap.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
    mask : ndarray (ny, nx) uint32
    x, y : float, pixels
    r : float, pixels
    bad_bits : int
        Pixels with these bits carry no data: they add nothing and set ``flag``.

    Returns
    -------
    flux : float, counts
    err : float, counts
    area : float, pixels^2 of good pixels
    flag : bool
        The aperture runs off the image or covers a bad pixel.
    """
    ny, nx = image.shape
    s = 0.0
    v = 0.0
    area = 0.0
    flag = False
    if not (r > 0.0) or not np.isfinite(x) or not np.isfinite(y):
        return np.nan, np.nan, 0.0, True
    if x - r < -0.5 or y - r < -0.5 or x + r > nx - 0.5 or y + r > ny - 0.5:
        flag = True
    for py in range(max(0, int(math.floor(y - r))), min(ny, int(math.floor(y + r)) + 2)):
        for px in range(max(0, int(math.floor(x - r))), min(nx, int(math.floor(x + r)) + 2)):
            a = _pixel_weight(px - x, py - y, r)
            if a <= 0.0:
                continue
            if mask[py, px] & bad_bits:
                flag = True
                continue
            s += a * image[py, px]
            v += a * a * variance[py, px]
            area += a
    return s, math.sqrt(max(v, 0.0)), area, flag


# ----------------------------------------------------------------------- centroid/moments
@numba.njit(nogil=True, cache=True)
def windowed_centroid(image, variance, mask, x0, y0, sigma, max_iter, bad_bits):
    """Gaussian-windowed centroid (SExtractor XWIN), iterated.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
    mask : ndarray (ny, nx) uint32
    x0, y0 : float, pixels
        Starting position (e.g. the detection peak).
    sigma : float, pixels
        Window sigma (the PSF sigma for point sources).
    max_iter : int
    bad_bits : int

    Returns
    -------
    x, y, x_err, y_err, xy_cov : float
        Pixels and pixels^2 (covariance).
    ok : bool
        False when the window sum is not positive, the centroid left the window or the
        iteration did not converge (then x, y are the starting position).
    """
    ny, nx = image.shape
    x = x0
    y = y0
    rmax = 4.0 * sigma
    inv2s2 = 0.5 / (sigma * sigma)
    converged = False
    ex = np.nan
    ey = np.nan
    exy = np.nan
    for _ in range(max_iter):
        sw = 0.0
        sx = 0.0
        sy = 0.0
        vxx = 0.0
        vyy = 0.0
        vxy = 0.0
        for py in range(max(0, int(math.floor(y - rmax))), min(ny, int(math.ceil(y + rmax)) + 1)):
            dy = py - y
            for px in range(max(0, int(math.floor(x - rmax))), min(nx, int(math.ceil(x + rmax)) + 1)):
                if mask[py, px] & bad_bits:
                    continue
                dx = px - x
                d2 = dx * dx + dy * dy
                if d2 > rmax * rmax:
                    continue
                w = math.exp(-d2 * inv2s2)
                wi = w * image[py, px]
                sw += wi
                sx += wi * dx
                sy += wi * dy
                wv = w * w * variance[py, px]
                vxx += wv * dx * dx
                vyy += wv * dy * dy
                vxy += wv * dx * dy
        if not (sw > 0.0):
            return x0, y0, np.nan, np.nan, np.nan, False
        ddx = 2.0 * sx / sw
        ddy = 2.0 * sy / sw
        x += ddx
        y += ddy
        if abs(x - x0) > 2.0 * sigma + 1.0 or abs(y - y0) > 2.0 * sigma + 1.0:
            return x0, y0, np.nan, np.nan, np.nan, False
        ex = 2.0 * math.sqrt(max(vxx, 0.0)) / sw
        ey = 2.0 * math.sqrt(max(vyy, 0.0)) / sw
        exy = 4.0 * vxy / (sw * sw)
        # converged when the step is below 1e-4 px (SExtractor's WINPOS_STEPMIN; 0.02 mas here):
        # a tighter limit leaves faint, extended sources "unconverged" after many steps
        if ddx * ddx + ddy * ddy < 1e-8:
            converged = True
            break
    if not converged:
        return x0, y0, ex, ey, exy, False
    return x, y, ex, ey, exy, True


@numba.njit(nogil=True, cache=True)
def adaptive_moments(image, mask, x0, y0, sigma0, max_iter, tol, bad_bits):
    """Adaptive second moments (Bernstein & Jarvis 2002).

    Parameters
    ----------
    image : ndarray (ny, nx) float
    mask : ndarray (ny, nx) uint32
    x0, y0 : float, pixels
        Starting centre.
    sigma0 : float, pixels
        Starting weight sigma (PSF sigma).
    max_iter : int
    tol : float
        Convergence on the relative change of the moments.
    bad_bits : int

    Returns
    -------
    ixx, iyy, ixy : float, pixels^2
        Moments of the matched elliptical Gaussian.
    x, y : float, pixels
        Adaptive centroid.
    amp : float, counts
        Flux of the matched Gaussian, ``2 sum(w I)`` (exact for a Gaussian object).
    ok : bool
        False on non-convergence, non-positive weight sum or a singular matrix.
    """
    ny, nx = image.shape
    mxx = sigma0 * sigma0
    myy = mxx
    mxy = 0.0
    x = x0
    y = y0
    amp = np.nan
    for _it in range(max_iter):
        det = mxx * myy - mxy * mxy
        if not (det > 0.0):
            return np.nan, np.nan, np.nan, x0, y0, np.nan, False
        ixx = myy / det
        iyy = mxx / det
        ixy = -mxy / det
        rad = 4.0 * math.sqrt(max(mxx, myy))
        if rad > 0.25 * max(ny, nx) + 10.0:
            return np.nan, np.nan, np.nan, x0, y0, np.nan, False
        s0 = 0.0
        s1x = 0.0
        s1y = 0.0
        sxx = 0.0
        syy = 0.0
        sxy = 0.0
        for py in range(max(0, int(math.floor(y - rad))), min(ny, int(math.ceil(y + rad)) + 1)):
            dy = py - y
            for px in range(max(0, int(math.floor(x - rad))), min(nx, int(math.ceil(x + rad)) + 1)):
                if mask[py, px] & bad_bits:
                    continue
                dx = px - x
                rho2 = ixx * dx * dx + iyy * dy * dy + 2.0 * ixy * dx * dy
                if rho2 > 16.0:
                    continue
                wi = math.exp(-0.5 * rho2) * image[py, px]
                s0 += wi
                s1x += wi * dx
                s1y += wi * dy
                sxx += wi * dx * dx
                syy += wi * dy * dy
                sxy += wi * dx * dy
        if not (s0 > 0.0):
            return np.nan, np.nan, np.nan, x0, y0, np.nan, False
        cx = s1x / s0
        cy = s1y / s0
        oxx = sxx / s0 - cx * cx
        oyy = syy / s0 - cy * cy
        oxy = sxy / s0 - cx * cy
        amp = 2.0 * s0
        # deconvolve the weight: C = (O^-1 - W^-1)^-1
        odet = oxx * oyy - oxy * oxy
        nxx = 2.0 * oxx
        nyy = 2.0 * oyy
        nxy = 2.0 * oxy
        if odet > 0.0:
            axx = oyy / odet - ixx
            ayy = oxx / odet - iyy
            axy = -oxy / odet - ixy
            adet = axx * ayy - axy * axy
            if adet > 0.0 and axx > 0.0:
                nxx = ayy / adet
                nyy = axx / adet
                nxy = -axy / adet
        else:
            return np.nan, np.nan, np.nan, x0, y0, np.nan, False
        # centroid step: weighted first moment, rescaled as for the windowed centroid
        x += 2.0 * cx
        y += 2.0 * cy
        if abs(x - x0) > 3.0 * sigma0 + 2.0 or abs(y - y0) > 3.0 * sigma0 + 2.0:
            return np.nan, np.nan, np.nan, x0, y0, np.nan, False
        tr = mxx + myy
        change = (abs(nxx - mxx) + abs(nyy - myy) + abs(nxy - mxy)) / tr
        mxx = nxx
        myy = nyy
        mxy = nxy
        if change < tol and cx * cx + cy * cy < 1e-8:
            return mxx, myy, mxy, x, y, amp, True
    return mxx, myy, mxy, x, y, amp, False


@numba.njit(nogil=True, cache=True)
def _psf_fit(image, model, use_model, variance, mask, ix, iy, stamp, weighted, bad_bits):
    """:func:`psf_flux` of ``image - model`` (``use_model``) or of ``image``."""
    ny, nx = image.shape
    s = stamp.shape[0]
    h = s // 2
    spi = 0.0
    spp = 0.0
    spv = 0.0
    ptot = 0.0
    plost = 0.0
    for j in range(s):
        py = iy + j - h
        for i in range(s):
            px = ix + i - h
            p = stamp[j, i]
            ptot += p * p
            if py < 0 or py >= ny or px < 0 or px >= nx or (mask[py, px] & bad_bits):
                plost += p * p
                continue
            v = variance[py, px]
            if not (v > 0.0):
                plost += p * p
                continue
            d = image[py, px] - model[py, px] if use_model else image[py, px]
            if weighted:
                spi += p * d / v
                spp += p * p / v
            else:
                spi += p * d
                spp += p * p
                spv += p * p * v
    if not (spp > 0.0):
        return np.nan, np.nan, np.nan, 1.0
    f = spi / spp
    if weighted:
        err = 1.0 / math.sqrt(spp)
    else:
        err = math.sqrt(spv) / spp
    chi2 = 0.0
    npix = 0
    for j in range(s):
        py = iy + j - h
        for i in range(s):
            px = ix + i - h
            if py < 0 or py >= ny or px < 0 or px >= nx or (mask[py, px] & bad_bits):
                continue
            v = variance[py, px]
            if not (v > 0.0):
                continue
            d = image[py, px] - model[py, px] if use_model else image[py, px]
            r = d - f * stamp[j, i]
            chi2 += r * r / v
            npix += 1
    return f, err, chi2 / max(npix - 1, 1), plost / ptot if ptot > 0 else 1.0


@numba.njit(nogil=True, cache=True)
def psf_flux(image, variance, mask, ix, iy, stamp, weighted, bad_bits):
    """Linear least-squares amplitude of a PSF stamp.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
    mask : ndarray (ny, nx) uint32
    ix, iy : int
        Image pixel under the stamp's central pixel ``(S // 2, S // 2)``.
    stamp : ndarray (S, S) float
        PSF (sum 1) already shifted to the sub-pixel centroid.
    weighted : bool
        Inverse-variance weights (``sum(P I / V) / sum(P^2 / V)``) or uniform weights
        (``sum(P I) / sum(P^2)``, LSST's choice; unbiased when V depends on I).
    bad_bits : int

    Returns
    -------
    flux, err : float, counts
    chi2_dof : float
        Reduced chi^2 of the fit over the stamp.
    frac_lost : float
        Fraction of the stamp's P^2 weight on bad or off-image pixels.
    """
    return _psf_fit(image, _NO_MODEL, False, variance, mask, ix, iy, stamp, weighted, bad_bits)


@numba.njit(nogil=True, cache=True)
def _add_stamp(model, ix, iy, stamp, amp):
    """``model[stamp footprint at (ix, iy)] += amp * stamp`` (clipped to the image)."""
    ny, nx = model.shape
    s = stamp.shape[0]
    h = s // 2
    for j in range(max(0, h - iy), min(s, ny - iy + h)):
        py = iy + j - h
        for i in range(max(0, h - ix), min(s, nx - ix + h)):
            model[py, ix + i - h] += amp * stamp[j, i]


@numba.njit(nogil=True, cache=True)
def _neighbour_subtracted_kernel(
    image, model, variance, mask, ixs, iys, stamps, flux0, idx, weighted, bad_bits, n_iter
):
    """Gauss-Seidel sweeps of the PSF amplitudes of sources ``idx`` with every other source's model
    subtracted (``model``: zeros on entry, the sum of the fitted models on return).

    Returns (n, 4): flux, err, chi2/dof, lost fraction (NaN outside ``idx``). A source is subtracted
    only with a finite, positive amplitude (a failed or negative fit is no model of its light)."""
    n = ixs.size
    amp = np.zeros(n)
    for k in idx:
        f = flux0[k]
        if np.isfinite(f) and f > 0.0:
            amp[k] = f
            _add_stamp(model, ixs[k], iys[k], stamps[k], f)
    out = np.full((n, 4), np.nan)
    for _it in range(n_iter):
        for k in idx:
            if amp[k] != 0.0:
                _add_stamp(model, ixs[k], iys[k], stamps[k], -amp[k])
            f, e, c2, lost = _psf_fit(image, model, True, variance, mask, ixs[k], iys[k], stamps[k], weighted, bad_bits)
            out[k, 0] = f
            out[k, 1] = e
            out[k, 2] = c2
            out[k, 3] = lost
            if np.isfinite(f) and f > 0.0:
                amp[k] = f
                _add_stamp(model, ixs[k], iys[k], stamps[k], f)
            else:
                amp[k] = 0.0
    return out


def _overlapping(ixs: np.ndarray, iys: np.ndarray, size: int) -> np.ndarray:
    """Indices of the sources whose ``size`` x ``size`` stamp overlaps another source's."""
    from scipy.spatial import cKDTree

    on = np.flatnonzero((np.abs(ixs) < 10**5) & (np.abs(iys) < 10**5))
    if on.size < 2:
        return np.zeros(0, np.int64)
    pairs = cKDTree(np.column_stack([ixs[on], iys[on]]).astype(float)).query_pairs(
        size - 1 + 1e-9, p=np.inf, output_type="ndarray"
    )
    return on[np.unique(pairs.ravel())].astype(np.int64)


def _neighbour_subtracted(img, var, msk, ixs, iys, stamps, flux0, weighted, n_iter):
    """(n, 4) flux, err, chi2/dof, lost of the sources whose stamps overlap another's, refitted with the
    others' models subtracted; NaN for the rest (their individual fit stands)."""
    idx = _overlapping(ixs, iys, stamps.shape[1])
    if idx.size == 0:
        return np.full((ixs.size, 4), np.nan), idx
    # zeros are allocated lazily: only the pages under overlapping stamps are touched
    model = np.zeros(img.shape, np.float32)
    out = _neighbour_subtracted_kernel(
        img, model, var, msk, ixs, iys, stamps, np.asarray(flux0, np.float64), idx, bool(weighted), _PSFBAD, int(n_iter)
    )
    return out, idx


def _nearest_pixels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel under each position (``floor(x + 0.5)``), far off the image where not finite."""
    ok = np.isfinite(x) & np.isfinite(y)
    ix = np.where(ok, np.floor(np.where(ok, x, 0.0) + 0.5), -1e6).astype(np.int64)
    iy = np.where(ok, np.floor(np.where(ok, y, 0.0) + 0.5), -1e6).astype(np.int64)
    return ix, iy


def neighbour_subtracted_psf_fluxes(
    image, variance, mask, x, y, stamps, flux0, *, n_iter=2, weighted=True, max_lost=0.1
):
    """PSF fluxes with the neighbours' fitted PSF models subtracted (DAOPHOT NSTAR/ALLSTAR's
    neighbour subtraction, Stetson 1987, positions fixed).

    Starting from the individual fits ``flux0``, ``n_iter`` Gauss-Seidel sweeps refit each source on
    the image minus every other source's current model; they converge to the simultaneous
    least-squares amplitudes of overlapping sources. Isolated sources get their individual fit.

    Parameters
    ----------
    image, variance, mask, x, y, stamps, weighted, max_lost
        As :func:`measure_psf_fluxes` (stamps rendered at ``x, y``, placed at the nearest pixel).
    flux0 : array (n,), counts
        First amplitudes (the individual fits); NaN or <= 0: not subtracted until refitted.
    n_iter : int
        Sweeps over all sources.

    Returns
    -------
    dict with ``psf_flux``, ``psf_flux_err`` (counts), ``psf_chi2``, ``psf_flux_flag``.
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, stamps)
    ixs, iys = _nearest_pixels(xs, ys)
    r, idx = _neighbour_subtracted(img, var, msk, ixs, iys, st, flux0, weighted, max(int(n_iter), 1))
    alone = np.setdiff1d(np.arange(xs.size), idx)
    if alone.size:
        r[alone] = _psf_fluxes_kernel(img, var, msk, xs[alone], ys[alone], st[alone], bool(weighted), _PSFBAD)
    return {
        "psf_flux": r[:, 0],
        "psf_flux_err": r[:, 1],
        "psf_chi2": r[:, 2],
        "psf_flux_flag": ~np.isfinite(r[:, 0]) | (r[:, 3] > max_lost),
    }


@numba.njit(nogil=True, cache=True)
def _local_background(image, mask, children, x, y, rin, rout, bad_bits):
    """Sigma-clipped (3 sigma, 5 passes) median of the annulus pixels outside all footprints."""
    ny, nx = image.shape
    cap = int(4 * rout * rout + 8 * rout + 16)
    buf = np.empty(cap, dtype=np.float32)
    n = 0
    for py in range(max(0, int(math.floor(y - rout))), min(ny, int(math.ceil(y + rout)) + 1)):
        dy2 = (py - y) ** 2
        for px in range(max(0, int(math.floor(x - rout))), min(nx, int(math.ceil(x + rout)) + 1)):
            d2 = (px - x) ** 2 + dy2
            if d2 < rin * rin or d2 > rout * rout:
                continue
            if mask[py, px] & bad_bits or children[py, px] != 0:
                continue
            if n < cap:
                buf[n] = image[py, px]
                n += 1
    if n < 5:
        return np.nan, np.nan, n
    med = 0.0
    sig = 0.0
    for _ in range(5):
        mean = 0.0
        for i in range(n):
            mean += buf[i]
        mean /= n
        var = 0.0
        for i in range(n):
            var += (buf[i] - mean) ** 2
        sig = math.sqrt(var / max(n - 1, 1))
        med = _median_inplace(buf, n)
        m = 0
        for i in range(n):
            if abs(buf[i] - med) <= 3.0 * sig:
                buf[m] = buf[i]
                m += 1
        if m < 5 or m == n:
            break
        n = m
    return med, sig, n


# ----------------------------------------------------------------------- driver kernel
#: boolean flag columns produced by :func:`measure_sources`, in order
FLAG_NAMES = (
    "flag_edge",
    "flag_saturated",
    "flag_saturated_center",
    "flag_interpolated",
    "flag_interpolated_center",
    "flag_cr",
    "flag_cr_center",
    "flag_bad",
    "flag_bad_center",
    "flag_suspect",
    "flag_blended",
    "centroid_flag",
    "shape_flag",
    "ap_flux_flag",
    "kron_flux_flag",
    "psf_flux_flag",
    "local_background_flag",
)

_FLOAT_NAMES = (
    "x",
    "y",
    "x_err",
    "y_err",
    "xy_cov",
    "ixx",
    "iyy",
    "ixy",
    "shape_x",
    "shape_y",
    "gauss_flux",
    "kron_radius",
    "kron_flux",
    "kron_flux_err",
    "psf_flux",
    "psf_flux_err",
    "psf_chi2",
    "local_background",
    "local_background_rms",
)


@numba.njit(nogil=True, cache=True)
def _measure_kernel(
    image,
    variance,
    mask,
    children,
    child_ids,
    xs,
    ys,
    sigma,
    radii,
    ann_in,
    ann_out,
    kron_factor,
    kron_min_radius,
    stamps,
    have_stamps,
    weighted,
    edge_margin,
):
    ny, nx = image.shape
    n = xs.size
    nap = radii.size
    fv = np.full((n, 19), np.nan)
    ap = np.full((n, nap, 2), np.nan)
    fl = np.zeros((n, 17), dtype=np.bool_)
    satb = _SATB
    intb = _INTB
    crb = _CRB
    badb = _BADBITS
    edgeb = _EDGEB
    susb = _SUSB
    for k in range(n):
        x0 = xs[k]
        y0 = ys[k]
        # centroid
        x, y, ex, ey, exy, ok = windowed_centroid(image, variance, mask, x0, y0, sigma, 100, _BADBITS)
        if not ok:
            fl[k, 11] = True
        fv[k, 0] = x
        fv[k, 1] = y
        fv[k, 2] = ex
        fv[k, 3] = ey
        fv[k, 4] = exy
        # shape
        ixx, iyy, ixy, sx, sy, amp, sok = adaptive_moments(image, mask, x, y, sigma, 50, 1e-6, _BADBITS)
        if not sok:
            fl[k, 12] = True
        fv[k, 5] = ixx
        fv[k, 6] = iyy
        fv[k, 7] = ixy
        fv[k, 8] = sx
        fv[k, 9] = sy
        fv[k, 10] = amp
        # apertures
        anyap = False
        for a in range(nap):
            f, e, area, af = aperture_flux(image, variance, mask, x, y, radii[a], badb)
            ap[k, a, 0] = f
            ap[k, a, 1] = e
            if af:
                anyap = True
        fl[k, 13] = anyap
        # Kron radius from the first radial moment within 6 object sigmas
        if sok and ixx + iyy > 0:
            osig = math.sqrt(0.5 * (ixx + iyy))
        else:
            osig = sigma
        rmax = 6.0 * osig
        s0 = 0.0
        s1 = 0.0
        for py in range(max(0, int(math.floor(y - rmax))), min(ny, int(math.ceil(y + rmax)) + 1)):
            for px in range(max(0, int(math.floor(x - rmax))), min(nx, int(math.ceil(x + rmax)) + 1)):
                if mask[py, px] & badb:
                    continue
                d = math.sqrt((px - x) ** 2 + (py - y) ** 2)
                if d > rmax:
                    continue
                v = image[py, px]
                s0 += v
                s1 += v * d
        if s0 > 0 and s1 > 0:
            kr = max(kron_factor * s1 / s0, kron_min_radius)
            fv[k, 11] = kr
            f, e, area, af = aperture_flux(image, variance, mask, x, y, kr, badb)
            fv[k, 12] = f
            fv[k, 13] = e
            fl[k, 14] = af
        else:
            fl[k, 14] = True
        # PSF flux
        ix = int(math.floor(x + 0.5))
        iy = int(math.floor(y + 0.5))
        if have_stamps:
            f, e, c2, lost = psf_flux(image, variance, mask, ix, iy, stamps[k], weighted, _PSFBAD)
            fv[k, 14] = f
            fv[k, 15] = e
            fv[k, 16] = c2
            if not np.isfinite(f) or lost > 0.1:
                fl[k, 15] = True
        else:
            fl[k, 15] = True
        # local background
        lb, lrms, nl = _local_background(image, mask, children, x, y, ann_in, ann_out, badb)
        fv[k, 17] = lb
        fv[k, 18] = lrms
        fl[k, 16] = nl < 5
        # pixel flags: centre = 3x3 around the centroid pixel; anywhere = the child footprint
        cen = 0
        for py in range(max(0, iy - 1), min(ny, iy + 2)):
            for px in range(max(0, ix - 1), min(nx, ix + 2)):
                cen |= mask[py, px]
        anyb = cen
        cid = child_ids[k]
        if cid > 0:
            rr = int(math.ceil(6.0 * osig)) + 2
            for py in range(max(0, iy - rr), min(ny, iy + rr + 1)):
                for px in range(max(0, ix - rr), min(nx, ix + rr + 1)):
                    if children[py, px] == cid:
                        anyb |= mask[py, px]
        edge = (cen & edgeb) != 0 or (cen & _NODATA) != 0
        if ix < edge_margin or iy < edge_margin or ix >= nx - edge_margin or iy >= ny - edge_margin:
            edge = True
        fl[k, 0] = edge
        fl[k, 1] = (anyb & satb) != 0
        fl[k, 2] = (cen & satb) != 0
        fl[k, 3] = (anyb & intb) != 0
        fl[k, 4] = (cen & intb) != 0
        fl[k, 5] = (anyb & crb) != 0
        fl[k, 6] = (cen & crb) != 0
        fl[k, 7] = (anyb & badb) != 0
        fl[k, 8] = (cen & badb) != 0
        fl[k, 9] = (anyb & susb) != 0
    return fv, ap, fl


def measure_sources(
    image,
    variance,
    mask,
    x,
    y,
    *,
    psf_sigma,
    children=None,
    child_ids=None,
    blended=None,
    aperture_radii=(3.0, 4.5, 6.0, 9.0, 12.0),
    annulus=(15.0, 25.0),
    kron_factor=2.5,
    kron_min_radius=None,
    psf_stamps=None,
    psf_weighted=True,
    edge_margin=None,
    neighbour_iterations=0,
):
    """Measure sources at given starting positions.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Background-subtracted image, counts.
    variance : ndarray (ny, nx) float
        Variance, counts^2.
    mask : ndarray (ny, nx) uint32 or None
        Mask planes (LSST bits).
    x, y : array (n,), pixels
        Starting positions (detection peaks).
    psf_sigma : float, pixels
        PSF Gaussian sigma: centroid window and first guess of the moments.
    children : ndarray (ny, nx) int32, optional
        Deblended child map from detection (excluded from local background; used for the
        "anywhere" pixel flags).
    child_ids : array (n,) int, optional
        Child id of each source in ``children`` (default 1..n).
    blended : array (n,) bool, optional
        Copied into ``flag_blended``.
    aperture_radii : sequence of float, pixels
    annulus : (float, float), pixels
        Inner and outer radius of the local-background annulus.
    kron_factor : float
    kron_min_radius : float, pixels, optional
        Default ``2 psf_sigma``.
    psf_stamps : ndarray (n, S, S), optional
        PSF images (sum 1) rendered at each source's sub-pixel centroid, centred on the
        nearest pixel (see :func:`procsky.kernels.psfmodel.render_stamps`). Measure the
        centroid first, render, then call again, or use :func:`measure_sources` twice.
    psf_weighted : bool
        Inverse-variance weighted PSF fit (default) or uniform weights.
    edge_margin : int, pixels, optional
        Sources closer than this to the border get ``flag_edge`` (default
        ``ceil(2 psf_sigma)``).
    neighbour_iterations : int
        With ``psf_stamps``: sweeps of :func:`neighbour_subtracted_psf_fluxes` after the individual
        PSF fits (0: individual fits only, each holding its neighbours' light).

    Returns
    -------
    dict of str -> ndarray (n,)
        Float columns ``x, y, x_err, y_err, xy_cov, ixx, iyy, ixy, shape_x, shape_y,
        gauss_flux, kron_radius, kron_flux, kron_flux_err, psf_flux, psf_flux_err, psf_chi2,
        local_background, local_background_rms``, ``ap_flux_<r>`` / ``ap_flux_<r>_err`` for
        each radius (``r`` written like ``4p5``), and boolean ``FLAG_NAMES``.
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(np.broadcast_to(np.asarray(variance, dtype=np.float32), img.shape))
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.ascontiguousarray(mask, dtype=np.uint32)
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.shape} and {ys.shape}")
    n = xs.size
    ch = np.zeros(img.shape, np.int32) if children is None else np.ascontiguousarray(children, dtype=np.int32)
    cid = (
        np.zeros(n, np.int64)
        if child_ids is None and children is None
        else (np.arange(1, n + 1) if child_ids is None else np.asarray(child_ids, dtype=np.int64))
    )
    radii = np.asarray(aperture_radii, dtype=np.float64).ravel()
    if kron_min_radius is None:
        kron_min_radius = 2.0 * psf_sigma
    if edge_margin is None:
        edge_margin = int(np.ceil(2.0 * psf_sigma))
    if psf_stamps is None:
        stamps = np.zeros((n, 1, 1))
        have = False
    else:
        stamps = np.ascontiguousarray(psf_stamps, dtype=np.float64)
        if stamps.ndim != 3 or stamps.shape[0] != n or stamps.shape[1] % 2 == 0 or stamps.shape[1] != stamps.shape[2]:
            raise ValueError(
                f"psf_stamps must have shape (n_sources={n}, S, S) with S odd, got {stamps.shape}; "
                "render them with procsky.kernels.psfmodel.render_stamps"
            )
        have = True
    fv, ap, fl = _measure_kernel(
        img,
        var,
        msk,
        ch,
        cid,
        xs,
        ys,
        float(psf_sigma),
        radii,
        float(annulus[0]),
        float(annulus[1]),
        float(kron_factor),
        float(kron_min_radius),
        stamps,
        have,
        bool(psf_weighted),
        int(edge_margin),
    )
    if have and neighbour_iterations > 0 and n > 1:
        ixs, iys = _nearest_pixels(fv[:, 0], fv[:, 1])
        nb, idx = _neighbour_subtracted(img, var, msk, ixs, iys, stamps, fv[:, 14], psf_weighted, neighbour_iterations)
        fv[idx, 14:17] = nb[idx, :3]
        fl[idx, 15] = ~np.isfinite(nb[idx, 0]) | (nb[idx, 3] > 0.1)
    out = {name: fv[:, i] for i, name in enumerate(_FLOAT_NAMES)}
    for a, r in enumerate(radii):
        tag = f"{r:g}".replace(".", "p")
        out[f"ap_flux_{tag}"] = ap[:, a, 0]
        out[f"ap_flux_{tag}_err"] = ap[:, a, 1]
    for i, name in enumerate(FLAG_NAMES):
        out[name] = fl[:, i]
    if blended is not None:
        out["flag_blended"] = np.asarray(blended, dtype=bool).copy()
    return out


@numba.njit(nogil=True, cache=True)
def _psf_fluxes_kernel(image, variance, mask, xs, ys, stamps, weighted, bad_bits):
    n = xs.size
    out = np.full((n, 4), np.nan)
    for k in range(n):
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        f, e, c2, lost = psf_flux(image, variance, mask, ix, iy, stamps[k], weighted, bad_bits)
        out[k, 0] = f
        out[k, 1] = e
        out[k, 2] = c2
        out[k, 3] = lost
    return out


def psf_fit_arrays(image, variance, mask, x, y, stamps, name="stamps"):
    """Contiguous kernel inputs of a PSF fit at many positions, checked.

    Returns ``(image float32, variance float32 (broadcast), mask uint32 (zeros when None),
    x float64, y float64, stamps float64 (n, S, S))``.
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(np.broadcast_to(np.asarray(variance, dtype=np.float32), img.shape))
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.ascontiguousarray(mask, dtype=np.uint32)
    xs = np.atleast_1d(np.asarray(x, np.float64))
    ys = np.atleast_1d(np.asarray(y, np.float64))
    st = np.ascontiguousarray(stamps, dtype=np.float64)
    if st.ndim != 3 or st.shape[0] != xs.size:
        raise ValueError(f"{name} must have shape (n_sources={xs.size}, S, S), got {st.shape}")
    return img, var, msk, xs, ys, st


def measure_psf_fluxes(image, variance, mask, x, y, stamps, *, weighted=True, max_lost=0.1):
    """PSF fluxes of many sources (see :func:`psf_flux`).

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image (counts) and variance (counts^2).
    mask : ndarray (ny, nx) uint32 or None
    x, y : array (n,), pixels
        Centroids; the stamps must have been rendered at exactly these positions.
    stamps : ndarray (n, S, S)
        Normalised PSF stamps (:func:`procsky.kernels.psfmodel.render_stamps`).
    weighted : bool
    max_lost : float
        ``psf_flux_flag`` is set when more than this fraction of the PSF weight falls on
        bad or off-image pixels.

    Returns
    -------
    dict with ``psf_flux``, ``psf_flux_err`` (counts), ``psf_chi2``, ``psf_flux_flag``.
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, stamps)
    r = _psf_fluxes_kernel(img, var, msk, xs, ys, st, bool(weighted), _PSFBAD)
    return {
        "psf_flux": r[:, 0],
        "psf_flux_err": r[:, 1],
        "psf_chi2": r[:, 2],
        "psf_flux_flag": ~np.isfinite(r[:, 0]) | (r[:, 3] > max_lost),
    }


@numba.njit(nogil=True, cache=True)
def _ring_level(vals, pvar, ring, m, r, buf):
    """Level of the values of ring ``r``: their mean within 3 noise sigmas (from the variance) of their
    median, then of that mean (symmetric, so unbiased for the noise; a star not in the model is left out
    where it stands above it)."""
    c = 0
    v2 = 0.0
    for i in range(m):
        if ring[i] == r:
            buf[c] = vals[i]
            v2 += pvar[i]
            c += 1
    if c == 0:
        return 0.0
    sig = math.sqrt(max(v2 / c, 0.0))
    centre = _median_inplace(buf, c)
    level = centre
    for _ in range(2):
        tot = 0.0
        k = 0
        for i in range(m):
            if ring[i] == r and abs(vals[i] - centre) <= 3.0 * sig:
                tot += vals[i]
                k += 1
        if k == 0:
            return level
        level = tot / k
        centre = level
    return level


@numba.njit(nogil=True, cache=True)
def _isolated_apertures_kernel(image, variance, mask, ixs, iys, xs, ys, stamps, flux, idx, radius, core, bad_bits):
    ny, nx = image.shape
    n = ixs.size
    s = stamps.shape[1]
    h = s // 2
    model = np.zeros(image.shape, np.float32)
    for k in range(n):
        f = flux[k]
        if np.isfinite(f) and f > 0.0 and abs(ixs[k]) < 10**5 and abs(iys[k]) < 10**5:
            _add_stamp(model, ixs[k], iys[k], stamps[k], f)
    nr = int(math.floor(radius + 1.0)) + 1
    cap = int((2 * radius + 3) ** 2)
    vals = np.empty(cap)
    ring = np.empty(cap, np.int64)
    wts = np.empty(cap)
    pvar = np.empty(cap)
    wsum = np.zeros(nr)
    buf = np.empty(cap)
    out = np.full((idx.size, 3), np.nan)
    for j in range(idx.size):
        k = idx[j]
        x = xs[k]
        y = ys[k]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        f = flux[k] if np.isfinite(flux[k]) and flux[k] > 0.0 else 0.0
        own = 0.0
        var = 0.0
        area = 0.0
        m = 0
        wsum[:] = 0.0
        for py in range(max(0, int(math.floor(y - radius))), min(ny, int(math.floor(y + radius)) + 2)):
            for px in range(max(0, int(math.floor(x - radius))), min(nx, int(math.floor(x + radius)) + 2)):
                a = _pixel_weight(px - x, py - y, radius)
                if a <= 0.0 or (mask[py, px] & bad_bits):
                    continue
                sj = py - iys[k] + h
                si = px - ixs[k] + h
                if 0 <= sj < s and 0 <= si < s:
                    own += a * f * stamps[k, sj, si]
                # the core (within ``core``) as it is, then 1-px rings
                d = math.sqrt((px - x) ** 2 + (py - y) ** 2)
                r = 0 if d < core else int(d)
                vals[m] = image[py, px] - model[py, px]
                pvar[m] = variance[py, px]
                ring[m] = r
                wts[m] = a
                wsum[r] += a
                m += 1
                var += a * a * variance[py, px]
                area += a
        # the residual (every model, this source's too, subtracted): summed in the core, at each ring's level beyond
        tot = own
        for i in range(m):
            if ring[i] == 0:
                tot += wts[i] * vals[i]
        for r in range(1, nr):
            if wsum[r] <= 0.0:
                continue
            tot += wsum[r] * _ring_level(vals, pvar, ring, m, r, buf)
        out[j, 0] = tot
        out[j, 1] = math.sqrt(max(var, 0.0))
        out[j, 2] = area
    return out


def isolated_apertures(image, variance, mask, x, y, stamps, flux, idx, radius, *, core_radius, bad_bits):
    """Aperture fluxes of sources ``idx`` as if alone, for an aperture correction: each source's fitted
    PSF model in the aperture plus the residual of the image minus every source's fitted model, summed
    within ``core_radius`` and taken at its clipped mean level in each 1-px ring beyond (within 3 noise
    sigmas of the ring's median).

    The residual holds what the models miss: the star's own light beyond its model (what an aperture
    correction is for; smooth in azimuth, so a ring's level keeps it) and other light. The neighbours'
    fitted models are subtracted (DAOPHOT's aperture corrections on neighbour-subtracted stars, Stetson
    1987, 1990); fainter stars hidden in a bright star's wings, which detection could not separate
    (crowded regime: 0.5-1.5 % of the flux of the brightest aperture-correction stars, in 12 px), are
    outliers in their rings, and the clipped ring means leave most of their light out (the wings below 3
    sigma stay: a quarter of a 1 % star 9 px out, with a 4 px FWHM). The unresolved light of fainter
    stars then enters the aperture clipped, nearer its mode than its mean: as the PSF fit holds it under
    a mode background, so the aperture/PSF ratio compares like with like. Within ``core_radius`` (about the
    PSF's FWHM) the residual is the model's error at the core, not smooth in azimuth where the PSF is
    undersampled, and is summed as it is (a star hidden there is in the PSF fit too).

    Parameters
    ----------
    image, variance, mask, x, y, stamps
        As :func:`neighbour_subtracted_psf_fluxes` (stamps rendered at ``x, y``, placed at the nearest
        pixel).
    flux : array (n,), counts
        Fitted PSF amplitudes of all sources (NaN or <= 0: not subtracted).
    idx : array of int
        The sources measured.
    radius : float, pixels
    core_radius : float, pixels
    bad_bits : int
        Pixels left out of the aperture.

    Returns
    -------
    dict of arrays (len(idx),): ``ap_flux``, ``ap_flux_err`` (counts), ``area`` (good pixels, px^2).
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, stamps)
    ixs, iys = _nearest_pixels(xs, ys)
    r = _isolated_apertures_kernel(
        img,
        var,
        msk,
        ixs,
        iys,
        xs,
        ys,
        st,
        np.asarray(flux, np.float64),
        np.asarray(idx, np.int64),
        float(radius),
        float(core_radius),
        int(bad_bits),
    )
    return {"ap_flux": r[:, 0], "ap_flux_err": r[:, 1], "area": r[:, 2]}
