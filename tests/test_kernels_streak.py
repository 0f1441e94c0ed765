"""Tests of procsky.kernels.streak (satellite-trail finder) against injected truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from procsky.kernels._bits import BAD, CR, DETECTED, SAT, bit
from procsky.kernels.detection import detect_sources
from procsky.kernels.streak import STREAK, find_streaks, streak_model
from procsky.kernels.testing import add_cosmic_rays, make_star_field

SKY = 500.0
RN = 5.0
NOISE = math.sqrt(SKY + RN**2)
PSF_SIGMA = 4.0 / 2.3548


# ----------------------------------------------------------------------------- helpers
def inject_trail(shape, theta, rho, amp, sigma, t0=-np.inf, t1=np.inf):
    """Noiseless trail ``amp exp(-d^2 / 2 sigma^2)``, d the distance to ``x cos + y sin = rho``,
    between along-line coordinates ``t0 <= -x sin + y cos <= t1`` (pixel centres)."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    d = x * math.cos(theta) + y * math.sin(theta) - rho
    t = -x * math.sin(theta) + y * math.cos(theta)
    return amp * np.exp(-0.5 * (d / sigma) ** 2) * ((t >= t0) & (t <= t1))


def frame_with(trails, *, shape=(1024, 1024), n_stars=800, seed=0):
    """Star field plus trails (with their Poisson noise), detected like calibrate does.

    Returns image (background-subtracted), variance, mask (DETECTED set), true trail image.
    """
    f = make_star_field(shape, n_stars, fwhm=4.0, sky=SKY, read_noise=RN, flux_range=(300.0, 3e5), seed=seed)
    rng = np.random.default_rng(seed + 100)
    true = np.zeros(shape)
    for tr in trails:
        true += inject_trail(shape, *tr)
    image = (f.image - SKY + true + rng.normal(size=shape) * np.sqrt(true)).astype(np.float32)
    variance = (f.variance + true).astype(np.float32)
    mask = np.zeros(shape, np.uint32)
    det = detect_sources(image, variance, mask, psf_sigma=PSF_SIGMA, nsigma=5.0)
    mask[det.detected] |= np.uint32(bit(DETECTED))
    return image, variance, mask, true


def centre_offset(theta, rho, theta_true, rho_true, shape):
    """Distance between the fitted and the true line at the image centre, pixels."""
    yc, xc = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    # fitted line: distance of its closest point to the centre, measured along the true normal
    d_fit = xc * math.cos(theta) + yc * math.sin(theta) - rho
    px, py = xc - d_fit * math.cos(theta), yc - d_fit * math.sin(theta)
    return px * math.cos(theta_true) + py * math.sin(theta_true) - rho_true


def angle_diff(a, b):
    d = (a - b) % math.pi
    return min(d, math.pi - d)


def test_streak_bit_matches_masks():
    from procsky.masks import STANDARD_PLANES

    assert STANDARD_PLANES["STREAK"] == STREAK


