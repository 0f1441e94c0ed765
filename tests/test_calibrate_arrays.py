"""End-to-end tests of calibrate's pixel steps (``procsky.calibrate.process_arrays``) on a synthetic
frame, and of the detection and measurement kernels against SExtractor on a real one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from procsky.calibrate import process_arrays
from procsky.calibrate.state import StepProfile
from procsky.kernels import detect_sources, estimate_background, measure_sources
from procsky.kernels._bits import CR, DETECTED, INTRP
from procsky.kernels.testing import add_cosmic_rays, make_star_field

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "sep"


@pytest.fixture(scope="module")
def frame_run():
    fr = make_star_field(
        (1024, 1024),
        450,
        fwhm=4.0,
        fwhm_gradient=0.1,
        flux_range=(2e3, 4e5),
        sky=800.0,
        read_noise=5.0,
        seed=21,
        min_separation=14,
        margin=12,
    )
    img, crmask = add_cosmic_rays(fr.image, 250, seed=22)
    yy, xx = np.mgrid[:1024, :1024]
    img = img + (0.05 * xx + 0.02 * yy).astype(np.float32)  # sky gradient on top of the 800 counts
    res = process_arrays(img, fr.variance, psf_fwhm=4.0)
    return fr, crmask, res, 800.0 + 0.05 * xx + 0.02 * yy


def test_frame_cosmic_rays(frame_run):
    fr, crmask, res, _ = frame_run
    cr = (res.mask & (1 << CR)) != 0
    assert (res.cosmic_rays.mask & crmask).sum() >= 0.95 * crmask.sum()
    assert (cr & crmask).sum() >= 0.99 * crmask.sum()
    assert cr.sum() == res.n_cr >= res.cosmic_rays.n_pixels
    assert (((res.mask & (1 << INTRP)) != 0) == cr).all()
    assert (res.mask & (1 << DETECTED)).any()


def test_step_profile_covers_the_steps_and_changes_nothing(frame_run):
    fr, _, res, _ = frame_run
    img = np.asarray(res.image)
    profile = StepProfile(memory=True)
    again = process_arrays(img, fr.variance, psf_fwhm=4.0, profile=profile)
    # the profiled run gives the same pixels and sources
    assert np.array_equal(again.sub, res.sub) and np.array_equal(again.mask, res.mask)
    assert np.array_equal(again.meas["x"], res.meas["x"]) and np.array_equal(again.psf_flux, res.psf_flux)
    rows = {r["step"]: r for r in profile.table()}
    for name in ("background", "cosmic rays: L.A.Cosmic", "detection", "deblending", "measurement", "PSF model"):
        assert name in rows, name
    assert rows["background"]["calls"] == 2 and rows["detection"]["calls"] >= 2 and rows["other"]["calls"] == 1
    assert all(r["cpu_s"] >= 0.0 and r["wall_s"] >= 0.0 for r in rows.values())
    if profile.memory:
        # the whole call's peak is the largest step's, and no lower than the resident set it started from
        assert profile.peak_mb == max(r["peak_mb"] for r in rows.values())
        assert profile.peak_mb >= profile.start_rss_mb > 0


def test_frame_background(frame_run):
    fr, _, res, sky = frame_run
    err = res.background.background - sky
    assert np.median(np.abs(err)) < 0.05 * np.sqrt(800 + 25)


def test_frame_detection_and_astrometric_accuracy(frame_run):
    fr, _, res, _ = frame_run
    cat = res.meas
    d, i = cKDTree(np.column_stack([fr.x, fr.y])).query(np.column_stack([cat["x"], cat["y"]]))
    assert (d < 1).mean() > 0.99  # purity
    dt, _ = cKDTree(np.column_stack([cat["x"], cat["y"]])).query(np.column_stack([fr.x, fr.y]))
    assert (dt < 1).mean() > 0.97  # completeness (all stars here are S/N > 10)
    ok = d < 1
    bright = ok & (fr.flux[i] > 5e4) & ~cat["flag_blended"]
    dx = cat["x"][bright] - fr.x[i[bright]]
    dy = cat["y"][bright] - fr.y[i[bright]]
    mas = 200.0  # mas per pixel at 0.2"/px
    assert abs(np.median(dx)) * mas < 5 and abs(np.median(dy)) * mas < 5
    assert np.std(dx) * mas < 10 and np.std(dy) * mas < 10


def test_frame_psf_model_and_psf_fluxes(frame_run):
    fr, _, res, _ = frame_run
    assert res.psf_model is not None, res.psf_info.get("last_error")
    truth = 2.3548 * np.sqrt((4.0 / 2.3548) ** 2 + 1 / 12)  # pixel-integrated Gaussian at the centre
    assert res.psf_model.fwhm == pytest.approx(truth, rel=0.01)
    assert abs(res.psf_model.reserved_dT_median) < 0.01
    cat = res.meas
    assert res.used.sum() >= 30 and not (res.used & res.reserved).any()
    d, i = cKDTree(np.column_stack([fr.x, fr.y])).query(np.column_stack([cat["x"], cat["y"]]))
    good = (d < 1) & ~cat["flag_blended"] & ~cat["psf_flux_flag"] & ~cat["flag_cr"]
    # aperture-corrected, aperture-to-total PSF fluxes against the true total fluxes
    ratio = res.psf_flux[good] / fr.flux[i[good]]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.005)
    pull = (res.psf_flux[good] - fr.flux[i[good]]) / res.psf_flux_err[good]
    assert 0.9 <= np.std(pull) <= 1.1


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "image.cat").exists(), reason="../shared/data/real/sep not available")
def test_real_frame_against_sextractor_catalogue():
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ESO-LOG cards of this old header are non-standard
        img = fits.getdata(REAL / "image.fits").astype(np.float32)
    # columns (from the header of image.cat): 1 NUMBER, 2-3 X/Y_IMAGE, 4-5 X/YWIN_IMAGE, ...,
    # 13 FLUX_APER, 14 FLUXERR_APER, ..., 21 FLAGS
    ref = np.loadtxt(REAL / "image.cat", comments="#")
    # SExtractor settings of sep's data/default.sex: BACK_SIZE 64, BACK_FILTERSIZE 3,
    # DETECT_THRESH 1.5 sigma on the default.conv 3x3 pyramid filter, DETECT_MINAREA 5,
    # no deblending (DEBLEND_MINCONT 1), PHOT_APERTURES 10 px diameter
    bk = estimate_background(img, box_size=64, filter_size=3, extrapolate_edges=False)
    sub = img - bk.background
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)
    # 1.5 sigma of the unfiltered noise = 1.5 / (||k||_2 / sum k) sigma of the filtered noise
    nsigma = 1.5 / (np.sqrt((kernel**2).sum()) / kernel.sum())
    var = np.float32(bk.global_rms**2)
    det = detect_sources(sub, var, kernel=kernel, nsigma=nsigma, min_area=5, grow=0, deblend=False)
    cat = measure_sources(
        sub, np.full(img.shape, var, np.float32), None, det.x, det.y, psf_sigma=1.5, aperture_radii=(5.0,)
    )
    tree = cKDTree(np.column_stack([cat["x"], cat["y"]]))
    d_iso, i_iso = tree.query(ref[:, 1:3] - 1.0)  # FITS 1-based -> 0-based
    d_win, i_win = tree.query(ref[:, 3:5] - 1.0)
    # our centroid is windowed: an object is recovered if we are within 1 px of its
    # isophotal (X_IMAGE) or windowed (XWIN_IMAGE) position
    found = (d_iso < 1.0) | (d_win < 1.0)
    assert found.mean() >= 0.95
    idx = np.where(d_win < 1.0, i_win, i_iso)[found]
    ratio = cat["ap_flux_5"][idx] / ref[found, 12]
    print(
        f"sep/image.fits: {found.mean():.1%} of {len(ref)} SExtractor objects matched within 1 px; "
        f"median aperture flux ratio {np.median(ratio):.4f}"
    )
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    # errors: SExtractor with GAIN=0 uses the background rms only, as we do here
    assert np.median(cat["ap_flux_5_err"][idx] / ref[found, 13]) == pytest.approx(1.0, abs=0.05)
    # the background map agrees with SExtractor's check image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = fits.getdata(REAL / "back.fits")
    assert np.median(np.abs(bk.background - back)) < 0.05 * bk.global_rms
