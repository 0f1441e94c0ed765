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

When the PSF is undersampled (FWHM below ~2.5 px) the Laplacian of a star core outgrows its fine
structure and ``objlim`` stops protecting it. With ``psf_ratio`` every candidate must also
pass LSST's ``findCosmicRays`` test against the PSF and the growth steps stop at PSF-shaped peaks
(:mod:`.psfsharp`).

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

from .._bits import BAD, NO_DATA, SAT, bit
from ..background import _median_inplace
from ..detection import any_bits
from .psfsharp import peak_verdict

__all__ = ["CosmicRayResult", "find_cosmic_rays", "laplacian_plus", "repair_pixels"]


class CosmicRayResult(NamedTuple):
    """Output of :func:`find_cosmic_rays`.

    Attributes
    ----------
    mask : ndarray (ny, nx) bool
        True on cosmic-ray pixels.
    image : ndarray (ny, nx) float32
        Image with the CR pixels replaced by the median of their good neighbours (a caller that
        has taken the values may keep the result without it: None).
    variance : ndarray (ny, nx) float32 or None
        Variance repaired the same way (None when no variance was given).
    n_pixels : int
        Number of CR pixels.
    psf_ratio : float
        The PSF's centred-peak neighbour ratio the candidates were held to (``psf_ratio``
        argument; NaN when that test was off).
    """

    mask: np.ndarray
    image: np.ndarray | None
    variance: np.ndarray | None
    n_pixels: int
    psf_ratio: float = float("nan")


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
        for x in range(nx):
            out[y, x] = _lp_at(image, y, x)
    return out


@numba.njit(nogil=True, cache=True)
def _lp_at(image, y, x):
    """:func:`laplacian_plus` at one pixel."""
    ny, nx = image.shape
    yu = y - 1 if y > 0 else y
    yd = y + 1 if y < ny - 1 else y
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
    return 0.25 * s


@numba.njit(nogil=True, cache=True)
def _update_laplacian(image, lp, changed):
    """Recompute ``lp`` (:func:`laplacian_plus` of ``image``) around the ``changed`` pixels, the only
    ones whose value differs from the image it was computed on (each enters its 3 x 3 neighbours)."""
    ny, nx = image.shape
    for y in range(ny):
        for x in range(nx):
            if not changed[y, x]:
                continue
            for yy in range(max(0, y - 1), min(ny, y + 2)):
                for xx in range(max(0, x - 1), min(nx, x + 2)):
                    lp[yy, xx] = _lp_at(image, yy, xx)


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
# a later pass tests only the pixels within this distance (square) of the previous pass's new CR pixels
_ACTIVE_R = 4


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
def _psf_shaped_at(img, var, ignore, f1, f2, f3, y, x, rf, rf_diag, nsigma):
    """Whether (y, x) is part of a PSF-shaped peak, the veto on growing a cosmic ray into it
    (``f1``, ``f2``, ``f3``: the cosmic-ray pixels found so far).

    Either it provably peaks like the PSF itself (:func:`.psfsharp.peak_verdict`; lines through cosmic-ray
    pixels give no verdict: a pixel beside a track is judged across it, a star pixel beside a hit
    along the lines the hit does not cross), or it lies on the flank of such a peak: one of its 8
    neighbours, no cosmic ray, provably peaks like the PSF and is brighter by ``nsigma`` times the
    noise of the difference (a star's flank pixel has its brighter core beside it; a track's side
    pixels have sky, or more of the track, which is sharper than the PSF or undecided)."""
    ny, nx = img.shape
    v0 = img[y, x]
    if v0 <= 0.0:
        return False
    verdict = peak_verdict(img, var, ignore, f1, f2, f3, y, x, rf, rf_diag, nsigma)
    if verdict != 0:
        return verdict > 0
    var0 = var[y, x] if var[y, x] > 0.0 else 0.0
    for yy in range(max(0, y - 1), min(ny, y + 2)):
        for xx in range(max(0, x - 1), min(nx, x + 2)):
            if (yy == y and xx == x) or ignore[yy, xx] or f1[yy, xx] or f2[yy, xx] or f3[yy, xx]:
                continue
            if img[yy, xx] - v0 > nsigma * math.sqrt(var0 + max(var[yy, xx], 0.0)):
                if peak_verdict(img, var, ignore, f1, f2, f3, yy, xx, rf, rf_diag, nsigma) > 0:
                    return True
    return False


