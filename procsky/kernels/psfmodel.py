"""Pixelised PSF model with polynomial spatial variation (PSFEx-like; Bertin 2011).

* **Star selection** (:func:`select_psf_stars`): bright (S/N above a limit), unflagged
  (saturated, edge, blended, interpolated, bad shape), isolated sources whose adaptive size
  ``T = ixx + iyy`` sits in the stellar locus, found as the densest narrow bin of log T
  among the bright sources (stars are the compact, tight cluster; galaxies are larger and
  spread out) and then sigma-clipped with the MAD.
* **Model** (:func:`fit_psf_model`): every star is resampled with a Lanczos-3 kernel onto
  the model grid centred on its sub-pixel centroid (optionally oversampled) and divided by
  its flux; each model pixel is a polynomial of order 0-3 in the normalised detector
  position, fitted by weighted linear least squares over the stars. The fit is iterated:
  star fluxes are re-measured with the current model (PSF fit) and outlier stars (large
  chi^2) are rejected.
* **Validation**: a fraction of the selected stars is held back; the adaptive moments of
  the model rendered at their positions are compared with theirs.
* **Result**: :class:`PsfModelArrays`, plain arrays (coefficient cube, order, centre and
  scale of the polynomial variables, oversampling, stamp size) for ``procsky.psf`` to wrap;
  :func:`render_psf` / :func:`render_stamps` draw the normalised PSF at any (x, y) with
  its sub-pixel shift.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ._bits import BAD, NO_DATA, SAT, bit
from .measure import adaptive_moments

__all__ = [
    "PsfModelArrays",
    "select_psf_stars",
    "fit_psf_model",
    "evaluate_model",
    "render_psf",
    "render_stamps",
    "stamp_moments",
    "lanczos_sample",
    "fourier_shift",
    "cross_validated_flux_scatter",
    "model_flux_error",
    "warp_images",
]

_BAD = bit(BAD) | bit(NO_DATA) | bit(SAT)


class PsfModelArrays(NamedTuple):
    """A fitted PSF model as plain arrays.

    Attributes
    ----------
    coeffs : ndarray (n_coeff, M, M) float64
        Polynomial coefficients of each model pixel; term ``c`` multiplies
        ``u**px[c] * v**py[c]`` with ``u = (x - x_center) / x_scale`` and
        ``v = (y - y_center) / y_scale`` (see :func:`poly_terms`).
    order : int
        Polynomial order of the spatial variation.
    x_center, y_center, x_scale, y_scale : float, pixels
    oversample : int
        Model samples per image pixel.
    stamp_size : int
        Size (odd) of the rendered image stamps, pixels.
    fwhm : float, pixels
        Gaussian-equivalent FWHM at (x_center, y_center).
    n_stars, n_reserved : int
        Stars used in the fit and held back.
    reserved_dT_median, reserved_dT_std : float
        Median and scatter of ``(T_star - T_model) / T_star`` on the held-back stars
        (``T = ixx + iyy``), NaN when none were held back.
    reserved_dT : tuple of float
        ``(T_star - T_model) / T_star`` of each held-back star (to pool validation over
        several detectors when each holds only a few stars).
    flux_sys : float
        Fractional PSF-flux error of the model at a position it was not fitted to,
        estimated by cross-validation (:func:`cross_validated_flux_scatter`); NaN when
        too few stars.
    cv_flux_ratio : tuple of float
        The cross-validated ratios behind ``flux_sys`` (one per star, see there).
    warp_order : int
        Order of the size/shear warp part of the model (-1: none; see :func:`fit_psf_model`).
    warp_flux_cov : tuple of float
        Covariance (flattened ``J x J``, ``J`` terms of order ``warp_order``) of the
        polynomial coefficients of the fractional PSF-flux error that the warp's fitting
        noise makes (:func:`model_flux_error`).
    """

    coeffs: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float
    oversample: int
    stamp_size: int
    fwhm: float
    n_stars: int
    n_reserved: int
    reserved_dT_median: float
    reserved_dT_std: float
    reserved_dT: tuple = ()
    flux_sys: float = float("nan")
    cv_flux_ratio: tuple = ()
    warp_order: int = -1
    warp_flux_cov: tuple = ()

    def to_dict(self):
        """JSON-able dict (coefficients as nested lists)."""
        d = self._asdict()
        d["coeffs"] = self.coeffs.tolist()
        d["reserved_dT"] = [float(v) for v in self.reserved_dT]
        d["cv_flux_ratio"] = [float(v) for v in self.cv_flux_ratio]
        d["warp_flux_cov"] = [float(v) for v in self.warp_flux_cov]
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["coeffs"] = np.asarray(d["coeffs"], dtype=np.float64)
        d["reserved_dT"] = tuple(float(v) for v in d.get("reserved_dT", ()))
        d["cv_flux_ratio"] = tuple(float(v) for v in d.get("cv_flux_ratio", ()))
        d["warp_flux_cov"] = tuple(float(v) for v in d.get("warp_flux_cov", ()))
        return cls(**d)


def poly_terms(order):
    """Exponents ``(px, py)`` of the polynomial terms of total degree <= order.

    Returns
    -------
    px, py : ndarray (n_coeff,) int64
        Ordered by degree, then by decreasing power of u: 1, u, v, u^2, uv, v^2, ...
    """
    px, py = [], []
    for d in range(order + 1):
        for j in range(d + 1):
            px.append(d - j)
            py.append(j)
    return np.array(px, dtype=np.int64), np.array(py, dtype=np.int64)


# ----------------------------------------------------------------------- interpolation
@numba.njit(nogil=True, cache=True)
def _lanczos3(t):
    if t == 0.0:
        return 1.0
    if t <= -3.0 or t >= 3.0:
        return 0.0
    pt = math.pi * t
    return 3.0 * math.sin(pt) * math.sin(pt / 3.0) / (pt * pt)


@numba.njit(nogil=True, cache=True)
def lanczos_sample(arr, x, y):
    """Lanczos-3 interpolation of ``arr`` at (x, y) (pixels; zeros outside).

    The weights are normalised to sum 1, so a constant is reproduced exactly.
    """
    ny, nx = arr.shape
    fx = int(math.floor(x))
    fy = int(math.floor(y))
    wx = np.empty(6)
    wy = np.empty(6)
    sx = 0.0
    sy = 0.0
    for i in range(6):
        wx[i] = _lanczos3(x - (fx - 2 + i))
        wy[i] = _lanczos3(y - (fy - 2 + i))
        sx += wx[i]
        sy += wy[i]
    s = 0.0
    for j in range(6):
        py = fy - 2 + j
        if py < 0 or py >= ny:
            continue
        for i in range(6):
            px = fx - 2 + i
            if px < 0 or px >= nx:
                continue
            s += wy[j] * wx[i] * arr[py, px]
    return s / (sx * sy)


def fourier_shift(stamps, dx, dy):
    """Shift stamps by (dx, dy) pixels with the Fourier shift theorem (exact for band-limited images).

    Parameters
    ----------
    stamps : ndarray (..., S, S) float, S odd
    dx, dy : float or array (...,), pixels
        Content moves towards +x / +y: ``out(x, y) = in(x - dx, y - dy)``. Flux leaving one
        edge re-enters at the other, so pad the stamps when their edges are not ~0.

    Returns
    -------
    ndarray, same shape, float64
    """
    st = np.asarray(stamps, dtype=np.float64)
    ny, nx = st.shape[-2:]
    fy = np.fft.fftfreq(ny)
    fx = np.fft.rfftfreq(nx)
    dx = np.asarray(dx, float)[..., None, None]
    dy = np.asarray(dy, float)[..., None, None]
    phase = np.exp(-2j * np.pi * (fx[None, :] * dx + fy[:, None] * dy))
    return np.fft.irfft2(np.fft.rfft2(st) * phase, s=(ny, nx))


# ----------------------------------------------------------------------- model evaluation
@numba.njit(nogil=True, cache=True)
def _eval_grid(coeffs, px, py, u, v):
    nc, m, _ = coeffs.shape
    out = np.zeros((m, m))
    for c in range(nc):
        t = (u ** px[c]) * (v ** py[c])
        for j in range(m):
            for i in range(m):
                out[j, i] += t * coeffs[c, j, i]
    return out


def evaluate_model(model, x, y):
    """Model grid (M x M, oversampled, un-normalised) at detector position (x, y)."""
    px, py = poly_terms(model.order)
    u = (float(x) - model.x_center) / model.x_scale
    v = (float(y) - model.y_center) / model.y_scale
    return _eval_grid(model.coeffs, px, py, u, v)


def model_flux_error(model, x, y):
    """Fractional PSF-flux error that the fitting noise of the model's warp makes at (x, y).

    ``sqrt(b^T C b)`` with ``b`` the warp's polynomial terms at the position without the
    constant (a uniform flux-scale error is the aperture correction's, measured on the same
    stars) and ``C`` = :attr:`PsfModelArrays.warp_flux_cov`. Zero for a model without warp.

    Parameters
    ----------
    model : PsfModelArrays
    x, y : array_like, pixels

    Returns
    -------
    ndarray, like ``x``
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    if model.warp_order < 0 or not len(model.warp_flux_cov):
        return np.zeros(x.shape)
    j_n = poly_terms(model.warp_order)[0].size
    cov = np.asarray(model.warp_flux_cov, np.float64).reshape(j_n, j_n)
    b = _basis(((x - model.x_center) / model.x_scale).ravel(), ((y - model.y_center) / model.y_scale).ravel(),
               model.warp_order)
    return np.sqrt(_warp_flux_var(cov, b)).reshape(x.shape)


