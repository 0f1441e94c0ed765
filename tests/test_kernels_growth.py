"""Growth-curve aperture-to-total correction (procsky.kernels.growth)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from procsky.kernels.growth import aperture_to_total, ring_profiles
from procsky.kernels.measure import aperture_flux


def _moffat_stamp(size, xc, yc, fwhm, beta, flux, oversample=3):
    """Pixel-integrated (oversampled) Moffat of total flux ``flux`` (to infinity)."""
    a = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    o = (np.arange(oversample) + 0.5) / oversample - 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    img = np.zeros((size, size))
    for dy in o:
        for dx in o:
            r2 = (xx + dx - xc) ** 2 + (yy + dy - yc) ** 2
            img += (beta - 1.0) / (math.pi * a * a) * (1.0 + r2 / (a * a)) ** (-beta)
    return flux * img / oversample**2


def _moffat_enclosed(r, fwhm, beta):
    a = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + (r / a) ** 2) ** (1.0 - beta)


def _field(n_stars=12, fwhm=5.5, beta=3.3, sky_sigma=5.0, seed=3, neighbours=False):
    rng = np.random.default_rng(seed)
    ny = nx = 600
    img = np.zeros((ny, nx))
    xs, ys, fl = [], [], []
    for k in range(n_stars):
        x = 80 + (k % 4) * 145 + rng.uniform(-0.5, 0.5)
        y = 80 + (k // 4) * 145 + rng.uniform(-0.5, 0.5)
        f = rng.uniform(2e5, 1e6)
        img += _moffat_stamp(ny, x, y, fwhm, beta, f)
        xs.append(x), ys.append(y), fl.append(f)
    children = np.zeros((ny, nx), np.int32)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for k, (x, y) in enumerate(zip(xs, ys)):
        children[(xx - x) ** 2 + (yy - y) ** 2 < 12**2] = k + 1
    if neighbours:  # a compact bright galaxy in the first ring of every star, with its footprint
        for k, (x, y) in enumerate(zip(xs, ys)):
            gx, gy = x + 24.0, y + 3.0
            img += _moffat_stamp(ny, gx, gy, 3.0, 4.0, 4e4)
            children[(xx - gx) ** 2 + (yy - gy) ** 2 < 9**2] = 100 + k
    var = np.full((ny, nx), sky_sigma**2) + np.maximum(img, 0.0) / 1.5
    img = img + rng.normal(0.0, 1.0, img.shape) * np.sqrt(var)
    return img, var, children, np.array(xs), np.array(ys), np.array(fl)


def _ap(img, var, x, y, r):
    mask = np.zeros(img.shape, np.uint32)
    out = [aperture_flux(img, var, mask, xi, yi, r, 0) for xi, yi in zip(x, y)]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


@pytest.mark.parametrize("beta", [3.0, 4.0])
def test_aperture_to_total_recovers_moffat_wing(beta):
    fwhm = 5.5
    img, var, children, x, y, _ = _field(fwhm=fwhm, beta=beta)
    ap, ap_err = _ap(img, var, x, y, 17.0)
    inner = {r: _ap(img, var, x, y, r) for r in (9.0, 12.0)}
    own = np.arange(1, x.size + 1)
    mask = np.zeros(img.shape, np.uint32)
    g = aperture_to_total(img, var, mask, children, own, x, y, ap, ap_err, 17.0, inner_fluxes=inner)
    truth = 1.0 / _moffat_enclosed(17.0, fwhm, beta)
    assert g.status == "measured" and g.n_stars >= 10
    # beta 3: 1.1 % outside 17 px, beta 4: 0.2 %; recovered to 0.1 % (1 mmag)
    assert g.correction == pytest.approx(truth, abs=1e-3), (g.correction, truth, g.error)
    assert abs(g.correction - truth) < 4 * g.error + 2e-4
    assert 0 < g.tail_fraction < 0.5 * (truth - 1.0)
    assert 4.0 < g.gamma < 2 * beta + 1


def test_aperture_to_total_ignores_neighbour_footprints():
    fwhm, beta = 5.5, 3.5
    img, var, children, x, y, _ = _field(fwhm=fwhm, beta=beta, neighbours=True, seed=5)
    ap, ap_err = _ap(img, var, x, y, 17.0)
    own = np.arange(1, x.size + 1)
    mask = np.zeros(img.shape, np.uint32)
    g = aperture_to_total(img, var, mask, children, own, x, y, ap, ap_err, 17.0)
    truth = 1.0 / _moffat_enclosed(17.0, fwhm, beta)
    assert g.correction == pytest.approx(truth, abs=1.5e-3)
    # without the labels the neighbours' light would be counted as wing (4e4 of ~6e5: +~5 %)
    g2 = aperture_to_total(
        img, var, mask, np.where(children >= 100, 0, children), own, x, y, ap, ap_err, 17.0, nsigma=1e6
    )
    assert g2.correction - truth > 0.01 or g2.status != "measured"


def test_aperture_to_total_too_few_stars_says_why():
    img, var, children, x, y, _ = _field(n_stars=2)
    ap, ap_err = _ap(img, var, x, y, 17.0)
    g = aperture_to_total(img, var, np.zeros(img.shape, np.uint32), children, np.arange(1, 3), x, y, ap, ap_err, 17.0)
    assert g.correction == 1.0 and "only 2 stars" in g.status
    d = g.to_dict()
    assert d["correction"] == 1.0 and d["status"] == g.status


def test_ring_profiles_masked_and_edge_rings_are_nan():
    img, var, children, x, y, _ = _field(n_stars=4)
    mask = np.zeros(img.shape, np.uint32)
    mask[:, : int(x[0])] = 1  # half of star 0's rings are masked
    xs = np.r_[x, 5.0]  # and one position on the image edge
    ys = np.r_[y, 300.0]
    own = np.r_[np.arange(1, 5), 0]
    mean, _, sky, _ = ring_profiles(img, var, mask, children, own, xs, ys, [17, 21, 26], (30, 40), 1)
    assert mean.shape == (5, 2) and sky.shape == (5,)
    assert np.isfinite(mean[1:4]).all() and np.isfinite(sky[1:4]).all()
    assert np.isnan(mean[4]).all()  # less than half of each ring on the image
    with pytest.raises(ValueError, match="increasing"):
        ring_profiles(img, var, mask, children, own, xs, ys, [17, 17], (30, 40), 1)
    with pytest.raises(ValueError, match="beyond"):
        ring_profiles(img, var, mask, children, own, xs, ys, [17, 26], (20, 40), 1)
