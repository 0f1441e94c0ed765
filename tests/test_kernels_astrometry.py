"""Tests of procsky.kernels.astrometry: projection, matching, TAN-SIP fit, zero point."""

from __future__ import annotations

import numpy as np
import pytest

from procsky.kernels.astrometry import (
    fit_tan_sip,
    match_sources,
    photometric_zero_point,
    sip_pixel_to_sky,
    sip_sky_to_pixel,
    tan_deproject,
    tan_project,
    tan_sip_position_error,
)

NX = NY = 2048
PIX = 0.2 / 3600.0


def _true_wcs():
    from astropy.wcs import WCS

    h = {
        "CTYPE1": "RA---TAN-SIP",
        "CTYPE2": "DEC--TAN-SIP",
        "CRVAL1": 150.0,
        "CRVAL2": 2.0,
        "CRPIX1": 1024.5,
        "CRPIX2": 1024.5,
        "CD1_1": -PIX,
        "CD1_2": 0.0,
        "CD2_1": 0.0,
        "CD2_2": PIX,
        "A_ORDER": 3,
        "B_ORDER": 3,
        "A_2_0": 2e-6,
        "A_0_2": -1e-6,
        "A_1_1": 5e-7,
        "B_2_0": 1e-6,
        "B_1_1": -2e-6,
        "A_3_0": 3e-10,
        "B_0_3": -2e-10,
    }
    return WCS(h)


def _approx_pixels(ra, dec, dra_arcsec, ddec_arcsec, rot_deg):
    """Reference stars through a TAN-only WCS that is shifted and rotated."""
    th = np.radians(rot_deg)
    cd = np.array([[-PIX, 0], [0, PIX]]) @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    xi, eta = tan_project(ra, dec, 150.0 + dra_arcsec / 3600 / np.cos(np.radians(2.0)), 2.0 + ddec_arcsec / 3600)
    uv = np.linalg.solve(cd, np.vstack([xi, eta]))
    return uv[0] + 1023.5, uv[1] + 1023.5


@pytest.mark.parametrize("dec0", [-89.0, -30.0, 0.0, 45.0, 89.5])
def test_tan_projection_round_trip_and_astropy(dec0):
    rng = np.random.default_rng(0)
    ra = (200.0 + rng.uniform(-0.5, 0.5, 100)) % 360
    dec = np.clip(dec0 + rng.uniform(-0.3, 0.3, 100), -89.99, 89.99)
    xi, eta = tan_project(ra, dec, 200.0, dec0)
    r2, d2 = tan_deproject(xi, eta, 200.0, dec0)
    sep = np.hypot(((r2 - ra + 180) % 360 - 180) * np.cos(np.radians(dec)), d2 - dec) * 3.6e6
    assert sep.max() < 1e-3  # mas
    from astropy.wcs import WCS

    w = WCS(
        {
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            "CRVAL1": 200.0,
            "CRVAL2": dec0,
            "CRPIX1": 1.0,
            "CRPIX2": 1.0,
            "CD1_1": 1.0,
            "CD1_2": 0.0,
            "CD2_1": 0.0,
            "CD2_2": 1.0,
        }
    )
    px, py = w.all_world2pix(ra, dec, 0)
    np.testing.assert_allclose(px, xi, atol=1e-9)
    np.testing.assert_allclose(py, eta, atol=1e-9)


@pytest.mark.parametrize("dra,ddec,rot", [(25.0, -20.0, 0.7), (-28.0, 10.0, -1.0), (0.0, 0.0, 0.0)])
def test_match_and_fit_tan_sip(dra, ddec, rot):
    rng = np.random.default_rng(1)
    true = _true_wcs()
    n = 600
    ra, dec = true.all_pix2world(rng.uniform(0, NX, n), rng.uniform(0, NY, n), 0)
    mag = rng.uniform(16, 22, n)
    xt, yt = true.all_world2pix(ra, dec, 0)
    det = rng.random(n) < 0.8
    noise = 0.025  # px = 5 mas
    nsp = 100
    sx = np.r_[xt[det] + rng.normal(0, noise, det.sum()), rng.uniform(0, NX, nsp)]
    sy = np.r_[yt[det] + rng.normal(0, noise, det.sum()), rng.uniform(0, NY, nsp)]
    flux = np.r_[10 ** (-0.4 * (mag[det] - 25)), rng.uniform(1, 100, nsp)]
    rx, ry = _approx_pixels(ra, dec, dra, ddec, rot)
    m = match_sources(sx, sy, rx, ry, src_flux=flux, ref_mag=mag)
    assert m.ok, m.message
    truth_ref = np.flatnonzero(det)
    real = m.src_index < det.sum()
    assert real.all()  # no spurious source matched
    assert (truth_ref[m.src_index] == m.ref_index).all()
    assert len(m.src_index) >= 0.95 * det.sum()
    sol = fit_tan_sip(
        sx[m.src_index],
        sy[m.src_index],
        ra[m.ref_index],
        dec[m.ref_index],
        crpix=(1023.5, 1023.5),
        crval=(150.01, 2.01),
        order=3,
        shape=(NY, NX),
    )
    per_axis = noise * 0.2 * 1000  # mas
    assert sol.rms_x * 1000 == pytest.approx(per_axis, rel=0.2)
    assert sol.rms_y * 1000 == pytest.approx(per_axis, rel=0.2)
    # the fitted WCS agrees with the truth over the detector, through astropy too
    from astropy.wcs import WCS

    w = WCS(sol.to_fits_cards())
    gx, gy = rng.uniform(0, NX, 2000), rng.uniform(0, NY, 2000)
    r1, d1 = true.all_pix2world(gx, gy, 0)
    r2, d2 = w.all_pix2world(gx, gy, 0)
    err = np.hypot((r1 - r2) * np.cos(np.radians(d1)), d1 - d2) * 3.6e6
    assert np.median(err) < 2.0 and err.max() < 10.0  # mas
    r3, d3 = sip_pixel_to_sky(sol, gx, gy)
    np.testing.assert_allclose(r3, r2, atol=1e-9)
    np.testing.assert_allclose(d3, d2, atol=1e-9)
    px, py = sip_sky_to_pixel(sol, r2, d2)
    assert np.abs(px - gx).max() < 1e-6 and np.abs(py - gy).max() < 1e-6
    ax, ay = w.all_world2pix(r2, d2, 0)
    assert np.abs(ax - gx).max() < 1e-3


