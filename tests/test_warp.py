"""Warping: Lanczos kernel against a slow reference, mask/variance propagation, pixel
mapping accuracy, flux conservation, lazy exposures."""

from __future__ import annotations

import math
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from procsky import masks
from procsky.errors import NoWorkError
from procsky.exposure import Exposure
from procsky.kernels.warp import (
    area_ratio,
    lanczos,
    lanczos_noise_correlation,
    warp_kernel_image,
    warp_planes,
)
from procsky.photocalib import PhotoCalib
from procsky.psf import GaussianPsf
from procsky.skymap import Box
from procsky.warp import WarpConfig, pixel_mapping, warp_exposure
from test_coadd import (
    make_skymap,
    make_stars,
    make_visit,
    render_gaussians,
    visit_cards,
)

NO_DATA = masks.bit("NO_DATA")


def slow_warp(image, variance, mask, xin, yin, order=3):
    """Obvious Python reference of Lanczos warping (normalised weights, OR of footprint)."""
    ny, nx = xin.shape
    oi = np.full((ny, nx), np.nan)
    ov = np.full((ny, nx), np.nan)
    om = np.zeros((ny, nx), np.uint32)
    h, w = image.shape
    for j in range(ny):
        for i in range(nx):
            x, y = xin[j, i], yin[j, i]
            ix, iy = math.floor(x), math.floor(y)
            xs = np.arange(ix - order + 1, ix + order + 1)
            ys = np.arange(iy - order + 1, iy + order + 1)
            if xs[0] < 0 or ys[0] < 0 or xs[-1] >= w or ys[-1] >= h:
                om[j, i] = NO_DATA
                continue
            wx = lanczos(x - xs, order)
            wy = lanczos(y - ys, order)
            wgt = np.outer(wy / wy.sum(), wx / wx.sum())
            sub = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
            oi[j, i] = (wgt * image[sub]).sum()
            ov[j, i] = (wgt**2 * variance[sub]).sum()
            om[j, i] = np.bitwise_or.reduce(mask[sub].ravel())
    return oi, ov, om


def test_lanczos_against_reference():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    var = rng.uniform(0.5, 2, size=(40, 50)).astype(np.float32)
    msk = np.zeros((40, 50), np.uint32)
    msk[20, 25] = masks.bit("SAT")
    yy, xx = np.mgrid[0:30, 0:30].astype(float)
    th = 0.3
    xin = 10 + 0.9 * (np.cos(th) * xx - np.sin(th) * yy) + 0.13
    yin = 8 + 0.9 * (np.sin(th) * xx + np.cos(th) * yy) + 0.71
    ref = slow_warp(img, var, msk, xin, yin)
    got = warp_planes(img, var, msk, xin, yin)
    ok = np.isfinite(ref[0])
    assert ok.sum() > 200
    np.testing.assert_allclose(got[0][ok], ref[0][ok], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1][ok], ref[1][ok], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], ref[2])
    assert np.all(np.isnan(got[0][~ok]))


def test_constant_shift_and_no_data():
    img = np.full((30, 30), 7.0, np.float32)
    var = np.ones((30, 30), np.float32)
    msk = np.zeros((30, 30), np.uint32)
    yy, xx = np.mgrid[0:30, 0:30].astype(float)
    out, ov, om = warp_planes(img, var, msk, xx + 0.37, yy - 0.21)
    inside = (om & NO_DATA) == 0
    np.testing.assert_allclose(out[inside], 7.0, rtol=1e-6)
    # Integer shifts reproduce the input exactly (weights are a delta).
    rng = np.random.default_rng(1)
    img = rng.normal(size=(30, 30)).astype(np.float32)
    out, ov, om = warp_planes(img, var, msk, xx + 2, yy + 1)
    np.testing.assert_allclose(out[2:24, 0:24], img[3:25, 2:26], atol=1e-6)
    np.testing.assert_allclose(ov[2:24, 0:24], 1.0, atol=1e-6)
    # Beyond the input, and where the footprint leaves it: NO_DATA, NaN.
    assert np.all(om[:, 26:] & NO_DATA) and np.all(np.isnan(out[:, 26:]))
    # A NO_DATA input pixel spoils exactly the outputs whose kernel uses it.
    msk[10, 10] = NO_DATA
    out, ov, om = warp_planes(img, var, msk, xx + 0.5, yy + 0.5)
    hit = (om & NO_DATA) != 0
    assert hit[7:13, 7:13].all() and not hit[14, 14]