# ----------------------------------------------------------------------------- recovery
@pytest.mark.parametrize(
    "snr_peak, theta, rho, sigma, tol",
    [
        # faint: 0.7 sigma per pixel at the peak, S/N ~45 over its ~1100 px: width and
        # amplitude are known to a few per cent only (statistical 1-sigma ~3 %)
        (0.7, 0.35, 500.0, 2.5, 0.10),
        (2.0, 1.60, 480.0, 3.0, 0.03),  # near-horizontal
        (7.0, 2.49, -150.0, 2.5, 0.02),  # bright, like `small` visit 14
        (1.5, 0.02, 600.0, 2.2, 0.03),  # near-vertical (the direction of bleed columns)
    ],
)
def test_recovers_injected_trail(snr_peak, theta, rho, sigma, tol):
    amp = snr_peak * NOISE
    image, variance, mask, true = frame_with([(theta, rho, amp, sigma)], seed=int(10 * snr_peak))
    res = find_streaks(image, variance, mask, psf_sigma=PSF_SIGMA)
    assert len(res.streaks) == 1, res.streaks
    s = res.streaks[0]
    assert angle_diff(s["theta"], theta) < 1.5e-3
    assert abs(centre_offset(s["theta"], s["rho"], theta, rho, image.shape)) < 0.3
    assert abs(s["width"] / sigma - 1) < max(tol, 0.05)
    assert abs(s["amplitude"] / amp - 1) < tol
    assert s["snr"] > 10
    # the trail crosses the whole image: end points on the border
    for x, y in ((s["x0"], s["y0"]), (s["x1"], s["y1"])):
        assert min(abs(x + 0.5), abs(x - 1023.5), abs(y + 0.5), abs(y - 1023.5)) < 1.0
    # masked out to where the profile falls below ~0.5 sigma: all of true > 1 sigma
    above = true > NOISE
    if above.any():
        assert res.mask[above].mean() >= 0.95
    # and not much wider than the true > 0.5 sigma region
    assert res.mask.sum() <= 1.3 * max((true > 0.5 * np.sqrt(variance)).sum(), 1) + 4 * 1024
    # the model removes the trail: residual mean over the trail pixels ~ 0
    core = true > 0.3 * amp
    resid = (image - res.model)[core & ~((mask & np.uint32(bit(DETECTED))) != 0) | core & (true > NOISE)]
    assert abs(np.median(resid)) < 0.1 * amp + 0.5


def test_trail_ending_in_the_image():
    theta, rho, amp, sigma = 0.8, 700.0, 3.0 * NOISE, 2.5
    t0, t1 = -200.0, 350.0
    image, variance, mask, true = frame_with([(theta, rho, amp, sigma, t0, t1)], seed=3)
    res = find_streaks(image, variance, mask, psf_sigma=PSF_SIGMA)
    assert len(res.streaks) == 1
    s = res.streaks[0]
    c, sn = math.cos(s["theta"]), math.sin(s["theta"])
    ts = sorted([-s["x0"] * sn + s["y0"] * c, -s["x1"] * sn + s["y1"] * c])
    assert abs(ts[0] - t0) < 40 and abs(ts[1] - t1) < 40, ts
    above = true > NOISE
    assert res.mask[above].mean() >= 0.95
    # nothing masked far beyond the ends
    y, x = np.nonzero(res.mask)
    t = -x * math.sin(theta) + y * math.cos(theta)
    assert t.min() > t0 - 50 and t.max() < t1 + 50


def test_two_crossing_trails():
    trails = [(0.5, 600.0, 2.0 * NOISE, 2.5), (2.3, -300.0, 1.0 * NOISE, 3.0)]
    image, variance, mask, true = frame_with(trails, seed=5)
    res = find_streaks(image, variance, mask, psf_sigma=PSF_SIGMA)
    assert len(res.streaks) == 2
    found = sorted(res.streaks, key=lambda s: s["theta"])
    # the second trail (1 sigma/pixel over 770 px, S/N ~40) has amplitude and width
    # anticorrelated at the ~5 % level, and stars merged with its footprint bias its flux
    # per unit length by up to +7 % (measured, seed 5)
    for s, (theta, rho, amp, sigma), tol in zip(found, trails, (0.05, 0.10)):
        assert angle_diff(s["theta"], theta) < 2e-3
        assert abs(centre_offset(s["theta"], s["rho"], theta, rho, image.shape)) < 0.5
        assert abs(s["amplitude"] / amp - 1) < tol
        assert abs(s["width"] / sigma - 1) < tol
        assert abs(s["amplitude"] * s["width"] / (amp * sigma) - 1) < tol
    above = true > NOISE
    assert res.mask[above].mean() >= 0.95
    # streak_model re-renders the same model from the parameters
    model, m2 = streak_model(image.shape, res.streaks, variance)
    assert np.allclose(model, res.model, atol=1e-3)
    assert (m2 == res.mask).all()


