"""Coadd detection (procsky.objects.detection) against truth: completeness, spurious peaks,
sky-object pulls, measured-noise thresholds on correlated noise, peak merging, masks."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
from scipy.spatial import cKDTree

from procsky.exposure import Exposure
from procsky.kernels.coadd_detection import matched_filter, place_separated
from procsky.kernels.detection import convolve_2d, gaussian_kernel_1d
from procsky.masks import bit
from procsky.objects.detection import CoaddDetectionConfig, CoaddDetections, detect_objects
from procsky.psf import GaussianPsf
from procsky.sim.coadd_scene import _tan_cards, make_coadd_scene

PIXEL_SCALE = 0.2
SIGMA = 10.0  # nJy per pixel
FWHM_PX = 4.0


def _cards(shape):
    """A TAN grid on (150, 2) deg at PIXEL_SCALE, the scene generator's own."""
    return _tan_cards(shape, PIXEL_SCALE, 150.0, 2.0)


def _exposure(image, sigma=SIGMA, mask=None, variance=None):
    shape = image.shape
    var = np.full(shape, sigma**2, np.float32) if variance is None else variance
    return Exposure(
        image.astype(np.float32),
        var,
        np.zeros(shape, np.uint32) if mask is None else mask,
        wcs_cards=_cards(shape),
        psf=GaussianPsf.from_fwhm(FWHM_PX),
    )


def _stars(shape, stars):
    """Pixel-sampled Gaussian stars ``(x, y, flux)`` of FWHM_PX."""
    s = FWHM_PX / (2 * math.sqrt(2 * math.log(2)))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for x, y, f in stars:
        img += f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2) / (2 * math.pi * s * s)
    return img


def _truth_snr(scene):
    """Multiband S/N of each truth object: flux / (sky_sigma sqrt(n_eff)) per band, added in
    quadrature; n_eff = 4 pi (sigma_psf^2 + sigma_gal^2), with sigma_psf^2 = 1 / (4 pi sum(psf^2))
    (the PSF's effective area) and sigma_gal = hlr / 1.177 (Gaussian of the same half-light radius)."""
    tr = scene.truth
    s2 = 0.0
    for b, exp in scene.exposures.items():
        k = exp.psf.kernel(0.0, 0.0)
        k = k / k.sum()
        psf_s2 = 1.0 / (4 * math.pi * float((k * k).sum()))
        gal_s2 = (tr["hlr"].to_numpy() / scene.pixel_scale / 1.177) ** 2
        n_eff = 4 * math.pi * (psf_s2 + gal_s2)
        s2 = s2 + (tr[f"{b}_flux"].to_numpy() / (scene.sky_sigma[b] * np.sqrt(n_eff))) ** 2
    return np.sqrt(s2)


def _scene_figures(scene, det):
    """(found, wanted, found_any, wanted_any, spurious, n_peaks) against truth.

    A truth object is found when a peak lies within max(FWHM, hlr) of it; "wanted" are the
    objects with S/N >= 10 and no brighter truth object within 3 FWHM (one the peak finder can
    resolve: a fainter star 2 FWHM from a 30x brighter one is a shoulder, not a peak - the
    deblender's tests cover those), "wanted_any" all with S/N >= 10. A peak is spurious when no
    truth object lies within max(FWHM, 2 hlr)."""
    tr = scene.truth
    fwhm = scene.psf_fwhm["r"] / scene.pixel_scale
    xy = tr[["x", "y"]].to_numpy()
    hlr = tr["hlr"].to_numpy() / scene.pixel_scale
    flux = tr["r_flux"].to_numpy()
    tt = cKDTree(xy)
    resolvable = np.array(
        [not any(flux[j] > flux[i] for j in js if j != i) for i, js in enumerate(tt.query_ball_point(xy, 3 * fwhm))]
    )
    pxy = det.peaks[["x", "y"]].to_numpy()
    d, _ = cKDTree(pxy).query(xy)
    found = d < np.maximum(fwhm, hlr)
    sel = _truth_snr(scene) >= 10
    dd, jj = tt.query(pxy)
    spurious = dd > np.maximum(fwhm, 2 * hlr[jj])
    return (
        int((found & sel & resolvable).sum()),
        int((sel & resolvable).sum()),
        int((found & sel).sum()),
        int(sel.sum()),
        int(spurious.sum()),
        len(pxy),
    )


