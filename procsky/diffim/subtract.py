"""Alard-Lupton PSF matching and subtraction of a science/template pair on one pixel grid."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pydantic

from procsky import _dask
from procsky import masks as _masks
from procsky.errors import AlgorithmError, NoWorkError, ProcskyValueError
from procsky.kernels import convolve as _conv
from procsky.kernels import psfmatch as _pm

from .lazy import deferred, deferred_exposure, deferred_part

__all__ = [
    "SubtractionConfig",
    "subtract_images",
    "convolve_exposure_arrays",
    "psf_sigma_at",
    "registration_noise",
    "corrected_score_variance",
]

_NOT_USABLE = ("BAD", "SAT", "NO_DATA", "CR", "EDGE", "SUSPECT", "INTRP")
# Mask bits of the convolved image OR-ed over the whole kernel footprint (the pixel value
# is missing or wrong: every output pixel it touches is) ...
_SPREAD = ("BAD", "SAT", "NO_DATA", "EDGE", "SUSPECT", "STREAK")
# ... and over the kernel core only (|K| >= _CORE_FRAC of its peak): the pixel holds an
# interpolated, approximately right value (a repaired cosmic ray; in a coadd template the
# OR of every input's repairs), which matters only where it carries much kernel weight.
_SPREAD_CORE = ("CR", "INTRP")
_CORE_FRAC = 0.1
# Pixels left out of PSF fits on the difference: those without a usable value. Repaired
# (CR/INTRP) pixels stay in, as in LSST's PsfFlux; their weight is reported in
# ``masked_fraction`` and the flags.
_FIT_EXCLUDE = ("NO_DATA", "BAD", "SAT")
# ``masked_fraction`` (flag_masked, reliability): PSF weight on pixels without a usable
# value; ``repaired_fraction``: on repaired (interpolated) pixels, which stay in the fit.
_MASKED = tuple(n for n in _NOT_USABLE if n not in _SPREAD_CORE)


class SubtractionConfig(pydantic.BaseModel):
    """Options of :func:`subtract_images` (the ``subtract`` task config contains one).

    Attributes
    ----------
    mode : {"auto", "convolve_template", "convolve_science"}
        Which image is convolved; ``auto`` convolves the one with the smaller PSF.
    degrees : tuple of int
        Polynomial degree of each Gaussian of the basis (HOTPANTS 6/4/2).
    scales : tuple of float
        Gaussian widths in units of the matching sigma.
    spatial_order : int
        Maximum order of the spatial variation of the kernel coefficients; the order used
        (0 .. this) is chosen by cross-validation on the kernel stamps.
    background_order : int
        Order of the differential background polynomial.
    kernel_half_width : int or None, pixels
        Default from the PSF widths.
    stamp_half : int or None, pixels
        Stamp half-size (default ``max(3 FWHM, 8)``).
    n_cells, per_cell : int
        Star selection grid and stars per cell.
    min_snr : float
        Minimum matched-filter significance of kernel stars.
    clip_sigma : float
        Stamp rejection threshold.
    constant_sum : bool
        Keep the photometric scaling constant over the detector.
    decorrelate : bool
        Apply the noise decorrelation afterburner.
    chunk : int, pixels
        Dask chunk size for the convolution.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    mode: str = "auto"
    degrees: tuple[int, ...] = (6, 4, 2)
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    spatial_order: int = pydantic.Field(2, ge=0, le=4)
    background_order: int = pydantic.Field(1, ge=0, le=4)
    kernel_half_width: int | None = None
    stamp_half: int | None = None
    n_cells: int = 5
    per_cell: int = 6
    min_snr: float = 30.0
    clip_sigma: float = 3.0
    constant_sum: bool = False
    decorrelate: bool = True
    chunk: int = 1024


def psf_sigma_at(psf, x, y) -> float:
    """Gaussian-equivalent sigma (pixels) of a PSF model at (x, y)."""
    return float(psf.fwhm(x, y)) / 2.3548200450309493


def _bad(mask, planes, names=_NOT_USABLE):
    bits = 0
    for n in names:
        if n in planes:
            bits |= 1 << planes[n]
    return (np.asarray(mask) & np.uint32(bits)) != 0, bits


