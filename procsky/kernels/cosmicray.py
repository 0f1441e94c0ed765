"""Cosmic-ray detection and repair: L.A.Cosmic (van Dokkum 2001, PASP 113, 1420).

A cosmic ray is sharper than the PSF. L.A.Cosmic measures sharpness with the Laplacian of
the image sampled 2x finer (so that a one-pixel hit gives a strong positive response that
survives the clip of negative values), in units of the expected noise:

* ``L+`` = block-average of max(0, Laplacian) over the 2 x 2 sub-pixels of each pixel;
* ``S  = L+ / (2 N)`` with ``N = sqrt(median5(variance))`` the noise a pixel *should* have
  (the 5 x 5 median keeps the CR's own Poisson noise out); ``S' = S - median5(S)`` removes
  the sampling flux of smooth extended structure;
* candidates: ``S' > sigclip``;
* fine-structure test, which protects the cores of stars: ``F = median3(I) -
  median7(median3(I))`` (in noise units, floored at 0.01); a CR has ``S' / F > objlim``
  while a well-sampled star, whose Laplacian is matched by its fine structure, does not
  (the form ``S'/F`` is the one of the original IRAF script and astroscrappy);
* neighbours of CR pixels join with ``S' > sigclip``, then their neighbours with
  ``S' > sigfrac * sigclip``;
* the CR pixels are replaced by the median of the good pixels around them and the whole is
  iterated (``niter``) to catch the parts of large hits.

Unlike a whole-image implementation, the expensive medians are computed only where they
are needed (memoised per pixel): ``L+`` is cheap and computed everywhere; a pixel is a
candidate only if its Laplacian exceeds ``sigclip`` against a lower bound of its noise, and
the medians are then evaluated around the candidates only. The result matches the full
computation (up to the rare pixel whose 5 x 5 median variance is below that lower bound) at
a cost close to one pass over the image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ._bits import BAD, NO_DATA, SAT, bit
from .background import _median_inplace
from .detection import dilate_square
from .measure import psf_fit_arrays

__all__ = ["CosmicRayResult", "SharpSourceResult", "TrackResult", "find_cosmic_rays", "find_cr_tracks",
           "find_sharp_sources", "laplacian_plus", "repair_pixels"]


class CosmicRayResult(NamedTuple):
    """Output of :func:`find_cosmic_rays`.

    Attributes
    ----------
    mask : ndarray (ny, nx) bool
        True on cosmic-ray pixels.
    image : ndarray (ny, nx) float32
        Image with the CR pixels replaced by the median of their good neighbours.
    variance : ndarray (ny, nx) float32 or None
        Variance repaired the same way (None when no variance was given).
    n_pixels : int
        Number of CR pixels.
    """

    mask: np.ndarray
    image: np.ndarray
    variance: np.ndarray
    n_pixels: int


@numba.njit(nogil=True, cache=True)
def laplacian_plus(image):
    """L.A.Cosmic's ``L+``: positive Laplacian on the 2x sub-sampled image, block-averaged.

    Each pixel is split in 2 x 2 equal sub-pixels; the Laplacian kernel
    ``[[0,-1,0],[-1,4,-1],[0,-1,0]]`` at each sub-pixel reduces to ``2 I - I_vert - I_horiz``
    (its vertical and horizontal outer neighbours), negative values are clipped and the four
    values averaged. Edge pixels use their own value for the missing neighbour.

    Parameters
    ----------
    image : ndarray (ny, nx) float

    Returns
    -------
    ndarray (ny, nx) float32
    """
    ny, nx = image.shape
    out = np.empty((ny, nx), dtype=np.float32)
    for y in range(ny):
        yu = y - 1 if y > 0 else y
        yd = y + 1 if y < ny - 1 else y
        for x in range(nx):
            xl = x - 1 if x > 0 else x
            xr = x + 1 if x < nx - 1 else x
            c2 = 2.0 * image[y, x]
            up = image[yu, x]
            dn = image[yd, x]
            lf = image[y, xl]
            rt = image[y, xr]
            s = 0.0
            v = c2 - up - lf
            if v > 0:
                s += v
            v = c2 - up - rt
            if v > 0:
                s += v
            v = c2 - dn - lf
            if v > 0:
                s += v
            v = c2 - dn - rt
            if v > 0:
                s += v
            out[y, x] = 0.25 * s
    return out


@numba.njit(nogil=True, cache=True)
def _median_window(arr, y, x, h, buf):
    ny, nx = arr.shape
    n = 0
    for yy in range(max(0, y - h), min(ny, y + h + 1)):
        for xx in range(max(0, x - h), min(nx, x + h + 1)):
            buf[n] = arr[yy, xx]
            n += 1
    return _median_inplace(buf, n)


# Memoised per-pixel quantities, kept per tile so that they stay in cache: ``memo[k]`` holds
# noise (k=0), S (1), S' (2) and median3 (3) at pixel (y, x) in slot (y - oy, x - ox);
# ``gens[k]`` the sweep number that computed it (older values are stale), ``g`` the sweep.
_TILE = 128
_HALO = 4


@numba.njit(nogil=True, cache=True)
def _noise_at(var, memo, gens, g, oy, ox, y, x, buf):
    iy = y - oy
    ix = x - ox
    if gens[0, iy, ix] == g:
        return memo[0, iy, ix]
    m = _median_window(var, y, x, 2, buf)
    if not (m > 1e-5):
        m = 1e-5
    v = np.sqrt(m)
    memo[0, iy, ix] = v
    gens[0, iy, ix] = g
    return v


@numba.njit(nogil=True, cache=True)
def _s_at(lp, var, memo, gens, g, oy, ox, y, x, buf):
    iy = y - oy
    ix = x - ox
    if gens[1, iy, ix] == g:
        return memo[1, iy, ix]
    v = lp[y, x] / (2.0 * _noise_at(var, memo, gens, g, oy, ox, y, x, buf))
    memo[1, iy, ix] = v
    gens[1, iy, ix] = g
    return v


@numba.njit(nogil=True, cache=True)
def _sprime_at(lp, var, memo, gens, g, oy, ox, y, x, buf, buf2):
    iy = y - oy
    ix = x - ox
    if gens[2, iy, ix] == g:
        return memo[2, iy, ix]
    ny, nx = lp.shape
    n = 0
    for yy in range(max(0, y - 2), min(ny, y + 3)):
        for xx in range(max(0, x - 2), min(nx, x + 3)):
            buf2[n] = _s_at(lp, var, memo, gens, g, oy, ox, yy, xx, buf)
            n += 1
    v = memo[1, iy, ix] - _median_inplace(buf2, n)
    memo[2, iy, ix] = v
    gens[2, iy, ix] = g
    return v


@numba.njit(nogil=True, cache=True)
def _med3_at(img, memo, gens, g, oy, ox, y, x, buf):
    iy = y - oy
    ix = x - ox
    if gens[3, iy, ix] == g:
        return memo[3, iy, ix]
    v = _median_window(img, y, x, 1, buf)
    memo[3, iy, ix] = v
    gens[3, iy, ix] = g
    return v


@numba.njit(nogil=True, cache=True)
def _fine_structure_at(img, memo, gens, g, oy, ox, y, x, buf, buf49):
    ny, nx = img.shape
    n = 0
    for yy in range(max(0, y - 3), min(ny, y + 4)):
        for xx in range(max(0, x - 3), min(nx, x + 4)):
            buf49[n] = _med3_at(img, memo, gens, g, oy, ox, yy, xx, buf)
            n += 1
    return memo[3, y - oy, x - ox] - _median_inplace(buf49, n)


@numba.njit(nogil=True, cache=True)
def _candidates_tile(img, var, lp, ignore, crmask, active, use_active, sigclip, objlim, cand, memo, gens, g,
                     y0, y1, x0, x1, buf, buf2, buf49):
    ny, nx = img.shape
    oy = y0 - _HALO
    ox = x0 - _HALO
    for y in range(y0, y1):
        for x in range(x0, x1):
            if ignore[y, x] or crmask[y, x]:
                continue
            if use_active and not active[y, x]:
                continue
            lpv = lp[y, x]
            if lpv <= 0:
                continue
            # lower bound of the noise: S' <= S and the 5x5 median variance is rarely below the
            # minimum over the 5x5 cross, so a pixel whose Laplacian is below sigclip against
            # that minimum cannot qualify
            vmin = var[y, x]
            for dy in (-2, -1, 1, 2):
                yy = y + dy
                if 0 <= yy < ny and var[yy, x] < vmin:
                    vmin = var[yy, x]
            for dx in (-2, -1, 1, 2):
                xx = x + dx
                if 0 <= xx < nx and var[y, xx] < vmin:
                    vmin = var[y, xx]
            if vmin < 1e-5:
                vmin = 1e-5
            if lpv / (2.0 * np.sqrt(vmin)) <= sigclip:
                continue
            spv = _sprime_at(lp, var, memo, gens, g, oy, ox, y, x, buf, buf2)
            if spv <= sigclip:
                continue
            f = _fine_structure_at(img, memo, gens, g, oy, ox, y, x, buf, buf49) / memo[0, y - oy, x - ox]
            if f < 0.01:
                f = 0.01
            if spv / f > objlim:
                cand[y, x] = True


@numba.njit(nogil=True, cache=True)
def _grow_tile(lp, var, ignore, crmask, src, dst, thr, memo, gens, g, y0, y1, x0, x1, buf, buf2):
    """Add to ``dst`` the neighbours of the ``src`` pixels of one tile that have S' > thr."""
    ny, nx = lp.shape
    oy = y0 - _HALO
    ox = x0 - _HALO
    for y in range(y0, y1):
        for x in range(x0, x1):
            if not src[y, x]:
                continue
            dst[y, x] = True
            for yy in range(max(0, y - 1), min(ny, y + 2)):
                for xx in range(max(0, x - 1), min(nx, x + 2)):
                    if dst[yy, xx] or src[yy, xx] or ignore[yy, xx] or crmask[yy, xx]:
                        continue
                    if _sprime_at(lp, var, memo, gens, g, oy, ox, yy, xx, buf, buf2) > thr:
                        dst[yy, xx] = True