@pytest.fixture(scope="module")
def scenes():
    out = []
    for seed in (0, 3, 5):
        sc = make_coadd_scene(seed=seed)
        out.append((sc, detect_objects(sc.exposures)))
    return out


@pytest.fixture(scope="module")
def white_noise():
    rng = np.random.default_rng(7)
    shape = (512, 512)
    exps = {b: _exposure(rng.normal(0.0, SIGMA, shape)) for b in ("g", "r")}
    return exps, detect_objects(exps)


@pytest.fixture(scope="module")
def correlated_noise():
    """White noise smoothed by a Gaussian of 1 px and rescaled to SIGMA per pixel: the variance
    plane (SIGMA^2) is right per pixel, but the PSF-filtered noise is ~3x what it predicts."""
    rng = np.random.default_rng(11)
    shape = (400, 400)
    g = gaussian_kernel_1d(1.0)
    exps = {}
    for b in ("g", "r"):
        n = convolve_2d(rng.normal(0.0, 1.0, shape).astype(np.float32), np.outer(g, g))
        n = n * (SIGMA / n[10:-10, 10:-10].std())
        exps[b] = _exposure(n)
    return exps


def test_matched_filter_matches_direct_correlation():
    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (40, 50)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, img.shape).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    bad[5:9, 30:40] = True
    k = GaussianPsf(1.3, e1=0.2).kernel(0, 0)
    k = k / k.sum()
    nu, num, den, k2 = matched_filter(img, var, bad, k)
    ref_num = convolve_2d(np.where(bad, 0, img).astype(np.float32), k)
    ref_den = convolve_2d(np.where(bad, 0, var).astype(np.float32), k * k)
    np.testing.assert_allclose(num, ref_num, atol=2e-5)
    np.testing.assert_allclose(den, ref_den, rtol=2e-5, atol=1e-7)
    good = ~bad
    np.testing.assert_allclose(nu[good], (ref_num / np.sqrt(ref_den))[good], rtol=1e-4, atol=1e-5)
    assert np.all(nu[bad] == 0)
    assert k2 == pytest.approx(float((k * k).sum()))


def test_place_separated_keeps_distance_and_allowed_pixels():
    allowed = np.ones((120, 100), bool)
    allowed[40:80, :] = False
    x, y = place_separated(allowed, 60, 6.0, seed=3)
    assert 30 <= x.size <= 60
    assert allowed[y, x].all()
    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    assert d[:, 1].min() >= 6.0


def test_completeness_and_spurious_against_truth(scenes):
    tot = np.zeros(6, int)
    for sc, det in scenes:
        tot += np.array(_scene_figures(sc, det))
    found, wanted, found_any, wanted_any, spurious, n_peaks = tot
    assert wanted >= 150
    assert found / wanted >= 0.95, (found, wanted)
    assert found_any / wanted_any >= 0.85, (found_any, wanted_any)  # blends included
    assert spurious <= 0.01 * n_peaks, (spurious, n_peaks)