def test_mask_radius():
    img = np.zeros((30, 30), np.float32)
    var = np.ones((30, 30), np.float32)
    msk = np.zeros((30, 30), np.uint32)
    msk[15, 15] = masks.bit("CR")
    yy, xx = np.mgrid[0:30, 0:30].astype(float)
    _, _, full = warp_planes(img, var, msk, xx + 0.5, yy + 0.5)
    _, _, near = warp_planes(img, var, msk, xx + 0.5, yy + 0.5, mask_radius=1.0)
    assert (full & masks.bit("CR") != 0).sum() == 36  # the 6x6 Lanczos3 footprint
    assert (near & masks.bit("CR") != 0).sum() == 4


def test_variance_matches_warped_noise():
    rng = np.random.default_rng(2)
    n = 400
    var = rng.uniform(1.0, 4.0, size=(n, n)).astype(np.float32)
    img = (rng.normal(size=(n, n)) * np.sqrt(var)).astype(np.float32)
    yy, xx = np.mgrid[0 : n - 20, 0 : n - 20].astype(float)
    th = 0.4
    xin = 10 + 0.8 * (np.cos(th) * xx - np.sin(th) * yy) + 150
    yin = 10 + 0.8 * (np.sin(th) * xx + np.cos(th) * yy)
    out, ov, om = warp_planes(img, var, np.zeros((n, n), np.uint32), xin, yin)
    ok = np.isfinite(out)
    z = out[ok] / np.sqrt(ov[ok])
    assert abs(np.std(z) - 1) < 0.02
    # Neighbouring pixels are positively correlated; the documented aperture factor
    # (variance of a large-aperture sum over the summed pixel variances) is > 1.
    assert 1.1 < lanczos_noise_correlation(3) < 1.5


def _strong_sip_cards():
    """Visit cards with a stronger SIP than the test default: up to ~1 px at the corners."""
    cards = visit_cards(3, shape=(2000, 2000))
    return [c for c in cards if not c[0].startswith(("A_", "B_"))] + [
        ("A_ORDER", 3, ""),
        ("B_ORDER", 3, ""),
        ("A_2_0", 3e-7, ""),
        ("A_0_2", -2e-7, ""),
        ("A_3_0", 1e-10, ""),
        ("B_1_1", 2.5e-7, ""),
        ("B_0_3", -1e-10, ""),
        ("B_2_1", 5e-11, ""),
    ]


def test_grid_mapping_error_below_a_thousandth_pixel():
    patch = make_skymap(inner=1000, border=50).patch(0, 0)
    cards = _strong_sip_cards()
    box = Box(0, 0, 700, 600)
    xe, ye = pixel_mapping(patch.wcs_cards, cards, box, grid_step=0, in_shape=(2000, 2000))
    xg, yg = pixel_mapping(patch.wcs_cards, cards, box, grid_step=32, in_shape=(2000, 2000))
    err = np.hypot(xg - xe, yg - ye)
    assert err.max() < 1e-3, err.max()
    # The pixel area ratio from the grid's splines against central differences of the
    # exact mapping (4e-8 relative; np.gradient of the interpolated mapping: 2e-7), also
    # on a strip one pixel wide.
    from procsky.warp import _mapping

    for b in (box, Box(100, 50, 101, 400)):
        ae = _mapping(patch.wcs_cards, cards, b, 0, (2000, 2000))[2]
        ag = _mapping(patch.wcs_cards, cards, b, 32, (2000, 2000))[2]
        assert ae.shape == b.shape and 0.58 < ae.min() < ae.max() < 0.6
        assert np.abs(ag / ae - 1).max() < 2e-7


def test_mapping_inside_the_kernel_matches_full_resolution_arrays():
    """warp_planes_grid (mapping splines and pixel area evaluated in the kernel, row by row)
    gives the warp of warp_planes on the full-resolution mapping and area of
    interpolate_mapping, to float32 rounding, with identical masks."""
    from procsky.kernels.warp import interpolate_mapping, warp_planes_grid
    from procsky.warp import _mapping_nodes

    patch = make_skymap(inner=1000, border=50).patch(0, 0)
    box = Box(40, 30, 340, 230)
    gx, gy, xi, yi = _mapping_nodes(patch.wcs_cards, _strong_sip_cards(), box, 32, (2000, 2000))
    xs, ys = np.arange(box.x0, box.x1, dtype=float), np.arange(box.y0, box.y1, dtype=float)
    xin, yin, area = interpolate_mapping(gx, gy, xi, yi, xs, ys)
    x0, y0 = int(xin.min()) - 2, int(yin.min()) - 2  # the input region starts inside the footprint
    shape = (int(yin.max()) - y0 + 8, int(xin.max()) - x0 + 8)
    rng = np.random.default_rng(7)
    img = rng.normal(size=shape).astype(np.float32)
    var = rng.uniform(1, 2, size=shape).astype(np.float32)
    msk = np.zeros(shape, np.uint32)
    msk[shape[0] // 2, shape[1] // 2] = NO_DATA
    ref = warp_planes(img, var, msk, xin - x0, yin - y0, 3.0 * area)
    got = warp_planes_grid(img, var, msk, gx, gy, xi, yi, xs, ys, offset=(x0, y0), calibration=3.0)
    np.testing.assert_array_equal(got[2], ref[2])
    ok = np.isfinite(ref[0])
    np.testing.assert_array_equal(np.isfinite(got[0]), ok)
    assert 1000 < ok.sum() < ok.size
    np.testing.assert_allclose(got[0][ok], ref[0][ok], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1][ok], ref[1][ok], rtol=1e-6)


