"""How good the model is where it was not fitted: cross-validated PSF-flux scatter.

Each fitted star is left out and the model refitted without it; the aperture-to-PSF flux
ratio of the left-out stars, beyond their noise (Paule & Mandel 1982), is the model's
fractional PSF-flux error at an arbitrary position. Stars that dominate the fit (high
leverage) are left out of that estimate.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .solve import _fit_coeffs

__all__ = ["cross_validated_flux_scatter", "excess_scatter"]


@numba.njit(nogil=True, cache=True)
def _cv_ratio_one(data, wts, mod, apw):
    """Aperture-to-PSF flux ratio of one centred star stamp against a model stamp.

    Returns ``(ratio, err)``: ``ratio = sum(a I) / (F sum(a P))`` with ``F`` the weighted PSF
    fit and ``a`` the aperture weights; ``err`` accounts for the correlation of the two
    fluxes (same photons): ``var = (sum(a^2 V) / A^2 - 1 / sum(P^2 / V)) / F^2``.
    """
    m = data.shape[0]
    spi = 0.0
    spp = 0.0
    ap = 0.0
    apv = 0.0
    amod = 0.0
    for j in range(m):
        for i in range(m):
            w = wts[j, i]
            a = apw[j, i]
            if w > 0:
                spi += w * mod[j, i] * data[j, i]
                spp += w * mod[j, i] * mod[j, i]
            if a > 0:
                if not (w > 0):
                    return np.nan, np.nan
                ap += a * data[j, i]
                apv += a * a / w
                amod += a * mod[j, i]
    if not (spp > 0) or not (amod > 0):
        return np.nan, np.nan
    f = spi / spp
    if not (f > 0):
        return np.nan, np.nan
    var = (apv / (amod * amod) - 1.0 / spp) / (f * f)
    if not (var > 0):
        return np.nan, np.nan
    return ap / (f * amod), math.sqrt(var)


def _fit_leverage(data, wts, use, basis, coeffs, reserved=None):
    """Leverage ``h_k`` of each star in the PSF model's spatial fit.

    Each star's weight is the inverse relative variance of its PSF flux ``F_k`` fitted with the
    full model ``P_k``, ``W_k = F_k^2 sum(w P_k^2)``; for a fitted star ``h_k = W_k b_k^T A^-1 b_k`` with
    ``A = sum_j W_j b_j b_j^T`` over the fitted stars, the share of the model at ``x_k`` that
    comes from star ``k`` itself (the ``h`` of the fitted stars sum to the number of terms).
    A held-back star gets the leverage it would have had in the fit, ``q / (1 + q)`` with
    ``q = W_k b_k^T A^-1 b_k``; other stars 0.
    """
    n = data.shape[0]
    lev = np.zeros(n)
    idx = np.flatnonzero(use)
    if idx.size == 0:
        return lev
    res = np.flatnonzero(reserved & ~use) if reserved is not None else np.zeros(0, np.int64)
    both = np.concatenate([idx, res])
    W = np.zeros(n)
    for k in both:
        p = np.tensordot(basis[k], coeffs, axes=1)
        w = np.where(wts[k] > 0, wts[k], 0.0)
        spp = float(np.sum(w * p * p))
        if spp > 0:
            W[k] = float(np.sum(w * p * data[k])) ** 2 / spp
    b = basis[idx]
    ainv = np.linalg.pinv((b * W[idx, None]).T @ b)
    lev[idx] = W[idx] * np.einsum("ij,jk,ik->i", b, ainv, b)
    if res.size:
        q = W[res] * np.einsum("ij,jk,ik->i", basis[res], ainv, basis[res])
        lev[res] = q / (1.0 + q)
    return lev


def cross_validated_flux_scatter(
    data,
    wts,
    flux,
    use,
    basis,
    coeffs,
    reserved,
    radius,
    clip=3.5,
    min_stars=5,
    max_folds=20,
    seed=0,
    max_leverage=0.5,
    fit_wts=None,
    refit=None,
    model_var=None,
):
    """PSF-flux error of a pixel model where it was not fitted, from the stars themselves.

    Every fitted star is left out in turn and the model refitted without it (the same
    per-pixel least squares as :func:`fit_psf_model`; with more than ``max_folds`` stars,
    ``max_folds``-fold cross-validation instead); held-back stars use the full model.
    On each star the aperture flux within ``radius`` (centred stamp) is compared with the
    left-out model's PSF flux times the model's own aperture fraction: with a correct
    model ``ratio = 1`` whatever the local PSF, within the (correlated) noise of the two
    fluxes; a model that is too wide/narrow/shifted there gives ``ratio - 1 ~ -`` its
    PSF-flux error. The excess scatter beyond the noise, ``tau`` (Paule & Mandel 1982
    estimator of the between-star variance, after a 3.5-sigma clip against the median and
    MAD, then against the fitted scatter), is the fractional PSF-flux
    error of the model at an arbitrary position (where every non-PSF source is measured).

    Parameters
    ----------
    data, wts : ndarray (n, M, M)
        Centred star stamps and their inverse-variance weights (model grid, oversample 1).
    flux : ndarray (n,)
        Star fluxes used as normalisation in the fit.
    use, reserved : ndarray (n,) bool
        Stars of the fit, stars held back.
    basis : ndarray (n, n_coeff)
    coeffs : ndarray (n_coeff, M, M)
        The full model (for the held-back stars).
    radius : float, pixels
        Aperture radius (about 3 PSF sigma: nearly the total flux, a few times the PSF's
        effective area of noise).
    clip : float
        Outlier clip (stars with an undetected neighbour or a cosmic ray), sigma. 3.5 rather
        than 5: a looser clip lets such stars inflate ``tau``, which makes the catalogue's
        PSF-flux errors too large (pulls below 1); 3 gives about the same as 3.5.
    min_stars : int
        Fewer measurable ratios: NaN.
    max_folds : int
        Number of refits at most.
    seed : int
        Seed of the fold assignment.
    max_leverage : float
        Fitted stars with a larger leverage (:func:`_fit_leverage`) are left out of the
        estimate: the model without them is not the model the catalogue is measured with.
    fit_wts : ndarray (n, M, M), optional
        Weights of the model fit, if not ``wts`` (:func:`fit_psf_model`'s accuracy floor).
    refit : callable, optional
        ``refit(use) -> (coeffs, var)`` fits the model (normalised, on ``basis``) to a subset
        of the stars; ``var`` (n,) or None is that model's own fractional PSF-flux variance
        from its fitting noise at every star (a warp's, :func:`model_flux_error`), added to
        the noise of the left-out stars' ratios, so that ``tau`` is the error beyond it.
        Default the plain pixel polynomial on ``basis``.
    model_var : ndarray (n,), optional
        The same for the full model at the held-back stars.

    Returns
    -------
    tau : float
        Fractional systematic PSF-flux error (0 when the scatter is within the noise; NaN
        with fewer than ``min_stars`` ratios).
    ratios, errors : ndarray
        Cross-validated ratios and their noise (NaN where not measurable).
    """
    n, m, _ = data.shape
    fw = wts if fit_wts is None else fit_wts
    hm = m // 2
    from ..measure import aperture_weights

    apw = aperture_weights((m, m), hm, hm, float(min(radius, hm - 0.5)))
    ratios = np.full(n, np.nan)
    errors = np.full(n, np.nan)
    # leave-one-out with up to max_folds fitted stars, else max_folds random folds (cost)
    if refit is None:

        def refit(sub):
            return _fit_coeffs(data, fw, flux, sub, basis, 0)

    fit_idx = np.flatnonzero(use)
    nf = min(fit_idx.size, int(max_folds))
    fold = np.full(n, -1)
    fold[fit_idx] = np.random.default_rng(seed).permutation(fit_idx.size) % max(nf, 1)
    for f in range(nf):
        out = fold == f
        sub = use & ~out
        if sub.sum() < basis.shape[1] + 1:
            continue
        ck, var_k = refit(sub)
        for k in np.flatnonzero(out):
            mod = np.tensordot(basis[k], ck, axes=1)
            ratios[k], errors[k] = _cv_ratio_one(data[k], wts[k], mod, apw)
            if var_k is not None:
                errors[k] = math.hypot(errors[k], ratios[k] * math.sqrt(var_k[k]))
    for k in np.flatnonzero(reserved & ~use):
        mod = np.tensordot(basis[k], coeffs, axes=1)
        ratios[k], errors[k] = _cv_ratio_one(data[k], wts[k], mod, apw)
        if model_var is not None:
            errors[k] = math.hypot(errors[k], ratios[k] * math.sqrt(model_var[k]))
    # A star that dominates the fit (leverage > max_leverage) is not a fair test: without
    # it the model is a different, much weaker one (e.g. the one bright star that sets the
    # wings), while every other source is measured with the model that includes it.
    lev = _fit_leverage(data, fw, use, basis, coeffs, reserved)
    ok = np.isfinite(ratios) & np.isfinite(errors) & (errors > 0) & ~(lev > max_leverage)
    r, e = ratios[ok], errors[ok]
    if r.size < min_stars:
        return float("nan"), ratios, errors
    return excess_scatter(r, e, clip, min_stars), ratios, errors


def excess_scatter(r, e, clip=3.5, min_stars=5):
    """Fractional scatter of ratios ``r`` (errors ``e``) beyond their noise: the Paule & Mandel (1982)
    between-star deviation over the weighted mean, after a clip at ``clip`` sigma against the median and
    MAD (stars with an undetected neighbour or a residual cosmic ray), then against the fitted scatter.
    NaN with fewer than ``min_stars`` ratios."""
    r = np.asarray(r, float)
    e = np.asarray(e, float)
    if r.size < min_stars:
        return float("nan")
    # robust start: stars with an undetected neighbour or a residual cosmic ray in the
    # aperture are far out; clip them against the median and MAD before the estimate
    med = np.median(r)
    mad = 1.4826 * np.median(np.abs(r - med))
    keep = np.abs(r - med) <= clip * np.maximum(mad, e)
    if keep.sum() < min_stars:
        keep = np.ones(r.size, bool)
    tau2 = 0.0
    mu = med
    for _ in range(10):
        tau2 = _paule_mandel(r[keep], e[keep])
        w = 1.0 / (e**2 + tau2)
        mu = np.sum(w[keep] * r[keep]) / np.sum(w[keep])
        # clip only: an outlier of the robust start is never taken back once tau has grown
        # (it would inflate tau, which would let it in, ...)
        new = keep & (np.abs(r - mu) <= clip * np.sqrt(e**2 + tau2))
        if new.sum() < min_stars or (new == keep).all():
            break
        keep = new
    return float(math.sqrt(tau2) / mu) if mu > 0 else float("nan")


def _paule_mandel(r, e, max_iter=100):
    """Between-point variance tau^2 with sum((r - mu)^2 / (e^2 + tau^2)) = n - 1."""
    n = r.size

    def q(t2):
        w = 1.0 / (e**2 + t2)
        mu = np.sum(w * r) / np.sum(w)
        return float(np.sum(w * (r - mu) ** 2))

    if n < 2 or q(0.0) <= n - 1:
        return 0.0
    lo, hi = 0.0, float(np.var(r)) + float(np.max(e)) ** 2
    while q(hi) > n - 1:
        hi *= 4.0
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if q(mid) > n - 1:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return 0.5 * (lo + hi)