def test_scene_tables_follow_the_interface(scenes):
    sc, det = scenes[0]
    assert isinstance(det, CoaddDetections)
    assert det.bands == ["g", "r"]
    assert det.labels.shape == sc.exposures["g"].shape and det.labels.dtype == np.int32
    par, pk = det.parents, det.peaks
    assert list(par["parent_id"]) == list(range(1, len(par) + 1))
    assert int(det.labels.max()) == len(par)
    assert (par["n_peaks"] >= 1).all() and par["n_peaks"].sum() == len(pk)
    assert list(pk["peak_id"]) == list(range(1, len(pk) + 1))
    # every peak lies in its parent's footprint and bbox; areas match the label image
    ix, iy = np.rint(pk["x"]).astype(int), np.rint(pk["y"]).astype(int)
    assert (det.labels[iy, ix] == pk["parent_id"]).all()
    p = par.set_index("parent_id").loc[pk["parent_id"]]
    assert ((ix >= p["x0"].to_numpy()) & (ix < p["x1"].to_numpy()) & (iy >= p["y0"].to_numpy())).all()
    assert (np.bincount(det.labels.ravel())[1:] == par["area"].to_numpy()).all()
    for c in ("detected_g", "detected_r", "detected_multiband", "significance"):
        assert c in pk.columns
    assert (pk[["detected_g", "detected_r", "detected_multiband"]].any(axis=1)).all()
    assert set(det.noise_scale) == {"g", "r", "multiband"}
    for v in det.noise_scale.values():
        assert 0.9 < v < 1.1  # white noise with a right variance plane
    # sky objects are far from every footprint
    sky = det.sky_objects
    assert len(sky) >= 100
    r = CoaddDetectionConfig().sky_radius / PIXEL_SCALE
    fp = np.column_stack(np.nonzero(det.labels))[:, ::-1]
    d, _ = cKDTree(fp).query(sky[["x", "y"]].to_numpy())
    assert d.min() >= r - 1e-9
    assert {"g_flux", "g_flux_err", "r_flux", "r_flux_err"} <= set(sky.columns)


def test_pure_noise_has_no_detections_and_unit_sky_pulls(white_noise):
    exps, det = white_noise
    assert len(det.peaks) == 0 and len(det.parents) == 0
    assert len(det.sky_objects) >= 500
    st = det.sky_stats.set_index("image")
    for b in ("g", "r"):
        assert abs(st.loc[b, "pull_std"] - 1.0) < 0.05
        assert abs(st.loc[b, "pull_std_variance"] - 1.0) < 0.05
        assert st.loc[b, "threshold_factor"] == 1.0
        pull = det.sky_objects[f"{b}_flux"] / det.sky_objects[f"{b}_flux_err"]
        assert abs(pull.std() - 1.0) < 0.05
        assert abs(det.noise_scale[b] - 1.0) < 0.03
    assert abs(st.loc["multiband", "pull_std"] - 1.0) < 0.05
    assert not [n for n in det.notes if n["code"] == "coadd_sky_pull_rescaled"]


def test_correlated_noise_measured_threshold_keeps_false_detections_near_zero(correlated_noise):
    det = detect_objects(correlated_noise)
    naive = detect_objects(correlated_noise, CoaddDetectionConfig(threshold_type="variance"))
    for b in ("g", "r"):
        assert det.noise_scale[b] > 1.5  # the variance plane understates the filtered noise
        assert naive.noise_scale[b] == 1.0
    assert len(det.peaks) <= 1
    assert len(naive.peaks) >= 20  # trusting the variance plane: many false detections
    st = det.sky_stats.set_index("image")
    assert abs(st.loc["g", "pull_std"] - 1.0) < 0.06
    assert st.loc["g", "pull_std_variance"] > 1.5  # the variance plane's errors are too small
    assert any(n["code"] == "coadd_variance_plane_off" for n in det.notes)


def test_sky_objects_rescale_a_wrong_noise_estimate():
    """Noise twice as large in one half of the image as in the other, with a uniform variance
    plane: the MAD of the filtered pixels sees mostly the mixture's core (1.37x), the sky
    objects' PSF-flux pulls its whole spread (1.58x), so their pull std is ~1.15 and the
    threshold is raised with a note."""
    rng = np.random.default_rng(5)
    shape = (400, 400)
    img = rng.normal(0.0, SIGMA, shape)
    img[:, 200:] *= 2.0
    det = detect_objects({"g": _exposure(img)}, CoaddDetectionConfig(multiband=False))
    st = det.sky_stats.set_index("image")
    assert st.loc["g", "threshold_factor"] > 1.05
    assert st.loc["g", "threshold_factor"] == pytest.approx(st.loc["g", "pull_std"])
    assert any(n["code"] == "coadd_sky_pull_rescaled" for n in det.notes)


