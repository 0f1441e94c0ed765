"""The simulator's real-data regimes (issue 19): undersampled ground, space PSF, crowded
fields, noise correlated by resampling, small stamps, bleed trails. One detector and one
visit of each recipe, drawn in-process (a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

galsim = pytest.importorskip("galsim")

from procsky.exposure import Exposure  # noqa: E402
from procsky.instruments.simcam import SimcamGeometry, focal_plane_position  # noqa: E402
from procsky.sim import load_recipe, recipe_names, simulate  # noqa: E402
from procsky.sim.psf import half_max_fwhm, moment_fwhm, psf_params_from_dict, psf_summary, truth_psf_image  # noqa: E402
from procsky.sim.render import SAT, lanczos3_weights, resample_noise  # noqa: E402
from procsky.sim.scene import build_scene  # noqa: E402
from procsky.sim.truth import SimTruth  # noqa: E402

REGIMES = ("undersampled", "space", "crowded", "correlated", "stamp256")


def _draw(name, tmp_path_factory, visits=(1,)):
    out = tmp_path_factory.mktemp("regime") / name
    res = simulate(name, out, visits=list(visits), detectors=[0], scheduler="sync", progress=False)
    return res, SimTruth(out)


def _draw_subset(name, folder, visits=(1,)):
    out = folder / name
    res = simulate(name, out, visits=list(visits), detectors=[0], scheduler="sync", progress=False)
    return res, SimTruth(out)


@pytest.fixture(scope="module")
def undersampled(tmp_path_factory):
    return _draw("undersampled", tmp_path_factory)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return _draw("space", tmp_path_factory)


@pytest.fixture(scope="module")
def correlated(tmp_path_factory):
    return _draw("correlated", tmp_path_factory)


def test_regime_recipes_are_registered():
    assert set(REGIMES) <= set(recipe_names())
    assert load_recipe("space").psf.family == "space"
    assert load_recipe("correlated").noise.correlation == "lanczos3"
    assert load_recipe("stamp256").instrument.detector_nx == 256


@pytest.mark.parametrize("name", ["crowded", "stamp256"])
def test_small_regimes_simulate(name, tmp_path_factory):
    res, truth = _draw(name, tmp_path_factory)
    img = Exposure.read(res.images[0])
    n = load_recipe(name).instrument.detector_nx
    assert np.asarray(img.image).shape == (n, n)
    ex = truth.exposures
    if name == "crowded":
        # PSFs overlap: the median distance to the nearest detectable (r < 22.5) star is a few FWHM
        fwhm = float(truth.detectors.psf_fwhm_px.iloc[0])
        bright = ex[ex.flux > 10 ** (-0.4 * (22.5 - 31.4))]
        xy = bright[["x", "y"]].to_numpy()
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        assert len(bright) > 500
        assert np.median(d.min(axis=1)) < 3 * fwhm


def test_undersampled_psf_and_bleeds(undersampled):
    res, truth = undersampled
    det = truth.detectors.iloc[0]
    # FWHM of the PSF (half maximum, with and without the pixel) in the requested range
    assert 1.2 <= det.psf_fwhm_px <= 2.5
    assert 1.2 <= det.psf_fwhm_pixel_px <= 2.5
    assert det.psf_fwhm_pixel_px > det.psf_fwhm_px  # the pixel box widens it
    # every visit of the recipe, at the detector corners too
    r = truth.recipe
    g_nx, g_ny = r.instrument.detector_nx, r.instrument.detector_ny
    geom = SimcamGeometry(r.instrument, r.seed)
    for v in build_scene(r).visits.to_dict("records"):
        p = psf_params_from_dict(v)
        for x, y in [(0, 0), (g_nx - 1, g_ny - 1)]:
            fx, fy = focal_plane_position(geom, 0, x, y)
            s = psf_summary(p, float(fx), float(fy))
            assert 1.2 <= s["psf_fwhm_px"] <= 2.5 and 1.2 <= s["psf_fwhm_pixel_px"] <= 2.5
    # saturated stars bleed along the column, SAT-masked, conserving their charge
    img = Exposure.read(res.images[0])
    im, mask = np.asarray(img.image, float), np.asarray(img.mask)
    ex = truth.exposures
    sat = ex[ex.saturated]
    assert len(sat) >= 2 and det.n_saturated_objects == len(sat)
    longest = 0
    for s in sat.itertuples():
        x, y = int(round(s.x)), int(round(s.y))
        rows = max(y - 200, 0) + np.flatnonzero(mask[max(y - 200, 0) : y + 200, x] & SAT)
        longest = max(longest, rows.max() - rows.min() + 1)
        y0, y1, x0, x1 = rows.min() - 8, rows.max() + 9, x - 6, x + 7
        box = im[y0:y1, x0:x1] - truth.sky(1, 0, *np.meshgrid(np.arange(x0, x1), np.arange(y0, y1)))
        # the whole star, less its neighbours in the box (its wings beyond: < 0.3%)
        others = ex[(ex.object_id != s.object_id) & ex.x.between(x0 + 1, x1 - 2) & ex.y.between(y0 + 1, y1 - 2)]
        assert box.sum() - others.counts.sum() == pytest.approx(s.counts, rel=0.01)
    assert longest >= 8  # a trail, not just a saturated core
    # stars not flagged as saturated have no over-full pixel at their centre
    unsat = ex[~ex.saturated & (ex.x > 2) & (ex.x < g_nx - 3) & (ex.y > 2) & (ex.y < g_ny - 3)]
    xi, yi = np.rint(unsat.x).astype(int), np.rint(unsat.y).astype(int)
    near_sat = mask[yi, xi] & SAT
    assert near_sat.mean() < 0.01


def test_space_psf_core_wings_spikes(space):
    res, truth = space
    det = truth.detectors.iloc[0]
    assert det.psf_family == "space"
    # a sharp core (2-3 px half maximum) whose unweighted moment size is several times larger
    assert 1.8 <= det.psf_fwhm_px <= 3.0
    assert det.psf_fwhm_moment_px > 3.0 * det.psf_fwhm_pixel_px
    psf = truth.psf_image(1, 0, 256, 256, size=101)
    assert psf.sum() == pytest.approx(1.0, abs=0.03)  # the far wings stay outside 101 px
    assert moment_fwhm(psf) > 3.0 * det.psf_fwhm_pixel_px
    # diffraction spikes: at 15 px the brightest direction is > 2x the median over angle
    yy, xx = np.indices(psf.shape)
    r = np.hypot(xx - 50, yy - 50)
    ang = np.degrees(np.arctan2(yy - 50, xx - 50)) % 360
    ring = (r > 14) & (r < 18)
    per_sector = [psf[ring & (ang >= a) & (ang < a + 15)].max() for a in range(0, 360, 15)]
    assert max(per_sector) > 2.0 * np.median(per_sector)
    # the stars in the image are the truth PSF times their flux
    img = np.asarray(Exposure.read(res.images[0]).image, float)
    ex = truth.exposures.merge(truth.objects[["object_id", "kind"]]).sort_values("counts", ascending=False)
    s = ex[(ex.kind == "star") & ex.x.between(30, 480) & ex.y.between(30, 480)].iloc[0]
    x0, y0 = int(round(s.x)), int(round(s.y))
    fx, fy = focal_plane_position(SimcamGeometry(truth.recipe.instrument, truth.recipe.seed), 0, s.x, s.y)
    model = s.counts * truth_psf_image(truth.psf_params(1), float(fx), float(fy), size=41, offset=(s.x - x0, s.y - y0))
    data = img[y0 - 20 : y0 + 21, x0 - 20 : x0 + 21] - det.sky_level
    others = ex[(ex.object_id != s.object_id) & ex.x.between(x0 - 22, x0 + 22) & ex.y.between(y0 - 22, y0 + 22)]
    assert others.counts.sum() < 0.01 * s.counts  # an isolated star
    # pixels a cosmic ray hit (and their neighbours: charge diffusion) are left out
    crs = truth.cosmic_rays
    crs = crs[(crs.visit == 1) & (crs.detector == 0)]
    hit = np.zeros(img.shape, bool)
    hit[crs.y.to_numpy(), crs.x.to_numpy()] = True
    hit = binary_dilation(hit)[y0 - 20 : y0 + 21, x0 - 20 : x0 + 21]
    core = (np.hypot(*np.indices(data.shape) - 20) < 8) & ~hit
    assert core.sum() > 150
    assert data[core].sum() == pytest.approx(model[core].sum(), rel=0.02)
    assert data[core].max() == pytest.approx(model[core].max(), rel=0.05)


def test_correlated_noise_factor(correlated):
    res, truth = correlated
    det = truth.detectors.iloc[0]
    img = Exposure.read(res.images[0])
    im, var, mask = (np.asarray(a, float) for a in (img.image, img.variance, img.mask))
    # the variance plane is the pre-resampling one: sky / gain + (rn / gain)^2, no factor
    r = truth.recipe
    g, rn = r.instrument.gain, r.instrument.read_noise
    assert np.median(var) == pytest.approx(det.sky_level / g + (rn / g) ** 2, rel=0.03)
    # measured: per-pixel variance = factor x plane, neighbour correlations as recorded
    assert 0.6 < det.noise_variance_factor < 1.0 and det.noise_corr_x > 0.0
    z = im - truth.sky(1, 0, *np.meshgrid(np.arange(im.shape[1]), np.arange(im.shape[0])))
    # source-free sky: exclude pixels within 6 px of any object and masked pixels
    near = np.zeros(im.shape, bool)
    for o in truth.exposures.itertuples():
        x, y = int(round(o.x)), int(round(o.y))
        h = 6 if o.counts < 2e4 else 25
        near[max(y - h, 0) : y + h + 1, max(x - h, 0) : x + h + 1] = True
    crs = truth.cosmic_rays
    near[crs.y.to_numpy(), crs.x.to_numpy()] = True
    good = ~near & (mask == 0)
    good[:4] = good[-4:] = False
    good[:, :4] = good[:, -4:] = False
    ratio = np.var(z[good]) / np.mean(var[good])
    assert ratio == pytest.approx(det.noise_variance_factor, rel=0.05)
    pair_x = good[:, :-1] & good[:, 1:]
    pair_y = good[:-1, :] & good[1:, :]
    zc = z - z[good].mean()
    rho_x = np.mean(zc[:, :-1][pair_x] * zc[:, 1:][pair_x]) / np.var(z[good])
    rho_y = np.mean(zc[:-1, :][pair_y] * zc[1:, :][pair_y]) / np.var(z[good])
    assert rho_x == pytest.approx(det.noise_corr_x, abs=0.02)
    assert rho_y == pytest.approx(det.noise_corr_y, abs=0.02)


def test_lanczos3_resampling_statistics():
    w = lanczos3_weights(0.0)
    assert w[3] == pytest.approx(1.0) and np.abs(np.delete(w, 3)).max() < 1e-12
    w = lanczos3_weights(0.5)
    assert w.sum() == pytest.approx(1.0) and w[3] == pytest.approx(w[4])
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((400, 400))
    out, st = resample_noise(noise, 0.5, -0.3)
    assert np.var(out) == pytest.approx(st["noise_variance_factor"], rel=0.03)
    rho = np.mean(out[:, :-1] * out[:, 1:]) / np.var(out)
    assert rho == pytest.approx(st["noise_corr_x"], abs=0.01)
    assert st["noise_corr_x"] > st["noise_corr_y"] > 0  # a half-pixel shift correlates most


def test_fwhm_definitions_on_a_gaussian():
    g = galsim.Gaussian(fwhm=4.0)
    fine = g.drawImage(nx=301, ny=301, scale=0.1, method="no_pixel").array
    assert half_max_fwhm(fine, 0.1) == pytest.approx(4.0, rel=0.01)
    img = g.drawImage(nx=63, ny=63, scale=1.0, method="no_pixel").array
    assert moment_fwhm(img) == pytest.approx(4.0, rel=0.01)


def test_psf_family_defaults_keep_atmospheric():
    r = load_recipe("tiny")
    assert r.psf.family == "atmospheric" and r.noise.correlation == "none"
    v = build_scene(r).visits
    assert "psf_family" not in v.columns  # the visits table of existing recipes is unchanged


# ----------------------------------------------------------------------------- large4k
def test_large4k_recipe_is_consistent():
    """The 4k-frame recipe (one full-size DECam/HSC-like CCD at 0.26"/px, two r visits):
    its scene and PSFs are checked without drawing (a 4096^2 frame takes ~1 min)."""
    from procsky.sim.recipe import recipe_path

    r = load_recipe("large4k")
    assert "large4k" in recipe_names()
    # the datasets/ copy is the packaged one
    project = Path(__file__).resolve().parents[1] / "datasets" / "large4k.yaml"
    assert project.read_text() == recipe_path("large4k").read_text()
    ins = r.instrument
    assert (ins.n_detectors_x, ins.n_detectors_y, ins.detector_nx, ins.detector_ny) == (1, 1, 4096, 4096)
    assert ins.pixel_scale == pytest.approx(0.26)
    scene = build_scene(r)
    v = scene.visits
    assert list(v.visit) == [1, 2] and set(v.band) == {"r"}
    # a well-sampled ground PSF at every corner of both visits (0.7-1.4" = 2.7-5.4 px)
    geom = SimcamGeometry(ins, r.seed)
    for row in v.to_dict("records"):
        p = psf_params_from_dict(row)
        for x, y in [(0, 0), (4095, 4095), (2047.5, 2047.5)]:
            fx, fy = focal_plane_position(geom, 0, x, y)
            s = psf_summary(p, float(fx), float(fy))
            assert 2.5 <= s["psf_fwhm_pixel_px"] <= 6.0
    # the scene covers the detector of both visits with the recipe's star density (Poisson)
    side = 4096 * ins.pixel_scale / 3600.0
    obj = scene.objects
    for row in v.to_dict("records"):
        xi, eta = row["offset_xi"], row["offset_eta"]
        inside = (
            (obj.kind == "star")
            & ((obj.xi - xi).abs() < 0.45 * side * 3600)
            & ((obj.eta - eta).abs() < 0.45 * side * 3600)
        )
        expected = r.stars.density * (0.9 * side) ** 2
        assert abs(inside.sum() - expected) < 5 * np.sqrt(expected)
    # the brightest stars saturate (a 4k survey frame has bleed trails): peak electrons of
    # the brightest star above the full well
    m = 31.4 - 2.5 * np.log10(obj.flux_r[obj.kind == "star"].max())
    peak = truth_psf_image(psf_params_from_dict(v.iloc[0].to_dict()), 0.0, 0.0, size=15).max()
    assert 10 ** (-0.4 * (m - v.zp_electrons.iloc[0])) * peak > ins.full_well


@pytest.mark.slow
def test_large4k_draws(tmp_path):
    """One 4096 x 4096 visit of large4k drawn (~60-70 s on one core): the frame, its sky and
    its stars as the truth says."""
    res, truth = _draw_subset("large4k", tmp_path, visits=(1,))
    img = Exposure.read(res.images[0])
    im, var, mask = np.asarray(img.image, float), np.asarray(img.variance), np.asarray(img.mask)
    assert im.shape == (4096, 4096) and var.shape == im.shape
    det = truth.detectors.iloc[0]
    assert det.n_saturated_objects >= 1 and (mask & SAT).any()
    # the sky: median of the frame at the truth's level, within 1 % (sources add a little)
    assert np.median(im) == pytest.approx(det.sky_level, rel=0.02)
    # bright isolated stars: box sums equal the truth's counts (their wings beyond: < 1 %)
    ex = truth.exposures.merge(truth.objects[["object_id", "kind"]])
    xy = ex[["x", "y"]].to_numpy()
    cand = ex[(ex.kind == "star") & ~ex.saturated & ex.x.between(40, 4055) & ex.y.between(40, 4055)]
    cand = cand[cand.counts > 2e4].sort_values("counts", ascending=False)
    n = 0
    for s in cand.itertuples():
        d = np.hypot(xy[:, 0] - s.x, xy[:, 1] - s.y)
        if ex.counts[(d < 30) & (d > 0)].sum() > 0.003 * s.counts:
            continue
        x0, y0 = int(round(s.x)), int(round(s.y))
        sl = (slice(y0 - 20, y0 + 21), slice(x0 - 20, x0 + 21))
        yy, xx = np.mgrid[sl]
        if mask[sl].any():
            continue
        box = im[sl] - truth.sky(1, 0, xx, yy)
        assert box.sum() == pytest.approx(s.counts, rel=0.02)
        n += 1
        if n == 10:
            break
    assert n >= 5
