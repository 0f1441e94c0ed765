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
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "STATISTICS",
    "MeanAccumulator",
    "TrimmedMeanAccumulator",
    "artifact_regions",
    "combine_stack",
    "dilate",
    "find_artifacts",
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

    def add(self, image, variance, mask, weight: float, rejected=None):
        """Add one visit's planes (NaN image/variance where it has no data)."""
        good = ((mask & self.bad_bits) == 0) & np.isfinite(image) & np.isfinite(variance)
        if rejected is not None:
            self.rejected |= rejected & np.isfinite(image)
            good &= ~rejected
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
    wsig = np.abs(np.nan_to_num(sig))
    idx = np.arange(1, nlab + 1)
    num = np.asarray(ndimage.sum(wsig * transient, lab, index=idx))
    den = np.maximum(np.asarray(ndimage.sum(wsig, lab, index=idx)), 1e-30)
    chosen = idx[num / den > 0.5]
    if not chosen.size:
        return np.zeros(outlier.shape, bool)
    return dilate(np.isin(lab, chosen), grow)


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
        _trim_add(
            self.s,
            self.sv,
            self.n,
            self.top,
            self.bot,
            np.asarray(image, np.float64),
            np.asarray(variance, np.float64),
            np.asarray(good, np.bool_),
        )

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
            x = image[j, i]
            s[j, i] += x
            sv[j, i] += variance[j, i]
            n[j, i] += 1
            # Insert into the descending top-k and ascending bottom-k lists.
            for q in range(k):
                if x > top[q, j, i]:
                    for r in range(k - 1, q, -1):
                        top[r, j, i] = top[r - 1, j, i]
                    top[q, j, i] = x
                    break
            for q in range(k):
                if x < bot[q, j, i]:
                    for r in range(k - 1, q, -1):
                        bot[r, j, i] = bot[r - 1, j, i]
                    bot[q, j, i] = x
                    break


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
