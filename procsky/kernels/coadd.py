"""Coaddition kernels: combine a stack of warped images of one sky region.

All functions take plain numpy stacks ``(n_visits, ny, nx)`` (image in nJy per pixel,
variance in nJy^2, mask uint32) and per-visit scalar weights, and return numpy planes. The
dask layer (:mod:`procsky.coadd`) feeds them strips of output chunks so that memory stays
bounded whatever the number of visits.

Statistics
----------
``mean``
    Weighted mean with one weight per visit (LSST ``AssembleCoaddTask``: the inverse of
    the visit's mean variance, so that the coadd PSF is a fixed weighted sum of the input
    PSFs): ``I = sum w_v I_v / sum w_v``, ``V = sum w_v^2 V_v / (sum w_v)^2``.
``clipped_mean``
    The same after rejecting, per pixel, inputs more than ``clip_sigma`` from the stack
    median in units of ``max(sqrt(V_v), 1.4826 MAD)``, iterated ``clip_iter`` times (the
    MAD term keeps star cores of different seeing from being clipped).
``median``
    Per-pixel median of the good inputs; variance ``pi/2`` times that of the unweighted
    mean (asymptotic efficiency of the median for Gaussian noise).

Artifact rejection follows LSST's ``CompareWarpAssembleCoadd`` (Rubin DMTN-080): a
static-sky model is built from the PSF-matched warps (the per-pixel median in
:func:`find_artifacts`, which holds the whole stack; a streaming trimmed mean,
:class:`TrimmedMeanAccumulator`, when visits are streamed one at a time);
pixels of a visit more than ``threshold`` sigma from it are outliers; outliers seen in
only a few epochs at a pixel (satellite trails, cosmic rays, ghosts) are masked, grown by
a few pixels, while pixels that are outliers in many epochs (variable stars) are kept.
The warps are PSF-matched in real space, each plane convolved once
(:class:`MatchingKernel`, :func:`psf_match_planes`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "STATISTICS",
    "MatchingKernel",
    "MeanAccumulator",
    "TrimmedMeanAccumulator",
    "artifact_regions",
    "combine_stack",
    "dilate",
    "find_artifacts",
    "psf_match_planes",
    "separable_terms",
    "significance",
    "transient_pixels",
]

STATISTICS = ("mean", "clipped_mean", "median")


class MeanAccumulator:
    """Streaming weighted mean: add one visit at a time (memory independent of visits).

    Parameters
    ----------
    shape : (ny, nx)
    bad_bits : int
        Mask bits that exclude an input pixel (NO_DATA, BAD, SAT, CLIPPED ...).
    """

    def __init__(self, shape, bad_bits: int):
        self.sw = np.zeros(shape, np.float64)
        self.swi = np.zeros(shape, np.float64)
        self.sw2v = np.zeros(shape, np.float64)
        self.mask_or = np.zeros(shape, np.uint32)
        self.rejected = np.zeros(shape, bool)
        self.n = np.zeros(shape, np.int32)
        self.bad_bits = np.uint32(bad_bits)

    def add(self, image, variance, mask, weight: float, rejected=None, held=None):
        """Add one visit's planes (NaN image/variance where it has no data).

        ``rejected`` pixels are left out and flagged; ``held`` pixels are left out only
        (added later with :meth:`add_pixels`, or flagged with :meth:`reject_pixels`)."""
        good = ((mask & self.bad_bits) == 0) & np.isfinite(image) & np.isfinite(variance)
        if rejected is not None:
            self.rejected |= rejected & np.isfinite(image)
            good &= ~rejected
        if held is not None:
            good &= ~held
        _accumulate(
            self.sw,
            self.swi,
            self.sw2v,
            self.mask_or,
            self.n,
            image.astype(np.float32, copy=False),
            variance.astype(np.float32, copy=False),
            mask.astype(np.uint32, copy=False),
            good,
            float(weight),
        )

    def add_pixels(self, index, image, variance, mask, weight: float):
        """Add one visit's values at the flat pixel indices ``index`` (1-d arrays)."""
        _accumulate_at(
            self.sw.ravel(),
            self.swi.ravel(),
            self.sw2v.ravel(),
            self.mask_or.ravel(),
            self.n.ravel(),
            np.asarray(index, np.int64),
            np.asarray(image, np.float32),
            np.asarray(variance, np.float32),
            np.asarray(mask, np.uint32),
            self.bad_bits,
            float(weight),
        )

    def result(self, no_data_bit: int, rejected_bit: int = 0):
        """(image float32, variance float32, mask uint32, n_inputs int32)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            img = np.where(self.n > 0, self.swi / self.sw, np.nan).astype(np.float32)
            var = np.where(self.n > 0, self.sw2v / (self.sw * self.sw), np.nan).astype(np.float32)
        mask = self.mask_or.copy()
        mask[self.n == 0] |= np.uint32(no_data_bit)
        if rejected_bit:
            mask[self.rejected] |= np.uint32(rejected_bit)
        return img, var, mask, self.n.copy()


@numba.njit(nogil=True, cache=True)
def _accumulate(sw, swi, sw2v, mask_or, n, image, variance, mask, good, weight):
    ny, nx = image.shape
    for j in range(ny):
        for i in range(nx):
            if good[j, i]:
                sw[j, i] += weight
                swi[j, i] += weight * image[j, i]
                sw2v[j, i] += weight * weight * variance[j, i]
                mask_or[j, i] |= mask[j, i]
                n[j, i] += 1


@numba.njit(nogil=True, cache=True)
def _accumulate_at(sw, swi, sw2v, mask_or, n, index, image, variance, mask, bad_bits, weight):
    for q in range(index.size):
        p = index[q]
        if (mask[q] & bad_bits) == 0 and np.isfinite(image[q]) and np.isfinite(variance[q]):
            sw[p] += weight
            swi[p] += weight * image[q]
            sw2v[p] += weight * weight * variance[q]
            mask_or[p] |= mask[q]
            n[p] += 1


def _good(images, variances, masks, bad_bits):
    return ((masks & np.uint32(bad_bits)) == 0) & np.isfinite(images) & np.isfinite(variances)


def combine_stack(
    images,
    variances,
    masks,
    weights,
    *,
    statistic: str = "mean",
    bad_bits: int,
    no_data_bit: int,
    clip_sigma: float = 3.0,
    clip_iter: int = 2,
    rejected=None,
    rejected_bit: int = 0,
):
    """Combine a stack of warps.

    Parameters
    ----------
    images, variances : ndarray (n, ny, nx)
        nJy per pixel and nJy^2; NaN where a visit has no data.
    masks : ndarray (n, ny, nx) uint32
    weights : array (n,)
        Per-visit weights (inverse mean variance).
    statistic : {"mean", "clipped_mean", "median"}
    bad_bits : int
        Mask bits excluding an input pixel.
    no_data_bit : int
        Bit set where no input remains.
    clip_sigma, clip_iter
        Clipping of ``clipped_mean``.
    rejected : ndarray (n, ny, nx) bool, optional
        Input pixels rejected as artifacts (excluded; flagged with ``rejected_bit``).
    rejected_bit : int

    Returns
    -------
    image, variance : float32 (ny, nx)
    mask : uint32 (ny, nx)
        OR of the masks of the inputs used, plus NO_DATA / ``rejected_bit``.
    n_inputs : int32 (ny, nx)
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown coadd statistic {statistic!r}; use one of {STATISTICS}")
    images = np.asarray(images, np.float32)
    variances = np.asarray(variances, np.float32)
    masks = np.asarray(masks, np.uint32)
    w = np.asarray(weights, np.float64)
    good = _good(images, variances, masks, bad_bits)
    any_rejected = np.zeros(images.shape[1:], bool)
    if rejected is not None:
        any_rejected = (rejected & good).any(axis=0)
        good &= ~rejected
    if statistic == "clipped_mean":
        good = _clip(images, variances, good, clip_sigma, clip_iter)
    n_in = good.sum(axis=0).astype(np.int32)
    if statistic == "median":
        with np.errstate(invalid="ignore", divide="ignore"):
            stack = np.where(good, images, np.nan)
            img = _nanmedian0(stack)
            vmean = np.where(good, variances, 0.0).sum(axis=0) / np.maximum(n_in, 1) ** 2
            var = (np.pi / 2.0) * vmean
    else:
        ww = np.where(good, w[:, None, None], 0.0)
        sw = ww.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            img = np.where(good, images, 0.0).astype(np.float64)
            img = (ww * img).sum(axis=0) / sw
            var = (ww * ww * np.where(good, variances, 0.0)).sum(axis=0) / (sw * sw)
    img = np.where(n_in > 0, img, np.nan).astype(np.float32)
    var = np.where(n_in > 0, var, np.nan).astype(np.float32)
    mask = np.bitwise_or.reduce(np.where(good, masks, np.uint32(0)), axis=0).astype(np.uint32)
    mask[n_in == 0] |= np.uint32(no_data_bit)
    if rejected_bit:
        clipped_any = any_rejected | ((~good) & _good(images, variances, masks, bad_bits)).any(axis=0)
        mask[clipped_any] |= np.uint32(rejected_bit)
    return img, var, mask, n_in


