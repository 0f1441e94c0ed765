"""The difference image's variance plane against the measured noise of the difference.

Two pairs with known truth: white noise in both images (``simulate_pair``), and a template
whose noise is correlated by a Lanczos-3 resampling (as a warp makes it; the noise field is
resampled, the plane left at its pre-resampling value as LSST's warps carry it, or
propagated per pixel). On each: ``diff / sqrt(var)`` has unit spread on source-free pixels
and at static stars, the correlation is applied only where it was measured, and what was
measured and applied is in ``metadata["diffim"]``.
"""

from __future__ import annotations

import numpy as np
import pytest

from procsky.diffim import SubtractionConfig, simulate_pair, subtract_images
from procsky.exposure import Exposure
from procsky.kernels import psfmatch as pm
from procsky.notes import collect_notes
from procsky.sim.render import resample_noise

SHAPE = (448, 448)
SEED = 3


def _z_checks(diff, truth, margin=40):
    """(z std on source-free pixels, PSF-weighted z std at static stars, pixel z std within
    the stars' footprints), from the truth positions of every star and transient."""
    d = np.asarray(diff.image, float)
    v = np.asarray(diff.variance, float)
    bad = (np.asarray(diff.mask) & diff.mask_bits("NO_DATA", "BAD", "SAT")) != 0
    ny, nx = d.shape
    yy, xx = np.mgrid[:ny, :nx]
    near = np.zeros((ny, nx), bool)
    st, tr = truth["stars"], truth["transients"]
    for x, y in zip(np.r_[st["x"], tr["x"]], np.r_[st["y"], tr["y"]]):
        ix, iy = int(round(x)), int(round(y))
        sl = (slice(max(iy - 12, 0), iy + 13), slice(max(ix - 12, 0), ix + 13))
        near[sl] |= (yy[sl] - y) ** 2 + (xx[sl] - x) ** 2 < 12**2
    free = ~near & ~bad
    free[:margin] = free[-margin:] = False
    free[:, :margin] = free[:, -margin:] = False
    z_free = d[free] / np.sqrt(v[free])
    z_psf, z_pix = [], []
    h = 10
    for x, y in zip(st["x"], st["y"]):
        ix, iy = int(round(x)), int(round(y))
        if not (margin < ix < nx - margin and margin < iy < ny - margin):
            continue
        if np.any(np.hypot(tr["x"] - x, tr["y"] - y) < 15):  # a transient on the star: not static sky
            continue
        sl = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        if bad[sl].any():
            continue
        p = diff.psf.kernel(x, y)
        c = p.shape[0] // 2
        p = p[c - h : c + h + 1, c - h : c + h + 1]
        z_psf.append((p * d[sl]).sum() / np.sqrt((p * p * v[sl]).sum()))
        core = (slice(iy - 5, iy + 6), slice(ix - 5, ix + 6))
        z_pix.append((d[core] / np.sqrt(v[core])).ravel())
    return float(z_free.std()), float(np.std(z_psf)), float(np.concatenate(z_pix).std()), len(z_psf)


@pytest.fixture(scope="module")
def white_pair():
    return simulate_pair(SHAPE, n_stars=260, seed=SEED, n_transients=4)


@pytest.fixture(scope="module")
def correlated_template(white_pair):
    """The white pair's scene with a template whose noise is Lanczos-3 resampled by a half-pixel
    shift (the strongest correlation a warp makes: neighbour correlation 0.26 per axis)."""
    _, tpl, _ = white_pair
    _, clean, _ = simulate_pair(SHAPE, n_stars=260, seed=SEED, n_transients=4, template_depth=1e9)
    var = np.asarray(tpl.variance, float)  # the template's variance before resampling
    noise, stats = resample_noise(np.random.default_rng(17).normal(size=var.shape) * np.sqrt(var), 0.5, 0.5)
    img = (np.asarray(clean.image, float) + noise).astype(np.float32)
    return img, var, stats