# ----------------------------------------------------------------------------- no false streaks
def _artifacts(image, variance, mask, rng, sat_level=60000.0):
    """Saturated stars with vertical bleed columns, bad columns, cosmic rays, edge-on galaxies."""
    ny, nx = image.shape
    y, x = np.mgrid[0:ny, 0:nx]
    for _ in range(6):  # saturated stars with bleed trails (SAT-masked, clipped at full well)
        xc, yc = rng.uniform(50, nx - 50), rng.uniform(50, ny - 50)
        star = 3e7 / (2 * math.pi * PSF_SIGMA**2) * np.exp(-0.5 * ((x - xc) ** 2 + (y - yc) ** 2) / PSF_SIGMA**2)
        image += star.astype(np.float32)
        variance += star.astype(np.float32)
        half = int(rng.uniform(60, 400))
        xi, yi = round(xc), round(yc)
        sl = (slice(max(yi - half, 0), yi + half), slice(xi - 1, xi + 2))
        image[sl] = sat_level
        over = image > sat_level
        image[over] = sat_level
        mask[sl] |= np.uint32(bit(SAT))
        mask[over] |= np.uint32(bit(SAT))
    for _ in range(3):  # bad columns (masked) and a warm column segment (masked)
        xi = int(rng.uniform(10, nx - 10))
        y0 = int(rng.uniform(0, ny / 2))
        image[y0:, xi] += 2000.0
        mask[y0:, xi] |= np.uint32(bit(BAD))
    for _ in range(5):  # bright edge-on galaxies (elongated, ~60 px long)
        xc, yc, a = rng.uniform(50, nx - 50), rng.uniform(50, ny - 50), rng.uniform(0, math.pi)
        u = (x - xc) * math.cos(a) + (y - yc) * math.sin(a)
        v = -(x - xc) * math.sin(a) + (y - yc) * math.cos(a)
        g = 2000.0 * np.exp(-0.5 * ((u / 15.0) ** 2 + (v / 2.5) ** 2))
        image += g.astype(np.float32)
        variance += g.astype(np.float32)
    img, crm = add_cosmic_rays(image, 300, seed=int(rng.integers(1 << 30)))
    image[:] = img
    # half of the hits flagged (as L.A.Cosmic would), half left in
    flag = crm & (rng.uniform(size=crm.shape) < 0.5)
    mask[flag] |= np.uint32(bit(CR))


@pytest.mark.parametrize("seed, n_stars", [(11, 800), (12, 3000), (13, 6000)])
def test_no_streak_in_trail_free_fields(seed, n_stars):
    f = make_star_field((1024, 1024), n_stars, fwhm=4.0, sky=SKY, read_noise=RN, flux_range=(300.0, 3e5), seed=seed)
    image = (f.image - SKY).astype(np.float32)
    variance = f.variance.copy()
    mask = np.zeros(image.shape, np.uint32)
    _artifacts(image, variance, mask, np.random.default_rng(seed))
    det = detect_sources(image, variance, mask, psf_sigma=PSF_SIGMA, nsigma=5.0)
    mask[det.detected] |= np.uint32(bit(DETECTED))
    res = find_streaks(image, variance, mask, psf_sigma=PSF_SIGMA)
    assert len(res.streaks) == 0, res.streaks
    assert not res.mask.any()
    assert not res.model.any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="psf_sigma"):
        find_streaks(np.zeros((64, 64)), np.ones((64, 64)), psf_sigma=0.0)
    with pytest.raises(ValueError, match="same shape"):
        find_streaks(np.zeros((64, 64)), np.ones((64, 32)), psf_sigma=1.5)
    # a blank image: nothing found, no error
    res = find_streaks(np.zeros((256, 256)), np.ones((256, 256)), psf_sigma=1.5)
    assert len(res.streaks) == 0 and res.mask.shape == (256, 256)


