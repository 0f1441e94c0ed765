"""The multiband deblender (procsky.objects.deblend, procsky.kernels.deblend) against truth.

Blends are drawn with GalSim (Moffat stars, a sheared exponential galaxy) in two bands of
different colours; the detections are a stand-in with the attributes ``deblend`` uses
(labels of the thresholded, grown sum image, the parent bbox and the true peak positions).
Fluxes are compared with the truth inside the footprint (the deblender splits the
footprint's pixels; light outside it is the measurement's business).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from procsky.exposure import Exposure, VisitInfo
from procsky.kernels import deblend as kd
from procsky.objects.deblend import DeblendConfig, Deblended, deblend
from procsky.psf import ImagePsf

PIXEL_SCALE = 0.2
FWHM = 0.8  # arcsec, 4 px
BANDS = ("g", "r")


def _profile(galsim, band_fwhm, kind, flux):
    psf = galsim.Moffat(beta=3.5, fwhm=band_fwhm)
    if kind == "star":
        return psf.withFlux(flux)
    gal = galsim.Exponential(half_light_radius=0.5).shear(g1=0.2, g2=0.1)
    return galsim.Convolve(gal, psf).withFlux(flux)


def make_blend(
    sep_fwhm,
    *,
    fluxes=((6000.0, 2500.0), (2000.0, 4000.0)),
    kinds=("star", "star"),
    sigma=1.0,
    fwhm=None,
    n=64,
    seed=0,
    single=False,
    fp_level=None,
):
    """Two sources (or one, ``single``) ``sep_fwhm`` PSF FWHM apart, noise ``sigma`` nJy/px.

    Returns (coadds, detections stand-in, truth (K, B) fluxes inside the footprint)."""
    galsim = pytest.importorskip("galsim")
    rng = np.random.default_rng(seed)
    fwhm = fwhm or dict.fromkeys(BANDS, FWHM)
    sep = sep_fwhm * FWHM / PIXEL_SCALE
    pos = [(n / 2 - sep / 2 + 0.3, n / 2 + 0.2), (n / 2 + sep / 2 + 0.3, n / 2 + 0.1)]
    if single:
        pos, kinds, fluxes = pos[:1], kinds[:1], fluxes[:1]
    stamps = np.zeros((len(pos), len(BANDS), n, n))
    coadds = {}
    for i, b in enumerate(BANDS):
        for k, (x, y) in enumerate(pos):
            obj = _profile(galsim, fwhm[b], kinds[k], fluxes[k][i])
            stamps[k, i] = obj.drawImage(nx=n, ny=n, scale=PIXEL_SCALE, offset=(x - n / 2, y - n / 2)).array
        img = stamps[:, i].sum(axis=0) + rng.normal(0.0, sigma, (n, n))
        psf = galsim.Moffat(beta=3.5, fwhm=fwhm[b]).drawImage(nx=25, ny=25, scale=PIXEL_SCALE).array
        coadds[b] = Exposure(
            img.astype(np.float32),
            np.full((n, n), sigma**2, np.float32),
            np.zeros((n, n), np.uint32),
            psf=ImagePsf(psf),
            visit_info=VisitInfo(band=b),
        )
    noiseless = stamps.sum(axis=(0, 1))
    fp = ndi.binary_dilation(noiseless > (fp_level or 3.0 * sigma), iterations=2)
    lab, _ = ndi.label(fp)
    lab = np.where(lab == lab[int(round(pos[0][1])), int(round(pos[0][0]))], 1, 0).astype(np.int32)
    ys, xs = np.nonzero(lab)
    parents = pd.DataFrame(
        {"parent_id": [1], "x0": [xs.min()], "y0": [ys.min()], "x1": [xs.max() + 1], "y1": [ys.max() + 1]}
    )
    parents["area"] = len(xs)
    parents["n_peaks"] = len(pos)
    peaks = pd.DataFrame(
        {
            "peak_id": np.arange(1, len(pos) + 1),
            "parent_id": 1,
            "x": [p[0] for p in pos],
            "y": [p[1] for p in pos],
        }
    )
    dets = SimpleNamespace(bands=list(BANDS), labels=lab, parents=parents, peaks=peaks)
    truth = (stamps * (lab > 0)).sum(axis=(2, 3))
    return coadds, dets, truth


def _fluxes(d: Deblended):
    c = d.children.sort_values("id")
    return np.stack([c[f"{b}_deblend_flux"].to_numpy() for b in BANDS], axis=1)


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for sep in (1.0, 2.0, 3.0):
        coadds, dets, truth = make_blend(sep, seed=int(sep))
        out[sep] = (coadds, dets, truth, deblend(coadds, dets))
    return out


@pytest.mark.parametrize("sep", [2.0, 3.0])
def test_star_pair_fluxes_and_colours(pairs, sep):
    _, _, truth, d = pairs[sep]
    got = _fluxes(d)
    np.testing.assert_allclose(got, truth, rtol=0.03)
    colour = -2.5 * np.log10(got[:, 0] / got[:, 1])
    colour_true = -2.5 * np.log10(truth[:, 0] / truth[:, 1])
    np.testing.assert_allclose(colour, colour_true, atol=0.03)
    c = d.children
    assert not c["deblend_flag_skipped"].any() and not c["is_isolated"].any()
    assert (c["n_siblings"] == 1).all() and (c["deblend_iterations"] > 0).all()
    # the model fluxes agree with the redistributed ones (the model explains the blend)
    sed = np.stack([c.sort_values("id")[f"{b}_sed"].to_numpy() for b in BANDS], axis=1)
    np.testing.assert_allclose(sed, got, rtol=0.03)


def test_one_fwhm_pair_is_split_and_conserves_flux(pairs):
    """At 1 FWHM the pair is barely resolved: children still sum to the parent and the
    brighter-in-g source stays the bluer one."""
    coadds, dets, truth, d = pairs[1.0]
    got = _fluxes(d)
    parent = np.array([np.asarray(coadds[b].image, float)[dets.labels > 0].sum() for b in BANDS])
    np.testing.assert_allclose(got.sum(axis=0), parent, rtol=1e-5)
    assert (got > 0).all()
    assert got[0, 0] / got[0, 1] > got[1, 0] / got[1, 1]


@pytest.mark.parametrize("sep", [1.0, 3.0])
def test_children_sum_to_parent_pixels(pairs, sep):
    coadds, dets, _, d = pairs[sep]
    fp = dets.labels > 0
    total = np.zeros((len(BANDS),) + fp.shape)
    for cid in d.children["id"]:
        (x0, y0, x1, y1), img, model = d.child_images(cid)
        assert img.dtype == np.float32 and img.shape == model.shape == (len(BANDS), y1 - y0, x1 - x0)
        assert (model >= 0).all()
        total[:, y0:y1, x0:x1] += img
    for i, b in enumerate(BANDS):
        parent = np.where(fp, np.asarray(coadds[b].image, float), 0.0)
        np.testing.assert_allclose(total[i], parent, atol=1e-3 * np.abs(parent).max())


def test_star_galaxy_blend():
    coadds, dets, truth = make_blend(3.0, kinds=("star", "galaxy"), fluxes=((5000.0, 3000.0), (3000.0, 6000.0)), seed=4)
    got = _fluxes(deblend(coadds, dets))
    np.testing.assert_allclose(got, truth, rtol=0.04)


def test_bands_with_different_psfs():
    """g's PSF wider than r's: the model lives at r's PSF and g is reached by a difference kernel."""
    coadds, dets, truth = make_blend(3.0, fwhm={"g": 1.0, "r": 0.8}, seed=5)
    got = _fluxes(deblend(coadds, dets))
    np.testing.assert_allclose(got, truth, rtol=0.04)