def test_warp_conserves_flux_across_pixel_scales():
    # One star of 1e6 nJy, input 0.26"/px with rotation and SIP, output 0.2"/px.
    stars = (np.array([150.0]), np.array([2.0]), np.array([1e6]))
    calexp = make_visit(4, stars, noise=False)
    patch = make_skymap().patch(0, 0)
    w = warp_exposure(calexp, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=WarpConfig(chunk=128)).compute()
    x, y = patch.wcs.world_to_pixel_values(150.0, 2.0)
    x, y = float(x) - (w.xy0[0] - patch.xy0[0]), float(y) - (w.xy0[1] - patch.xy0[1])
    stamp = w.image[int(y) - 25 : int(y) + 26, int(x) - 25 : int(x) + 26]
    assert abs(np.nansum(stamp) / 1e6 - 1) < 2e-3
    yy, xx = np.mgrid[0 : stamp.shape[0], 0 : stamp.shape[1]]
    s = np.nansum(stamp)
    cx = (stamp * xx).sum() / s + int(x) - 25
    cy = (stamp * yy).sum() / s + int(y) - 25
    assert math.hypot(cx - x, cy - y) < 0.01  # px
    # The warped PSF is the input PSF seen at the new scale (0.26/0.2 = 1.3x wider).
    assert abs(w.psf.fwhm(0, 0) / (calexp.psf.fwhm(0, 0) * 1.3) - 1) < 0.02
    assert w.metadata["flux_unit"] == "nJy" and w.metadata["median_variance"] > 0


def test_warp_exposure_lazy_numpy_and_zarr_agree(tmp_path):
    from conftest import raise_if_dask_computes

    stars = make_stars(9)
    calexp = make_visit(1, stars)
    calexp.mask[100, 100] = masks.bit("BAD")
    patch = make_skymap().patch(0, 0)
    calexp.write(tmp_path / "c.zarr", chunks=100)
    lazy_in = Exposure.read(tmp_path / "c.zarr")
    cfg = WarpConfig(chunk=128)
    with raise_if_dask_computes():
        a = warp_exposure(calexp, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=cfg)
        b = warp_exposure(lazy_in, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=cfg)
        c = warp_exposure(lazy_in[0:380, 0:380], patch.wcs_cards, patch.shape, xy0=patch.xy0, config=cfg)
    assert a.is_lazy and a.image.chunksize == (128, 128)
    ac, bc, cc = a.compute(), b.compute(), c.compute()
    np.testing.assert_array_equal(ac.image, bc.image)
    np.testing.assert_array_equal(ac.mask, cc.mask)  # the dask-dependency path agrees too
    assert (ac.mask & masks.bit("BAD")).any()
    assert ac.xy0[0] >= patch.xy0[0] and ac.metadata["warp_box"][2] <= patch.shape[1]
    # The WCS follows the warp box.
    ra, dec = ac.pixel_to_sky(0.0, 0.0)
    px, py = patch.wcs.world_to_pixel_values(ra, dec)
    assert abs(px - (ac.xy0[0] - patch.xy0[0])) < 1e-6 and abs(py - (ac.xy0[1] - patch.xy0[1])) < 1e-6
    # Far away: no work.
    far = make_skymap().tract(0)
    from procsky.skymap import discrete_skymap

    other = discrete_skymap([(10.0, 10.0)], radius=0.01, patch_inner=100, patch_border=10).patch(0, 0)
    with pytest.raises(NoWorkError):
        warp_exposure(calexp, other.wcs_cards, other.shape)
    assert far.id == 0