# ----------------------------------------------------------------------------- `small` simulation
@pytest.mark.slow
def test_streak_on_simulated_small_visit14(tmp_path):
    """`small` visit 14 (r band), detector 3: the simulator's satellite trail crosses it."""
    pytest.importorskip("galsim")
    import pandas as pd

    from procsky.exposure import Exposure
    from procsky.instruments.simcam import SimcamGeometry
    from procsky.kernels.background import estimate_background
    from procsky.sim import simulate
    from procsky.sim.recipe import load_recipe
    from procsky.sim.render import _satellite, image_filename

    simulate("small", tmp_path, visits=[14], detectors=[3], scheduler="sync", workers=1, progress=False)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    visit = pd.read_parquet(tmp_path / "truth/visits.parquet").set_index("visit").loc[14].to_dict()
    visit["visit"] = 14
    exp = Exposure.read(tmp_path / "images" / image_filename("calexp", 14, 3)).compute()
    image = np.asarray(exp.image, np.float32)
    variance = np.asarray(exp.variance, np.float32)
    mask = np.asarray(exp.mask, np.uint32)
    gain = exp.detector["gain"]
    sigma = math.hypot(visit["psf_fwhm_atm"], visit["psf_fwhm_optics"]) / visit["psf_pixel_scale"] / 2.3548
    # background (sources and trail masked by a first detection), detection: calibrate's steps 1-3b
    bkg = estimate_background(image, mask).background
    det0 = detect_sources(image - bkg, variance, mask, psf_sigma=sigma, nsigma=5.0)
    bkg = estimate_background(
        image,
        mask | np.where(det0.detected, np.uint32(bit(DETECTED)), np.uint32(0)),
        bad_bits=int(bit(BAD) | bit(SAT) | bit(CR) | bit(DETECTED) | (1 << 8)),
    ).background
    sub = (image - bkg).astype(np.float32)
    det = detect_sources(sub, variance, mask, psf_sigma=sigma, nsigma=5.0)
    mask[det.detected] |= np.uint32(bit(DETECTED))
    res = find_streaks(sub, variance, mask, psf_sigma=sigma)

    true = _satellite(visit, SimcamGeometry(recipe.instrument, recipe.seed), 3, image.shape) / gain
    noise = np.sqrt(variance)
    assert len(res.streaks) == 1, res.streaks
    s = res.streaks[0]
    assert abs(s["width"] / visit["sat_sigma_px"] - 1) < 0.03
    assert abs(s["amplitude"] / (visit["sat_peak_e"] / gain) - 1) < 0.03
    assert s["length"] > 1900
    # the fitted line follows the true one within 0.3 px along its length (centroid of the
    # noiseless trail across the fitted line, bilinearly interpolated)
    c, sn = math.cos(s["theta"]), math.sin(s["theta"])
    ts = sorted([-s["x0"] * sn + s["y0"] * c, -s["x1"] * sn + s["y1"] * c])
    ds = np.arange(-20, 20.01, 0.25)
    for t in np.linspace(ts[0], ts[1], 9)[1:-1]:
        xs = s["rho"] * c - t * sn + ds * c
        ys = s["rho"] * sn + t * c + ds * sn
        x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
        fx, fy = xs - x0, ys - y0
        v = (
            true[y0, x0] * (1 - fx) * (1 - fy)
            + true[y0, x0 + 1] * fx * (1 - fy)
            + true[y0 + 1, x0] * (1 - fx) * fy
            + true[y0 + 1, x0 + 1] * fx * fy
        )
        assert abs(np.sum(ds * v) / np.sum(v)) < 0.3
    # masking completeness where the true trail is above 1 sigma
    above = true > noise
    assert res.mask[above].mean() >= 0.95
    # subtracting the model leaves no trail: mean residual over the trail core, off sources
    core = (true > 0.5 * true.max()) & ((mask & np.uint32(bit(SAT) | bit(BAD))) == 0)
    resid = (sub - res.model)[core]
    assert abs(np.median(resid)) < 0.03 * true.max()


@pytest.mark.slow
def test_no_streak_on_small_r_det4(small_r_det4_calexps):
    """The ten r-band visits of `small` on detector 4 (no trail there): no streak found."""
    for v, calexp in small_r_det4_calexps.items():
        ny, nx = calexp.shape
        sigma = float(calexp.psf.fwhm(0.5 * nx, 0.5 * ny)) / 2.3548
        res = find_streaks(
            np.asarray(calexp.image), np.asarray(calexp.variance), np.asarray(calexp.mask, np.uint32), psf_sigma=sigma
        )
        assert len(res.streaks) == 0, (v, res.streaks)