@numba.njit(nogil=True, cache=True)
def _detect_pass(img, var, ignore, sigclip, sigfrac, objlim, crmask, active, use_active, memo, gens, g0):
    """One L.A.Cosmic detection pass; sets new CR pixels in ``crmask``.

    The image is swept in tiles of ``_TILE`` pixels with per-tile memo arrays ``memo`` /
    ``gens`` of shape (4, _TILE + 2 _HALO, _TILE + 2 _HALO); ``g0`` is the first sweep number
    to use. With ``use_active`` only pixels where ``active`` is True are tested (later
    iterations: only the neighbourhood of repaired pixels has changed).

    Returns
    -------
    n : int
        New CR pixels.
    g : int
        Next free sweep number.
    """
    ny, nx = img.shape
    lp = laplacian_plus(img)
    buf = np.empty(49)
    buf2 = np.empty(49)
    buf49 = np.empty(49)
    cand = np.zeros((ny, nx), dtype=np.bool_)
    g = g0
    for y0 in range(0, ny, _TILE):
        for x0 in range(0, nx, _TILE):
            _candidates_tile(img, var, lp, ignore, crmask, active, use_active, sigclip, objlim, cand, memo, gens,
                             g, y0, min(ny, y0 + _TILE), x0, min(nx, x0 + _TILE), buf, buf2, buf49)
            g += 1
    # grow twice: first neighbours with S' > sigclip, then with S' > sigfrac * sigclip
    for level in range(2):
        thr = sigclip if level == 0 else sigfrac * sigclip
        grown = np.zeros((ny, nx), dtype=np.bool_)
        for y0 in range(0, ny, _TILE):
            for x0 in range(0, nx, _TILE):
                _grow_tile(lp, var, ignore, crmask, cand, grown, thr, memo, gens, g, y0, min(ny, y0 + _TILE), x0,
                           min(nx, x0 + _TILE), buf, buf2)
                g += 1
        cand = grown
    n = 0
    for y in range(ny):
        for x in range(nx):
            if cand[y, x] and not crmask[y, x]:
                crmask[y, x] = True
                n += 1
    return n, g


@numba.njit(nogil=True, cache=True)
def repair_pixels(image, bad, ignore, half_width=2):
    """Replace ``bad`` pixels by the median of the good pixels around them (in place).

    The window starts at ``(2 half_width + 1)^2`` pixels and grows until it holds at least
    one good pixel (neither ``bad`` nor ``ignore``).

    Parameters
    ----------
    image : ndarray (ny, nx) float32
        Modified in place.
    bad : ndarray (ny, nx) bool
        Pixels to replace.
    ignore : ndarray (ny, nx) bool
        Pixels not to use as donors (e.g. BAD, SAT, NO_DATA).
    half_width : int
        Initial half width of the window, pixels.

    Returns
    -------
    int
        Number of pixels replaced.
    """
    ny, nx = image.shape
    src = image  # donors are never ``bad``, so reading while repairing is safe
    nrep = 0
    for y in range(ny):
        for x in range(nx):
            if not bad[y, x]:
                continue
            h = half_width
            while h < max(ny, nx):
                buf = np.empty((2 * h + 1) * (2 * h + 1))
                n = 0
                for yy in range(max(0, y - h), min(ny, y + h + 1)):
                    for xx in range(max(0, x - h), min(nx, x + h + 1)):
                        if not bad[yy, xx] and not ignore[yy, xx]:
                            buf[n] = src[yy, xx]
                            n += 1
                if n > 0:
                    image[y, x] = np.median(buf[:n])
                    nrep += 1
                    break
                h *= 2
    return nrep


@numba.njit(nogil=True, cache=True)
def _good_median5(arr, y, x, bad1, bad2, skip_centre, buf):
    """Median of ``arr`` over the 5 x 5 window around (y, x), leaving out pixels set in
    ``bad1`` or ``bad2`` (and the centre with ``skip_centre``); returns (median, count), the
    median NaN when no pixel is left. ``buf`` holds at least 25 values."""
    ny, nx = arr.shape
    n = 0
    for yy in range(max(0, y - 2), min(ny, y + 3)):
        for xx in range(max(0, x - 2), min(nx, x + 3)):
            if (skip_centre and yy == y and xx == x) or bad1[yy, xx] or bad2[yy, xx]:
                continue
            buf[n] = arr[yy, xx]
            n += 1
    if n == 0:
        return np.nan, 0
    return _median_inplace(buf, n), n


