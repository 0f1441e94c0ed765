"""One solve of the model: per-pixel least squares over the stars (plus the warp), and star fluxes."""

from __future__ import annotations

import numba
import numpy as np

from .warp import _fold_warp, _solve_warp, warp_images

__all__ = []


@numba.njit(nogil=True, cache=True)
def _solve_pixels(data, wts, flux, use, basis):
    """Per-pixel weighted least squares of normalised star values on the spatial basis."""
    n, m, _ = data.shape
    nc = basis.shape[1]
    coeffs = np.zeros((nc, m, m))
    for j in range(m):
        for i in range(m):
            ata = np.zeros((nc, nc))
            atb = np.zeros(nc)
            for k in range(n):
                if not use[k]:
                    continue
                f = flux[k]
                w = wts[k, j, i] * f * f
                d = data[k, j, i] / f
                for a in range(nc):
                    ba = basis[k, a] * w
                    atb[a] += ba * d
                    for b in range(nc):
                        ata[a, b] += ba * basis[k, b]
            # tiny ridge keeps empty/degenerate pixels finite
            for a in range(nc):
                ata[a, a] += 1e-12 * (1.0 + ata[a, a])
            sol = np.linalg.solve(ata, atb)
            for a in range(nc):
                coeffs[a, j, i] = sol[a]
    return coeffs


def _fit_coeffs(data, fwts, flux, use, basis, order, basis_w=None, warp_order=-1, oversample=1, warp_prior=0.0):
    """One solve of the model: pixel polynomial, normalised, plus the warp if asked.

    Returns the folded coefficients and, with a warp, ``(pixel coefficients, warp normal
    matrix, warp images)`` (what :func:`_warp_flux_cov` needs).
    """
    flux = np.where(use, flux, 1.0)
    coeffs = _solve_pixels(data, fwts, flux, use, basis)
    norm = coeffs[0].sum() / oversample**2
    if norm != 0:
        coeffs /= norm
    if warp_order < 0:
        return coeffs, None
    dimg = warp_images(coeffs[0])
    cw, a = _solve_warp(data, fwts, flux, use, basis, coeffs, basis_w, dimg, warp_prior)
    return _fold_warp(coeffs, order, cw, dimg, warp_order), (coeffs, a, dimg)


@numba.njit(nogil=True, cache=True)
def _star_fit(data, wts, coeffs, basis, use):
    """Flux of each star by a linear fit of the model; chi^2 per degree of freedom."""
    n, m, _ = data.shape
    nc = basis.shape[1]
    flux = np.full(n, np.nan)
    chi2 = np.full(n, np.nan)
    for k in range(n):
        if not use[k]:
            continue
        mod = np.zeros((m, m))
        for c in range(nc):
            for j in range(m):
                for i in range(m):
                    mod[j, i] += basis[k, c] * coeffs[c, j, i]
        spi = 0.0
        spp = 0.0
        for j in range(m):
            for i in range(m):
                w = wts[k, j, i]
                spi += w * mod[j, i] * data[k, j, i]
                spp += w * mod[j, i] * mod[j, i]
        if spp <= 0:
            continue
        f = spi / spp
        c2 = 0.0
        npx = 0
        for j in range(m):
            for i in range(m):
                w = wts[k, j, i]
                if w > 0:
                    r = data[k, j, i] - f * mod[j, i]
                    c2 += w * r * r
                    npx += 1
        flux[k] = f
        chi2[k] = c2 / max(npx - 1, 1)
    return flux, chi2
