"""Tests of procsky.kernels.background against slow numpy versions, sep and SExtractor."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from procsky.kernels import _bits
from procsky.kernels.background import (
    clipped_mode,
    estimate_background,
    interpolate_mesh,
    mesh_statistics,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "sep"


def slow_clipped_mode(values, nsigma=3.0, max_iter=20):
    v = np.asarray(values, float)
    for _ in range(max_iter):
        med = np.median(v)
        sig = v.std(ddof=1)
        keep = v[np.abs(v - med) <= nsigma * sig]
        if keep.size == v.size:
            break
        stop = (v.size - keep.size) < 0.001 * v.size
        v = keep
        if stop:
            break
    med, mean, sig = np.median(v), v.mean(), v.std(ddof=1)
    return (2.5 * med - 1.5 * mean if abs(mean - med) / sig < 0.3 else med), sig


def test_mask_bits_match_lsst_order():
    assert (_bits.BAD, _bits.SAT, _bits.INTRP, _bits.CR, _bits.EDGE, _bits.DETECTED, _bits.NO_DATA) == (
        0,
        1,
        2,
        3,
        4,
        5,
        8,
    )
    masks = pytest.importorskip("procsky.masks")
    for name in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA"):
        assert masks.STANDARD_PLANES[name] == getattr(_bits, name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_mode_matches_slow_version(seed):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.normal(100, 5, 5000), rng.exponential(200, 300) + 100])
    mode, sig, n = clipped_mode(v.copy(), 3.0, 20)
    smode, ssig = slow_clipped_mode(v)
    assert mode == pytest.approx(smode, rel=1e-9)
    assert sig == pytest.approx(ssig, rel=1e-9)


def test_mesh_statistics_matches_slow_version():
    rng = np.random.default_rng(3)
    img = rng.normal(10, 2, (150, 170)).astype(np.float32)
    ignore = rng.random(img.shape) < 0.2
    back, rms = mesh_statistics(img, ignore, 64, 64, 3.0, 20, 0.5)
    assert back.shape == (3, 3)
    for by in range(3):
        for bx in range(3):
            box = img[by * 64 : (by + 1) * 64, bx * 64 : (bx + 1) * 64]
            ign = ignore[by * 64 : (by + 1) * 64, bx * 64 : (bx + 1) * 64]
            m, s = slow_clipped_mode(box[~ign].astype(np.float32))
            assert back[by, bx] == pytest.approx(m, rel=1e-5, abs=1e-5)
            assert rms[by, bx] == pytest.approx(s, rel=1e-5)


def test_interpolate_mesh_is_natural_bicubic_spline():
    rng = np.random.default_rng(4)
    grid = rng.normal(size=(4, 5))
    ny, nx, by, bx = 100, 130, 25, 26
    out = interpolate_mesh(grid, ny, nx, by, bx)
    ty = (np.arange(by * 4) + 0.5) / by - 0.5
    tx = (np.arange(nx) + 0.5) / bx - 0.5
    cols = np.column_stack([CubicSpline(np.arange(4), grid[:, j], bc_type="natural")(ty[:ny]) for j in range(5)])
    ref = np.vstack([CubicSpline(np.arange(5), cols[i], bc_type="natural")(tx) for i in range(ny)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_background_recovers_smooth_sky_under_stars():
    from procsky.kernels.testing import make_star_field

    fr = make_star_field((512, 512), 150, fwhm=4.0, flux_range=(1e3, 2e5), sky=0.0, read_noise=20.0, seed=5)
    yy, xx = np.mgrid[:512, :512]
    sky = 300.0 + 0.1 * xx - 0.05 * yy + 20 * np.sin(yy / 150.0)
    img = fr.image + sky.astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[100:140, 200:260] = 1 << _bits.BAD
    img[100:140, 200:260] = 1e5  # garbage under the BAD mask must not matter
    bk = estimate_background(img, mask, box_size=64)
    err = bk.background - sky
    assert np.median(np.abs(err)) < 0.1 * 20.0
    assert bk.global_rms == pytest.approx(20.0, rel=0.05)
    assert np.abs(err).max() < 0.5 * 20.0


def test_background_iterates_with_detection_mask():
    rng = np.random.default_rng(6)
    img = rng.normal(100, 10, (256, 256)).astype(np.float32)
    img[50:150, 50:150] += 30.0  # a large faint object
    det = np.zeros(img.shape, bool)
    det[45:155, 45:155] = True
    biased = estimate_background(img, box_size=64).background
    clean = estimate_background(img, ignore=det, box_size=64).background
    assert np.abs(clean[100, 100] - 100) < np.abs(biased[100, 100] - 100)
    assert np.abs(clean[100, 100] - 100) < 3.0


@pytest.mark.parametrize("seed", [7, 8])
def test_background_agrees_with_sep(seed):
    sep = pytest.importorskip("sep")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:400, :300]
    truth = 50 + 0.02 * xx + 0.01 * yy
    img = rng.normal(0, 5, (400, 300)) + truth
    ours = estimate_background(img, box_size=64, filter_size=3)
    ref = sep.Background(img, bw=64, bh=64, fw=3, fh=3)
    # both are noisy mode estimates (sep on a histogram): close to each other, and ours is
    # no worse than sep against the truth
    assert np.median(np.abs(ours.background - ref.back())) < 0.06 * 5
    assert np.abs(ours.background - truth).max() < 1.2 * np.abs(ref.back() - truth).max() + 0.05 * 5
    assert ours.global_rms == pytest.approx(ref.globalrms, rel=0.02)


def test_background_thread_safe():
    rng = np.random.default_rng(8)
    img = rng.normal(0, 1, (300, 300)).astype(np.float32)
    ref = estimate_background(img, box_size=50).background
    out = [None, None]

    def run(i):
        out[i] = estimate_background(img, box_size=50).background

    th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    np.testing.assert_array_equal(out[0], ref)
    np.testing.assert_array_equal(out[1], ref)


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "back.fits").exists(), reason="../shared/data/real/sep not available")
def test_background_vs_sextractor_back_fits():
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ESO-LOG cards of this old header are non-standard
        img = fits.getdata(REAL / "image.fits").astype(np.float32)
        ref = fits.getdata(REAL / "back.fits").astype(np.float64)
    # SExtractor BACK_SIZE 64, BACK_FILTERSIZE 3, window shrunk at the mesh edges
    bk = estimate_background(img, box_size=64, filter_size=3, extrapolate_edges=False)
    diff = np.abs(bk.background - ref) / bk.global_rms
    # SExtractor estimates the mode on a histogram, we on exact clipped values
    assert np.median(diff) < 0.05
    assert diff.max() < 0.25


def test_background_of_unusable_image_raises_clear_error():
    with pytest.raises(ValueError, match="no finite pixel"):
        estimate_background(np.full((50, 50), np.nan, np.float32), box_size=16)
    # fully masked but finite: falls back to all finite pixels rather than failing
    img = np.random.default_rng(9).normal(5, 1, (64, 64)).astype(np.float32)
    bk = estimate_background(img, np.full(img.shape, 1, np.uint32), box_size=32)
    assert abs(bk.global_background - 5) < 0.3


def test_rms_at_points_is_the_rms_map():
    """Without the RMS map (rms_plane=False) ``rms_at`` gives the map's float32 values at any
    pixel, edges and corners included; the background map is unchanged."""
    rng = np.random.default_rng(3)
    ny, nx = 300, 410
    yy, xx = np.mgrid[:ny, :nx]
    img = (100.0 + 0.05 * xx + rng.normal(0.0, 5.0 + 0.01 * yy, (ny, nx))).astype(np.float32)
    for box in (64, (50, 128), 512):
        full = estimate_background(img, box_size=box)
        lean = estimate_background(img, box_size=box, rms_plane=False)
        assert lean.rms is None and np.array_equal(lean.background, full.background)
        ys = np.concatenate([rng.integers(0, ny, 500), [0, 0, ny - 1, ny - 1]])
        xs = np.concatenate([rng.integers(0, nx, 500), [0, nx - 1, 0, nx - 1]])
        got = lean.rms_at(ys, xs)
        assert got.dtype == np.float32 and np.array_equal(got, full.rms[ys, xs])
        assert np.array_equal(full.rms_at(ys, xs), full.rms[ys, xs])