def test_sources_pickle_and_threads():
    from procsky.warp import _make_warp_source

    stars = make_stars(4)
    calexp = make_visit(2, stars)
    patch = make_skymap().patch(0, 0)
    src = _make_warp_source(calexp, patch.wcs_cards, WarpConfig(), Box(0, 0, 340, 340), 0)
    src2 = pickle.loads(pickle.dumps(src))
    boxes = [Box(0, 0, 170, 170), Box(170, 170, 340, 340)] * 4
    with ThreadPoolExecutor(2) as ex:
        res = list(ex.map(lambda b: src2.read(b)[0], boxes))
    for b, r in zip(boxes, res):
        np.testing.assert_array_equal(np.nan_to_num(r), np.nan_to_num(src.read(b)[0]))


def test_warp_kernel_image_and_area():
    g = GaussianPsf.from_fwhm(3.0)
    jac = np.array([[0.5, 0.0], [0.0, 0.5]])  # output pixels are half the input ones
    k = warp_kernel_image(g.kernel(), jac)
    from procsky.psf import ImagePsf

    # A pixelised PSF keeps its input-pixel response (box of variance 1/12 px^2) when
    # resampled, exactly as the star images it describes do.
    expected = 2 * math.sqrt(3.0**2 + 2.3548**2 / 12)
    assert abs(ImagePsf(k).fwhm(0, 0) / expected - 1) < 0.01
    yy, xx = np.mgrid[0:20, 0:20].astype(float)
    assert np.allclose(area_ratio(0.5 * xx + 0.1 * yy, 0.5 * yy), 0.25)
    # Rendering helper sanity: integrated Gaussian sums to its flux.
    assert abs(render_gaussians((40, 40), [20.2], [19.7], [100.0], 2.0).sum() - 100) < 1e-6
    assert PhotoCalib(2.0).counts_to_njy(3.0) == 6.0


def test_psf_matched_warp():
    from conftest import raise_if_dask_computes
    from procsky.coadd import psf_match_exposure
    from procsky.psf import image_moments

    stars = (np.array([150.0]), np.array([2.0]), np.array([1e6]))
    calexp = make_visit(4, stars, noise=False)
    patch = make_skymap().patch(0, 0)
    w = warp_exposure(calexp, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=WarpConfig(chunk=128))
    target = 1.3 * w.psf.fwhm(0, 0)
    with raise_if_dask_computes():
        m = psf_match_exposure(w, target, chunk=128)
    m = m.compute()
    x, y = patch.wcs.world_to_pixel_values(150.0, 2.0)
    x, y = round(float(x)) - (m.xy0[0] - patch.xy0[0]), round(float(y)) - (m.xy0[1] - patch.xy0[1])
    stamp = np.nan_to_num(m.image[y - 20 : y + 21, x - 20 : x + 21])
    _, _, ixx, iyy, ixy = image_moments(stamp)
    fwhm = 2.3548 * (ixx * iyy - ixy**2) ** 0.25
    assert abs(fwhm / target - 1) < 0.02
    assert abs(stamp.sum() / 1e6 - 1) < 3e-3
    assert m.psf.fwhm(0, 0) == pytest.approx(target)


def test_grid_and_coadd_psf_models():
    """GridImagePsf interpolates between nodes; CoaddPsf sums the inputs covering a point;
    both survive the JSON round trip."""
    from procsky.psf import (
        CoaddPsf,
        GaussianPsf,
        GridImagePsf,
        ImagePsf,
        points_in_polygon,
        psf_from_dict,
    )

    ka, kb = GaussianPsf.from_fwhm(3.0, size=21).kernel(), GaussianPsf.from_fwhm(5.0, size=21).kernel()
    kernels = np.stack([np.stack([ka, kb]), np.stack([ka, kb])])
    g = GridImagePsf(kernels, [0.0, 100.0], [0.0, 50.0], valid=[[True, True], [True, False]])
    np.testing.assert_allclose(g.kernel(50.0, 20.0), 0.5 * ka + 0.5 * kb, atol=1e-12)
    np.testing.assert_allclose(g.kernel(-10.0, 0.0), ka, atol=1e-12)  # clamped to the edge node
    np.testing.assert_allclose(g.kernel(100.0, 50.0), kb, atol=1e-12)  # invalid node: nearest valid one's kernel
    assert g.covers(0.0, 0.0) and not g.covers(99.0, 49.0)
    g2 = psf_from_dict(g.to_dict())
    np.testing.assert_allclose(g2.kernel(30.0, 10.0), g.kernel(30.0, 10.0), atol=1e-7)
    assert not g2.covers(99.0, 49.0)

    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert points_in_polygon([5, 11, -1, 9.9], [5, 5, 5, 0.1], square).tolist() == [True, False, False, True]
    c = CoaddPsf([ImagePsf(ka), ImagePsf(kb)], [1.0, 3.0], [square, [[5, 0], [20, 0], [20, 10], [5, 10]]])
    np.testing.assert_allclose(c.kernel(2.0, 5.0), ka, atol=1e-12)  # only the first covers
    np.testing.assert_allclose(c.kernel(7.0, 5.0), 0.25 * ka + 0.75 * kb, atol=1e-12)
    assert c.n_inputs(7.0, 5.0) == 2 and not c.covers(30.0, 5.0)
    c2 = psf_from_dict(c.to_dict())
    np.testing.assert_allclose(c2.kernel(7.0, 5.0), c.kernel(7.0, 5.0), atol=1e-12)


