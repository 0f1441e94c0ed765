"""Galaxy-model fitting kernels: PSF-convolved elliptical exponential and de Vaucouleurs
profiles fitted to a pixel stamp, and the CModel combination of the two.

Follows the CModel of SDSS (Abazajian et al. 2004, AJ 128, 502) as done in the LSST
pipelines (Bosch et al. 2018, PASJ 70, S5): an exponential and a de Vaucouleurs profile,
each a sheared ellipse convolved with the PSF, are fitted separately to the pixels (r_e^2
and ellipticity by a small Levenberg-Marquardt with a weak Gaussian prior on the ellipticity,
the amplitude solved linearly at every step: variable projection, Golub & Pereyra 1973); then
the non-negative linear combination of the two best-fit models that fits the pixels best gives
``frac_dev`` and the flux (the total flux of the combination).

How a model is drawn: the profile's Fourier transform is evaluated on the DFT grid of a
zero-padded stamp, multiplied by the DFT of the PSF kernel (which already holds the pixel
response) and a phase ramp to the centre, and transformed back. Sampling ``profile * PSF``
at pixel centres this way is exact for a band-limited (Nyquist-sampled) PSF, needs no
sub-pixel integration of the profile's cusp and costs one inverse FFT per model.

* The exponential's transform is analytic, ``(1 + (k r0)^2)^(-3/2)``.
* The de Vaucouleurs (Sersic n = 4) transform comes from a mixture of ~30 circular Gaussians
  fitted once (non-negative least squares, in flux per log radius, 1e-5 to 60 r_e) to the
  untruncated profile; a Gaussian mixture's transform is analytic (the mixture-of-Gaussians
  approximation of Hogg & Lang 2013, PASP 125, 719, with more components). Both transforms
  are tabulated in ``(k r_e)^(1/4)`` and interpolated linearly.

Profiles are untruncated and normalised to unit total flux, so a fitted amplitude is the
total flux. ``r_e`` is the half-light radius of the circular profile before shearing (the
geometric mean of the ellipse's axes, as GalSim's ``.shear``); the shear is the reduced
shear ``g1, g2`` (axis ratio ``(1 - |g|) / (1 + |g|)``), applied as GalSim does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
import scipy.fft

__all__ = [
    "PROFILES",
    "profile_table",
    "FitGrid",
    "fit_grid",
    "render_models",
    "linear_amplitude",
    "fit_profile",
    "cmodel_combine",
    "kron_radius",
    "annulus_values",
]

#: Profiles that can be fitted.
PROFILES = ("exp", "dev")
#: r_e / scale length of the exponential profile
_EXP_RE_OVER_R0 = 1.6783469900166605
#: Sersic b_n for n = 4 (Ciotti & Bertin 1999 series), I ~ exp(-b ((r / r_e)^(1/4) - 1))
_DEV_B = 7.669249443

#: table step in t = q^(1/4), q = k r_e (three square roots per Fourier sample; fine at small q, where
#: F ~ 1 - c q^2, and coarse only where F is negligible)
_T_STEP = 1e-3
_T_MAX = 2e4**0.25
#: |g| is kept below this (axis ratio >= 0.026)
_G_MAX = 0.95


def _dev_mixture(n_comp: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes and sigmas (units of r_e) of a Gaussian mixture of the unit-flux de Vaucouleurs
    profile, fitted by NNLS in flux per log radius."""
    from scipy.optimize import nnls

    r = np.exp(np.linspace(math.log(1e-5), math.log(60.0), 900))
    # unit total flux: 2 pi int I r dr = 2 pi n e^b Gamma(2n) / b^(2n) for n = 4, I_e = 1
    total = 2.0 * math.pi * 4.0 * math.exp(_DEV_B) * math.gamma(8.0) / _DEV_B**8
    prof = np.exp(-_DEV_B * (r**0.25 - 1.0)) / total
    sig = np.exp(np.linspace(math.log(3e-5), math.log(25.0), n_comp))
    basis = np.exp(-0.5 * (r[:, None] / sig[None, :]) ** 2) / (2.0 * math.pi * sig[None, :] ** 2)
    w = 2.0 * math.pi * r**2  # flux per unit log radius
    amp, _ = nnls(basis * w[:, None], prof * w, maxiter=5000)
    return amp, sig


