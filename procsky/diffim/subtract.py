"""Alard-Lupton PSF matching and subtraction of a science/template pair on one pixel grid."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import pydantic

from procsky import _dask
from procsky import masks as _masks
from procsky import psf as _psf
from procsky.errors import AlgorithmError, NoWorkError, ProcskyValueError
from procsky.kernels import convolve as _conv
from procsky.kernels import psfmatch as _pm

from .lazy import deferred, deferred_exposure, deferred_part

__all__ = [
    "SubtractionConfig",
    "subtract_images",
    "convolve_exposure_arrays",
    "psf_sigma_at",
    "half_maximum_sigma",
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
        Stamp rejection threshold. When the kernel-star candidates are fewer than twice the
        stamps the configured basis needs (12 for the default), too few for that median-based
        rejection, those whose flux ratio (a 1.5 FWHM aperture) departs from the others' median
        by more than 5 scaled sigmas are left out before the fit (a variable or transient:
        ``_flux_ratio_outliers``; noted in ``kernel_fit_attempts``).
    constant_sum : bool
        Keep the photometric scaling constant over the detector.
    decorrelate : bool
        Apply the noise decorrelation afterburner.
    chunk : int, pixels
        Dask chunk size for the convolution.
    kernel_mask_planes : tuple of str
        Mask planes (of either image) whose pixels are left out of the kernel fit, as
        unusable pixels are: stamp pixels whose kernel footprint holds one get no weight
        and stars with one in their core are not kernel stars. For what the pipeline's
        masks do not know (a galaxy, a known variable, a ghost). A boolean array can be
        given to :func:`subtract_images` (``kernel_mask=``) as well.
    degrade : bool
        When the stamps are too few for the configured fit (:func:`procsky.kernels.psfmatch.
        required_stamps`), refit with smaller bases (:func:`procsky.kernels.psfmatch.
        reduced_bases`), spatial order 0 and ridge-damped shape coefficients, then with
        kernel stars down to ``min_snr / 2`` (not below 10); recorded in the summary
        (``kernel_fit_level``, ``kernel_fit_attempts``) and with ``note_degraded``.
    params_per_stamp : float
        Minimum-stamps rule: one usable stamp per this many free parameters, and never
        fewer than 3 (:func:`procsky.kernels.psfmatch.required_stamps`). Applies to the
        degraded fits and to the choice of the spatial order; with the configured basis,
        the per-order minimum of :func:`procsky.kernels.psfmatch.fit_matching_kernel` (so
        normal fields fit exactly as before).
    shape_ridge : float
        Ridge damping of the kernel-shape coefficients in degraded fits (relative to each
        coefficient's own information; zero-sum functions, so the kernel sum is unbiased).
    kernel_sum_warn, kernel_sum_fail : float or None
        Kernel-sum sanity check: the fitted kernel sum is compared with the ratio of the
        photometric calibrations (when both exposures carry one) or else with the stars' flux
        ratio measured on the PSF-matched pair (``_matched_star_ratio``: every star at S/N >= 10,
        no PSF model in the cores; ``kernel_sum_matched_*`` in the summary). A
        fractional disagreement beyond ``max(kernel_sum_warn, 3 sigma of the reference)``
        is a warning note (2%: twice the 1% accuracy a kernel sum should reach, and above
        the ~1% PSF-model flux systematics between two images); beyond
        ``kernel_sum_fail`` (20%: every static star would leave a fifth of its flux in the
        difference) an AlgorithmError. ``None`` disables the respective test.
    kernel_sum_rescale : float or None
        A least-squares kernel fit conserves flux only when the kernel can match the two
        PSFs exactly; when it cannot (an undersampled image resampled by the template warp,
        whose stars' profiles depend on their pixel phase; two space PSFs whose aberrations
        differ in the wings), the fitted scaling is the projection of one star profile on
        the other and falls short of the flux ratio (2.6 % on the ``undersampled`` regime).
        When the kernel sum differs from the photometric calibrations' ratio by more than
        this fraction and 3 sigma of the ratio, the kernel is rescaled to it; without both
        calibrations, the fitted sum and the stars' matched flux ratio are combined by their
        errors (or the ratio alone when they disagree beyond 3 sigma), and the kernel is
        rescaled when that moves its sum by more than this fraction (the photometric scaling
        taken from photometry, as ZOGY's ``F_r / F_n``, Zackay, Ofek & Gal-Yam 2016): static
        stars then leave no net flux. Recorded as ``kernel_sum_fitted``,
        ``kernel_sum_stamps_err``, ``kernel_sum_rescale`` and ``kernel_sum_rescale_how`` and
        noted (``diffim_kernel_sum_rescaled``; ``diffim_kernel_core_mismatch`` when the
        stars' core ratio disagrees with their box ratio). ``None`` keeps the fitted sum.
    stamp_weights : {"auto", "variance", "sky"}
        Weights of the kernel-stamp pixels: ``variance``, the pair's variance planes (the
        stars' own photon noise included: optimal when the kernel can match the two PSFs,
        as Alard & Lupton 1998 and HOTPANTS weight); ``sky``, one weight, the sky variance
        (SFFT's unweighted fit, Hu et al. 2022): when the kernel cannot match them (an
        undersampled PSF whose stars' profiles depend on their pixel phase, one of them
        resampled by the template warp), variance weights give up the stars' cores, where
        the mismatch is, and bright static stars keep a core residual of a few % (8 sigma
        at S/N > 100 on the ``undersampled`` regime against 4 with sky weights).
        ``auto``: ``sky`` when both PSFs' FWHM at half maximum are below ``UNDERSAMPLED_FWHM``
        (2.75 px; the ``undersampled`` and ``space`` regimes), else ``variance`` (on well-sampled
        pairs, sky weights leave the ``correlated`` regime's kernel sum 1.9 % off rather than
        0.3 %). Recorded as ``stamp_weights``.
    model_error : {"auto", "on", "off"}
        Add the kernel's model error at static stars to the difference's variance,
        ``(e S)^2`` per pixel with ``S`` the science image and ``e`` measured at isolated stars
        of S/N >= 20 so that their PSF-weighted pulls have unit mean square
        (:func:`kernel_model_error`; ``kernel_model_error``, ``kernel_model_error_applied`` in
        the summary, noted beyond 0.5 %); ``e`` is 0 when the pulls are consistent with the
        noise. ``auto``: on for the undersampled pairs that get sky weights (above), whose
        warped template's cores depend on their pixel phase in a way no kernel matches (the
        ``undersampled`` regime: ``e`` 6.5 %, PSF-weighted z std at static stars 1.40 -> 1.02);
        off for well-sampled pairs, where a per-pixel term cannot carry a coherent shape
        residual: it overstated the pixel noise of the small simulation's stamps (robust
        pixel z 0.82 at two of seven visits, where the kernel leaves PSF-weighted pulls of
        mean square ~2-4 at bright stars).
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
    kernel_mask_planes: tuple[str, ...] = ()
    degrade: bool = True
    params_per_stamp: float = pydantic.Field(10.0, gt=0)
    shape_ridge: float = pydantic.Field(1e-3, ge=0)
    kernel_sum_warn: float | None = pydantic.Field(0.02, gt=0)
    kernel_sum_fail: float | None = pydantic.Field(0.2, gt=0)
    kernel_sum_rescale: float | None = pydantic.Field(0.005, gt=0)
    stamp_weights: Literal["auto", "variance", "sky"] = "auto"
    model_error: Literal["auto", "on", "off"] = "auto"


#: PSF FWHM at half maximum (pixels) below which a pair is undersampled for the kernel fit's stamp weights
#: (``SubtractionConfig.stamp_weights="auto"``): 2.5 px and the pixel-count granularity of
#: :func:`half_maximum_sigma` at that size (a 2.25 px space PSF counts 2.52 px).
UNDERSAMPLED_FWHM = 2.75

#: A PSF whose moment size exceeds its half-maximum size by more than this factor is sized by
#: the latter (:func:`psf_sigma_at`, through :func:`procsky.psf.matching_fwhm`).
MOMENT_SIZE_CAP = _psf.MOMENT_SIZE_CAP


def psf_sigma_at(psf, x, y, *, what: str = "PSF") -> float:
    """Gaussian-equivalent sigma (pixels) of a PSF model at (x, y), for PSF matching.

    The size from the unweighted second moments (``moment_fwhm``), at most
    ``MOMENT_SIZE_CAP`` (1.25) times the half-maximum size (``fwhm``). A ground PSF's
    wings are part of what the matching kernel must match, and the kernel basis, stamps
    and detection widths were built on that size (its moment FWHM is ~5-10 % above its
    half maximum); a PSF whose moments its wings or spikes dominate (a space PSF: a moment
    FWHM several times the core's) is sized by its core instead, as the issue-19 JWST-like
    case needs. A PSF whose moments are not positive definite (a difference image's PSF,
    convolved with a matching kernel with negative lobes; a PSF with large negative wings
    or nearly one-dimensional) has no moment size: the half-maximum size is used and the
    fallback is noted (``note_degraded``, code ``psf_size_fallback``).
    """
    sigma, ok = _psf_sigma_checked(psf, x, y)
    if not ok:
        from procsky.notes import note_degraded

        note_degraded(
            "psf_size_fallback",
            f"{what} second moments at ({x:.0f}, {y:.0f}) are not positive definite (a PSF with negative lobes "
            f"or nearly one-dimensional): its size is taken at half maximum, sigma {sigma:.3f} px",
            severity="warning",
            sigma=sigma,
        )
    return sigma


def half_maximum_sigma(kernel) -> float:
    """Gaussian-equivalent sigma (pixels) from the area at half maximum of a kernel image:
    ``FWHM = 2 sqrt(A / pi)`` with ``A`` the number of pixels at or above half the peak
    (at least one), ``sigma = FWHM / 2.3548``. Defined for any kernel with a positive
    peak, whatever its wings (negative lobes, spikes) do to its moments."""
    k = np.asarray(kernel, dtype=np.float64)
    peak = float(np.nanmax(k)) if k.size else 0.0
    if not (np.isfinite(peak) and peak > 0):
        return float("nan")
    area = max(float(np.count_nonzero(k >= 0.5 * peak)), 1.0)
    return 2.0 * math.sqrt(area / math.pi) / 2.3548200450309493


def _psf_sigma_checked(psf, x, y) -> tuple[float, bool]:
    """``(sigma, ok)``: :func:`psf_sigma_at` without the note. The size is
    :func:`procsky.psf.matching_fwhm` (the one the coadd's matching target uses too);
    ``ok`` is False when the moments gave no size (its half-maximum fallback)."""
    try:
        fwhm = float(_psf.matching_fwhm(psf, x, y))
    except (ValueError, ArithmeticError):  # ProcskyValueError is a ValueError
        fwhm = float("nan")
    if not (np.isfinite(fwhm) and fwhm > 0):
        fwhm = _psf.SIGMA_TO_FWHM * half_maximum_sigma(psf.kernel(x, y))
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ProcskyValueError(f"the PSF at ({x}, {y}) has no positive peak: it has no size")
    try:
        ixx, iyy, ixy = (float(v) for v in psf.moments(x, y))
        # both positive: negative wings all round have det > 0 too
        ok = bool(ixx > 0 and iyy > 0 and ixx * iyy - ixy * ixy > 0)
    except (ValueError, ArithmeticError):
        ok = False
    return fwhm / _psf.SIGMA_TO_FWHM, ok


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
    conv_img, conv_var, conv_mask, h, r = _convolution_block_functions(kernel, xy0, spread_bits, core_bits)
    img = _dask.map_with_margin_at(conv_img, [image], depth=h, dtype=np.float32, chunk=chunk)
    var = _dask.map_with_margin_at(conv_var, [variance], depth=h, dtype=np.float32, chunk=chunk)
    msk = _dask.map_with_margin_at(conv_mask, [mask], depth=r, dtype=np.uint32, chunk=chunk) if r > 0 else mask
    return img, var, msk


def _convolve_exposure_now(image, variance, mask, kernel, *, xy0, spread_bits, core_bits, chunk):
    """:func:`convolve_exposure_arrays` on numpy planes, computed at once (numpy results,
    the same per-chunk functions and chunks: identical values)."""
    conv_img, conv_var, conv_mask, h, r = _convolution_block_functions(kernel, xy0, spread_bits, core_bits)
    img = _map_margin_now(conv_img, image, h, np.float32, chunk)
    var = _map_margin_now(conv_var, variance, h, np.float32, chunk)
    msk = _map_margin_now(conv_mask, mask, r, np.uint32, chunk) if r > 0 else np.asarray(mask)
    return img, var, msk


def _convolution_block_functions(kernel: _pm.MatchingKernel, xy0, spread_bits, core_bits):
    """The per-block functions ``f(block, y0, x0)`` of :func:`convolve_exposure_arrays` (image,
    variance, mask) and their margins ``h`` (image, variance) and ``r`` (mask)."""
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

    return conv_img, conv_var, conv_mask, h, r


def _map_margin_now(func, arr, depth: int, dtype, chunk: int) -> np.ndarray:
    """``func(padded_block, y0=, x0=)`` per chunk of a numpy array, computed at once (numpy
    result): :func:`procsky._dask.map_with_margin_at` on the configured scheduler when the
    array has several chunks (which it may run in parallel); for a single chunk, the function
    called directly on the zero-padded array (the same block, so the same values), without a
    graph to build and tokenize."""
    a = np.asarray(arr)
    ny, nx = a.shape
    d = int(depth)
    ys, xs = _dask.axis_chunks(ny, chunk, d), _dask.axis_chunks(nx, chunk, d)
    if len(ys) * len(xs) > 1:
        lazy = _dask.map_with_margin_at(func, [a], depth=d, dtype=dtype, chunk=chunk)
        return np.asarray(_dask.evaluate(lazy)[0], dtype=dtype)
    pad = np.pad(a, d) if d > 0 else a
    out = np.empty((ny, nx), dtype)
    y = 0
    for cy in ys:
        x = 0
        for cx in xs:
            blk = np.ascontiguousarray(pad[y : y + cy + 2 * d, x : x + cx + 2 * d])
            out[y : y + cy, x : x + cx] = func(blk, y0=y, x0=x).astype(dtype)
            x += cx
        y += cy
    return out


def _convolve_plain(arr, kernel2d, chunk, dtype=np.float32):
    h = kernel2d.shape[0] // 2

    def f(b, y0, x0):
        return _conv.convolve_valid(b, kernel2d)

    return _map_margin_now(f, arr, h, dtype, chunk)


#: Systematic error of a static star's aperture flux ratio in :func:`_flux_ratio_outliers`
#: (fraction): the light a 1.5 FWHM aperture misses differs between the two PSFs, and with
#: the PSF across the detector, by 1-2 % (the brightest static stars of the ``small`` recipe's
#: coadd-template pairs: 1.4 and 2.3 %, 7 sigma of their noise). With the 5 sigma clip, a
#: bright star is left out for a flux change beyond ~10 %.
_FLUX_CHANGE_SYS = 0.02


def _flux_ratio_outliers(conv_img, conv_var, tgt_img, tgt_var, bad, xs, ys, fwhm, clip=5.0):
    """Candidate kernel stars whose flux changed between the images (a variable, a
    transient on its host, an unflagged cosmic ray on the star): a bool array, True for them.

    Each star's ratio target / convolved is measured in a circular aperture of radius 1.5
    ``fwhm`` (the broader PSF's: 99 % of a Gaussian star's light in both images, so no
    kernel is needed; a PSF's wings beyond it shift every star's ratio alike), less each
    image's median in an annulus from 2 to 6 px beyond it, over the pixels usable in both;
    its error from the variance planes and ``_FLUX_CHANGE_SYS`` of the ratio (the
    aperture's systematics). Stars beyond ``clip`` scaled sigmas of the median
    of the ratios (:func:`_ratio_outliers`, unweighted: one vote per star; the scale grows
    with the stars' scatter) are flagged. The kernel fit's own stamp rejection (chi^2 and
    single-stamp kernel sums against their median) needs several clean stamps to single
    one out; with three, a transient among them bends the kernel's shape and sum (the
    ``stamp256`` regime: a kernel sum 26 % high, and a core shape that biased the stars'
    matched flux ratio by -4 %). As HOTPANTS and the LSST pipeline reject kernel
    candidates that do not subtract cleanly, here before the fit, by photometry alone.
    A star without a usable measurement is kept."""
    n = len(xs)
    out = np.zeros(n, bool)
    if n < 3:
        return out
    r_ap = 1.5 * float(fwhm)
    r_out = int(math.ceil(r_ap + 6.0))
    rr = np.arange(-r_out, r_out + 1)
    d2 = rr[:, None] ** 2 + rr[None, :] ** 2
    inner = d2 <= r_ap**2
    ring = (d2 > (r_ap + 2.0) ** 2) & (d2 <= (r_ap + 6.0) ** 2)
    ny, nx = tgt_img.shape
    rows, idx = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        ix, iy = int(round(x)), int(round(y))
        if not (r_out <= ix < nx - r_out and r_out <= iy < ny - r_out):
            continue
        sl = (slice(iy - r_out, iy + r_out + 1), slice(ix - r_out, ix + r_out + 1))
        use = ~bad[sl]
        sky_px, in_px = use & ring, use & inner
        if sky_px.sum() < 0.5 * ring.sum() or in_px.sum() < 0.9 * inner.sum():
            continue
        m, k = float(in_px.sum()), float(sky_px.sum())
        row = []
        for img, var in ((tgt_img, tgt_var), (conv_img, conv_var)):
            im = np.asarray(img[sl], np.float64)
            vr = np.asarray(var[sl], np.float64)
            # the annulus median (a neighbour's light in it, unlike the star's, does not
            # scale between two seeings); its variance pi/2 that of a mean
            sky_var = 0.5 * math.pi * float(vr[sky_px].sum()) / k**2
            row.append(float(im[in_px].sum()) - m * float(np.median(im[sky_px])))
            row.append(float(vr[in_px].sum()) + m * m * sky_var)
        if row[2] > 0 and row[3] > 0:
            rows.append(row)
            idx.append(i)
    if len(idx) < 3:
        return out
    a = np.asarray(rows)
    # the systematic floor as a target variance: (sys * ratio)^2 on the ratio's error
    va = a[:, 1] + (_FLUX_CHANGE_SYS * a[:, 0]) ** 2
    keep = _ratio_outliers(a[:, 0], va, a[:, 2], a[:, 3], clip, weighted=False)[0]
    out[np.asarray(idx)[~keep]] = True
    return out


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


# A measured pixel-noise / variance-plane ratio is applied to an input's plane only beyond
# this (and beyond 5 sigma of its measurement): faint sources left in the "source-free"
# pixels widen the noise by ~1%.
_PLANE_RATIO_TOL = 0.03
# The difference's variance plane is rescaled when the measured noise differs by more than
# this fraction; a difference beyond _RESCALE_NOTE is noted.
_RESCALE_TOL = 0.02
_RESCALE_NOTE = 0.1
#: kernel model error (fraction of the static image, ``kernel_model_error``) above which it is noted
_MODEL_ERROR_NOTE = 0.005


def _input_noise(s_img, s_var, s_mask, s_bad, sig_s, t_img, t_var, t_mask, t_bad, sig_t, planes):
    """Source-free pixels of a pair and the measured noise of each image there.

    Unusable pixels (``_NOT_USABLE``), DETECTED ones and those within a grown source
    footprint of either image (:func:`procsky.kernels.psfmatch.source_free_mask`) are left
    out; each image's noise is then measured against its variance plane
    (:func:`procsky.kernels.psfmatch.noise_statistics`: plane ratio, correlation and whether
    it is significant). Informational planes covering whole images (a coadd's) do not
    empty the selection."""
    hard = s_bad | t_bad
    free = _pm.source_free_mask(s_img, s_var, hard, sig_s) & _pm.source_free_mask(t_img, t_var, hard, sig_t)
    det = np.uint32(_masks.bits(*[n for n in ("DETECTED", "DETECTED_NEGATIVE") if n in planes], planes=planes))
    free &= ((s_mask & det) == 0) & ((t_mask & det) == 0)
    return free, _pm.noise_statistics(s_img, s_var, free), _pm.noise_statistics(t_img, t_var, free)


def _plane_factor(ns) -> float:
    """The factor an input's variance plane is multiplied by: its measured noise ratio when
    that differs from 1 beyond ``_PLANE_RATIO_TOL`` and 5 sigma of the measurement (e.g. a
    resampled image whose plane is the pre-resampling one, as LSST's warps carry), else 1."""
    r, err = float(ns["variance_ratio"]), float(ns["variance_ratio_err"])
    if not (np.isfinite(r) and r > 0):
        return 1.0
    return r if abs(r - 1.0) > max(_PLANE_RATIO_TOL, 5.0 * err) else 1.0


def _check_variance(summary, diff, dvar, dmask, bad_bits, free, psf_sigma):
    """Measure the difference's noise against its variance plane on source-free pixels and
    rescale the plane to it (in place in ``summary``; returns the plane).

    Source-free: the pair's source-free pixels (:func:`_input_noise`) outside the footprints
    of the difference's own sources (transients, residuals, dipoles: both signs). The robust
    spread ``1.4826 MAD`` of ``z = diff / sqrt(var)`` there is the measured ratio
    (``residual_std_sigma``; its median ``residual_median_sigma``). The plane is multiplied
    by its square (``variance_rescale``) when it differs from 1 by more than 2% and lies
    within 0.5-2 (beyond that the plane is kept and ``detector.note_subtraction`` notes it);
    a factor more than 10% from 1 is noted (``variance_rescaled``). With fewer than 1000
    source-free pixels, all usable pixels are used (``noise_check_pixels`` says which)."""
    from procsky.notes import note_degraded

    good = ((dmask & np.uint32(bad_bits)) == 0) & np.isfinite(diff) & (dvar > 0)
    summary["variance_rescale"] = 1.0
    if not good.any():
        summary["residual_median_sigma"] = summary["residual_std_sigma"] = float("nan")
        summary["noise_check_pixels"] = "none"
        return dvar
    sel = free & good & _pm.source_free_mask(diff, np.where(good, dvar, 0.0), ~good, psf_sigma)
    summary["noise_check_pixels"] = "source_free"
    if sel.sum() < 1000:
        sel = good
        summary["noise_check_pixels"] = "all"
    z = diff[sel] / np.sqrt(dvar[sel])
    med = float(np.median(z))
    ratio = float(1.4826 * np.median(np.abs(z - med)))
    summary["residual_median_sigma"] = med
    summary["residual_std_sigma"] = ratio
    summary["noise_check_n_pixels"] = int(sel.sum())
    if np.isfinite(ratio) and 0.5 < ratio < 2.0 and abs(ratio - 1.0) > _RESCALE_TOL:
        dvar = (dvar * np.float32(ratio**2)).astype(np.float32)
        summary["variance_rescale"] = float(ratio**2)
        if abs(ratio - 1.0) > _RESCALE_NOTE:
            note_degraded(
                "variance_rescaled",
                f"the difference's noise on source-free pixels is {ratio:.2f} x what its variance plane "
                f"predicted: the plane was rescaled by {ratio**2:.2f}",
                severity="warning" if abs(ratio - 1.0) > 0.25 else "info",
                residual_std_sigma=ratio,
                variance_rescale=ratio**2,
            )
    return dvar


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
    if isinstance(psf, PolynomialImagePsf) and getattr(psf, "oversample", 1) == 1:
        coeffs = np.array([fftconvolve(np.pad(c, he), extra, mode="same") for c in psf.coeffs])
        return PolynomialImagePsf(coeffs, psf.order, psf.x0, psf.y0, psf.scale_x, psf.scale_y)
    # A super-sampled model (its coefficient images are not pixel kernels) or any other:
    # the kernel at the centre.
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


def kernel_model_error(diff, variance, static, psf_kernel, xs, ys, *, bad=None, clip=4.0, min_stars=5):
    """The PSF-matching kernel's model error at static stars, as a variance term ``c S^2``.

    Where the kernel cannot match the two PSFs (an undersampled template whose stars'
    profiles depend on their pixel phase after the warp; two space PSFs whose aberrations a
    smooth kernel cannot map onto each other), a static star of flux ``F`` leaves a residual
    of a few 0.1 % of ``F`` in its core: far below the photon noise of faint stars, many
    sigma at bright ones. The variance plane, right on source-free pixels, then understates
    the difference's noise at stars. As ZOGY's source-noise and astrometric terms (Zackay,
    Ofek & Gal-Yam 2016, ApJ 830, 27, section 3.3) and HOTPANTS' kernel-error term, this
    error is carried in the variance: ``V' = V + c S^2`` per pixel (``S`` the static image,
    the science image, in the difference's units), with ``c`` the one value for which the
    PSF-weighted pulls ``z = sum(P D) / sqrt(sum(P^2 V'))`` at the given stars have a mean
    square of 1 (``sum(P^2 S^2)`` sets each star's share), and zero when their mean square
    before the term is within 3 sigma of 1 (``1 + 3 sqrt(2 / n)``). Stars whose pull stays
    beyond ``clip`` (a variable, a transient, a missed cosmic ray) are left out, iterated.

    Parameters
    ----------
    diff, variance : ndarray (ny, nx)
        Difference image and its variance (already right on source-free pixels).
    static : ndarray (ny, nx)
        The static sky in the difference's units.
    psf_kernel : ndarray (m, m), m odd
        The difference's PSF (normalised here); its size sets the stamps.
    xs, ys : arrays, array pixels
        Star positions (isolated, unsaturated stars over the frame).
    bad : ndarray (ny, nx) bool, optional
        Stamps holding one of these pixels are left out.
    clip : float
        Outlier threshold on the corrected pulls.
    min_stars : int
        Fewer usable stars give ``c = 0``.

    Returns
    -------
    dict
        ``kernel_model_error`` (``sqrt(c)``, a fraction of the static pixel value),
        ``kernel_model_error_n_stars`` and ``kernel_model_error_z2`` (the stars' mean
        square pull before the term).
    """
    p = np.asarray(psf_kernel, dtype=np.float64)
    p = p / p.sum()
    half = p.shape[0] // 2
    p2 = p * p
    diff = np.asarray(diff)
    variance = np.asarray(variance)
    static = np.asarray(static)
    ny, nx = diff.shape
    num, var0, xx = [], [], []
    for x, y in zip(np.asarray(xs, float), np.asarray(ys, float)):
        ix, iy = int(round(x)), int(round(y))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        sl = np.s_[iy - half : iy + half + 1, ix - half : ix + half + 1]
        d = diff[sl].astype(np.float64)
        v = variance[sl].astype(np.float64)
        s = np.maximum(static[sl].astype(np.float64), 0.0)
        if (bad is not None and bad[sl].any()) or not (np.isfinite(d).all() and np.isfinite(s).all() and (v > 0).all()):
            continue
        num.append(float((p * d).sum()) ** 2)
        var0.append(float((p2 * v).sum()))
        xx.append(float((p2 * s * s).sum()))
    a, b, q = np.asarray(num), np.asarray(var0), np.asarray(xx)
    out = {"kernel_model_error": 0.0, "kernel_model_error_n_stars": int(a.size), "kernel_model_error_z2": float("nan")}
    if a.size < min_stars:
        return out
    keep = a / b <= clip * clip * 4.0  # first pass: pulls beyond 2 clip are not the kernel's error
    c = 0.0
    for _ in range(5):
        ak, bk, qk = a[keep], b[keep], q[keep]
        if ak.size < min_stars:
            break
        if np.mean(ak / bk) <= 1.0 + 3.0 * math.sqrt(2.0 / ak.size):
            c = 0.0  # mean square pull within 3 sigma of chi^2(1)'s: no error measured
        else:
            lo, hi = 0.0, float(np.mean(ak / np.maximum(qk, 1e-300)))
            for _ in range(60):  # mean(a / (b + c q)) decreases with c: bisection for 1
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if np.mean(ak / (bk + mid * qk)) > 1.0 else (lo, mid)
            c = 0.5 * (lo + hi)
        new = a / (b + c * q) <= clip * clip
        if np.array_equal(new, keep):
            break
        keep = new
    out["kernel_model_error"] = float(math.sqrt(c))
    out["kernel_model_error_n_stars"] = int(keep.sum())
    out["kernel_model_error_z2"] = float(np.mean(a[keep] / b[keep])) if keep.any() else float("nan")
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


def _user_kernel_mask(cfg: SubtractionConfig, kernel_mask, s_mask, t_mask, planes, shape) -> np.ndarray:
    """Pixels the user leaves out of the kernel fit: ``cfg.kernel_mask_planes`` of either
    image, OR the boolean array ``kernel_mask`` (True = leave out)."""
    out = np.zeros(shape, bool)
    names = tuple(cfg.kernel_mask_planes)
    if names:
        unknown = [n for n in names if n not in planes]
        if unknown:
            raise ProcskyValueError(
                f"kernel_mask_planes {unknown} are not mask planes of the science image (it has {sorted(planes)})"
            )
        out |= _bad(s_mask, planes, names)[0] | _bad(t_mask, planes, names)[0]
    if kernel_mask is not None:
        km = np.asarray(kernel_mask)
        if km.shape != tuple(shape):
            raise ProcskyValueError(f"kernel_mask shape {km.shape} differs from the image shape {tuple(shape)}")
        if km.dtype != bool:
            raise ProcskyValueError(f"kernel_mask must be a boolean array (True = left out), got dtype {km.dtype}")
        out |= km
    return out


def _fit_kernel(
    cfg: SubtractionConfig,
    conv_img,
    conv_var,
    tgt_img,
    tgt_var,
    hard,
    soft,
    sig_sharp,
    sig_broad,
    stamp_half,
    det_shape,
    xy0,
    stars,
    sky_weights=False,
) -> dict:
    """Select kernel stars, build stamps and fit the matching kernel, degrading gracefully.

    The configured fit is tried first. When its stamps are fewer than the free-parameter
    rule asks (:func:`procsky.kernels.psfmatch.required_stamps`, one stamp per
    ``params_per_stamp`` parameters, at least 3), smaller bases follow
    (:func:`procsky.kernels.psfmatch.reduced_bases`: a smaller basis also has a smaller
    kernel half-width, so more stars are far enough from the edges) at spatial order 0
    with ridge-damped shape coefficients, and finally the smallest basis with kernel stars
    down to half the S/N threshold (not below 10). Each attempt is recorded; a degraded
    fit is noted (``note_degraded``), and when none fits, the AlgorithmError lists them.
    ``sky_weights``: the stamp pixels weighted by the sky variance alone
    (``SubtractionConfig.stamp_weights``).
    """
    from procsky.notes import note_degraded

    fwhm = 2.3548 * sig_broad
    core = int(math.ceil(1.5 * fwhm))
    ladder = _pm.reduced_bases(cfg.degrees, cfg.scales) if cfg.degrade else [(tuple(cfg.degrees), tuple(cfg.scales))]
    plan = [(d, sc, float(cfg.min_snr), False) for d, sc in ladder]
    low_snr = max(0.5 * float(cfg.min_snr), 10.0)
    if cfg.degrade and stars is None:
        # Then kernel stars down to low_snr, unusable and repaired pixels refused only within
        # the star's core rather than its core plus the kernel margin (build_stamps gives no
        # weight to the stamp pixels whose kernel footprint holds one), each basis again: in a sparse
        # field (a space frame's few bright stars, each with a hot pixel or a cosmic ray
        # somewhere in its box) these are the stars left.
        plan += [(d, sc, min(low_snr, float(cfg.min_snr)), True) for d, sc in ladder]
    # The fit's own stamp rejection (median based: chi^2 and single-stamp kernel sums) singles
    # out a changed star among many stamps; among fewer than twice what the configured basis
    # needs, the candidates are screened by their flux ratio first (_flux_ratio_outliers).
    nb_full = _pm.basis_for_psfs(
        sig_sharp, sig_broad, degrees=cfg.degrees, scales=cfg.scales, half_width=cfg.kernel_half_width
    ).n_basis
    screen_below = 2 * _pm.required_stamps(
        _pm.n_free_parameters(nb_full, 0, cfg.background_order, cfg.constant_sum), cfg.params_per_stamp
    )
    attempts: list[str] = []
    for level, (degrees, scales, min_snr, relaxed) in enumerate(plan):
        degraded = level > 0
        basis = _pm.basis_for_psfs(
            sig_sharp, sig_broad, degrees=degrees, scales=scales, half_width=cfg.kernel_half_width
        )
        h = basis.half_width
        sig_match = float(basis.sigmas[min(1, len(basis.sigmas) - 1)])
        soft_r = int(math.ceil(2.0 * sig_match))
        if stars is None:
            sx, sy = _pm.select_kernel_stars(
                conv_img,
                conv_var,
                hard,
                psf_sigma=sig_sharp,
                stamp_radius=stamp_half + h,
                n_cells=cfg.n_cells,
                per_cell=cfg.per_cell,
                min_snr=min_snr,
                other=tgt_img,
                other_variance=tgt_var,
                other_bad=hard,
                core_radius=core if relaxed else h + core,
                soft_bad=soft,
                soft_core_radius=core if relaxed else soft_r + core,
            )
            # A star whose flux changed is no kernel star: its stamp asks the kernel for
            # another flux ratio (and, on a host galaxy, another shape). Screened among few
            # candidates; kept only by the last attempt, when without it too few stars would
            # be left (noted).
            changed = (
                _flux_ratio_outliers(conv_img, conv_var, tgt_img, tgt_var, hard, sx, sy, fwhm)
                if len(sx) < screen_below
                else np.zeros(len(sx), bool)
            )
            if level + 1 == len(plan) and (~changed).sum() < _pm.MIN_KERNEL_STAMPS and changed.any():
                note_degraded(
                    "diffim_kernel_star_variable",
                    f"{int(changed.sum())} of the {len(sx)} kernel stars changed flux between the images "
                    "(a variable or transient) but are kept: too few stars without them; the kernel's shape "
                    "and sum may be biased",
                    severity="warning",
                    n_changed=int(changed.sum()),
                    n_candidates=len(sx),
                )
                changed[:] = False
            sx, sy = sx[~changed], sy[~changed]
            n_changed = int(changed.sum())
        else:
            sx, sy = (np.asarray(a, dtype=float) for a in stars)
            n_changed = 0
        # Weights: the target's variance plus the (unconvolved) variance of the other image
        # scaled by the flux ratio, estimated from the candidate stars' summed fluxes.
        ratio = _flux_ratio(conv_img, tgt_img, sx, sy, stamp_half)
        wvar = tgt_var + ratio**2 * conv_var
        if sky_weights:
            # One weight for every stamp pixel: the pair's sky variance (the median over the
            # usable pixels), as SFFT's unweighted fit (Hu et al. 2022, ApJ 936, 157).
            wvar = np.full_like(wvar, float(np.median(wvar[~hard])) if (~hard).any() else float(np.median(wvar)))
        stamps = _pm.build_stamps(
            conv_img,
            tgt_img,
            np.where(wvar > 0, wvar, np.inf),
            hard,
            sx,
            sy,
            basis,
            stamp_half,
            cfg.background_order,
            shape=det_shape,
            xy0=xy0,
            soft=soft,
            soft_radius=soft_r,
        )
        n = len(stamps.x)
        n_free = _pm.n_free_parameters(basis.n_basis, 0, cfg.background_order, cfg.constant_sum)
        need = _pm.required_stamps(n_free, cfg.params_per_stamp) if cfg.degrade else _pm.MIN_KERNEL_STAMPS
        what = (
            f"basis degrees {list(degrees)} x {len(degrees)} Gaussians ({basis.n_basis} functions, "
            f"half-width {h} px{', spatial order 0, ridge ' + format(cfg.shape_ridge, 'g') if degraded else ''}), "
            f"kernel stars S/N >= {min_snr:g}{', masked pixels allowed outside the core' if relaxed else ''}: "
            f"{len(sx)} candidates"
            + (f" ({n_changed} more left out: flux ratio changed)" if n_changed else "")
            + f", {n} usable stamps (need {need})"
        )
        if n < need and level + 1 < len(plan):
            attempts.append(what + ": too few")
            continue
        try:
            kern = _pm.fit_matching_kernel(
                stamps,
                basis,
                spatial_order=0 if degraded else cfg.spatial_order,
                background_order=cfg.background_order,
                shape=det_shape,
                clip_sigma=cfg.clip_sigma,
                constant_sum=cfg.constant_sum,
                shape_ridge=cfg.shape_ridge if degraded else 0.0,
                params_per_stamp=cfg.params_per_stamp if degraded else None,
                min_stamps=min(need, n) if level + 1 == len(plan) else need,
            )
        except ValueError as e:
            attempts.append(f"{what}: {e}")
            continue
        attempts.append(what + ": fitted")
        if degraded:
            note_degraded(
                "diffim_kernel_fit_reduced",
                f"PSF-matching kernel fitted with a reduced basis ({basis.n_basis} functions, degrees "
                f"{list(degrees)}, spatial order 0, shape ridge {cfg.shape_ridge:g}) on {n} stamps: the "
                f"configured fit needs more stamps; attempts: " + "; ".join(attempts),
                severity="warning",
                level=level,
                n_stamps=n,
                n_basis=basis.n_basis,
                attempts=attempts,
            )
        return {
            "kernel": kern,
            "basis": basis,
            "sx": sx,
            "sy": sy,
            "ratio": ratio,
            "stamps": stamps,
            "level": level,
            "attempts": attempts,
            "min_snr": min_snr,
        }
    raise AlgorithmError(
        "PSF-matching kernel fit failed: too few usable kernel stamps for any basis. Tried: "
        + "; ".join(attempts)
        + ". Kernel stamps need isolated-enough stars (S/N above the threshold) at least stamp_half + kernel "
        "half-width from the edges and from masked pixels: give kernel star positions (stars=), lower min_snr, "
        "stamp_half or kernel_half_width, or check that the template overlaps the science image"
    )


def _ratio_outliers(a, va, b, vb, clip, weighted=True):
    """The stars of :func:`_robust_ratio` kept (``a / b`` within ``clip`` scaled sigmas of
    the ratios' median, weighted by ``1 / error^2`` or not, iterated) and that median:
    ``(keep, median)``. Unweighted, every star has one vote: the brightest star cannot
    outweigh the others when it is the one that changed."""
    r = a / b
    e = np.sqrt(va + r * r * vb) / np.abs(b)
    keep = np.ones(r.size, bool)
    wmed = float(np.median(r))
    for _ in range(5):
        w = 1.0 / e[keep] ** 2 if weighted else np.ones(int(keep.sum()))
        o = np.argsort(r[keep])
        cw = np.cumsum(w[o])
        wmed = float(r[keep][o][np.searchsorted(cw, 0.5 * cw[-1])])
        chi = (r - wmed) / e
        sc = max(1.0, 1.4826 * float(np.median(np.abs(chi[keep]))))
        new = np.abs(chi) <= clip * sc
        if new.sum() < 1 or np.array_equal(new, keep):
            break
        keep = new
    return keep, wmed


def _robust_ratio(a, va, b, vb, clip=3.0):
    """The ratio ``R`` of ``a ~ R b`` over the stars (``a``, ``b`` their fluxes in the two
    images, ``va``, ``vb`` their variances): ``(value, error, n_used)``.

    Stars whose own ratio lies beyond ``clip`` scaled sigmas of the weighted median of the
    ratios (a variable, a transient, an unflagged cosmic ray in one image) are left out
    (:func:`_ratio_outliers`); ``R`` is then the weighted least-squares slope through the
    origin, ``sum(a b / v) / sum(b^2 / v)`` with ``v = va + R^2 vb`` (iterated), a ratio of
    sums that a faint star's noisy denominator does not bias as a mean of ratios would. The
    error is scaled up by the reduced chi^2 when the stars scatter beyond their errors. With
    three stars or fewer the median the clipping is centred on is unweighted: a precision-
    weighted median of so few is the brightest star's own ratio, and a changed bright star
    would then keep itself and clip the others."""
    keep, wmed = _ratio_outliers(a, va, b, vb, clip, weighted=np.size(a) > 3)
    ak, bk, vak, vbk = a[keep], b[keep], va[keep], vb[keep]
    val = wmed
    for _ in range(3):
        v = vak + val**2 * vbk
        val = float((ak * bk / v).sum() / (bk * bk / v).sum())
    v = vak + val**2 * vbk
    info = float((bk * bk / v).sum())
    chi2 = float(((ak - val * bk) ** 2 / v).sum() / max(int(keep.sum()) - 1, 1))
    return val, float(math.sqrt(max(chi2, 1.0) / info)), int(keep.sum())


def _model_matched_ratios(kern, conv_psf, tgt_psf, x, y, box, g, inner, wgt):
    """The ratios target / matched-convolved that the PSF models predict for a star at
    detector ``(x, y)`` in the two apertures of :func:`_matched_star_ratio` (core weight
    ``wgt``, the box; less the annulus mean): the target's PSF against the convolved
    image's PSF matched by ``K / sum K``. Both 1 for a kernel that matches the PSFs; the
    box's beyond 1 by the light the matched PSF puts outside the box (a space PSF's wings).
    ``(nan, nan)`` when a model cannot be rendered."""
    h = kern.basis.half_width
    n = box + g
    try:
        k = kern.kernel_at(x, y)
        k = k / float(k.sum())
        pads = []
        for psf, m in ((tgt_psf, n), (conv_psf, n + h)):
            a = np.asarray(psf.kernel(x, y), np.float64)
            c = a.shape[0] // 2
            r = min(c, m)
            out = np.zeros((2 * m + 1, 2 * m + 1))
            out[m - r : m + r + 1, m - r : m + r + 1] = a[c - r : c + r + 1, c - r : c + r + 1]
            pads.append(out / a.sum())
        pt, pc = pads[0], _conv.convolve_valid(pads[1], k)
    except Exception:  # noqa: BLE001 - no model: no correction, recorded as NaN
        return float("nan"), float("nan")
    d = [q - np.mean(q[~inner]) for q in (pt, pc)]
    core = [float((wgt * q).sum()) for q in d]
    tot = [float(q[inner].sum()) for q in d]
    ok = core[1] > 0 and core[0] > 0 and tot[1] > 0 and tot[0] > 0
    return (core[0] / core[1], tot[0] / tot[1]) if ok else (float("nan"), float("nan"))


def _matched_star_ratio(
    kern, conv_img, conv_var, tgt_img, tgt_var, conv_bad, tgt_bad, sig_sharp, sig_broad, box, xy0, cfg, psfs, center
):
    """The flux ratio target / convolved of the pair's stars measured on the PSF-matched pair.

    The usable stars (S/N >= 10, :func:`procsky.kernels.psfmatch.select_kernel_stars`, not
    only the kernel stamps; the 4 brightest per cell of its grid) are measured in the
    target and in the convolved image matched to it by the unit-sum fitted kernel
    ``K / sum K``. Both then have the same PSF, so any aperture gives the flux ratio
    without an aperture correction or a PSF model (ZOGY's ``F_r / F_n`` from photometry,
    Zackay, Ofek & Gal-Yam 2016), and static neighbours cancel. The local sky is each
    image's mean in an annulus 4 px wide around the box. Sums run over the pixels usable
    in both images (the star's core, 2 sigma, must be whole). Two apertures: ``core``,
    weighted by a Gaussian of the broader PSF's sigma (the most precise); ``total``, the
    box of half-width ``box`` (3 FWHM: all but the far wings, immune to a kernel that
    matches the cores imperfectly). Per-star ratios are combined by :func:`_robust_ratio`.
    The core ratio is used when it agrees with the total one within 3 sigma of their
    difference; otherwise the kernel does not match the PSF cores (a space PSF's sharp
    core and wings, an undersampled one's aliased core), the core ratio is biased like the
    fitted sum, and the total one is used (``aperture="total"``), corrected by the PSF
    models for the light the matched PSF puts beyond the box (:func:`_model_matched_ratios`).
    Returns a dict (``value``, ``error``, ``n``, ``aperture``, both apertures' values) or
    None when no star is measured."""
    g = 4
    h = kern.basis.half_width
    ny, nx = tgt_img.shape
    r_core = int(math.ceil(2.0 * sig_broad))
    sx, sy = _pm.select_kernel_stars(
        conv_img,
        conv_var,
        conv_bad,
        psf_sigma=sig_sharp,
        stamp_radius=box + g + h,
        n_cells=cfg.n_cells,
        per_cell=4,
        min_snr=10.0,
        # the target's unusable pixels are checked below, at the star's core only
        other=np.where(tgt_bad, 0.0, tgt_img),
        other_variance=np.where(tgt_bad, 0.0, tgt_var),
        other_bad=np.zeros(tgt_bad.shape, bool),
        core_radius=r_core + h,
    )
    rr = np.arange(-box - g, box + g + 1)
    yy, xx = np.meshgrid(rr, rr, indexing="ij")
    inner = (np.abs(yy) <= box) & (np.abs(xx) <= box)
    core_px = xx**2 + yy**2 <= r_core**2
    wgt = np.exp(-(xx**2 + yy**2) / (2.0 * sig_broad**2)) * inner
    ann_n = float((~inner).sum())
    rows = []
    for x, y in zip(sx, sy):
        ix, iy = int(round(x)), int(round(y))
        sc = (slice(iy - box - g - h, iy + box + g + h + 1), slice(ix - box - g - h, ix + box + g + h + 1))
        st = (slice(iy - box - g, iy + box + g + 1), slice(ix - box - g, ix + box + g + 1))
        # the pixels usable in both images (a convolved pixel is unusable within the kernel's
        # reach of an unusable one): every sum runs over the same pixels in both, so that an
        # unusable pixel in the box leaves the ratio unbiased; the core must be whole
        cb = conv_bad[sc]
        near = (
            _conv.convolve_valid(cb.astype(np.float64), np.ones((2 * h + 1, 2 * h + 1))) > 0.5
            if cb.any()
            else np.zeros(inner.shape, bool)
        )
        use = ~near & ~tgt_bad[st]
        if not use[core_px].all() or use[inner].mean() < 0.8:
            continue
        sky_px = ~inner & use
        if sky_px.sum() < 0.5 * ann_n:
            continue
        w_use = wgt * use
        in_use = inner & use
        k = kern.kernel_at(ix + xy0[0], iy + xy0[1])
        ks = float(k.sum())
        if not ks > 0:
            continue
        k = k / ks
        c_img = _conv.convolve_valid(np.ascontiguousarray(conv_img[sc], np.float64), k)
        c_var = _conv.convolve_valid(np.ascontiguousarray(conv_var[sc], np.float64), k * k)
        t_img = np.asarray(tgt_img[st], np.float64)
        t_var = np.asarray(tgt_var[st], np.float64)
        out = []
        n_sky = float(sky_px.sum())
        for img, var in ((t_img, t_var), (c_img, c_var)):
            # the annulus mean, not its median: linear, so that the static light in it (a
            # neighbour, the star's wings) scales between the matched images as the star does
            sky = float(np.mean(img[sky_px]))
            sky_var = float(np.mean(var[sky_px])) / n_sky
            d = img - sky
            out.append(
                (
                    float((w_use * d).sum()),
                    float((w_use * w_use * var).sum()) + sky_var * float(w_use.sum()) ** 2,
                    float(d[in_use].sum()),
                    float(var[in_use].sum()) + sky_var * float(in_use.sum()) ** 2,
                )
            )
        (tc, tcv, tt, ttv), (cc, ccv, ct, ctv) = out
        if not (tc > 0 and cc > 0 and tc / math.sqrt(tcv) >= 10.0):
            continue
        rows.append((tc, tcv, cc, ccv, tt, ttv, ct, ctv))
    if not rows:
        return None
    a = np.asarray(rows)
    core = _robust_ratio(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    ok = (a[:, 4] > 0) & (a[:, 6] > 0)
    total = _robust_ratio(*(a[ok, i] for i in (4, 5, 6, 7))) if ok.any() else (float("nan"), float("nan"), 0)
    # The box misses the wings where the kernel does not reproduce them: its ratio is
    # corrected by what the PSF models predict for it, when the models also predict the
    # stars' measured core-to-box ratio within 3 sigma (a wrong model is not trusted with the
    # wings). Only the light beyond 3 FWHM then rests on the models.
    m_core, corr = _model_matched_ratios(kern, psfs[0], psfs[1], center[0], center[1], box, g, inner, wgt)
    applied = False
    if np.isfinite(corr) and np.isfinite(total[0]) and total[0] > 0:
        obs = core[0] / total[0]
        obs_err = obs * math.hypot(core[1] / core[0], total[1] / total[0])
        if abs(m_core / corr - obs) <= 3.0 * obs_err:
            a[:, 6] *= corr
            a[:, 7] *= corr**2
            total = _robust_ratio(*(a[ok, i] for i in (4, 5, 6, 7)))
            applied = True
    agree = not np.isfinite(total[0]) or abs(core[0] - total[0]) <= 3.0 * math.hypot(core[1], total[1])
    use = core if agree else total
    return {
        "value": use[0],
        "error": use[1],
        "total_model_correction": corr if applied else 1.0,
        "model_core_over_box": m_core / corr if np.isfinite(corr) else float("nan"),
        "n": use[2],
        "n_candidates": int(len(sx)),
        "n_measured": int(len(rows)),
        "aperture": "core" if agree else "total",
        "core": core[0],
        "core_err": core[1],
        "total": total[0],
        "total_err": total[1],
    }


def _kernel_sum_reference(science, template, mode, matched):
    """What the kernel sum should be: ``(value, sigma, source, n)``.

    ``K (x) C ~ T`` means ``sum K = counts_T / counts_C`` for the same star; with
    calibrations ``c`` (nJy per count) that is ``c_C / c_T`` (``source="photocalib"``, when
    both exposures carry one, sigma from their errors). Otherwise the stars' flux ratio on
    the PSF-matched pair (``matched``, :func:`_matched_star_ratio`; ``source="matched_stars"``).
    ``(nan, nan, "none", 0)`` when neither exists.
    """
    conv_exp, tgt_exp = (template, science) if mode == "convolve_template" else (science, template)
    if conv_exp.photocalib is not None and tgt_exp.photocalib is not None:
        cc, ct = conv_exp.photocalib, tgt_exp.photocalib
        val = cc.calibration / ct.calibration
        sig = val * math.hypot(cc.calibration_err / cc.calibration, ct.calibration_err / ct.calibration)
        return float(val), float(sig), "photocalib", 0
    if matched is None:
        return float("nan"), float("nan"), "none", 0
    return float(matched["value"]), float(matched["error"]), "matched_stars", int(matched["n"])


def _check_kernel_sum(cfg: SubtractionConfig, ksum, ref, ref_sig, source, n_ref, aperture_ratio=None) -> dict:
    """Compare the kernel sum with its reference (:func:`_kernel_sum_reference`); a note or
    an AlgorithmError as ``cfg.kernel_sum_warn`` / ``kernel_sum_fail`` say. Returns the
    summary entries (``aperture_ratio``: the kernel stars' median box-sum ratio, recorded).

    Only the calibrations are independent of the pixels the kernel was fitted to: a
    disagreement with the stars' matched photometry beyond ``kernel_sum_fail`` is a
    warning, not an error (one of the two is wrong, and the stars cannot say which)."""
    from procsky.notes import note_degraded

    out = {
        "kernel_sum_reference": float(ref),
        "kernel_sum_reference_err": float(ref_sig),
        "kernel_sum_reference_source": source,
        "kernel_sum_reference_n": int(n_ref),
        "kernel_sum_deviation": float("nan"),
    }
    if aperture_ratio is not None:
        out["kernel_sum_aperture_ratio"] = float(aperture_ratio)
    if not (np.isfinite(ref) and ref > 0):
        return out
    dev = ksum / ref - 1.0
    out["kernel_sum_deviation"] = float(dev)
    rsig = float(ref_sig / ref) if np.isfinite(ref_sig) else 0.0
    ref_name = "photometric calibrations" if source == "photocalib" else "PSF-matched stars' flux"
    ref_how = f"from {n_ref} stars" if n_ref else "calibration errors"
    what = (
        f"kernel sum {ksum:.4f} disagrees with the {ref_name} ratio {ref:.4f} +- {ref_sig:.4f} ({ref_how}) "
        f"by {100 * dev:+.1f}%"
    )
    if cfg.kernel_sum_fail is not None and abs(dev) > cfg.kernel_sum_fail + 3 * rsig and source == "photocalib":
        raise AlgorithmError(
            f"PSF-matching kernel is wrong: {what}, beyond the {100 * cfg.kernel_sum_fail:g}% limit "
            "(SubtractionConfig.kernel_sum_fail); check the flux units and calibrations of both images, the "
            "PSF models and the kernel stars (a mismatched or variable star field), or disable the check"
        )
    if cfg.kernel_sum_warn is not None and abs(dev) > max(cfg.kernel_sum_warn, 3 * rsig):
        note_degraded(
            "diffim_kernel_sum_mismatch",
            f"{what} (warning threshold {100 * cfg.kernel_sum_warn:g}%): static stars will leave residuals of "
            "about that fraction of their flux",
            severity="warning",
            kernel_sum=ksum,
            reference=ref,
            reference_err=ref_sig,
            source=source,
            aperture_ratio=aperture_ratio,
        )
    return out


def _kernel_sum_rescale(
    cfg: SubtractionConfig, ksum, ksum_err, ref, ref_sig, source, degraded=True
) -> tuple[float, str]:
    """The factor the fitted kernel is multiplied by (``cfg.kernel_sum_rescale``) and how it
    was chosen (``"none"``, ``"reference"``, ``"combined"``).

    Calibrations (``source="photocalib"``): their ratio over the fitted sum when the two
    differ by more than ``kernel_sum_rescale`` and 3 sigma of the ratio, and less than
    ``kernel_sum_fail`` (beyond it :func:`_check_kernel_sum` has raised). The stars'
    matched photometry (``"matched_stars"``) and the fitted sum are two measurements of one
    flux ratio, each with its error (the fit's: the scatter of its stamps' single-stamp
    sums, ``ksum_err``): their inverse-variance mean when they agree within 3 sigma; the
    photometry alone when they do not (a kernel whose basis cannot match the PSFs projects
    one profile on the other and misses the flux ratio, a bias the stamps' scatter does not
    show) or when the fit's error is unknown; however far apart they are (a variable star
    among three kernel stars can put the fit 25 % off). This for a ``degraded`` fit (a
    reduced basis on few stamps); the configured basis on enough stamps keeps its sum
    unless it misses the photometry by more than ``kernel_sum_warn`` and 3 sigma (then as
    a degraded fit). The kernel
    is rescaled only when that moves its sum by more than ``kernel_sum_rescale``."""
    from procsky.notes import note_degraded

    if cfg.kernel_sum_rescale is None or not (np.isfinite(ref) and ref > 0 and ksum > 0):
        return 1.0, "none"
    dev = ksum / ref - 1.0
    rsig = float(ref_sig / ref) if np.isfinite(ref_sig) else 0.0
    if source == "photocalib":
        if cfg.kernel_sum_fail is not None and abs(dev) > cfg.kernel_sum_fail:
            return 1.0, "none"
        if abs(dev) <= max(cfg.kernel_sum_rescale, 3.0 * rsig):
            return 1.0, "none"
        target, how = float(ref), "reference"
    elif source == "matched_stars":
        if not (np.isfinite(ref_sig) and ref_sig > 0):
            return 1.0, "none"
        if not degraded and abs(dev) <= max(cfg.kernel_sum_warn or 0.02, 3.0 * math.hypot(ksum_err, ref_sig) / ref):
            # the configured basis on enough stamps: its sum is kept unless plainly wrong
            return 1.0, "none"
        if np.isfinite(ksum_err) and ksum_err > 0 and abs(ksum - ref) <= 3.0 * math.hypot(ksum_err, ref_sig):
            w1, w2 = 1.0 / ksum_err**2, 1.0 / ref_sig**2
            target, how = float((w1 * ksum + w2 * ref) / (w1 + w2)), "combined"
        else:
            target, how = float(ref), "reference"
        if abs(target / ksum - 1.0) <= cfg.kernel_sum_rescale:
            return 1.0, "none"
    else:
        return 1.0, "none"
    factor = float(target / ksum)
    what = (
        "the inverse-variance mean of the two"
        if how == "combined"
        else "the reference (the two disagree beyond 3 sigma)"
    )
    note_degraded(
        "diffim_kernel_sum_rescaled",
        f"the fitted kernel sum {ksum:.4f} +- {ksum_err:.4f} differs from the {source} ratio {ref:.4f} +- "
        f"{ref_sig:.4f} by {100 * dev:+.1f}%: the kernel was rescaled by {factor:.4f} to {what}",
        severity="info",
        kernel_sum=ksum,
        kernel_sum_err=ksum_err,
        reference=ref,
        reference_err=ref_sig,
        source=source,
        factor=factor,
        how=how,
    )
    return factor, how


def subtract_images(
    science,
    template,
    config: SubtractionConfig | None = None,
    *,
    stars=None,
    kernel_mask=None,
    lazy: bool = True,
):
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
    kernel_mask : ndarray (ny, nx) bool, optional
        Pixels left out of the kernel fit (True), beside ``config.kernel_mask_planes``:
        a stamp pixel whose kernel footprint holds one gets no weight, and stars with one
        in their core are not kernel stars. The difference itself is not masked.
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
        it when ``lazy``; also ``metadata['diffim']`` of the difference). The noise: each
        input's measured noise against its plane on source-free pixels
        (``noise_plane_ratio_*``, the factor applied ``variance_plane_factor_*``), its
        correlation (``noise_correlated_*``, ``neighbour_correlation_*``, the sum applied
        ``noise_correlation_*``: 1 unless measured significant); the difference's measured
        noise / variance plane on source-free pixels before rescaling
        (``residual_std_sigma``) and the factor the plane was multiplied by
        (``variance_rescale``; see ``_check_variance``).

    Raises
    ------
    AlgorithmError
        Too few usable stars for the kernel fit even with the reduced bases (the message
        lists what was tried), or a kernel sum far from the reference flux ratio
        (``config.kernel_sum_fail``).
    NoWorkError
        The template has no valid pixels over the science image.
    """
    cfg = config or SubtractionConfig()
    _check_pair(science, template, cfg)
    if not lazy:
        return _subtract_now(science, template, cfg, stars, kernel_mask)
    result = deferred(_subtract_now, science, template, cfg, stars, kernel_mask, name="subtract")
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


def _subtract_now(science, template, cfg: SubtractionConfig, stars=None, kernel_mask=None):
    """:func:`subtract_images` computed at once (numpy planes)."""
    from procsky.notes import note_degraded

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
    sig_s = psf_sigma_at(sci.psf, cx, cy, what="science PSF")
    sig_t = psf_sigma_at(tpl.psf, cx, cy, what="template PSF")
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
    fwhm = 2.3548 * sig_broad
    stamp_half = cfg.stamp_half or int(max(math.ceil(3 * fwhm), 8))
    if cfg.stamp_weights == "auto":
        # the half-maximum size: a space PSF's moment size is its wings'
        hm_fwhm = 2.3548 * max(half_maximum_sigma(sci.psf.kernel(cx, cy)), half_maximum_sigma(tpl.psf.kernel(cx, cy)))
        sky_weights = bool(hm_fwhm < UNDERSAMPLED_FWHM)
    else:
        sky_weights = cfg.stamp_weights == "sky"
    # Kernel-fit pixels: values missing or wrong ("hard") spoil every stamp pixel whose
    # kernel footprint holds one; repaired pixels ("soft": CR, INTRP - a coadd template
    # carries the repairs of all its inputs) only those within the kernel core.
    soft_names = [n for n in _SPREAD_CORE if n in planes]
    hard_names = [n for n in _NOT_USABLE if n in planes and n not in soft_names]
    s_hard = _bad(s_mask, planes, hard_names)[0] | s_nan
    t_hard = _bad(t_mask, planes, hard_names)[0] | t_nan
    any_hard = s_hard | t_hard
    any_soft = (s_bad | t_bad) & ~any_hard
    # The user's kernel mask: planes of either image and/or a boolean array.
    user_bad = _user_kernel_mask(cfg, kernel_mask, s_mask, t_mask, planes, (ny, nx))
    fit_hard = any_hard | user_bad
    fit = _fit_kernel(
        cfg,
        conv_img,
        conv_var,
        tgt_img,
        tgt_var,
        fit_hard,
        any_soft & ~fit_hard,
        sig_sharp,
        sig_broad,
        stamp_half,
        det_shape,
        (x0, y0),
        stars,
        sky_weights=sky_weights,
    )
    kern, basis, sx = fit["kernel"], fit["basis"], fit["sx"]
    h = basis.half_width
    ksum = float(kern.kernel_sum(cx, cy))
    if not (np.isfinite(ksum) and ksum > 0):
        raise AlgorithmError(f"PSF-matching kernel has a non-positive sum {ksum}; the template may not match")
    # The stars' flux ratio measured on the PSF-matched pair: the reference when the two
    # exposures do not both carry a calibration (recorded either way).
    matched = _matched_star_ratio(
        kern,
        conv_img,
        conv_var,
        tgt_img,
        tgt_var,
        *(
            (t_hard | user_bad, s_hard | user_bad)
            if mode == "convolve_template"
            else (s_hard | user_bad, t_hard | user_bad)
        ),
        sig_sharp,
        sig_broad,
        stamp_half,
        (x0, y0),
        cfg,
        (tpl.psf, sci.psf) if mode == "convolve_template" else (sci.psf, tpl.psf),
        (cx, cy),
    )
    ref, ref_sig, ref_source, ref_n = _kernel_sum_reference(sci, tpl, mode, matched)
    if ref_source == "matched_stars" and matched["aperture"] == "total":
        note_degraded(
            "diffim_kernel_core_mismatch",
            f"the stars' flux ratio on the PSF-matched pair differs between the PSF core "
            f"({matched['core']:.4f} +- {matched['core_err']:.4f}) and a 3 FWHM box ({matched['total']:.4f} +- "
            f"{matched['total_err']:.4f}): the kernel does not match the PSF cores; the box ratio is the "
            "kernel-sum reference",
            severity="info",
            **{
                k: matched[k]
                for k in ("core", "core_err", "total", "total_err", "n_measured", "total_model_correction")
            },
        )
    ksum_err = float(kern.stats.get("kernel_sum_stamps_err", float("nan")))
    ksum_check = _check_kernel_sum(cfg, ksum, ref, ref_sig, ref_source, ref_n, aperture_ratio=fit["ratio"])
    rescale, rescale_how = _kernel_sum_rescale(cfg, ksum, ksum_err, ref, ref_sig, ref_source, degraded=fit["level"] > 0)
    ksum_check["kernel_sum_fitted"] = ksum
    ksum_check["kernel_sum_rescale"] = rescale
    ksum_check["kernel_sum_rescale_how"] = rescale_how
    if matched is not None:
        ksum_check.update(
            {
                "kernel_sum_matched_aperture": matched["aperture"],
                "kernel_sum_matched_n": int(matched["n_measured"]),
                "kernel_sum_matched_core": float(matched["core"]),
                "kernel_sum_matched_core_err": float(matched["core_err"]),
                "kernel_sum_matched_total": float(matched["total"]),
                "kernel_sum_matched_total_err": float(matched["total_err"]),
                "kernel_sum_matched_total_model_correction": float(matched["total_model_correction"]),
                "kernel_sum_matched_model_core_over_box": float(matched["model_core_over_box"]),
            }
        )
    if rescale != 1.0:
        kern = dataclasses.replace(kern, coeffs=kern.coeffs * rescale)
        ksum = float(kern.kernel_sum(cx, cy))
    # The measured noise of each image on the pixels free of either image's sources: its
    # ratio to the variance plane and its correlation (a resampled template's is Lanczos-
    # correlated; a calexp's is white) -- applied only where measured to differ.
    free, ns_s, ns_t = _input_noise(s_img, s_var, s_mask, s_bad, sig_s, t_img, t_var, t_mask, t_bad, sig_t, planes)
    r_s, r_t = _plane_factor(ns_s), _plane_factor(ns_t)
    rho_s, rho_t = ns_s["rho"], ns_t["rho"]
    rho_conv, rho_tgt = (rho_t, rho_s) if mode == "convolve_template" else (rho_s, rho_t)
    r_conv, r_tgt = (r_t, r_s) if mode == "convolve_template" else (r_s, r_t)

    chunk = int(cfg.chunk)
    # The planes are numpy arrays here: the convolutions and the arithmetic run at once, per
    # chunk as the lazy path would (no graph to build and tokenize). The variance of the
    # convolved image, conv(V, K^2), only when no decorrelation replaces it.
    f_img, f_var, f_msk, _, r_msk = _convolution_block_functions(
        kern,
        (x0, y0),
        _masks.bits(*[n for n in _SPREAD if n in planes], planes=planes),
        _masks.bits(*[n for n in _SPREAD_CORE if n in planes], planes=planes),
    )
    c_img = _map_margin_now(f_img, conv_img, h, np.float32, chunk)
    c_msk = _map_margin_now(f_msk, conv_mask, r_msk, np.uint32, chunk) if r_msk > 0 else conv_mask
    yy = np.arange(ny)[:, None] + y0
    xx = np.arange(nx)[None, :] + x0
    uu, vv = (2.0 * xx / max(det_shape[1] - 1, 1) - 1.0), (2.0 * yy / max(det_shape[0] - 1, 1) - 1.0)
    bg = sum(
        float(c) * uu**i * vv**j for c, (i, j) in zip(kern.background, _conv.poly_exponents(kern.background_order))
    )
    tg_img, tg_var, tg_msk = tgt_img, tgt_var, tgt_mask
    center_kernel = kern.kernel_at(cx, cy)
    if r_tgt != 1.0:
        tg_var = tg_var * np.float32(r_tgt)
    if mode == "convolve_template":
        diff = tg_img - c_img - bg
        scale = None
    else:
        # K (x) S ~ T - bg: express the difference in science units by the local kernel sum.
        scale = sum(
            float(c) * uu**i * vv**j for c, (i, j) in zip(kern.coeffs[0], _conv.poly_exponents(kern.spatial_order))
        )
        diff = (c_img + bg - tg_img) / scale
    dvar = None  # the decorrelation below sets it otherwise
    if not cfg.decorrelate:
        # Per-pixel variance of K (x) C for correlated C: conv(V, K^2) times
        # sum_d rho(d) A_K(d) / sum K^2 (A_K the kernel's autocorrelation).
        c_var = _map_margin_now(f_var, conv_var, h, np.float32, chunk)
        c_var = c_var * (r_conv * _correlated_variance_factor(center_kernel, rho_conv))
        dvar = tg_var + c_var if scale is None else (c_var + tg_var) / scale**2
    dmask = (c_msk | tg_msk).astype(np.uint32)
    det_bits = _masks.bits(*[n for n in ("DETECTED", "DETECTED_NEGATIVE") if n in planes], planes=planes)
    dmask = dmask & np.uint32(~det_bits & 0xFFFFFFFF)
    # Border pixels whose convolution reached outside the image.
    edge = np.zeros((ny, nx), bool)
    edge[:h] = edge[-h:] = True
    edge[:, :h] = edge[:, -h:] = True
    dmask = dmask | np.where(edge, np.uint32(nodata), np.uint32(0))
    diff_psf_extra = np.zeros((1, 1)) + 1.0
    summary = {
        "mode": mode,
        "stamp_weights": "sky" if sky_weights else "variance",
        "kernel_size": int(basis.size),
        "kernel_half_width": int(h),
        "basis_sigmas": list(basis.sigmas),
        "basis_degrees": list(basis.degrees),
        "psf_sigma_science": sig_s,
        "psf_sigma_template": sig_t,
        "kernel_sum": ksum,
        "n_kernel_candidates": int(len(sx)),
        "kernel_fit_level": int(fit["level"]),
        "kernel_fit_attempts": list(fit["attempts"]),
        "kernel_star_min_snr": float(fit["min_snr"]),
        **ksum_check,
        "background_center": float(kern.background_at(cx, cy)),
        "noise_correlation_science": float(rho_s.sum()),
        "noise_correlation_template": float(rho_t.sum()),
        "noise_correlated_science": bool(ns_s["correlated"]),
        "noise_correlated_template": bool(ns_t["correlated"]),
        "neighbour_correlation_science": float(ns_s["neighbour_correlation"]),
        "neighbour_correlation_template": float(ns_t["neighbour_correlation"]),
        "noise_plane_ratio_science": float(ns_s["variance_ratio"]),
        "noise_plane_ratio_template": float(ns_t["variance_ratio"]),
        "variance_plane_factor_science": float(r_s),
        "variance_plane_factor_template": float(r_t),
        **{k: v for k, v in kern.stats.items() if k not in ("used", "chi2_history")},
    }
    if cfg.decorrelate:
        # Mean variances in difference-image units over good pixels (LSST uses the means).
        good = ~(s_bad | t_bad)
        if mode == "convolve_template":
            v_unconv = float(np.mean(s_var[good])) * r_s
            v_conv = float(np.mean(t_var[good])) * ksum**2 * r_t
        else:
            v_unconv = float(np.mean(t_var[good])) / ksum**2 * r_t
            v_conv = float(np.mean(s_var[good])) * r_s
        phi = _pm.decorrelation_kernel(
            center_kernel, v_conv, v_unconv, corr_convolved=rho_conv, corr_unconvolved=rho_tgt
        )
        hp = phi.shape[0] // 2
        diff_zero = np.where((dmask & np.uint32(nodata)) != 0, 0.0, diff)
        diff = _convolve_plain(diff_zero.astype(np.float32), phi, chunk)
        # Noise is now white at the zero-frequency level of the difference's noise power:
        # per pixel, each image's variance plane times its measured ratio to the pixel noise
        # and the sum of its noise correlation (1 for white noise), the convolved one scaled
        # by the flux ratio (``tg_var`` already carries its plane factor). Exact where the
        # variances are flat. At a bright source the planes' unconvolved Poisson bumps are
        # kept rather than propagated through phi (and phi (x) K): the pixel variance is then
        # overestimated at the peak, but the noise there is correlated on the PSF scale
        # (phi (x) K of the convolved image), which a per-pixel plane cannot carry and which
        # makes PSF-fit errors from exactly propagated pixel variances too small (3.5 sigma
        # flux pulls of faded variables in test_small_simulation_dia).
        g_conv, g_tgt = float(rho_conv.sum()) * r_conv, float(rho_tgt.sum())
        if mode == "convolve_template":
            dvar = tg_var * g_tgt + conv_var * (ksum**2 * g_conv)
        else:
            assert scale is not None, "scale is the kernel-sum map when the science image is convolved"
            dvar = (conv_var * g_conv * scale**2 + tg_var * g_tgt) / scale**2
        edge2 = np.zeros((ny, nx), bool)
        h2 = h + _conv.kernel_support_radius(phi, 1e-3)
        edge2[:h2] = edge2[-h2:] = True
        edge2[:, :h2] = edge2[:, -h2:] = True
        dmask = dmask | np.where(edge2, np.uint32(nodata), np.uint32(0))
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
    diff = np.where((dmask & np.uint32(nodata)) != 0, np.float32(0.0), diff).astype(np.float32)
    assert dvar is not None, "the difference's variance is set on both paths"
    dvar = dvar.astype(np.float32)
    dvar = _check_variance(summary, diff, dvar, dmask, bad_bits, free, sig_s)
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
    summary["kernel_model_error_applied"] = False
    if cfg.model_error == "on" or (cfg.model_error == "auto" and sky_weights):
        # The kernel's model error at static stars, carried in the variance (kernel_model_error).
        mx, my = _pm.select_kernel_stars(
            s_img,
            s_var,
            any_hard,
            psf_sigma=sig_s,
            stamp_radius=int(math.ceil(3 * fwhm)),
            n_cells=cfg.n_cells,
            per_cell=2 * cfg.per_cell,
            min_snr=20.0,
            core_radius=int(math.ceil(2 * fwhm)),
        )
        pk = diff_psf.kernel(cx, cy)
        hk = max(int(math.ceil(2.0 * 2.3548 * sig_s)), 3)
        if pk.shape[0] // 2 < hk:
            pk = np.pad(pk, hk - pk.shape[0] // 2)
        c0 = pk.shape[0] // 2
        pk = pk[c0 - hk : c0 + hk + 1, c0 - hk : c0 + hk + 1]
        me = kernel_model_error(diff, dvar, static, pk, mx, my, bad=(dmask & np.uint32(bad_bits)) != 0)
        summary.update(me)
        eps = me["kernel_model_error"]
        if eps > 0:
            summary["kernel_model_error_applied"] = True
            # S is the static sky, the PSF-matched template (science minus difference), so that a
            # transient's or variable's own flux does not inflate its variance.
            matched = (static - diff).astype(np.float32)
            dvar = (dvar + np.float32(eps * eps) * np.square(np.maximum(matched, 0.0))).astype(np.float32)
            if eps > _MODEL_ERROR_NOTE:
                note_degraded(
                    "diffim_kernel_model_error",
                    f"the PSF-matching kernel leaves {100 * eps:.2f} % of the static image in the difference "
                    f"at {me['kernel_model_error_n_stars']} stars (mean square pull "
                    f"{me['kernel_model_error_z2']:.2f}): added to the variance as ({eps:.4f} S)^2",
                    severity="info",
                    **me,
                )
    meta = dict(sci.metadata)
    meta["diffim"] = summary
    diff_exp = sci._replace(image=diff, variance=dvar, mask=dmask, psf=diff_psf, metadata=meta)
    return diff_exp, kern, summary
