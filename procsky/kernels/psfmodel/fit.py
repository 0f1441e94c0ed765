"""Fitting a pixelised, spatially varying PSF model to stars (:func:`fit_psf_model`)."""

from __future__ import annotations

import math

import numpy as np

from .model import _BAD, PsfModelArrays, _basis, _warp_flux_var, poly_terms
from .render import render_psf, stamp_moments
from .solve import _fit_coeffs, _star_fit
from .stamps import _extract_stamps, _extract_stamps_fourier, _floored_weights
from .validate import cross_validated_flux_scatter
from .warp import _warp_flux_cov

__all__ = ["fit_psf_model"]


def _clipped_mean(v: np.ndarray, nsigma: float = 5.0) -> tuple[float, float]:
    """Mean of ``v`` clipped at ``nsigma`` standard deviations about the median (iterated) and its error."""
    for _ in range(10):
        if v.size < 5:
            return float("nan"), float("nan")
        med, sd = np.median(v), v.std()
        keep = np.abs(v - med) <= nsigma * sd
        if keep.all():
            break
        v = v[keep]
    return float(v.mean()), float(v.std() / math.sqrt(v.size))


def _ring_sky(data: np.ndarray, wts: np.ndarray, usable: np.ndarray, width: int) -> np.ndarray:
    """Each star's level besides its own light, from the outer ring of its stamp (the ``width`` outermost
    samples in radius, corners included): ``L_k = c_k + p F_k``, the star's own wing there being a fixed
    fraction ``p`` of its flux ``F_k`` (the stamp sum) and the local level ``c_k`` (unresolved light over
    the background estimate) independent of it. ``p`` is the slope of a weighted straight-line fit of the
    rings' clipped means against the fluxes (clipped at 4 sigma; not below 0), and ``c_k = L_k - p F_k``,
    each star's own sky as DAOPHOT's PSF stars have theirs (Stetson 1987), with the star's wing taken
    out by the fit instead of by going far from it. 0 where it cannot be measured, or for all stars with
    fewer than 5 usable ones."""
    n, m, _ = data.shape
    hm = m // 2
    yy, xx = np.mgrid[-hm : hm + 1, -hm : hm + 1]
    ring = np.hypot(xx, yy) >= hm - width + 0.5
    lev = np.full(n, np.nan)
    err = np.full(n, np.nan)
    for k in np.flatnonzero(usable):
        lev[k], err[k] = _clipped_mean(data[k][ring & (wts[k] > 0)])
    flux = data.sum(axis=(1, 2))
    ok = usable & np.isfinite(lev) & np.isfinite(err) & (err > 0) & (flux > 0)
    sky = np.zeros(n)
    if ok.sum() < 5:
        return sky
    slope = 0.0
    for _ in range(5):
        w = 1.0 / err[ok] ** 2
        a = np.column_stack([np.ones(ok.sum()), flux[ok]]) * np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(a, lev[ok] * np.sqrt(w), rcond=None)[0]
        slope = max(float(coef[1]), 0.0)
        pull = (lev - coef[0] - slope * flux) / err
        keep = ok & (np.abs(pull) <= 4.0)
        if keep.sum() < 5 or keep.sum() == ok.sum():
            break
        ok = keep
    fin = usable & np.isfinite(lev)
    sky[fin] = lev[fin] - slope * flux[fin]
    return sky