@lru_cache(maxsize=4)
def profile_table(profile: str) -> np.ndarray:
    """Fourier transform of the circular unit-flux profile of unit half-light radius, sampled at
    ``q = expm1(t)`` for ``t = 0, _T_STEP, ...`` (``F(0) = 1``).

    Parameters
    ----------
    profile : {"exp", "dev"}

    Returns
    -------
    ndarray (n,) float64
    """
    t = np.arange(0.0, _T_MAX + _T_STEP, _T_STEP)
    q = t**4
    if profile == "exp":
        f = (1.0 + (q / _EXP_RE_OVER_R0) ** 2) ** -1.5
    elif profile == "dev":
        amp, sig = _dev_mixture()
        f = np.zeros_like(q)
        for a, s in zip(amp, sig, strict=True):
            f += a * np.exp(-0.5 * (s * q) ** 2)
        f /= f[0]
    else:
        raise ValueError(f"profile {profile!r} is not one of {PROFILES}")
    f[-1] = 0.0
    return f


def _fast_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    m = max(int(n), 8)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


@dataclass
class FitGrid:
    """The Fourier grid of one stamp: ``q_hat`` is the DFT of the PSF kernel times the phase ramp to
    the model centre; models are cropped to ``shape``."""

    shape: tuple[int, int]
    grid: tuple[int, int]
    kx: np.ndarray
    ky: np.ndarray
    q_hat: np.ndarray


