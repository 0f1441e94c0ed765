"""A low-order size-and-shear warp of the pixel model, fitted to its residuals.

One star constrains a warp by 3 numbers (its dilation and two shears, :func:`warp_images`)
where a pixel polynomial needs a full image per term, so a spatial model of size and shear
can be fitted from a handful of stars; the result is folded back into a pixel polynomial.
"""

from __future__ import annotations

import numpy as np

from .model import poly_terms

__all__ = ["warp_images"]


def _deriv4(a, axis):
    """Fourth-order central difference along ``axis`` (zero beyond the stamp)."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (2, 2)
    b = np.pad(a, pad)
    n = a.shape[axis]

    def sl(k):
        return np.take(b, np.arange(k, k + n), axis=axis)

    return (sl(0) - 8.0 * sl(1) + 8.0 * sl(3) - sl(4)) / 12.0


def warp_images(p0):
    """Images of the first-order change of a PSF image under a dilation and two shears.

    With ``P_A(r) = P(A^-1 r) / det A`` for ``A = 1 + a_s I + a_1 S_1 + a_2 S_2``
    (``S_1 = diag(1, -1)``, ``S_2`` the symmetric off-diagonal unit), ``P_A = P + a_s D_s +
    a_1 D_1 + a_2 D_2 + O(a^2)`` with ``D_s = -(2 P + r . grad P)``,
    ``D_1 = -(x dP/dx - y dP/dy)`` and ``D_2 = -(y dP/dx + x dP/dy)``. Each keeps the flux
    (sums to zero) and is even under ``r -> -r``, so none mimics a centroid shift.

    Parameters
    ----------
    p0 : ndarray (M, M)
        A centred PSF image (model grid).

    Returns
    -------
    ndarray (3, M, M)
    """
    m = p0.shape[0]
    g = np.arange(m, dtype=np.float64) - m // 2
    xx, yy = np.meshgrid(g, g)
    dx = _deriv4(p0, 1)
    dy = _deriv4(p0, 0)
    return np.stack([-(2.0 * p0 + xx * dx + yy * dy), -(xx * dx - yy * dy), -(yy * dx + xx * dy)])


def _warp_normal(data, wts, flux, use, basis, coeffs, dimg, local_sky=True):
    """Each star's normal equations ``(G_i, h_i)`` for the warp amplitudes at its position.

    The star's normalised residual ``data / F - P(x)`` against ``sum_k a_k D_k`` with
    weights ``wts F^2``; with ``local_sky`` a constant per star is fitted too and
    marginalised (Schur complement), so an error of the local background (which looks like
    a wide component, i.e. a dilation, on a faint star) does not enter.
    """
    k_n = dimg.shape[0]
    n = data.shape[0]
    g_all = np.zeros((n, k_n, k_n))
    h_all = np.zeros((n, k_n))
    flat = dimg.reshape(k_n, -1)
    if local_sky:
        flat = np.vstack([flat, np.ones((1, flat.shape[1]))])
    for i in np.flatnonzero(use):
        f = flux[i]
        p = np.tensordot(basis[i], coeffs, axes=1)
        w = (np.where(wts[i] > 0, wts[i], 0.0) * f * f).ravel()
        r = (data[i] / f - p).ravel()
        g = (flat * w) @ flat.T
        h = (flat * w) @ r
        if local_sky:
            if not g[-1, -1] > 0:
                continue
            h = h[:-1] - g[:-1, -1] * (h[-1] / g[-1, -1])
            g = g[:-1, :-1] - np.outer(g[:-1, -1], g[-1, :-1]) / g[-1, -1]
        g_all[i] = g
        h_all[i] = h
    return g_all, h_all


def _solve_warp_normal(g_all, h_all, basis_w, use, prior=0.0):
    """Warp polynomial coefficients ``(K, J)`` from the stars' normal equations, and the
    normal matrix (the coefficients' inverse covariance)."""
    k_n = g_all.shape[1]
    j_n = basis_w.shape[1]
    a = np.zeros((k_n * j_n, k_n * j_n))
    rhs = np.zeros(k_n * j_n)
    for i in np.flatnonzero(use):
        a += np.kron(g_all[i], np.outer(basis_w[i], basis_w[i]))
        rhs += np.kron(h_all[i], basis_w[i])
    a[np.diag_indices_from(a)] += 1e-9 * (1.0 + np.diag(a))
    if prior > 0:  # Gaussian prior of width ``prior`` on the non-constant terms
        pr = np.zeros((k_n, j_n))
        pr[:, 1:] = 1.0 / prior**2
        a[np.diag_indices_from(a)] += pr.ravel()
    return np.linalg.solve(a, rhs).reshape(k_n, j_n), a


def _solve_warp(data, wts, flux, use, basis, coeffs, basis_w, dimg, prior=0.0, clip=4.0, local_sky=True):
    """Polynomial coefficients of the warp amplitudes fitted to the residuals of a pixel model.

    Each star's normalised residual ``data / F - P(x)`` is fitted, with weights ``wts F^2``,
    by ``sum_k a_k(x) D_k`` where each amplitude ``a_k`` is a polynomial in the detector
    position (``basis_w``). One star constrains only the few numbers ``<D_k, residual>``:
    a low-order spatial model of size and shear from a handful of stars, where a pixel
    polynomial of the same order needs a full image per term.

    Stars are rejected one at a time while the worst leave-one-out chi^2 of a star's own
    amplitudes against the model without it (its noise and the prediction's, ``K`` degrees
    of freedom) exceeds the ``clip``-sigma equivalent: a compact galaxy among the PSF stars
    is wider than the PSF by more than its noise, and a few stars cannot outvote it.

    Returns
    -------
    cw : ndarray (K, J)
        Amplitude ``k``'s coefficient of warp term ``j``.
    a : ndarray (K J, K J)
        Normal matrix of the coefficients (inverse covariance; prior included).
    """
    from scipy.stats import chi2 as chi2_dist
    from scipy.stats import norm

    k_n = dimg.shape[0]
    g_all, h_all = _warp_normal(data, wts, flux, use, basis, coeffs, dimg, local_sky)
    keep = use & np.array([np.all(np.isfinite(g)) and np.linalg.det(g) > 0 for g in g_all])
    limit = float(chi2_dist.isf(2.0 * norm.sf(clip), k_n)) if clip > 0 else np.inf
    while True:
        cw, a = _solve_warp_normal(g_all, h_all, basis_w, keep, prior)
        idx = np.flatnonzero(keep)
        if clip <= 0 or idx.size <= basis_w.shape[1] + 1:
            return cw, a
        worst: int | np.integer = -1
        worst_c2 = limit
        rhs = cw.ravel() @ a  # the normal equations' right-hand side (a is symmetric)
        for i in idx:
            bi = np.kron(np.eye(k_n), basis_w[i][None, :])  # (K, K*J)
            a_i = a - np.kron(g_all[i], np.outer(basis_w[i], basis_w[i]))
            rhs_i = rhs - np.kron(h_all[i], basis_w[i])
            try:
                c_i = np.linalg.solve(a_i, rhs_i)
                cov_pred = bi @ np.linalg.solve(a_i, bi.T)
                own = np.linalg.inv(g_all[i])
            except np.linalg.LinAlgError:
                continue
            d = np.linalg.solve(g_all[i], h_all[i]) - bi @ c_i
            c2 = float(d @ np.linalg.solve(own + cov_pred, d))
            if c2 > worst_c2:
                worst, worst_c2 = i, c2
        if worst < 0:
            return cw, a
        keep[worst] = False


def _fold_warp(coeffs, order, cw, dimg, warp_order):
    """Pixel-polynomial coefficients (order ``max(order, warp_order)``) of pixel model + warp."""
    tot = max(order, warp_order)
    px, py = poly_terms(tot)
    where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(px, py))}
    out = np.zeros((px.size,) + coeffs.shape[1:])
    for i, (a, b) in enumerate(zip(*poly_terms(order))):
        out[where[int(a), int(b)]] += coeffs[i]
    for j, (a, b) in enumerate(zip(*poly_terms(warp_order))):
        out[where[int(a), int(b)]] += np.tensordot(cw[:, j], dimg, axes=1)
    return out


def _warp_flux_cov(winfo, j_n):
    """Covariance (J x J) of the polynomial coefficients of the fractional PSF-flux error that
    the warp's fitting noise makes: ``dF/F = -sum_k da_k <D_k, P> / <P, P>`` for warp
    amplitudes off by ``da`` (uniform weights: a faint source's case, within a few per cent
    of a bright one's)."""
    cpix, a_w, dimg = winfo
    p0 = cpix[0]
    sens = np.tensordot(dimg, p0, axes=2) / float(np.sum(p0 * p0))
    smap = np.kron(sens[None, :], np.eye(j_n))  # (J, K J)
    return smap @ np.linalg.inv(a_w) @ smap.T
