"""Dipole fitting kernel (procsky.kernels.dipole) and diffim._dipole_fit.

The reference is the previous implementation of ``diffim._dipole_fit`` (scipy's LM with a
numerical Jacobian, the PSF re-rendered by an FFT shift at every evaluation), kept here as
the "obvious" version.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from procsky.diffim import _dipole_fit, _oversampled_psf
from procsky.kernels.dipole import evaluate_psf, fit_dipole, interleave_offsets, oversampled_offsets
from procsky.psf import GaussianPsf, ImagePsf

BITS = 1 << 8  # NO_DATA


def _dipole_fit_scipy(image, variance, mask, bits, psf, xp, yp, xn, yn, xy0, half):
    """The former diffim._dipole_fit (scipy least_squares, FFT-shifted PSF per evaluation)."""
    from scipy.optimize import least_squares

    ny, nx = image.shape
    xc, yc = 0.5 * (xp + xn), 0.5 * (yp + yn)
    ix0, ix1 = max(int(xc) - half, 0), min(int(xc) + half + 1, nx)
    iy0, iy1 = max(int(yc) - half, 0), min(int(yc) + half + 1, ny)
    img = image[iy0:iy1, ix0:ix1].astype(float)
    var = variance[iy0:iy1, ix0:ix1].astype(float)
    ok = ((mask[iy0:iy1, ix0:ix1] & np.uint32(bits)) == 0) & (var > 0)
    if ok.sum() < 10:
        return None
    size = 2 * half + 1 + 2 * (psf.size // 2)
    size += 1 - size % 2
    w = np.where(ok, 1.0 / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    cxs, cys = xy0[0] + xc, xy0[1] + yc

    def model_psf(x, y):
        k = psf.render(cxs, cys, size=size, offset=(x - round(x), y - round(y)))
        hk = size // 2
        out = np.zeros_like(img)
        ox, oy = int(round(x)) - hk - ix0, int(round(y)) - hk - iy0
        sy0, sy1 = max(0, -oy), min(size, img.shape[0] - oy)
        sx0, sx1 = max(0, -ox), min(size, img.shape[1] - ox)
        if sy1 > sy0 and sx1 > sx0:
            out[oy + sy0 : oy + sy1, ox + sx0 : ox + sx1] = k[sy0:sy1, sx0:sx1]
        return out

    def resid(p):
        m = p[2] * model_psf(p[0], p[1]) - p[5] * model_psf(p[3], p[4])
        return ((img - m) * w)[ok]

    fp = max(float(img[ok].max()), 1.0) * 2 * np.pi * 4
    p0 = np.array([xp, yp, fp, xn, yn, fp])
    try:
        res = least_squares(resid, p0, method="lm", max_nfev=200)
    except Exception:  # noqa: BLE001
        return None
    chi2 = float(np.sum(res.fun**2) / max(ok.sum() - 6, 1))
    return {
        "pos_x": res.x[0],
        "pos_y": res.x[1],
        "pos_flux": res.x[2],
        "neg_x": res.x[3],
        "neg_y": res.x[4],
        "neg_flux": res.x[5],
        "chi2": chi2,
    }


def _add_psf(img, psf, x, y, flux):
    """Add ``flux * psf`` centred at (x, y) (render at the sub-pixel offset, paste)."""
    k = psf.render(x, y, offset=(x - round(x), y - round(y)))
    h = k.shape[0] // 2
    ix, iy = int(round(x)), int(round(y))
    ny, nx = img.shape
    y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = k.shape[0] - max(0, y1 - ny), k.shape[1] - max(0, x1 - nx)
    img[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += flux * k[sy0:sy1, sx0:sx1]


def _simulate(psf, xp, yp, fp, xn, yn, fn, *, shape=(48, 48), noise=10.0, seed=0):
    img = np.zeros(shape)
    _add_psf(img, psf, xp, yp, fp)
    _add_psf(img, psf, xn, yn, -fn)
    rng = np.random.default_rng(seed)
    var = np.full(shape, noise**2)
    img = img + rng.normal(size=shape) * noise
    return img.astype(np.float32), var.astype(np.float32), np.zeros(shape, np.uint32)


def _peaks(img, sigma):
    """Start positions as a detector would give them: the extrema of the smoothed image."""
    from scipy.ndimage import gaussian_filter

    s = gaussian_filter(img.astype(float), sigma)
    jp, ip = np.unravel_index(np.argmax(s), s.shape)
    jn, i_n = np.unravel_index(np.argmin(s), s.shape)
    return float(ip), float(jp), float(i_n), float(jn)


def _half(fwhm, xp, yp, xn, yn):
    return int(math.ceil(2 * fwhm + 0.5 * math.hypot(xp - xn, yp - yn)))


def _gaussian_image_psf(fwhm, size=31):
    return ImagePsf(GaussianPsf.from_fwhm(fwhm, size=size).render(0, 0))


# ----------------------------------------------------------------------- oversampled PSF
@pytest.mark.parametrize(
    "psf",
    [GaussianPsf.from_fwhm(4.0), _gaussian_image_psf(4.0), GaussianPsf.from_fwhm(3.0, 0.1, -0.05)],
    ids=["gaussian", "image", "elliptical"],
)
def test_oversampled_psf_reproduces_render(psf):
    os_ = _oversampled_psf(psf, 10.0, 20.0)
    s = os_.shape[0] // 4
    c = s // 2
    rng = np.random.default_rng(3)
    for dx, dy in list(rng.uniform(-0.5, 0.5, (8, 2))) + [(0.5, -0.5), (0.25, 0.75), (0.0, 0.0)]:
        ref = psf.render(10.0, 20.0, offset=(dx, dy))
        val, ddx, ddy = evaluate_psf(os_, 4, 0, 0, s, s, c + dx, c + dy)
        assert np.abs(val - ref).max() < 1e-3 * ref.max()
        # analytic position derivatives against finite differences of the interpolant
        e = 1e-5
        vx = evaluate_psf(os_, 4, 0, 0, s, s, c + dx + e, c + dy)[0]
        vy = evaluate_psf(os_, 4, 0, 0, s, s, c + dx, c + dy + e)[0]
        np.testing.assert_allclose(ddx, (vx - val) / e, atol=1e-4 * np.abs(ddx).max())
        np.testing.assert_allclose(ddy, (vy - val) / e, atol=1e-4 * np.abs(ddy).max())


def test_batched_shifts_equal_render():
    # the one-kernel, one-forward-FFT path of _oversampled_psf against psf.render per offset
    from procsky.psf import PolynomialImagePsf

    k0 = GaussianPsf.from_fwhm(3.0, size=33).render(0, 0)
    k1 = GaussianPsf.from_fwhm(4.0, 0.1, 0.0, size=33).render(0, 0)
    poly = PolynomialImagePsf(np.array([(k0 + k1) / 2, (k1 - k0) / 2, np.zeros_like(k0)]), 1, 50.0, 50.0, 50.0, 50.0)
    for psf, size in ((_gaussian_image_psf(3.0, size=21), None), (poly, 21), (poly, None)):
        os_ = _oversampled_psf(psf, 80.0, 30.0, size=size)
        s = os_.shape[0] // 4
        full = psf.render(80.0, 30.0)
        frac = full[(full.shape[0] - s) // 2 :, (full.shape[0] - s) // 2 :][:s, :s].sum()
        for a, b, dx, dy in oversampled_offsets(4):
            np.testing.assert_allclose(
                os_[b::4, a::4], frac * psf.render(80.0, 30.0, size=s, offset=(dx, dy)), rtol=0, atol=1e-12
            )


def test_cropped_oversampled_psf_keeps_full_normalisation():
    # a wide kernel with extended wings, like a difference image's (matching + decorrelation)
    core = GaussianPsf.from_fwhm(4.0, size=61).render(0, 0)
    wing = GaussianPsf.from_fwhm(14.0, size=61).render(0, 0)
    psf = ImagePsf(0.9 * core + 0.1 * wing)
    os_ = _oversampled_psf(psf, 0.0, 0.0, size=25)
    assert os_.shape == (100, 100)
    full = psf.render(0.0, 0.0, offset=(0.3, -0.2))
    v = evaluate_psf(os_, 4, 0, 0, 25, 25, 12.3, 11.8)[0]
    # the crop's outermost pixels lose the wing that a shift would bring in from outside it:
    # the fit box stays >= 3 px inside the crop (diffim._dipole_fit's margin)
    np.testing.assert_allclose(v[3:-3, 3:-3], full[21:40, 21:40], atol=1e-3 * full.max())
    # every sub-pixel phase keeps the weight the full kernel has inside the crop
    assert os_[::4, ::4].sum() == pytest.approx(
        full.sum() - (psf.render(0, 0).sum() - psf.render(0, 0)[18:43, 18:43].sum()), rel=1e-3
    )
    assert os_[1::4, 2::4].sum() == pytest.approx(os_[::4, ::4].sum(), rel=1e-12)


def test_interleave_layout():
    n, s = 4, 5
    st = np.arange(n * n * s * s, dtype=float).reshape(n, n, s, s)
    out = interleave_offsets(st)
    assert out.shape == (n * s, n * s)
    for b in range(n):
        for a in range(n):
            np.testing.assert_array_equal(out[b::n, a::n], st[b, a])
    offs = oversampled_offsets(n)
    assert len(offs) == 16 and offs[5] == (1, 1, -0.25, -0.25)


# ----------------------------------------------------------------------- fits vs scipy
_CASES = [
    # fwhm, separation (FWHM), angle (deg), flux ratio pos/neg
    (4.0, 0.3, 0.0, 1.0),
    (4.0, 0.5, 30.0, 2.0),
    (4.0, 1.0, 75.0, 0.5),
    (4.0, 2.0, 140.0, 1.0),
    (3.0, 0.7, 200.0, 1.5),
    (3.0, 1.5, 300.0, 0.7),
]


@pytest.mark.parametrize("fwhm,sep,angle,ratio", _CASES)
def test_dipole_fit_matches_truth_and_scipy(fwhm, sep, angle, ratio):
    psf = _gaussian_image_psf(fwhm)
    d = sep * fwhm
    t = math.radians(angle)
    xc, yc = 24.3, 23.8
    xp, yp = xc + 0.5 * d * math.cos(t), yc + 0.5 * d * math.sin(t)
    xn, yn = xc - 0.5 * d * math.cos(t), yc - 0.5 * d * math.sin(t)
    fn = 1e5
    fp = ratio * fn
    img, var, mask = _simulate(psf, xp, yp, fp, xn, yn, fn, seed=int(10 * sep + angle))
    sxp, syp, sxn, syn = _peaks(img, fwhm / 2.3548)
    half = _half(fwhm, sxp, syp, sxn, syn)
    new = _dipole_fit(img, var, mask, BITS, psf, sxp, syp, sxn, syn, (0, 0), half)
    assert new is not None
    # close dipoles are nearly degenerate in flux x separation: the tolerances follow
    tol_pos = 0.05 if sep >= 0.5 else 0.1
    tol_flux = 0.03 if sep >= 0.5 else 0.1
    assert new["pos_x"] == pytest.approx(xp, abs=tol_pos) and new["pos_y"] == pytest.approx(yp, abs=tol_pos)
    assert new["neg_x"] == pytest.approx(xn, abs=tol_pos) and new["neg_y"] == pytest.approx(yn, abs=tol_pos)
    assert new["pos_flux"] == pytest.approx(fp, rel=tol_flux)
    assert new["neg_flux"] == pytest.approx(fn, rel=tol_flux)
    assert new["chi2"] == pytest.approx(1.0, abs=0.25)
    old = _dipole_fit_scipy(img, var, mask, BITS, psf, sxp, syp, sxn, syn, (0, 0), half)
    assert old is not None
    # same pixels, same model up to the interpolation: as good a fit as scipy's or better
    assert new["chi2"] <= old["chi2"] * 1.005 + 1e-3


def test_dipole_fit_kernel_outputs():
    psf = GaussianPsf.from_fwhm(4.0)
    img, var, mask = _simulate(psf, 25.0, 24.0, 5e4, 21.5, 24.5, 4e4, seed=2)
    os_ = _oversampled_psf(psf, 0.0, 0.0)
    p0 = np.array([26.0, 24.0, 1.0, 21.0, 24.0, 1.0])
    params, errors, chi2, npix, nit, conv = fit_dipole(img, var, mask, BITS, 10, 10, 38, 38, os_, 4, p0)
    assert conv and npix == 28 * 28 and 0 < nit < 100
    assert chi2 == pytest.approx(1.0, abs=0.2)
    truth = np.array([25.0, 24.0, 5e4, 21.5, 24.5, 4e4])
    assert np.all(np.abs(params - truth) < 5 * errors)
    assert np.all(errors[[0, 1, 3, 4]] < 0.05)


def test_undersampled_psf_converges():
    fwhm = 1.5
    psf = GaussianPsf.from_fwhm(fwhm)
    for k, (xp, yp, xn, yn) in enumerate(
        [(24.2, 24.1, 22.7, 24.3), (30.4, 20.0, 29.6, 18.9), (20.0, 20.0, 21.9, 21.9)]
    ):
        img, var, mask = _simulate(psf, xp, yp, 3e4, xn, yn, 3e4, seed=k)
        sxp, syp, sxn, syn = _peaks(img, 0.5)
        res = _dipole_fit(img, var, mask, BITS, psf, sxp, syp, sxn, syn, (0, 0), _half(fwhm, sxp, syp, sxn, syn))
        assert res is not None
        assert math.hypot(res["pos_x"] - xp, res["pos_y"] - yp) < 0.1
        assert math.hypot(res["neg_x"] - xn, res["neg_y"] - yn) < 0.1
        assert res["pos_flux"] == pytest.approx(3e4, rel=0.05)
        assert res["neg_flux"] == pytest.approx(3e4, rel=0.05)
        assert res["chi2"] < 1.5


# ----------------------------------------------------------------------- masks and edges
def test_masked_pixels_are_left_out():
    psf = GaussianPsf.from_fwhm(4.0)
    xp, yp, xn, yn = 24.8, 24.0, 21.7, 23.5
    img, var, mask = _simulate(psf, xp, yp, 6e4, xn, yn, 5e4, seed=4)
    # garbage under a masked column through the positive lobe and a masked block
    img[:, 26] = 1e6
    mask[:, 26] |= BITS
    img[20:23, 18:21] = -1e6
    mask[20:23, 18:21] |= BITS
    var[10, 10] = 0.0  # no variance: out as well
    img[10, 10] = np.nan
    sxp, syp, sxn, syn = 25.0, 24.0, 22.0, 23.0
    res = _dipole_fit(img, var, mask, BITS, psf, sxp, syp, sxn, syn, (0, 0), 12)
    assert res is not None
    assert res["pos_x"] == pytest.approx(xp, abs=0.05) and res["neg_x"] == pytest.approx(xn, abs=0.05)
    assert res["pos_flux"] == pytest.approx(6e4, rel=0.03) and res["neg_flux"] == pytest.approx(5e4, rel=0.03)
    assert res["chi2"] < 1.3
    # everything masked: no fit
    assert _dipole_fit(img, var, np.full_like(mask, BITS), BITS, psf, sxp, syp, sxn, syn, (0, 0), 12) is None


@pytest.mark.parametrize("where", ["left", "top_right"])
def test_stamp_cut_by_image_edge(where):
    psf = GaussianPsf.from_fwhm(4.0)
    if where == "left":
        xp, yp, xn, yn = 4.5, 24.0, 1.6, 24.6
    else:
        xp, yp, xn, yn = 45.2, 46.0, 44.0, 43.5
    img, var, mask = _simulate(psf, xp, yp, 5e4, xn, yn, 5e4, seed=5)
    res = _dipole_fit(img, var, mask, BITS, psf, xp + 0.4, yp - 0.3, xn - 0.3, yn + 0.2, (100, 200), 10)
    assert res is not None
    assert math.hypot(res["pos_x"] - xp, res["pos_y"] - yp) < 0.08
    assert math.hypot(res["neg_x"] - xn, res["neg_y"] - yn) < 0.08
    assert res["pos_flux"] == pytest.approx(5e4, rel=0.05) and res["neg_flux"] == pytest.approx(5e4, rel=0.05)
    # a box entirely off the image: no fit
    assert _dipole_fit(img, var, mask, BITS, psf, -40.0, -40.0, -41.0, -40.0, (0, 0), 5) is None


# ----------------------------------------------------------------------- threads
def test_thread_safe_same_answer():
    psf = _gaussian_image_psf(3.5)
    sims = [_simulate(psf, 24.0 + 0.1 * k, 24.0, 4e4, 22.0, 24.5 - 0.1 * k, 3e4, seed=k) for k in range(6)]
    os_ = _oversampled_psf(psf, 0.0, 0.0)
    p0 = np.array([24.5, 24.0, 1.0, 21.5, 24.0, 1.0])

    def run(k):
        img, var, mask = sims[k]
        return fit_dipole(img, var, mask, BITS, 12, 12, 37, 37, os_, 4, p0)[0]

    serial = [run(k) for k in range(6)]
    out = {}

    def worker(tid):
        out[tid] = [run(k) for k in range(6) for _ in range(20)][::20]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tid in range(2):
        for a, b in zip(out[tid], serial):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- per-image PSF tables (DIA measurement)
def _poly_psf():
    from procsky.psf import PolynomialImagePsf

    k0 = GaussianPsf.from_fwhm(3.0, size=33).render(0, 0)
    k1 = GaussianPsf.from_fwhm(4.0, 0.1, 0.0, size=33).render(0, 0)
    return PolynomialImagePsf(np.array([(k0 + k1) / 2, (k1 - k0) / 2, np.zeros_like(k0)]), 1, 50.0, 50.0, 50.0, 50.0)


@pytest.mark.parametrize("kind", ["image", "polynomial"])
def test_psf_tables_equal_per_source_rendering(kind):
    from procsky.diffim.dia import _PsfTables
    from procsky.kernels.dipole import psf_stamp

    psf = _gaussian_image_psf(2.5, size=25) if kind == "image" else _poly_psf()
    tables = _PsfTables(psf)
    assert tables.supported
    rng = np.random.default_rng(5)
    for x, y in rng.uniform(0, 100, (4, 2)):
        # the table at (x, y) is the one _oversampled_psf builds there, to rounding
        np.testing.assert_allclose(tables.table(x, y), _oversampled_psf(psf, x, y), rtol=0, atol=1e-12)
        ix, iy = int(round(x)), int(round(y))
        fit, plain = tables.stamps(x, y, ix, iy)
        # the unshifted stamp is render's; the shifted one its interpolation (Keys, 4x)
        np.testing.assert_allclose(plain, psf.render(x, y), rtol=0, atol=1e-12)
        ref = psf.render(x, y, offset=(x - ix, y - iy))
        assert abs(fit.sum() - 1.0) < 1e-12 and np.abs(fit - ref).max() < 1e-3 * ref.max()
    # on the table's grid the stamp is the table's own sample
    tab = tables.table(30.0, 70.0)
    s = tab.shape[0] // 4
    np.testing.assert_allclose(psf_stamp(tab, 4, s, -0.25, -0.5), tab[2::4, 1::4] / tab[2::4, 1::4].sum(), atol=1e-14)
    # models the tables do not cover are rendered per source
    assert not _PsfTables(GaussianPsf.from_fwhm(3.0)).supported and not _PsfTables(None).supported


def test_dia_measurement_with_tables_matches_rendering(monkeypatch):
    """detect_dia_sources with the per-image tables against the per-source rendering it
    replaced, on a difference with point sources of both signs and dipoles."""
    from procsky.diffim import detect_dia_sources
    from procsky.diffim.dia import _PsfTables
    from procsky.exposure import Exposure

    psf = _poly_psf()
    rng = np.random.default_rng(11)
    n = 160
    img = rng.normal(size=(n, n)) * 10.0
    for k, (x, y) in enumerate([(30.3, 40.7), (90.6, 35.2), (120.1, 110.4), (45.5, 120.9), (100.2, 80.8)]):
        if k % 2:
            _add_psf(img, psf, x, y, 4000.0 * (1 if k % 4 == 1 else -1))
        else:  # a dipole along x
            _add_psf(img, psf, x + 1.2, y, 5000.0)
            _add_psf(img, psf, x - 1.2, y, -5000.0)
    diff = Exposure(img.astype(np.float32), np.full((n, n), 100.0, np.float32), psf=psf)
    new, _ = detect_dia_sources(diff)
    monkeypatch.setattr(_PsfTables, "supported", property(lambda self: False))
    old, _ = detect_dia_sources(diff)
    assert len(new) == len(old) >= 5 and new.is_dipole.sum() >= 2
    np.testing.assert_allclose(new.psf_flux, old.psf_flux, rtol=1e-3, atol=1e-3 * old.psf_flux_err.max())
    np.testing.assert_allclose(new.psf_flux_err, old.psf_flux_err, rtol=1e-3)
    for c in ("dipole_pos_flux", "dipole_neg_flux", "dipole_separation"):
        np.testing.assert_allclose(new[c], old[c], rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(new.masked_fraction, old.masked_fraction)
    for c in [c for c in new.columns if c.startswith("flag_") or c.startswith("is_")]:
        assert (new[c] == old[c]).all(), c
