"""Coaddition as lazy dask graphs: warps (or calexps warped on the fly) combined per patch.

The numerical work is in :mod:`procsky.kernels.coadd` (combination, artifact search, the
PSF-matching convolution) and :mod:`procsky.kernels.psfmatch` (the Fourier matching
kernel to a Gaussian); warping is in
:mod:`procsky.warp`; dask is driven through :mod:`procsky._dask`. This module builds the
per-chunk tasks, the coadd weights and the coadd PSF.

Design (after reproject's ``mosaicking/_coadd.py``):

* An output chunk is one dask task. It receives only the *sources* that overlap it:
  small picklable readers over numpy or Zarr arrays (a warp already on the patch grid, or
  a calexp warped on the fly), never the whole inputs.
* Inside the task, the weighted mean (with or without CompareWarp-style artifact
  rejection) streams over the visits one at a time, so memory per task does not grow
  with the number of visits. Without rejection each calexp is warped straight into the
  mean's sums, row by row, its input region read once
  (:func:`procsky.kernels.warp.warp_grid_accumulate`: no warped planes). Rejection makes
  two passes, keeping only sparse outlier and candidate lists between them, and keeps the
  planes of as many visits as fit ``memory_budget``, which are then read once. ``median``
  and ``clipped_mean`` need every visit of a pixel at once: the chunk is processed in
  strips whose height makes ``n_visits x strip`` fit ``memory_budget`` (down to 8 rows).
* Zarr-backed dask inputs (what ``Repo.get`` returns) are read directly from their Zarr
  arrays inside the task; other dask inputs become task dependencies (their chunk slices).
* Per-visit weights (inverse median variance) are known from metadata, computed from
  numpy inputs, or are a small lazy dask reduction on which every chunk task depends, so
  building a coadd graph computes nothing.
* Writing goes through :meth:`procsky.exposure.Exposure.write` (the path the pipeline
  takes), which stores the planes and the ``n_inputs`` plane in batches of whole storage
  chunks (:func:`procsky._dask.store_planes`).
* The coadd PSF is a :class:`procsky.psf.CoaddPsf`: each input's PSF warped onto the
  output grid (on a grid of positions, :class:`procsky.psf.GridImagePsf`) with its
  footprint polygon and coadd weight; at any position only the inputs whose footprint
  contains it contribute (LSST's ``CoaddPsf``).

Public API: :class:`CoaddConfig`, :func:`build_coadd` (returns a :class:`LazyCoadd`),
:func:`psf_match_exposure`. The warp names (:class:`WarpConfig`, :func:`warp_exposure`,
:func:`pixel_mapping`, :func:`source_box`, :func:`footprint_polygon`,
:func:`psf_grid_nodes`) are re-exported from :mod:`procsky.warp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydantic

from procsky import _dask
from procsky import masks as _masks
from procsky.errors import NoWorkError, ProcskyTypeError, ProcskyValueError
from procsky.exposure import Exposure
from procsky.kernels import coadd as kc
from procsky.kernels import warp as kw
from procsky.notes import note_degraded
from procsky.psf import CoaddPsf, GaussianPsf, ImagePsf, PsfModel, matching_fwhm
from procsky.skymap import Box, PatchInfo
from procsky.warp import (  # re-exported: the public warp names were long importable from here
    WarpConfig,
    _area_at,
    _calexp_median_variance,
    _chunk_boxes,
    _component,
    _is_dask,
    _make_warp_source,
    _median_variance_of,
    _plane_store,
    _psf_input_of_calexp,
    _PsfInput,
    _Source,
    _sub,
    _warped_psf,
    _zarr_of,
    footprint_polygon,
    pixel_mapping,
    psf_grid_nodes,
    source_box,
    warp_exposure,
)

__all__ = [
    "CoaddConfig",
    "LazyCoadd",
    "WarpConfig",
    "build_coadd",
    "warp_visit",
    "pixel_mapping",
    "psf_match_exposure",
    "source_box",
    "footprint_polygon",
    "psf_grid_nodes",
    "warp_exposure",
]

_NO_DATA = _masks.bit("NO_DATA")
# A PSF-matching kernel of artifact rejection is applied as its leading separable terms
# when they reproduce it to this fraction of its peak and that is the cheapest way
# (:class:`procsky.kernels.coadd.MatchingKernel`); otherwise directly or by FFT.
MATCH_KERNEL_TOL = 1e-4


class CoaddConfig(pydantic.BaseModel):
    """How warps are combined into a coadd.

    Attributes
    ----------
    statistic : {"mean", "clipped_mean", "median"}
    clip_sigma, clip_iter
        Clipping of ``clipped_mean``.
    bad_mask_planes : tuple of str
        Input pixels with these planes are excluded.
    reject_artifacts : bool
        CompareWarp-style rejection of transient artifacts (trails, cosmic rays).
    artifact_threshold : float, sigma
    artifact_max_epochs : int
    artifact_max_fraction : float
    artifact_grow : int, pixels
    artifact_model_error : float
        Fractional error of the PSF-matched static-sky model, relative to the model's
        local peak (within the PSF-matching kernel radius), added in quadrature to the
        noise when testing for outliers: residuals of imperfect PSF matching (and rings
        from PSF models truncated at their stamp edge) grow with a source's brightness;
        see :func:`procsky.kernels.coadd.significance`. With 0, the cores and wings of
        bright stars are clipped in the epochs of extreme seeing, which biases their
        coadd fluxes.
    psf_match : bool
        Detect artifacts on PSF-matched warps (convolved to a common Gaussian PSF) so
        that seeing differences around stars are not taken for artifacts.
    target_fwhm : float, pixels, optional
        FWHM of the common PSF; default 1.1 x the largest input FWHM.
    memory_budget : int, bytes
        Working memory of one chunk task's stack of input strips.
    warp : WarpConfig
        For inputs warped on the fly (calexps).
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    statistic: Literal["mean", "clipped_mean", "median"] = "mean"
    clip_sigma: float = pydantic.Field(3.0, gt=0)
    clip_iter: int = pydantic.Field(2, ge=1)
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE")
    reject_artifacts: bool = True
    artifact_threshold: float = pydantic.Field(5.0, gt=0)
    artifact_max_epochs: int = pydantic.Field(2, ge=0)
    artifact_max_fraction: float = pydantic.Field(0.3, ge=0, le=1)
    artifact_grow: int = pydantic.Field(2, ge=0)
    artifact_model_error: float = pydantic.Field(0.01, ge=0)
    psf_match: bool = True
    target_fwhm: float | None = None
    memory_budget: int = pydantic.Field(64 * 2**20, ge=2**20)
    warp: WarpConfig = WarpConfig()