def test_isolated_source_is_returned_unchanged():
    coadds, dets, truth = make_blend(2.0, single=True, seed=6)
    d = deblend(coadds, dets)
    c = d.children
    assert len(c) == 1 and bool(c["is_isolated"].iloc[0]) and int(c["deblend_iterations"].iloc[0]) == 0
    (x0, y0, x1, y1), img, model = d.child_images(int(c["id"].iloc[0]))
    fp = dets.labels[y0:y1, x0:x1] > 0
    for i, b in enumerate(BANDS):
        np.testing.assert_array_equal(img[i], np.where(fp, np.asarray(coadds[b].image)[y0:y1, x0:x1], 0.0))
    np.testing.assert_allclose(_fluxes(d), truth, rtol=0.01)


def test_guards_keep_parent_undeblended(pairs):
    coadds, dets, _, _ = pairs[2.0]
    area = int((dets.labels > 0).sum())
    t0 = time.monotonic()
    big = deblend(coadds, dets, DeblendConfig(max_area_x_peaks=2 * area - 1))
    slow = deblend(coadds, dets, DeblendConfig(time_limit=1e-9, check_every=1))
    assert time.monotonic() - t0 < 5.0
    assert big.children["deblend_flag_too_big"].all() and big.children["deblend_flag_skipped"].all()
    assert (big.children["deblend_iterations"] == 0).all()
    assert slow.children["deblend_flag_timeout"].all() and not slow.children["deblend_flag_too_big"].any()
    for d in (big, slow):
        for cid in d.children["id"]:
            (x0, y0, x1, y1), img, _ = d.child_images(cid)
            parent = np.where(dets.labels > 0, np.asarray(coadds["g"].image), 0.0)
            np.testing.assert_array_equal(img[0], parent[y0:y1, x0:x1])
    with pytest.raises(KeyError, match="peak_id"):
        big.child_images(999)