@numba.njit(nogil=True, cache=True)
def _render(grid, oversample, size, dx, dy):
    """Sample an (oversampled) model grid on an image stamp shifted by (dx, dy) px."""
    m = grid.shape[0]
    hm = m // 2
    h = size // 2
    out = np.empty((size, size))
    tot = 0.0
    for j in range(size):
        for i in range(size):
            gx = hm + (i - h - dx) * oversample
            gy = hm + (j - h - dy) * oversample
            val = lanczos_sample(grid, gx, gy)
            out[j, i] = val
            tot += val
    if tot != 0.0:
        for j in range(size):
            for i in range(size):
                out[j, i] /= tot
    return out


def render_psf(model, x, y, size=None):
    """Render the normalised PSF image at (x, y).

    Parameters
    ----------
    model : PsfModelArrays
    x, y : float, pixels
        Position of the star centre on the detector.
    size : int, optional
        Odd stamp size (default ``model.stamp_size``).

    Returns
    -------
    ndarray (size, size) float64
        Sum 1; pixel ``(size // 2, size // 2)`` is image pixel ``(round(y), round(x))`` and
        the star centre sits at offset ``(x - round(x), y - round(y))`` from it.
    """
    return render_stamps(model, [x], [y], size)[0]


def render_stamps(model, xs, ys, size=None, batch=512):
    """Render PSF stamps for many positions (see :func:`render_psf`).

    The sub-pixel shift is applied with the Fourier shift theorem for ``oversample == 1``
    (exact for a well-sampled PSF: a Lanczos shift makes the profile measurably peakier,
    ~1 % in the adaptive size at half-pixel shifts) and with Lanczos-3 on oversampled models.

    Returns
    -------
    ndarray (n, size, size) float64
    """
    xs = np.atleast_1d(np.asarray(xs, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(ys, dtype=np.float64))
    size = int(model.stamp_size if size is None else size)
    if size % 2 == 0:
        raise ValueError(f"size must be odd, got {size}")
    px, py = poly_terms(model.order)
    if model.oversample != 1:
        return _render_many(model.coeffs, px, py, model.x_center, model.y_center, model.x_scale,
                            model.y_scale, model.oversample, size, xs, ys)
    n = xs.size
    m = model.coeffs.shape[1]
    pad = max(size, m) // 2 + 4
    big = 2 * pad + 1
    out = np.empty((n, size, size))
    u = (xs - model.x_center) / model.x_scale
    v = (ys - model.y_center) / model.y_scale
    ix = np.floor(xs + 0.5)
    iy = np.floor(ys + 0.5)
    for b0 in range(0, n, batch):
        sl = slice(b0, min(n, b0 + batch))
        basis = np.column_stack([u[sl] ** a * v[sl] ** b for a, b in zip(px, py)])
        grids = np.einsum("kc,cji->kji", basis, model.coeffs)
        canvas = np.zeros((grids.shape[0], big, big))
        o = pad - m // 2
        canvas[:, o : o + m, o : o + m] = grids
        shifted = fourier_shift(canvas, xs[sl] - ix[sl], ys[sl] - iy[sl])
        c = pad - size // 2
        st = shifted[:, c : c + size, c : c + size]
        st /= st.sum(axis=(1, 2))[:, None, None]
        out[sl] = st
    return out


@numba.njit(nogil=True, cache=True)
def _render_many(coeffs, px, py, xc, yc, xsc, ysc, oversample, size, xs, ys):
    """Lanczos-3 rendering of an oversampled model at many positions."""
    n = xs.size
    out = np.empty((n, size, size))
    for k in range(n):
        x = xs[k]
        y = ys[k]
        grid = _eval_grid(coeffs, px, py, (x - xc) / xsc, (y - yc) / ysc)
        ix = math.floor(x + 0.5)
        iy = math.floor(y + 0.5)
        out[k] = _render(grid, oversample, size, x - ix, y - iy)
    return out


def stamp_moments(stamp, x=None, y=None, sigma0=2.0):
    """Adaptive moments of a stamp (e.g. a rendered PSF).

    Parameters
    ----------
    stamp : ndarray (S, S)
    x, y : float, optional
        Starting centre within the stamp (default its central pixel).
    sigma0 : float, pixels

    Returns
    -------
    ixx, iyy, ixy : float, pixels^2
    fwhm : float, pixels
        Gaussian-equivalent FWHM, ``2.3548 (ixx iyy - ixy^2)^(1/4)``.
    """
    s = stamp.shape[0]
    x = s // 2 if x is None else x
    y = s // 2 if y is None else y
    m = np.zeros(stamp.shape, dtype=np.uint32)
    ixx, iyy, ixy, _, _, _, ok = adaptive_moments(np.asarray(stamp, dtype=np.float64), m, float(x), float(y),
                                                  float(sigma0), 100, 1e-8, 0)
    if not ok:
        return np.nan, np.nan, np.nan, np.nan
    det = ixx * iyy - ixy * ixy
    return ixx, iyy, ixy, 2.0 * math.sqrt(2.0 * math.log(2.0)) * det ** 0.25


# ----------------------------------------------------------------------- star selection
def select_psf_stars(
    x,
    y,
    ixx,
    iyy,
    flux,
    flux_err,
    bad=None,
    *,
    min_snr=50.0,
    isolation_radius=10.0,
    all_x=None,
    all_y=None,
    size_nsigma=3.0,
    max_stars=500,
    locus_T=None,
    locus_width=0.02,
    max_excess=None,
):
    """Select PSF stars from the size/flux locus.

    Parameters
    ----------
    x, y : array (n,), pixels
    ixx, iyy : array (n,), pixels^2
        Adaptive moments.
    flux, flux_err : array (n,), counts
    bad : array (n,) bool, optional
        Sources to exclude (saturated, edge, blended, interpolated, failed shape ...).
    min_snr : float
        Minimum ``flux / flux_err``.
    isolation_radius : float, pixels
        No other source (from ``all_x, all_y``, default the same list) within this radius.
    size_nsigma : float
        Clip half-width around the stellar locus, in MAD sigmas.
    max_stars : int
        Keep at most this many (highest S/N).
    locus_T : float, optional
        The stellar ``T = ixx + iyy`` is known (e.g. from the brighter stars: at low S/N,
        galaxies can outnumber stars and form the densest window, and an iterated locus
        drifts onto them): keep the sources within ``size_nsigma`` of it, with the width
        ``hypot(locus_width, noise)``, in one pass.
    locus_width : float, dex
        Intrinsic width of a given locus (the PSF size changes across a detector).
    max_excess : float, dex, optional
        With ``locus_T``: also at most this far above it, whatever the noise. Below S/N ~50
        galaxies outnumber stars several times and a compact one is only 0.1-0.15 dex larger
        than the PSF, while a star's own noise is ``1.23 / SNR`` dex (0.05 at S/N 25): the
        symmetric ``size_nsigma`` clip lets them in. Over the 99 ``small`` detectors, at S/N
        20-30, a cap of 0.05 dex keeps 85 % of the stars and 0.5 % of the galaxies instead of
        99 % and 7 % (8 galaxies against 246 stars instead of 120 against 287).

    Returns
    -------
    ndarray (n,) bool
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    T = np.asarray(ixx, float) + np.asarray(iyy, float)
    snr = np.asarray(flux, float) / np.asarray(flux_err, float)
    ok = np.isfinite(T) & (T > 0) & np.isfinite(snr) & (snr > min_snr)
    if bad is not None:
        ok &= ~np.asarray(bad, bool)
    ax = x if all_x is None else np.asarray(all_x, float)
    ay = y if all_y is None else np.asarray(all_y, float)
    if isolation_radius > 0 and ok.any():
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([ax, ay]))
        cnt = np.array([len(v) for v in tree.query_ball_point(np.column_stack([x[ok], y[ok]]), isolation_radius)])
        idx = np.flatnonzero(ok)
        ok[idx[cnt > 1]] = False
    if ok.sum() < 3:
        return ok
    lt = np.log10(T[ok])
    if locus_T is not None and np.isfinite(locus_T) and locus_T > 0:
        width = np.hypot(locus_width, 1.23 / snr[ok])
        sel = ok.copy()
        r = lt - math.log10(float(locus_T))
        sel[ok] = np.abs(r) < size_nsigma * width
        if max_excess is not None:
            sel[ok] &= r < float(max_excess)
        return _keep_brightest(sel, snr, max_stars)
    # densest 0.05-dex window = stellar locus
    srt = np.sort(lt)
    win = 0.05
    j = np.searchsorted(srt, srt + win, side="right")
    counts = j - np.arange(srt.size)
    i0 = int(np.argmax(counts))
    centre = np.median(srt[i0 : j[i0]])
    sel = ok.copy()
    sel[ok] = np.abs(lt - centre) < 0.1
    logT = np.log10(np.where(T > 0, T, 1e-30))
    # the PSF size varies across the detector (focus, field curvature): the locus is a
    # surface log T(x, y), fitted to the selected stars (a plane; quadratic with >= 15),
    # so that its width is the stars' scatter about it and not the spread of the PSF
    # size, which would let compact bright galaxies (T only ~10 % above the PSF's) in
    xn = (x - np.nanmean(x[ok])) / max(float(np.nanstd(x[ok])), 1.0)
    yn = (y - np.nanmean(y[ok])) / max(float(np.nanstd(y[ok])), 1.0)
    for _ in range(10):
        if sel.sum() < 3:
            break
        B = _basis(xn, yn, 2 if sel.sum() >= 15 else (1 if sel.sum() >= 6 else 0))
        coef = np.linalg.lstsq(B[sel], logT[sel], rcond=None)[0]
        locus = B @ coef
        resid = logT - locus
        mad = 1.4826 * np.median(np.abs(resid[sel] - np.median(resid[sel])))
        mad = max(mad, 1e-4)
        # the locus width is the intrinsic scatter (MAD over the selected stars, which the
        # bright stars dominate) and each star's own measurement noise in log T:
        # sigma(T) / T ~ 2 sqrt(2) / SNR for adaptive moments, 0.434 * 2.83 = 1.23 in dex
        width = np.hypot(mad, 1.23 / np.where(snr > 0, snr, np.inf))
        new = ok & (np.abs(resid) < size_nsigma * width)
        if (new == sel).all():
            break
        sel = new
    return _keep_brightest(sel, snr, max_stars)


def _keep_brightest(sel, snr, max_stars):
    """At most ``max_stars`` of ``sel``, the highest S/N."""
    if sel.sum() > max_stars:
        idx = np.flatnonzero(sel)
        keep = idx[np.argsort(-snr[idx])[:max_stars]]
        sel = np.zeros_like(sel)
        sel[keep] = True
    return sel


# ----------------------------------------------------------------------- fitting
@numba.njit(nogil=True, cache=True)
def _extract_stamps(image, variance, mask, xs, ys, m, oversample, bad_bits, resample, zero_bits):
    """Resample star images on the model grid centred on each star (Lanczos-3, when
    ``resample``); weights 1/var, 0 on pixels with ``zero_bits`` (repaired cosmic rays);
    usability (inside the image, no bad pixel)."""
    n = xs.size
    ny, nx = image.shape
    hm = m // 2
    data = np.zeros((n, m, m))
    wts = np.zeros((n, m, m))
    usable = np.ones(n, dtype=np.bool_)
    reach = hm / oversample + 4.0
    for k in range(n):
        x = xs[k]
        y = ys[k]
        if x - reach < 0 or y - reach < 0 or x + reach > nx - 1 or y + reach > ny - 1:
            usable[k] = False
            continue
        # any bad pixel in the cutout excludes the star
        for py in range(int(y - reach), int(y + reach) + 1):
            for px in range(int(x - reach), int(x + reach) + 1):
                if mask[py, px] & bad_bits:
                    usable[k] = False
        if not usable[k]:
            continue
        for j in range(m):
            for i in range(m):
                sx = x + (i - hm) / oversample
                sy = y + (j - hm) / oversample
                if resample:
                    data[k, j, i] = lanczos_sample(image, sx, sy)
                py = int(math.floor(sy + 0.5))
                px = int(math.floor(sx + 0.5))
                v = variance[py, px]
                wts[k, j, i] = 1.0 / v if v > 0 and not (mask[py, px] & zero_bits) else 0.0
    return data, wts, usable


def _extract_stamps_fourier(img, xs, ys, m, usable, fill=None):
    """Centre star cutouts on their sub-pixel centroids with a Fourier shift (see render_stamps).

    ``fill`` (ny, nx) bool marks pixels (repaired cosmic rays, weighted 0 in the fit) whose
    values are replaced, before the shift, by the star's value at the point reflection about
    its centroid (bilinear; a PSF is nearly symmetric): the shift spreads any error of such a
    pixel into its neighbours, and a median repair near a core is 10 % low.
    """
    n = xs.size
    pad = m // 2 + 4
    big = 2 * pad + 1
    cut = np.zeros((n, big, big))
    ix = np.floor(xs + 0.5).astype(np.int64)
    iy = np.floor(ys + 0.5).astype(np.int64)
    ny, nx = img.shape
    for k in range(n):
        if not usable[k] or iy[k] - pad < 0 or ix[k] - pad < 0 or iy[k] + pad >= ny or ix[k] + pad >= nx:
            continue
        cut[k] = img[iy[k] - pad : iy[k] + pad + 1, ix[k] - pad : ix[k] + pad + 1]
        if fill is None:
            continue
        f = fill[iy[k] - pad : iy[k] + pad + 1, ix[k] - pad : ix[k] + pad + 1]
        if not f.any():
            continue
        src = cut[k].copy()
        cx = pad + (xs[k] - ix[k])
        cy = pad + (ys[k] - iy[k])
        for j, i in zip(*np.nonzero(f)):
            rx, ry = 2 * cx - i, 2 * cy - j
            x0, y0 = int(np.floor(rx)), int(np.floor(ry))
            if x0 < 0 or y0 < 0 or x0 + 1 >= big or y0 + 1 >= big or f[y0 : y0 + 2, x0 : x0 + 2].any():
                continue
            tx, ty = rx - x0, ry - y0
            cut[k, j, i] = ((1 - ty) * ((1 - tx) * src[y0, x0] + tx * src[y0, x0 + 1])
                            + ty * ((1 - tx) * src[y0 + 1, x0] + tx * src[y0 + 1, x0 + 1]))
    shifted = fourier_shift(cut, -(xs - ix), -(ys - iy))
    c = pad - m // 2
    return np.ascontiguousarray(shifted[:, c : c + m, c : c + m])


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
        worst, worst_c2 = -1, limit
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


def _basis(u, v, order):
    px, py = poly_terms(order)
    if u.size == 0:
        return np.zeros((0, px.size))
    return np.ascontiguousarray(np.column_stack([u**a * v**b for a, b in zip(px, py)]), dtype=np.float64)


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


def _warp_flux_var(cov, basis_w):
    """Variance of the warp's fractional PSF-flux error at each row of ``basis_w`` (without the
    constant term: a uniform error is the aperture correction's, fitted on the same stars)."""
    b = np.array(basis_w, dtype=np.float64, copy=True)
    b[:, 0] = 0.0
    return np.maximum(np.einsum("ij,jk,ik->i", b, cov, b), 0.0)


def _floored_weights(data, wts, accuracy):
    """Weights ``1 / (V + (accuracy I)^2)`` from inverse variances ``wts`` (PSFEx's accuracy floor)."""
    if not accuracy > 0:
        return wts
    with np.errstate(divide="ignore"):
        return np.where(wts > 0, 1.0 / (1.0 / np.where(wts > 0, wts, 1.0) + (accuracy * np.maximum(data, 0.0)) ** 2), 0.0)


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


def cross_validated_flux_scatter(data, wts, flux, use, basis, coeffs, reserved, radius, clip=3.5, min_stars=5,
                                 max_folds=20, seed=0, max_leverage=0.5, fit_wts=None, refit=None, model_var=None):
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
        than 5: over the 99 detectors of the `small` cache it moved the pooled PSF-flux pull
        std of visits 1 / 14 / 20 from 0.87 / 0.93 / 0.96 to 0.92 / 0.96 / 0.97 and changed
        no visit the other way (3 gave the same, visit 2 1.06 -> 1.08).
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
    from .measure import aperture_weights

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
    return float(math.sqrt(tau2) / mu) if mu > 0 else float("nan"), ratios, errors


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
        follows that one star (on `small` r visit 23, detector 8, one star of 3.5e5 counts
        against 30 of 2-5e3 gave an order-2 model without a defined FWHM at the centre).
        The noise of the cross-validation ratios keeps the plain variance.
    warp_order : int
        Order of a size-and-shear warp of the pixel model (:func:`warp_images`,
        :func:`_solve_warp`), fitted to the residuals of the order-``order`` pixel polynomial;
        -1 for none. The result is folded into a pixel polynomial of order
        ``max(order, warp_order)``, so it renders like any other model.

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
    data, wts, usable = _extract_stamps(img, var, msk, xs, ys, m, oversample, int(bad_bits), oversample != 1,
                                        int(zero_bits))
    if oversample == 1 and n:
        data = _extract_stamps_fourier(img, xs, ys, m, usable,
                                       (msk & np.uint32(zero_bits)) != 0 if zero_bits and msk is not None else None)
    fwts = _floored_weights(data, wts, accuracy) if n else wts
    rng = np.random.default_rng(seed)
    reserved = np.zeros(n, bool)
    cand = np.flatnonzero(usable)
    nres = int(round(reserve_fraction * cand.size))
    if cand.size - nres < min_stars:
        nres = max(0, cand.size - min_stars)
    if nres > 0:
        # the brightest tenth (at least the brightest star) is never held back: with few stars a
        # random reserve could take the one star that sets the wings (small r visit 23 detector
        # 8: 9 stars, the S/N 950 one reserved, a model from S/N 55-190 stars with a dip 5 px from
        # the core, which the cosmic-ray tests then "cleaned" off the bright stars, 1-3 % of their
        # flux). Not more: the held-back stars validate the model, and fainter ones measure dT/T
        # with more noise (keeping the brightest third back moved two visits' median past 1 %)
        bright = data[cand].sum(axis=(1, 2))
        pool = cand[np.argsort(-bright, kind="stable")][int(math.ceil(cand.size / 10)):]
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
    model = PsfModelArrays(
        coeffs=coeffs, order=int(order_tot), x_center=float(xc), y_center=float(yc), x_scale=float(xsc),
        y_scale=float(ysc), oversample=int(oversample), stamp_size=int(stamp_size), fwhm=np.nan,
        n_stars=int(use.sum()), n_reserved=int(reserved.sum()), reserved_dT_median=np.nan, reserved_dT_std=np.nan,
    )
    centre = render_psf(model, xc, yc)
    fwhm = stamp_moments(centre)[3]
    dT = []
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
            dT.append((tstar - (tm[0] + tm[1])) / tstar)
    dT = np.asarray(dT)
    cov_w = _warp_flux_cov(winfo, basis_w.shape[1]) if winfo is not None else None

    def refit(sub):
        ck, info = _fit_coeffs(data, fwts, flux, sub, basis, order, basis_w, warp_order, 1, warp_prior)
        return ck, (_warp_flux_var(_warp_flux_cov(info, basis_w.shape[1]), basis_w) if info is not None else None)

    flux_sys, cv_ratio = float("nan"), np.zeros(0)
    if oversample == 1 and np.isfinite(fwhm) and cv_radius_fwhm > 0:
        flux_sys, cv_ratio, _ = cross_validated_flux_scatter(
            data, wts, np.where(use, flux, 1.0), use & usable, basis_tot, coeffs, reserved & usable,
            cv_radius_fwhm * fwhm, fit_wts=fwts, refit=refit,
            model_var=_warp_flux_var(cov_w, basis_w) if cov_w is not None else None)
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
