"""Detection-level cosmic rays: detections sharper than the PSF (:func:`find_sharp_sources`).

L.A.Cosmic (:mod:`.lacosmic`) judges pixels one at a time; a faint multi-pixel track whose
pixels are each a few sigma escapes it, while the matched filter of the detection step adds
them into a "source". Each detection is fitted with the PSF model at its position and its
pixels sharper than the PSF are removed; a detection with no PSF-shaped signal left was
the cosmic ray.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from .._bits import BAD, NO_DATA, SAT, bit
from ..measure import psf_fit_arrays
from .window import _window

__all__ = ["SharpSourceResult", "find_sharp_sources"]


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
    repair : ndarray (ny, nx) float32
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
def _sharp_sources_kernel(
    image,
    variance,
    mask,
    xs,
    ys,
    stamps,
    skip,
    h,
    bad_bits,
    z_min,
    excess_min,
    pixel_sigma,
    grow_sigma,
    nu_keep,
    max_iter,
    star_sigma,
    model_error,
    crpix,
    repair,
    out,
):
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
        # against the cut) is not cleaned: its core would be taken for a hit
        if on_star and (iy - h < 0 or iy + h >= ny or ix - h < 0 or ix + h >= nx):
            continue
        thr = star_sigma if on_star else pixel_sigma
        me2 = (model_error * a) ** 2 if on_star else 0.0
        # clean: pixels whose residual from the PSF fit is significant AND sharper than the
        # PSF (they stand above at least one pair of opposite neighbours' residuals, which
        # a residual broader than the PSF, e.g. a galaxy's wing, does not)
        for _it in range(max_iter):
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
                        if (
                            sharp[j, i]
                            or not ok[j, i]
                            or res[j, i] < grow_sigma * math.sqrt(v[j, i] + me2 * p[j, i] * p[j, i])
                        ):
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


def find_sharp_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    psf_stamps: np.ndarray,
    *,
    skip: np.ndarray | None = None,
    half_width: int | None = None,
    bad_bits: int = bit(BAD) | bit(SAT) | bit(NO_DATA),
    z_min: float = 3.0,
    excess_min: float = 0.5,
    pixel_sigma: float = 3.0,
    grow_sigma: float = 1.5,
    nu_keep: float = 5.0,
    max_iter: int = 3,
    star_sigma: float = 5.0,
    model_error: float = 0.05,
) -> SharpSourceResult:
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
    # float32 like the image the values go into (the same values once stored there), half the memory
    repair = np.full(img.shape, np.nan, dtype=np.float32)
    out = np.full((xs.size, 5), np.nan)
    out[:, 3:] = 0.0
    _sharp_sources_kernel(
        img,
        var,
        msk,
        xs,
        ys,
        st,
        sk,
        h,
        np.uint32(bad_bits),
        float(z_min),
        float(excess_min),
        float(pixel_sigma),
        float(grow_sigma),
        float(nu_keep),
        int(max_iter),
        float(star_sigma),
        float(model_error),
        crpix,
        repair,
        out,
    )
    return SharpSourceResult(
        is_cr=out[:, 4] > 0, cr_pixels=crpix, chi2_excess=out[:, 0], z=out[:, 1], nu_clean=out[:, 2], repair=repair
    )