@numba.njit(nogil=True, cache=True)
def _candidates_tile(
    img,
    var,
    lp,
    ignore,
    crmask,
    active,
    use_active,
    sigclip,
    objlim,
    psf_rf,
    psf_rf_diag,
    psf_nsigma,
    cand,
    memo,
    gens,
    g,
    y0,
    y1,
    x0,
    x1,
    buf,
    buf2,
    buf49,
):
    ny, nx = img.shape
    oy = y0 - _HALO
    ox = x0 - _HALO
    found = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            if use_active and not active[y, x]:
                continue
            if ignore[y, x] or crmask[y, x]:
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
            if spv / f > objlim and (
                psf_rf <= 0.0
                or peak_verdict(img, var, ignore, ignore, ignore, ignore, y, x, psf_rf, psf_rf_diag, psf_nsigma) < 0
            ):
                cand[y, x] = True
                found += 1
    return found


@numba.njit(nogil=True, cache=True)
def _grow_tile(
    img,
    lp,
    var,
    ignore,
    crmask,
    src,
    dst,
    thr,
    psf_rf,
    psf_rf_diag,
    psf_nsigma,
    memo,
    gens,
    g,
    y0,
    y1,
    x0,
    x1,
    buf,
    buf2,
):
    """Add to ``dst`` the neighbours of the ``src`` pixels of one tile that have S' > thr; with ``psf_rf``
    > 0 (undersampled PSF) not those that provably peak like the PSF (:func:`_psf_shaped_at`, the CR
    pixels found so far giving no verdict): a star core 2-3 px from a hit has S' far above the
    threshold when the PSF is as sharp as the hit."""
    ny, nx = lp.shape
    oy = y0 - _HALO
    ox = x0 - _HALO
    any_src = False
    for y in range(y0, y1):
        for x in range(x0, x1):
            if not src[y, x]:
                continue
            any_src = True
            dst[y, x] = True
            for yy in range(max(0, y - 1), min(ny, y + 2)):
                for xx in range(max(0, x - 1), min(nx, x + 2)):
                    if dst[yy, xx] or src[yy, xx] or ignore[yy, xx] or crmask[yy, xx]:
                        continue
                    if _sprime_at(lp, var, memo, gens, g, oy, ox, yy, xx, buf, buf2) <= thr:
                        continue
                    if psf_rf > 0.0 and _psf_shaped_at(
                        img, var, ignore, crmask, src, dst, yy, xx, psf_rf, psf_rf_diag, psf_nsigma
                    ):
                        continue
                    dst[yy, xx] = True
    return any_src