def test_peaks_merge_across_bands():
    shape = (200, 240)
    rng = np.random.default_rng(2)
    both = (60.3, 70.6, 5000.0)
    g_img = _stars(shape, [both, (150.0, 120.0, 3000.0)]) + rng.normal(0, SIGMA, shape)
    r_img = _stars(shape, [(60.55, 70.4, 5000.0)]) + rng.normal(0, SIGMA, shape)
    det = detect_objects({"g": _exposure(g_img), "r": _exposure(r_img)})
    pk = det.peaks
    assert len(pk) == 2
    a = pk.iloc[np.argmin(np.hypot(pk["x"] - 60.4, pk["y"] - 70.5))]
    b = pk.iloc[np.argmin(np.hypot(pk["x"] - 150.0, pk["y"] - 120.0))]
    assert math.hypot(a["x"] - 60.4, a["y"] - 70.5) < 0.5
    assert a["detected_g"] and a["detected_r"] and a["detected_multiband"]
    assert b["detected_g"] and not b["detected_r"]
    assert b["significance_r"] < 3
    assert a["parent_id"] != b["parent_id"]
    # two stars 1.5" apart in different bands: farther than peak_merge_radius (1"), two peaks
    g2 = _stars(shape, [(100.0, 100.0, 5000.0)]) + rng.normal(0, SIGMA, shape)
    r2 = _stars(shape, [(107.5, 100.0, 5000.0)]) + rng.normal(0, SIGMA, shape)
    det2 = detect_objects({"g": _exposure(g2), "r": _exposure(r2)})
    assert len(det2.peaks) == 2 and det2.peaks["parent_id"].nunique() == 1
    # with a merge radius of 2", the r star is not new
    det3 = detect_objects({"g": _exposure(g2), "r": _exposure(r2)}, CoaddDetectionConfig(peak_merge_radius=2.0))
    assert len(det3.peaks) == 1


def test_companion_on_a_brighter_wing_gets_its_own_peak():
    """A star 5x fainter 1.5 FWHM from a brighter one is a shoulder in the smoothed images; the
    lowered-PSF peak image (DAOFIND's kernel) gives it a peak."""
    shape = (120, 140)
    rng = np.random.default_rng(9)
    img = _stars(shape, [(60.0, 60.0, 20000.0), (66.0, 60.0, 4000.0)]) + rng.normal(0, SIGMA, shape)
    exps = {"g": _exposure(img)}
    pk = detect_objects(exps).peaks
    assert len(pk) == 2 and pk["parent_id"].nunique() == 1
    assert np.hypot(pk["x"] - 66.0, pk["y"] - 60.0).min() < 1.0
    assert np.hypot(pk["x"] - 60.0, pk["y"] - 60.0).min() < 0.5
    assert len(detect_objects(exps, CoaddDetectionConfig(peak_filter="gaussian")).peaks) == 1