def test_zero_noise_converges_to_truth():
    """Without noise (S/N ~ 1e5) the fit stops on its own (loss stationary) near the truth;
    what remains is the model's limit (monotonic morphologies in a 0.8 px Gaussian frame)."""
    coadds, dets, truth = make_blend(2.0, sigma=1e-2, seed=7, fp_level=3.0)
    cfg = DeblendConfig()
    d = deblend(coadds, dets, cfg)
    c = d.children
    assert not c["deblend_flag_not_converged"].any() and (c["deblend_iterations"] < cfg.max_iter).all()
    np.testing.assert_allclose(_fluxes(d), truth, rtol=0.02)


def test_kernels_adjoint_and_monotonic():
    rng = np.random.default_rng(1)
    img, res = rng.normal(size=(2, 17, 13))
    kern = rng.uniform(size=(5, 5))
    a, b = np.empty_like(img), np.empty_like(res)
    kd.convolve_same(img, kern, a)
    kd.correlate_same(res, kern, b)
    assert np.isclose((a * res).sum(), (img * b).sum())
    s = rng.uniform(size=(15, 15))
    py, px = 6, 8
    order = kd.monotonic_order(15, 15, py, px)
    kd.prox_monotonic(s, order, py, px)
    # non-increasing outward: no pixel exceeds every 8-neighbour that is closer to the peak
    yy, xx = np.mgrid[:15, :15]
    d2 = (yy - py) ** 2 + (xx - px) ** 2
    for y in range(15):
        for x in range(15):
            if d2[y, x] == 0:
                continue
            inner = [
                s[y + dy, x + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if 0 <= y + dy < 15 and 0 <= x + dx < 15 and d2[y + dy, x + dx] < d2[y, x]
            ]
            assert s[y, x] <= max(inner) + 1e-12
    before = s.copy()
    kd.prox_monotonic(s, order, py, px)
    np.testing.assert_array_equal(s, before)  # a projection: monotonic images are left alone


def test_separable_convolution_matches_full_kernel():
    """The fit's low-rank separable convolution (and its adjoint) against the full kernel."""
    rng = np.random.default_rng(2)
    img = rng.normal(size=(2, 19, 23))
    kern = rng.uniform(size=(1, 7, 7))
    u, v, rank = kd.separable_factors(kern, tol=1e-9)
    assert rank[0] == 7
    mask = rng.uniform(size=img.shape[1:]) < 0.6
    tmp, out, ref = (np.empty(img.shape[1:]) for _ in range(3))
    for adjoint, full in ((False, kd.convolve_same), (True, kd.correlate_same)):
        kd._convolve_sep(img[0], u[0], v[0], rank[0], out, tmp, mask, adjoint)
        full(img[0], kern[0], ref)
        np.testing.assert_allclose(out, np.where(mask, ref, 0.0), atol=1e-10)
    # a round kernel needs few terms for 1e-2 of its norm
    yy, xx = np.mgrid[-8:9, -8:9]
    moffat = (1 + (yy**2 + xx**2) / 9.0) ** -3.5
    assert kd.separable_factors(moffat[None] / moffat.sum(), tol=1e-2)[2][0] <= 3


def test_threads_give_the_same_children():
    """Blends fitted in two threads: the same children, in the same order, as in one."""
    from procsky.objects.deblend import DeblendConfig, deblend
    from procsky.objects.detection import detect_objects
    from procsky.sim.coadd_scene import make_coadd_scene

    sc = make_coadd_scene(shape=(200, 200), n_stars=8, n_galaxies=8, n_pairs=6, seed=5)
    det = detect_objects(sc.exposures)
    one = deblend(sc.exposures, det, DeblendConfig(threads=1))
    two = deblend(sc.exposures, det, DeblendConfig(threads=2))
    assert int((det.parents["n_peaks"] > 1).sum()) >= 2
    cols = [c for c in one.children.columns if c != "deblend_cpu"]
    pd.testing.assert_frame_equal(one.children[cols], two.children[cols])
    for cid in one.children["id"]:
        np.testing.assert_array_equal(one.child_images(cid)[1], two.child_images(cid)[1])