def _nanmedian0(stack):
    # np.nanmedian warns on all-NaN slices; fill them afterwards.
    allnan = ~np.isfinite(stack).any(axis=0)
    safe = np.where(allnan[None], 0.0, stack)
    out = np.nanmedian(safe, axis=0)
    out[allnan] = np.nan
    return out


def _clip(images, variances, good, k, n_iter):
    keep = good.copy()
    for _ in range(max(1, n_iter)):
        stack = np.where(keep, images, np.nan)
        med = _nanmedian0(stack)
        mad = 1.4826 * _nanmedian0(np.abs(stack - med[None]))
        mad = np.where(np.isfinite(mad), mad, 0.0)
        with np.errstate(invalid="ignore"):
            scale = np.maximum(np.sqrt(np.where(good, variances, np.inf)), mad[None])
            new = good & (np.abs(images - med[None]) <= k * scale)
        if np.array_equal(new, keep):
            break
        keep = new
    return keep


def significance(images, variances, good, model, vmodel, model_error: float = 0.0, error_scale=None):
    """Outlier significance ``(I - model) / sqrt(V + V_model + (model_error * S)^2)``,
    calibrated per visit.

    ``model_error`` is the fractional error of the PSF-matched static-sky model: PSF
    models and matching kernels are imperfect, so residuals around bright sources scale
    with their brightness, not with the noise (the idea of SWarp's ``CLIP_AMPFRAC``,
    Gruen et al. 2014, PASP 126, 158). ``S`` is ``error_scale`` (default ``|model|``);
    :func:`local_peak` of the model makes the tolerance cover a star's wings too, where
    PSF models truncated at their stamp edge leave matching rings. Without it the cores
    and wings of bright stars are outliers in the best- and worst-seeing epochs and are
    clipped there, which biases their coadd fluxes.

    Parameters
    ----------
    images, variances : ndarray (..., ny, nx)
        One visit (2-d) or a stack (3-d).
    good : bool ndarray like ``images``
    model, vmodel : ndarray (ny, nx)
        Static-sky model and its variance.
    model_error : float
    error_scale : ndarray (ny, nx), optional
    """
    if np.ndim(images) == 2:
        sig = np.empty(np.shape(images), np.float64)
        scale = np.abs(model) if error_scale is None else error_scale
        _significance_2d(images, variances, good, model, vmodel, float(model_error), scale, sig)
    else:
        err2 = variances + vmodel
        if model_error > 0:
            scale = np.abs(model) if error_scale is None else error_scale
            err2 = err2 + (model_error * scale) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            sig = (images - model) / np.sqrt(err2)
        sig = np.where(good, sig, 0.0)
    stack = sig.reshape((-1,) + sig.shape[-2:])
    gstack = np.asarray(good).reshape(stack.shape)
    for v in range(stack.shape[0]):
        vals = stack[v][gstack[v]]
        if vals.size >= 100:
            mad = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
            if mad > 1.0:
                stack[v] /= mad
    return stack.reshape(sig.shape)