def test_tabulated_taps_match_exact_evaluation():
    """The default warp interpolates the Lanczos taps in a table at 1/1024 px: on a random
    image and on a star field it matches the exact (sin) evaluation to 1e-5 of the image
    rms, with identical masks, and conserves the flux of isolated stars as the exact one."""
    from procsky.kernels.warp import tap_table

    rng = np.random.default_rng(5)
    shape = (150, 160)
    gy, gx = np.mgrid[0:5, 0:6] * 24.0 + 15
    xs, ys = gx.ravel() + rng.uniform(0, 1, 30), gy.ravel() + rng.uniform(0, 1, 30)  # 24 px apart
    flux = 10 ** rng.uniform(2, 4.5, 30)
    stars = render_gaussians(shape, xs, ys, flux, 1.3) + rng.normal(0, 1.0, shape)
    noise = rng.normal(size=shape)
    var = rng.uniform(0.5, 2, size=shape).astype(np.float32)
    msk = np.zeros(shape, np.uint32)
    msk[40, 50] = masks.bit("SAT")
    msk[90:92, 100] = NO_DATA
    noise[60, 30] = np.nan
    # Rotation, a 0.2"/0.26" scale change, and a block of integer positions (zero taps).
    yy, xx = np.mgrid[0:150, 0:150].astype(float)
    th = 0.4
    xin = 20 + 0.77 * (np.cos(th) * xx - np.sin(th) * yy) + 40.37
    yin = 5 + 0.77 * (np.sin(th) * xx + np.cos(th) * yy) + 0.18
    xin[:10, :10], yin[:10, :10] = xx[:10, :10] + 30, yy[:10, :10] + 20
    assert tap_table(3).shape == (1025, 6)
    for image in (noise, stars):
        image = image.astype(np.float32)
        rms = np.nanstd(image)
        exact = warp_planes(image, var, msk, xin, yin, 0.77**2, exact=True)
        fast = warp_planes(image, var, msk, xin, yin, 0.77**2)
        np.testing.assert_array_equal(fast[2], exact[2])
        ok = np.isfinite(exact[0])
        np.testing.assert_array_equal(np.isfinite(fast[0]), ok)
        assert 10000 < ok.sum() < xin.size  # NO_DATA, NaN and off-image samples are there
        assert (fast[2][~ok] & NO_DATA).all() and (fast[2] & masks.bit("SAT")).any()
        diff = np.abs(fast[0][ok] - exact[0][ok])
        assert 0 < diff.max() <= 1e-5 * rms, diff.max() / rms
        np.testing.assert_allclose(fast[1][ok], exact[1][ok], rtol=2e-5)
    # Flux of the stars inside the warp: same as exact, and as the truth.
    inv = np.linalg.inv(0.77 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]))
    ox, oy = inv @ np.array([xs - 60.37, ys - 5.18])
    sky = render_gaussians(shape, xs, ys, flux, 1.3).astype(np.float32)
    exact = warp_planes(sky, var, msk * 0, xin, yin, 0.77**2, exact=True)[0]
    fast = warp_planes(sky, var, msk * 0, xin, yin, 0.77**2)[0]
    n_checked = 0
    for k in range(xs.size):
        i, j = int(round(ox[k])), int(round(oy[k]))
        sl = np.s_[j - 10 : j + 11, i - 10 : i + 11]
        if not (10 <= i < 140 and 10 <= j < 140) or not np.isfinite(exact[sl]).all():
            continue
        assert abs(fast[sl].sum() / exact[sl].sum() - 1) < 1e-6
        assert abs(fast[sl].sum() / flux[k] - 1) < 2e-4
        n_checked += 1
    assert n_checked >= 10