def test_white_pair_variance_matches_noise(white_pair):
    sci, tpl, truth = white_pair
    diff, _, summary = subtract_images(sci, tpl, lazy=False)
    z_free, z_psf, z_pix, n = _z_checks(diff, truth)
    assert n >= 100
    assert 0.9 <= z_free <= 1.1, z_free
    assert 0.9 <= z_psf <= 1.1, z_psf
    assert 0.9 <= z_pix <= 1.1, z_pix
    meta = diff.metadata["diffim"]
    # white noise measured as white: no correlation factor and no plane factor applied
    # (faint star wings used to make the science image look correlated: sum(rho) 1.5)
    assert not meta["noise_correlated_science"] and not meta["noise_correlated_template"]
    assert meta["noise_correlation_science"] == 1.0 and meta["noise_correlation_template"] == 1.0
    assert meta["variance_plane_factor_science"] == 1.0 and meta["variance_plane_factor_template"] == 1.0
    # the plane predicted the noise before any rescaling: measured ratio and factor recorded
    assert 0.95 <= meta["residual_std_sigma"] <= 1.05
    assert meta["noise_check_pixels"] == "source_free" and meta["noise_check_n_pixels"] > 20000
    assert meta["variance_rescale"] == pytest.approx(
        meta["residual_std_sigma"] ** 2 if abs(meta["residual_std_sigma"] - 1) > 0.02 else 1.0
    )
    assert summary is meta or summary == meta
    # a well-sampled pair: no model-error term in the plane (kernel_model_error)
    assert meta["kernel_model_error_applied"] is False
    on, _, s_on = subtract_images(sci, tpl, SubtractionConfig(model_error="on"), lazy=False)
    # and none measured when asked for: the kernel matches the PSFs
    assert s_on["kernel_model_error_n_stars"] >= 20 and s_on["kernel_model_error"] == 0.0


@pytest.mark.parametrize("plane", ["pre_resampling", "propagated"])
def test_correlated_template_variance_matches_noise(white_pair, correlated_template, plane):
    sci, tpl, truth = white_pair
    img, var, stats = correlated_template
    factor = stats["noise_variance_factor"]  # per-pixel variance after / before resampling
    pvar = var if plane == "pre_resampling" else var * factor
    tcorr = Exposure(img, pvar.astype(np.float32), psf=tpl.psf)
    diff, _, _ = subtract_images(sci, tcorr, lazy=False)
    meta = diff.metadata["diffim"]
    assert meta["noise_correlated_template"] and not meta["noise_correlated_science"]
    # sum of the correlation: (sum w)^2 / sum w^2 = 1 / factor for a Lanczos resampling
    # (the measured one is truncated at lag 3 and picks up a little from faint sources)
    assert meta["noise_correlation_template"] == pytest.approx(1.0 / factor, rel=0.1)
    want = factor if plane == "pre_resampling" else 1.0
    assert meta["variance_plane_factor_template"] == pytest.approx(want, rel=0.03)
    assert 0.95 <= meta["residual_std_sigma"] <= 1.05
    z_free, z_psf, z_pix, _ = _z_checks(diff, truth)
    assert 0.9 <= z_free <= 1.1, z_free
    assert 0.9 <= z_psf <= 1.1, z_psf
    assert 0.9 <= z_pix <= 1.1, z_pix


def test_noise_statistics_white_resampled_and_crowded():
    rng = np.random.default_rng(4)
    n = 400
    ones = np.ones((n, n))
    white = pm.noise_statistics(rng.normal(size=(n, n)) * 2.0, ones * 4.0, ones.astype(bool))
    assert not white["correlated"] and white["rho"].sum() == 1.0
    assert white["variance_ratio"] == pytest.approx(1.0, abs=4 * white["variance_ratio_err"])
    # a plane 1.5x the pixel noise is measured
    wrong = pm.noise_statistics(rng.normal(size=(n, n)), ones * 1.5, ones.astype(bool))
    assert wrong["variance_ratio"] == pytest.approx(1 / 1.5, rel=0.03)
    # resampled noise: correlated, the neighbour correlation as the Lanczos weights give it
    r, st = resample_noise(rng.normal(size=(n, n)), 0.3, -0.2)
    s = pm.noise_statistics(r, ones, ones.astype(bool))
    assert s["correlated"] and s["variance_ratio"] == pytest.approx(st["noise_variance_factor"], rel=0.03)
    rho = s["rho"]
    assert rho[3, 4] == pytest.approx(st["noise_corr_x"], abs=0.02)
    assert rho[4, 3] == pytest.approx(st["noise_corr_y"], abs=0.02)
    # white noise under many faint sources: the sources are found and left out, the noise
    # stays white (the plain correlation of noise_correlation sees their wings)
    img = rng.normal(size=(n, n)) * 3.0
    yy, xx = np.mgrid[-12:13, -12:13]
    for x, y, f in zip(rng.integers(12, n - 12, 300), rng.integers(12, n - 12, 300), rng.uniform(30, 3000, 300)):
        img[y - 12 : y + 13, x - 12 : x + 13] += f * np.exp(-(xx**2 + yy**2) / (2 * 2.0**2)) / (2 * np.pi * 4.0)
    free = pm.source_free_mask(img, ones * 9.0, np.zeros((n, n), bool), 2.0)
    assert 0.2 < free.mean() < 0.9
    s = pm.noise_statistics(img, ones * 9.0, free)
    assert not s["correlated"] and s["variance_ratio"] == pytest.approx(1.0, abs=0.03)
    assert pm.noise_correlation(img, ones * 9.0, np.zeros((n, n), bool)).sum() > 1.1