def test_match_reports_failure_instead_of_raising():
    rng = np.random.default_rng(2)
    m = match_sources(rng.uniform(0, 100, 50), rng.uniform(0, 100, 50), rng.uniform(0, 100, 3), rng.uniform(0, 100, 3))
    assert not m.ok and "too few" in m.message
    m = match_sources(
        rng.uniform(0, 2000, 200),
        rng.uniform(0, 2000, 200),
        rng.uniform(0, 2000, 200),
        rng.uniform(0, 2000, 200),
        max_offset=50,
    )
    assert not m.ok or len(m.src_index) < 15


def test_fit_tan_sip_needs_enough_stars():
    with pytest.raises(ValueError, match="cannot constrain"):
        fit_tan_sip(np.arange(5.0), np.arange(5.0), np.arange(5.0), np.arange(5.0), crpix=(0, 0), crval=(0, 0), order=3)


def test_fit_clips_outliers():
    rng = np.random.default_rng(3)
    true = _true_wcs()
    x, y = rng.uniform(0, NX, (2, 300))
    ra, dec = true.all_pix2world(x, y, 0)
    x = x + rng.normal(0, 0.02, 300)
    y = y + rng.normal(0, 0.02, 300)
    x[:10] += 5.0  # wrong matches
    sol = fit_tan_sip(x, y, ra, dec, crpix=(1023.5, 1023.5), crval=(150.0, 2.0), order=3, shape=(NY, NX))
    assert not sol.used[:10].any() and sol.used[10:].mean() > 0.97
    assert sol.rms_x < 0.01


def test_tan_sip_position_error_matches_monte_carlo():
    """The fitted WCS's own error at a position (HC1 sandwich covariance of the fit) agrees with
    the scatter of the fitted position over noise draws, with heteroscedastic star errors (a
    few bright stars among many faint ones, as in calibrate's unweighted fit), at the centre,
    mid-field and a corner (where an order-3 fit is least constrained)."""
    rng = np.random.default_rng(11)
    true = _true_wcs()
    n = 40
    x, y = rng.uniform(0, NX, (2, n))
    ra, dec = true.all_pix2world(x, y, 0)
    sig = np.where(np.arange(n) < 10, 0.005, 0.05)  # pixels: S/N ~1000 and ~100 stars
    probe_x, probe_y = np.array([1023.5, 1500.0, 5.0]), np.array([1023.5, 700.0, 2040.0])
    pra, pdec = true.all_pix2world(probe_x, probe_y, 0)
    off, pred = [], []
    for _ in range(300):
        sx, sy = x + rng.normal(0, sig), y + rng.normal(0, sig)
        sol = fit_tan_sip(sx, sy, ra, dec, crpix=(1023.5, 1023.5), crval=(150.0, 2.0), order=3, shape=(NY, NX), clip=0)
        fra, fdec = sip_pixel_to_sky(sol, probe_x, probe_y)
        off.append(np.c_[(fra - pra) * np.cos(np.radians(pdec)) * 3600, (fdec - pdec) * 3600])
        exi, eeta = tan_sip_position_error(sol, probe_x, probe_y)
        pred.append(np.c_[exi, eeta])
    off, pred = np.array(off), np.array(pred)
    ratio = np.sqrt(np.mean(pred**2, axis=0)) / off.std(axis=0)
    # 300 draws: ~4 % sampling error on the scatter; HC1 is ~10 % low for 40 stars and 10 terms
    assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    assert np.all(off.std(axis=0)[2] > 1.5 * off.std(axis=0)[0])  # the corner is worse than the centre
    # as many stars as terms + 2: a covariance; a solution without one gives NaN
    assert np.isnan(tan_sip_position_error(sol._replace(cov_xi=None), probe_x, probe_y)[0]).all()


def test_photometric_zero_point():
    rng = np.random.default_rng(4)
    inst = rng.uniform(-12, -6, 300)
    ref = inst + 27.3 + rng.normal(0, 0.03, 300)
    ref[:20] += rng.uniform(0.5, 2, 20)  # variables / bad matches
    zp, err, n, used = photometric_zero_point(ref, inst)
    assert zp == pytest.approx(27.3, abs=3 * err + 0.002)
    assert 0.001 < err < 0.005 and not used[:20].any() and n >= 270
    with pytest.raises(ValueError):
        photometric_zero_point([np.nan], [1.0])