@numba.njit(nogil=True, cache=True)
def _detect_pass(
    img,
    var,
    ignore,
    sigclip,
    sigfrac,
    objlim,
    psf_rf,
    psf_rf_diag,
    psf_nsigma,
    crmask,
    active,
    use_active,
    memo,
    gens,
    g0,
    lp,
    next_active,
):
    """One L.A.Cosmic detection pass; sets new CR pixels in ``crmask``.

    The image is swept in tiles of ``_TILE`` pixels with per-tile memo arrays ``memo`` /
    ``gens`` of shape (4, _TILE + 2 _HALO, _TILE + 2 _HALO); ``g0`` is the first sweep number
    to use. With ``use_active`` only pixels where ``active`` is True are tested (later
    iterations: only the neighbourhood of repaired pixels has changed). With ``psf_rf`` > 0 a
    candidate must also be sharper than the PSF allows (:func:`.psfsharp.peak_verdict`). ``lp`` is
    :func:`laplacian_plus` of ``img``; ``next_active`` (all False) receives the pixels within
    ``_ACTIVE_R`` (Chebyshev) of the new CR pixels, the next pass's ``active``. Tiles that cannot
    hold a candidate (no ``active`` pixel) or a pixel to grow (no source pixel in or next to them)
    are skipped, their sweep numbers kept.

    Returns
    -------
    n : int
        New CR pixels.
    g : int
        Next free sweep number.
    """
    ny, nx = img.shape
    buf = np.empty(49)
    buf2 = np.empty(49)
    buf49 = np.empty(49)
    cand = np.zeros((ny, nx), dtype=np.bool_)
    nty = (ny + _TILE - 1) // _TILE
    ntx = (nx + _TILE - 1) // _TILE
    todo = np.ones((nty, ntx), dtype=np.bool_)
    if use_active:
        todo[:, :] = False
        for y in range(ny):
            for x in range(nx):
                if active[y, x]:
                    todo[y // _TILE, x // _TILE] = True
    has = np.zeros((nty, ntx), dtype=np.bool_)
    g = g0
    for ty in range(nty):
        for tx in range(ntx):
            if todo[ty, tx]:
                y0 = ty * _TILE
                x0 = tx * _TILE
                nfound = _candidates_tile(
                    img,
                    var,
                    lp,
                    ignore,
                    crmask,
                    active,
                    use_active,
                    sigclip,
                    objlim,
                    psf_rf,
                    psf_rf_diag,
                    psf_nsigma,
                    cand,
                    memo,
                    gens,
                    g,
                    y0,
                    min(ny, y0 + _TILE),
                    x0,
                    min(nx, x0 + _TILE),
                    buf,
                    buf2,
                    buf49,
                )
                has[ty, tx] = nfound > 0
            g += 1
    # grow twice: first neighbours with S' > sigclip, then with S' > sigfrac * sigclip
    for level in range(2):
        thr = sigclip if level == 0 else sigfrac * sigclip
        grown = np.zeros((ny, nx), dtype=np.bool_)
        # grown pixels lie in the tile of their source pixel or one pixel into a neighbouring tile
        nxt = np.zeros((nty, ntx), dtype=np.bool_)
        for ty in range(nty):
            for tx in range(ntx):
                if has[ty, tx]:
                    y0 = ty * _TILE
                    x0 = tx * _TILE
                    if _grow_tile(
                        img,
                        lp,
                        var,
                        ignore,
                        crmask,
                        cand,
                        grown,
                        thr,
                        psf_rf,
                        psf_rf_diag,
                        psf_nsigma,
                        memo,
                        gens,
                        g,
                        y0,
                        min(ny, y0 + _TILE),
                        x0,
                        min(nx, x0 + _TILE),
                        buf,
                        buf2,
                    ):
                        for jy in range(max(0, ty - 1), min(nty, ty + 2)):
                            for jx in range(max(0, tx - 1), min(ntx, tx + 2)):
                                nxt[jy, jx] = True
                g += 1
        cand = grown
        has = nxt
    n = 0
    for ty in range(nty):
        for tx in range(ntx):
            if not has[ty, tx]:
                continue
            for y in range(ty * _TILE, min(ny, (ty + 1) * _TILE)):
                for x in range(tx * _TILE, min(nx, (tx + 1) * _TILE)):
                    if cand[y, x] and not crmask[y, x]:
                        crmask[y, x] = True
                        n += 1
                        for yy in range(max(0, y - _ACTIVE_R), min(ny, y + _ACTIVE_R + 1)):
                            for xx in range(max(0, x - _ACTIVE_R), min(nx, x + _ACTIVE_R + 1)):
                                next_active[yy, xx] = True
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
def _grow_tracks(img, var, ignore, crmask, sigma, objlim, max_iter, psf_rf, psf_rf_diag, psf_nsigma):
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
    its ratio is 3-5. Most CR pixels above 5 sigma that L.A.Cosmic misses lie next to a
    flagged one. That contrast protects star cores only while the PSF is resolved: at FWHM
    1.2-1.5 px the 3 x 3 median of a core is a fraction of its peak and the ratio reaches 5-7,
    so with ``psf_rf`` > 0 a pixel that provably peaks like the PSF (:func:`_psf_shaped_at`,
    lines through CR pixels giving no verdict) does not join either.

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
                    if psf_rf > 0.0 and _psf_shaped_at(
                        img, var, ignore, crmask, crmask, crmask, y, x, psf_rf, psf_rf_diag, psf_nsigma
                    ):
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
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    ignore: np.ndarray | None = None,
    bad_bits: int = bit(BAD) | bit(SAT) | bit(NO_DATA),
    sigclip: float = 4.5,
    sigfrac: float = 0.3,
    objlim: float = 5.0,
    niter: int = 4,
    grow_sigma: float | None = 3.5,
    grow_objlim: float = 2.5,
    grow_iter: int = 20,
    psf_ratio: float | None = None,
    psf_margin: float = 0.7,
    psf_nsigma: float = 3.0,
    in_place: bool = False,
) -> CosmicRayResult:
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
    psf_ratio : float, optional
        For undersampled PSFs, whose star cores L.A.Cosmic's fine-structure test no longer
        protects: the centred-peak neighbour ratio of the sharpest PSF the frame holds
        (:func:`.psfsharp.gaussian_peak_ratio`). A candidate must then also be sharper than
        ``psf_margin * psf_ratio`` allows by ``psf_nsigma`` along its row or column (along a
        diagonal, ``psf_margin * psf_ratio**2``: LSST's criterion, :mod:`.psfsharp`), and neither
        growth step joins a pixel that provably peaks like the PSF or lies on the flank of such a
        peak (:func:`_psf_shaped_at`): a star core 2-3 px from a hit is otherwise grown into.
        None: off.
    psf_margin, psf_nsigma : float
        Margin on ``psf_ratio`` and significance of that test.
    in_place : bool
        Repair ``image`` and ``variance`` themselves (float32, C-contiguous, writeable; their
        non-finite values set to 0) instead of copies: the same values, two whole-frame planes
        less. The result's ``image`` and ``variance`` are then those arrays.

    Returns
    -------
    CosmicRayResult
    """
    if in_place:
        for name, a in (("image", image), ("variance", variance)):
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable):
                raise ValueError(f"in_place needs a writeable C-contiguous float32 {name}")
        img, var = image, variance
    else:
        img = np.array(image, dtype=np.float32, copy=True)
        var = np.array(variance, dtype=np.float32, copy=True)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (ny, nx), got shape {img.shape}")
    if var.shape != img.shape:
        raise ValueError(f"variance shape {var.shape} differs from image shape {img.shape}; pass the matching plane")
    bad = np.zeros(img.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool).copy()
    if mask is not None and bad_bits:
        bad |= any_bits(mask, bad_bits)
    bad |= ~np.isfinite(img) | ~np.isfinite(var)
    img[~np.isfinite(img)] = 0.0
    var[~np.isfinite(var)] = 0.0
    crmask = np.zeros(img.shape, dtype=bool)
    active: np.ndarray = np.zeros((1, 1), dtype=bool)
    side = _TILE + 2 * _HALO
    memo = np.empty((4, side, side), dtype=np.float32)
    gens = np.zeros((4, side, side), dtype=np.int64)
    g = 1
    ratio = float("nan") if psf_ratio is None else float(psf_ratio)
    use_psf = bool(np.isfinite(ratio) and ratio > 0.0)
    psf_rf = float(psf_margin) * ratio if use_psf else 0.0
    psf_rf_diag = psf_rf * ratio
    lp = laplacian_plus(img)
    for it in range(int(niter)):
        next_active = np.zeros(img.shape, dtype=bool)
        n, g = _detect_pass(
            img,
            var,
            bad,
            float(sigclip),
            float(sigfrac),
            float(objlim),
            psf_rf,
            psf_rf_diag,
            float(psf_nsigma),
            crmask,
            active,
            it > 0,
            memo,
            gens,
            g,
            lp,
            next_active,
        )
        if n == 0:
            break
        # next pass: only pixels within _ACTIVE_R of this pass's new CR pixels can change verdict
        active = next_active
        # repair in place: donors are never CR or bad pixels, so they still hold input values
        repair_pixels(img, crmask, bad, 2)
        repair_pixels(var, crmask, bad, 2)
        if it + 1 < int(niter):
            _update_laplacian(img, lp, crmask)
    if grow_sigma and crmask.any():
        _grow_tracks(
            img,
            var,
            bad,
            crmask,
            float(grow_sigma),
            float(grow_objlim),
            int(grow_iter),
            psf_rf,
            psf_rf_diag,
            float(psf_nsigma),
        )
    return CosmicRayResult(
        mask=crmask,
        image=img,
        variance=var,
        n_pixels=int(crmask.sum()),
        psf_ratio=ratio if use_psf else float("nan"),
    )