def test_variance_rescaled_to_measured_noise_and_noted():
    from procsky.diffim.subtract import _check_variance

    rng = np.random.default_rng(8)
    n = 300
    diff = (rng.normal(size=(n, n)) * 1.3).astype(np.float32)
    dvar = np.ones((n, n), np.float32)
    mask = np.zeros((n, n), np.uint32)
    summary: dict = {}
    with collect_notes() as notes:
        out = _check_variance(summary, diff, dvar, mask, 1, np.ones((n, n), bool), 2.0)
    assert summary["residual_std_sigma"] == pytest.approx(1.3, rel=0.01)
    assert summary["variance_rescale"] == pytest.approx(1.69, rel=0.02)
    assert (diff / np.sqrt(out)).std() == pytest.approx(1.0, abs=0.01)
    assert [x["code"] for x in notes] == ["variance_rescaled"]
    # within 2%: measured and recorded, the plane kept
    summary = {}
    with collect_notes() as notes:
        out = _check_variance(summary, diff / np.float32(1.3), dvar, mask, 1, np.ones((n, n), bool), 2.0)
    assert summary["variance_rescale"] == 1.0 and out is dvar and not notes


def _star_field(rng, n=120, size=400, sigma=0.8):
    """Static image of ``n`` Gaussian stars (sigma px) on a grid, their positions and PSF."""
    yy, xx = np.mgrid[0:size, 0:size]
    xs = rng.uniform(20, size - 20, n)
    ys = rng.uniform(20, size - 20, n)
    flux = 10 ** rng.uniform(3.5, 5.5, n)
    s = np.zeros((size, size))
    for x, y, f in zip(xs, ys, flux):
        s += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    k = np.mgrid[-4:5, -4:5]
    psf = np.exp(-(k[0] ** 2 + k[1] ** 2) / (2 * sigma**2))
    return s, xs, ys, psf / psf.sum()


def test_kernel_model_error_recovers_an_injected_error_and_clips_a_variable():
    # A difference whose pixels carry the sky noise plus a model error of eps_true times the
    # static image, independent per pixel (the variance model of kernel_model_error): the
    # measured eps within 10 % of the truth, a variable (a 30 % change of a bright star) left
    # out, and with no model error (sky noise only) no term (eps below 0.2 % against 3 %).
    from procsky.diffim.subtract import kernel_model_error

    rng = np.random.default_rng(7)
    s, xs, ys, psf = _star_field(rng)
    var = np.full(s.shape, 100.0) + s  # sky + the science star's photon noise
    eps_true = 0.03
    d = rng.normal(0.0, np.sqrt(var + (eps_true * s) ** 2))
    i = int(np.argmax([s[int(round(y)), int(round(x))] for x, y in zip(xs, ys)]))
    yy, xx = np.mgrid[0 : s.shape[0], 0 : s.shape[1]]
    d += 0.3 * s * (np.hypot(xx - xs[i], yy - ys[i]) < 4)  # the variable's change
    out = kernel_model_error(d, var, s, psf, xs, ys)
    assert out["kernel_model_error"] == pytest.approx(eps_true, rel=0.1)
    assert out["kernel_model_error_n_stars"] < len(xs)  # the variable (and nothing much else) left out
    assert out["kernel_model_error_n_stars"] >= len(xs) - 5
    clean = rng.normal(0.0, np.sqrt(var))
    assert kernel_model_error(clean, var, s, psf, xs, ys)["kernel_model_error"] < 0.002
    # too few stars: no term
    assert kernel_model_error(d, var, s, psf, xs[:3], ys[:3])["kernel_model_error"] == 0.0