def fit_psf_model(
    image,
    variance,
    mask,
    x,
    y,
    *,
    stamp_size=25,
    order=2,
    oversample=1,
    reserve_fraction=0.2,
    n_iter=3,
    clip=4.0,
    seed=0,
    bad_bits=_BAD,
    zero_bits=0,
    min_stars=None,
    cv_radius_fwhm=1.3,
    accuracy=0.01,
    warp_order=-1,
    warp_prior=0.0,
    local_sky=False,
):
    """Fit a pixelised, spatially varying PSF model to stars.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Background-subtracted image, counts.
    variance : ndarray (ny, nx) float
        Variance, counts^2.
    mask : ndarray (ny, nx) uint32 or None
    x, y : array (n,), pixels
        Accurate (sub-pixel) centroids of the selected PSF stars.
    stamp_size : int
        Odd size of the rendered PSF image, pixels (the model grid has
        ``stamp_size * oversample`` samples, made odd).
    order : int
        Polynomial order of the spatial variation (0-3).
    oversample : int
        Model samples per pixel (1 for well-sampled PSFs, FWHM >~ 2.5 px).
    reserve_fraction : float
        Fraction of stars held back for validation (at random among all but the brightest tenth).
    n_iter : int
        Fit / re-measure / reject iterations.
    clip : float
        Stars whose chi^2 exceeds ``median + clip * 1.4826 * MAD`` are rejected.
    seed : int
        Seed of the reserve selection.
    bad_bits : int
        Stars with such pixels in their cutout are not used.
    zero_bits : int
        Pixels with these bits (repaired cosmic rays) get zero weight; the star is used.
    min_stars : int, optional
        Minimum number of fitted stars (default ``2 n_coeff + 3``).
    cv_radius_fwhm : float
        Aperture radius, in model FWHM, of the cross-validated PSF-flux check
        (:func:`cross_validated_flux_scatter`, result in ``flux_sys``); 0 skips it.
    accuracy : float
        Relative accuracy floor of a star pixel in the fit, as PSFEx's ``PSF_ACCURACY``
        (Bertin 2011; same default): the fit weight is ``1 / (V + (accuracy I)^2)``. Without
        it a star 100x brighter than the rest outweighs them 10^4 to 1, and the polynomial
        follows that one star (with an order >= 2 it can leave the model without a defined
        FWHM where the other stars are). The noise of the cross-validation ratios keeps the plain variance.
    warp_order : int
        Order of a size-and-shear warp of the pixel model (:func:`warp_images`,
        :func:`_solve_warp`), fitted to the residuals of the order-``order`` pixel polynomial;
        -1 for none. The result is folded into a pixel polynomial of order
        ``max(order, warp_order)``, so it renders like any other model.
    local_sky : bool
        Subtract from each star's stamp its local level besides its own light (:func:`_ring_sky`:
        unresolved fainter stars over a mode background in a crowded field). Otherwise that level
        enters the model as a pedestal normalised with the core, which then lacks that fraction of
        the light (PSF fluxes high by it, the neighbours' models too wide where they are subtracted).

    Returns
    -------
    PsfModelArrays
    used : ndarray (n,) bool
        Stars used in the final fit.
    reserved : ndarray (n,) bool
        Stars held back.

    Raises
    ------
    ValueError
        Too few usable stars (the caller turns this into ``AlgorithmError``).
    """
    if stamp_size % 2 == 0 or stamp_size < 5:
        raise ValueError(f"stamp_size must be odd and >= 5 pixels, got {stamp_size}")
    if not 0 <= order <= 3:
        raise ValueError(f"order must be 0..3, got {order}")
    img = np.ascontiguousarray(image, dtype=np.float64)
    var = np.ascontiguousarray(np.broadcast_to(np.asarray(variance, dtype=np.float64), img.shape))
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.ascontiguousarray(mask, dtype=np.uint32)
    xs = np.asarray(x, np.float64)
    ys = np.asarray(y, np.float64)
    n = xs.size
    m = stamp_size * oversample
    if m % 2 == 0:
        m += 1
    nc = poly_terms(order)[0].size
    if min_stars is None:
        min_stars = 2 * nc + 3
    ny, nx = img.shape
    xc, yc = 0.5 * (nx - 1), 0.5 * (ny - 1)
    xsc, ysc = max(0.5 * nx, 1.0), max(0.5 * ny, 1.0)
    u = (xs - xc) / xsc
    v = (ys - yc) / ysc
    basis = _basis(u, v, order)
    warp_order = int(warp_order)
    basis_w = _basis(u, v, warp_order) if warp_order >= 0 else None
    order_tot = max(order, warp_order)
    basis_tot = _basis(u, v, order_tot)
    data, wts, usable = _extract_stamps(
        img, var, msk, xs, ys, m, oversample, int(bad_bits), oversample != 1, int(zero_bits)
    )
    if oversample == 1 and n:
        data = _extract_stamps_fourier(
            img, xs, ys, m, usable, (msk & np.uint32(zero_bits)) != 0 if zero_bits and msk is not None else None
        )
    # the stamps the cross-validation measures (its aperture/PSF ratios: the noise of a level taken from a
    # stamp's ring would add to them, not to any PSF flux measured on the image)
    data_cv = data
    if local_sky and n:
        data = data - _ring_sky(data, wts, usable, max(2, 2 * oversample))[:, None, None]
    fwts = _floored_weights(data, wts, accuracy) if n else wts
    rng = np.random.default_rng(seed)
    reserved = np.zeros(n, bool)
    cand = np.flatnonzero(usable)
    nres = int(round(reserve_fraction * cand.size))
    if cand.size - nres < min_stars:
        nres = max(0, cand.size - min_stars)
    if nres > 0:
        # the brightest tenth (at least the brightest star) is never held back: with few stars a
        # random reserve could take the one star that sets the wings, leaving a model of the
        # faint stars whose wing errors the cosmic-ray tests then "clean" off the bright stars.
        # Not more: the held-back stars validate the model, and fainter ones measure dT/T with
        # more noise
        bright = data[cand].sum(axis=(1, 2))
        pool = cand[np.argsort(-bright, kind="stable")][int(math.ceil(cand.size / 10)) :]
        if pool.size < nres:
            pool = cand
        reserved[rng.choice(pool, nres, replace=False)] = True
    use = usable & ~reserved
    if use.sum() < min_stars:
        raise ValueError(
            f"only {int(use.sum())} usable PSF stars (need >= {min_stars} for order {order}); "
            "lower order, min_snr or isolation_radius, or check the star selection"
        )
    # first flux estimate: sum over the resampled stamp, a zero-weight pixel (repaired cosmic
    # ray) taking the value of its point reflection about the centre where that one is weighted
    if zero_bits:
        refl = data[:, ::-1, ::-1]
        fill = (wts <= 0) & (wts[:, ::-1, ::-1] > 0)
        flux = np.where(fill, refl, data).sum(axis=(1, 2)) / oversample**2
    else:
        flux = data.sum(axis=(1, 2)) / oversample**2
    flux[~(flux > 0)] = np.nan
    use &= np.isfinite(flux)
    coeffs = None
    for it in range(max(1, n_iter)):
        # the constant term sums to 1 (flux scale)
        coeffs, winfo = _fit_coeffs(data, fwts, flux, use, basis, order, basis_w, warp_order, oversample, warp_prior)
        fl, chi2 = _star_fit(data, fwts, coeffs, basis_tot, usable)
        good = use & np.isfinite(fl) & (fl > 0)
        if it < n_iter - 1 and good.sum() > min_stars:
            c = chi2[good]
            med = np.median(c)
            mad = 1.4826 * np.median(np.abs(c - med))
            bad = good & (chi2 > med + clip * max(mad, 1e-3 * med))
            if good.sum() - bad.sum() >= min_stars:
                use = good & ~bad
            else:
                use = good
            flux = np.where(np.isfinite(fl) & (fl > 0), fl, flux)
    assert coeffs is not None, "the fit loop runs at least once"
    model = PsfModelArrays(
        coeffs=coeffs,
        order=int(order_tot),
        x_center=float(xc),
        y_center=float(yc),
        x_scale=float(xsc),
        y_scale=float(ysc),
        oversample=int(oversample),
        stamp_size=int(stamp_size),
        fwhm=np.nan,
        n_stars=int(use.sum()),
        n_reserved=int(reserved.sum()),
        reserved_dT_median=np.nan,
        reserved_dT_std=np.nan,
    )
    centre = render_psf(model, xc, yc)
    fwhm = stamp_moments(centre)[3]
    dt_list: list[float] = []
    for k in np.flatnonzero(reserved & usable):
        h = 2 * stamp_size
        ix, iy = int(np.floor(xs[k] + 0.5)), int(np.floor(ys[k] + 0.5))
        y0, x0 = max(iy - h, 0), max(ix - h, 0)
        cut = img[y0 : iy + h + 1, x0 : ix + h + 1]
        ts = stamp_moments(cut, xs[k] - x0, ys[k] - y0)
        st = render_psf(model, xs[k], ys[k], size=2 * stamp_size + 1)
        tm = stamp_moments(st, stamp_size + xs[k] - ix, stamp_size + ys[k] - iy)
        if np.isfinite(ts[0]) and np.isfinite(tm[0]):
            tstar = ts[0] + ts[1]
            dt_list.append((tstar - (tm[0] + tm[1])) / tstar)
    dT = np.asarray(dt_list)
    # Warp terms (basis_w) exist iff warp_order >= 0, and so does a fit's warp information.
    n_warp = basis_w.shape[1] if basis_w is not None else 0
    cov_w = _warp_flux_cov(winfo, n_warp) if winfo is not None else None

    def refit(sub):
        ck, info = _fit_coeffs(data, fwts, flux, sub, basis, order, basis_w, warp_order, 1, warp_prior)
        return ck, (_warp_flux_var(_warp_flux_cov(info, n_warp), basis_w) if info is not None else None)

    flux_sys, cv_ratio = float("nan"), np.zeros(0)
    if oversample == 1 and np.isfinite(fwhm) and cv_radius_fwhm > 0:
        flux_sys, cv_ratio, _ = cross_validated_flux_scatter(
            data_cv,
            wts,
            np.where(use, flux, 1.0),
            use & usable,
            basis_tot,
            coeffs,
            reserved & usable,
            cv_radius_fwhm * fwhm,
            fit_wts=fwts,
            refit=refit,
            model_var=_warp_flux_var(cov_w, basis_w) if cov_w is not None else None,
        )
        cv_ratio = cv_ratio[np.isfinite(cv_ratio)]
    model = model._replace(
        flux_sys=float(flux_sys),
        cv_flux_ratio=tuple(float(v) for v in cv_ratio),
        fwhm=float(fwhm),
        reserved_dT_median=float(np.median(dT)) if dT.size else np.nan,
        reserved_dT_std=float(np.std(dT)) if dT.size > 1 else np.nan,
        reserved_dT=tuple(float(v) for v in dT),
    )
    if cov_w is not None:
        model = model._replace(warp_order=warp_order, warp_flux_cov=tuple(float(v) for v in cov_w.ravel()))
    return model, use, reserved
