"""A parametric PSF model for detectors with too few stars for a pixel model (:func:`fit_moffat_psf`).

An elliptical Moffat profile (Moffat 1969; the seeing-limited PSF's core and power-law wings,
Racine 1996; Trujillo et al. 2001), integrated over the pixel, is fitted to all the stars' pixels at
once: 4 shape parameters (width, wing slope, two ellipticities) for every star, each star's flux
solved linearly at each step (variable projection; Golub & Pereyra 1973) and its centre fixed at the
measured centroid. Five stars constrain 4 numbers well where a 25 x 25 pixel model of them is mostly
noise (and a Gaussian of their adaptive moments is ~10 % wider at half maximum than a Moffat with
wings). The result is an order-0 :class:`PsfModelArrays` (the effective PSF sampled on the model
grid), so it renders, serialises and validates like a fitted pixel model.
"""

from __future__ import annotations

import math

import numpy as np

from .model import _BAD, PsfModelArrays
from .render import render_psf, stamp_moments

__all__ = ["fit_moffat_psf", "moffat_effective_psf"]

# sub-samples per pixel and axis of the pixel integration
_NSUB = 5


def _moffat_params(p: np.ndarray) -> tuple[float, float, float, float]:
    """(alpha, beta, e1, e2) from the unconstrained fit vector (log alpha, log(beta - 1), tanh-mapped e)."""
    alpha = math.exp(p[0])
    beta = 1.0 + math.exp(p[1])
    e = math.hypot(p[2], p[3])
    scale = math.tanh(e) / e if e > 1e-12 else 1.0
    return alpha, beta, p[2] * scale * 0.9, p[3] * scale * 0.9


def moffat_effective_psf(alpha, beta, e1, e2, dx, dy, nsub=_NSUB):
    """The pixel-integrated elliptical Moffat of unit total flux at offsets ``dx, dy`` (any shape,
    pixels, from the profile's centre): the fraction of the light falling in a 1 x 1 px pixel centred
    there.

    The profile is ``(1 + q / alpha^2)^-beta`` with ``q = d^T A d``, ``A`` of determinant 1
    (``[[1 - e1, -e2], [-e2, 1 + e1]] / sqrt(1 - e1^2 - e2^2)``), so ``alpha`` is the width of the
    round profile of the same area and its FWHM is ``2 alpha sqrt(2^(1/beta) - 1)``; the integral
    over the plane is ``pi alpha^2 / (beta - 1)``."""
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    s = math.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-6))
    axx, ayy, axy = (1.0 - e1) / s, (1.0 + e1) / s, -e2 / s
    off = (np.arange(nsub) + 0.5) / nsub - 0.5
    out = np.zeros(np.broadcast(dx, dy).shape)
    inv_a2 = 1.0 / (alpha * alpha)
    for oy in off:
        ty = dy + oy
        for ox in off:
            tx = dx + ox
            q = axx * tx * tx + ayy * ty * ty + 2.0 * axy * tx * ty
            out += (1.0 + q * inv_a2) ** (-beta)
    return out * ((beta - 1.0) / (math.pi * alpha * alpha) / (nsub * nsub))