@dataclass
class _GridSource(_Source):
    """An exposure already on the output grid (a warp); planes cover ``box``."""

    image: Any = None
    variance: Any = None
    mask: Any = None
    remap: Any = None  # (from MaskPlanes, to MaskPlanes) or None

    def needs_dask(self) -> bool:
        return _is_dask(self.image)

    def dask_parts(self, box: Box):
        inter = box.intersection(self.box)
        if inter.empty:
            return None
        sl = inter.shifted(-self.box.x0, -self.box.y0).slices()
        return (inter, self.image[sl], self.variance[sl], self.mask[sl])

    def read(self, box: Box, parts=None):
        out_img = np.full(box.shape, np.nan, np.float32)
        out_var = np.full(box.shape, np.nan, np.float32)
        out_msk = np.full(box.shape, _NO_DATA, np.uint32)
        inter = box.intersection(self.box)
        if inter.empty:
            return out_img, out_var, out_msk
        dst = inter.shifted(-box.x0, -box.y0).slices()
        if parts is not None:  # a dask dependency covering region ``reg`` (output pixels)
            reg = parts[0]
            src = inter.shifted(-reg.x0, -reg.y0).slices()
            img, var, msk = (np.asarray(p)[src] for p in parts[1:])
        else:
            src = inter.shifted(-self.box.x0, -self.box.y0).slices()
            img, var, msk = (np.asarray(p[src]) for p in (self.image, self.variance, self.mask))
        if self.remap is not None:
            msk = self.remap[0].remap(msk.astype(np.uint32), self.remap[1])
        out_img[dst], out_var[dst], out_msk[dst] = img, var, msk
        return out_img, out_var, out_msk