@numba.njit(nogil=True, cache=True)
def _significance_2d(image, variance, good, model, vmodel, model_error, scale, out):
    # the arithmetic of significance's numpy branch, in the same order (identical values)
    ny, nx = image.shape
    for y in range(ny):
        for x in range(nx):
            if not good[y, x]:
                out[y, x] = 0.0
                continue
            err2 = np.float64(variance[y, x]) + vmodel[y, x]
            if model_error > 0:
                t = model_error * scale[y, x]
                err2 = err2 + t * t
            out[y, x] = (np.float64(image[y, x]) - model[y, x]) / np.sqrt(err2)


def local_peak(model, radius: int):
    """Largest ``|model|`` within a square of half-side ``radius`` of each pixel."""
    from scipy import ndimage

    m = np.abs(np.nan_to_num(np.asarray(model, np.float64)))
    if radius <= 0:
        return m
    return ndimage.maximum_filter(m, size=2 * int(radius) + 1, mode="nearest")


def artifact_regions(outlier, sig, transient, grow: int):
    """Artifact mask of one visit from its outlier pixels (CompareWarp's per-footprint test).

    A connected outlier region is an artifact when the significance-weighted fraction of
    its pixels that are *transient* (outliers in few epochs) exceeds one half: the core
    of a variable star (an outlier in every epoch) outweighs its wings. Artifacts are
    dilated by ``grow`` pixels.
    """
    if not outlier.any():
        return np.zeros(outlier.shape, bool)
    from scipy import ndimage

    lab, nlab = ndimage.label(outlier, structure=np.ones((3, 3), bool))
    # per-region sums over the outlier pixels only (bincount in pixel order, as
    # ndimage.sum adds them)
    pix = np.flatnonzero(lab)
    lp = lab.ravel()[pix]
    wsig = np.abs(np.nan_to_num(np.asarray(sig).ravel()[pix]))
    num = np.bincount(lp, weights=wsig * np.asarray(transient).ravel()[pix], minlength=nlab + 1)[1:]
    den = np.maximum(np.bincount(lp, weights=wsig, minlength=nlab + 1)[1:], 1e-30)
    chosen = np.zeros(nlab + 1, bool)
    chosen[1:] = num / den > 0.5
    if not chosen.any():
        return np.zeros(outlier.shape, bool)
    return dilate(chosen[lab], grow)