@numba.njit(nogil=True, cache=True)
def _grow_tracks(img, var, ignore, crmask, sigma, objlim, max_iter):
    """Extend CR regions along faint parts of their tracks (in place; repairs what it adds).

    A pixel 8-adjacent to a CR pixel joins when its excess over the median of the good
    pixels (neither CR nor ignored) of its 5 x 5 window is above ``sigma`` times the noise
    (``sqrt`` of the 5 x 5 median variance) and, like an L.A.Cosmic candidate, that excess
    beats the fine structure ``median3 - median7(median3)`` of the repaired image by
    ``objlim`` (a star core is as curved as its fine structure; a one-pixel track is not).
    The test is repeated from the pixels added, up to ``max_iter`` rounds.

    Why: the Laplacian of a pixel whose neighbour along the track is bright is small or
    negative, so L.A.Cosmic's sigfrac growth misses the faint ends of tracks; and a lone
    5-6 sigma track pixel left after the repair of its bright neighbours is at the margin of
    ``sigclip``. ``objlim`` here is lower than L.A.Cosmic's (which divides the Laplacian, not
    the excess): a star core has an excess about as large as its fine structure (ratio ~1,
    undersampled or not) while a track pixel's 3 x 3 median holds unflagged track pixels and
    its ratio is 3-5. Over the 99 ``small`` detectors 1567 of the 2653 missed CR pixels above
    5 sigma were next to a flagged one.

    Returns
    -------
    int
        Pixels added.
    """
    ny, nx = img.shape
    ys, xs = np.nonzero(crmask)
    front = np.empty((ys.size, 2), dtype=np.int64)
    for k in range(ys.size):
        front[k, 0] = ys[k]
        front[k, 1] = xs[k]
    # a pixel is tested at most once per round, and again in later rounds (its neighbourhood
    # changes as the track around it is flagged and repaired)
    seen = np.zeros((ny, nx), dtype=np.int64)
    buf = np.empty(25)
    buf9 = np.empty(9)
    buf49 = np.empty(49)
    total = 0
    for rnd in range(1, max_iter + 1):
        added = np.empty((8 * front.shape[0], 2), dtype=np.int64)
        na = 0
        for k in range(front.shape[0]):
            cy = front[k, 0]
            cx = front[k, 1]
            for y in range(max(0, cy - 1), min(ny, cy + 2)):
                for x in range(max(0, cx - 1), min(nx, cx + 2)):
                    if crmask[y, x] or ignore[y, x] or seen[y, x] == rnd:
                        continue
                    seen[y, x] = rnd
                    med, n = _good_median5(img, y, x, crmask, ignore, True, buf)
                    if n < 8:
                        continue
                    e = img[y, x] - med
                    # noise: 5 x 5 median variance of the pixels not ignored (bad input pixels
                    # may carry variance 0)
                    noise, _ = _good_median5(var, y, x, ignore, ignore, False, buf)
                    if not (noise > 1e-5):
                        noise = 1e-5
                    noise = math.sqrt(noise)
                    if e <= sigma * noise:
                        continue
                    # fine structure at (y, x): median3 minus the median of the 7 x 7 median3's
                    m = 0
                    for yy in range(y - 3, y + 4):
                        for xx in range(x - 3, x + 4):
                            if 0 <= yy < ny and 0 <= xx < nx:
                                buf49[m] = _median_window(img, yy, xx, 1, buf9)
                                m += 1
                    f = (_median_window(img, y, x, 1, buf9) - _median_inplace(buf49, m)) / noise
                    if f < 0.01:
                        f = 0.01
                    if e / noise / f <= objlim:
                        continue
                    added[na, 0] = y
                    added[na, 1] = x
                    na += 1
        if na == 0:
            break
        for k in range(na):
            crmask[added[k, 0], added[k, 1]] = True
        # repair the new pixels at once (median of their good neighbours), so that the next
        # round compares against data, not against the hit
        for k in range(na):
            y = added[k, 0]
            x = added[k, 1]
            med, n = _good_median5(img, y, x, crmask, ignore, False, buf)
            if n > 0:
                img[y, x] = med
                var[y, x], _ = _good_median5(var, y, x, crmask, ignore, False, buf)
        total += na
        front = added[:na].copy()
    return total


def find_cosmic_rays(
    image,
    variance,
    mask=None,
    *,
    ignore=None,
    bad_bits=bit(BAD) | bit(SAT) | bit(NO_DATA),
    sigclip=4.5,
    sigfrac=0.3,
    objlim=5.0,
    niter=4,
    grow_sigma=3.5,
    grow_objlim=2.5,
    grow_iter=20,
):
    """Find cosmic rays with L.A.Cosmic and interpolate over them.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Image, counts. Background may be present or subtracted (the test is on the
        Laplacian and on the variance, not on the level).
    variance : ndarray (ny, nx) float
        Variance, counts^2 (sky + read noise + source Poisson noise; a CR's own contribution
        is removed by the 5 x 5 median).
    mask : ndarray (ny, nx) uint32, optional
        Mask planes; pixels with ``bad_bits`` are never flagged nor used as donors.
    ignore : ndarray (ny, nx) bool, optional
        Extra pixels excluded like ``bad_bits``.
    sigclip : float
        Laplacian/noise detection limit (astroscrappy/L.A.Cosmic default 4.5).
    sigfrac : float
        Fraction of ``sigclip`` for neighbouring pixels.
    objlim : float
        Minimum contrast between the Laplacian and the fine-structure image; raise it if
        star cores are flagged (undersampled PSFs).
    niter : int
        Maximum number of detect-and-repair iterations.
    grow_sigma : float or None
        After the iterations, CR regions are extended along the faint parts of their tracks
        (:func:`_grow_tracks`): a neighbour joins when it stands ``grow_sigma`` times the
        noise above the median of its good 5 x 5 surroundings and that excess is
        ``grow_objlim`` times its fine structure. None or 0 skips it.
    grow_objlim : float
        Contrast of the growth's excess against the fine structure (star cores give ~1).
    grow_iter : int
        Rounds of that growth at most (each adds at most one pixel along a track).

    Returns
    -------
    CosmicRayResult
    """
    img = np.array(image, dtype=np.float32, copy=True)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (ny, nx), got shape {img.shape}")
    var = np.array(variance, dtype=np.float32, copy=True)
    if var.shape != img.shape:
        raise ValueError(f"variance shape {var.shape} differs from image shape {img.shape}; pass the matching plane")
    bad = np.zeros(img.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool).copy()
    if mask is not None and bad_bits:
        bad |= (np.asarray(mask) & np.uint32(bad_bits)) != 0
    bad |= ~np.isfinite(img) | ~np.isfinite(var)
    img[~np.isfinite(img)] = 0.0
    var[~np.isfinite(var)] = 0.0
    crmask = np.zeros(img.shape, dtype=bool)
    active = np.zeros((1, 1), dtype=bool)
    side = _TILE + 2 * _HALO
    memo = np.empty((4, side, side), dtype=np.float32)
    gens = np.zeros((4, side, side), dtype=np.int64)
    g = 1
    for it in range(int(niter)):
        before = crmask.copy() if it > 0 else None
        n, g = _detect_pass(img, var, bad, float(sigclip), float(sigfrac), float(objlim), crmask, active, it > 0,
                            memo, gens, g)
        if n == 0:
            break
        # next pass: only pixels within 4 px of this pass's new CR pixels can change verdict
        new = crmask if before is None else (crmask & ~before)
        active = dilate_square(new, 4)
        # repair in place: donors are never CR or bad pixels, so they still hold input values
        repair_pixels(img, crmask, bad, 2)
        repair_pixels(var, crmask, bad, 2)
    if grow_sigma and crmask.any():
        _grow_tracks(img, var, bad, crmask, float(grow_sigma), float(grow_objlim), int(grow_iter))
    return CosmicRayResult(mask=crmask, image=img, variance=var, n_pixels=int(crmask.sum()))


# ------------------------------------------------------------ detection-level cosmic rays
class SharpSourceResult(NamedTuple):
    """Output of :func:`find_sharp_sources`.

    Attributes
    ----------
    is_cr : ndarray (n,) bool
        The detection is a cosmic ray (or another feature sharper than the PSF): once its
        sharp pixels are removed, what remains is no longer a significant PSF-shaped source.
    cr_pixels : ndarray (ny, nx) bool
        Pixels found sharper than the PSF around any tested detection (whether or not the
        detection itself survives: a star hit by a cosmic ray keeps its row, loses the hit).
    chi2_excess : ndarray (n,) float
        ``(chi2 - dof) / nu^2`` of the PSF + plane fit before cleaning (NaN if not fitted).
    z : ndarray (n,) float
        ``(chi2 - dof) / sqrt(2 dof)`` of that fit.
    nu_clean : ndarray (n,) float
        PSF-fit significance after the sharp pixels are excluded.
    repair : ndarray (ny, nx) float
        On ``cr_pixels``: the clean PSF + plane fit there (NaN elsewhere).
    """

    is_cr: np.ndarray
    cr_pixels: np.ndarray
    chi2_excess: np.ndarray
    z: np.ndarray
    nu_clean: np.ndarray
    repair: np.ndarray


