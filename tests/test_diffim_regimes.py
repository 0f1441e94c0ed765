"""Difference imaging on the simulator's real-data regimes, against the truth (issue 19).

Two visits of one detector are simulated, calibrated and the sharper one warped onto the
other's grid (its counts: the truth kernel sum is the ratio of the visits' counts per nJy),
as ``benchmarks/compare_diffim_regimes.py`` does for every regime with SFFT beside. Judged
here where met and fast: on ``correlated``, the kernel sum within 1 % of the truth, the
variance plane within 10 % of the measured noise and the pixel z spread at static stars in
0.9-1.1. On ``space``, the kernel sum within 1 % (the fitted sum combined with the stars' flux
ratio on the PSF-matched pair) and the kernel fit's sky weights (``stamp_weights``): net flux
and residual at the bright static stars. Not asserted because not met (see the benchmark):
the PSF-weighted z at static stars over all S/N (bright stars leave shape residuals of a few
% of their flux; the faint ones' is the variance check); ``undersampled`` is in the
benchmark only (a simulation and two calibrations of 2k frames, too long for this file). On
``stamp256`` (256 px, 8 stars), the kernel sum within 1 % with a transient among the few
kernel-star candidates.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from procsky.calibrate import CalibrationConfig
from procsky.calibrate.driver import calibrate_exposure
from procsky.diffim import simulate_pair, subtract_images, warp_template_to_science
from procsky.exposure import Exposure
from procsky.notes import collect_notes
from procsky.refcat import read_refcat_file
from procsky.sim import SimTruth, recipe_path, simulate
from procsky.sim.render import image_filename
from procsky.wcs import wcs_cards


def _pair(tmp_path_factory, recipe: str, size: int | None, visits: tuple[int, int]):
    """(diff, summary, truth kernel sum, the science visit's truth objects, note codes, its FWHM)."""
    spec = yaml.safe_load(recipe_path(recipe).read_text())
    if size is not None:  # a cut of the detector: same density, fewer sources
        spec["instrument"].update(n_detectors_x=1, n_detectors_y=1, detector_nx=size, detector_ny=size)
    out = tmp_path_factory.mktemp(recipe)
    simulate(spec, out, visits=list(visits), detectors=[0], scheduler="sync", progress=False)
    truth = SimTruth(out)
    dets = truth.detectors.sort_values("psf_fwhm_pixel_px")
    v_tpl, v_sci = int(dets.visit.iloc[0]), int(dets.visit.iloc[1])
    refcat = read_refcat_file(out / "refcat/refcat.parquet")
    cal = {}
    for v in (v_tpl, v_sci):
        exp = Exposure.read(out / "images" / image_filename("calexp", v, 0))
        calexp = calibrate_exposure(exp, refcat, CalibrationConfig())[0].compute()
        w = truth.wcs(v, 0)  # registration by the true WCS: astrometry is not what is tested
        cal[v] = calexp._replace(wcs=w, wcs_cards=wcs_cards(w))
    tpl = warp_template_to_science([cal[v_tpl]._replace(photocalib=None)], cal[v_sci])
    with collect_notes() as notes:
        diff, _, summary = subtract_images(cal[v_sci], tpl, lazy=False)
    ex = truth.exposures.merge(truth.objects[["object_id", "kind"]])
    scale = {v: float(np.median((ex.counts / ex.flux)[(ex.visit == v) & (ex.flux > 0)])) for v in (v_tpl, v_sci)}
    sat_tpl = set(ex.object_id[(ex.visit == v_tpl) & ex.saturated])
    objs = ex[ex.visit == v_sci].assign(saturated_tpl=lambda d: d.object_id.isin(sat_tpl))
    fwhm = float(dets.psf_fwhm_pixel_px.iloc[1])
    # K (x) C ~ T: the truth kernel sum is counts_T / counts_C
    ksum_truth = scale[v_sci] / scale[v_tpl]
    if summary["mode"] == "convolve_science":
        ksum_truth = 1.0 / ksum_truth
    return diff, summary, ksum_truth, objs, [n["code"] for n in notes], fwhm


def _z_figures(diff, objs, fwhm, margin):
    """(noise / variance plane on pixels far from every truth object, pixel z std within
    1.5 FWHM of static stars, number of stars)."""
    d = np.asarray(diff.image, float)
    v = np.asarray(diff.variance, float)
    bad = (np.asarray(diff.mask) & diff.mask_bits("NO_DATA", "BAD", "SAT", "CR", "EDGE", "SUSPECT")) != 0
    ny, nx = d.shape
    yy, xx = np.mgrid[:ny, :nx]
    s = fwhm / 2.3548
    sigma_pix = float(np.sqrt(np.median(v)))
    near = np.zeros((ny, nx), bool)
    for x, y, c, kind in zip(objs.x, objs.y, objs.counts, objs.kind):
        # twice the radius where a Gaussian PSF of the object's counts falls to 0.1 sigma
        peak = max(float(c), 0.0) / (2 * np.pi * s * s)
        r = max(2 * s * np.sqrt(2 * np.log(max(peak / (0.1 * sigma_pix), 1.0))), 2 * fwhm)
        near |= (yy - y) ** 2 + (xx - x) ** 2 < (r * (3.0 if kind == "galaxy" else 1.0)) ** 2
    free = ~near & ~bad
    free[:margin] = free[-margin:] = False
    free[:, :margin] = free[:, -margin:] = False
    z = d[free] / np.sqrt(v[free])
    noise_over_plane = 1.4826 * float(np.median(np.abs(z - np.median(z))))
    movers = objs[objs.kind.isin(["variable", "transient"])]
    sat = objs[objs.saturated | objs.saturated_tpl]
    stars = objs[(objs.kind == "star") & ~objs.saturated & ~objs.saturated_tpl]
    r_core = max(int(np.ceil(1.5 * fwhm)), 2)
    zs = []
    for x, y in zip(stars.x, stars.y):
        ix, iy = int(round(x)), int(round(y))
        if not (margin <= ix < nx - margin and margin <= iy < ny - margin):
            continue
        if np.any(np.hypot(movers.x - x, movers.y - y) < 5 * fwhm + 5):
            continue
        if np.any(np.hypot(sat.x - x, sat.y - y) < 10 * fwhm + 10):
            continue
        sl = (slice(iy - r_core, iy + r_core + 1), slice(ix - r_core, ix + r_core + 1))
        if bad[sl].any():
            continue
        core = (yy[sl] - iy) ** 2 + (xx[sl] - ix) ** 2 <= r_core**2
        zs.append((d[sl] / np.sqrt(v[sl]))[core])
    return noise_over_plane, float(np.concatenate(zs).std()), len(zs)


@pytest.fixture(scope="module")
def correlated(tmp_path_factory):
    return _pair(tmp_path_factory, "correlated", None, (1, 2))


def test_correlated_regime_kernel_sum_and_noise(correlated):
    diff, s, ksum_truth, objs, _, fwhm = correlated
    assert s["kernel_sum"] == pytest.approx(ksum_truth, rel=0.01)
    # a Lanczos-resampled calexp warped again: the variance plane is measured and applied
    noise_over_plane, z_pix, n = _z_figures(diff, objs, fwhm, margin=s["kernel_half_width"] + 12)
    assert n >= 10
    assert 0.9 <= noise_over_plane <= 1.1, noise_over_plane
    assert 0.9 <= z_pix <= 1.1, z_pix


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return _pair(tmp_path_factory, "space", None, (1, 3))


def test_space_pair_sky_weighted_kernel(space):
    # Two diffraction-limited PSFs (FWHM 2.2 px at half maximum) of five kernel stamps: the
    # Gaussian basis cannot match their aberrations and the variance-weighted fit, which
    # gives up the bright cores, left at the three brightest static stars a net flux of
    # -6.6, -11.2 and -5.5 % of theirs and a residual (noise removed) of 6.3-6.7 %. Sky
    # weights (stamp_weights="auto" picks them for PSFs under 2.75 px): residual below 4.5 %
    # (3.4-3.9 %). The fitted sum (+3.6 % from the truth; its five stamps scatter by 7 %) is
    # combined with the stars' flux ratio on the PSF-matched pair, measured in a 3 FWHM box
    # because the kernel does not match the cores (the core ratio is 8 % high): within 1 %.
    # The bright stars then leave net fluxes within 2 % (-0.9, +0.3 %), except the one whose
    # core in the science visit is a repaired cosmic ray (-5.3 %: the repair, not the kernel).
    diff, s, ksum_truth, objs, codes, fwhm = space
    assert s["stamp_weights"] == "sky"
    assert s["kernel_sum"] == pytest.approx(ksum_truth, rel=0.01)
    assert s["kernel_sum_reference_source"] == "matched_stars" and s["kernel_sum_matched_aperture"] == "total"
    assert abs(s["kernel_sum_fitted"] / ksum_truth - 1.0) > 0.02
    assert "diffim_kernel_core_mismatch" in codes and "diffim_kernel_sum_rescaled" in codes
    d = np.asarray(diff.image, float)
    v = np.asarray(diff.variance, float)
    ny, nx = d.shape
    m = s["kernel_half_width"] + 12
    stars = objs[(objs.kind == "star") & ~objs.saturated & ~objs.saturated_tpl]
    stars = stars[(stars.x > m) & (stars.x < nx - m) & (stars.y > m) & (stars.y < ny - m)]
    bright = stars.sort_values("counts", ascending=False).iloc[:3]
    r = int(np.ceil(2 * fwhm))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    net = []
    for x, y, c in zip(bright.x, bright.y, bright.counts):
        ix, iy = int(round(x)), int(round(y))
        sl = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        ap = (yy + iy - y) ** 2 + (xx + ix - x) ** 2 <= r * r
        dd = d[sl][ap]
        vv = v[sl][ap]
        assert np.sqrt(max(float(np.sum(dd * dd) - vv.sum()), 0.0)) < 0.045 * c, (x, y)
        net.append(abs(float(dd.sum())) / c)
    net.sort()
    assert net[1] < 0.02 and net[2] < 0.06, net


def test_sparse_field_with_bad_pixels_near_every_star_fits():
    # A sparse frame (8 stars; 3 kernel stamps when clean) whose every star has a bad pixel
    # 12 px from its centre, outside its core (8 px) but inside the core-plus-kernel box
    # (19 px) the kernel stars must keep clean, which left no stamp: the last fits allow unusable
    # pixels outside the star's core (the stamp fit gives them no weight) and the kernel sum
    # stays within 1 % of the truth 1 / flux_scale.
    sci, tpl, truth = simulate_pair((256, 256), n_stars=8, seed=5, star_flux=(2e4, 2e5), flux_scale=0.8)
    mask = np.asarray(sci.mask).copy()
    bad_bit = np.uint32(sci.mask_bits("BAD"))
    for x, y in zip(truth["stars"]["x"], truth["stars"]["y"]):
        ix, iy = int(round(x)) + 12, int(round(y))
        if 0 <= ix < 256 and 0 <= iy < 256:
            mask[iy, ix] |= bad_bit
    sci = sci._replace(mask=mask)
    diff, _, s = subtract_images(sci, tpl, lazy=False)
    assert any("masked pixels allowed outside the core" in a for a in s["kernel_fit_attempts"])
    assert s["kernel_fit_attempts"][-1].endswith("fitted")
    assert s["kernel_sum"] == pytest.approx(1.25, rel=0.01)


@pytest.fixture(scope="module")
def stamp256(tmp_path_factory):
    return _pair(tmp_path_factory, "stamp256", None, (1, 2))


def test_stamp256_kernel_sum_without_the_transient(stamp256):
    # Three kernel-star candidates at S/N >= 30, one of them a transient on its host (flux
    # ratio 1.6 against the pair's 0.99): kept among three stamps it bent the kernel (fitted
    # sum +26 %, and a core shape that biased the stars' matched flux ratio by -4 %). It is
    # left out by its flux ratio; the stars left (the relaxed attempt adds one whose template
    # has a repaired cosmic ray 11 px away) give the kernel sum within 1 %.
    diff, s, ksum_truth, objs, codes, fwhm = stamp256
    assert any("flux ratio changed" in a for a in s["kernel_fit_attempts"])
    assert s["kernel_fit_attempts"][-1].endswith("fitted")
    assert s["kernel_sum"] == pytest.approx(ksum_truth, rel=0.01)
    assert s["kernel_sum_reference_source"] == "matched_stars"
    assert s["kernel_sum_reference"] == pytest.approx(ksum_truth, rel=0.01)
    assert "diffim_kernel_star_variable" not in codes