def psf_match_exposure(exposure: Exposure, target_fwhm: float, *, chunk: int | None = None) -> Exposure:
    """A PSF-matched copy of a warp: convolved to a round Gaussian PSF, lazily.

    Parameters
    ----------
    exposure : Exposure
        A warp (or any exposure) with a PSF model.
    target_fwhm : float, pixels
        FWHM of the common Gaussian PSF; must exceed the exposure's PSF FWHM.
    chunk : int, optional
        Dask chunk side (default: the exposure's chunks or 1024).

    Returns
    -------
    Exposure
        Image convolved with the matching kernel ``K`` (K * psf = Gaussian), variance with
        ``K^2`` times the Lanczos noise-correlation factor, NO_DATA grown by the kernel
        radius; PSF = the target Gaussian. Made with :func:`procsky._dask.map_with_margin` (depth =
        kernel radius, no padding at the image edge).
    """
    if exposure.psf is None:
        raise ProcskyValueError("PSF matching needs a PSF model on the exposure")
    fwhm = matching_fwhm(exposure.psf, 0.0, 0.0)
    if not target_fwhm > fwhm:
        raise ProcskyValueError(
            f"target FWHM {target_fwhm:.3f} px must exceed the exposure's PSF FWHM {fwhm:.3f} px "
            "(PSF matching only broadens); pick a larger target_fwhm"
        )
    from procsky.kernels import psfmatch as kpm  # here: the plain coadd path needs no PSF matching

    kernel = _psf_matching_kernels([exposure.psf], CoaddConfig(target_fwhm=target_fwhm))[0]
    r = kernel.shape[0] // 2
    corr = kw.lanczos_noise_correlation(3)
    img, var, msk = (_dask.as_dask(getattr(exposure, p), chunk) for p in ("image", "variance", "mask"))

    def block(i, v, m, which):
        ci, cv, cm = kpm.convolve_planes(i, v, m, kernel, corr, no_data_bit=_NO_DATA)
        return (ci, cv, cm)[which]

    planes = [
        _dask.map_with_margin(block, img, var, msk, depth=r, dtype=dt, which=k)
        for k, dt in enumerate((np.float32, np.float32, np.uint32))
    ]
    meta = dict(exposure.metadata)
    meta["psf_matched_fwhm"] = float(target_fwhm)
    return exposure._replace(
        image=planes[0], variance=planes[1], mask=planes[2], psf=GaussianPsf.from_fwhm(target_fwhm), metadata=meta
    )