@numba.njit(nogil=True, cache=True)
def _fit_psf_plane(d, v, p, use, h):
    """Weighted fit ``d = a P + b0 + b1 dx + b2 dy`` over ``use`` pixels of a window.

    Returns (a, sigma_a, chi2, npix, b0, b1, b2); a = NaN when singular.
    """
    s = 2 * h + 1
    A = np.zeros((4, 4))
    rhs = np.zeros(4)
    f = np.empty(4)
    npix = 0
    for j in range(s):
        for i in range(s):
            if not use[j, i]:
                continue
            w = 1.0 / v[j, i]
            f[0] = p[j, i]
            f[1] = 1.0
            f[2] = i - h
            f[3] = j - h
            for q in range(4):
                rhs[q] += w * f[q] * d[j, i]
                for r in range(4):
                    A[q, r] += w * f[q] * f[r]
            npix += 1
    if npix < 8:
        return np.nan, np.nan, np.nan, npix, 0.0, 0.0, 0.0
    # Gauss-Jordan inverse of the 4 x 4 normal matrix
    M = A.copy()
    inv = np.eye(4)
    for c in range(4):
        piv = c
        for r in range(c + 1, 4):
            if abs(M[r, c]) > abs(M[piv, c]):
                piv = r
        if abs(M[piv, c]) < 1e-300:
            return np.nan, np.nan, np.nan, npix, 0.0, 0.0, 0.0
        if piv != c:
            for k in range(4):
                t = M[c, k]
                M[c, k] = M[piv, k]
                M[piv, k] = t
                t = inv[c, k]
                inv[c, k] = inv[piv, k]
                inv[piv, k] = t
        dv = M[c, c]
        for k in range(4):
            M[c, k] /= dv
            inv[c, k] /= dv
        for r in range(4):
            if r != c and M[r, c] != 0.0:
                fac = M[r, c]
                for k in range(4):
                    M[r, k] -= fac * M[c, k]
                    inv[r, k] -= fac * inv[c, k]
    sol = np.zeros(4)
    for q in range(4):
        for r in range(4):
            sol[q] += inv[q, r] * rhs[r]
    if not inv[0, 0] > 0.0:
        return np.nan, np.nan, np.nan, npix, 0.0, 0.0, 0.0
    chi2 = 0.0
    for j in range(s):
        for i in range(s):
            if use[j, i]:
                r = d[j, i] - sol[0] * p[j, i] - sol[1] - sol[2] * (i - h) - sol[3] * (j - h)
                chi2 += r * r / v[j, i]
    return sol[0], math.sqrt(inv[0, 0]), chi2, npix, sol[1], sol[2], sol[3]


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


@numba.njit(nogil=True, cache=True)
def _sharp_sources_kernel(image, variance, mask, xs, ys, stamps, skip, h, bad_bits, z_min, excess_min,
                          pixel_sigma, grow_sigma, nu_keep, max_iter, star_sigma, model_error, crpix, repair, out):
    ny, nx = image.shape
    s = 2 * h + 1
    d = np.empty((s, s))
    v = np.empty((s, s))
    p = np.empty((s, s))
    ok = np.zeros((s, s), dtype=np.bool_)
    use = np.zeros((s, s), dtype=np.bool_)
    sharp = np.zeros((s, s), dtype=np.bool_)
    res = np.empty((s, s))
    for k in range(xs.size):
        if skip[k] or not (np.isfinite(xs[k]) and np.isfinite(ys[k])):
            continue
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        _window(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, ok)
        for j in range(s):
            for i in range(s):
                sharp[j, i] = False
                use[j, i] = ok[j, i]
        a, sa, chi2, npix, b0, b1, b2 = _fit_psf_plane(d, v, p, use, h)
        if not np.isfinite(a) or npix <= 4:
            continue
        nu = a / sa
        dof = npix - 4
        out[k, 0] = (chi2 - dof) / max(nu * nu, 1.0)
        out[k, 1] = (chi2 - dof) / math.sqrt(2.0 * dof)
        out[k, 2] = nu
        if not out[k, 1] > z_min:
            continue
        # a source whose misfit is small against its own signal is a bright star (the PSF
        # model's own error dominates the misfit): only a hit far sharper than the star,
        # against noise plus ``model_error`` of the star's own curvature, is cleaned there
        on_star = not out[k, 0] > excess_min
        if on_star and not star_sigma > 0:
            continue
        # a star cut by the image edge (its centroid pulled inwards, its residual steep
        # against the cut) is not cleaned: on `tiny` a S/N 600 star centred on the first
        # row had its core flagged
        if on_star and (iy - h < 0 or iy + h >= ny or ix - h < 0 or ix + h >= nx):
            continue
        thr = star_sigma if on_star else pixel_sigma
        me2 = (model_error * a) ** 2 if on_star else 0.0
        # clean: pixels whose residual from the PSF fit is significant AND sharper than the
        # PSF (they stand above at least one pair of opposite neighbours' residuals, which
        # a residual broader than the PSF, e.g. a galaxy's wing, does not)
        for it in range(max_iter):
            for j in range(s):
                for i in range(s):
                    res[j, i] = d[j, i] - a * p[j, i] - b0 - b1 * (i - h) - b2 * (j - h)
            new = 0
            for j in range(s):
                for i in range(s):
                    if sharp[j, i] or not ok[j, i]:
                        continue
                    sc = math.sqrt(v[j, i] + me2 * p[j, i] * p[j, i])
                    if res[j, i] < thr * sc:
                        continue
                    is_sharp = False
                    for dj, di in ((0, 1), (1, 0), (1, 1), (1, -1)):
                        j1 = j + dj
                        i1 = i + di
                        j2 = j - dj
                        i2 = i - di
                        if j1 < 0 or j1 >= s or i1 < 0 or i1 >= s or j2 < 0 or j2 >= s or i2 < 0 or i2 >= s:
                            continue
                        if not (ok[j1, i1] and ok[j2, i2]):
                            continue
                        contrast = res[j, i] - 0.5 * (res[j1, i1] + res[j2, i2])
                        curv = p[j, i] - 0.5 * (p[j1, i1] + p[j2, i2])
                        noise = math.sqrt(v[j, i] + 0.25 * (v[j1, i1] + v[j2, i2]) + me2 * curv * curv)
                        if contrast > thr * noise:
                            is_sharp = True
                            break
                    if is_sharp:
                        sharp[j, i] = True
                        new += 1
            # grow: neighbours of sharp pixels with a positive residual above grow_sigma
            grew = True
            while grew:
                grew = False
                for j in range(s):
                    for i in range(s):
                        if sharp[j, i] or not ok[j, i] or res[j, i] < grow_sigma * math.sqrt(
                                v[j, i] + me2 * p[j, i] * p[j, i]):
                            continue
                        for dj in (-1, 0, 1):
                            for di in (-1, 0, 1):
                                jj = j + dj
                                ii = i + di
                                if 0 <= jj < s and 0 <= ii < s and sharp[jj, ii] and not sharp[j, i]:
                                    sharp[j, i] = True
                                    grew = True
                                    new += 1
            if new == 0:
                break
            for j in range(s):
                for i in range(s):
                    use[j, i] = ok[j, i] and not sharp[j, i]
            a, sa, chi2, npix, b0, b1, b2 = _fit_psf_plane(d, v, p, use, h)
            if not np.isfinite(a):
                break
        nclean = 0
        for j in range(s):
            for i in range(s):
                if sharp[j, i]:
                    crpix[iy + j - h, ix + i - h] = True
                    nclean += 1
                    if np.isfinite(a):
                        # the clean fit is the best value there (a neighbour median would
                        # flatten a star's core)
                        repair[iy + j - h, ix + i - h] = a * p[j, i] + b0 + b1 * (i - h) + b2 * (j - h)
        out[k, 3] = nclean
        nu_c = a / sa if np.isfinite(a) else 0.0
        out[k, 2] = nu_c
        if nclean > 0 and not (nu_c >= nu_keep):
            out[k, 4] = 1.0


