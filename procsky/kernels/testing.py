"""Simple synthetic frames for testing and benchmarking the kernels.

Stars are pixel-integrated elliptical Gaussians (exact, via error functions) or circular
Moffat profiles (integrated on a 5 x 5 sub-pixel grid), with a PSF width that may vary
linearly across the detector; Gaussian noise with the Poisson + read-noise variance; and
cosmic-ray tracks. This is not the survey simulator (``procsky.sim``, GalSim): it exists so
that kernel tests know the truth exactly and run in milliseconds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

__all__ = ["SyntheticFrame", "make_star_field", "add_cosmic_rays", "gaussian_psf_image"]


class SyntheticFrame(NamedTuple):
    """A synthetic frame and its truth.

    Attributes
    ----------
    image : ndarray (ny, nx) float32
        Noisy image including the sky, counts.
    variance : ndarray (ny, nx) float32
        True variance (sky + source Poisson + read noise^2), counts^2.
    model : ndarray (ny, nx) float64
        Noise-free stars (without sky), counts.
    sky : float, counts per pixel
    x, y, flux : ndarray (n,)
        True positions (pixels, 0-based centres) and total fluxes (counts).
    sigma_x, sigma_y : ndarray (n,), pixels
        Gaussian sigmas of each star's PSF (the Moffat ``alpha`` relation is in the docs).
    """

    image: np.ndarray
    variance: np.ndarray
    model: np.ndarray
    sky: float
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    sigma_x: np.ndarray
    sigma_y: np.ndarray


@numba.njit(nogil=True, cache=True)
def _add_gaussian(model, x, y, flux, sx, sy, half):
    ny, nx = model.shape
    ix = int(math.floor(x + 0.5))
    iy = int(math.floor(y + 0.5))
    x0 = max(0, ix - half)
    x1 = min(nx, ix + half + 1)
    y0 = max(0, iy - half)
    y1 = min(ny, iy + half + 1)
    if x0 >= x1 or y0 >= y1:
        return
    gx = np.empty(x1 - x0)
    gy = np.empty(y1 - y0)
    rx = 1.0 / (math.sqrt(2.0) * sx)
    ry = 1.0 / (math.sqrt(2.0) * sy)
    for i in range(x1 - x0):
        p = x0 + i
        gx[i] = 0.5 * (math.erf((p + 0.5 - x) * rx) - math.erf((p - 0.5 - x) * rx))
    for j in range(y1 - y0):
        p = y0 + j
        gy[j] = 0.5 * (math.erf((p + 0.5 - y) * ry) - math.erf((p - 0.5 - y) * ry))
    for j in range(y1 - y0):
        for i in range(x1 - x0):
            model[y0 + j, x0 + i] += flux * gy[j] * gx[i]


@numba.njit(nogil=True, cache=True)
def _add_moffat(model, x, y, flux, alpha, beta, half):
    ny, nx = model.shape
    ix = int(math.floor(x + 0.5))
    iy = int(math.floor(y + 0.5))
    norm = (beta - 1.0) / (math.pi * alpha * alpha)
    for py in range(max(0, iy - half), min(ny, iy + half + 1)):
        for px in range(max(0, ix - half), min(nx, ix + half + 1)):
            s = 0.0
            for sj in range(5):
                for si in range(5):
                    dx = px - 0.4 + 0.2 * si - x
                    dy = py - 0.4 + 0.2 * sj - y
                    s += (1.0 + (dx * dx + dy * dy) / (alpha * alpha)) ** (-beta)
            model[py, px] += flux * norm * s / 25.0


def gaussian_psf_image(size, sigma, dx=0.0, dy=0.0):
    """Pixel-integrated, normalised Gaussian PSF stamp (odd ``size``) offset by (dx, dy)."""
    m = np.zeros((size, size))
    _add_gaussian(m, size // 2 + dx, size // 2 + dy, 1.0, sigma, sigma, size // 2)
    return m


def make_star_field(
    shape=(512, 512),
    n_stars=200,
    *,
    fwhm=4.0,
    fwhm_gradient=0.0,
    ellipticity=0.0,
    profile="gaussian",
    moffat_beta=3.5,
    flux_range=(1e3, 1e6),
    sky=500.0,
    read_noise=5.0,
    margin=10,
    min_separation=0.0,
    seed=0,
    x=None,
    y=None,
    flux=None,
):
    """Draw a star field with known truth.

    Parameters
    ----------
    shape : (int, int)
    n_stars : int
    fwhm : float, pixels
        PSF FWHM at the detector centre.
    fwhm_gradient : float
        Relative FWHM change from the left to the right edge (e.g. 0.1 = +10 %) and half of
        that from bottom to top, to test spatially varying PSF models.
    ellipticity : float
        Axis ratio 1 - e of the Gaussian PSF, aligned with x (sigma_y = (1 - e) sigma_x).
    profile : {"gaussian", "moffat"}
    moffat_beta : float
    flux_range : (float, float), counts
        Log-uniform fluxes.
    sky : float, counts per pixel
    read_noise : float, counts
    margin : int, pixels
        Distance of the stars from the edges.
    min_separation : float, pixels
        Redraw positions closer than this to an earlier star.
    seed : int
    x, y, flux : array, optional
        Explicit star list instead of random draws.

    Returns
    -------
    SyntheticFrame
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if x is None:
        xs: list[float] = []
        ys: list[float] = []
        tries = 0
        while len(xs) < n_stars and tries < 100 * n_stars:
            tries += 1
            cx = rng.uniform(margin, nx - 1 - margin)
            cy = rng.uniform(margin, ny - 1 - margin)
            if min_separation > 0 and xs:
                d2 = (np.asarray(xs) - cx) ** 2 + (np.asarray(ys) - cy) ** 2
                if d2.min() < min_separation**2:
                    continue
            xs.append(cx)
            ys.append(cy)
        x = np.asarray(xs)
        y = np.asarray(ys)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = x.size
    if flux is None:
        flux = 10 ** rng.uniform(np.log10(flux_range[0]), np.log10(flux_range[1]), n)
    flux = np.asarray(flux, float)
    f = fwhm * (1.0 + fwhm_gradient * ((x / max(nx - 1, 1)) - 0.5) + 0.5 * fwhm_gradient * ((y / max(ny - 1, 1)) - 0.5))
    sig = f / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sx = sig.copy()
    sy = sig * (1.0 - ellipticity)
    model = np.zeros(shape)
    for k in range(n):
        if profile == "gaussian":
            half = int(math.ceil(6 * max(sx[k], sy[k]))) + 2
            _add_gaussian(model, x[k], y[k], flux[k], sx[k], sy[k], half)
        elif profile == "moffat":
            alpha = f[k] / (2.0 * math.sqrt(2.0 ** (1.0 / moffat_beta) - 1.0))
            half = int(math.ceil(8 * f[k])) + 2
            _add_moffat(model, x[k], y[k], flux[k], alpha, moffat_beta, half)
        else:
            raise ValueError(f"profile must be 'gaussian' or 'moffat', got {profile!r}")
    variance = sky + model + read_noise**2
    image = sky + model + rng.normal(size=shape) * np.sqrt(variance)
    return SyntheticFrame(
        image=image.astype(np.float32),
        variance=variance.astype(np.float32),
        model=model,
        sky=float(sky),
        x=x,
        y=y,
        flux=flux,
        sigma_x=sx,
        sigma_y=sy,
    )


def add_cosmic_rays(image, n_hits, *, seed=0, energy_range=(300.0, 5000.0), max_length=6, margin=3):
    """Add cosmic-ray tracks (straight, 1-``max_length`` pixels) to a copy of ``image``.

    Returns
    -------
    image : ndarray float32
    mask : ndarray bool
        True where a hit landed.
    """
    rng = np.random.default_rng(seed)
    img = np.array(image, dtype=np.float32, copy=True)
    ny, nx = img.shape
    mask = np.zeros(img.shape, bool)
    for _ in range(n_hits):
        y = rng.uniform(margin, ny - margin)
        x = rng.uniform(margin, nx - margin)
        length = int(rng.integers(1, max_length + 1))
        ang = rng.uniform(0, np.pi)
        for t in range(length):
            cy = int(round(y + t * np.sin(ang)))
            cx = int(round(x + t * np.cos(ang)))
            if 0 <= cy < ny and 0 <= cx < nx and not mask[cy, cx]:
                img[cy, cx] += rng.uniform(*energy_range)
                mask[cy, cx] = True
    return img, mask