def transient_pixels(n_out, n_good, *, max_epochs: int, max_fraction: float, min_inputs: int):
    """Pixels whose outliers are few enough to be artifacts rather than variability."""
    limit = np.maximum(max_epochs, np.floor(max_fraction * n_good))
    return (n_out <= limit) & (n_good >= min_inputs)


class TrimmedMeanAccumulator:
    """Streaming static-sky model: per-pixel mean after dropping the ``k`` highest and
    ``k`` lowest inputs (memory ``O(k)`` planes, independent of the number of visits).

    With ``k`` at least the number of epochs an artifact may touch, trails and cosmic rays
    never enter the model, as with a median, but visits can be streamed one at a time.
    """

    def __init__(self, shape, k: int):
        self.k = max(1, int(k))
        self.s = np.zeros(shape, np.float64)
        self.sv = np.zeros(shape, np.float64)
        self.n = np.zeros(shape, np.int32)
        self.top = np.full((self.k,) + tuple(shape), -np.inf)
        self.bot = np.full((self.k,) + tuple(shape), np.inf)

    def add(self, image, variance, good):
        _trim_add(self.s, self.sv, self.n, self.top, self.bot, image, variance, np.asarray(good, np.bool_))

    def result(self):
        """(model, model variance, n_good); NaN where no input."""
        n = self.n
        k = self.k
        out = np.full(n.shape, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / n
            # Trim k from each side when at least 2k+1 inputs; else trim as many as allowed.
            for kk in range(k, -1, -1):
                sel = np.isnan(out) & (n >= 2 * kk + 1)
                if kk == 0:
                    sel = np.isnan(out) & (n >= 1)
                    out[sel] = mean[sel]
                    break
                t = self.top[:kk].sum(axis=0)
                b = self.bot[:kk].sum(axis=0)
                out[sel] = ((self.s - t - b) / (n - 2 * kk))[sel]
            # Variance of a trimmed mean of Gaussians: about that of the mean of the kept
            # inputs, inflated (~1.2 for 20% trimming); calibrated later per visit anyway.
            vm = 1.2 * self.sv / np.maximum(n, 1) ** 2
        return out, vm, n


@numba.njit(nogil=True, cache=True)
def _trim_add(s, sv, n, top, bot, image, variance, good):
    k = top.shape[0]
    ny, nx = image.shape
    for j in range(ny):
        for i in range(nx):
            if not good[j, i]:
                continue
            x = np.float64(image[j, i])
            s[j, i] += x
            sv[j, i] += variance[j, i]
            n[j, i] += 1
            # Insert into the descending top-k and ascending bottom-k lists (only values
            # beyond their last entries enter them: most inputs of a long stack do not).
            if x > top[k - 1, j, i]:
                q = k - 1
                while q > 0 and x > top[q - 1, j, i]:
                    top[q, j, i] = top[q - 1, j, i]
                    q -= 1
                top[q, j, i] = x
            if x < bot[k - 1, j, i]:
                q = k - 1
                while q > 0 and x < bot[q - 1, j, i]:
                    bot[q, j, i] = bot[q - 1, j, i]
                    q -= 1
                bot[q, j, i] = x


def find_artifacts(
    images,
    variances,
    masks,
    *,
    bad_bits: int,
    threshold: float = 5.0,
    max_epochs: int = 2,
    max_fraction: float = 0.3,
    grow: int = 2,
    min_inputs: int = 3,
    model_error: float = 0.0,
    error_radius: int = 0,
):
    """Transient artifacts of a stack of PSF-matched warps (CompareWarp-style, in memory).

    Parameters
    ----------
    images, variances : ndarray (n, ny, nx)
        PSF-matched warps (nJy/pixel, nJy^2), NaN where no data.
    masks : ndarray (n, ny, nx) uint32
    bad_bits : int
        Input pixels never used.
    threshold : float, sigma
        Outlier threshold of ``(I_v - model) / sqrt(V_v + V_model)``.
    max_epochs : int
        A pixel is an artifact in a visit only if at most ``max(max_epochs,
        max_fraction * n_good)`` visits are outliers there; more means a real variable.
    max_fraction : float
    grow : int, pixels
        Dilation of each visit's artifact mask (catches the faint wings).
    min_inputs : int
        Fewer good inputs at a pixel: nothing is rejected there (no robust model).
    model_error : float
        Fractional error of the static-sky model (see :func:`significance`).
    error_radius : int, pixels
        The model error scales with the model's :func:`local_peak` within this radius.

    Returns
    -------
    ndarray (n, ny, nx) bool
        True where a visit's pixel is an artifact.
    """
    images = np.asarray(images, np.float32)
    variances = np.asarray(variances, np.float32)
    good = _good(images, variances, np.asarray(masks, np.uint32), bad_bits)
    n_good = good.sum(axis=0)
    model = _nanmedian0(np.where(good, images, np.nan))
    vmodel = (np.pi / 2.0) * np.where(good, variances, 0.0).sum(axis=0) / np.maximum(n_good, 1) ** 2
    peak = local_peak(model, error_radius) if model_error > 0 else None  # the term vanishes otherwise
    sig = significance(images, variances, good, model, vmodel, model_error, peak)
    outlier = good & (np.abs(sig) > threshold)
    transient = transient_pixels(
        outlier.sum(axis=0), n_good, max_epochs=max_epochs, max_fraction=max_fraction, min_inputs=min_inputs
    )
    art = np.stack([artifact_regions(outlier[v], sig[v], transient, grow) for v in range(len(images))])
    return art & np.isfinite(images)


def dilate(mask, radius: int):
    """Binary dilation of a 2-d boolean mask by a square of half-side ``radius`` pixels."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    from .detection import dilate_square

    return dilate_square(np.ascontiguousarray(mask, dtype=bool), int(radius))


# ----------------------------------------------------------------------------- PSF matching
class MatchingKernel:
    """A small PSF-matching kernel and the cheapest way to apply it to a block.

    The kernel ``K`` (odd side ``n``) is applied either as the leading terms of its
    singular value decomposition, ``K ~= sum_r s_r u_r v_r^T``, each a separable pass (a
    column then a row convolution, ``2 n`` multiply-adds per pixel), with as many terms
    as make ``max |K - K_R| <= tol * max |K|``, or directly in 2-d (``n^2``), or by FFT,
    whichever costs least per pixel for that kernel (the variance takes ``K^2``, prepared
    the same way; a rank-1 ``K`` has a rank-1 ``K^2``). Separable approximation of a 2-d
    filter by its SVD: Treitel & Shanks 1971, IEEE Trans. Geosci. Electron. 9, 10; the
    choice between direct and Fourier convolution by estimated cost as
    ``scipy.signal.choose_conv_method``.

    Parameters
    ----------
    kernel : ndarray (n, n)
        Centred, odd-sized.
    tol : float
        Largest error of a separable approximation, relative to ``max |K|``.
    method : {"auto", "separable", "direct", "fft"}
    """

    # Costs per pixel and plane, in multiply-adds of a SIMD float32 pass (measured: a
    # 25-tap separable term ~9 ns, a batched float32 FFT pair ~23 ns per plane).
    _TERM_OVERHEAD = 25
    _FFT_COST = 200

    def __init__(self, kernel, tol: float = 1e-4, method: str = "auto"):
        k = np.asarray(kernel, np.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
            raise ValueError(f"a matching kernel must be square with an odd side, got shape {k.shape}")
        if method not in ("auto", "separable", "direct", "fft"):
            raise ValueError(f"unknown convolution method {method!r}; use auto, separable, direct or fft")
        self.kernel = k
        self.radius = k.shape[0] // 2
        self.tol = float(tol)
        n = k.shape[0]
        self.terms = separable_terms(k, tol)
        self.terms2 = separable_terms(k * k, tol)
        if method == "auto":
            costs = {"direct": n * n, "fft": self._FFT_COST}
            if self.terms is not None and self.terms2 is not None:
                nt = (self.terms[0].shape[0] + self.terms2[0].shape[0]) / 2.0
                costs["separable"] = nt * (2 * n + self._TERM_OVERHEAD)
            method = min(costs, key=lambda m: costs[m])
        elif method == "separable" and (self.terms is None or self.terms2 is None):
            method = "direct"
        self.method = method

    @property
    def shape(self):
        return self.kernel.shape

    def spectra(self, shape):
        """``rfft2`` of ``K`` and ``K^2`` zero-padded to ``shape``, transforming only the
        kernel's own rows along x (not cached: a cache per visit would grow with the
        number of visits)."""
        from scipy import fft

        k = np.stack([self.kernel, self.kernel * self.kernel]).astype(np.float32)
        return fft.fft(fft.rfft(k, n=shape[1], axis=2), n=shape[0], axis=1)

    def cover(self, shape):
        """Convolution of an all-valid block of ``shape`` with the kernel applied."""
        return _cover_all_valid(shape, self)

    def __repr__(self) -> str:
        r = [None if t is None else t[0].shape[0] for t in (self.terms, self.terms2)]
        return (
            f"MatchingKernel(side={self.kernel.shape[0]}, method={self.method!r}, terms={r[0]}, "
            f"terms_squared={r[1]}, tol={self.tol:g})"
        )


def separable_terms(kernel, tol: float):
    """Leading SVD terms ``(fy, fx)``, arrays ``(R, n)``, with ``sum_r fy[r] fx[r]^T``
    within ``tol * max|K|`` of ``kernel`` everywhere; None when ``2 n R >= n^2`` (a direct
    convolution is then cheaper)."""
    k = np.asarray(kernel, np.float64)
    n = k.shape[0]
    u, s, vt = np.linalg.svd(k)
    peak = float(np.abs(k).max()) or 1.0
    for r in range(1, n + 1):
        if 2 * r >= n:
            return None
        approx = (u[:, :r] * s[:r]) @ vt[:r]
        if np.abs(approx - k).max() <= tol * peak:
            return (np.ascontiguousarray((u[:, :r] * s[:r]).T), np.ascontiguousarray(vt[:r]))
    return None


def psf_match_planes(
    image,
    variance,
    mask,
    kernel: MatchingKernel,
    corr: float = 1.0,
    min_cover: float = 0.3,
    *,
    no_data_bit: int,
    bad_bits: int = 0,
):
    """PSF-match a block in real space: image convolved with ``K``, variance with ``K^2``.

    The same normalised convolution over the valid pixels (Knutsson & Westin 1993) as
    :func:`procsky.kernels.psfmatch.convolve_planes` (its Fourier version): data next to a
    ``no_data_bit`` region or the block edge is still matched, pixels whose kernel covers
    less than ``min_cover`` of valid weight become NaN with ``no_data_bit``; ``corr``
    multiplies the variance (noise correlation of warped pixels). Each plane is convolved
    once, as separable passes or directly (:class:`MatchingKernel`), in float32; where
    every pixel of the block is valid, the kernel's cover is the sum of the outer products
    of its separable terms' 1-d sums.

    Returns
    -------
    image, variance : float32
    mask : uint32
    good : bool
        Matched pixels that are finite and free of ``bad_bits``.
    """
    img = np.ascontiguousarray(image, np.float32)
    var = np.ascontiguousarray(variance, np.float32)
    msk = np.ascontiguousarray(mask, np.uint32)
    i0 = np.empty(img.shape, np.float32)
    v0 = np.empty(img.shape, np.float32)
    valid = np.empty(img.shape, np.float32)
    n_bad = _match_inputs(img, var, msk, np.uint32(no_data_bit), i0, v0, valid)
    if kernel.method == "fft":
        ci, cv, cover = _fft_same(i0, v0, valid if n_bad else None, kernel)
        if cover is None:
            cover = kernel.cover(img.shape)
    else:
        terms, terms2 = (kernel.terms, kernel.terms2) if kernel.method == "separable" else (None, None)
        ci = _convolve_same(i0, kernel.kernel, terms)
        cv = _convolve_same(v0, kernel.kernel * kernel.kernel, terms2)
        cover = _convolve_same(valid, kernel.kernel, terms) if n_bad else kernel.cover(img.shape)
    out_i = np.empty(img.shape, np.float32)
    out_v = np.empty(img.shape, np.float32)
    out_m = msk.copy()
    good = np.empty(img.shape, np.bool_)
    _match_finish(
        ci,
        cv,
        cover,
        valid,
        float(corr),
        float(min_cover),
        np.uint32(no_data_bit),
        np.uint32(bad_bits),
        out_i,
        out_v,
        out_m,
        good,
    )
    return out_i, out_v, out_m, good


def _fft_same(i0, v0, valid, kernel: MatchingKernel):
    """``same`` convolutions of the image with ``K``, the variance with ``K^2`` and (when
    given) the valid-pixel plane with ``K``, as one batched float32 FFT of the planes."""
    from scipy import fft

    ny, nx = i0.shape
    n = kernel.kernel.shape[0]
    c = n // 2
    shape = (fft.next_fast_len(ny + n - 1, real=True), fft.next_fast_len(nx + n - 1, real=True))
    kf, kf2 = kernel.spectra(shape)
    planes = [i0, v0] if valid is None else [i0, v0, valid]
    f = fft.rfft2(np.stack(planes), s=shape)
    f[0] *= kf
    f[1] *= kf2
    if valid is not None:
        f[2] *= kf
    out = fft.irfft2(f, s=shape)[:, c : c + ny, c : c + nx]
    return out[0], out[1], (None if valid is None else out[2])


def _cover_all_valid(shape, kernel: MatchingKernel):
    """Cover of a block whose pixels are all valid: the sum of the kernel applied over its
    part inside the block (the whole sum away from the edges; at the edges from 2-d
    cumulative sums of the kernel, or of each separable term when it is applied as such)."""
    if kernel.method == "separable":
        out = np.zeros(shape)
        for fy, fx in zip(*kernel.terms):
            out += np.outer(_inside_sums(shape[0], fy), _inside_sums(shape[1], fx))
        return out.astype(np.float32)
    k = kernel.kernel
    n = k.shape[0]
    c = n // 2
    ny, nx = shape
    cs = np.zeros((n + 1, n + 1))
    cs[1:, 1:] = k.cumsum(0).cumsum(1)
    out = np.full(shape, cs[n, n], np.float32)

    def box(y, x):
        # rows a of K landing inside the block at output row y: 0 <= y + c - a < ny
        ylo, yhi = np.clip(y + c - ny + 1, 0, n), np.clip(y + c + 1, 0, n)
        xlo, xhi = np.clip(x + c - nx + 1, 0, n), np.clip(x + c + 1, 0, n)
        return (
            cs[yhi[:, None], xhi[None, :]]
            - cs[ylo[:, None], xhi[None, :]]
            - cs[yhi[:, None], xlo[None, :]]
            + cs[ylo[:, None], xlo[None, :]]
        )

    ys, xs = np.arange(ny), np.arange(nx)
    edge_y = np.unique(np.concatenate([ys[:c], ys[max(c, ny - c) :]]))
    edge_x = np.unique(np.concatenate([xs[:c], xs[max(c, nx - c) :]]))
    out[edge_y, :] = box(edge_y, xs)
    out[:, edge_x] = box(ys, edge_x)
    return out


def _inside_sums(size: int, f):
    # for each i, the sum of f[a] over the a with 0 <= i + c - a < size
    c = f.size // 2
    cs = np.concatenate([[0.0], np.cumsum(f)])
    i = np.arange(size)
    return cs[np.clip(i + c + 1, 0, f.size)] - cs[np.clip(i + c - size + 1, 0, f.size)]


def _convolve_same(src, kernel, terms):
    """``scipy.signal.convolve(src, kernel, mode="same")`` (zero outside the block) in
    float32: separable terms ``(fy, fx)``, or ``kernel`` directly when ``terms`` is None."""
    src = np.ascontiguousarray(src, np.float32)
    out = np.zeros(src.shape, np.float32)
    if terms is None:
        _direct_add(src, np.asarray(kernel, np.float32), out)
    else:
        _separable_add(src, terms[0].astype(np.float32), terms[1].astype(np.float32), out)
    return out


@numba.njit(nogil=True, cache=True)
def _match_inputs(img, var, msk, no_data, i0, v0, valid):
    ny, nx = img.shape
    n_bad = 0
    for y in range(ny):
        for x in range(nx):
            a = img[y, x]
            b = var[y, x]
            if np.isfinite(a) and np.isfinite(b) and (msk[y, x] & no_data) == 0:
                i0[y, x] = a
                v0[y, x] = b
                valid[y, x] = 1.0
            else:
                i0[y, x] = 0.0
                v0[y, x] = 0.0
                valid[y, x] = 0.0
                n_bad += 1
    return n_bad


# The passes below index flat arrays with unsigned offsets (numba then drops its
# negative-index wraparound, which keeps LLVM from vectorising) and sweep whole rows per
# tap into a row accumulator, so that the inner loops are SIMD multiply-adds over
# contiguous memory. Their inputs are finite (bad pixels were zeroed), which fastmath
# may assume.
@numba.njit(nogil=True, fastmath=True, cache=True)
def _cols(src, f, out):
    # out[y, x] = sum_a f[a] src[y + c - a, x], zero outside the block
    ny, nx = src.shape
    n = f.size
    c = n // 2
    fl = src.ravel()
    ol = out.ravel()
    unx = numba.uint64(nx)
    acc = np.empty(nx, np.float32)
    for y in range(ny):
        for x in range(unx):
            acc[x] = 0.0
        for a in range(n):
            yy = y + c - a
            if yy < 0 or yy >= ny:
                continue
            w = f[a]
            base = numba.uint64(yy * nx)
            for x in range(unx):
                acc[x] += w * fl[base + x]
        ob = numba.uint64(y * nx)
        for x in range(unx):
            ol[ob + x] = acc[x]


@numba.njit(nogil=True, cache=True)
def _transpose(a, out):
    ny, nx = a.shape
    for y0 in range(0, ny, 32):
        for x0 in range(0, nx, 32):
            for y in range(y0, min(y0 + 32, ny)):
                for x in range(x0, min(x0 + 32, nx)):
                    out[x, y] = a[y, x]


@numba.njit(nogil=True, cache=True)
def _separable_add(src, fy, fx, out):
    # out += sum_r (fy[r] along y) (fx[r] along x) applied to src: each row pass is a
    # column pass on the transposed block.
    ny, nx = src.shape
    tmp = np.empty((ny, nx), np.float32)
    tt = np.empty((nx, ny), np.float32)
    uu = np.empty((nx, ny), np.float32)
    for r in range(fy.shape[0]):
        _cols(src, fy[r], tmp)
        _transpose(tmp, tt)
        _cols(tt, fx[r], uu)
        for y0 in range(0, ny, 32):
            for x0 in range(0, nx, 32):
                for y in range(y0, min(y0 + 32, ny)):
                    for x in range(x0, min(x0 + 32, nx)):
                        out[y, x] += uu[x, y]


@numba.njit(nogil=True, fastmath=True, cache=True)
def _direct_add(src, k, out):
    # out[y, x] += sum_ab k[a, b] src[y + c - a, x + c - b], zero outside the block
    ny, nx = src.shape
    n = k.shape[0]
    c = n // 2
    w2 = nx + 2 * c
    pad = np.zeros((ny, w2), np.float32)
    pad[:, c : c + nx] = src
    pl = pad.ravel()
    ol = out.ravel()
    unx = numba.uint64(nx)
    acc = np.empty(nx, np.float32)
    for y in range(ny):
        for x in range(unx):
            acc[x] = 0.0
        for a in range(n):
            yy = y + c - a
            if yy < 0 or yy >= ny:
                continue
            for b in range(n):
                w = k[a, b]
                base = numba.uint64(yy * w2 + 2 * c - b)
                for x in range(unx):
                    acc[x] += w * pl[base + x]
        ob = numba.uint64(y * nx)
        for x in range(unx):
            ol[ob + x] += acc[x]


@numba.njit(nogil=True, cache=True)
def _match_finish(ci, cv, cover, valid, corr, min_cover, no_data, bad_bits, out_i, out_v, out_m, good):
    ny, nx = ci.shape
    nan = np.float32(np.nan)
    for y in range(ny):
        for x in range(nx):
            c = np.float64(cover[y, x])
            if valid[y, x] == 0.0 or not c >= min_cover:
                out_i[y, x] = nan
                out_v[y, x] = nan
                out_m[y, x] |= no_data
                good[y, x] = False
            else:
                a = np.float32(ci[y, x] / c)
                b = np.float32(cv[y, x] * corr / (c * c))
                out_i[y, x] = a
                out_v[y, x] = b
                good[y, x] = np.isfinite(a) and np.isfinite(b) and (out_m[y, x] & bad_bits) == 0