def find_sharp_sources(image, variance, mask, x, y, psf_stamps, *, skip=None, half_width=None,
                       bad_bits=bit(BAD) | bit(SAT) | bit(NO_DATA), z_min=3.0, excess_min=0.5, pixel_sigma=3.0,
                       grow_sigma=1.5, nu_keep=5.0, max_iter=3, star_sigma=5.0, model_error=0.05):
    """Find detections that are cosmic rays missed by L.A.Cosmic (faint multi-pixel tracks).

    L.A.Cosmic tests pixels one at a time, so a low-energy track whose pixels are each only
    3-8 sigma escapes it, while the matched filter of the detection step adds them up into
    a 6-10 sigma "source". Nothing astronomical is sharper than the PSF, so each detection
    is tested against the PSF model at its position (the idea of LSST's
    ``findCosmicRays`` condition that a CR pixel is sharper than the PSF allows, applied to
    the whole detection):

    1. fit ``a P + plane`` (the plane absorbs the wings of neighbours) over a
       ``(2 h + 1)^2`` window; a PSF-shaped source gives ``chi2 ~ dof``;
    2. a detection whose fit is bad both in significance (``z = (chi2 - dof) / sqrt(2 dof)
       > z_min``) and relative to its own signal (``(chi2 - dof) / nu^2 > excess_min``;
       a PSF-model mismatch on a bright star is a small fraction of ``nu^2``) is cleaned:
       pixels with a residual above ``pixel_sigma`` that also stand above the mean residual
       of some pair of opposite neighbours (sharp, unlike the smooth excess of a galaxy
       wider than the PSF), grown to adjacent residuals above ``grow_sigma``, are excluded
       and the fit repeated;
    3. if the PSF significance left (``nu_clean``) is below ``nu_keep`` (the detection
       threshold), the detection was the cosmic ray.

    A cosmic ray on a star (whose misfit is then small against the star's ``nu^2``, so the
    test of step 2 does not fire, and which L.A.Cosmic's fine-structure test protects) is
    cleaned the same way when ``z > z_min``, with the stricter ``star_sigma`` against the noise
    plus ``model_error`` times the star's own model (its value and its curvature), so a
    PSF-model mismatch of a few per cent on a bright core is not taken for a hit. The star
    keeps its row; its hit pixels get ``repair`` values from the clean PSF + plane fit.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
        Background-subtracted image (counts), variance (counts^2).
    mask : ndarray (ny, nx) uint32
        Pixels with ``bad_bits`` are not used.
    x, y : array (n,), pixels
        Centroids of the detections.
    psf_stamps : ndarray (n, S, S)
        PSF model (sum 1) rendered at each centroid (``psfmodel.render_stamps``).
    skip : array (n,) bool, optional
        Detections not to test (e.g. saturated ones).
    half_width : int, optional
        Window half width, pixels (default: ``S // 2`` capped to 3..6 by the caller's PSF:
        ``round(FWHM)`` is a good choice).
    z_min, excess_min, pixel_sigma, grow_sigma, nu_keep, star_sigma, model_error : float
        See above (``star_sigma=0`` leaves stars alone).
    max_iter : int

    Returns
    -------
    SharpSourceResult
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, psf_stamps, "psf_stamps")
    h = int(half_width) if half_width is not None else min(st.shape[1] // 2, 4)
    if h < 2:
        raise ValueError(f"half_width must be >= 2 pixels, got {h}")
    sk = np.zeros(xs.size, bool) if skip is None else np.asarray(skip, bool)
    crpix = np.zeros(img.shape, dtype=np.bool_)
    repair = np.full(img.shape, np.nan)
    out = np.full((xs.size, 5), np.nan)
    out[:, 3:] = 0.0
    _sharp_sources_kernel(img, var, msk, xs, ys, st, sk, h, np.uint32(bad_bits), float(z_min), float(excess_min),
                          float(pixel_sigma), float(grow_sigma), float(nu_keep), int(max_iter), float(star_sigma),
                          float(model_error), crpix, repair, out)
    return SharpSourceResult(is_cr=out[:, 4] > 0, cr_pixels=crpix, chi2_excess=out[:, 0], z=out[:, 1],
                             nu_clean=out[:, 2], repair=repair)


# ------------------------------------------------------------ faint cosmic-ray tracks
class TrackResult(NamedTuple):
    """Output of :func:`find_cr_tracks`.

    Attributes
    ----------
    is_cr : ndarray (n,) bool
        The detection is a cosmic-ray track: a line sharper than the PSF explains it and no
        significant PSF-shaped signal is left beside it.
    on_star : ndarray (n,) bool
        A track crosses this bright detection (which keeps its row).
    cr_pixels : ndarray (ny, nx) bool
        The track pixels of those detections (within 0.8 px of the fitted line segment).
    gain_line, gain_psf, gain_broad : ndarray (n,) float
        Chi^2 drop over a plane of the best sharp line segment, of the PSF and of the best
        line segment as wide as the PSF (NaN where not tested; on a bright detection the
        lines' drops are over the PSF + plane fit, -1 where not computed).
    nu_psf : ndarray (n,) float
        PSF significance left in the joint fit PSF + line + plane.
    theta : ndarray (n,) float
        Position angle of the best line, radians from +x.
    repair : ndarray (ny, nx) float
        On ``cr_pixels``: the plane and PSF parts of the joint fit there.
    """

    is_cr: np.ndarray
    on_star: np.ndarray
    cr_pixels: np.ndarray
    gain_line: np.ndarray
    gain_psf: np.ndarray
    gain_broad: np.ndarray
    nu_psf: np.ndarray
    theta: np.ndarray
    repair: np.ndarray


@numba.njit(nogil=True, cache=True)
def _plane_projection(d, w, use, h):
    """Weighted plane fit ``b0 + b1 dx + b2 dy``: inverse normal matrix and residuals."""
    G = np.zeros((3, 3))
    r = np.zeros(3)
    s = 2 * h + 1
    for j in range(s):
        for i in range(s):
            if use[j, i]:
                f0, f1, f2 = 1.0, i - h, j - h
                ww = w[j, i]
                G[0, 0] += ww
                G[0, 1] += ww * f1
                G[0, 2] += ww * f2
                G[1, 1] += ww * f1 * f1
                G[1, 2] += ww * f1 * f2
                G[2, 2] += ww * f2 * f2
                r[0] += ww * d[j, i] * f0
                r[1] += ww * d[j, i] * f1
                r[2] += ww * d[j, i] * f2
    G[1, 0] = G[0, 1]
    G[2, 0] = G[0, 2]
    G[2, 1] = G[1, 2]
    Gi = np.linalg.inv(G)
    b = Gi @ r
    return Gi, b


@numba.njit(nogil=True, cache=True)
def _quad(a, Gi, b):
    """``a^T Gi b`` for 3-vectors (plane projections)."""
    return (a[0] * (Gi[0, 0] * b[0] + Gi[0, 1] * b[1] + Gi[0, 2] * b[2])
            + a[1] * (Gi[1, 0] * b[0] + Gi[1, 1] * b[1] + Gi[1, 2] * b[2])
            + a[2] * (Gi[2, 0] * b[0] + Gi[2, 1] * b[1] + Gi[2, 2] * b[2]))


@numba.njit(nogil=True, cache=True)
def _projected_gain(m, dres, w, use, h, Gi):
    """For a template ``m``: (sum w m dres, sum w m_perp^2, plane coefficients of m), where
    ``m_perp`` is ``m`` minus its weighted plane fit and ``dres`` the data minus theirs."""
    s = 2 * h + 1
    md = 0.0
    mm = 0.0
    q = np.zeros(3)
    for j in range(s):
        for i in range(s):
            if use[j, i] and m[j, i] != 0.0:
                ww = w[j, i] * m[j, i]
                md += ww * dres[j, i]
                mm += ww * m[j, i]
                q[0] += ww
                q[1] += ww * (i - h)
                q[2] += ww * (j - h)
    return md, mm - _quad(q, Gi, q), q


@numba.njit(nogil=True, cache=True)
def _line_template(m, h, c, sn, rho, t0, t1, width):
    """A line segment through the window: cross-track profile (``width`` <= 0: a triangle of
    one pixel, a rasterised track; else a Gaussian of that sigma, integral 1 across), along
    the track (coordinate ``t`` from the window centre) 1 for ``t0 <= t <= t1``, tapering
    to 0 over one more pixel."""
    s = 2 * h + 1
    for j in range(s):
        for i in range(s):
            x = i - h
            y = j - h
            t = x * c + y * sn
            dp = -x * sn + y * c - rho
            out = t0 - t if t < t0 else (t - t1 if t > t1 else 0.0)
            along = max(0.0, 1.0 - out)
            if along == 0.0:
                m[j, i] = 0.0
                continue
            if width <= 0.0:
                m[j, i] = along * max(0.0, 1.0 - abs(dp))
            else:
                m[j, i] = along * math.exp(-0.5 * (dp / width) ** 2) / (math.sqrt(2.0 * math.pi) * width)


@numba.njit(nogil=True, cache=True)
def _line_bank(h, psf_sigma, n_theta, rho_max, half_lengths):
    """The line segments every detection is tested with (they depend on the window only):
    sharp and PSF-wide templates and their (angle, offset, half-length)."""
    n_rho = int(2 * rho_max / 0.5) + 1
    n = n_theta * n_rho * half_lengths.size
    s = 2 * h + 1
    sharp = np.empty((n, s, s))
    broad = np.empty((n, s, s))
    par = np.empty((n, 3))
    t = 0
    for it in range(n_theta):
        th = math.pi * it / n_theta
        c = math.cos(th)
        sn = math.sin(th)
        for ir in range(n_rho):
            rho = -rho_max + 0.5 * ir
            for il in range(half_lengths.size):
                L = half_lengths[il]
                _line_template(sharp[t], h, c, sn, rho, -L, L, 0.0)
                _line_template(broad[t], h, c, sn, rho, -L, L, psf_sigma)
                par[t, 0] = th
                par[t, 1] = rho
                par[t, 2] = L
                t += 1
    return sharp, broad, par


@numba.njit(nogil=True, cache=True)
def _star_gain(m, dres, dres2, w, use, h, Gi, p_perp, pp):
    """For a template ``m`` beside a star: its chi^2 numerator against the residual of the
    PSF + plane fit (``dres2``), its norm with the plane and the PSF projected out, and the
    plane-only projections the joint fit needs: (md2, mm2, md, mm, q, mp)."""
    s = 2 * h + 1
    md2 = 0.0
    md = 0.0
    mm = 0.0
    mp = 0.0
    q = np.zeros(3)
    for j in range(s):
        for i in range(s):
            if use[j, i] and m[j, i] != 0.0:
                ww = w[j, i] * m[j, i]
                md2 += ww * dres2[j, i]
                md += ww * dres[j, i]
                mm += ww * m[j, i]
                mp += ww * p_perp[j, i]
                q[0] += ww
                q[1] += ww * (i - h)
                q[2] += ww * (j - h)
    mm -= _quad(q, Gi, q)
    return md2, mm - mp * mp / pp, md, mm, q, mp


@numba.njit(nogil=True, cache=True)
def _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi):
    """Joint fit ``a P + c L + plane`` from the plane-projected sums of the PSF ``P`` and a
    line ``L`` (``*d``: against the data, ``pp, ll, pl``: norms and cross term, ``q*``: their
    plane sums; ``b``: the plane fitted to the data alone). Returns (ok, a, c, sigma_a,
    plane coefficients of the joint fit)."""
    det = pp * ll - pl * pl
    e = np.zeros(3)
    if not det > 0.0:
        return False, 0.0, 0.0, 0.0, e
    a = (ll * pd - pl * ld) / det
    c = (pp * ld - pl * pd) / det
    for r in range(3):
        e[r] = b[r] - (Gi[r, 0] * (a * qp[0] + c * ql[0]) + Gi[r, 1] * (a * qp[1] + c * ql[1])
                       + Gi[r, 2] * (a * qp[2] + c * ql[2]))
    return True, a, c, math.sqrt(ll / det), e


@numba.njit(nogil=True, cache=True)
def _track_on_star(d, w0, p, use, h, a0, model_error, sharp_bank, broad_bank, par, star_gain, best, flag, rep):
    """A track across a bright star: the sharp line fitted to the residual of the star's PSF
    + plane fit, against noise plus ``model_error`` of the model (value), and compared with a
    PSF-wide line (a model error is as wide as the PSF). Fills ``flag`` and ``rep`` (the
    joint fit's PSF + plane) and returns (gain_sharp, gain_broad) or gains < 0 when untested."""
    s = 2 * h + 1
    w = np.zeros((s, s))
    for j in range(s):
        for i in range(s):
            flag[j, i] = False
            if use[j, i]:
                w[j, i] = 1.0 / (1.0 / w0[j, i] + (model_error * a0 * p[j, i]) ** 2)
    dres = np.empty((s, s))
    Gi, b, pd, pp, qp = _plane_psf_sums(d, w, use, p, h, dres)
    if not (pp > 0.0 and pd > 0.0):
        return -1.0, -1.0
    a = pd / pp
    cp = Gi @ qp
    p_perp = np.empty((s, s))
    dres2 = np.empty((s, s))
    for j in range(s):
        for i in range(s):
            p_perp[j, i] = p[j, i] - cp[0] - cp[1] * (i - h) - cp[2] * (j - h)
            dres2[j, i] = dres[j, i] - a * p_perp[j, i]
    m = np.empty((s, s))
    g_sharp = 0.0
    g_broad = 0.0
    th_b = 0.0
    rho_b = 0.0
    l_b = 0.0
    for kind in range(2):
        bank = sharp_bank if kind == 0 else broad_bank
        for t in range(par.shape[0]):
            md2, mm2, _, _, _, _ = _star_gain(bank[t], dres, dres2, w, use, h, Gi, p_perp, pp)
            if not (mm2 > 0.0 and md2 > 0.0):
                continue
            g = md2 * md2 / mm2
            if kind == 0 and g > g_sharp:
                g_sharp = g
                th_b = par[t, 0]
                rho_b = par[t, 1]
                l_b = par[t, 2]
            elif kind == 1 and g > g_broad:
                g_broad = g
        if kind == 0 and g_sharp < star_gain:
            return g_sharp, -1.0
    if not (g_sharp - g_broad >= star_gain):
        return g_sharp, g_broad
    # the extent of the track along the best line, then the joint fit a P + c L + plane
    t0b, t1b, g_ext = -l_b, l_b, 0.0
    for t0 in range(-h, 1):
        for t1 in range(h + 1):
            _line_template(m, h, math.cos(th_b), math.sin(th_b), rho_b, float(t0), float(t1), 0.0)
            md2, mm2, _, _, _, _ = _star_gain(m, dres, dres2, w, use, h, Gi, p_perp, pp)
            if mm2 > 0.0 and md2 > 0.0 and md2 * md2 / mm2 > g_ext:
                g_ext = md2 * md2 / mm2
                t0b, t1b = float(t0), float(t1)
    _line_template(best, h, math.cos(th_b), math.sin(th_b), rho_b, t0b, t1b, 0.0)
    md2, mm2, ld, ll, ql, pl = _star_gain(best, dres, dres2, w, use, h, Gi, p_perp, pp)
    ok, aj, _, _, e = _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi)
    if not ok:
        return g_sharp, g_broad
    for j in range(s):
        for i in range(s):
            if use[j, i] and best[j, i] >= 0.2:
                flag[j, i] = True
                rep[j, i] = aj * p[j, i] + e[0] + e[1] * (i - h) + e[2] * (j - h)
    return g_sharp, g_broad


@numba.njit(nogil=True, cache=True)
def _plane_psf_sums(d, w, use, p, h, dres):
    """Weighted plane of a window (``Gi``, ``b``), the plane-subtracted data ``dres`` (filled)
    and the PSF's projected sums ``pd, pp, qp`` (:func:`_projected_gain`)."""
    s = 2 * h + 1
    Gi, b = _plane_projection(d, w, use, h)
    for j in range(s):
        for i in range(s):
            dres[j, i] = d[j, i] - b[0] - b[1] * (i - h) - b[2] * (j - h)
    pd, pp, qp = _projected_gain(p, dres, w, use, h, Gi)
    return Gi, b, pd, pp, qp


@numba.njit(nogil=True, cache=True)
def _window_psf_gain(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, use, w, dres):
    """Gather a detection's window (:func:`_window`), its weights ``w``, the weighted plane
    ``b`` (with ``Gi``) and the plane-subtracted data ``dres``; return those with the PSF's
    projected sums ``pd, pp, qp`` (:func:`_projected_gain`) and the number of usable pixels.
    With fewer than half the window usable nothing is fitted and ``pp = 0``."""
    s = 2 * h + 1
    npix = _window(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, use)
    for j in range(s):
        for i in range(s):
            w[j, i] = 1.0 / v[j, i] if use[j, i] else 0.0
    if npix < s * s // 2:
        return npix, np.zeros((3, 3)), np.zeros(3), 0.0, 0.0, np.zeros(3)
    Gi, b, pd, pp, qp = _plane_psf_sums(d, w, use, p, h, dres)
    return npix, Gi, b, pd, pp, qp


@numba.njit(nogil=True, cache=True)
def _track_kernel(image, variance, mask, xs, ys, stamps, skip, h, bad_bits, sharp_bank, broad_bank, par, nu_max,
                  min_gain, min_total, nu_keep, star_gain, model_error, crpix, repair, out, raw, raw_bits):
    ny, nx = image.shape
    s = 2 * h + 1
    d = np.empty((s, s))
    v = np.empty((s, s))
    w = np.empty((s, s))
    p = np.empty((s, s))
    use = np.zeros((s, s), dtype=np.bool_)
    dres = np.empty((s, s))
    m = np.empty((s, s))
    best = np.empty((s, s))
    flag = np.zeros((s, s), dtype=np.bool_)
    rep = np.zeros((s, s))
    wr = np.empty((s, s))
    user = np.zeros((s, s), dtype=np.bool_)
    dresr = np.empty((s, s))
    for k in range(xs.size):
        if skip[k] or not (np.isfinite(xs[k]) and np.isfinite(ys[k])):
            continue
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        npix, Gi, b, pd, pp, qp = _window_psf_gain(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p,
                                                   use, w, dres)
        if not pp > 0.0:
            continue
        gain_psf = pd * pd / pp if pd > 0 else 0.0
        if pd / math.sqrt(pp) > nu_max:
            # a star cut by the image edge has a sharp residual along it: not tested
            if not star_gain > 0.0 or iy - h < 0 or iy + h >= ny or ix - h < 0 or ix + h >= nx:
                continue
            gs, gb = _track_on_star(d, w, p, use, h, pd / pp, model_error, sharp_bank, broad_bank, par, star_gain,
                                    best, flag, rep)
            out[k, 0] = gs
            out[k, 1] = gain_psf
            out[k, 2] = gb
            for j in range(s):
                for i in range(s):
                    if flag[j, i]:
                        crpix[iy + j - h, ix + i - h] = True
                        repair[iy + j - h, ix + i - h] = rep[j, i]
                        out[k, 5] = 2.0
            continue
        # the line search (lw, luse, ldres, lGi); the joint fit below (is a PSF-shaped source
        # left?) keeps the pixels not flagged yet (w, use, dres, Gi, b, pd, pp, qp)
        lw, luse, ldres, lGi = w, use, dres, Gi
        if raw_bits != 0:
            # pixels flagged earlier (raw_bits) take their values before the repair, so that a
            # track partly flagged by L.A.Cosmic is found whole
            _, lGi, _, lpd, lpp, _ = _window_psf_gain(raw, variance, mask, stamps, k, ix, iy, h,
                                                      bad_bits & ~raw_bits, d, v, p, user, wr, dresr)
            if not lpp > 0.0:
                continue
            lw, luse, ldres = wr, user, dresr
            gain_psf = lpd * lpd / lpp if lpd > 0 else 0.0
        # best sharp line segment; only if it beats the PSF, the best PSF-wide one
        g_best = 0.0
        th_best = 0.0
        rho_best = 0.0
        l_best = 0.0
        for kind in range(2):
            g_kind = 0.0
            bank = sharp_bank if kind == 0 else broad_bank
            for t in range(par.shape[0]):
                md, mp, _ = _projected_gain(bank[t], ldres, lw, luse, h, lGi)
                if not (mp > 0.0 and md > 0.0):
                    continue
                g = md * md / mp
                if g > g_kind:
                    g_kind = g
                    if kind == 0:
                        th_best = par[t, 0]
                        rho_best = par[t, 1]
                        l_best = par[t, 2]
            if kind == 0:
                g_best = g_kind
                out[k, 0] = g_best
                out[k, 1] = gain_psf
                out[k, 4] = th_best
                if g_best - gain_psf < min_gain:
                    break
            else:
                out[k, 2] = g_kind
        if not (g_best - gain_psf >= min_gain and g_best - out[k, 2] >= min_gain
                and 2.0 * g_best - gain_psf - out[k, 2] >= min_total):
            continue
        # the extent of the track along the best line
        t0b, t1b, g_ext = -l_best, l_best, 0.0
        for t0 in range(-h, 1):
            for t1 in range(h + 1):
                _line_template(m, h, math.cos(th_best), math.sin(th_best), rho_best, float(t0), float(t1), 0.0)
                md, mp, _ = _projected_gain(m, ldres, lw, luse, h, lGi)
                if mp > 0.0 and md > 0.0 and md * md / mp > g_ext:
                    g_ext = md * md / mp
                    t0b, t1b = float(t0), float(t1)
        # joint fit a P + c L + plane on the pixels not flagged before: is a PSF-shaped
        # source left beside the line? (a bright hit that L.A.Cosmic flagged would leave a
        # misfit of the rasterised line that drags the PSF amplitude of a galaxy beside it)
        _line_template(best, h, math.cos(th_best), math.sin(th_best), rho_best, t0b, t1b, 0.0)
        ld, ll, ql = _projected_gain(best, dres, w, use, h, Gi)
        if raw_bits != 0 and ll > 0.0:
            # found with the flagged pixels' raw values, the line must also explain the pixels
            # not flagged about as well as the PSF does: a faint source beside a flagged hit
            # (the hit alone makes a strong line) is left to the PSF there
            g_line_x = ld * ld / ll if ld > 0.0 else 0.0
            g_psf_x = pd * pd / pp if pd > 0.0 else 0.0
            if g_line_x < g_psf_x - min_gain:
                continue
        pl = 0.0
        for j in range(s):
            for i in range(s):
                if use[j, i]:
                    pl += w[j, i] * p[j, i] * best[j, i]
        pl -= _quad(ql, Gi, qp)
        ok, a, _, sa, e = _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi)
        if not ok:
            continue
        nu_a = a / sa
        out[k, 3] = nu_a
        if nu_a >= nu_keep:
            continue
        out[k, 5] = 1.0
        # plane + PSF part of the joint fit, for the repair (usable pixels are inside the image)
        for j in range(s):
            for i in range(s):
                if best[j, i] >= 0.2 and use[j, i]:
                    crpix[iy + j - h, ix + i - h] = True
                    repair[iy + j - h, ix + i - h] = max(a, 0.0) * p[j, i] + e[0] + e[1] * (i - h) + e[2] * (j - h)