def fit_grid(psf_kernel: np.ndarray, shape: tuple[int, int], xc: float, yc: float, *, wide: bool = False) -> FitGrid:
    """Set up the model grid of a ``shape`` stamp with the model centred at stamp position (xc, yc).

    The DFT grid is periodic: light beyond its edge wraps onto the stamp. The margin beyond the stamp
    is a quarter of the PSF kernel (light farther out than that beyond the footprint is negligible for
    an exponential), or with ``wide`` also half the stamp (a de Vaucouleurs profile's wings: with the
    narrow margin they wrap ~1 % of the flux of a 0.4-0.8" galaxy in a 41 px stamp onto it).

    Parameters
    ----------
    psf_kernel : ndarray (S, S), sum 1
        Effective (pixel-convolved) PSF centred on its central pixel.
    shape : (h, w)
    xc, yc : float, stamp pixels
    wide : bool

    Returns
    -------
    FitGrid
    """
    k = np.asarray(psf_kernel, np.float64)
    k = k / k.sum()
    s = k.shape[0]
    h, w = int(shape[0]), int(shape[1])
    margin = max(s // 4, 6) + 2 + (max(h, w) // 2 if wide else 0)
    ny = _fast_size(max(h + margin, s))
    nx = _fast_size(max(w + margin, s))
    pad = np.zeros((ny, nx))
    pad[:s, :s] = k
    pad = np.roll(pad, (-(s // 2), -(s // 2)), axis=(0, 1))
    kx = 2.0 * math.pi * np.fft.rfftfreq(nx)
    ky = 2.0 * math.pi * np.fft.fftfreq(ny)
    phase = np.exp(-1j * (ky[:, None] * yc + kx[None, :] * xc))
    return FitGrid((h, w), (ny, nx), kx, ky, (np.fft.rfft2(pad) * phase).astype(np.complex64))


@numba.njit(nogil=True, cache=True)
def _fill_hat(out, q_hat, kx, ky, table, re, g1, g2):
    """``out = q_hat * F(r_e |S k|)`` with S the shear matrix of (g1, g2)."""
    gg = g1 * g1 + g2 * g2
    f = 1.0 / math.sqrt(1.0 - gg)
    s11 = f * (1.0 + g1)
    s22 = f * (1.0 - g1)
    s12 = f * g2
    n = table.size
    inv = 1.0 / _T_STEP
    re2 = re * re
    for j in range(ky.size):
        for i in range(kx.size):
            ux = s11 * kx[i] + s12 * ky[j]
            uy = s12 * kx[i] + s22 * ky[j]
            t = math.sqrt(math.sqrt(math.sqrt(re2 * (ux * ux + uy * uy)))) * inv
            m = int(t)
            if m >= n - 1:
                out[j, i] = 0.0
            else:
                v = table[m] + (t - m) * (table[m + 1] - table[m])
                out[j, i] = q_hat[j, i] * v


def render_models(grid: FitGrid, table: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Unit-flux PSF-convolved models at each row of ``params`` = (r_e px, g1, g2).

    Returns
    -------
    ndarray (n, h, w) float32
        Single precision: the models' rounding (1e-7 of the peak) is far below the fits'
        finite-difference steps (1e-3).
    """
    params = np.atleast_2d(np.asarray(params, np.float64))
    ny, nx = grid.grid
    hat = np.empty((params.shape[0], ny, nx // 2 + 1), np.complex64)
    for i in range(params.shape[0]):
        _fill_hat(hat[i], grid.q_hat, grid.kx, grid.ky, table, params[i, 0], params[i, 1], params[i, 2])
    out = scipy.fft.irfft2(hat, s=(ny, nx), axes=(-2, -1))
    h, w = grid.shape
    return out[:, :h, :w]


def linear_amplitude(data: np.ndarray, weight: np.ndarray, model: np.ndarray) -> tuple[float, float, float]:
    """Weighted least-squares amplitude of ``model`` (flattened fit pixels; ``weight`` = 1 / variance).

    Returns
    -------
    amp, amp_err, chi2 : float
    """
    mw = model * weight
    den = float(np.dot(mw, model))
    if not (den > 0.0):
        return math.nan, math.nan, math.nan
    a = float(np.dot(mw, data)) / den
    r = data - a * model
    return a, 1.0 / math.sqrt(den), float(np.dot(r * weight, r))


def _g_of(eta1: float, eta2: float) -> tuple[float, float]:
    e = math.hypot(eta1, eta2)
    if e < 1e-12:
        return 0.0, 0.0
    g = _G_MAX * math.tanh(e)
    return g * eta1 / e, g * eta2 / e


def _eta_of(g1: float, g2: float) -> tuple[float, float]:
    g = math.hypot(g1, g2)
    if g < 1e-12:
        return 0.0, 0.0
    e = math.atanh(min(g / _G_MAX, 0.999))
    return e * g1 / g, e * g2 / g


@numba.njit(nogil=True, cache=True)
def _project(models, pix, data, sw):
    """Residuals ``sqrt(w) (d - A m)`` of each model (n, h, w) at the flat pixels ``pix``, A fitted."""
    n = models.shape[0]
    flat = models.reshape(n, -1)
    m = pix.size
    res = np.empty((n, m))
    amp = np.zeros(n)
    for i in range(n):
        smm = 0.0
        smd = 0.0
        for j in range(m):
            mw = flat[i, pix[j]] * sw[j]
            smm += mw * mw
            smd += mw * data[j] * sw[j]
        a = smd / smm if smm > 0.0 else 0.0
        amp[i] = a
        for j in range(m):
            res[i, j] = (data[j] - a * flat[i, pix[j]]) * sw[j]
    return res, amp


def _residuals(grid, table, thetas, pix, data, sw):
    """Residuals ``sqrt(w) (d - A m)`` with A solved linearly, per parameter row (n, m), and A."""
    params = np.empty((thetas.shape[0], 3))
    for i in range(thetas.shape[0]):
        params[i, 0] = math.sqrt(max(thetas[i, 0], 0.0))
        params[i, 1], params[i, 2] = _g_of(thetas[i, 1], thetas[i, 2])
    models = np.ascontiguousarray(render_models(grid, table, params))
    return _project(models, pix, data, sw)


def fit_profile(
    data: np.ndarray,
    weight: np.ndarray,
    pix: np.ndarray,
    grid: FitGrid,
    table: np.ndarray,
    re0: float,
    g10: float,
    g20: float,
    *,
    re_min: float = 0.02,
    re_max: float = 100.0,
    max_iter: int = 20,
    chi2_tol: float = 0.05,
    eta_sigma: float = 2.0,
) -> tuple[float, float, float, float, float, float, int, bool]:
    """Fit (r_e, g1, g2) and the amplitude of one profile (Levenberg-Marquardt on r_e^2 and a bounded
    ellipticity; forward-difference Jacobian, amplitude projected out).

    Parameters
    ----------
    data, weight : ndarray (m,)
        Fit pixels' values and inverse variances (flattened stamp at ``pix``).
    pix : ndarray (m,) int
        Flat indices of the fit pixels in the stamp.
    grid : FitGrid
    table : ndarray
        :func:`profile_table` of the profile.
    re0, g10, g20 : float
        Starting half-light radius (px) and shear.
    re_min, re_max : float, px
    max_iter : int
    chi2_tol : float
        Converged when an accepted step lowers chi^2 by less than this.
    eta_sigma : float
        Width of the Gaussian prior on the ellipticity's parameters ``eta = atanh(|g| / 0.95)``
        (per component).

    Returns
    -------
    re, g1, g2, flux, flux_err, chi2 : float
        ``chi2`` of the data alone (without the prior).
    n_iter : int
    ok : bool
        Converged to a finite, positive-definite solution.
    """
    sw = np.sqrt(weight)
    # size parameter r_e^2: near r_e = 0 (a point source) the model changes as r_e^2, so a Newton step in
    # r_e^2 reaches the minimum at once where steps in r_e or log r_e shrink with it
    lo, hi = re_min * re_min, re_max * re_max
    e1, e2 = _eta_of(g10, g20)
    theta = np.array([min(max(re0 * re0, lo), hi), e1, e2])
    # a weak Gaussian prior on the ellipticity (as LSST's CModel has one): where the data say nothing
    # of it (r_e -> 0, a point source) it keeps the fit from wandering along a flat valley
    prior_jac = np.array([[0.0, 1.0 / eta_sigma, 0.0], [0.0, 0.0, 1.0 / eta_sigma]])

    def residual(th):
        res, amp = _residuals(grid, table, th[None, :], pix, data, sw)
        r0 = np.concatenate([res[0], th[1:] / eta_sigma])
        return r0, float(np.dot(r0, r0)), res[0]

    def jacobian(th, res0):
        step = np.array([2e-3 * max(th[0], 0.05), 2e-3, 2e-3])
        res, _ = _residuals(grid, table, th[None, :] + np.diag(step), pix, data, sw)
        return np.vstack([(res - res0[None, :]).T / step[None, :], prior_jac])

    r0, chi2, res0 = residual(theta)
    jac = jacobian(theta, res0)
    lam = 1e-3
    ok = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        hess = jac.T @ jac
        grad = jac.T @ r0
        a = hess + lam * np.diag(np.diag(hess) + 1e-9)
        try:
            delta = -np.linalg.solve(a, grad)
            # size at a bound and pushing past it (a point source wants r_e^2 < 0): fix it and step in the
            # ellipticity alone (active set; the clamped joint step would move the ellipticity wrongly)
            if (theta[0] <= lo and delta[0] < 0.0) or (theta[0] >= hi and delta[0] > 0.0):
                delta[0] = 0.0
                delta[1:] = -np.linalg.solve(a[1:, 1:], grad[1:])
        except np.linalg.LinAlgError:
            break
        trial = theta + delta
        trial[0] = min(max(trial[0], lo), hi)
        dth = np.abs(trial - theta)
        step = trial - theta
        # chi^2 gain the linearised model predicts for the step (chi^2 = r.r, gradient 2 J^T r)
        gain = -(2.0 * float(grad @ step) + float(step @ hess @ step))
        if max(dth[0] / max(theta[0], 0.05), dth[1], dth[2]) < 1e-3 or gain < 0.1 * chi2_tol:
            # a nil step once clamped to the bounds (a point source at r_e = re_min), or one that cannot
            # gain a significant chi^2 (the ellipticity of a point source, which the data do not constrain
            # and the float32 models render with rounding noise): at the minimum, converged (else lambda
            # climbs to its limit over rejected steps and the fit runs out of iterations, flagged)
            ok = True
            break
        # the trial alone first: a rejected step costs one model, not four
        rt, ct, rest = residual(trial)
        if ct < chi2:
            # converged: steps below 1e-3 (0.1 % in r_e) or chi^2 gains far below one sigma's 1
            dth = np.abs(trial - theta)
            small = max(dth[0] / max(theta[0], 0.05), dth[1], dth[2]) < 1e-3 or (chi2 - ct) < chi2_tol
            theta, r0, chi2 = trial, rt, ct
            lam = max(lam / 5.0, 1e-7)
            if small:
                ok = True
                break
            jac = jacobian(theta, rest)
        else:
            lam *= 8.0
            if lam > 1e6:
                ok = True  # no step lowers chi^2: at the minimum within the step's precision
                break
    re = math.sqrt(theta[0])
    g1, g2 = _g_of(theta[1], theta[2])
    model = render_models(grid, table, np.array([[re, g1, g2]])).reshape(-1)[pix]
    flux, flux_err, chi2 = linear_amplitude(data, weight, model)
    ok = ok and math.isfinite(flux)
    return re, g1, g2, flux, flux_err, chi2, it, ok


def cmodel_combine(
    data: np.ndarray, weight: np.ndarray, m_exp: np.ndarray, m_dev: np.ndarray
) -> tuple[float, float, float, float]:
    """The non-negative combination ``a_e m_exp + a_d m_dev`` (unit-flux models) that fits best.

    Returns
    -------
    flux, flux_err : float
        ``a_e + a_d`` and its error at fixed ``frac_dev`` (``1 / sqrt(sum w m^2)`` of the unit-flux
        combined model, as LSST's CModel).
    frac_dev : float
        ``a_d / (a_e + a_d)`` in [0, 1].
    chi2 : float
    """
    a = np.array([[np.dot(m_exp * weight, m_exp), np.dot(m_exp * weight, m_dev)], [0.0, np.dot(m_dev * weight, m_dev)]])
    a[1, 0] = a[0, 1]
    b = np.array([np.dot(m_exp * weight, data), np.dot(m_dev * weight, data)])
    cands = []
    try:
        sol = np.linalg.solve(a, b)
        if sol[0] >= 0.0 and sol[1] >= 0.0 and sol.sum() > 0.0:
            cands.append(float(sol[1] / sol.sum()))
    except np.linalg.LinAlgError:
        pass
    cands += [0.0, 1.0]
    best = (math.nan, math.nan, math.nan, math.inf)
    for f in cands:
        m = (1.0 - f) * m_exp + f * m_dev
        flux, err, chi2 = linear_amplitude(data, weight, m)
        if math.isfinite(chi2) and chi2 < best[3] - 1e-9:
            best = (flux, err, f, chi2)
    if not math.isfinite(best[3]):
        return math.nan, math.nan, math.nan, math.nan
    return best


@numba.njit(nogil=True, cache=True)
def kron_radius(image, mask, x, y, rmax, bad_bits):
    """First radial moment ``r1 = sum(r I) / sum(I)`` within ``rmax`` of (x, y) (Kron 1980).

    Parameters
    ----------
    image : ndarray (ny, nx) float
    mask : ndarray (ny, nx) uint32
    x, y : float, pixels
    rmax : float, pixels
    bad_bits : int

    Returns
    -------
    r1 : float, pixels (NaN when the sum is not positive)
    """
    ny, nx = image.shape
    s0 = 0.0
    s1 = 0.0
    for py in range(max(0, int(math.floor(y - rmax))), min(ny, int(math.ceil(y + rmax)) + 1)):
        for px in range(max(0, int(math.floor(x - rmax))), min(nx, int(math.ceil(x + rmax)) + 1)):
            if mask[py, px] & bad_bits:
                continue
            r = math.sqrt((px - x) ** 2 + (py - y) ** 2)
            if r > rmax:
                continue
            v = image[py, px]
            s0 += v
            s1 += r * v
    if not (s0 > 0.0) or not (s1 > 0.0):
        return np.nan
    return s1 / s0


@numba.njit(nogil=True, cache=True)
def annulus_values(image, mask, x, y, rin, rout, bad_bits, exclude, ex0, ey0):
    """Values of the pixels of ``image`` in the annulus ``rin <= r <= rout`` around (x, y), leaving out
    pixels with ``bad_bits`` and those where ``exclude`` (a boolean array whose [0, 0] is image pixel
    (ex0, ey0): a footprint) is set.

    Returns
    -------
    ndarray (n,) float64
    """
    ny, nx = image.shape
    eh, ew = exclude.shape
    r2in = rin * rin
    r2out = rout * rout
    ya = max(0, int(math.floor(y - rout)))
    yb = min(ny, int(math.ceil(y + rout)) + 1)
    xa = max(0, int(math.floor(x - rout)))
    xb = min(nx, int(math.ceil(x + rout)) + 1)
    out = np.empty(max(0, (yb - ya) * (xb - xa)))
    n = 0
    for py in range(ya, yb):
        dy2 = (py - y) ** 2
        for px in range(xa, xb):
            d2 = (px - x) ** 2 + dy2
            if d2 < r2in or d2 > r2out or (mask[py, px] & bad_bits):
                continue
            iy = py - ey0
            ix = px - ex0
            if 0 <= iy < eh and 0 <= ix < ew and exclude[iy, ix]:
                continue
            out[n] = image[py, px]
            n += 1
    return out[:n]