def convolve_exposure_arrays(
    image, variance, mask, kernel: _pm.MatchingKernel, *, xy0=(0, 0), spread_bits=0, core_bits=0, chunk=1024
):
    """Convolve image, variance and mask with a spatially varying matching kernel (lazy).

    Parameters
    ----------
    image, variance : array (ny, nx)
        numpy or dask; non-finite pixels must be zeroed (and flagged in ``mask``) first.
    mask : array (ny, nx) uint32
    kernel : MatchingKernel
    xy0 : (int, int)
        Detector pixel of array pixel (0, 0) (spatial polynomials use detector positions).
    spread_bits : int
        Mask bits OR-ed over the kernel footprint (``|K| >= 1e-3`` of its peak).
    core_bits : int
        Mask bits OR-ed over the kernel core only (``|K| >= 0.1`` of its peak).
    chunk : int, pixels

    Returns
    -------
    image, variance, mask : dask arrays
        Convolved image, its variance ``conv(V, K^2)`` and the dilated mask.
    """
    h = kernel.half_width
    ks = kernel.spatial_kernels()
    order = kernel.spatial_order
    shape = kernel.shape
    k_center = kernel.kernel_at(shape[1] / 2.0, shape[0] / 2.0)
    r = _conv.kernel_support_radius(k_center)
    rc = min(_conv.kernel_support_radius(k_center, _CORE_FRAC), r) if core_bits else 0
    core_bits = int(core_bits) & ~int(spread_bits)

    # Kernel transforms are shared by the blocks of one shape (one cache per plane).
    img_cache: dict[Any, Any] = {}
    var_cache: dict[Any, Any] = {}

    def conv_img(b, y0, x0):
        return _conv.spatial_convolve(b, ks, order, x0 + xy0[0], y0 + xy0[1], shape, cache=img_cache, single=True)

    def conv_var(b, y0, x0):
        v = _conv.spatial_convolve_variance(b, ks, order, x0 + xy0[0], y0 + xy0[1], shape, cache=var_cache, single=True)
        return np.maximum(v, 0.0)

    def conv_mask(b, y0, x0):
        b = np.ascontiguousarray(b)
        out = _conv.dilate_mask_box(b, r, spread_bits)
        if rc > 0 and core_bits:
            # the same interior, core bits spread over the smaller box
            d = r - rc
            inner = np.ascontiguousarray(b[d : b.shape[0] - d, d : b.shape[1] - d])
            core = _conv.dilate_mask_box(inner, rc, core_bits)
            out = (out & np.uint32(~core_bits & 0xFFFFFFFF)) | (core & np.uint32(core_bits))
        return out

    img = _dask.map_with_margin_at(conv_img, [image], depth=h, dtype=np.float32, chunk=chunk)
    var = _dask.map_with_margin_at(conv_var, [variance], depth=h, dtype=np.float32, chunk=chunk)
    msk = _dask.map_with_margin_at(conv_mask, [mask], depth=r, dtype=np.uint32, chunk=chunk) if r > 0 else mask
    return img, var, msk


def _convolve_plain(arr, kernel2d, chunk, dtype=np.float32):
    h = kernel2d.shape[0] // 2

    def f(b, y0, x0):
        return _conv.convolve_valid(b, kernel2d)

    return _dask.map_with_margin_at(f, [arr], depth=h, dtype=dtype, chunk=chunk)


def _flux_ratio(conv_img, tgt_img, xs, ys, half):
    """Median ratio of summed star fluxes target / convolved image (first guess of the kernel sum)."""
    r = []
    ny, nx = tgt_img.shape
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        if half <= ix < nx - half and half <= iy < ny - half:
            a = float(conv_img[iy - half : iy + half + 1, ix - half : ix + half + 1].sum())
            b = float(tgt_img[iy - half : iy + half + 1, ix - half : ix + half + 1].sum())
            if a > 0 and b > 0:
                r.append(b / a)
    return float(np.median(r)) if r else 1.0


_MIN_CORRELATION_EXCESS = 0.1