def test_no_data_and_bad_pixels_are_honoured():
    shape = (200, 200)
    rng = np.random.default_rng(4)
    img = _stars(shape, [(50.0, 50.0, 4000.0), (150.0, 150.0, 4000.0)]) + rng.normal(0, SIGMA, shape)
    mask = np.zeros(shape, np.uint32)
    img[:, 90:110] = 1e6  # garbage under NO_DATA
    mask[:, 90:110] |= np.uint32(bit("NO_DATA"))
    img[20:30, 170:180] = 5e5  # a bad column block
    mask[20:30, 170:180] |= np.uint32(bit("BAD"))
    img[180:, :] = np.nan  # beyond the coadd's edge, NO_DATA
    mask[180:, :] |= np.uint32(bit("NO_DATA"))
    det = detect_objects({"g": _exposure(img, mask=mask)})
    pk = det.peaks
    assert len(pk) == 2
    assert np.hypot(pk["x"] - 50, pk["y"] - 50).min() < 1 and np.hypot(pk["x"] - 150, pk["y"] - 150).min() < 1
    assert (det.labels[:, 90:110] == 0).all()
    r = CoaddDetectionConfig().sky_radius / PIXEL_SCALE
    sx = det.sky_objects["x"].to_numpy()
    sy = det.sky_objects["y"].to_numpy()
    assert len(sx) > 0
    assert (np.abs(sx - 99.5) >= 10 + r - 1).all()
    assert (sy < 180 - r + 1e-9).all()
    assert abs(det.sky_stats.set_index("image").loc["g", "pull_std"] - 1) < 0.15


def test_masked_saturated_core_gives_one_peak():
    """A bright star whose core is NO_DATA (as a coadd leaves a saturated core): the rim of the
    hole shows several maxima; they become one peak at the hole's centre. A NO_DATA stripe
    across the image (not enclosed by a footprint) does not merge the peaks beside it."""
    shape = (160, 200)
    rng = np.random.default_rng(8)
    img = _stars(shape, [(60.2, 80.4, 3e6), (150.0, 40.0, 5000.0), (150.0, 52.0, 5000.0)])
    img += rng.normal(0, SIGMA, shape)
    mask = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    core = np.hypot(xx - 60.2, yy - 80.4) < 5.5
    img[core] = np.nan
    mask[core] |= np.uint32(bit("NO_DATA"))
    mask[44:48, :] |= np.uint32(bit("NO_DATA"))  # a gap between the two faint stars
    img[44:48, :] = 0.0
    det = detect_objects({"g": _exposure(img, mask=mask)})
    pk = det.peaks
    near = np.hypot(pk["x"] - 60.2, pk["y"] - 80.4) < 15
    assert near.sum() == 1
    assert np.hypot(pk["x"][near] - 60.2, pk["y"][near] - 80.4).iloc[0] < 1.0
    assert det.labels[80, 60] > 0  # the hole belongs to the star's footprint
    assert (np.hypot(pk["x"] - 150, pk["y"] - 40) < 1).sum() == 1
    assert (np.hypot(pk["x"] - 150, pk["y"] - 52) < 1).sum() == 1


@pytest.mark.parametrize("kind", ["no_data", "zeros"])
def test_empty_images_give_empty_tables(kind):
    shape = (64, 64)
    if kind == "no_data":
        img = np.full(shape, np.nan)
        mask = np.full(shape, np.uint32(bit("NO_DATA")), np.uint32)
        var = None
    else:
        img = np.zeros(shape)
        mask = None
        var = np.zeros(shape, np.float32)
    exps = {b: _exposure(img, mask=mask, variance=var) for b in ("g", "r")}
    det = detect_objects(exps)
    assert len(det.peaks) == 0 and len(det.parents) == 0 and len(det.sky_objects) == 0
    assert (det.labels == 0).all()
    for c in ("peak_id", "parent_id", "x", "y", "significance", "detected_g", "detected_r", "detected_multiband"):
        assert c in det.peaks.columns
    for c in ("parent_id", "x0", "y0", "x1", "y1", "area", "n_peaks"):
        assert c in det.parents.columns
    codes = {n["code"] for n in det.notes}
    assert "coadd_noise_unmeasured" in codes


def test_config_is_frozen_and_validated():
    cfg = CoaddDetectionConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.threshold = 3.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        CoaddDetectionConfig(peak_same_radius=2.0, peak_merge_radius=1.0)
    with pytest.raises(pydantic.ValidationError):
        CoaddDetectionConfig(unknown=1)  # type: ignore[call-arg]
    assert hash(cfg) == hash(CoaddDetectionConfig())
