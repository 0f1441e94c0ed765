"""A super-sampled PSF model of undersampled stars (:func:`fit_supersampled_psf`).

PSFEx's approach to undersampled data (Bertin 2011, "Automated Morphometry with SExtractor and
PSFEx", section on super-resolution): the model is the effective (pixel-convolved) PSF sampled
on a grid ``oversample`` times finer than the pixels, and a star's pixel values are that grid
interpolated (Lanczos-3, in grid units) at the pixel centres relative to the star's sub-pixel
centre, times its flux. The grid is the linear least-squares solution over all stars' pixels at
once, so that stars at different pixel phases fill in the sub-pixel structure that no single
undersampled star shows (resampling each star onto the fine grid first, as for well-sampled
stars, only interpolates what its pixels alias). Each model sample is a polynomial in detector
position. The stars' first centres come from a fit of a pixel-integrated Gaussian
(:func:`gaussian_centroids`; a windowed centroid is biased towards the pixel centre when
undersampled), then their fluxes and centres are re-fitted with the model and the model solved
again; outlier stars are rejected on their chi^2.

Two terms keep the solution defined with tens rather than thousands of stars: a small ridge
towards the effective PSF of the stars' Gaussian, and the constraint that the model has no power
at whole cycles per pixel (:func:`_pixel_null_penalty`), which the pixel box guarantees for any
effective PSF (Anderson & King 2000) and which the stars constrain only through their spread of
pixel phases.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .model import _BAD, PsfModelArrays, _basis, _eval_grid, poly_terms
from .render import _render
from .sampling import _lanczos3 as _l3
from .validate import excess_scatter

__all__ = ["fit_supersampled_psf", "gaussian_centroids", "pixel_gaussian_widths"]


@numba.njit(nogil=True, cache=True)
def _axis_weights(g, idx, w):
    """Normalised Lanczos-3 weights of grid samples ``idx`` at grid coordinate ``g``."""
    f = int(math.floor(g))
    s = 0.0
    for i in range(6):
        idx[i] = f - 2 + i
        w[i] = _l3(g - idx[i])
        s += w[i]
    for i in range(6):
        w[i] /= s


@numba.njit(nogil=True, cache=True)
def _normal_equations(cuts, wts, dxs, dys, flux, use, basis, oversample, m):
    """Normal matrix and vector of the super-sampled model over all stars' pixels.

    Unknown ``c * m * m + b * m + a`` is sample (b, a) of polynomial term c."""
    n, s, _ = cuts.shape
    nc = basis.shape[1]
    p = nc * m * m
    ata = np.zeros((p, p))
    atb = np.zeros(p)
    h = s // 2
    hm = m // 2
    ix = np.empty(6, np.int64)
    iy = np.empty(6, np.int64)
    wx = np.empty(6)
    wy = np.empty(6)
    row = np.empty(36 * nc)
    col = np.empty(36 * nc, np.int64)
    for k in range(n):
        if not use[k]:
            continue
        f = flux[k]
        for j in range(s):
            _axis_weights(hm + (j - h - dys[k]) * oversample, iy, wy)
            for i in range(s):
                w = wts[k, j, i]
                if w <= 0.0:
                    continue
                _axis_weights(hm + (i - h - dxs[k]) * oversample, ix, wx)
                nr = 0
                for c in range(nc):
                    bc = basis[k, c] * f
                    for jj in range(6):
                        if iy[jj] < 0 or iy[jj] >= m:
                            continue
                        for ii in range(6):
                            if ix[ii] < 0 or ix[ii] >= m:
                                continue
                            row[nr] = bc * wy[jj] * wx[ii]
                            col[nr] = c * m * m + iy[jj] * m + ix[ii]
                            nr += 1
                d = cuts[k, j, i]
                for a in range(nr):
                    ra = w * row[a]
                    atb[col[a]] += ra * d
                    for b in range(nr):
                        ata[col[a], col[b]] += ra * row[b]
    return ata, atb


def _pixel_null_penalty(m, oversample):
    """``C^T C`` for the constraints that the model (m x m samples, ``oversample`` per pixel) has no power
    at spatial frequencies of whole cycles per pixel along x (every row) and y (every column).

    The effective PSF is the optical PSF convolved with the pixel box, whose transform
    ``sinc(f_x) sinc(f_y)`` vanishes at every whole number of cycles per pixel; sampled on the
    model grid, every row's (column's) Fourier component at 1 .. oversample // 2 cycles per pixel
    is therefore zero (the aliases sit on zeros too). The stars constrain exactly these patterns
    (at 1 cycle per pixel and an oversampling of 2: a row alternating in sign) only through the
    spread of their pixel phases, so with a few tens of stars they are noise that makes PSF
    fluxes depend on the phase (the effective PSF: Anderson & King 2000, PASP 112, 1360)."""
    t = (np.arange(m) - m // 2) / oversample
    rows = []
    for f in range(1, oversample // 2 + 1):
        for fn in (np.cos, np.sin):
            v = fn(2.0 * np.pi * f * t)
            if np.abs(v).max() > 1e-9:
                rows.append(v / np.sqrt((v * v).sum()))
    ctc = np.zeros((m * m, m * m))
    eye = np.eye(m)
    for v in rows:
        vv = np.outer(v, v)
        ctc += np.kron(eye, vv)  # along x within every row
        ctc += np.kron(vv, eye)  # along y within every column
    return ctc


def _cutouts(img, var, msk, xs, ys, size, bad_bits, zero_bits, accuracy):
    """Pixel cut-outs of side ``size`` about each star's nearest pixel, PSFEx-floored weights and usability."""
    n = xs.size
    h = size // 2
    ny, nx = img.shape
    cuts = np.zeros((n, size, size))
    wts = np.zeros((n, size, size))
    usable = np.zeros(n, bool)
    ix = np.floor(xs + 0.5).astype(np.int64)
    iy = np.floor(ys + 0.5).astype(np.int64)
    for k in range(n):
        if iy[k] - h < 0 or ix[k] - h < 0 or iy[k] + h >= ny or ix[k] + h >= nx:
            continue
        sl = (slice(iy[k] - h, iy[k] + h + 1), slice(ix[k] - h, ix[k] + h + 1))
        mk = msk[sl]
        if (mk & np.uint32(bad_bits)).any():
            continue
        v = var[sl]
        cuts[k] = img[sl]
        ok = (v > 0) & ((mk & np.uint32(zero_bits)) == 0)
        w = np.where(ok, 1.0 / np.where(v > 0, v, 1.0), 0.0)
        if accuracy > 0:
            w = np.where(
                ok,
                1.0 / (np.where(ok, 1.0 / np.where(w > 0, w, 1.0), 1.0) + (accuracy * np.maximum(cuts[k], 0)) ** 2),
                0.0,
            )
        wts[k] = w
        usable[k] = ok.sum() > 0.5 * size * size
    return cuts, wts, usable, ix, iy