def _white_if_weak(rho):
    """``rho``, or a delta when ``sum(rho) - 1 < 0.1``: faint undetected sources leave a few
    per cent of apparent correlation on white (unresampled) noise, whereas a Lanczos3
    resampling gives ``sum(rho) >= 1.25`` (``procsky.kernels.warp.lanczos_noise_correlation``)."""
    if float(rho.sum()) - 1.0 >= _MIN_CORRELATION_EXCESS:
        return rho
    out = np.zeros_like(rho)
    out[rho.shape[0] // 2, rho.shape[1] // 2] = 1.0
    return out


def _correlated_variance_factor(kernel, rho):
    """``sum_d rho(d) A_K(d) / sum(K^2)``: variance of ``K (x) C`` over ``conv(V_C, K^2)`` for noise
    of correlation ``rho`` (``A_K`` the kernel autocorrelation); 1 for white noise."""
    from scipy.signal import fftconvolve

    k = np.asarray(kernel, dtype=np.float64)
    k2 = float(np.sum(k * k))
    if rho is None or not k2 > 0:
        return 1.0
    ak = fftconvolve(k, k[::-1, ::-1], mode="full")  # lag 0 at the centre
    c = ak.shape[0] // 2
    r = rho.shape[0] // 2
    rr = min(r, c)
    return float(
        np.sum(rho[r - rr : r + rr + 1, r - rr : r + rr + 1] * ak[c - rr : c + rr + 1, c - rr : c + rr + 1]) / k2
    )


def _psf_convolved(psf, extra, center):
    """A PSF model for the difference image: ``psf (x) extra`` (``extra`` normalised)."""
    from scipy.signal import fftconvolve

    from procsky.psf import ImagePsf, PolynomialImagePsf

    extra = extra / extra.sum()
    he = extra.shape[0] // 2
    if isinstance(psf, PolynomialImagePsf):
        coeffs = np.array([fftconvolve(np.pad(c, he), extra, mode="same") for c in psf.coeffs])
        return PolynomialImagePsf(coeffs, psf.order, psf.x0, psf.y0, psf.scale_x, psf.scale_y)
    k = psf.kernel(*center)
    return ImagePsf(fftconvolve(np.pad(k, he), extra, mode="same"))


def registration_noise(diff, variance, static, xs, ys, half, *, bad=None, min_stars=5):
    """Registration and flux-mismatch residuals of a difference image at bright stars.

    A difference ``D = S - K (x) T`` of a static star whose two images are misregistered by
    ``d`` pixels, or whose matched fluxes differ by a fraction ``e``, is ``D ~ -d . grad(S)
    + e S`` (first order). Each star's stamp is fitted by weighted least squares with
    ``[dS/dx, dS/dy, S, 1]``; the scatter of the fitted shifts beyond their own noise is the
    registration noise ``sigma_reg`` (pixels, per axis), and that of the fitted fractions the
    flux-mismatch noise ``e``. Robust (median-based) estimates, so that one saturated or
    blended star does not set them. These feed the corrected detection score of
    :func:`detect_dia_sources`, the astrometric-noise term of Zackay, Ofek & Gal-Yam (2016,
    ApJ 830, 27, section 3.3, "S_corr").

    Parameters
    ----------
    diff, variance : ndarray (ny, nx)
        Difference image and its variance.
    static : ndarray (ny, nx)
        The static sky in the difference's units (the science image).
    xs, ys : arrays, array pixels
        Star positions (the kernel stars).
    half : int, pixels
        Stamp half-size.
    bad : ndarray (ny, nx) bool, optional
        Pixels left out of the fits.
    min_stars : int
        Fewer usable stars give ``nan`` estimates.

    Returns
    -------
    dict
        ``registration_sigma_px``, ``flux_mismatch_rms`` and ``registration_n_stars``.
    """
    diff = np.asarray(diff, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    static = np.asarray(static, dtype=np.float64)
    ny, nx = diff.shape
    shifts, shift_var, fracs, frac_var = [], [], [], []
    for x, y in zip(np.asarray(xs, float), np.asarray(ys, float)):
        ix, iy = int(round(x)), int(round(y))
        if ix - half - 1 < 0 or iy - half - 1 < 0 or ix + half + 2 > nx or iy + half + 2 > ny:
            continue
        sl = np.s_[iy - half : iy + half + 1, ix - half : ix + half + 1]
        big = np.s_[iy - half - 1 : iy + half + 2, ix - half - 1 : ix + half + 2]
        m = static[big]
        gx = 0.5 * (m[1:-1, 2:] - m[1:-1, :-2])
        gy = 0.5 * (m[2:, 1:-1] - m[:-2, 1:-1])
        v = variance[sl]
        ok = np.isfinite(diff[sl]) & (v > 0) & np.isfinite(m[1:-1, 1:-1])
        if bad is not None:
            ok &= ~bad[sl]
        if ok.sum() < 0.8 * ok.size:
            continue
        w = 1.0 / np.sqrt(v[ok])
        a = np.column_stack([gx[ok], gy[ok], m[1:-1, 1:-1][ok], np.ones(int(ok.sum()))]) * w[:, None]
        b = diff[sl][ok] * w
        try:
            cov = np.linalg.inv(a.T @ a)
        except np.linalg.LinAlgError:
            continue
        c = cov @ (a.T @ b)
        # D = -d.grad(S) + e S: the shift is minus the gradient coefficients
        shifts += [-c[0], -c[1]]
        shift_var += [cov[0, 0], cov[1, 1]]
        fracs.append(c[2])
        frac_var.append(cov[2, 2])
    n = len(fracs)
    out = {"registration_n_stars": n, "registration_sigma_px": float("nan"), "flux_mismatch_rms": float("nan")}
    if n < min_stars:
        return out
    # median of chi^2(1) is 0.4549: robust variance of a zero-mean normal from the median square
    sh, shv = np.asarray(shifts), np.asarray(shift_var)
    fr, frv = np.asarray(fracs), np.asarray(frac_var)
    out["registration_sigma_px"] = float(math.sqrt(max(np.median(sh**2) / 0.4549 - np.median(shv), 0.0)))
    fr = fr - np.median(fr)
    out["flux_mismatch_rms"] = float(math.sqrt(max(np.median(fr**2) / 0.4549 - np.median(frv), 0.0)))
    return out


def corrected_score_variance(static, sigma, registration_sigma, flux_mismatch):
    """Variance of the matched-filtered difference that registration and flux-matching
    errors add at static sources (ZOGY's ``V_ast``, Zackay, Ofek & Gal-Yam 2016, eq. 30-32,
    with a flux-mismatch term): ``sigma_reg^2 |grad F|^2 + e^2 F^2`` with ``F`` the static
    image filtered by the same Gaussian of ``sigma`` pixels as the detection.

    Returns an array in the units of :func:`procsky.kernels.detection.significance_image`'s
    numerator squared (zeros when both noises are zero or unknown).
    """
    from procsky.kernels.detection import convolve_separable, gaussian_kernel_1d

    reg = float(registration_sigma) if np.isfinite(registration_sigma) else 0.0
    eps = float(flux_mismatch) if np.isfinite(flux_mismatch) else 0.0
    static = np.asarray(static, dtype=np.float32)
    if reg <= 0 and eps <= 0:
        return np.zeros(static.shape, np.float32)
    g = gaussian_kernel_1d(float(sigma))
    f = np.asarray(convolve_separable(np.where(np.isfinite(static), static, 0).astype(np.float32), g, g), np.float64)
    gy, gx = np.gradient(f)
    return (reg**2 * (gx**2 + gy**2) + eps**2 * f**2).astype(np.float32)


def subtract_images(science, template, config: SubtractionConfig | None = None, *, stars=None, lazy: bool = True):
    """Difference ``science - K (x) template`` (or ``K (x) science - template``) with Alard-Lupton matching.

    Parameters
    ----------
    science : procsky.exposure.Exposure
        Calibrated, background-subtracted science exposure with a PSF.
    template : procsky.exposure.Exposure
        Template already resampled onto the science pixel grid (same shape), with a PSF;
        its image may be in other flux units (the kernel sum absorbs the ratio).
    config : SubtractionConfig, optional
    stars : (x, y) arrays, optional
        Kernel star positions (array pixels); selected automatically when omitted.
    lazy : bool
        Build the difference as a dask graph (the default): nothing is computed until the
        planes, the PSF or the summary are. The kernel fit, the noise measurements and the
        convolution then run once, when the first of them is computed (e.g. when the
        difference is written); the result is the one ``lazy=False`` gives at once.

    Returns
    -------
    diff : procsky.exposure.Exposure
        In the science image's units and photometric calibration; its PSF is the PSF of the
        difference image; ``metadata['diffim']`` holds the summary.
    kernel : procsky.kernels.psfmatch.MatchingKernel
        (a :class:`dask.delayed.Delayed` of it when ``lazy``)
    summary : dict
        Kernel size, basis, direction, stamps used, residual statistics (a ``Delayed`` of
        it when ``lazy``; also ``metadata['diffim']`` of the difference).

    Raises
    ------
    AlgorithmError
        Too few usable stars for the kernel fit.
    NoWorkError
        The template has no valid pixels over the science image.
    """
    cfg = config or SubtractionConfig()
    _check_pair(science, template, cfg)
    if not lazy:
        return _subtract_now(science, template, cfg, stars)
    result = deferred(_subtract_now, science, template, cfg, stars, name="subtract")
    diff = deferred_exposure(result, science, part=lambda r: r[0])
    return diff, deferred_part(result, lambda r: r[1], "kernel"), diff.metadata["diffim"]


def _check_pair(science, template, cfg: SubtractionConfig) -> None:
    """The checks of a science/template pair that need no pixels."""
    if science.shape != template.shape:
        raise ProcskyValueError(
            f"template shape {template.shape} differs from science shape {science.shape}; warp the template "
            "onto the science pixel grid first (procsky.diffim.warp_template_to_science)"
        )
    if science.psf is None or template.psf is None:
        raise ProcskyValueError("science and template need PSF models for PSF matching; run calibrate/coadd first")
    if cfg.mode not in ("auto", "convolve_template", "convolve_science"):
        raise ProcskyValueError(f"mode must be auto, convolve_template or convolve_science, got {cfg.mode!r}")


def _subtract_now(science, template, cfg: SubtractionConfig, stars=None):
    """:func:`subtract_images` computed at once (numpy planes)."""
    import dask.array as da

    _check_pair(science, template, cfg)
    planes = science.mask_planes
    sci = science.compute()
    tpl = template.compute()
    s_img = np.asarray(sci.image, dtype=np.float32)
    s_var = np.asarray(sci.variance, dtype=np.float32)
    t_img = np.asarray(tpl.image, dtype=np.float32)
    t_var = np.asarray(tpl.variance, dtype=np.float32)
    t_mask = np.asarray(tpl.mask, dtype=np.uint32)
    if tpl.mask_planes != planes:
        t_mask = tpl.mask_planes.remap(t_mask, planes)
    s_mask = np.asarray(sci.mask, dtype=np.uint32)
    ny, nx = s_img.shape
    s_bad, bad_bits = _bad(s_mask, planes)
    t_bad, _ = _bad(t_mask, planes)
    t_nan = ~np.isfinite(t_img) | ~np.isfinite(t_var)
    s_nan = ~np.isfinite(s_img) | ~np.isfinite(s_var)
    nodata = 1 << planes["NO_DATA"]
    t_mask = np.where(t_nan, t_mask | np.uint32(nodata), t_mask).astype(np.uint32)
    s_mask = np.where(s_nan, s_mask | np.uint32(nodata), s_mask).astype(np.uint32)
    t_bad |= t_nan
    s_bad |= s_nan
    if t_bad.all():
        raise NoWorkError("the template has no valid pixels over this science image")
    t_img = np.where(t_nan, 0.0, t_img).astype(np.float32)
    t_var = np.where(t_nan, 0.0, t_var).astype(np.float32)
    s_img = np.where(s_nan, 0.0, s_img).astype(np.float32)
    s_var = np.where(s_nan, 0.0, s_var).astype(np.float32)

    det_shape = (sci.detector.get("ny", ny + sci.xy0[1]), sci.detector.get("nx", nx + sci.xy0[0]))
    det_shape = (max(int(det_shape[0]), ny), max(int(det_shape[1]), nx))
    x0, y0 = sci.xy0
    cx, cy = x0 + nx / 2.0, y0 + ny / 2.0
    sig_s = psf_sigma_at(sci.psf, cx, cy)
    sig_t = psf_sigma_at(tpl.psf, cx, cy)
    mode = cfg.mode
    if mode == "auto":
        mode = "convolve_template" if sig_t <= sig_s else "convolve_science"
    if mode == "convolve_template":
        conv_img, conv_var, conv_mask = t_img, t_var, t_mask
        tgt_img, tgt_var, tgt_mask = s_img, s_var, s_mask
        sig_sharp, sig_broad = sig_t, sig_s
    else:
        conv_img, conv_var, conv_mask = s_img, s_var, s_mask
        tgt_img, tgt_var, tgt_mask = t_img, t_var, t_mask
        sig_sharp, sig_broad = sig_s, sig_t
    basis = _pm.basis_for_psfs(
        sig_sharp, sig_broad, degrees=cfg.degrees, scales=cfg.scales, half_width=cfg.kernel_half_width
    )
    h = basis.half_width
    fwhm = 2.3548 * sig_broad
    stamp_half = cfg.stamp_half or int(max(math.ceil(3 * fwhm), 8))
    # Kernel-fit pixels: values missing or wrong ("hard") spoil every stamp pixel whose
    # kernel footprint holds one; repaired pixels ("soft": CR, INTRP - a coadd template
    # carries the repairs of all its inputs) only those within the kernel core.
    soft_names = [n for n in _SPREAD_CORE if n in planes]
    hard_names = [n for n in _NOT_USABLE if n in planes and n not in soft_names]
    s_hard = _bad(s_mask, planes, hard_names)[0] | s_nan
    t_hard = _bad(t_mask, planes, hard_names)[0] | t_nan
    any_hard = s_hard | t_hard
    any_soft = (s_bad | t_bad) & ~any_hard
    sig_match = float(basis.sigmas[min(1, len(basis.sigmas) - 1)])
    soft_r = int(math.ceil(2.0 * sig_match))
    core = int(math.ceil(1.5 * fwhm))
    if stars is None:
        sx, sy = _pm.select_kernel_stars(
            conv_img,
            conv_var,
            any_hard,
            psf_sigma=sig_sharp,
            stamp_radius=stamp_half + h,
            n_cells=cfg.n_cells,
            per_cell=cfg.per_cell,
            min_snr=cfg.min_snr,
            other=tgt_img,
            other_variance=tgt_var,
            other_bad=any_hard,
            core_radius=h + core,
            soft_bad=any_soft,
            soft_core_radius=soft_r + core,
        )
    else:
        sx, sy = (np.asarray(a, dtype=float) for a in stars)
    # Weights: the target's variance plus the (unconvolved) variance of the other image
    # scaled by the flux ratio, estimated from the candidate stars' summed fluxes.
    ratio = _flux_ratio(conv_img, tgt_img, sx, sy, stamp_half)
    wvar = tgt_var + ratio**2 * conv_var
    stamps = _pm.build_stamps(
        conv_img,
        tgt_img,
        np.where(wvar > 0, wvar, np.inf),
        any_hard,
        sx,
        sy,
        basis,
        stamp_half,
        cfg.background_order,
        shape=det_shape,
        xy0=(x0, y0),
        soft=any_soft,
        soft_radius=soft_r,
    )
    try:
        kern = _pm.fit_matching_kernel(
            stamps,
            basis,
            spatial_order=cfg.spatial_order,
            background_order=cfg.background_order,
            shape=det_shape,
            clip_sigma=cfg.clip_sigma,
            constant_sum=cfg.constant_sum,
        )
    except ValueError as e:
        raise AlgorithmError(f"PSF-matching kernel fit failed: {e} ({len(sx)} candidate stars)") from e
    ksum = float(kern.kernel_sum(cx, cy))
    if not (np.isfinite(ksum) and ksum > 0):
        raise AlgorithmError(f"PSF-matching kernel has a non-positive sum {ksum}; the template may not match")
    # Noise correlation of each image, measured on its source-free pixels: a resampled
    # (warped, coadded) template has Lanczos-correlated noise, so the noise of K (x) T is
    # larger than conv(V_T, K^2) and not white; a calexp's comes out ~delta.
    rho_s = _white_if_weak(_pm.noise_correlation(s_img, s_var, s_bad | (s_mask != 0)))
    rho_t = _white_if_weak(_pm.noise_correlation(t_img, t_var, t_bad | (t_mask != 0)))
    rho_conv, rho_tgt = (rho_t, rho_s) if mode == "convolve_template" else (rho_s, rho_t)

    chunk = int(cfg.chunk)
    c_img, c_var, c_msk = convolve_exposure_arrays(
        conv_img,
        conv_var,
        conv_mask,
        kern,
        xy0=(x0, y0),
        spread_bits=_masks.bits(*[n for n in _SPREAD if n in planes], planes=planes),
        core_bits=_masks.bits(*[n for n in _SPREAD_CORE if n in planes], planes=planes),
        chunk=chunk,
    )
    yy = da.arange(ny, chunks=chunk)[:, None] + y0
    xx = da.arange(nx, chunks=chunk)[None, :] + x0
    uu, vv = (2.0 * xx / max(det_shape[1] - 1, 1) - 1.0), (2.0 * yy / max(det_shape[0] - 1, 1) - 1.0)
    bg = sum(
        float(c) * uu**i * vv**j for c, (i, j) in zip(kern.background, _conv.poly_exponents(kern.background_order))
    )
    tg_img = da.from_array(tgt_img, chunks=chunk)
    tg_var = da.from_array(tgt_var, chunks=chunk)
    tg_msk = da.from_array(tgt_mask, chunks=chunk)
    # Per-pixel variance of K (x) C for correlated C: conv(V, K^2) times
    # sum_d rho(d) A_K(d) / sum K^2 (A_K the kernel's autocorrelation).
    center_kernel = kern.kernel_at(cx, cy)
    c_var = c_var * _correlated_variance_factor(center_kernel, rho_conv)
    if mode == "convolve_template":
        diff = tg_img - c_img - bg
        dvar = tg_var + c_var
        scale = None
    else:
        # K (x) S ~ T - bg: express the difference in science units by the local kernel sum.
        ksum_map = sum(
            float(c) * uu**i * vv**j for c, (i, j) in zip(kern.coeffs[0], _conv.poly_exponents(kern.spatial_order))
        )
        diff = (c_img + bg - tg_img) / ksum_map
        dvar = (c_var + tg_var) / ksum_map**2
        scale = ksum_map
    dmask = (c_msk | tg_msk).astype(np.uint32)
    det_bits = _masks.bits(*[n for n in ("DETECTED", "DETECTED_NEGATIVE") if n in planes], planes=planes)
    dmask = dmask & np.uint32(~det_bits & 0xFFFFFFFF)
    # Border pixels whose convolution reached outside the image.
    edge = np.zeros((ny, nx), bool)
    edge[:h] = edge[-h:] = True
    edge[:, :h] = edge[:, -h:] = True
    dmask = dmask | da.from_array(np.where(edge, np.uint32(nodata), np.uint32(0)), chunks=chunk)
    diff_psf_extra = np.zeros((1, 1)) + 1.0
    summary = {
        "mode": mode,
        "kernel_size": int(basis.size),
        "kernel_half_width": int(h),
        "basis_sigmas": list(basis.sigmas),
        "basis_degrees": list(basis.degrees),
        "psf_sigma_science": sig_s,
        "psf_sigma_template": sig_t,
        "kernel_sum": ksum,
        "n_kernel_candidates": int(len(sx)),
        "background_center": float(kern.background_at(cx, cy)),
        "noise_correlation_science": float(rho_s.sum()),
        "noise_correlation_template": float(rho_t.sum()),
        **{k: v for k, v in kern.stats.items() if k not in ("used", "chi2_history")},
    }
    if cfg.decorrelate:
        # Mean variances in difference-image units over good pixels (LSST uses the means).
        good = ~(s_bad | t_bad)
        if mode == "convolve_template":
            v_unconv = float(np.mean(s_var[good]))
            v_conv = float(np.mean(t_var[good])) * ksum**2
        else:
            v_unconv = float(np.mean(t_var[good])) / ksum**2
            v_conv = float(np.mean(s_var[good]))
        phi = _pm.decorrelation_kernel(
            center_kernel, v_conv, v_unconv, corr_convolved=rho_conv, corr_unconvolved=rho_tgt
        )
        hp = phi.shape[0] // 2
        diff_zero = da.where((dmask & np.uint32(nodata)) != 0, 0.0, diff)
        diff = _convolve_plain(diff_zero.astype(np.float32), phi, chunk)
        # Noise is now white at the zero-frequency level of the difference's noise power:
        # per pixel, each image's variance times the sum of its noise correlation (1 for
        # white noise), the convolved one scaled by the flux ratio.
        g_conv, g_tgt = float(rho_conv.sum()), float(rho_tgt.sum())
        if mode == "convolve_template":
            dvar = tg_var * g_tgt + da.from_array(conv_var, chunks=chunk) * (ksum**2 * g_conv)
        else:
            assert scale is not None, "scale is the kernel-sum map when the science image is convolved"
            dvar = (da.from_array(conv_var, chunks=chunk) * g_conv * scale**2 + tg_var * g_tgt) / scale**2
        edge2 = np.zeros((ny, nx), bool)
        h2 = h + _conv.kernel_support_radius(phi, 1e-3)
        edge2[:h2] = edge2[-h2:] = True
        edge2[:, :h2] = edge2[:, -h2:] = True
        dmask = dmask | da.from_array(np.where(edge2, np.uint32(nodata), np.uint32(0)), chunks=chunk)
        diff_psf_extra = phi
        summary["decorrelation_half_width"] = int(hp)
        summary["var_convolved"] = v_conv
        summary["var_unconvolved"] = v_unconv
    if mode == "convolve_template":
        psf_extra = diff_psf_extra
    else:
        from scipy.signal import fftconvolve

        kn = center_kernel / center_kernel.sum()
        psf_extra = fftconvolve(kn, diff_psf_extra, mode="full") if diff_psf_extra.size > 1 else kn
    diff_psf = _psf_convolved(sci.psf, psf_extra, (cx, cy)) if psf_extra.size > 1 else sci.psf
    dmask = dmask.astype(np.uint32)
    diff = da.where((dmask & np.uint32(nodata)) != 0, np.float32(0.0), diff).astype(np.float32)
    dvar = dvar.astype(np.float32)
    diff, dvar, dmask = _dask.evaluate(diff, dvar, dmask)
    dmask = np.asarray(dmask, dtype=np.uint32)
    good = ~((dmask & np.uint32(bad_bits)) != 0)
    if good.any():
        z = diff[good] / np.sqrt(np.where(dvar[good] > 0, dvar[good], np.inf))
        med = float(np.median(z))
        summary["residual_median_sigma"] = med
        summary["residual_std_sigma"] = float(1.4826 * np.median(np.abs(z - med)))
        # The variance plane must predict the difference's noise: the correlated-noise
        # factors are estimates, so the plane is rescaled by the measured robust
        # spread of diff / sqrt(var) (recorded; a factor far from 1 is a warning).
        rescale = summary["residual_std_sigma"]
        summary["variance_rescale"] = 1.0
        if np.isfinite(rescale) and 0.5 < rescale < 2.0 and abs(rescale - 1.0) > 0.02:
            dvar = (dvar * np.float32(rescale**2)).astype(np.float32)
            summary["variance_rescale"] = float(rescale**2)
    # Registration and flux-matching noise, measured at bright unsaturated stars of
    # the science image (S/N > 200: the noise the two images share is then negligible
    # in the fits), on stamps of the star's core.
    bx, by = _pm.select_kernel_stars(
        s_img,
        s_var,
        any_hard,
        psf_sigma=sig_s,
        stamp_radius=int(math.ceil(3 * fwhm)),
        n_cells=cfg.n_cells,
        per_cell=cfg.per_cell,
        min_snr=200.0,
        core_radius=int(math.ceil(2 * fwhm)),
    )
    static = s_img
    summary.update(
        registration_noise(
            diff, dvar, static, bx, by, int(math.ceil(1.5 * fwhm)), bad=(dmask & np.uint32(bad_bits)) != 0
        )
    )
    meta = dict(sci.metadata)
    meta["diffim"] = summary
    diff_exp = sci._replace(image=diff, variance=dvar, mask=dmask, psf=diff_psf, metadata=meta)
    return diff_exp, kern, summary
