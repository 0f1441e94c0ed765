"""Image subtraction: PSF matching, convolution per chunk, decorrelation, DIA measurement.

The layer between the numba/numpy kernels (:mod:`procsky.kernels.psfmatch`,
:mod:`procsky.kernels.convolve`, :mod:`procsky.kernels.dipole`, :mod:`procsky.kernels.detection`)
and the thin pipeline tasks (:mod:`procsky.tasks.diffim`, :mod:`procsky.tasks.dia`). Its
dask work goes through :mod:`procsky._dask`: the matching-kernel convolution, the variance
and mask propagation and the decorrelation run per chunk with an overlap of the kernel
half-width.

A difference is lazy, like a coadd: :func:`subtract_images` and :func:`difference_image`
build a graph and compute nothing. The kernel fit needs the pixels of the star stamps and
the noise measurements (variance rescaling, registration noise, noise correlation) those of
the whole difference, and their results shape the difference's PSF and summary as well as
its planes: they run in one :class:`Deferred` computation that the planes, the PSF and the
metadata share, so that writing the difference computes it once.

Public functions
----------------
subtract_images(science, template, config)
    Fit an Alard-Lupton kernel; the difference :class:`~procsky.exposure.Exposure`, the
    kernel and a summary dict.
difference_image(calexp, templates, config)
    One detector's difference as the ``subtract`` task stores it (template warp,
    subtraction, DIA detections in the mask).
detect_dia_sources(diff, config)
    Detection in both polarities and measurement -> ``dia_source`` DataFrame;
    :func:`diffim_summary` the per-detector summary.
forced_dia_photometry(diff, ra, dec, ids)
    PSF fluxes at fixed positions -> ``dia_forced_source`` rows.
simulate_pair(...)
    A synthetic science/template pair with known stars and transients (tests, benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pydantic

from procsky import _dask
from procsky import masks as _masks
from procsky.errors import AlgorithmError, NoWorkError, ProcskyValueError
from procsky.kernels import convolve as _conv
from procsky.kernels import psfmatch as _pm
from procsky.psf import PsfModel

__all__ = [
    "SubtractionConfig",
    "DiaConfig",
    "subtract_images",
    "convolve_exposure_arrays",
    "detect_dia_sources",
    "forced_dia_photometry",
    "simulate_pair",
    "psf_sigma_at",
    "registration_noise",
    "corrected_score_variance",
    "dia_detection_mask",
    "warp_template_to_science",
    "difference_image",
    "diffim_summary",
    "with_recorded_summary",
    "note_subtraction",
    "Deferred",
    "DeferredPsf",
    "deferred_exposure",
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


def convolve_exposure_arrays(image, variance, mask, kernel: _pm.MatchingKernel, *, xy0=(0, 0), spread_bits=0,
                             core_bits=0, chunk=1024):
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
    img_cache, var_cache = {}, {}

    def conv_img(b, y0, x0):
        return _conv.spatial_convolve(b, ks, order, x0 + xy0[0], y0 + xy0[1], shape, cache=img_cache, single=True)

    def conv_var(b, y0, x0):
        v = _conv.spatial_convolve_variance(b, ks, order, x0 + xy0[0], y0 + xy0[1], shape, cache=var_cache,
                                            single=True)
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

    img = _dask.map_overlap_with_origin(conv_img, [image], depth=h, dtype=np.float32, chunk=chunk)
    var = _dask.map_overlap_with_origin(conv_var, [variance], depth=h, dtype=np.float32, chunk=chunk)
    msk = (_dask.map_overlap_with_origin(conv_mask, [mask], depth=r, dtype=np.uint32, chunk=chunk) if r > 0
           else mask)
    return img, var, msk


def _convolve_plain(arr, kernel2d, chunk, dtype=np.float32):
    h = kernel2d.shape[0] // 2

    def f(b, y0, x0):
        return _conv.convolve_valid(b, kernel2d)

    return _dask.map_overlap_with_origin(f, [arr], depth=h, dtype=dtype, chunk=chunk)


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
    return float(np.sum(rho[r - rr : r + rr + 1, r - rr : r + rr + 1] * ak[c - rr : c + rr + 1, c - rr : c + rr + 1]) / k2)


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
    once = Deferred(_subtract_now, science, template, cfg, stars)
    diff = deferred_exposure(once, science, part=lambda r: r[0])
    return diff, once.delayed(lambda r: r[1], "kernel"), diff.metadata["diffim"]


def _check_pair(science, template, cfg: SubtractionConfig) -> None:
    """The checks of a science/template pair that need no pixels."""
    if science.shape != template.shape:
        raise ProcskyValueError(
            f"template shape {template.shape} differs from science shape {science.shape}; warp the template "
            "onto the science pixel grid first (procsky.tasks.diffim.warp_template_to_science)"
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
    basis = _pm.basis_for_psfs(sig_sharp, sig_broad, degrees=cfg.degrees, scales=cfg.scales,
                               half_width=cfg.kernel_half_width)
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
        sx, sy = _pm.select_kernel_stars(conv_img, conv_var, any_hard, psf_sigma=sig_sharp,
                                         stamp_radius=stamp_half + h, n_cells=cfg.n_cells, per_cell=cfg.per_cell,
                                         min_snr=cfg.min_snr, other=tgt_img, other_variance=tgt_var,
                                         other_bad=any_hard, core_radius=h + core, soft_bad=any_soft,
                                         soft_core_radius=soft_r + core)
    else:
        sx, sy = (np.asarray(a, dtype=float) for a in stars)
    # Weights: the target's variance plus the (unconvolved) variance of the other image
    # scaled by the flux ratio, estimated from the candidate stars' summed fluxes.
    ratio = _flux_ratio(conv_img, tgt_img, sx, sy, stamp_half)
    wvar = tgt_var + ratio**2 * conv_var
    stamps = _pm.build_stamps(conv_img, tgt_img, np.where(wvar > 0, wvar, np.inf), any_hard, sx, sy, basis,
                              stamp_half, cfg.background_order, shape=det_shape, xy0=(x0, y0), soft=any_soft,
                              soft_radius=soft_r)
    try:
        kern = _pm.fit_matching_kernel(stamps, basis, spatial_order=cfg.spatial_order,
                                       background_order=cfg.background_order, shape=det_shape,
                                       clip_sigma=cfg.clip_sigma, constant_sum=cfg.constant_sum)
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
    c_img, c_var, c_msk = convolve_exposure_arrays(conv_img, conv_var, conv_mask, kern, xy0=(x0, y0),
                                                   spread_bits=_masks.bits(*[n for n in _SPREAD if n in planes],
                                                                           planes=planes),
                                                   core_bits=_masks.bits(*[n for n in _SPREAD_CORE if n in planes],
                                                                         planes=planes), chunk=chunk)
    yy = da.arange(ny, chunks=chunk)[:, None] + y0
    xx = da.arange(nx, chunks=chunk)[None, :] + x0
    uu, vv = (2.0 * xx / max(det_shape[1] - 1, 1) - 1.0), (2.0 * yy / max(det_shape[0] - 1, 1) - 1.0)
    bg = sum(float(c) * uu**i * vv**j for c, (i, j) in zip(kern.background, _conv.poly_exponents(kern.background_order)))
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
        ksum_map = sum(float(c) * uu**i * vv**j for c, (i, j) in zip(kern.coeffs[0], _conv.poly_exponents(kern.spatial_order)))
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
        phi = _pm.decorrelation_kernel(center_kernel, v_conv, v_unconv, corr_convolved=rho_conv,
                                       corr_unconvolved=rho_tgt)
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
            dvar = (da.from_array(conv_var, chunks=chunk) * g_conv * scale**2 + tg_var * g_tgt) / scale**2
        edge2 = np.zeros((ny, nx), bool)
        e = h + _conv.kernel_support_radius(phi, 1e-3)
        edge2[:e] = edge2[-e:] = True
        edge2[:, :e] = edge2[:, -e:] = True
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
    diff, dvar, dmask = _dask.compute(diff, dvar, dmask)
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
    bx, by = _pm.select_kernel_stars(s_img, s_var, any_hard, psf_sigma=sig_s, stamp_radius=int(math.ceil(3 * fwhm)),
                                     n_cells=cfg.n_cells, per_cell=cfg.per_cell, min_snr=200.0,
                                     core_radius=int(math.ceil(2 * fwhm)))
    static = s_img
    summary.update(registration_noise(diff, dvar, static, bx, by, int(math.ceil(1.5 * fwhm)),
                                      bad=(dmask & np.uint32(bad_bits)) != 0))
    meta = dict(sci.metadata)
    meta["diffim"] = summary
    diff_exp = sci._replace(image=diff, variance=dvar, mask=dmask, psf=diff_psf, metadata=meta)
    return diff_exp, kern, summary


# ============================================================================ lazy results
class Deferred:
    """A whole-image computation run at most once, by the first graph task or attribute
    that needs its result.

    The kernel fit needs the pixels of the star stamps and of the whole image (noise
    correlation, variance rescaling, registration noise), and its results shape the
    difference's PSF and summary as well as its planes. Wrapping it here lets a difference
    be built without computing anything, and computed once whichever of planes, PSF or
    metadata is asked for first (the planes and the metadata when the difference is
    written). Thread-safe; a failure is kept and raised again to every caller.
    """

    def __init__(self, func: Callable, *args: Any) -> None:
        import threading
        import uuid

        self._func: Callable | None = func
        self._args: tuple = args
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self.name = f"{getattr(func, '__name__', 'deferred').strip('_')}-{uuid.uuid4().hex}"

    @property
    def done(self) -> bool:
        """True once the computation ran (successfully or not)."""
        return self._done

    def get(self) -> Any:
        """The result, computed on the first call."""
        with self._lock:
            if not self._done:
                try:
                    self._value = self._func(*self._args)
                except BaseException as e:  # kept for every later caller
                    self._error = e
                self._done = True
                self._func, self._args = None, ()
        if self._error is not None:
            raise self._error
        return self._value

    def delayed(self, part: Callable[[Any], Any], what: str):
        """A :class:`dask.delayed.Delayed` of ``part(result)``."""
        import dask

        return dask.delayed(_deferred_part, pure=False)(self, part, dask_key_name=f"{what}-{self.name}")


def _deferred_part(deferred: Deferred, part: Callable[[Any], Any]) -> Any:
    return part(deferred.get())


class DeferredPsf(PsfModel):
    """The PSF of a deferred difference image: resolved (the difference computed) on first use."""

    def __init__(self, deferred: Deferred, part: Callable[[Any], PsfModel]) -> None:
        self._deferred = deferred
        self._part = part

    def resolve(self) -> PsfModel:
        """The PSF model itself."""
        psf = self._part(self._deferred.get())
        if psf is None:
            raise ProcskyValueError("the deferred difference image has no PSF")
        return psf

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.resolve().size

    def kernel(self, x: float, y: float) -> np.ndarray:
        return self.resolve().kernel(x, y)

    def render(self, x: float, y: float, *, size: int | None = None,
               offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        return self.resolve().render(x, y, size=size, offset=offset)

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        return self.resolve().moments(x, y)

    def fwhm(self, x: float, y: float) -> float:
        return self.resolve().fwhm(x, y)

    def to_dict(self) -> dict:
        return self.resolve().to_dict()


def deferred_exposure(deferred: Deferred, like, *, part: Callable[[Any], Any], metadata_keys=("diffim",),
                      chunk: int | None = None):
    """A lazy :class:`~procsky.exposure.Exposure` whose planes, PSF and ``metadata_keys``
    are those of the exposure ``part(deferred.get())``; everything else is ``like``'s.

    The planes are dask arrays in chunks of ``chunk`` pixels (default: the storage chunk of
    :meth:`Exposure.write`), the metadata values :class:`dask.delayed.Delayed` objects;
    they share the one deferred computation.
    """
    from procsky.exposure import DEFAULT_CHUNK

    ny, nx = like.shape
    planes = deferred.delayed(lambda r: _planes_of(part(r)), "planes")
    image, variance, mask = _dask.from_chunk_tasks([[planes]], [[(ny, nx)]], [np.float32, np.float32, np.uint32],
                                                   ["diff-image", "diff-variance", "diff-mask"])
    c = int(chunk or DEFAULT_CHUNK)
    meta = dict(like.metadata)
    for k in metadata_keys:
        meta[k] = deferred.delayed(lambda r, k=k: part(r).metadata[k], f"metadata-{k}")
    return like._replace(image=image.rechunk(c), variance=variance.rechunk(c), mask=mask.rechunk(c),
                         psf=DeferredPsf(deferred, lambda r: part(r).psf), metadata=meta)


def _computed(exp):
    """``exp.compute()`` with a deferred PSF resolved (the dipole fit takes a fast path for
    the PSF classes it knows)."""
    out = exp.compute()
    if isinstance(out.psf, DeferredPsf):
        out = out._replace(psf=out.psf.resolve())
    return out


def _planes_of(exp) -> tuple:
    return (np.asarray(exp.image, dtype=np.float32), np.asarray(exp.variance, dtype=np.float32),
            np.asarray(exp.mask, dtype=np.uint32))


# ============================================================================ one detector
def warp_template_to_science(templates, science, *, order: int = 3):
    """Resample template patches onto the science exposure's pixel grid and merge them.

    Parameters
    ----------
    templates : list of Exposure
        Template patches (with WCS and PSF), nJy per template pixel.
    science : Exposure
        Science exposure with a WCS; its grid, ``xy0`` and detector are used.
    order : int
        Lanczos order.

    Returns
    -------
    Exposure
        numpy planes on the science grid (nJy per science pixel); pixels covered by no
        template are NO_DATA; PSF = the warped PSF of the patch covering the detector
        centre (else of the patch covering the most pixels).

    Raises
    ------
    NoWorkError
        No template overlaps the science exposure.
    """
    from procsky.coadd import WarpConfig, warp_exposure
    from procsky.exposure import Exposure

    if science.wcs is None:
        raise ProcskyValueError("the science exposure has no WCS; it cannot be matched to a template")
    ny, nx = science.shape
    nodata = np.uint32(_masks.bit("NO_DATA"))
    img = np.zeros((ny, nx), np.float32)
    var = np.zeros((ny, nx), np.float32)
    msk = np.full((ny, nx), nodata, np.uint32)
    filled = np.zeros((ny, nx), bool)
    best = (None, -1, False)
    cfg = WarpConfig(order=order, chunk=max(ny, nx) if max(ny, nx) <= 4096 else 2048)
    for tpl in templates:
        if tpl is None:
            continue
        try:
            w = warp_exposure(tpl, science.wcs_cards, (ny, nx), xy0=(0, 0), config=cfg, full=True)
        except NoWorkError:
            continue
        i, v, m = _dask.compute(w.image, w.variance, w.mask)
        ok = ((m & nodata) == 0) & np.isfinite(i) & ~filled
        img[ok], var[ok], msk[ok] = i[ok], v[ok], m[ok]
        filled |= ok
        covers_center = bool(((m & nodata) == 0)[ny // 2, nx // 2])
        score = int(ok.sum())
        if w.psf is not None and ((covers_center and not best[2]) or (covers_center == best[2] and score > best[1])):
            best = (w.psf, score, covers_center)
    if not filled.any():
        raise NoWorkError("no template patch overlaps this detector")
    return Exposure(img, var, msk, wcs=science.wcs, wcs_cards=science.wcs_cards, psf=best[0],
                    detector=science.detector, xy0=science.xy0,
                    metadata={"flux_unit": "nJy", "template_coverage": float(filled.mean())})


#: Metadata keys a detector difference (:func:`difference_image`) adds to the calexp's.
DIFFERENCE_METADATA = ("diffim", "diffim_record")


def difference_image(calexp, templates, config: SubtractionConfig | None = None, *,
                     detection: DiaConfig | None = None, warp_order: int = 3, lazy: bool = True):
    """The difference image of one detector, as the ``subtract`` task stores it.

    The template patches are warped onto the calexp's grid (:func:`warp_template_to_science`),
    subtracted (:func:`subtract_images`) and the DIA detections of both polarities flagged
    in the mask (:func:`dia_detection_mask`, with the calexp as the static sky of the
    registration-noise term, as :func:`detect_dia_sources` is then called on it).
    ``metadata`` gains ``diffim`` (the summary) and ``diffim_record``: JSON text of the
    summary (non-finite values kept, which JSON metadata turns into null), the matching
    kernel (:meth:`MatchingKernel.to_dict`) and the template coverage, from which
    :func:`diffim_summary` is made. Degraded-mode notes (few kernel stamps, variance not
    rescaled, partial template) are made when the difference is computed.

    With ``lazy`` (the default) nothing is computed: the planes are dask arrays and the
    metadata values delayed objects of one deferred computation (see :class:`Deferred`).
    """
    cfg = config or SubtractionConfig()
    det = detection or DiaConfig()
    if not lazy:
        return _difference_now(calexp, templates, cfg, det, warp_order)
    once = Deferred(_difference_now, calexp, templates, cfg, det, warp_order)
    return deferred_exposure(once, calexp, part=lambda r: r, metadata_keys=DIFFERENCE_METADATA)


def _difference_now(calexp, templates, cfg: SubtractionConfig, det: DiaConfig, warp_order: int):
    import json

    science = calexp.compute()
    tpl = warp_template_to_science(templates, science, order=warp_order)
    diff, kernel, summary = _subtract_now(science, tpl, cfg)
    # the science image is the static sky of the registration-noise term of the score
    mask = dia_detection_mask(diff, det, static=np.asarray(science.image, dtype=np.float32))
    coverage = tpl.metadata.get("template_coverage")
    note_subtraction(summary, cfg.spatial_order, coverage)
    meta = dict(diff.metadata)
    meta["diffim_record"] = json.dumps({"summary": summary, "template_coverage": coverage,
                                        "kernel": kernel.to_dict()}, default=_json_value)
    return diff._replace(mask=mask, metadata=meta)


def _json_value(obj: Any) -> Any:
    """numpy scalars and arrays, tuples -> JSON values (as the repository's JSON storage)."""
    tolist = getattr(obj, "tolist", None)
    if tolist is not None and getattr(obj, "ndim", 0) > 0:
        return tolist()
    item = getattr(obj, "item", None)
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def note_subtraction(summary: dict, spatial_order: int, template_coverage: float | None = None) -> None:
    """Degraded-mode notes of one subtraction: kernel order capped by few stamps, noise too
    far from the variance plane to rescale, partial template coverage."""
    from procsky.notes import note_degraded

    need, n = _pm._min_stamps(spatial_order), summary.get("n_stamps_used")
    if n is not None and n < need:
        note_degraded("few_kernel_stamps", f"only {n} of {summary.get('n_stamps')} kernel stamps used (< {need} for "
                      f"spatial_order={spatial_order}): kernel spatial order "
                      f"{summary.get('spatial_order_used')}", n_stamps_used=n,
                      spatial_order_used=summary.get("spatial_order_used"))
    res = summary.get("residual_std_sigma")
    if res is not None and summary.get("variance_rescale") == 1.0 and (not np.isfinite(res) or abs(res - 1.0) > 0.5):
        note_degraded("variance_not_rescaled", f"the difference's noise is {res:.2f} x what its variance plane "
                      "predicts, too far from 1 to rescale: detection thresholds are off by that factor",
                      residual_std_sigma=res)
    cov = template_coverage
    if cov is not None and cov < 0.9:
        note_degraded("template_partial_coverage", f"the template covers {100 * cov:.0f} % of the detector: the rest "
                      "of the difference image is NO_DATA", severity="info", coverage=cov)


def with_recorded_summary(diff):
    """``diff`` with ``metadata["diffim"]`` as :func:`difference_image` made it (from
    ``diffim_record``: stored JSON metadata turns non-finite values into null, which would
    change what :func:`detect_dia_sources` reads there); ``diff`` itself without a record."""
    import json

    text = (diff.metadata or {}).get("diffim_record")
    if not text:
        return diff
    return diff._replace(metadata={**diff.metadata, "diffim": json.loads(text)["summary"]})


def diffim_summary(diff, dia_sources) -> dict:
    """The per-detector ``diffim_summary`` of a difference made by :func:`difference_image`
    and its DIA sources: the subtraction summary, the DIA source counts, the template
    coverage and the matching kernel."""
    import json

    record = json.loads((diff.metadata or {}).get("diffim_record") or "{}")
    summary = dict(record.get("summary") or {})
    dia = dia_sources
    summary.update({
        "n_dia_sources": int(len(dia)),
        "n_dia_positive": int((~dia.is_negative & ~dia.is_dipole).sum()),
        "n_dia_negative": int(dia.is_negative.sum()),
        "n_dia_dipoles": int(dia.is_dipole.sum()),
        "template_coverage": record.get("template_coverage"),
        "kernel": record.get("kernel"),
    })
    return summary


# ============================================================================ DIA sources
class DiaConfig(pydantic.BaseModel):
    """Options of :func:`detect_dia_sources`.

    Attributes
    ----------
    nsigma : float
        Detection threshold in units of the local (matched-filter) noise.
    dipole_radius : float, PSF FWHM
        Positive and negative detections closer than this merge into one dipole source.
    edge_margin : int, pixels
        Sources closer than this to NO_DATA/the border are flagged ``flag_edge``.
    max_masked_fraction : float
        Sources with more of their PSF weight on masked pixels (no usable value: BAD, SAT,
        NO_DATA, EDGE, SUSPECT) are flagged.
    min_area : int, pixels
        Fewer pixels above the threshold are not a detection.
    registration_noise : bool
        Detect on the corrected score of Zackay, Ofek & Gal-Yam (2016): the variance of the
        filtered difference includes the registration and flux-mismatch noise at static
        sources (:func:`corrected_score_variance`), so that the residuals of bright static
        stars are not detections. Needs the static image (``detect_dia_sources(static=)``).
    registration_sigma : float, pixels, optional
        Registration noise per axis; default: measured by :func:`subtract_images`
        (``metadata["diffim"]["registration_sigma_px"]``).
    flux_mismatch : float, optional
        Fractional flux-matching noise; default: measured likewise (``flux_mismatch_rms``).
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    nsigma: float = pydantic.Field(5.0, gt=0)
    dipole_radius: float = pydantic.Field(1.5, gt=0)
    edge_margin: int = 3
    max_masked_fraction: float = 0.2
    min_area: int = 3
    registration_noise: bool = True
    registration_sigma: float | None = None
    flux_mismatch: float | None = None


def _stamp_bad_fraction(mask, bits, ix, iy, psf_stamp):
    ny, nx = mask.shape
    s = psf_stamp.shape[0]
    hh = s // 2
    y0, y1 = iy - hh, iy + hh + 1
    x0, x1 = ix - hh, ix + hh + 1
    w = psf_stamp**2
    tot = w.sum()
    m = np.ones((s, s), bool)
    yy0, yy1, xx0, xx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
    if yy1 > yy0 and xx1 > xx0:
        m[yy0 - y0 : yy1 - y0, xx0 - x0 : xx1 - x0] = (mask[yy0:yy1, xx0:xx1] & np.uint32(bits)) != 0
    return float((w * m).sum() / tot) if tot > 0 else 1.0


def _psf_fit(image, variance, mask, bits, psf, x, y, xy0):
    """Linear PSF flux at (x, y) (array pixels); returns flux, err, chi2_dof, lost fraction."""
    from procsky.kernels.measure import psf_flux

    ix, iy = int(round(x)), int(round(y))
    stamp = psf.render(x + xy0[0], y + xy0[1], offset=(x - ix, y - iy))
    return psf_flux(image, variance, mask, ix, iy, np.ascontiguousarray(stamp, dtype=np.float64), True, int(bits))


_DIPOLE_OVERSAMPLE = 4


def _oversampled_psf(psf, x, y, oversample=_DIPOLE_OVERSAMPLE, size=None):
    """The PSF at detector (x, y) tabulated ``oversample`` times finer than the pixels.

    ``oversample**2`` renderings at the sub-pixel offsets of an ``n x n`` grid, interleaved
    (:func:`procsky.kernels.dipole.interleave_offsets`): an oversampled effective PSF
    (Anderson & King 2000) that the dipole kernel interpolates, instead of re-rendering
    the PSF (an FFT shift) at every function evaluation. ``size`` (odd) crops the kernel
    to the part a fit needs (a difference image's PSF, convolved with the matching and
    decorrelation kernels, is ~85 px wide where a dipole box is ~30: the 16 FFT shifts then
    cost ~8x less); the crop keeps the normalisation of the full kernel (sum 1 over the
    model's own size, like ``_psf_fit``'s stamps), so fitted fluxes are total fluxes.

    Models rendered by :meth:`PsfModel.render` itself (kernel, crop, FFT shift,
    normalise) are evaluated once and shifted in one batch (one forward FFT, the same
    padding and phase ramps as :func:`procsky.psf.shift_image`): the result equals
    ``psf.render(x, y, size=s, offset=...)`` to rounding, without 15 more evaluations of
    the kernel (costly for a CoaddPsf of many inputs). Others (GaussianPsf draws its
    offsets analytically) are rendered 16 times.
    """
    from procsky.kernels.dipole import interleave_offsets, oversampled_offsets
    from procsky.psf import PsfModel, _resize

    n = int(oversample)
    offs = oversampled_offsets(n)
    if type(psf).render is PsfModel.render:
        kfull = np.asarray(psf.kernel(x, y), dtype=np.float64)
        tot = float(kfull.sum())
        s = kfull.shape[0] if size is None else min(int(size), kfull.shape[0])
        k = _resize(kfull, s) if s != kfull.shape[0] else kfull
        frac = float(k.sum()) / tot if tot != 0 else 1.0
        shifted = _shift_batch(k, np.array([o[2] for o in offs]), np.array([o[3] for o in offs]))
        stamps = np.empty((n, n, s, s))
        for m, (a, b, _, _) in enumerate(offs):
            stamps[b, a] = frac * shifted[m]
        return interleave_offsets(stamps)
    k0 = np.asarray(psf.render(x, y), dtype=np.float64)
    s = k0.shape[0]
    if size is not None and int(size) < s:
        c = (s - int(size)) // 2
        s = s - 2 * c
        k0 = k0[c : c + s, c : c + s]
    frac = float(k0.sum())
    stamps = np.empty((n, n, s, s))
    for a, b, dx, dy in offs:
        stamps[b, a] = k0 if (a == 0 and b == 0) else frac * psf.render(x, y, size=s, offset=(dx, dy))
    return interleave_offsets(stamps)


def _shift_batch(k, dxs, dys):
    """``shift_image(k, dx, dy) / sum`` for many offsets (as ``PsfModel.render`` normalises
    them) with one forward FFT: the same zero padding and Fourier phase ramps."""
    ny, nx = k.shape
    py, px = ny // 2 + 2, nx // 2 + 2
    padded = np.pad(k, ((py, py), (px, px)))
    f = np.fft.rfft2(padded)
    fy = np.fft.fftfreq(padded.shape[0])[None, :, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, None, :]
    # separable phase ramp: exp(-2 pi i (fx dx + fy dy)) = exp(-2 pi i fx dx) exp(-2 pi i fy dy)
    ramp = np.exp(-2j * np.pi * fx * np.asarray(dxs, float)[:, None, None]) * np.exp(
        -2j * np.pi * fy * np.asarray(dys, float)[:, None, None])
    out = np.fft.irfft2(f[None] * ramp, s=padded.shape, axes=(-2, -1))[:, py : py + ny, px : px + nx]
    zero = (np.asarray(dxs) == 0) & (np.asarray(dys) == 0)
    out[zero] = k  # render does not shift at a zero offset
    sums = out.sum(axis=(1, 2))
    return out / np.where(sums != 0, sums, 1.0)[:, None, None]


def _fft_friendly_half(h):
    """Smallest half-size >= h whose FFT shift is fast: ``shift_image`` pads a side of
    ``2 h + 1`` to ``4 h + 5``, and pocketfft is ~2x slower on sizes with large prime factors
    (73 = 4 * 17 + 5 is prime) than on 13-smooth ones (81, 105)."""
    h = int(h)
    while True:
        m = 4 * h + 5
        for p in (3, 5, 7, 11, 13):
            while m % p == 0:
                m //= p
        if m == 1:
            return h
        h += 1


def _dipole_fit(image, variance, mask, bits, psf, xp, yp, xn, yn, xy0, half):
    """Two PSFs of opposite sign fitted by least squares; returns dict of dipole parameters.

    The PSF at the dipole centre is tabulated once, 4x oversampled, and the six parameters
    are fitted by Levenberg-Marquardt with analytic derivatives in numba
    (:func:`procsky.kernels.dipole.fit_dipole`) over the box of half-size ``half`` around
    the midpoint of the two detections, pixels with ``bits`` set left out. ``neg_flux`` is
    the (positive) flux of the negative lobe. None when the fit fails or does not converge.
    """
    from procsky.kernels.dipole import fit_dipole

    ny, nx = image.shape
    xc, yc = 0.5 * (xp + xn), 0.5 * (yp + yn)
    ix0, ix1 = max(int(xc) - half, 0), min(int(xc) + half + 1, nx)
    iy0, iy1 = max(int(yc) - half, 0), min(int(yc) + half + 1, ny)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    # PSF support needed: the box seen from either lobe, lobes within ~sep/2 of the centre
    reach = half + int(math.ceil(0.5 * math.hypot(xp - xn, yp - yn))) + 3
    psf_os = _oversampled_psf(psf, xy0[0] + xc, xy0[1] + yc, size=2 * _fft_friendly_half(reach) + 1)
    p0 = np.array([xp, yp, 1.0, xn, yn, 1.0], dtype=np.float64)
    params, _, chi2, npix, _, converged = fit_dipole(image, variance, mask, int(bits), ix0, iy0, ix1, iy1, psf_os,
                                                     _DIPOLE_OVERSAMPLE, p0)
    if npix < 10 or not converged or not np.all(np.isfinite(params)) or not np.isfinite(chi2):
        return None
    return {"pos_x": float(params[0]), "pos_y": float(params[1]), "pos_flux": float(params[2]),
            "neg_x": float(params[3]), "neg_y": float(params[4]), "neg_flux": float(params[5]), "chi2": float(chi2)}


def _detect_both(exp, cfg: DiaConfig, static=None) -> tuple:
    """Detection in both polarities on a computed difference ``exp``.

    Returns ``(image, variance, mask, detections, psf_sigma)``: ``mask`` is a copy of the
    difference's with DETECTED / DETECTED_NEGATIVE set, ``detections`` a list of
    ``(x, y, polarity, peak_significance)`` (array pixels), positive ones first.
    """
    from procsky.kernels.detection import detect_sources

    img = np.asarray(exp.image, dtype=np.float32)
    var = np.asarray(exp.variance, dtype=np.float32)
    mask = np.asarray(exp.mask, dtype=np.uint32).copy()
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    psf = exp.psf
    if psf is None:
        raise ProcskyValueError("the difference image has no PSF; subtract_images sets one")
    cx, cy = x0 + nx / 2, y0 + ny / 2
    sigma = psf_sigma_at(psf, cx, cy)
    nodata_bits = _masks.bits(*[n for n in ("NO_DATA", "BAD") if n in planes], planes=planes)
    extra = None
    if static is not None and np.shape(static) != img.shape:
        raise ProcskyValueError(f"static image shape {np.shape(static)} differs from the difference's {img.shape}; "
                                "pass the science image on the difference's pixel grid")
    if cfg.registration_noise and static is not None:
        meta = (exp.metadata or {}).get("diffim") or {}
        reg = cfg.registration_sigma if cfg.registration_sigma is not None else meta.get("registration_sigma_px")
        eps = cfg.flux_mismatch if cfg.flux_mismatch is not None else meta.get("flux_mismatch_rms")
        if reg is not None or eps is not None:
            extra = corrected_score_variance(static, sigma, np.nan if reg is None else reg,
                                             np.nan if eps is None else eps)
    dets = []
    for pol in (1, -1):
        res = detect_sources(img, var, mask, psf_sigma=sigma, nsigma=cfg.nsigma, polarity=pol, min_area=cfg.min_area,
                             extra_variance=extra,
                             deblend=True, bad_bits=nodata_bits)
        plane = "DETECTED" if pol == 1 else "DETECTED_NEGATIVE"
        if plane in planes:
            mask[res.detected] |= np.uint32(1 << planes[plane])
        for i in range(len(res.x)):
            dets.append((float(res.x[i]), float(res.y[i]), pol, float(res.peak_significance[i])))
    return img, var, mask, dets, sigma


def dia_detection_mask(diff, config: DiaConfig | None = None, *, static=None) -> np.ndarray:
    """The mask of ``diff`` with the DETECTED / DETECTED_NEGATIVE planes of
    :func:`detect_dia_sources` (same arguments) set, without measuring the sources."""
    return _detect_both(_computed(diff), config or DiaConfig(), static)[2]


def detect_dia_sources(diff, config: DiaConfig | None = None, *, static=None):
    """Detect and measure sources on a difference image, both polarities.

    Parameters
    ----------
    diff : procsky.exposure.Exposure
        Difference image (decorrelated), with PSF, variance, mask and optionally WCS,
        PhotoCalib and VisitInfo.
    config : DiaConfig, optional
    static : ndarray (ny, nx), optional
        The static sky on the difference's grid and in its units (the science image), for
        the registration-noise term of the detection score (``config.registration_noise``).

    Returns
    -------
    pandas.DataFrame
        One row per DIA source: ``dia_source_id`` (per image, from 0), ``x``, ``y`` (detector
        pixels), ``ra``, ``dec`` (deg), ``psf_flux``, ``psf_flux_err`` (nJy when a PhotoCalib is
        present, else counts), ``psf_chi2``, ``snr``, ``is_negative``, ``is_dipole``, dipole
        fit columns, ``ixx``, ``iyy``, ``ixy`` (pixels^2), ``masked_fraction`` (PSF^2 weight on
        pixels without a usable value), ``repaired_fraction`` (on CR/INTRP pixels), flags
        ``flag_edge``, ``flag_masked``, ``flag_saturated_nearby``, ``flag_centroid``,
        ``flag_shape``, ``flag_psf_flux`` and ``reliability`` in [0, 1].
    mask : ndarray uint32
        The mask with DETECTED / DETECTED_NEGATIVE set.
    """
    import pandas as pd

    from procsky.kernels.measure import adaptive_moments, windowed_centroid

    cfg = config or DiaConfig()
    exp = _computed(diff)
    img, var, mask, dets, sigma = _detect_both(exp, cfg, static)
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    psf = exp.psf
    fwhm = 2.3548 * sigma
    nodata_bits = _masks.bits(*[n for n in ("NO_DATA", "BAD") if n in planes], planes=planes)
    fit_bits = _masks.bits(*[n for n in _FIT_EXCLUDE if n in planes], planes=planes)
    masked_bits = _masks.bits(*[n for n in _MASKED if n in planes], planes=planes)
    repaired_bits = _masks.bits(*[n for n in _SPREAD_CORE if n in planes], planes=planes)
    sat_bits = _masks.bits(*[n for n in ("SAT",) if n in planes], planes=planes)
    # Pair positive and negative detections into dipoles (closest pairs first).
    pos = [d for d in dets if d[2] == 1]
    neg = [d for d in dets if d[2] == -1]
    pairs = []
    rmax = cfg.dipole_radius * fwhm
    for i, p in enumerate(pos):
        for j, q in enumerate(neg):
            dd = math.hypot(p[0] - q[0], p[1] - q[1])
            if dd <= rmax:
                pairs.append((dd, i, j))
    pairs.sort()
    used_p, used_n = set(), set()
    sources = []
    for dd, i, j in pairs:
        if i in used_p or j in used_n:
            continue
        used_p.add(i)
        used_n.add(j)
        sources.append(("dipole", pos[i], neg[j]))
    sources += [("single", p, None) for i, p in enumerate(pos) if i not in used_p]
    sources += [("single", q, None) for j, q in enumerate(neg) if j not in used_n]
    sources.sort(key=lambda s: (s[1][1], s[1][0], s[1][2]))
    rows = []
    sgn_img = {1: img, -1: -img}
    for kind, a, b in sources:
        pol = a[2]
        work = sgn_img[pol]
        xc0, yc0 = a[0], a[1]
        if kind == "dipole":
            xc0, yc0 = 0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1])
        xw, yw, ex, ey, _, cok = windowed_centroid(work, var, mask, a[0], a[1], sigma, 20, fit_bits)
        if kind == "dipole":
            xw, yw, cok = xc0, yc0, True
        if not cok:
            xw, yw = a[0], a[1]
        f, fe, chi2, lost = _psf_fit(img, var, mask, fit_bits, psf, xw, yw, (x0, y0))
        mxx, myy, mxy, mok = _moments(work, mask, xw, yw, sigma, fit_bits, adaptive_moments)
        ix, iy = int(round(xw)), int(round(yw))
        stamp = psf.render(xw + x0, yw + y0)
        mfrac = _stamp_bad_fraction(mask, masked_bits, ix, iy, stamp)
        rfrac = _stamp_bad_fraction(mask, repaired_bits, ix, iy, stamp)
        near_sat = _stamp_bad_fraction(mask, sat_bits, ix, iy, np.ones((2 * int(2 * fwhm) + 1,) * 2)) > 0
        edge = (
            xw < cfg.edge_margin or yw < cfg.edge_margin or xw > nx - 1 - cfg.edge_margin or yw > ny - 1 - cfg.edge_margin
            or _stamp_bad_fraction(mask, nodata_bits, ix, iy, np.ones((2 * cfg.edge_margin + 1,) * 2)) > 0
        )
        row = {
            "x": xw + x0, "y": yw + y0, "x_err": ex, "y_err": ey,
            "psf_flux": f, "psf_flux_err": fe, "psf_chi2": chi2,
            "snr": f / fe if fe and np.isfinite(fe) and fe > 0 else np.nan,
            "peak_significance": a[3] * pol,
            "is_negative": bool(pol == -1 and kind != "dipole"),
            "is_dipole": kind == "dipole",
            "ixx": mxx, "iyy": myy, "ixy": mxy,
            "masked_fraction": mfrac,
            "repaired_fraction": rfrac,
            "flag_edge": bool(edge),
            "flag_masked": bool(mfrac > cfg.max_masked_fraction),
            "flag_saturated_nearby": bool(near_sat),
            "flag_centroid": not bool(cok),
            "flag_shape": not bool(mok),
            "flag_psf_flux": not np.isfinite(f),
        }
        dip = None
        if kind == "dipole":
            dip = _dipole_fit(img, var, mask, fit_bits, psf, a[0], a[1], b[0], b[1], (x0, y0),
                              int(math.ceil(2 * fwhm + 0.5 * math.hypot(a[0] - b[0], a[1] - b[1]))))
        row.update({
            "dipole_pos_flux": dip["pos_flux"] if dip else np.nan,
            "dipole_neg_flux": dip["neg_flux"] if dip else np.nan,
            "dipole_separation": (math.hypot(dip["pos_x"] - dip["neg_x"], dip["pos_y"] - dip["neg_y"]) if dip else np.nan),
            "dipole_angle": (math.degrees(math.atan2(dip["pos_y"] - dip["neg_y"], dip["pos_x"] - dip["neg_x"]))
                             if dip else np.nan),
            "dipole_chi2": dip["chi2"] if dip else np.nan,
            "flag_dipole_fit": bool(kind == "dipole" and dip is None),
        })
        # Reliability: penalise masked PSF weight, a PSF fit worse than the noise and a
        # shape that adaptive moments cannot measure (cosmic rays, bad columns and other
        # sharp or linear artifacts; real point sources on a difference image converge).
        # Repaired pixels are in the fit: a bad repair shows in the chi^2.
        c = chi2 if np.isfinite(chi2) else 10.0
        rel = max(0.0, 1.0 - mfrac) / (1.0 + max(0.0, c - 1.0))
        if not mok and kind != "dipole":
            rel *= 0.25
        row["reliability"] = float(rel)
        rows.append(row)
    cols = ["x", "y", "x_err", "y_err", "psf_flux", "psf_flux_err", "psf_chi2", "snr", "peak_significance",
            "is_negative", "is_dipole", "ixx", "iyy", "ixy", "masked_fraction", "repaired_fraction", "flag_edge",
            "flag_masked",
            "flag_saturated_nearby", "flag_centroid", "flag_shape", "flag_psf_flux", "dipole_pos_flux",
            "dipole_neg_flux", "dipole_separation", "dipole_angle", "dipole_chi2", "flag_dipole_fit", "reliability"]
    df = pd.DataFrame(rows, columns=cols)
    for c in cols:
        if c.startswith("flag_") or c.startswith("is_"):
            df[c] = df[c].astype(bool)
        else:
            df[c] = df[c].astype(np.float64)
    df.insert(0, "dia_source_id", np.arange(len(df), dtype=np.int64))
    _calibrate_and_locate(df, exp, ["psf_flux", "dipole_pos_flux", "dipole_neg_flux"], "psf_flux_err")
    return df, mask


def _moments(work, mask, x, y, sigma, bits, fn):
    try:
        out = fn(work, mask, x, y, sigma, 50, 1e-4, bits)
    except Exception:  # noqa: BLE001 - per-source failures are flags
        return np.nan, np.nan, np.nan, False
    # adaptive_moments returns (ixx, iyy, ixy, ..., ok) - take the documented leading three and last flag.
    vals = tuple(out)
    return float(vals[0]), float(vals[1]), float(vals[2]), bool(vals[-1])


def _calibrate_and_locate(df, exp, flux_cols, err_col):
    x0, y0 = exp.xy0
    if exp.photocalib is not None and len(df):
        cal = exp.photocalib.calibration
        for c in flux_cols:
            df[c] = df[c] * cal
        df[err_col] = df[err_col] * cal
    unit = "nJy" if exp.photocalib is not None else "count"
    df.attrs["flux_unit"] = unit
    df.attrs["units"] = {**{c: unit for c in flux_cols + [err_col]}, "x": "pixel", "y": "pixel", "ra": "deg",
                         "dec": "deg", "mjd": "d"}
    if exp.wcs is not None and len(df):
        ra, dec = exp.pixel_to_sky(df["x"].to_numpy() - x0, df["y"].to_numpy() - y0)
        df["ra"] = np.asarray(ra, dtype=np.float64)
        df["dec"] = np.asarray(dec, dtype=np.float64)
    else:
        df["ra"] = np.full(len(df), np.nan)
        df["dec"] = np.full(len(df), np.nan)
    vi = exp.visit_info
    df["mjd"] = np.full(len(df), vi.mjd if vi is not None else np.nan, dtype=np.float64)
    df["band"] = vi.band if vi is not None else ""
    if vi is not None and vi.visit is not None:
        df["visit"] = np.full(len(df), int(vi.visit), dtype=np.int64)
    if exp.detector and "id" in exp.detector:
        df["detector"] = np.full(len(df), int(exp.detector["id"]), dtype=np.int64)


def forced_dia_photometry(diff, ra=None, dec=None, ids=None, *, x=None, y=None):
    """PSF photometry at fixed positions on a difference image (light-curve points).

    Parameters
    ----------
    diff : procsky.exposure.Exposure
    ra, dec : array_like, deg
        Positions (needs ``diff.wcs``); or give detector pixels ``x``, ``y``.
    ids : array_like of int
        DIA object ids, one per position.

    Returns
    -------
    pandas.DataFrame
        ``dia_object_id``, ``x``, ``y``, ``psf_flux``, ``psf_flux_err`` (nJy when calibrated),
        ``psf_chi2``, ``masked_fraction`` (PSF^2 weight on pixels without a usable value),
        ``flag_edge``, ``mjd``, ``band`` ...; positions
        off the image are skipped.
    """
    import pandas as pd

    exp = _computed(diff)
    img = np.asarray(exp.image, dtype=np.float32)
    var = np.asarray(exp.variance, dtype=np.float32)
    mask = np.asarray(exp.mask, dtype=np.uint32)
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    if x is None:
        if exp.wcs is None:
            raise ProcskyValueError("forced photometry by sky position needs a WCS on the difference image")
        px, py = exp.sky_to_pixel(np.asarray(ra, float), np.asarray(dec, float))
    else:
        px, py = np.asarray(x, float) - x0, np.asarray(y, float) - y0
    ids = np.arange(len(px)) if ids is None else np.asarray(ids)
    fit_bits = _masks.bits(*[n for n in _FIT_EXCLUDE if n in planes], planes=planes)
    masked_bits = _masks.bits(*[n for n in _MASKED if n in planes], planes=planes)
    nod = _masks.bits(*[n for n in ("NO_DATA",) if n in planes], planes=planes)
    rows = []
    for oid, xx, yy in zip(ids, np.atleast_1d(px), np.atleast_1d(py)):
        if not (np.isfinite(xx) and np.isfinite(yy)) or xx < -0.5 or yy < -0.5 or xx > nx - 0.5 or yy > ny - 0.5:
            continue
        f, fe, chi2, lost = _psf_fit(img, var, mask, fit_bits, exp.psf, xx, yy, (x0, y0))
        ix, iy = int(round(xx)), int(round(yy))
        stamp = exp.psf.render(xx + x0, yy + y0)
        mfrac = _stamp_bad_fraction(mask, masked_bits, ix, iy, stamp)
        edge = _stamp_bad_fraction(mask, nod, ix, iy, np.ones((7, 7))) > 0
        rows.append({"dia_object_id": int(oid), "x": xx + x0, "y": yy + y0, "psf_flux": f, "psf_flux_err": fe,
                     "psf_chi2": chi2, "masked_fraction": mfrac, "flag_edge": bool(edge),
                     "flag_psf_flux": not np.isfinite(f)})
    cols = ["dia_object_id", "x", "y", "psf_flux", "psf_flux_err", "psf_chi2", "masked_fraction", "flag_edge",
            "flag_psf_flux"]
    df = pd.DataFrame(rows, columns=cols)
    df["dia_object_id"] = df["dia_object_id"].astype(np.int64)
    for c in ("x", "y", "psf_flux", "psf_flux_err", "psf_chi2", "masked_fraction"):
        df[c] = df[c].astype(np.float64)
    for c in ("flag_edge", "flag_psf_flux"):
        df[c] = df[c].astype(bool)
    _calibrate_and_locate(df, exp, ["psf_flux"], "psf_flux_err")
    return df


# ============================================================================ synthetic data
def _render_star(img, x, y, flux, sigma_fn, beta, half):
    ny, nx = img.shape
    ix, iy = int(round(x)), int(round(y))
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    if x1 <= x0 or y1 <= y0:
        return
    o = 3
    sub = (np.arange(o) + 0.5) / o - 0.5
    gx = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel() - x
    gy = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel() - y
    sx, sy, rho = sigma_fn(x, y)
    X, Y = np.meshgrid(gx, gy)
    q = (X / sx) ** 2 + (Y / sy) ** 2 - 2 * rho * X * Y / (sx * sy)
    q /= 1 - rho**2
    if beta is None:
        prof = np.exp(-0.5 * q) / (2 * np.pi * sx * sy * math.sqrt(1 - rho**2))
    else:
        # Moffat with the same second moments scale: alpha chosen so FWHM matches the Gaussian.
        a2 = 1.0 / (2 ** (1 / beta) - 1) * (2.3548**2 / 4)
        prof = (beta - 1) / (np.pi * a2 * sx * sy * math.sqrt(1 - rho**2)) * (1 + q / a2) ** (-beta)
    prof = prof.reshape(y1 - y0, o, x1 - x0, o).mean(axis=(1, 3))
    img[y0:y1, x0:x1] += flux * prof


def simulate_pair(shape=(512, 512), *, n_stars=300, seeing_science=(2.2, 2.2), seeing_template=1.6, ellip_science=0.0,
                  moffat_beta=None, sky=200.0, template_depth=4.0, flux_scale=1.0, n_transients=0,
                  transient_flux=(3000.0, 20000.0), variable_delta=None, seed=1, star_flux=(500.0, 2e5),
                  background_offset=0.0, noise_seed=None, wcs=None):
    """A synthetic science/template pair on the same pixel grid (tests and benchmarks).

    Parameters
    ----------
    shape : (int, int)
    n_stars : int
        Static stars (log-uniform fluxes in ``star_flux``, counts of the science image).
    seeing_science : (float, float), pixels
        Gaussian-equivalent PSF sigma of the science image at x = 0 and x = nx (linear
        variation across the detector).
    seeing_template : float, pixels
        Template PSF sigma (constant).
    ellip_science : float
        Correlation coefficient of the science PSF (elliptical Gaussian/Moffat).
    moffat_beta : float or None
        Moffat profiles with this beta instead of Gaussians.
    sky : float, counts
        Sky level of the science image (Poisson noise; the sky itself is subtracted).
    template_depth : float
        The template noise variance is the science one divided by this (a deep coadd).
    flux_scale : float
        Template counts = science counts * flux_scale.
    n_transients : int
        Point sources present only in the science image.
    transient_flux : (float, float), counts
    variable_delta : float or None, counts
        If given, star 0 is made a variable with this flux change in the science image.
    seed : int
    background_offset : float, counts
        Constant added to the science image (differential background).
    noise_seed : int, optional
        Seed of the noise only (same scene, new noise: several epochs); default ``seed``.
    wcs : astropy.wcs.WCS, optional
        Attached to both exposures.

    Returns
    -------
    science, template : procsky.exposure.Exposure
    truth : dict
        ``stars`` (x, y, flux), ``transients`` (x, y, flux), ``noise`` per image.
    """
    from procsky.exposure import Exposure
    from procsky.psf import ImagePsf, PolynomialImagePsf

    rng = np.random.default_rng(seed)
    ny, nx = shape
    margin = 10
    xs = rng.uniform(margin, nx - margin, n_stars)
    ys = rng.uniform(margin, ny - margin, n_stars)
    fl = np.exp(rng.uniform(np.log(star_flux[0]), np.log(star_flux[1]), n_stars))
    tx = rng.uniform(40, nx - 40, n_transients)
    ty = rng.uniform(40, ny - 40, n_transients)
    tf = rng.uniform(transient_flux[0], transient_flux[1], n_transients)

    def sig_sci(x, y):
        s = seeing_science[0] + (seeing_science[1] - seeing_science[0]) * x / max(nx - 1, 1)
        return s, s, ellip_science

    def sig_tpl(x, y):
        return seeing_template, seeing_template, 0.0

    half = int(math.ceil(8 * max(max(seeing_science), seeing_template))) + (20 if moffat_beta else 0)
    sci = np.zeros(shape)
    tpl = np.zeros(shape)
    for i in range(n_stars):
        f = fl[i]
        fs = f + (variable_delta if (variable_delta is not None and i == 0) else 0.0)
        _render_star(sci, xs[i], ys[i], fs, sig_sci, moffat_beta, half)
        _render_star(tpl, xs[i], ys[i], f * flux_scale, sig_tpl, moffat_beta, half)
    for i in range(n_transients):
        _render_star(sci, tx[i], ty[i], tf[i], sig_sci, moffat_beta, half)
    read = 5.0
    s_var = sky + read**2 + np.maximum(sci, 0)
    t_var = (sky + read**2 + np.maximum(tpl / flux_scale, 0)) / template_depth * flux_scale**2
    rng_s = np.random.default_rng([seed, 0 if noise_seed is None else noise_seed + 1])
    rng_t = np.random.default_rng([seed, 2**31])  # the template's noise is the same for every epoch
    sci_n = sci + rng_s.normal(size=shape) * np.sqrt(s_var) + background_offset
    tpl_n = tpl + rng_t.normal(size=shape) * np.sqrt(t_var)

    def psf_model(sfn, x, y):
        k = np.zeros((41, 41))
        _render_star(k, 20 + (x - round(x)) * 0, 20, 1.0, lambda *_: sfn(x, y), moffat_beta, 20)
        return k

    if seeing_science[0] == seeing_science[1]:
        s_psf = ImagePsf(psf_model(sig_sci, 0, 0))
    else:
        # Linear-in-x PSF: PolynomialImagePsf of order 1 from the kernels at both edges.
        k0 = psf_model(sig_sci, 0, ny / 2)
        k1 = psf_model(sig_sci, nx - 1, ny / 2)
        coeffs = np.array([(k0 + k1) / 2, (k1 - k0) / 2, np.zeros_like(k0)])
        s_psf = PolynomialImagePsf(coeffs, 1, (nx - 1) / 2, (ny - 1) / 2, (nx - 1) / 2, (ny - 1) / 2)
    t_psf = ImagePsf(psf_model(sig_tpl, 0, 0))
    science = Exposure(sci_n.astype(np.float32), s_var.astype(np.float32), psf=s_psf, wcs=wcs)
    template = Exposure(tpl_n.astype(np.float32), t_var.astype(np.float32), psf=t_psf, wcs=wcs)
    truth = {
        "stars": {"x": xs, "y": ys, "flux": fl},
        "transients": {"x": tx, "y": ty, "flux": tf},
        "science_sigma": sig_sci,
    }
    return science, template, truth
