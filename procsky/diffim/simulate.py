"""Synthetic science/template pairs with known stars and transients (tests and benchmarks)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["simulate_pair"]


def _render_star(img, x, y, flux, sigma_fn, beta, half):
    ny, nx = img.shape
    ix, iy = int(round(x)), int(round(y))
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    if x1 <= x0 or y1 <= y0:
        return
    o = 3
    sub = (np.arange(o) + 0.5) / o - 0.5
    gx = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel() - x
    gy = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel() - y
    sx, sy, rho = sigma_fn(x, y)
    X, Y = np.meshgrid(gx, gy)
    q = (X / sx) ** 2 + (Y / sy) ** 2 - 2 * rho * X * Y / (sx * sy)
    q /= 1 - rho**2
    if beta is None:
        prof = np.exp(-0.5 * q) / (2 * np.pi * sx * sy * math.sqrt(1 - rho**2))
    else:
        # Moffat with the same second moments scale: alpha chosen so FWHM matches the Gaussian.
        a2 = 1.0 / (2 ** (1 / beta) - 1) * (2.3548**2 / 4)
        prof = (beta - 1) / (np.pi * a2 * sx * sy * math.sqrt(1 - rho**2)) * (1 + q / a2) ** (-beta)
    prof = prof.reshape(y1 - y0, o, x1 - x0, o).mean(axis=(1, 3))
    img[y0:y1, x0:x1] += flux * prof


def simulate_pair(
    shape=(512, 512),
    *,
    n_stars=300,
    seeing_science=(2.2, 2.2),
    seeing_template=1.6,
    ellip_science=0.0,
    moffat_beta=None,
    sky=200.0,
    template_depth=4.0,
    flux_scale=1.0,
    n_transients=0,
    transient_flux=(3000.0, 20000.0),
    variable_delta=None,
    seed=1,
    star_flux=(500.0, 2e5),
    background_offset=0.0,
    noise_seed=None,
    wcs=None,
):
    """A synthetic science/template pair on the same pixel grid (tests and benchmarks).

    Parameters
    ----------
    shape : (int, int)
    n_stars : int
        Static stars (log-uniform fluxes in ``star_flux``, counts of the science image).
    seeing_science : (float, float), pixels
        Gaussian-equivalent PSF sigma of the science image at x = 0 and x = nx (linear
        variation across the detector).
    seeing_template : float, pixels
        Template PSF sigma (constant).
    ellip_science : float
        Correlation coefficient of the science PSF (elliptical Gaussian/Moffat).
    moffat_beta : float or None
        Moffat profiles with this beta instead of Gaussians.
    sky : float, counts
        Sky level of the science image (Poisson noise; the sky itself is subtracted).
    template_depth : float
        The template noise variance is the science one divided by this (a deep coadd).
    flux_scale : float
        Template counts = science counts * flux_scale.
    n_transients : int
        Point sources present only in the science image.
    transient_flux : (float, float), counts
    variable_delta : float or None, counts
        If given, star 0 is made a variable with this flux change in the science image.
    seed : int
    background_offset : float, counts
        Constant added to the science image (differential background).
    noise_seed : int, optional
        Seed of the noise only (same scene, new noise: several epochs); default ``seed``.
    wcs : astropy.wcs.WCS, optional
        Attached to both exposures.

    Returns
    -------
    science, template : procsky.exposure.Exposure
    truth : dict
        ``stars`` (x, y, flux), ``transients`` (x, y, flux), ``noise`` per image.
    """
    from procsky.exposure import Exposure
    from procsky.psf import ImagePsf, PolynomialImagePsf, PsfModel

    rng = np.random.default_rng(seed)
    ny, nx = shape
    margin = 10
    xs = rng.uniform(margin, nx - margin, n_stars)
    ys = rng.uniform(margin, ny - margin, n_stars)
    fl = np.exp(rng.uniform(np.log(star_flux[0]), np.log(star_flux[1]), n_stars))
    tx = rng.uniform(40, nx - 40, n_transients)
    ty = rng.uniform(40, ny - 40, n_transients)
    tf = rng.uniform(transient_flux[0], transient_flux[1], n_transients)

    def sig_sci(x, y):
        s = seeing_science[0] + (seeing_science[1] - seeing_science[0]) * x / max(nx - 1, 1)
        return s, s, ellip_science

    def sig_tpl(x, y):
        return seeing_template, seeing_template, 0.0

    half = int(math.ceil(8 * max(max(seeing_science), seeing_template))) + (20 if moffat_beta else 0)
    sci = np.zeros(shape)
    tpl = np.zeros(shape)
    for i in range(n_stars):
        f = fl[i]
        fs = f + (variable_delta if (variable_delta is not None and i == 0) else 0.0)
        _render_star(sci, xs[i], ys[i], fs, sig_sci, moffat_beta, half)
        _render_star(tpl, xs[i], ys[i], f * flux_scale, sig_tpl, moffat_beta, half)
    for i in range(n_transients):
        _render_star(sci, tx[i], ty[i], tf[i], sig_sci, moffat_beta, half)
    read = 5.0
    s_var = sky + read**2 + np.maximum(sci, 0)
    t_var = (sky + read**2 + np.maximum(tpl / flux_scale, 0)) / template_depth * flux_scale**2
    rng_s = np.random.default_rng([seed, 0 if noise_seed is None else noise_seed + 1])
    rng_t = np.random.default_rng([seed, 2**31])  # the template's noise is the same for every epoch
    sci_n = sci + rng_s.normal(size=shape) * np.sqrt(s_var) + background_offset
    tpl_n = tpl + rng_t.normal(size=shape) * np.sqrt(t_var)

    def psf_model(sfn, x, y):
        k = np.zeros((41, 41))
        _render_star(k, 20 + (x - round(x)) * 0, 20, 1.0, lambda *_: sfn(x, y), moffat_beta, 20)
        return k

    s_psf: PsfModel
    if seeing_science[0] == seeing_science[1]:
        s_psf = ImagePsf(psf_model(sig_sci, 0, 0))
    else:
        # Linear-in-x PSF: PolynomialImagePsf of order 1 from the kernels at both edges.
        k0 = psf_model(sig_sci, 0, ny / 2)
        k1 = psf_model(sig_sci, nx - 1, ny / 2)
        coeffs = np.array([(k0 + k1) / 2, (k1 - k0) / 2, np.zeros_like(k0)])
        s_psf = PolynomialImagePsf(coeffs, 1, (nx - 1) / 2, (ny - 1) / 2, (nx - 1) / 2, (ny - 1) / 2)
    t_psf = ImagePsf(psf_model(sig_tpl, 0, 0))
    science = Exposure(sci_n.astype(np.float32), s_var.astype(np.float32), psf=s_psf, wcs=wcs)
    template = Exposure(tpl_n.astype(np.float32), t_var.astype(np.float32), psf=t_psf, wcs=wcs)
    truth = {
        "stars": {"x": xs, "y": ys, "flux": fl},
        "transients": {"x": tx, "y": ty, "flux": tf},
        "science_sigma": sig_sci,
    }
    return science, template, truth