def find_cr_tracks(image, variance, mask, x, y, psf_stamps, psf_sigma, *, skip=None, half_width=7,
                   bad_bits=bit(BAD) | bit(SAT) | bit(NO_DATA), n_theta=36, rho_max=2.0,
                   half_lengths=(2.0, 4.0, 7.0), nu_max=30.0, min_gain=12.0, min_total=28.0, nu_keep=5.0,
                   star_gain=25.0, model_error=0.02, raw=None, raw_bits=0):
    """Find detections that are faint cosmic-ray tracks: lines sharper than the PSF.

    A grazing cosmic ray deposits a few hundred electrons along a rasterised line of 5-30
    pixels, 1-4 sigma per pixel: too faint per pixel for L.A.Cosmic and, once the PSF-fit
    test of :func:`find_sharp_sources` asks for single pixels sharper than the PSF, too faint
    for that too, while the detection's matched filter adds the whole track into a 5-10 sigma
    "source". Such a track is recognised by its shape as a whole (the idea of the streak
    finders, e.g. Hough-transform trail detection, applied within one detection's window).
    Over a ``(2 h + 1)^2`` window around each detection, with a weighted plane for the local
    background and neighbours' wings:

    1. the chi^2 drop of the PSF (``gain_psf``) is compared with that of the best line
       segment one pixel wide (``gain_line``; ``n_theta`` angles, offsets up to ``rho_max``
       from the centroid in 0.5-pixel steps, the half-lengths given), and with the best line
       segment whose cross-section is the PSF's Gaussian (``gain_broad``, e.g. an edge-on
       galaxy or a trail);
    2. the detection is a track when the sharp line beats both by ``min_gain`` and by
       ``min_total`` summed (chi^2 units). On 14 `small` detectors (about 3400 detections of
       real objects, 38 of tracks) the objects reached 13.8 over the PSF and 11.6 over both
       (24 summed): for a point source the best line gains about a third of the PSF's chi^2
       drop plus the best of the trials on noise, and a real elongated source is as wide
       as the PSF across; the tracks without a source under them reached 12-110 over both.
       Over all 99 detectors of 11 `small` visits this removed 77 of the 87 spurious
       detections that were tracks and lost no detection of a truth source above S/N 10;
    3. a joint fit ``a PSF + c line + plane`` leaves ``a / sigma_a < nu_keep`` (the detection
       threshold): nothing PSF-shaped is under the track.

    On a detection brighter than ``nu_max`` (PSF significance: a star, which keeps its row)
    the lines are fitted to the residual of its PSF + plane fit, with the noise plus
    ``model_error`` times the model, and a sharp line that gains ``star_gain`` over the
    residual and over the best PSF-wide line (a model error is as wide as the PSF) is a
    track across the star: ``on_star``, its pixels flagged and repaired with the joint
    PSF + line + plane fit (``star_gain=0`` leaves bright detections alone). On 12 `small`
    detectors the ~520 bright stars without a hit reached 21 over the residual and 12 over
    the wide line; a star of S/N 350 crossed by a 2100-count track, 34 and 28. Over the 99
    detectors two stars were found, both under a simulated track, and no other. A star
    cut by the image edge is not tested (the cut is a sharp edge). Pixels already
    flagged should be in ``bad_bits`` (their repaired values are not data). With ``raw``
    the faint-branch test sees the pixels of ``raw_bits`` (the earlier CR flags) with their
    values before the repair: a track that L.A.Cosmic flagged in part (its bright pixels)
    is found whole, where its unflagged faint pixels alone, plus the noise, can pass for a
    faint source (on `small` visit 20 detector 0 a S/N 5.3 detection whose matched filter
    is 3.8 sigma without the track). The joint fit (step 3) still uses only the pixels not
    flagged before: with a bright flagged hit in it, the rasterised line's misfit dragged
    the PSF amplitude of galaxies of S/N 14-31 next to the hit below ``nu_keep``. And on
    those pixels the line must explain the data within ``min_gain`` of the PSF: a short
    flagged hit 3-4 px from a real S/N 6-8 star makes a strong line in the raw values, and
    without this condition dropped the star in 4 of 20 noise draws (in a test). Pixels
    flagged before are not returned in ``cr_pixels``.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
        Background-subtracted image and variance, counts and counts^2.
    mask : ndarray (ny, nx) uint32 or None
    x, y : array (n,)
        Centroids of the detections, pixels.
    psf_stamps : ndarray (n, S, S)
        PSF model at each centroid (sum 1).
    psf_sigma : float
        Gaussian sigma of the PSF, pixels (the width of the broad line).
    skip : array (n,) bool, optional
        Detections not to test.
    half_width : int
        Window half width, pixels.
    n_theta, rho_max, half_lengths, nu_max, min_gain, min_total, nu_keep, star_gain, model_error
        See above.
    raw : ndarray (ny, nx) float, optional
        The image before the earlier CR repairs (same background), used with ``raw_bits``.
    raw_bits : int
        Mask bits (in ``bad_bits``) whose pixels the faint-branch test takes from ``raw``.

    Returns
    -------
    TrackResult
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, psf_stamps, "psf_stamps")
    h = int(half_width)
    if h < 3:
        raise ValueError(f"half_width must be >= 3 pixels, got {h}")
    if not psf_sigma > 0:
        raise ValueError(f"psf_sigma must be > 0 pixels, got {psf_sigma}")
    sk = np.zeros(xs.size, bool) if skip is None else np.asarray(skip, bool)
    crpix = np.zeros(img.shape, dtype=np.bool_)
    repair = np.full(img.shape, np.nan)
    out = np.full((xs.size, 6), np.nan)
    out[:, 5] = 0.0
    sharp_bank, broad_bank, par = _line_bank(h, float(psf_sigma), int(n_theta), float(rho_max),
                                             np.asarray(half_lengths, dtype=np.float64))
    if raw is None or not raw_bits:
        rw, rb = img, 0
    else:
        rw = np.asarray(raw, dtype=img.dtype)
        if rw.shape != img.shape:
            raise ValueError(f"raw shape {rw.shape} differs from image shape {img.shape}")
        rb = int(raw_bits)
    _track_kernel(img, var, msk, xs, ys, st, sk, h, np.uint32(bad_bits), sharp_bank, broad_bank, par, float(nu_max),
                  float(min_gain), float(min_total), float(nu_keep), float(star_gain), float(model_error), crpix,
                  repair, out, rw, np.uint32(rb))
    return TrackResult(is_cr=out[:, 5] == 1.0, on_star=out[:, 5] == 2.0, cr_pixels=crpix, gain_line=out[:, 0], gain_psf=out[:, 1],
                       gain_broad=out[:, 2], nu_psf=out[:, 3], theta=out[:, 4], repair=repair)