def _box_gauss(t, x, s):
    """A unit Gaussian of centre ``x`` and width ``s`` integrated over unit pixels centred at ``t``,
    and its derivatives in ``x`` and ``s`` (arrays broadcast over stars x pixels)."""
    from scipy.special import erf

    r2 = math.sqrt(2.0)
    a, b = (t - 0.5 - x) / s, (t + 0.5 - x) / s
    ga, gb = np.exp(-0.5 * a * a), np.exp(-0.5 * b * b)
    c = 1.0 / math.sqrt(2.0 * math.pi)
    val = 0.5 * (erf(b / r2) - erf(a / r2))
    d_x = -c * (gb - ga) / s
    d_s = -c * (gb * b - ga * a) / s
    return val, d_x, d_s


def _fit_pixel_gaussians(cuts, wts, dx, dy, sigma, n_iter=8):
    """Fit of a pixel-integrated round Gaussian (flux, x, y, width; Gauss-Newton) to each cut-out.

    Returns the centres ``x, y`` relative to the cut-outs' centre pixels, the widths ``sigma`` (pixels)
    and ``ok`` (finite, moved less than 0.5 px); ``sigma`` may be a scalar or one first width per star."""
    n, s, _ = cuts.shape
    t = np.arange(s, dtype=np.float64) - s // 2
    x = np.array(dx, np.float64)
    y = np.array(dy, np.float64)
    sg = np.array(np.broadcast_to(np.asarray(sigma, np.float64), (n,)))
    f = np.maximum(cuts.sum(axis=(1, 2)), 1e-30)
    for _ in range(n_iter):
        bx, bxx, bxs = _box_gauss(t[None, :], x[:, None], sg[:, None])
        by, byy, bys = _box_gauss(t[None, :], y[:, None], sg[:, None])
        m = by[:, :, None] * bx[:, None, :]
        jac = np.stack(
            [
                m,
                f[:, None, None] * by[:, :, None] * bxx[:, None, :],
                f[:, None, None] * byy[:, :, None] * bx[:, None, :],
                f[:, None, None] * (bys[:, :, None] * bx[:, None, :] + by[:, :, None] * bxs[:, None, :]),
            ],
            axis=-1,
        ).reshape(n, s * s, 4)
        r = (cuts - f[:, None, None] * m).reshape(n, s * s)
        w = wts.reshape(n, s * s)
        jw = jac * w[:, :, None]
        a = np.einsum("npi,npj->nij", jw, jac) + 1e-9 * np.eye(4)[None]
        g = np.einsum("npi,np->ni", jw, r)
        try:
            step = np.linalg.solve(a, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        step[:, 1:3] = np.clip(step[:, 1:3], -0.3, 0.3)
        f = np.maximum(f + step[:, 0], 1e-30)
        x += step[:, 1]
        y += step[:, 2]
        sg = np.clip(sg + np.clip(step[:, 3], -0.3 * sg, 0.3 * sg), 0.2, 5.0)
    ok = np.isfinite(x) & np.isfinite(y) & (np.abs(x - dx) < 0.5) & (np.abs(y - dy) < 0.5) & np.isfinite(sg)
    return x, y, sg, ok


def gaussian_centroids(cuts, wts, dx, dy, sigma, n_iter=8):
    """Centres of stars by a fit of a pixel-integrated round Gaussian (flux, x, y, width; Gauss-Newton).

    The centres of undersampled stars from a Gaussian-weighted (windowed) centroid are pulled towards
    the pixel centre (by ~0.035 px times the sine of the phase at a FWHM of 1.7 px); a super-sampled
    model fitted to such centres is widened, and fitting the centres with that model converges only
    slowly to the truth. A model integrated over the pixels is not biased that way (for a symmetric
    PSF, to first order in the PSF's difference from the Gaussian).

    Parameters
    ----------
    cuts, wts : ndarray (n, s, s)
        Cut-outs centred on pixel (ix, iy) of each star and their weights.
    dx, dy : ndarray (n,)
        First centres relative to (ix, iy), pixels.
    sigma : float
        First Gaussian width, pixels.

    Returns
    -------
    dx, dy : ndarray (n,)
        Fitted centres relative to (ix, iy); the first ones where a fit fails or moves more than 0.5 px.
    sigma : float
        Median fitted width, pixels (``sigma`` when no fit succeeds).
    """
    x, y, sg, ok = _fit_pixel_gaussians(cuts, wts, dx, dy, sigma, n_iter)
    return np.where(ok, x, dx), np.where(ok, y, dy), float(np.median(sg[ok])) if ok.any() else float(sigma)


def pixel_gaussian_widths(image, variance, mask, x, y, sigma, *, size=7, bad_bits=_BAD, zero_bits=0):
    """Width (sigma, pixels) of a pixel-integrated round Gaussian fitted to each source: a size that does
    not depend on the pixel phase.

    When the PSF is undersampled, adaptive (Gaussian-weighted) moments of a star depend on where its
    centre falls in the pixel: at a FWHM of 1.6 px the ``T = Ixx + Iyy`` of a star centred on a pixel is
    ~25 % below that of one on a pixel corner, and the moments of many centred stars fail to converge
    at all. A stellar locus in such moments selects stars by pixel phase (on the ``undersampled`` regime's
    sharpest frame, none of 34 PSF stars lay within 0.25 px of a pixel centre), and a super-sampled
    model (Bertin 2011; Anderson & King 2000), which learns its sub-pixel structure from the spread of
    the stars' phases, is then wrong for centred stars. A model integrated over the pixels describes
    every phase alike.

    Parameters
    ----------
    image, variance, mask : ndarray (ny, nx)
        Background-subtracted image, its variance and mask.
    x, y : array (n,), pixels
        Source centres.
    sigma : float
        First width, pixels.
    size : int
        Odd side of the cut-outs, pixels.

    Returns
    -------
    ndarray (n,)
        The widths; NaN where the cut-out leaves the image, holds a ``bad_bits`` pixel or the fit fails.
    """
    img = np.ascontiguousarray(image, dtype=np.float64)
    var = np.ascontiguousarray(np.broadcast_to(np.asarray(variance, dtype=np.float64), img.shape))
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.ascontiguousarray(mask, dtype=np.uint32)
    xs = np.asarray(x, np.float64)
    ys = np.asarray(y, np.float64)
    out = np.full(xs.size, np.nan)
    if xs.size == 0:
        return out
    cuts, wts, usable, ix, iy = _cutouts(img, var, msk, xs, ys, int(size) | 1, int(bad_bits), int(zero_bits), 0.0)
    k = np.flatnonzero(usable)
    if k.size:
        _, _, sg, ok = _fit_pixel_gaussians(cuts[k], wts[k], (xs - ix)[k], (ys - iy)[k], sigma)
        ok &= (sg > 0.2) & (sg < 5.0)  # not stuck at the bounds of the step
        out[k[ok]] = sg[ok]
    return out


def _star_fits(model, cuts, wts, xs, ys, ix, iy, use, recentre):
    """Flux (and, with ``recentre``, a sub-pixel shift) of each star by a linear(ised) fit of the model.

    Returns flux, dx, dy, chi^2 per pixel."""
    n, s, _ = cuts.shape
    flux = np.full(n, np.nan)
    ddx = np.zeros(n)
    ddy = np.zeros(n)
    chi2 = np.full(n, np.nan)
    k = np.flatnonzero(use)
    if k.size == 0:
        return flux, ddx, ddy, chi2
    px, py = poly_terms(model.order)
    os_ = model.oversample
    e = 0.05
    for kk in k:
        # the model about the cut-out's centre pixel (ix, iy), the star at (x - ix, y - iy) from it
        grid = _eval_grid(
            model.coeffs, px, py, (xs[kk] - model.x_center) / model.x_scale, (ys[kk] - model.y_center) / model.y_scale
        )
        dx, dy = xs[kk] - ix[kk], ys[kk] - iy[kk]
        w = wts[kk].ravel()
        d = cuts[kk].ravel()
        cols = [_render(grid, os_, s, dx, dy).ravel()]
        if recentre:
            cols.append(((_render(grid, os_, s, dx + e, dy) - _render(grid, os_, s, dx - e, dy)) / (2 * e)).ravel())
            cols.append(((_render(grid, os_, s, dx, dy + e) - _render(grid, os_, s, dx, dy - e)) / (2 * e)).ravel())
        a = np.column_stack(cols)
        aw = a * w[:, None]
        try:
            sol = np.linalg.solve(a.T @ aw, aw.T @ d)
        except np.linalg.LinAlgError:
            continue
        r = d - a @ sol
        flux[kk] = sol[0]
        if recentre and sol[0] > 0:
            ddx[kk] = np.clip(sol[1] / sol[0], -0.3, 0.3)
            ddy[kk] = np.clip(sol[2] / sol[0], -0.3, 0.3)
        npx = int((w > 0).sum())
        chi2[kk] = float((w * r * r).sum()) / max(npx - a.shape[1], 1)
    return flux, ddx, ddy, chi2


def _solve(ata, atb, prior, ridge, nulls, pixel_nulls, nc, m, os_):
    """The model's samples from its normal equations, with the ridge towards ``prior`` and the
    no-power-at-whole-cycles-per-pixel constraint (:func:`fit_supersampled_psf`), normalised."""
    ata = ata.copy()
    atb = atb.copy()
    # a ridge relative to each sample's own weight (the floored star weights make the faint
    # wings weigh as much as the core), plus a tiny absolute one for samples no star reaches
    diag = np.diag(ata).copy()
    lam = ridge * diag + 1e-9 * (float(diag.max()) if diag.size and diag.max() > 0 else 1.0)
    ata[np.diag_indices_from(ata)] += lam
    atb += lam * prior.ravel()
    if nulls is not None:
        lc = pixel_nulls * float(diag.max() if diag.size and diag.max() > 0 else 1.0)
        for c in range(nc):
            blk = slice(c * m * m, (c + 1) * m * m)
            ata[blk, blk] += lc * nulls
    try:
        sol = np.linalg.solve(ata, atb)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(ata, atb, rcond=None)[0]
    coeffs = sol.reshape(nc, m, m)
    norm = coeffs[0].sum() / os_**2
    return coeffs / norm if norm != 0 else coeffs


def _model_stamp(model, coeffs, x, y, ix, iy, size):
    """The normalised model of samples ``coeffs`` (else the model's) at star (x, y), on the ``size`` cut-out
    centred on pixel (ix, iy)."""
    px, py = poly_terms(model.order)
    grid = _eval_grid(
        model.coeffs if coeffs is None else coeffs,
        px,
        py,
        (x - model.x_center) / model.x_scale,
        (y - model.y_center) / model.y_scale,
    )
    return _render(grid, model.oversample, size, x - ix, y - iy)


def _cross_validate(
    model,
    solve_without,
    cuts,
    noise_wts,
    fit_wts,
    flux,
    xs,
    ys,
    ix,
    iy,
    use,
    reserved,
    basis,
    radius,
    max_folds,
    seed,
    max_leverage=0.5,
):
    """Cross-validated PSF-flux ratios of the stars (as :func:`cross_validated_flux_scatter` for the
    pixel-level model): the fitted stars in ``max_folds`` folds, each fold's ratios with the model solved
    without it (``solve_without(fold mask)``), the held-back stars with the full model. A ratio is the
    aperture flux within ``radius`` of the star's centre over the PSF flux times the model's own aperture
    fraction (:func:`validate._cv_ratio_one`), 1 within the noise for a right model at any pixel phase.
    Stars with a leverage above ``max_leverage`` in the fit are left out (without them the model is
    another one). Returns ratios and errors (n,), NaN where not measured."""
    from ..measure import aperture_weights
    from .validate import _cv_ratio_one

    n, s, _ = cuts.shape
    h = s // 2
    ratios = np.full(n, np.nan)
    errors = np.full(n, np.nan)
    fit_idx = np.flatnonzero(use)
    nf = min(fit_idx.size, int(max_folds))
    fold = np.full(n, -1)
    fold[fit_idx] = np.random.default_rng(seed).permutation(fit_idx.size) % max(nf, 1)
    r = float(min(radius, h - 0.5))

    def ratio(k, coeffs):
        mod = _model_stamp(model, coeffs, xs[k], ys[k], ix[k], iy[k], s)
        apw = aperture_weights((s, s), h + xs[k] - ix[k], h + ys[k] - iy[k], r)
        return _cv_ratio_one(cuts[k], noise_wts[k], mod, apw)

    for f in range(nf):
        out = fold == f
        ck = solve_without(out)
        for k in np.flatnonzero(out):
            ratios[k], errors[k] = ratio(k, ck)
    for k in np.flatnonzero(reserved):
        ratios[k], errors[k] = ratio(k, None)
    # leverage of each fitted star in the model (its share of the solution at its own position)
    w_star = np.zeros(n)
    for k in fit_idx:
        p = _model_stamp(model, None, xs[k], ys[k], ix[k], iy[k], s)
        w_star[k] = flux[k] ** 2 * float(np.sum(fit_wts[k] * p * p))
    b = basis[fit_idx]
    ainv = np.linalg.pinv((b * w_star[fit_idx, None]).T @ b)
    lev = np.zeros(n)
    lev[fit_idx] = w_star[fit_idx] * np.einsum("ij,jk,ik->i", b, ainv, b)
    ratios[lev > max_leverage] = np.nan
    return ratios, errors


def _reserved_dT(model, image, xs, ys, stars, stamp_size):
    """``(T_star - T_model) / T_star`` of adaptive moments at each held-back star (as :func:`fit_psf_model`)."""
    from .render import render_psf, stamp_moments

    out = []
    ny, nx = image.shape
    h = 2 * stamp_size
    for k in np.flatnonzero(stars):
        ix, iy = int(np.floor(xs[k] + 0.5)), int(np.floor(ys[k] + 0.5))
        y0, x0 = max(iy - h, 0), max(ix - h, 0)
        ts = stamp_moments(image[y0 : min(iy + h + 1, ny), x0 : min(ix + h + 1, nx)], xs[k] - x0, ys[k] - y0)
        st = render_psf(model, xs[k], ys[k], size=2 * stamp_size + 1)
        tm = stamp_moments(st, stamp_size + xs[k] - ix, stamp_size + ys[k] - iy)
        if np.isfinite(ts[0]) and np.isfinite(tm[0]):
            tstar = ts[0] + ts[1]
            out.append((tstar - (tm[0] + tm[1])) / tstar)
    return np.asarray(out)


def fit_supersampled_psf(
    image,
    variance,
    mask,
    x,
    y,
    *,
    oversample=2,
    fit_size=13,
    stamp_size=25,
    order=0,
    reserve_fraction=0.2,
    n_iter=3,
    clip=4.0,
    seed=0,
    bad_bits=_BAD,
    zero_bits=0,
    min_stars=None,
    accuracy=0.01,
    ridge=1e-3,
    pixel_nulls=10.0,
    centroid_sigma=0.0,
    cv_radius_fwhm=1.3,
    cv_folds=10,
):
    """Fit a super-sampled, spatially varying PSF model to undersampled stars (see the module).

    Parameters
    ----------
    image, variance, mask : ndarray (ny, nx)
        Background-subtracted image, its variance (counts^2) and mask.
    x, y : array (n,), pixels
        Sub-pixel centres of the PSF stars (refined with the model).
    oversample : int
        Model samples per pixel (2-3).
    fit_size : int
        Odd side of the pixel cut-out of each star that constrains the model, and of the
        model (``fit_size * oversample`` samples, made odd): the undersampled PSF's core and
        inner wings; beyond it the model is zero, and the aperture corrections carry the rest.
    stamp_size : int
        Odd side of the rendered PSF stamps, pixels.
    order : int
        Polynomial order of the spatial variation of each model sample (0-3).
    reserve_fraction, n_iter, clip, seed, bad_bits, zero_bits, min_stars, accuracy
        As :func:`fit_psf_model`.
    pixel_nulls : float
        Weight of the constraint that the model has no power at whole cycles per pixel
        (:func:`_pixel_null_penalty`), in units of the largest diagonal element of the normal
        matrix; 0 for none.
    centroid_sigma : float
        > 0: first centres from a fit of a pixel-integrated Gaussian of this first width (pixels;
        :func:`gaussian_centroids`) instead of the given ones (windowed centroids are biased
        towards the pixel centres when undersampled).
    ridge : float
        Tikhonov weight pulling each model sample towards the prior (the effective PSF of the
        stars' Gaussian with ``centroid_sigma``, else zero), relative to the sample's own diagonal
        of the normal matrix. The stars constrain a pattern alternating at the fine grid's
        Nyquist frequency only through their spread of pixel phases: with a few tens of stars it
        is noise that makes PSF fluxes depend on the phase, so fit this model to many stars
        (the caller's minimum, ``min_stars``).

    cv_radius_fwhm, cv_folds : float, int
        The model's PSF-flux error where it was not fitted (``flux_sys``, as :func:`fit_psf_model`'s):
        the fitted stars in ``cv_folds`` folds, each compared with the model solved without its fold
        (aperture of ``cv_radius_fwhm`` FWHM against the PSF flux, at the star's own sub-pixel centre),
        the held-back stars with the full model; the excess scatter beyond the noise
        (:func:`validate.excess_scatter`). 0 skips it.

    Returns
    -------
    PsfModelArrays, used (n,) bool, reserved (n,) bool, x (n,), y (n,)
        The model (with ``flux_sys``, ``cv_flux_ratio`` and the held-back stars' ``reserved_dT``), the
        stars used and held back, and the refined centres.

    Raises
    ------
    ValueError
        Too few usable stars.
    """
    if fit_size % 2 == 0 or fit_size < 5:
        raise ValueError(f"fit_size must be odd and >= 5 pixels, got {fit_size}")
    if not 0 <= order <= 3:
        raise ValueError(f"order must be 0..3, got {order}")
    img = np.ascontiguousarray(image, dtype=np.float64)
    var = np.ascontiguousarray(np.broadcast_to(np.asarray(variance, dtype=np.float64), img.shape))
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.ascontiguousarray(mask, dtype=np.uint32)
    xs = np.array(x, np.float64)
    ys = np.array(y, np.float64)
    n = xs.size
    os_ = int(oversample)
    m = fit_size * os_
    if m % 2 == 0:
        m += 1
    nc = poly_terms(order)[0].size
    if min_stars is None:
        min_stars = 2 * nc + 3
    ny, nx = img.shape
    xc, yc = 0.5 * (nx - 1), 0.5 * (ny - 1)
    xsc, ysc = max(0.5 * nx, 1.0), max(0.5 * ny, 1.0)
    basis = _basis((xs - xc) / xsc, (ys - yc) / ysc, order)
    cuts, wts, usable, ix, iy = _cutouts(img, var, msk, xs, ys, fit_size, int(bad_bits), int(zero_bits), accuracy)
    rng = np.random.default_rng(seed)
    reserved = np.zeros(n, bool)
    cand = np.flatnonzero(usable)
    nres = int(round(reserve_fraction * cand.size))
    if cand.size - nres < min_stars:
        nres = max(0, cand.size - min_stars)
    if nres > 0:
        bright = cuts[cand].sum(axis=(1, 2))
        pool = cand[np.argsort(-bright, kind="stable")][int(math.ceil(cand.size / 10)) :]
        reserved[rng.choice(pool if pool.size >= nres else cand, nres, replace=False)] = True
    use = usable & ~reserved
    if use.sum() < min_stars:
        raise ValueError(
            f"only {int(use.sum())} usable PSF stars (need >= {min_stars} for order {order}); "
            "lower order, min_snr or isolation_radius, or check the star selection"
        )
    flux = cuts.sum(axis=(1, 2))
    flux[~(flux > 0)] = np.nan
    sig_g = float(centroid_sigma) if centroid_sigma > 0 else 0.0
    if centroid_sigma > 0 and usable.any():
        gx, gy, sig_g = gaussian_centroids(
            cuts[usable], wts[usable], (xs - ix)[usable], (ys - iy)[usable], centroid_sigma
        )
        xs[usable] = ix[usable] + gx
        ys[usable] = iy[usable] + gy
    use &= np.isfinite(flux)
    # prior: the effective PSF of the stars' Gaussian (integrated over a pixel, sampled on the fine
    # grid) for the constant term, zero for the others; the ridge pulls towards it the samples the
    # stars' phases constrain poorly (few stars), and then towards the previous solution
    prior = np.zeros((nc, m, m))
    if sig_g > 0:
        tf = (np.arange(m) - m // 2) / os_
        g1 = _box_gauss(tf, 0.0, sig_g)[0]
        prior[0] = np.outer(g1, g1) / (g1.sum() ** 2) * os_**2
    coeffs = prior
    model = None
    nulls = _pixel_null_penalty(m, os_) if pixel_nulls > 0 and os_ > 1 else None
    for it in range(max(1, n_iter)):
        fit_flux = np.where(use, flux, 1.0)
        ata, atb = _normal_equations(cuts, wts, xs - ix, ys - iy, fit_flux, use, basis, os_, m)
        coeffs = _solve(ata, atb, prior, ridge, nulls, pixel_nulls, nc, m, os_)
        model = PsfModelArrays(
            coeffs=coeffs,
            order=int(order),
            x_center=float(xc),
            y_center=float(yc),
            x_scale=float(xsc),
            y_scale=float(ysc),
            oversample=os_,
            stamp_size=int(stamp_size),
            fwhm=np.nan,
            n_stars=int(use.sum()),
            n_reserved=int(reserved.sum()),
            reserved_dT_median=np.nan,
            reserved_dT_std=np.nan,
        )
        last = it == n_iter - 1
        fl, ddx, ddy, chi2 = _star_fits(model, cuts, wts, xs, ys, ix, iy, usable, not last)
        if not last:
            # the model fixes the centre only up to a common shift: keep the stars' mean centre
            good = use & np.isfinite(fl) & (fl > 0)
            if good.any():
                ddx[usable] -= np.median(ddx[good])
                ddy[usable] -= np.median(ddy[good])
            xs = np.where(usable, xs + ddx, xs)
            ys = np.where(usable, ys + ddy, ys)
            # a star that moved to another nearest pixel keeps its cut-out (its offset may exceed 0.5 px)
            flux = np.where(np.isfinite(fl) & (fl > 0), fl, flux)
            if good.sum() > min_stars:
                c = chi2[good]
                med = np.median(c)
                mad = 1.4826 * np.median(np.abs(c - med))
                bad = good & (chi2 > med + clip * max(mad, 1e-3 * med))
                use = good & ~bad if good.sum() - bad.sum() >= min_stars else good
    assert model is not None, "the fit loop runs at least once"
    fit_use = use
    model = model._replace(n_stars=int(use.sum()))
    # validation where the model was not fitted, as fit_psf_model does it for the pixel-level model:
    # moments at the held-back stars, and the cross-validated PSF-flux error (psf_flux_sys)
    dT = _reserved_dT(model, img, xs, ys, reserved & usable, int(stamp_size))
    flux_sys, cv = float("nan"), np.zeros(0)
    fwhm_g = sig_g * 2.3548200450309493 if sig_g > 0 else float(_reserved_fwhm(model, xc, yc))
    if cv_radius_fwhm > 0 and np.isfinite(fwhm_g) and fit_use.sum() > nc + 1:

        def solve_without(out):
            a_f, b_f = _normal_equations(cuts, wts, xs - ix, ys - iy, fit_flux, fit_use & out, basis, os_, m)
            return _solve(ata - a_f, atb - b_f, prior, ridge, nulls, pixel_nulls, nc, m, os_)

        wts0 = _cutouts(img, var, msk, xs, ys, fit_size, int(bad_bits), int(zero_bits), 0.0)[1]
        ratios, errors = _cross_validate(
            model,
            solve_without,
            cuts,
            wts0,
            wts,
            fit_flux,
            xs,
            ys,
            ix,
            iy,
            fit_use,
            reserved & usable,
            basis,
            cv_radius_fwhm * fwhm_g,
            cv_folds,
            seed,
        )
        ok = np.isfinite(ratios) & np.isfinite(errors) & (errors > 0)
        flux_sys = excess_scatter(ratios[ok], errors[ok])
        cv = ratios[ok]
    model = model._replace(
        flux_sys=float(flux_sys),
        cv_flux_ratio=tuple(float(v) for v in cv),
        reserved_dT_median=float(np.median(dT)) if dT.size else np.nan,
        reserved_dT_std=float(np.std(dT)) if dT.size > 1 else np.nan,
        reserved_dT=tuple(float(v) for v in dT),
    )
    return model, use, reserved, xs, ys


def _reserved_fwhm(model, x, y):
    """Gaussian-equivalent FWHM of the model's adaptive moments at (x, y) (NaN where they fail)."""
    from .render import render_psf, stamp_moments

    return stamp_moments(render_psf(model, x, y))[3]