# ----------------------------------------------------------------------------- coadd
def _coadd_chunk(box: Box, sources: list, parts: list, weights, kernels: list, cfg: CoaddConfig, bits: dict):
    """Coadd of one output chunk: image, variance, mask, n_inputs."""
    weights = np.asarray(weights, float)
    n_src = len(sources)
    w = np.array([weights[s.weight_index] for s in sources], float) if n_src else np.zeros(0)
    if n_src == 0:
        return (
            np.full(box.shape, np.nan, np.float32),
            np.full(box.shape, np.nan, np.float32),
            np.full(box.shape, _NO_DATA, np.uint32),
            np.zeros(box.shape, np.int32),
        )
    bad, nod, rej, clipped = bits["bad"], bits["no_data"], bits["rejected"], bits["clipped"]
    if cfg.statistic == "mean" and not cfg.reject_artifacts:
        # Each source adds itself: calexps are warped straight into the sums (no planes).
        acc = kc.MeanAccumulator(box.shape, bad)
        for s, p, wt in zip(sources, parts, w):
            s.accumulate(box, p, acc, wt)
        return acc.result(nod)
    if cfg.statistic == "mean":
        return _coadd_chunk_streaming(box, sources, parts, w, kernels, cfg, bits)
    halo = max((k.radius for k in kernels if k is not None), default=0) if cfg.reject_artifacts else 0
    halo += cfg.artifact_grow if cfg.reject_artifacts else 0
    per_row = n_src * (box.nx + 2 * halo) * 4 * 6
    h = int(max(8, min(box.ny, cfg.memory_budget // max(per_row, 1) - 2 * halo)))
    out_i = np.empty(box.shape, np.float32)
    out_v = np.empty(box.shape, np.float32)
    out_m = np.empty(box.shape, np.uint32)
    out_n = np.empty(box.shape, np.int32)
    for y0 in range(box.y0, box.y1, h):
        strip = Box(box.x0, y0, box.x1, min(y0 + h, box.y1))
        big = strip.grown(halo) if halo else strip
        imgs = np.empty((n_src,) + big.shape, np.float32)
        vars_ = np.empty_like(imgs)
        msks = np.empty(imgs.shape, np.uint32)
        for k, (s, p) in enumerate(zip(sources, parts)):
            imgs[k], vars_[k], msks[k] = s.read(big, p)
        rejected = None
        if cfg.reject_artifacts:
            if cfg.psf_match and any(k is not None for k in kernels):
                ci = np.empty_like(imgs)
                cv = np.empty_like(vars_)
                cm = np.empty_like(msks)
                for k in range(n_src):
                    if kernels[k] is None:
                        ci[k], cv[k], cm[k] = imgs[k], vars_[k], msks[k]
                    else:
                        ci[k], cv[k], cm[k], _ = kc.psf_match_planes(
                            imgs[k],
                            vars_[k],
                            msks[k],
                            kernels[k],
                            kw.lanczos_noise_correlation(cfg.warp.order),
                            no_data_bit=_NO_DATA,
                        )
            else:
                ci, cv, cm = imgs, vars_, msks
            rejected = kc.find_artifacts(
                ci,
                cv,
                cm,
                bad_bits=bad,
                threshold=cfg.artifact_threshold,
                max_epochs=cfg.artifact_max_epochs,
                max_fraction=cfg.artifact_max_fraction,
                grow=cfg.artifact_grow,
                model_error=cfg.artifact_model_error,
                error_radius=halo - cfg.artifact_grow,
            )
        inner = strip.shifted(-big.x0, -big.y0).slices()
        sl = (slice(None),) + inner
        ii, vv, mm, nn = kc.combine_stack(
            imgs[sl],
            vars_[sl],
            msks[sl],
            w,
            statistic=cfg.statistic,
            bad_bits=bad,
            no_data_bit=nod,
            clip_sigma=cfg.clip_sigma,
            clip_iter=cfg.clip_iter,
            rejected=None if rejected is None else rejected[sl],
            rejected_bit=rej,
        )
        if rejected is not None:
            # Mark CLIPPED where an input was rejected as an artifact.
            mm[(rejected[sl]).any(axis=0)] |= np.uint32(clipped)
        dst = strip.shifted(-box.x0, -box.y0).slices()
        out_i[dst], out_v[dst], out_m[dst], out_n[dst] = ii, vv, mm, nn
    return out_i, out_v, out_m, out_n


def _coadd_chunk_streaming(box: Box, sources, parts, w, kernels, cfg: CoaddConfig, bits: dict):
    """Weighted mean with CompareWarp-style artifact rejection, one visit in memory at a time.

    Two passes over the visits: (1) each visit's PSF-matched warp enters a trimmed-mean
    static-sky model; (2) each visit's outlier pixels against it are kept sparse, with the
    per-pixel count of outlier epochs, and its pixels enter the weighted mean, except the
    *candidates* (outliers grown by ``artifact_grow``, the only pixels an artifact region
    can cover), whose values are held sparse too. After the second pass the artifact
    regions (few-epoch outliers, grown) are known: the held candidates outside them are
    added, those inside are rejected. Visits whose planes fit ``memory_budget`` are read
    and matched once; the others are read and matched again in the second pass.
    """
    bad, nod = bits["bad"], bits["no_data"]
    use_k = cfg.psf_match and any(k is not None for k in kernels)
    r = max((k.radius for k in kernels if k is not None), default=0) if use_k else 0
    halo = r + cfg.artifact_grow
    big = box.grown(halo)
    inner = box.shifted(-big.x0, -big.y0).slices()
    corr = kw.lanczos_noise_correlation(cfg.warp.order)
    n_src = len(sources)
    # raw image, variance, mask (12 bytes per pixel) and matched image, variance, good (9)
    n_keep = min(n_src, cfg.memory_budget // (big.ny * big.nx * 21))
    kept: dict = {}

    def planes(k):
        if k in kept:
            return kept.pop(k)
        i, v, m = sources[k].read(big, parts[k])
        if use_k and kernels[k] is not None:
            ci, cv, _, good = kc.psf_match_planes(i, v, m, kernels[k], corr, no_data_bit=_NO_DATA, bad_bits=bad)
        else:
            ci, cv = i, v
            good = ((m & np.uint32(bad)) == 0) & np.isfinite(i) & np.isfinite(v)
        return (i, v, m), (ci, cv, good)

    model_acc = kc.TrimmedMeanAccumulator(big.shape, cfg.artifact_max_epochs)
    for k in range(n_src):
        raw, matched = planes(k)
        model_acc.add(*matched)
        if k < n_keep:
            kept[k] = (raw, matched)
    model, vmodel, n_good = model_acc.result()
    scale = kc.local_peak(model, r) if cfg.artifact_model_error > 0 else None
    n_out = np.zeros(big.shape, np.int32)
    acc = kc.MeanAccumulator(box.shape, bad)
    held: list = []
    for k in range(n_src):
        (i, v, m), (ci, cv, g) = planes(k)
        sig = kc.significance(ci, cv, g, model, vmodel, cfg.artifact_model_error, scale)
        out = g & (np.abs(sig) > cfg.artifact_threshold)
        n_out += out
        idx = np.flatnonzero(out)
        ii, vv, mm = i[inner], v[inner], m[inner]
        cand = kc.dilate(out, cfg.artifact_grow)[inner] if idx.size else None
        if cand is None or not cand.any():
            acc.add(ii, vv, mm, w[k])
            held.append(None)
            continue
        acc.add(ii, vv, mm, w[k], held=cand)
        cidx = np.flatnonzero(cand)
        held.append(
            (idx, sig.ravel()[idx].astype(np.float32), cidx, ii.ravel()[cidx], vv.ravel()[cidx], mm.ravel()[cidx])
        )
    transient = kc.transient_pixels(
        n_out, n_good, max_epochs=cfg.artifact_max_epochs, max_fraction=cfg.artifact_max_fraction, min_inputs=3
    )
    clipped_any = np.zeros(box.shape, bool)
    for k, h in enumerate(held):
        if h is None:
            continue
        idx, sv, cidx, hi, hv, hm = h
        out = np.zeros(big.shape, bool)
        sig = np.zeros(big.shape, np.float32)
        out.ravel()[idx] = True
        sig.ravel()[idx] = sv
        rej = kc.artifact_regions(out, sig, transient, cfg.artifact_grow)[inner].ravel()[cidx]
        acc.add_pixels(cidx[~rej], hi[~rej], hv[~rej], hm[~rej], w[k])
        gone = cidx[rej & np.isfinite(hi)]
        acc.rejected.ravel()[gone] = True
        clipped_any.ravel()[gone] = True
    img, var, mask, n = acc.result(nod, bits["rejected"])
    mask[clipped_any] |= np.uint32(bits["clipped"])
    return img, var, mask, n


@dataclass
class LazyCoadd:
    """A patch coadd as lazy dask arrays, with what is needed to finish it.

    Attributes
    ----------
    image, variance : dask.array (ny, nx) float32
        nJy per pixel and nJy^2.
    mask : dask.array uint32
    n_inputs : dask.array int32
        Number of inputs used per pixel.
    weights : list
        Per-input weights: floats or a dask delayed computing them.
    """

    image: object
    variance: object
    mask: object
    n_inputs: object
    weights: object
    wcs_cards: list
    xy0: tuple
    visits: list
    psf_inputs: list
    chunk: int
    metadata: dict
    config: CoaddConfig

    def resolved_weights(self) -> np.ndarray:
        """Per-input weights (computes the small lazy reduction if needed)."""
        w = self.weights
        if _is_dask(w) or hasattr(w, "dask"):
            w = _dask.evaluate(w)[0]
        return np.asarray(w, float)

    def psf(self, weights=None) -> PsfModel | None:
        """Coadd PSF: a :class:`~procsky.psf.CoaddPsf` (tract pixels) whose value at any
        position is the weighted sum, with the coadd weights, of the warped PSFs of the
        inputs whose footprint contains it (LSST ``CoaddPsf``). Each calexp's PSF is
        warped on a grid of ``config.warp.psf_grid_step`` over its footprint; None
        without input PSFs."""
        w = self.resolved_weights() if weights is None else np.asarray(weights, float)
        psfs, wts, polys = [], [], []
        for pin, wt in zip(self.psf_inputs, w):
            if pin.psf is None or not (np.isfinite(wt) and wt > 0):
                continue
            p, poly = _component(pin, self.wcs_cards, self.xy0, self.config.warp.psf_grid_step, self.config.warp.order)
            if p is None:
                continue
            psfs.append(p)
            wts.append(float(wt))
            polys.append(poly)
        if not psfs:
            return None
        return CoaddPsf(psfs, wts, polys)

    def to_exposure(self, *, band: str | None = None, n_inputs: bool = True) -> Exposure:
        """The coadd as an :class:`Exposure` with lazy planes (weights and PSF computed).

        With ``n_inputs`` the number of inputs per pixel travels as the extra plane
        ``"n_inputs"`` (written next to the three planes); a merged multi-detector warp
        leaves it out.
        """
        w = self.resolved_weights()
        meta = dict(self.metadata)
        meta["weights"] = [float(x) for x in w]  # per input, in input order: see "input_visits"
        from procsky.exposure import VisitInfo

        vi = VisitInfo(band=band or meta.get("band", "")) if (band or meta.get("band")) else None
        planes = _masks.DEFAULT_PLANES
        return Exposure(
            self.image,
            self.variance,
            self.mask,
            wcs_cards=self.wcs_cards,
            psf=self.psf(w),
            visit_info=vi,
            metadata=meta,
            mask_planes=planes,
            xy0=self.xy0,
            extra_planes={"n_inputs": self.n_inputs} if n_inputs else None,
        )

    def write(self, path, *, batch: int = 16, overwrite: bool = True, band: str | None = None):
        """Write to a Zarr v3 exposure (plus an ``n_inputs`` array), ``batch`` storage chunks
        at a time, through :meth:`Exposure.write` (the path the pipeline takes); memory per
        batch does not grow with the number of inputs. Returns the path."""
        self.to_exposure(band=band).write(path, overwrite=overwrite, batch=batch)
        return path


def _bits(cfg: CoaddConfig) -> dict:
    p = _masks.DEFAULT_PLANES
    return {
        "bad": p.bitmask(cfg.bad_mask_planes),
        "no_data": p.bitmask("NO_DATA"),
        "rejected": p.bitmask("REJECTED"),
        "clipped": p.bitmask("CLIPPED"),
    }


def build_coadd(
    inputs: Sequence[Exposure],
    patch: PatchInfo | None = None,
    *,
    out_cards=None,
    out_shape=None,
    xy0=(0, 0),
    config: CoaddConfig | None = None,
    weights=None,
    inputs_are_warps: bool | None = None,
    chunk: int | None = None,
) -> LazyCoadd:
    """Build the lazy dask graph of a coadd; nothing is computed.

    Parameters
    ----------
    inputs : list of Exposure
        Warps already on this patch (their ``xy0`` in tract pixels places them) or
        calexps to warp on the fly (told apart by ``inputs_are_warps`` or, by default, by
        ``metadata['warp_box']``).
    patch : PatchInfo, optional
        The output patch (else give ``out_cards``, ``out_shape`` and ``xy0``).
    config : CoaddConfig
    weights : sequence of float, optional
        Per-input weights; default the inverse of each input's median variance in nJy^2.
    chunk : int, optional
        Output chunk side (default ``config.warp.chunk``).

    Returns
    -------
    LazyCoadd
    """
    import dask

    config = config or CoaddConfig()
    chunk = int(chunk or config.warp.chunk)
    if patch is not None:
        out_cards, out_shape, xy0 = patch.wcs_cards, patch.shape, patch.xy0
    if out_cards is None or out_shape is None:
        raise ProcskyValueError("give the output patch, or out_cards and out_shape")
    out_shape = (int(out_shape[0]), int(out_shape[1]))
    full = Box(0, 0, out_shape[1], out_shape[0])
    sources: list[_Source] = []
    box: Box | None
    src: _Source
    psfs: list = []
    psf_inputs: list = []
    wvals: list = []
    visits: list = []
    orig: list[int] = []
    for k, exp in enumerate(inputs):
        if not isinstance(exp, Exposure):
            raise ProcskyTypeError(f"coadd input {k} is a {type(exp).__name__}, not an Exposure")
        is_warp = inputs_are_warps if inputs_are_warps is not None else ("warp_box" in exp.metadata)
        if is_warp:
            box = Box(
                exp.xy0[0] - xy0[0],
                exp.xy0[1] - xy0[1],
                exp.xy0[0] - xy0[0] + exp.shape[1],
                exp.xy0[1] - xy0[1] + exp.shape[0],
            )
            if box.intersection(full).empty:
                continue
            remap = None if exp.mask_planes == _masks.DEFAULT_PLANES else (exp.mask_planes, _masks.DEFAULT_PLANES)
            src = _GridSource(
                box=box,
                visit=_visit_of(exp),
                weight_index=len(sources),
                image=_plane_store(exp.image),
                variance=_plane_store(exp.variance),
                mask=_plane_store(exp.mask),
                remap=remap,
            )
            poly = exp.metadata.get("footprint")
            if poly is None and not hasattr(exp.psf, "covers"):
                poly = [
                    [xy0[0] + box.x0 - 0.5, xy0[1] + box.y0 - 0.5],
                    [xy0[0] + box.x1 - 0.5, xy0[1] + box.y0 - 0.5],
                    [xy0[0] + box.x1 - 0.5, xy0[1] + box.y1 - 0.5],
                    [xy0[0] + box.x0 - 0.5, xy0[1] + box.y1 - 0.5],
                ]
            pin = _PsfInput("warp", exp.psf, box, polygon=None if poly is None else np.asarray(poly, float))
            psf = exp.psf
            if psf is not None and not isinstance(psf, (ImagePsf, GaussianPsf)):
                # One kernel per input (at its box centre) for the PSF matching of artifact rejection.
                psf = ImagePsf(psf.kernel(xy0[0] + (box.x0 + box.x1 - 1) / 2.0, xy0[1] + (box.y0 + box.y1 - 1) / 2.0))
            med = exp.metadata.get("median_variance")
            if med is None and not _is_dask(exp.variance):
                med = _median_variance_of(_sub(np.asarray(exp.variance)))
            elif med is None:
                z = _zarr_of(exp.variance)
                med = (
                    dask.delayed(_median_variance_of)(_sub(exp.variance))
                    if z is None
                    else _median_variance_of(_sub(z)[...])
                )
        else:
            box = source_box(exp, out_cards, out_shape)
            if box is None:
                continue
            wsrc = _make_warp_source(exp, out_cards, config.warp, box, len(sources))
            src = wsrc
            cx, cy = (box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0
            psf = _warped_psf(exp, out_cards, cx, cy, config.warp.order)
            pin = _psf_input_of_calexp(exp, box)
            pin.polygon = footprint_polygon(exp, out_cards, xy0)
            scale2 = (wsrc.calibration * _area_at(out_cards, exp, cx, cy)) ** 2
            med = _calexp_median_variance(exp)
            if med is None:
                med = dask.delayed(lambda v, s: _median_variance_of(v) * s)(_sub(exp.variance), scale2)
            else:
                med = med * scale2
        sources.append(src)
        psfs.append(psf)
        psf_inputs.append(pin)
        wvals.append(med)
        visits.append(_visit_of(exp))
        orig.append(k)
    if not sources:
        raise NoWorkError("no input overlaps the patch")
    if weights is not None:
        w_all = [float(x) for x in weights]
        if len(w_all) != len(inputs):
            raise ProcskyValueError(f"got {len(w_all)} weights for {len(inputs)} inputs; give one per input")
        wobj = [w_all[i] for i in orig]
    elif any(hasattr(m, "dask") for m in wvals):
        wobj = dask.delayed(_inverse)(wvals)
    else:
        wobj = _inverse(wvals)
    _note_undersampled(psfs, visits)
    kernels = (
        [None if k is None else kc.MatchingKernel(k, MATCH_KERNEL_TOL) for k in _psf_matching_kernels(psfs, config)]
        if (config.reject_artifacts and config.psf_match)
        else [None] * len(sources)
    )
    bits = _bits(config)
    boxes = _chunk_boxes(full, chunk)
    token = dask.base.tokenize(
        out_cards, out_shape, [s.box for s in sources], config.model_dump(), [id(e) for e in inputs], chunk
    )
    halo = (
        max((k.radius for k in kernels if k is not None), default=0) + config.artifact_grow
        if config.reject_artifacts
        else 0
    )
    # Sources, kernels and the configuration are literal graph nodes shared by the chunk
    # tasks that overlap them (traverse=False: dask must not walk into their arrays).
    src_d = [dask.delayed(s, traverse=False, name=f"coadd-source-{token}-{k}") for k, s in enumerate(sources)]
    ker_d = [
        None if k is None else dask.delayed(k, traverse=False, name=f"coadd-kernel-{token}-{i}")
        for i, k in enumerate(kernels)
    ]
    cfg_d = dask.delayed(config, traverse=False, name=f"coadd-config-{token}")
    tasks = []
    for row in boxes:
        trow = []
        for b in row:
            near = b.grown(halo) if halo else b
            idx = [k for k, s in enumerate(sources) if s.box.overlaps(near)]
            parts = [sources[k].dask_parts(near) if sources[k].needs_dask() else None for k in idx]
            key = f"coadd-chunk-{token}-{b.x0}-{b.y0}"
            trow.append(
                dask.delayed(_coadd_chunk, pure=True)(
                    b, [src_d[k] for k in idx], parts, wobj, [ker_d[k] for k in idx], cfg_d, bits, dask_key_name=key
                )
            )
        tasks.append(trow)
    img, var, msk, nin = _dask.from_chunk_tasks(
        tasks,
        [[b.shape for b in row] for row in boxes],
        (np.float32, np.float32, np.uint32, np.int32),
        ("coadd-image", "coadd-variance", "coadd-mask", "coadd-n-inputs"),
    )
    meta = {
        "visits": sorted({v for v in visits if v is not None}),
        # per used input, aligned with "weights": its visit and its index in the inputs given
        "input_visits": [None if v is None else int(v) for v in visits],
        "input_indices": [int(k) for k in orig],
        "n_inputs_total": len(sources),
        "statistic": config.statistic,
        "coadd_config": config.model_dump(mode="json"),
        "flux_unit": "nJy",
        "noise_correlation_factor": kw.lanczos_noise_correlation(config.warp.order),
    }
    return LazyCoadd(
        img, var, msk, nin, wobj, list(out_cards), tuple(int(v) for v in xy0), visits, psf_inputs, chunk, meta, config
    )


# Inputs whose PSF half-maximum FWHM is below this (pixels of the output grid) are
# undersampled (as calibrate's psf.undersampled_fwhm).
UNDERSAMPLED_FWHM = 2.5


def _note_undersampled(psfs: list, visits: list) -> None:
    """Note inputs whose warped PSF is undersampled: the coadd PSF is then their warp
    averaged over the sub-pixel phases (:func:`procsky.warp._warped_kernel`), about which
    single stars' PSF fluxes scatter (~1 % on the simulator's ``undersampled`` regime, FWHM
    1.6-1.9 px, against 0.3 % in noiseless tests)."""
    fw = []
    for p, v in zip(psfs, visits):
        if p is None:
            continue
        try:
            f = float(p.fwhm(0.0, 0.0))
        except ProcskyValueError:
            continue
        if f < UNDERSAMPLED_FWHM:
            fw.append((v, f))
    if fw:
        note_degraded(
            "coadd_undersampled_inputs",
            f"{len(fw)} of {len(psfs)} coadd inputs undersampled (PSF FWHM "
            f"{min(f for _, f in fw):.2f}-{max(f for _, f in fw):.2f} px < {UNDERSAMPLED_FWHM}): the coadd PSF is "
            "their warp averaged over pixel phases; single stars' PSF fluxes scatter about it by ~1 %",
            severity="info",
            visits=[v for v, _ in fw],
            fwhm_px=[f for _, f in fw],
        )


def _visit_of(exp: Exposure):
    if exp.visit_info is not None and exp.visit_info.visit is not None:
        return int(exp.visit_info.visit)
    v = exp.metadata.get("visit")
    return None if v is None else int(v)


def _inverse(meds):
    out = []
    for m in meds:
        m = float(m) if m is not None else float("nan")
        out.append(1.0 / m if np.isfinite(m) and m > 0 else 0.0)
    return out


def _psf_matching_kernels(psfs, config: CoaddConfig):
    fwhms = []
    for p in psfs:
        if p is None:
            continue
        try:
            # the moment size (capped), as diffim: a Gaussian target only 10 % above a ground
            # PSF's half maximum does not cover its wings, and the artifact test then rejects
            # star cores
            fwhms.append(matching_fwhm(p, 0.0, 0.0))
        except ProcskyValueError:
            continue
    if not fwhms:
        return [None] * len(psfs)
    target_fwhm = config.target_fwhm or 1.1 * max(fwhms)
    from procsky.kernels import psfmatch as kpm  # here: the plain coadd path needs no PSF matching

    out: list[np.ndarray | None] = []
    for p in psfs:
        if p is None:
            out.append(None)
            continue
        n = max(p.size, int(2 * math.ceil(2.5 * target_fwhm)) + 1) | 1
        target = GaussianPsf.from_fwhm(target_fwhm, size=n).kernel()
        k = kpm.fourier_matching_kernel(p.kernel(0.0, 0.0), target)
        # Trim to where the kernel has weight (faster convolution).
        r = min(n // 2, int(math.ceil(2.0 * target_fwhm)))
        c = k.shape[0] // 2
        k = k[c - r : c + r + 1, c - r : c + r + 1]
        out.append(k / k.sum())
    return out


def warp_visit(calexps, patch, config, *, skymap_name: str = ""):
    """Warp the detectors of one visit onto a patch and merge them into one warp.

    It lives beside :func:`build_coadd` because merging the detectors is a small coadd
    (their overlaps, only at chip gaps, are averaged with their weights).

    Parameters
    ----------
    calexps : list of Exposure
    patch : procsky.skymap.PatchInfo
    config : procsky.warp.WarpConfig

    Returns
    -------
    Exposure
    """
    from procsky.warp import warp_exposure

    warps = []
    for c in calexps:
        try:
            warps.append(warp_exposure(c, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=config))
        except NoWorkError:
            continue
    if not warps:
        raise NoWorkError(f"no calexp overlaps patch {patch.data_id}")
    meta = {
        "skymap": skymap_name,
        "tract": patch.tract.id,
        "patch": patch.id,
        "patch_box": patch.outer.to_list(),
        "patch_wcs": [list(c) for c in patch.wcs_cards],
    }
    if len(warps) == 1:
        w = warps[0]
        w.metadata.update(meta)
        return w
    # Several detectors: their overlap (rare, only at gaps) is averaged with their weights.
    x0 = min(w.xy0[0] for w in warps)
    y0 = min(w.xy0[1] for w in warps)
    x1 = max(w.xy0[0] + w.shape[1] for w in warps)
    y1 = max(w.xy0[1] + w.shape[0] for w in warps)
    from procsky.wcs import shift_wcs

    _, cards = shift_wcs(patch.wcs, x0 - patch.xy0[0], y0 - patch.xy0[1], list(patch.wcs_cards))
    merged = build_coadd(
        warps,
        out_cards=cards,
        out_shape=(y1 - y0, x1 - x0),
        xy0=(x0, y0),
        config=CoaddConfig(reject_artifacts=False, warp=config),
        inputs_are_warps=True,
    )
    exp = merged.to_exposure(n_inputs=False)  # its PSF: each detector's warped PSF grid where that detector has data
    exp.visit_info = warps[0].visit_info
    meds = [float(m) for m in (w.metadata.get("median_variance") for w in warps) if m is not None]
    exp.metadata.update(
        {
            **warps[0].metadata,
            **meta,
            "warp_box": [x0 - patch.xy0[0], y0 - patch.xy0[1], x1 - patch.xy0[0], y1 - patch.xy0[1]],
            "median_variance": float(np.median(meds)) if meds else None,
            "detectors": [w.detector.get("id") for w in warps],
        }
    )
    # Coverage of the merged warp is the union of its detectors' footprints, which its PSF
    # (a CoaddPsf of the detectors' warped PSFs) knows; one detector's outline would be wrong.
    exp.metadata.pop("footprint", None)
    return exp
