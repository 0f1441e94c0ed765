"""Kernels of difference imaging: convolution, Alard-Lupton basis and fit, decorrelation."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from procsky.kernels import convolve as cv
from procsky.kernels import psfmatch as pm


def _gauss(h, sigma, dx=0.0, dy=0.0):
    q = np.arange(-h, h + 1)
    g = np.exp(-0.5 * (((q[None, :] - dx) / sigma) ** 2 + ((q[:, None] - dy) / sigma) ** 2))
    return g / g.sum()


def test_fft_and_separable_match_direct():
    rng = np.random.default_rng(0)
    block = rng.normal(size=(40, 37))
    k = rng.normal(size=(7, 7))
    ref = cv.convolve_valid_direct(block, k)
    assert ref.shape == (34, 31)
    np.testing.assert_allclose(cv.convolve_valid(block, k), ref, atol=1e-10)
    fy, fx = rng.normal(size=7), rng.normal(size=7)
    np.testing.assert_allclose(
        cv.convolve_separable_valid(block, fy, fx),
        cv.convolve_valid_direct(block, fy[:, None] * fx[None, :]),
        atol=1e-10,
    )


def test_convolution_is_true_convolution():
    # An off-centre delta kernel shifts the image towards +x (true convolution, not correlation).
    block = np.zeros((11, 11))
    block[5, 5] = 1.0
    k = np.zeros((3, 3))
    k[1, 2] = 1.0  # offset q = (+1, 0)
    out = cv.convolve_valid(block, k)
    # valid pixel (4, 5) is block pixel (5, 6): the delta moved by +1 in x
    assert out[4, 5] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)


def test_spatial_convolve_matches_per_pixel_kernel():
    rng = np.random.default_rng(1)
    h, order = 3, 2
    ks = rng.normal(size=(6, 2 * h + 1, 2 * h + 1))
    block = rng.normal(size=(20 + 2 * h, 25 + 2 * h))
    shape = (100, 120)
    x0, y0 = 30, 40
    out = cv.spatial_convolve(block, ks, order, x0, y0, shape)
    var = cv.spatial_convolve_variance(block**2, ks, order, x0, y0, shape)
    for y, x in [(0, 0), (7, 13), (19, 24)]:
        u, v = cv.normalized_coords(x + x0, y + y0, shape)
        k = np.tensordot(cv.poly_terms_2d(u, v, order), ks, axes=1)
        patch = block[y : y + 2 * h + 1, x : x + 2 * h + 1]
        assert out[y, x] == pytest.approx(np.sum(k[::-1, ::-1] * patch), rel=1e-9, abs=1e-9)
        assert var[y, x] == pytest.approx(np.sum((k**2)[::-1, ::-1] * patch**2), rel=1e-9, abs=1e-9)


def test_dilate_mask_matches_scipy():
    from scipy.ndimage import maximum_filter

    rng = np.random.default_rng(2)
    m = (rng.random((30, 30)) < 0.02).astype(np.uint32) * 2 | (rng.random((30, 30)) < 0.02).astype(np.uint32) * 32
    r = 2
    out = cv.dilate_mask_box(m, r, 2)
    spread = maximum_filter((m & 2) > 0, size=2 * r + 1, mode="constant")[r:-r, r:-r]
    np.testing.assert_array_equal((out & 2) > 0, spread)
    np.testing.assert_array_equal(out & 32, m[r:-r, r:-r] & 32)  # other bits not spread


def test_basis_normalisation_and_shape():
    b = pm.make_basis([1.0, 2.0, 4.0], [6, 4, 2], 10)
    assert b.n_basis == 28 + 15 + 6
    imgs = b.images()
    assert imgs.shape == (49, 21, 21)
    assert imgs[0].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(imgs[1:].sum(axis=(1, 2)), 0.0, atol=1e-10)
    # basis convolutions on a stamp agree with direct convolution by the images
    rng = np.random.default_rng(3)
    blk = rng.normal(size=(31, 31))
    conv = pm.basis_stamp_convolutions(blk, b)
    for k in (0, 5, 30, 48):
        np.testing.assert_allclose(conv[k], cv.convolve_valid_direct(blk, imgs[k]), atol=1e-9)
    assert pm.KernelBasis.from_dict(b.to_dict()).n_basis == b.n_basis


def _star_field(shape, n, rng, sigma, flux=(2e3, 5e4)):
    ny, nx = shape
    img = np.zeros(shape)
    xs = rng.uniform(15, nx - 15, n)
    ys = rng.uniform(15, ny - 15, n)
    fl = rng.uniform(*flux, n)
    for x, y, f in zip(xs, ys, fl):
        ix, iy = int(x), int(y)
        img[iy - 10 : iy + 11, ix - 10 : ix + 11] += f * _gauss(10, sigma, x - ix, y - iy)
    return img, xs, ys


def test_fit_recovers_known_kernel_and_background():
    rng = np.random.default_rng(4)
    shape = (200, 200)
    tpl, xs, ys = _star_field(shape, 60, rng, 1.3)
    true_k = 1.7 * _gauss(6, 1.4, 0.3, -0.2)
    pad = np.pad(tpl, 6)
    sci = cv.convolve_valid(pad, true_k) + 5.0
    var = np.full(shape, 4.0)
    sci = sci + rng.normal(size=shape) * 2.0
    basis = pm.basis_for_psfs(1.3, np.hypot(1.3, 1.4), degrees=(4, 2, 2), half_width=6)
    bad = np.zeros(shape, bool)
    stamps = pm.build_stamps(tpl, sci, var, bad, xs, ys, basis, 8, 1)
    kern = pm.fit_matching_kernel(stamps, basis, spatial_order=0, background_order=1, shape=shape)
    k = kern.kernel_at(100, 100)
    assert kern.kernel_sum(100, 100) == pytest.approx(1.7, rel=2e-3)
    # a 0.3 px shifted Gaussian is represented by the degree-4 basis to a few per cent of the peak
    assert np.abs(k - true_k).max() < 0.04 * true_k.max()
    assert kern.background_at(100, 100) == pytest.approx(5.0, abs=0.3)
    again = pm.MatchingKernel.from_dict(kern.to_dict())
    np.testing.assert_allclose(again.kernel_at(50, 60), kern.kernel_at(50, 60))
    assert pickle.loads(pickle.dumps(kern)).spatial_order == 0


def test_fit_rejects_outlier_stamp():
    rng = np.random.default_rng(5)
    shape = (200, 200)
    tpl, xs, ys = _star_field(shape, 40, rng, 1.2)
    true_k = _gauss(5, 1.5)
    sci = cv.convolve_valid(np.pad(tpl, 5), true_k) + rng.normal(size=shape)
    # a "variable star": one stamp brightened in the science image only
    ix, iy = int(xs[0]), int(ys[0])
    sci[iy - 10 : iy + 11, ix - 10 : ix + 11] += 3e4 * _gauss(10, 2.0)
    basis = pm.basis_for_psfs(1.2, np.hypot(1.2, 1.5), degrees=(2, 2, 2), half_width=5)
    stamps = pm.build_stamps(tpl, sci, np.ones(shape), np.zeros(shape, bool), xs, ys, basis, 7, 0)
    kern = pm.fit_matching_kernel(stamps, basis, spatial_order=0, background_order=0, shape=shape)
    assert kern.stats["n_stamps_used"] < kern.stats["n_stamps"]
    assert not kern.stats["used"][0]
    assert kern.kernel_sum(0, 0) == pytest.approx(1.0, rel=3e-3)


def test_too_few_stamps_raises():
    basis = pm.make_basis([1.0], [0], 3)
    st = pm.StampData(np.zeros(2), np.zeros(2), np.zeros((2, 2, 2)), np.zeros((2, 2)), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="need >= 3"):
        pm.fit_matching_kernel(st, basis, spatial_order=0, background_order=0, shape=(10, 10))


def test_decorrelation_whitens_noise():
    rng = np.random.default_rng(6)
    k = _gauss(7, 1.8)
    phi = pm.decorrelation_kernel(k, 25.0, 1.0)
    assert phi.sum() == pytest.approx(1.0)
    n = 400
    a = rng.normal(size=(n + 14, n + 14))
    b = 5.0 * rng.normal(size=(n + 14, n + 14))
    d = a[7:-7, 7:-7] - cv.convolve_valid(b, k)
    dd = cv.convolve_valid(d, phi)

    def lag1(x):
        x = x - x.mean()
        return float((x[:, 1:] * x[:, :-1]).mean() / x.var())

    assert lag1(d) > 0.2  # the convolved template correlates the difference's noise
    assert abs(lag1(dd)) < 0.02
    assert dd.var() == pytest.approx(26.0, rel=0.05)  # white, with variance s2 + t2


def test_masked_pixels_keep_stamps_and_the_fit():
    # Pixels next to a bad or repaired pixel are left out of a stamp, not the stamp itself.
    rng = np.random.default_rng(14)
    shape = (200, 200)
    tpl, xs, ys = _star_field(shape, 60, rng, 1.3)
    true_k = 1.3 * _gauss(6, 1.4)
    sci = cv.convolve_valid(np.pad(tpl, 6), true_k) + rng.normal(size=shape) * 2.0
    basis = pm.basis_for_psfs(1.3, np.hypot(1.3, 1.4), degrees=(4, 2, 2), half_width=6)
    bad = np.zeros(shape, bool)
    soft = np.zeros(shape, bool)
    for x, y in zip(xs[:10], ys[:10]):  # a bad pixel 12 px and a "repaired" one 7 px from ten stars
        bad[int(y), min(int(x) + 12, 199)] = True
        soft[max(int(y) - 7, 0), int(x)] = True
    tpl_bad = np.where(bad, 1e6, tpl)  # garbage under the bad pixels
    full = pm.build_stamps(tpl, sci, np.full(shape, 4.0), np.zeros(shape, bool), xs, ys, basis, 8, 0)
    st = pm.build_stamps(tpl_bad, sci, np.full(shape, 4.0), bad, xs, ys, basis, 8, 0, soft=soft, soft_radius=2)
    # (refusing every stamp with a bad pixel in its box would drop the ten and their neighbours)
    kept = {(int(x), int(y)) for x, y in zip(st.x, st.y)}
    assert sum((int(round(x)), int(round(y))) in kept for x, y in zip(xs[:10], ys[:10])) >= 8
    assert len(st.x) >= 0.9 * len(full.x) and st.npix.sum() < full.npix.sum()
    kern = pm.fit_matching_kernel(st, basis, spatial_order=0, background_order=0, shape=shape)
    assert kern.kernel_sum(100, 100) == pytest.approx(1.3, rel=3e-3)
    assert np.abs(kern.kernel_at(100, 100) - true_k).max() < 0.03 * true_k.max()


def test_noise_correlation_and_decorrelation_of_a_resampled_template():
    rng = np.random.default_rng(12)
    n = 600
    # "template" noise correlated by resampling: white noise through a small smoothing kernel
    c = np.outer([0.15, 0.7, 0.15], [0.15, 0.7, 0.15])
    b = cv.convolve_valid(rng.normal(size=(n + 2, n + 2)), c)
    b *= 5.0 / b.std()  # per-pixel variance 25 (what a variance plane propagates)
    ac = np.zeros((5, 5))
    for dy in range(-2, 3):  # analytic autocorrelation of c
        for dx in range(-2, 3):
            ac[dy + 2, dx + 2] = np.sum(np.roll(np.pad(c, 2), (dy, dx), axis=(0, 1)) * np.pad(c, 2))
    rho = pm.noise_correlation(b, np.full(b.shape, 25.0), np.zeros(b.shape, bool), radius=2)
    np.testing.assert_allclose(rho, ac / ac[2, 2], atol=0.01)
    white = pm.noise_correlation(rng.normal(size=(n, n)), np.ones((n, n)), np.zeros((n, n), bool), radius=2)
    assert abs(white.sum() - 1.0) < 0.02
    # difference: white science (variance 1) minus the kernel-convolved correlated template
    k = _gauss(7, 1.8)
    a = rng.normal(size=(n - 14, n - 14))
    d = a - cv.convolve_valid(b, k)
    phi = pm.decorrelation_kernel(k, 25.0, 1.0, corr_convolved=rho)
    dd = cv.convolve_valid(d, phi)
    x = dd - dd.mean()
    assert abs(float((x[:, 1:] * x[:, :-1]).mean() / x.var())) < 0.02
    # white at the zero-frequency level 1 + 25 sum(rho), not 1 + 25 (the white assumption)
    assert dd.var() == pytest.approx(1.0 + 25.0 * rho.sum(), rel=0.05)
    assert rho.sum() > 1.5


def test_kernels_thread_safe():
    rng = np.random.default_rng(7)
    block = rng.normal(size=(60, 60))
    basis = pm.make_basis([1.0, 2.0], [2, 1], 4)
    ref = pm.basis_stamp_convolutions(block, basis)
    out = [None, None]

    def work(i):
        out[i] = pm.basis_stamp_convolutions(block, basis)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in out:
        np.testing.assert_array_equal(o, ref)


# ------------------------------------------------------- exactness of the fast kernels
# The numba kernels of the kernel fit and the noise statistics reproduce, bit for bit, what
# the obvious numpy versions compute (same products, summed in the same order; the same
# order statistics), so the speed-ups change no result.
def _seq_sum(terms, axis):
    """Sum in order along ``axis`` (cumsum is sequential; np.sum is pairwise)."""
    return np.take(np.cumsum(terms, axis=axis), -1, axis=axis)


def test_mad_var_and_lag_medians_are_numpys():
    rng = np.random.default_rng(11)

    def ref(a):
        med = np.median(a)
        return float((1.4826 * np.median(np.abs(a - med))) ** 2)

    draws = [
        rng.normal(size=1),
        rng.normal(size=2),
        rng.normal(size=257),
        rng.normal(size=20000),
        rng.normal(size=20001) * 1e-300,
        rng.standard_cauchy(size=30000),  # wide range: several selection levels
        np.round(rng.normal(size=30000) * 3),  # ties at the median
        np.concatenate([rng.normal(size=5000), [1e300, -1e300]]),
        np.full(1000, 2.5),
    ]
    for a in draws:
        assert pm._mad_var(a) == ref(a), a.size
    # one lag of noise_statistics: pairs of good pixels (n, n shifted by the lag)
    n = rng.normal(size=(90, 80))
    good = rng.uniform(size=n.shape) > 0.3
    for dy, dx in ((0, 1), (1, -1), (2, 3)):
        xa, xb = max(0, -dx), n.shape[1] - max(0, dx)
        a, b = n[: 90 - dy, xa:xb], n[dy:, xa + dx : xb + dx]
        ok = good[: 90 - dy, xa:xb] & good[dy:, xa + dx : xb + dx]
        k, mp, mm = pm._lag_mads(n, good, dy, dx)
        assert k == ok.sum()
        assert float((1.4826 * mp) ** 2) == ref(a[ok] + b[ok])
        assert float((1.4826 * mm) ** 2) == ref(a[ok] - b[ok])


def test_spatial_normal_equations_are_the_kronecker_sums():
    rng = np.random.default_rng(12)
    nb, nbg, n = 6, 3, 25
    D = rng.normal(size=(n, nb + nbg, 40))
    M = np.einsum("sap,sbp->sab", D, D)
    b = rng.normal(size=(n, nb + nbg))
    P = pm.poly_terms_2d(rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), 2).T
    kept = np.nonzero(rng.uniform(size=n) > 0.3)[0]
    nsp = P.shape[1]
    A = np.zeros((nb * nsp + nbg,) * 2)
    bv = np.zeros(nb * nsp + nbg)
    for s in kept:
        A[: nb * nsp, : nb * nsp] += np.kron(M[s, :nb, :nb], np.outer(P[s], P[s]))
        cross = np.kron(M[s, :nb, nb:], P[s][:, None])
        A[: nb * nsp, nb * nsp :] += cross
        A[nb * nsp :, : nb * nsp] += cross.T
        A[nb * nsp :, nb * nsp :] += M[s, nb:, nb:]
        bv[: nb * nsp] += np.kron(b[s, :nb], P[s])
        bv[nb * nsp :] += b[s, nb:]
    A2, bv2 = pm._spatial_normal_equations(M, b, np.ascontiguousarray(P), kept, nb)
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(bv2, bv)


def test_stamp_kernels_sum_in_order():
    rng = np.random.default_rng(13)
    basis = pm.make_basis([1.0, 2.0], [2, 1], 4)
    h = basis.half_width
    block = rng.normal(size=(23, 21))
    ny, nx = block.shape[0] - 2 * h, block.shape[1] - 2 * h
    # x pass then y pass, taps summed from the first, zero y taps skipped
    xs = np.stack([block[:, 2 * h - i : 2 * h - i + nx] for i in range(2 * h + 1)])
    ux, fy, xidx = basis.separable_factors  # the x factors shared by several bases
    raw = []
    for k in range(basis.n_basis):
        t = _seq_sum(ux[xidx[k]][:, None, None] * xs, 0)
        js = [j for j in range(2 * h + 1) if fy[k, j] != 0.0]
        raw.append(_seq_sum(np.stack([fy[k, j] * t[2 * h - j : 2 * h - j + ny] for j in js]), 0))
    np.testing.assert_array_equal(pm._separable_bank(block, ux, fy, xidx), np.array(raw))
    # normal-equation blocks: (D_a w) D_c summed over the pixels in order
    D = rng.normal(size=(7, 150))
    w = rng.uniform(size=150)
    s = rng.normal(size=150)
    M, bb, ss = pm._normal_blocks(D, w, s)
    upper = np.triu(_seq_sum((D * w)[:, None, :] * D[None, :, :], 2))
    np.testing.assert_array_equal(M, upper + np.triu(upper, 1).T)  # the upper triangle, mirrored
    np.testing.assert_array_equal(bb, _seq_sum((D * w) * s, 1))
    assert ss == _seq_sum(w * s * s, 0)


def test_source_significance_is_scipys():
    """source_free_mask's smoothed significance (numba) is scipy's gaussian_filter arithmetic."""
    import math

    from scipy import ndimage

    rng = np.random.default_rng(14)
    for dt in (np.float32, np.float64):
        img = (rng.normal(size=(120, 97)) * 10).astype(dt)
        var = rng.uniform(50, 150, img.shape).astype(dt)
        img[5, 5], var[7, 9], var[60:63] = np.nan, 0.0, np.inf
        bad = rng.uniform(size=img.shape) < 0.05
        for s in (0.5, 1.1, 2.37, 30.0):  # the last wider than the image
            i64, v64 = img.astype(np.float64), var.astype(np.float64)
            ok = ~bad & np.isfinite(i64) & np.isfinite(v64) & (v64 > 0)
            num = ndimage.gaussian_filter(np.where(ok, i64, 0.0), s, mode="constant")
            den = ndimage.gaussian_filter(np.where(ok, v64, 0.0), s / math.sqrt(2.0), mode="constant")
            den = den / (4 * math.pi * s * s)
            sn = np.abs(num) / np.sqrt(np.maximum(den, 1e-30))
            sn[den <= 0] = 0.0
            w1, w2 = pm._gaussian_half_weights(s), pm._gaussian_half_weights(s / math.sqrt(2.0))
            ok2, sn2 = pm._smoothed_significance(img, var, bad, w1, w2, 4 * math.pi * s * s)
            np.testing.assert_array_equal(ok2, ok)
            np.testing.assert_array_equal(sn2, sn)


def test_square_dilation_is_scipys():
    from scipy import ndimage

    rng = np.random.default_rng(15)
    for shape, g in (((60, 45), 3), ((30, 70), 10), ((5, 4), 6), ((50, 50), 1)):
        m = rng.uniform(size=shape) < 0.02
        ref = ndimage.maximum_filter(m.view(np.uint8), size=2 * g + 1, mode="constant", cval=0).view(bool)
        np.testing.assert_array_equal(pm._dilate_square(m, g), ref)