def fit_moffat_psf(
    image,
    variance,
    mask,
    x,
    y,
    *,
    stamp_size=25,
    oversample=1,
    fit_radius=None,
    sigma_guess=2.0,
    bad_bits=_BAD,
    zero_bits=0,
    accuracy=0.01,
    min_stars=1,
):
    """Fit one elliptical Moffat (pixel-integrated) to the pixels of all stars at once.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
        Background-subtracted image and its variance, counts and counts^2.
    mask : ndarray (ny, nx) uint32 or None
    x, y : array (n,), pixels
        Centroids of the PSF stars (kept fixed).
    stamp_size : int
        Odd side of the rendered PSF, pixels.
    oversample : int
        Samples per pixel of the model grid (> 1 for an undersampled PSF).
    fit_radius : float, optional
        Pixels within this radius of each centroid are fitted (default ``min(4 FWHM of the guess,
        stamp_size // 2)``).
    sigma_guess : float, pixels
        Gaussian sigma of the first guess (the stars' adaptive size).
    bad_bits : int
        A star with such a pixel within ``fit_radius`` is left out; one near the image edge keeps the
        pixels inside it.
    zero_bits : int
        Pixels with these bits (repaired cosmic rays) weigh 0.
    accuracy : float
        Relative accuracy floor of a pixel, as in :func:`fit_psf_model` (weights ``1 / (V + (a I)^2)``).
    min_stars : int

    Returns
    -------
    model : PsfModelArrays
        Order 0; ``fwhm`` is the Gaussian-equivalent size of the rendered stamp, as a pixel model's.
    used : ndarray (n,) bool
    params : dict
        ``alpha, beta, e1, e2, fwhm`` (the Moffat's area-equivalent half-maximum FWHM before pixel
        integration, pixels), ``chi2_dof``, ``fluxes`` of the used stars.

    Raises
    ------
    ValueError
        Fewer than ``min_stars`` usable stars, or the fit did not converge.
    """
    img = np.asarray(image, float)
    var = np.broadcast_to(np.asarray(variance, float), img.shape)
    msk = np.zeros(img.shape, np.uint32) if mask is None else np.asarray(mask, np.uint32)
    xs = np.atleast_1d(np.asarray(x, float))
    ys = np.atleast_1d(np.asarray(y, float))
    ny, nx = img.shape
    if fit_radius is None:
        fit_radius = min(4.0 * 2.3548 * sigma_guess, stamp_size // 2)
    h = int(math.ceil(fit_radius))
    used = np.zeros(xs.size, bool)
    cuts = []
    for k, (xk, yk) in enumerate(zip(xs, ys)):
        if not (np.isfinite(xk) and np.isfinite(yk)):
            continue
        ix, iy = int(math.floor(xk + 0.5)), int(math.floor(yk + 0.5))
        # a star near the edge gives the pixels it has (its core at least 2 px inside)
        if ix < 2 or iy < 2 or ix >= nx - 2 or iy >= ny - 2:
            continue
        y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, ny), max(ix - h, 0), min(ix + h + 1, nx)
        sl = (slice(y0, y1), slice(x0, x1))
        gy, gx = np.mgrid[y0:y1, x0:x1]
        dx, dy = gx - xk, gy - yk
        inside = dx * dx + dy * dy <= fit_radius * fit_radius
        m = msk[sl]
        if ((m & np.uint32(bad_bits)) != 0)[inside].any():
            continue
        d, v = img[sl], var[sl]
        w = np.where(inside & (v > 0) & ((m & np.uint32(zero_bits)) == 0), 1.0 / (v + (accuracy * d) ** 2), 0.0)
        if not (w > 0).any():
            continue
        sel = w > 0
        cuts.append((dx[sel], dy[sel], d[sel], np.sqrt(w[sel])))
        used[k] = True
    if used.sum() < max(int(min_stars), 1):
        raise ValueError(f"only {int(used.sum())} usable stars for a Moffat PSF (need >= {min_stars})")
    dxa = np.concatenate([c[0] for c in cuts])
    dya = np.concatenate([c[1] for c in cuts])
    da = np.concatenate([c[2] for c in cuts])
    sw = np.concatenate([c[3] for c in cuts])
    starts = np.cumsum([0] + [c[0].size for c in cuts])
    wd = sw * da

    def fluxes(mod: np.ndarray) -> np.ndarray:
        wm = sw * mod
        num = np.add.reduceat(wm * wd, starts[:-1])
        den = np.add.reduceat(wm * wm, starts[:-1])
        return num / np.maximum(den, 1e-300)

    def resid(p: np.ndarray) -> np.ndarray:
        mod = moffat_effective_psf(*_moffat_params(p), dxa, dya)
        f = fluxes(mod)
        return wd - sw * mod * np.repeat(f, np.diff(starts))

    # first guess: a Moffat of beta 3 with the FWHM of the Gaussian guess
    beta0 = 3.0
    alpha0 = 2.3548 * sigma_guess / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))
    p0 = np.array([math.log(alpha0), math.log(beta0 - 1.0), 0.0, 0.0])
    # imported here: scipy.optimize costs every worker that imports the PSF kernels start-up time, and only
    # a detector with too few stars for a pixel model gets here
    from scipy.optimize import least_squares

    sol = least_squares(resid, p0, method="lm", x_scale=np.array([0.1, 0.3, 0.05, 0.05]))
    if not sol.success or not np.all(np.isfinite(sol.x)):
        raise ValueError(f"the Moffat fit did not converge ({sol.message})")
    alpha, beta, e1, e2 = _moffat_params(sol.x)
    f_used = fluxes(moffat_effective_psf(alpha, beta, e1, e2, dxa, dya))
    dof = max(dxa.size - 4 - int(used.sum()), 1)
    # the effective PSF on the model grid: samples every 1/oversample px, normalised as a pixel model
    # (sum oversample^2 within the stamp; light beyond it is the aperture correction's)
    msz = stamp_size * oversample
    if msz % 2 == 0:
        msz += 1
    c = (np.arange(msz) - msz // 2) / oversample
    grid = moffat_effective_psf(alpha, beta, e1, e2, c[None, :], c[:, None])
    grid *= oversample**2 / grid.sum()
    xc, yc = 0.5 * (nx - 1), 0.5 * (ny - 1)
    model = PsfModelArrays(
        coeffs=grid[None].astype(np.float64),
        order=0,
        x_center=float(xc),
        y_center=float(yc),
        x_scale=float(max(0.5 * nx, 1.0)),
        y_scale=float(max(0.5 * ny, 1.0)),
        oversample=int(oversample),
        stamp_size=int(stamp_size),
        fwhm=np.nan,
        n_stars=int(used.sum()),
        n_reserved=0,
        reserved_dT_median=np.nan,
        reserved_dT_std=np.nan,
    )
    model = model._replace(fwhm=float(stamp_moments(render_psf(model, xc, yc))[3]))
    params = {
        "alpha": alpha,
        "beta": beta,
        "e1": e1,
        "e2": e2,
        "fwhm": 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0),
        "chi2_dof": float(np.sum(sol.fun**2) / dof),
        "fluxes": [float(v) for v in f_used],
    }
    return model, used, params
