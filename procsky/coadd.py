"""Warping and coaddition as lazy dask graphs (the one place of this stage that owns dask).

The numerical work is in :mod:`procsky.kernels.warp` and :mod:`procsky.kernels.coadd`
(numpy/numba only); this module turns it into dask arrays over output chunks, evaluates
the WCS pixel mappings and writes Zarr.

Design (after reproject's ``mosaicking/_coadd.py``):

* An output chunk is one dask task. It receives only the *sources* that overlap it:
  small picklable readers over numpy or Zarr arrays (a warp already on the patch grid, or
  a calexp warped on the fly), never the whole inputs.
* Inside the task, the weighted mean (with or without CompareWarp-style artifact
  rejection) streams over the visits one at a time, so memory per task does not grow
  with the number of visits (rejection makes three passes, keeping only sparse outlier
  lists between them, or caches the visits when they fit ``memory_budget``). ``median``
  and ``clipped_mean`` need every visit of a pixel at once: the chunk is processed in
  strips whose height makes ``n_visits x strip`` fit ``memory_budget`` (down to 8 rows).
* Zarr-backed dask inputs (what ``Repo.get`` returns) are read directly from their Zarr
  arrays inside the task; other dask inputs become task dependencies (their chunk slices).
* Per-visit weights (inverse median variance) are known from metadata, computed from
  numpy inputs, or are a small lazy dask reduction on which every chunk task depends, so
  building a coadd graph computes nothing.
* Writing goes to a pre-created Zarr exposure, in batches of whole storage chunks
  (:func:`procsky.exposure.write_zarr_region` refuses unaligned writes).
* The coadd PSF is a :class:`procsky.psf.CoaddPsf`: each input's PSF warped onto the
  output grid (on a grid of positions, :class:`procsky.psf.GridImagePsf`) with its
  footprint polygon and coadd weight; at any position only the inputs whose footprint
  contains it contribute (LSST's ``CoaddPsf``).

Public API: :class:`WarpConfig`, :class:`CoaddConfig`, :func:`warp_exposure`,
:func:`build_coadd` (returns a :class:`LazyCoadd`), :func:`pixel_mapping`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pydantic

from procsky import masks as _masks
from procsky.errors import NoWorkError, ProcskyTypeError, ProcskyValueError
from procsky.exposure import Exposure, create_zarr_exposure, write_zarr_region
from procsky.kernels import coadd as kc
from procsky.kernels import warp as kw
from procsky.psf import CoaddPsf, GaussianPsf, GridImagePsf, ImagePsf, PsfModel
from procsky.skymap import Box, PatchInfo
from procsky.wcs import wcs_from_cards

__all__ = [
    "CoaddConfig",
    "LazyCoadd",
    "WarpConfig",
    "build_coadd",
    "pixel_mapping",
    "source_box",
    "footprint_polygon",
    "psf_grid_nodes",
    "warp_exposure",
]

_NO_DATA = _masks.bit("NO_DATA")


class WarpConfig(pydantic.BaseModel):
    """How calexps are resampled onto a sky grid.

    Attributes
    ----------
    order : int
        Lanczos order (3: Lanczos3, LSST's and SWarp's default).
    grid_step : int, pixels
        Spacing of the coarse grid on which the WCS mapping is evaluated exactly and then
        interpolated with bicubic splines (error < 0.001 px, tested); 0 evaluates every
        pixel exactly.
    mask_radius : float, pixels, optional
        Input mask bits within this distance of the sample point are ORed into the output;
        ``None`` means the whole Lanczos footprint.
    chunk : int, pixels
        Output chunk side (dask chunks and Zarr storage chunks).
    psf_grid_step : int, pixels
        Spacing of the grid of positions (multiples of it in the tract pixel frame, plus
        the box edges) on which warp and coadd PSFs are evaluated and stored; they are
        interpolated bilinearly in between (:class:`procsky.psf.GridImagePsf`).
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    order: int = pydantic.Field(3, ge=1, le=8)
    grid_step: int = pydantic.Field(32, ge=0)
    mask_radius: float | None = None
    chunk: int = pydantic.Field(1024, ge=16)
    psf_grid_step: int = pydantic.Field(500, ge=16)


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


# ----------------------------------------------------------------------------- mapping
_LOCAL = threading.local()


def _wcs(cards, shape=None):
    """A WCS from cards, parsed once per thread (astropy WCS objects are not thread-safe,
    and parsing costs ~15 ms, more than warping a small chunk)."""
    cache = getattr(_LOCAL, "wcs", None)
    if cache is None:
        cache = _LOCAL.wcs = {}
    key = (repr(list(cards)), None if shape is None else tuple(shape))
    w = cache.get(key)
    if w is None:
        if len(cache) > 256:
            cache.clear()
        w = cache[key] = wcs_from_cards(cards, shape)
    return w


def pixel_mapping(out_cards, in_cards, box: Box, *, grid_step: int = 32, in_shape=None):
    """Input pixel coordinates sampled by each output pixel of ``box``.

    Parameters
    ----------
    out_cards, in_cards : list of FITS cards
        Output and input WCSs (stored cards; rebuilt here, one copy per call, so this is
        thread-safe).
    box : Box
        Output pixels (in the output WCS's pixel frame).
    grid_step : int, pixels
        0: exact at every pixel; otherwise exact on a grid of this spacing (plus the box
        edges) and bicubic-spline interpolated in between.
    in_shape : (ny, nx), optional

    Returns
    -------
    xin, yin : ndarray (box.ny, box.nx) float64
        0-based input pixel coordinates (NaN where the mapping is undefined).
    """
    out_wcs = _wcs(out_cards)
    in_wcs = _wcs(in_cards, in_shape)

    def exact(x, y):
        ra, dec = out_wcs.pixel_to_world_values(x, y)
        with np.errstate(all="ignore"):
            xi, yi = in_wcs.world_to_pixel_values(ra, dec)
        return np.asarray(xi, float), np.asarray(yi, float)

    xs = np.arange(box.x0, box.x1, dtype=float)
    ys = np.arange(box.y0, box.y1, dtype=float)
    if grid_step <= 0 or (box.nx <= 4 * grid_step and box.ny <= 4 * grid_step and box.nx * box.ny <= 4096):
        xx, yy = np.meshgrid(xs, ys)
        return exact(xx, yy)

    def grid(lo, hi):
        n = max(4, int(math.ceil((hi - 1 - lo) / grid_step)) + 1)
        return np.linspace(lo, hi - 1, n) if hi - lo > 1 else np.array([lo - 1.0, lo, lo + 1.0, lo + 2.0])

    gx, gy = grid(box.x0, box.x1), grid(box.y0, box.y1)
    gxx, gyy = np.meshgrid(gx, gy)
    xi, yi = exact(gxx, gyy)
    if not (np.all(np.isfinite(xi)) and np.all(np.isfinite(yi))):
        xx, yy = np.meshgrid(xs, ys)
        return exact(xx, yy)
    return kw.interpolate_grid(gx, gy, xi, xs, ys), kw.interpolate_grid(gx, gy, yi, xs, ys)


def _jacobian(out_cards, in_cards, x: float, y: float, in_shape=None) -> np.ndarray:
    """d(x_in, y_in)/d(x_out, y_out) at output pixel (x, y), by central differences."""
    b = Box(int(math.floor(x)) - 1, int(math.floor(y)) - 1, int(math.floor(x)) + 2, int(math.floor(y)) + 2)
    xi, yi = pixel_mapping(out_cards, in_cards, b, grid_step=0, in_shape=in_shape)
    return np.array([[(xi[1, 2] - xi[1, 0]) / 2, (xi[2, 1] - xi[0, 1]) / 2],
                     [(yi[1, 2] - yi[1, 0]) / 2, (yi[2, 1] - yi[0, 1]) / 2]])


# ----------------------------------------------------------------------------- sources
def _zarr_of(arr):
    """The zarr.Array behind a dask array made by ``da.from_zarr`` (else None)."""
    try:
        import zarr

        graph = arr.__dask_graph__()
        if len(graph.layers) != 1:
            return None
        for task in dict(graph).values():
            for a in getattr(task, "args", ()):
                v = getattr(a, "value", a)
                if isinstance(v, zarr.Array) and tuple(v.shape) == tuple(arr.shape):
                    return v
            return None
    except Exception:
        return None
    return None


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask")


def _plane_store(a):
    """A readable array for a plane: numpy, zarr.Array, or the dask array itself."""
    if _is_dask(a):
        z = _zarr_of(a)
        return z if z is not None else a
    return np.asarray(a)


@dataclass
class _Source:
    """Base: one input visit/detector as seen on the output grid."""

    box: Box  # output pixels it may cover
    visit: int | None
    weight_index: int

    def needs_dask(self) -> bool:
        return False

    def dask_parts(self, box: Box):
        return None


@dataclass
class _GridSource(_Source):
    """An exposure already on the output grid (a warp); planes cover ``box``."""

    image: object = None
    variance: object = None
    mask: object = None
    remap: object = None  # (from MaskPlanes, to MaskPlanes) or None

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


@dataclass
class _WarpSource(_Source):
    """A calexp resampled on the fly; ``box`` is its footprint on the output grid."""

    image: object = None
    variance: object = None
    mask: object = None
    in_cards: list = field(default_factory=list)
    in_shape: tuple = (0, 0)
    out_cards: list = field(default_factory=list)
    calibration: float = 1.0
    warp: WarpConfig = WarpConfig()
    remap: object = None

    def needs_dask(self) -> bool:
        return _is_dask(self.image)

    def dask_parts(self, box: Box):
        # The input region needed for ``box``; read through dask (a dependency).
        reg = self._input_region(box)
        if reg is None:
            return None
        return (reg, self.image[reg.slices()], self.variance[reg.slices()], self.mask[reg.slices()])

    def _input_region(self, box: Box, mapping=None):
        inter = box.intersection(self.box)
        if inter.empty:
            return None
        if mapping is None:
            # Outline of the box (exact WCS), enough for the bounding region.
            xi, yi = _outline_mapping(self.out_cards, self.in_cards, inter, self.in_shape)
        else:
            xi, yi = mapping
        ok = np.isfinite(xi) & np.isfinite(yi)
        if not ok.any():
            return None
        a = self.warp.order + 2
        ny, nx = self.in_shape
        reg = Box(max(0, int(np.floor(xi[ok].min())) - a), max(0, int(np.floor(yi[ok].min())) - a),
                  min(nx, int(np.ceil(xi[ok].max())) + a + 1), min(ny, int(np.ceil(yi[ok].max())) + a + 1))
        return None if reg.empty else reg

    def read(self, box: Box, parts=None):
        out_img = np.full(box.shape, np.nan, np.float32)
        out_var = np.full(box.shape, np.nan, np.float32)
        out_msk = np.full(box.shape, _NO_DATA, np.uint32)
        inter = box.intersection(self.box)
        if inter.empty:
            return out_img, out_var, out_msk
        xin, yin = pixel_mapping(self.out_cards, self.in_cards, inter, grid_step=self.warp.grid_step,
                                 in_shape=self.in_shape)
        if parts is not None:
            reg, img, var, msk = parts
            # The dependency covers the region for the whole requested box; crop to ours.
            img, var, msk = np.asarray(img), np.asarray(var), np.asarray(msk)
        else:
            reg = self._input_region(inter, (xin, yin))
            if reg is None:
                return out_img, out_var, out_msk
            sl = reg.slices()
            img, var, msk = (np.asarray(p[sl]) for p in (self.image, self.variance, self.mask))
        if self.remap is not None:
            msk = self.remap[0].remap(msk.astype(np.uint32), self.remap[1])
        scale = self.calibration * kw.area_ratio(xin, yin) if min(inter.shape) >= 2 else self.calibration
        wi, wv, wm = kw.warp_planes(img, var, msk, xin - reg.x0, yin - reg.y0, scale, order=self.warp.order,
                                    mask_radius=self.warp.mask_radius, no_data_bit=_NO_DATA)
        dst = inter.shifted(-box.x0, -box.y0).slices()
        out_img[dst], out_var[dst], out_msk[dst] = wi, wv, wm
        return out_img, out_var, out_msk


def _outline_mapping(out_cards, in_cards, box: Box, in_shape):
    n = 9
    xs = np.concatenate([np.linspace(box.x0, box.x1 - 1, n), np.full(n, box.x1 - 1.0),
                         np.linspace(box.x0, box.x1 - 1, n), np.full(n, float(box.x0))])
    ys = np.concatenate([np.full(n, float(box.y0)), np.linspace(box.y0, box.y1 - 1, n),
                         np.full(n, box.y1 - 1.0), np.linspace(box.y0, box.y1 - 1, n)])
    ow, iw = _wcs(out_cards), _wcs(in_cards, in_shape)
    ra, dec = ow.pixel_to_world_values(xs, ys)
    with np.errstate(all="ignore"):
        xi, yi = iw.world_to_pixel_values(ra, dec)
    return np.asarray(xi, float), np.asarray(yi, float)


def source_box(exposure: Exposure, out_cards, out_shape, *, chunk: int | None = None) -> Box | None:
    """Bounding box on an output grid of an exposure's footprint (None if disjoint).

    Parameters
    ----------
    exposure : Exposure
        Input with a WCS.
    out_cards : list
        Output WCS cards.
    out_shape : (ny, nx)
    chunk : int, optional
        Expand the box outwards to multiples of this (aligned storage writes).
    """
    from procsky.skymap import footprint_points

    in_wcs = exposure.wcs
    if in_wcs is None:
        raise ProcskyValueError("the exposure has no WCS; calibrate it (astrometry) before warping")
    ra, dec = footprint_points(in_wcs, exposure.shape, n_edge=24)
    ow = _wcs(out_cards)
    x, y = ow.world_to_pixel_values(ra, dec)
    x, y = np.asarray(x), np.asarray(y)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None
    full = Box(0, 0, int(out_shape[1]), int(out_shape[0]))
    b = Box(int(np.floor(x.min())) - 1, int(np.floor(y.min())) - 1, int(np.ceil(x.max())) + 2,
            int(np.ceil(y.max())) + 2).intersection(full)
    if b.empty:
        return None
    if chunk:
        b = Box(b.x0 // chunk * chunk, b.y0 // chunk * chunk, min(full.x1, -(-b.x1 // chunk) * chunk),
                min(full.y1, -(-b.y1 // chunk) * chunk))
    return b


# ----------------------------------------------------------------------------- chunks
def _chunk_boxes(box: Box, chunk: int):
    """Chunk boxes tiling ``box`` (relative grid starting at box origin), row-major."""
    ys = list(range(box.y0, box.y1, chunk))
    xs = list(range(box.x0, box.x1, chunk))
    return [[Box(x, y, min(x + chunk, box.x1), min(y + chunk, box.y1)) for x in xs] for y in ys]


def _assemble(chunk_tasks, boxes, dtype_list, names):
    """dask arrays (one per output plane) from per-chunk delayed tuples."""
    import dask.array as da

    planes = []
    for k, (dt, name) in enumerate(zip(dtype_list, names)):
        rows = []
        for row_t, row_b in zip(chunk_tasks, boxes):
            rows.append([da.from_delayed(t[k], shape=b.shape, dtype=dt, meta=np.empty((0, 0), dt), name=f"{name}-{t.key}-{k}")
                         for t, b in zip(row_t, row_b)])
        planes.append(da.block(rows))
    return planes


def _warp_chunk(box: Box, source: _Source, parts):
    img, var, msk = source.read(box, parts)
    return img, var, msk


def _median_variance_of(arr) -> float:
    """Median of the finite, positive values of a (subsampled) variance plane."""
    a = np.asarray(arr, dtype=np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    if a.size == 0:
        return float("nan")
    return float(np.median(a))


def _sub(arr, n: int = 64):
    """A strided subsample of a plane (about n x n values) for robust statistics."""
    ny, nx = arr.shape
    return arr[:: max(1, ny // n), :: max(1, nx // n)]


# ----------------------------------------------------------------------------- warp
def warp_exposure(calexp: Exposure, out_cards, out_shape, *, xy0=(0, 0), config: WarpConfig | None = None,
                  full: bool = False, metadata: dict | None = None) -> Exposure:
    """Resample a calibrated exposure onto an output grid (e.g. a patch), lazily.

    Parameters
    ----------
    calexp : Exposure
        Input (numpy, Zarr-backed or other dask planes) with WCS; its PhotoCalib turns
        counts into nJy (without one the pixel unit is kept).
    out_cards : list
        Output WCS cards (``PatchInfo.wcs_cards``).
    out_shape : (ny, nx)
        Output grid shape.
    xy0 : (int, int)
        Parent (tract) pixel of output pixel (0, 0); the warp's ``xy0`` adds its offset.
    config : WarpConfig
    full : bool
        Cover the whole output grid; otherwise only the chunk-aligned overlap box.
    metadata : dict, optional
        Added to the output metadata.

    Returns
    -------
    Exposure
        Lazy planes (dask, chunked ``config.chunk``) in nJy per output pixel; ``xy0`` is
        the tract pixel of its first pixel; WCS = output WCS shifted to the box; PSF = a
        :class:`~procsky.psf.GridImagePsf` (tract pixels) of the input PSF warped to the
        output frame on a grid of ``config.psf_grid_step``, valid where the input has
        data; metadata holds
        ``median_variance`` (nJy^2, for per-visit weights), the box and the visit.

    Raises
    ------
    NoWorkError
        The exposure does not overlap the output grid.
    """
    config = config or WarpConfig()
    out_shape = (int(out_shape[0]), int(out_shape[1]))
    full_box = Box(0, 0, out_shape[1], out_shape[0])
    box = full_box if full else source_box(calexp, out_cards, out_shape, chunk=config.chunk)
    if box is None:
        raise NoWorkError("the exposure does not overlap the output grid")
    src = _make_warp_source(calexp, out_cards, config, box, 0)
    import dask

    boxes = _chunk_boxes(box, config.chunk)
    token = dask.base.tokenize(calexp.wcs_cards, out_cards, box, config.model_dump(), id(calexp))
    # The source is one literal node of the graph that every chunk task depends on
    # (traverse=False: dask must not walk into its arrays).
    src_d = dask.delayed(src, traverse=False, name=f"warp-source-{token}")
    tasks = []
    for row in boxes:
        trow = []
        for b in row:
            parts = src.dask_parts(b) if src.needs_dask() else None
            key = f"warp-chunk-{token}-{b.x0}-{b.y0}"
            trow.append(dask.delayed(_warp_chunk, pure=True)(b, src_d, parts, dask_key_name=key))
        tasks.append(trow)
    img, var, msk = _assemble(tasks, boxes, (np.float32, np.float32, np.uint32), ("warp-image", "warp-variance",
                                                                                   "warp-mask"))
    from procsky.wcs import shift_wcs

    wcs, cards = shift_wcs(wcs_from_cards(out_cards), box.x0, box.y0, list(out_cards))
    wcs = wcs_from_cards(cards, box.shape)
    cx, cy = (box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0
    psf = _grid_psf([_psf_input_of_calexp(calexp, box)], [1.0], out_cards, box, xy0, config.psf_grid_step,
                    config.order)
    med = _calexp_median_variance(calexp)
    scale = src.calibration * _area_at(out_cards, calexp, cx, cy)
    meta = dict(calexp.metadata)
    meta.update({
        "warp_box": box.to_list(),
        "median_variance": None if med is None else float(med * scale * scale),
        "visit": None if calexp.visit_info is None else calexp.visit_info.visit,
        "flux_unit": "nJy" if calexp.photocalib is not None else meta.get("flux_unit", "counts"),
        "lanczos_order": config.order,
    })
    poly = footprint_polygon(calexp, out_cards, xy0)
    if poly is not None:
        meta["footprint"] = poly.tolist()  # outline of the calexp, tract pixels (coadd PSF coverage)
    meta.update(metadata or {})
    return Exposure(img, var, msk, wcs=wcs, wcs_cards=cards, psf=psf, photocalib=None, visit_info=calexp.visit_info,
                    detector=calexp.detector, metadata=meta, mask_planes=_masks.DEFAULT_PLANES,
                    xy0=(int(xy0[0]) + box.x0, int(xy0[1]) + box.y0))


def _calexp_median_variance(exp: Exposure) -> float | None:
    v = exp.metadata.get("median_variance_counts")
    if v is not None:
        return float(v)
    if _is_dask(exp.variance):
        z = _zarr_of(exp.variance)
        if z is None:
            return None  # unknown without computing; callers fall back to lazy weights
        return _median_variance_of(_sub(z)[...])
    return _median_variance_of(_sub(np.asarray(exp.variance)))


def _area_at(out_cards, exp: Exposure, x: float, y: float) -> float:
    jac = _jacobian(out_cards, exp.wcs_cards, x, y, exp.shape)
    return float(abs(np.linalg.det(jac)))


def _make_warp_source(calexp: Exposure, out_cards, config: WarpConfig, box: Box, widx: int) -> _WarpSource:
    if calexp.wcs is None:
        raise ProcskyValueError("cannot warp an exposure without a WCS; run calibrate (astrometry) first")
    remap = None
    if calexp.mask_planes != _masks.DEFAULT_PLANES:
        remap = (calexp.mask_planes, _masks.DEFAULT_PLANES)
    cal = calexp.photocalib.calibration if calexp.photocalib is not None else 1.0
    return _WarpSource(
        box=box, visit=None if calexp.visit_info is None else calexp.visit_info.visit, weight_index=widx,
        image=_plane_store(calexp.image), variance=_plane_store(calexp.variance), mask=_plane_store(calexp.mask),
        in_cards=list(calexp.wcs_cards), in_shape=tuple(calexp.shape), out_cards=list(out_cards),
        calibration=float(cal), warp=config, remap=remap,
    )


def _warped_psf(exp: Exposure, out_cards, x: float, y: float, order: int) -> PsfModel | None:
    """The exposure's PSF at output pixel (x, y), resampled into the output frame."""
    if exp.psf is None:
        return None
    jac = _jacobian(out_cards, exp.wcs_cards, x, y, exp.shape)
    ow = _wcs(out_cards)
    ra, dec = ow.pixel_to_world_values(x, y)
    xi, yi = exp.wcs.world_to_pixel_values(ra, dec)
    # PSF models use parent-detector coordinates.
    k = exp.psf.kernel(float(xi) + exp.xy0[0], float(yi) + exp.xy0[1])
    img = kw.warp_kernel_image(k, jac, order=order)
    return ImagePsf(img)


def psf_grid_nodes(lo: int, hi: int, step: int) -> np.ndarray:
    """Node positions of a PSF grid over pixels ``lo .. hi - 1`` (parent/tract frame).

    The multiples of ``step`` inside the range plus both ends, so that grids of different
    boxes (warps of several detectors, a coadd of those warps) share their inner nodes.
    """
    lo, hi = int(lo), int(hi) - 1
    inner = np.arange(-(-lo // step) * step, hi + 1, step)
    nodes = np.unique(np.concatenate([[lo], inner, [hi]]).astype(float))
    return nodes


def _node_mapping(out_cards, in_cards, in_shape, x, y):
    """Input pixels of output pixels (x, y) (1-d arrays) and the Jacobians there.

    Returns ``xi, yi`` (n,) and ``jac`` (n, 2, 2), by central differences of the exact
    WCS mapping.
    """
    ow, iw = _wcs(out_cards), _wcs(in_cards, in_shape)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    px = np.concatenate([x, x + 1, x - 1, x, x])
    py = np.concatenate([y, y, y, y + 1, y - 1])
    ra, dec = ow.pixel_to_world_values(px, py)
    with np.errstate(all="ignore"):
        xi, yi = iw.world_to_pixel_values(ra, dec)
    xi, yi = np.asarray(xi, float).reshape(5, -1), np.asarray(yi, float).reshape(5, -1)
    jac = np.empty((x.size, 2, 2))
    jac[:, 0, 0] = (xi[1] - xi[2]) / 2
    jac[:, 0, 1] = (xi[3] - xi[4]) / 2
    jac[:, 1, 0] = (yi[1] - yi[2]) / 2
    jac[:, 1, 1] = (yi[3] - yi[4]) / 2
    return xi[0], yi[0], jac


@dataclass
class _PsfInput:
    """What the coadd PSF needs of one input: its PSF model and where it has data.

    ``kind`` is ``"calexp"`` (PSF in the input's detector frame, mapped through the WCSs;
    covers the output pixels that land inside the input) or ``"warp"`` (PSF already in the
    output frame, in tract pixels; covers its box, and where its PSF grid has data).
    """

    kind: str
    psf: PsfModel | None
    box: Box  # output pixels (relative to the output grid)
    in_cards: list = field(default_factory=list)
    in_shape: tuple = (0, 0)
    in_xy0: tuple = (0, 0)
    polygon: object = None  # footprint (n, 2) in the output's tract pixels, or None

    def kernels_at(self, out_cards, xy0, x, y, order: int):
        """Kernels (or None where not covered) at output pixels (x, y), 1-d arrays."""
        out = [None] * len(x)
        if self.psf is None:
            return out
        inside = np.array([self.box.x0 <= a < self.box.x1 and self.box.y0 <= b < self.box.y1 for a, b in zip(x, y)],
                          bool)
        if not inside.any():
            return out
        # only calexp inputs get here: a warp's PSF is already on the output grid (_component)
        idx = np.flatnonzero(inside)
        xi, yi, jac = _node_mapping(out_cards, self.in_cards, self.in_shape, np.asarray(x)[idx], np.asarray(y)[idx])
        ny, nx = self.in_shape
        for j, k in enumerate(idx):
            if not (np.isfinite(xi[j]) and np.isfinite(yi[j]) and -0.5 <= xi[j] <= nx - 0.5
                    and -0.5 <= yi[j] <= ny - 0.5):
                continue
            ker = self.psf.kernel(float(xi[j]) + self.in_xy0[0], float(yi[j]) + self.in_xy0[1])
            out[k] = kw.warp_kernel_image(ker, jac[j], order=order)
        return out


def _grid_psf(inputs: Sequence[_PsfInput], weights, out_cards, region: Box, xy0, step: int, order: int):
    """The weighted sum of the inputs' warped PSFs on a grid of nodes over ``region``
    (output pixels; ``xy0`` is the parent/tract pixel of output pixel (0, 0)).

    At every node only the inputs that cover it contribute, each with its coadd weight
    (LSST ``CoaddPsf``, Jee & Tyson 2011); nodes covered by no input are marked invalid.
    Returns a :class:`GridImagePsf` in the output's parent (tract) pixel frame, or None.
    """
    if not inputs or all(p.psf is None for p in inputs):
        return None
    gx = psf_grid_nodes(xy0[0] + region.x0, xy0[0] + region.x1, step) - xy0[0]
    gy = psf_grid_nodes(xy0[1] + region.y0, xy0[1] + region.y1, step) - xy0[1]
    xx, yy = np.meshgrid(gx, gy)
    x, y = xx.ravel(), yy.ravel()
    acc: list = [None] * x.size
    tot = np.zeros(x.size)
    for p, wt in zip(inputs, weights):
        if p.psf is None or not (np.isfinite(wt) and wt > 0):
            continue
        for k, ker in enumerate(p.kernels_at(out_cards, xy0, x, y, order)):
            if ker is None:
                continue
            if acc[k] is None:
                acc[k] = wt * ker
            else:
                n = max(acc[k].shape[0], ker.shape[0])
                acc[k] = _pad_to(acc[k], n) + wt * _pad_to(ker, n)
            tot[k] += wt
    valid = tot > 0
    if not valid.any():
        return None
    size = max(a.shape[0] for a in acc if a is not None)
    kernels = np.zeros((x.size, size, size))
    for k in np.flatnonzero(valid):
        kernels[k] = _pad_to(acc[k], size) / tot[k]
    return GridImagePsf(kernels.reshape(gy.size, gx.size, size, size), gx + xy0[0], gy + xy0[1],
                        valid.reshape(gy.size, gx.size))


def _psf_input_of_calexp(exp: Exposure, box: Box) -> _PsfInput:
    return _PsfInput("calexp", exp.psf, box, list(exp.wcs_cards), tuple(exp.shape), tuple(exp.xy0))


def footprint_polygon(exposure: Exposure, out_cards, xy0=(0, 0), n_edge: int = 16) -> np.ndarray | None:
    """Outline of an exposure's pixels on an output grid: (n, 2) vertices in the output's
    parent (tract) pixel frame (``xy0`` = parent pixel of output pixel (0, 0))."""
    from procsky.skymap import footprint_points

    if exposure.wcs is None:
        return None
    ra, dec = footprint_points(exposure.wcs, exposure.shape, n_edge=n_edge)
    x, y = _wcs(out_cards).world_to_pixel_values(ra, dec)
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None
    return np.column_stack([x + xy0[0], y + xy0[1]])


def _component(pin: _PsfInput, out_cards, xy0, step: int, order: int):
    """(PSF in the output's tract frame, footprint polygon) of one coadd input."""
    if pin.psf is None:
        return None, None
    if pin.kind == "warp":
        return pin.psf, pin.polygon
    one = _grid_psf([pin], [1.0], out_cards, pin.box, xy0, step, order)
    return one, pin.polygon


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
        radius; PSF = the target Gaussian. Made with ``dask.array.map_overlap`` (depth =
        kernel radius).
    """
    import dask.array as da

    if exposure.psf is None:
        raise ProcskyValueError("PSF matching needs a PSF model on the exposure")
    fwhm = exposure.psf.fwhm(0.0, 0.0)
    if not target_fwhm > fwhm:
        raise ProcskyValueError(
            f"target FWHM {target_fwhm:.3f} px must exceed the exposure's PSF FWHM {fwhm:.3f} px "
            "(PSF matching only broadens); pick a larger target_fwhm"
        )
    kernel = _psf_matching_kernels([exposure.psf], CoaddConfig(target_fwhm=target_fwhm))[0]
    r = kernel.shape[0] // 2
    corr = kw.lanczos_noise_correlation(3)

    def as_dask(a):
        if _is_dask(a):
            return a if chunk is None else a.rechunk(chunk)
        return da.from_array(np.asarray(a), chunks=chunk or 1024)

    img, var, msk = (as_dask(getattr(exposure, p)) for p in ("image", "variance", "mask"))

    def block(i, v, m, which):
        ci, cv, cm = _convolve_planes(i, v, m, kernel, corr)
        return (ci, cv, cm)[which]

    planes = [da.map_overlap(block, img, var, msk, depth=r, boundary="none", which=k, dtype=dt,
                             meta=np.empty((0, 0), dt))
              for k, dt in enumerate((np.float32, np.float32, np.uint32))]
    meta = dict(exposure.metadata)
    meta["psf_matched_fwhm"] = float(target_fwhm)
    return exposure._replace(image=planes[0], variance=planes[1], mask=planes[2],
                             psf=GaussianPsf.from_fwhm(target_fwhm), metadata=meta)


# ----------------------------------------------------------------------------- coadd
def _matching_kernel(psf_img: np.ndarray, target_img: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Kernel K with K * psf ~= target (Wiener-regularised Fourier division)."""
    n = max(psf_img.shape[0], target_img.shape[0])
    n = n | 1
    p = _pad_to(psf_img, n)
    t = _pad_to(target_img, n)
    P = np.fft.rfft2(np.fft.ifftshift(p))
    T = np.fft.rfft2(np.fft.ifftshift(t))
    K = T * np.conj(P) / (np.abs(P) ** 2 + eps * np.abs(P).max() ** 2)
    k = np.fft.fftshift(np.fft.irfft2(K, s=(n, n)))
    return k / k.sum()


def _pad_to(k, n):
    m = k.shape[0]
    if m == n:
        return k
    if m > n:
        c = (m - n) // 2
        return k[c : c + n, c : c + n]
    out = np.zeros((n, n))
    c = (n - m) // 2
    out[c : c + m, c : c + m] = k
    return out


def _convolve_planes(img, var, msk, kernel, corr: float = 1.0, min_cover: float = 0.3):
    """PSF-match a strip: convolve image with K and variance with K^2.

    Normalised convolution over the valid pixels (Knutsson & Westin 1993), so that data
    next to a NO_DATA region or the strip edge is still matched; pixels whose kernel covers
    less than ``min_cover`` of valid weight become NO_DATA.
    """
    from scipy.signal import fftconvolve

    bad = ~(np.isfinite(img) & np.isfinite(var)) | ((msk & _NO_DATA) != 0)
    valid = (~bad).astype(np.float64)
    i = np.where(bad, 0.0, img)
    v = np.where(bad, 0.0, var)
    cover = fftconvolve(valid, kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = fftconvolve(i, kernel, mode="same") / cover
        # Var(sum K x) = sum K^2 V only for independent pixels; warped pixels are
        # positively correlated by the Lanczos kernel, which ``corr`` accounts for.
        cv = fftconvolve(v, kernel * kernel, mode="same") * corr / (cover * cover)
    cm = msk.copy()
    lost = ~(cover >= min_cover) | bad
    ci[lost] = np.nan
    cv[lost] = np.nan
    cm[lost] |= _NO_DATA
    return ci.astype(np.float32), cv.astype(np.float32), cm


def _coadd_chunk(box: Box, sources: list, parts: list, weights, kernels: list, cfg: CoaddConfig, bits: dict):
    """Coadd of one output chunk: image, variance, mask, n_inputs."""
    weights = np.asarray(weights, float)
    n_src = len(sources)
    w = np.array([weights[s.weight_index] for s in sources], float) if n_src else np.zeros(0)
    if n_src == 0:
        return (np.full(box.shape, np.nan, np.float32), np.full(box.shape, np.nan, np.float32),
                np.full(box.shape, _NO_DATA, np.uint32), np.zeros(box.shape, np.int32))
    bad, nod, rej, clipped = bits["bad"], bits["no_data"], bits["rejected"], bits["clipped"]
    if cfg.statistic == "mean" and not cfg.reject_artifacts:
        acc = kc.MeanAccumulator(box.shape, bad)
        for s, p, wt in zip(sources, parts, w):
            acc.add(*s.read(box, p), wt)
        return acc.result(nod)
    if cfg.statistic == "mean":
        return _coadd_chunk_streaming(box, sources, parts, w, kernels, cfg, bits)
    halo = max((k.shape[0] // 2 for k in kernels if k is not None), default=0) if cfg.reject_artifacts else 0
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
                        ci[k], cv[k], cm[k] = _convolve_planes(imgs[k], vars_[k], msks[k], kernels[k],
                                                               kw.lanczos_noise_correlation(cfg.warp.order))
            else:
                ci, cv, cm = imgs, vars_, msks
            rejected = kc.find_artifacts(ci, cv, cm, bad_bits=bad, threshold=cfg.artifact_threshold,
                                         max_epochs=cfg.artifact_max_epochs, max_fraction=cfg.artifact_max_fraction,
                                         grow=cfg.artifact_grow, model_error=cfg.artifact_model_error,
                                         error_radius=halo - cfg.artifact_grow)
        inner = strip.shifted(-big.x0, -big.y0).slices()
        sl = (slice(None),) + inner
        ii, vv, mm, nn = kc.combine_stack(
            imgs[sl], vars_[sl], msks[sl], w, statistic=cfg.statistic, bad_bits=bad, no_data_bit=nod,
            clip_sigma=cfg.clip_sigma, clip_iter=cfg.clip_iter,
            rejected=None if rejected is None else rejected[sl], rejected_bit=rej,
        )
        if rejected is not None:
            # Mark CLIPPED where an input was rejected as an artifact.
            mm[(rejected[sl]).any(axis=0)] |= np.uint32(clipped)
        dst = strip.shifted(-box.x0, -box.y0).slices()
        out_i[dst], out_v[dst], out_m[dst], out_n[dst] = ii, vv, mm, nn
    return out_i, out_v, out_m, out_n


def _coadd_chunk_streaming(box: Box, sources, parts, w, kernels, cfg: CoaddConfig, bits: dict):
    """Weighted mean with CompareWarp-style artifact rejection, one visit in memory at a time.

    Three passes over the visits (each re-reads its source): (1) a trimmed-mean static
    sky model of the PSF-matched warps; (2) each visit's outlier pixels against it (kept
    sparse) and the per-pixel count of outlier epochs; (3) per visit, the artifact regions
    (few-epoch outliers, grown) are excluded while accumulating the weighted mean.
    """
    bad, nod = bits["bad"], bits["no_data"]
    use_k = cfg.psf_match and any(k is not None for k in kernels)
    r = max((k.shape[0] // 2 for k in kernels if k is not None), default=0) if use_k else 0
    halo = r + cfg.artifact_grow
    big = box.grown(halo)
    corr = kw.lanczos_noise_correlation(cfg.warp.order)

    # Keep each visit's planes between passes only when they all fit the memory budget
    # (then each source is read once); otherwise re-read them in every pass.
    keep = len(sources) * big.ny * big.nx * 4 * 6 <= cfg.memory_budget
    raw_cache: dict = {}
    matched_cache: dict = {}

    def raw(k, b):
        if k in raw_cache:
            i, v, m = raw_cache[k]
        else:
            i, v, m = sources[k].read(big, parts[k])
            if keep:
                raw_cache[k] = (i, v, m)
        if b is big:
            return i, v, m
        sl = b.shifted(-big.x0, -big.y0).slices()
        return i[sl], v[sl], m[sl]

    def matched(k):
        if k in matched_cache:
            return matched_cache[k]
        i, v, m = raw(k, big)
        if use_k and kernels[k] is not None:
            i, v, m = _convolve_planes(i, v, m, kernels[k], corr)
        good = ((m & np.uint32(bad)) == 0) & np.isfinite(i) & np.isfinite(v)
        if keep:
            matched_cache[k] = (i, v, good)
        return i, v, good

    model_acc = kc.TrimmedMeanAccumulator(big.shape, cfg.artifact_max_epochs)
    for k in range(len(sources)):
        model_acc.add(*matched(k))
    model, vmodel, n_good = model_acc.result()
    scale = kc.local_peak(model, r) if cfg.artifact_model_error > 0 else None
    n_out = np.zeros(big.shape, np.int32)
    sparse = []
    for k in range(len(sources)):
        i, v, g = matched(k)
        matched_cache.pop(k, None)
        sig = kc.significance(i, v, g, model, vmodel, cfg.artifact_model_error, scale)
        out = g & (np.abs(sig) > cfg.artifact_threshold)
        n_out += out
        idx = np.flatnonzero(out)
        sparse.append((idx, sig.ravel()[idx].astype(np.float32)))
    transient = kc.transient_pixels(n_out, n_good, max_epochs=cfg.artifact_max_epochs,
                                    max_fraction=cfg.artifact_max_fraction, min_inputs=3)
    acc = kc.MeanAccumulator(box.shape, bad)
    inner = box.shifted(-big.x0, -big.y0).slices()
    clipped_any = np.zeros(box.shape, bool)
    for k, ((idx, sv), wt) in enumerate(zip(sparse, w)):
        rejected = None
        if idx.size:
            out = np.zeros(big.shape, bool)
            sig = np.zeros(big.shape, np.float32)
            out.ravel()[idx] = True
            sig.ravel()[idx] = sv
            rejected = kc.artifact_regions(out, sig, transient, cfg.artifact_grow)[inner]
        i, v, m = raw(k, box)
        raw_cache.pop(k, None)
        if rejected is not None:
            rejected &= np.isfinite(i)
            clipped_any |= rejected
        acc.add(i, v, m, wt, rejected=rejected)
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
        import dask

        w = self.weights
        if _is_dask(w) or hasattr(w, "dask"):
            w = dask.compute(w)[0]
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
            p, poly = _component(pin, self.wcs_cards, self.xy0, self.config.warp.psf_grid_step,
                                 self.config.warp.order)
            if p is None:
                continue
            psfs.append(p)
            wts.append(float(wt))
            polys.append(poly)
        if not psfs:
            return None
        return CoaddPsf(psfs, wts, polys)

    def to_exposure(self, *, band: str | None = None) -> Exposure:
        """The coadd as an :class:`Exposure` with lazy planes (weights and PSF computed)."""
        w = self.resolved_weights()
        meta = dict(self.metadata)
        meta["weights"] = [float(x) for x in w]  # per input, in input order: see "input_visits"
        from procsky.exposure import VisitInfo

        vi = VisitInfo(band=band or meta.get("band", "")) if (band or meta.get("band")) else None
        planes = _masks.DEFAULT_PLANES
        return Exposure(self.image, self.variance, self.mask, wcs_cards=self.wcs_cards, psf=self.psf(w),
                        visit_info=vi, metadata=meta, mask_planes=planes, xy0=self.xy0)

    def write(self, path, *, batch: int = 16, overwrite: bool = True, band: str | None = None):
        """Write to a Zarr v3 exposure (plus an ``n_inputs`` array), ``batch`` chunks at a time.

        Returns the path.
        """
        group = self.create_store(path, overwrite=overwrite, band=band)
        self.write_chunks(group, batch=batch)
        return path

    def create_store(self, path, *, overwrite: bool = True, band: str | None = None):
        """Create the Zarr exposure with its attributes (weights, coadd PSF, WCS): the
        client-side part of :meth:`write`, whose size grows with the number of inputs (the
        coadd PSF keeps one warped PSF per input). Returns the Zarr group."""
        exp = self.to_exposure(band=band)
        attrs = exp.attributes()
        group = create_zarr_exposure(path, self.image.shape, (self.chunk, self.chunk), attrs, overwrite=overwrite)
        group.create_array("n_inputs", shape=self.image.shape, chunks=(self.chunk, self.chunk), dtype=np.int32,
                           fill_value=0, dimension_names=("y", "x"))
        return group

    def write_chunks(self, group, *, batch: int = 16):
        """Compute and write the planes into ``group`` (from :meth:`create_store`),
        ``batch`` storage chunks at a time; memory per batch does not grow with the
        number of inputs."""
        import dask

        ny, nx = self.image.shape
        boxes = [b for row in _chunk_boxes(Box(0, 0, nx, ny), self.chunk) for b in row]
        for k in range(0, len(boxes), batch):
            part = boxes[k : k + batch]
            blocks = dask.compute(*[(self.image[b.slices()], self.variance[b.slices()], self.mask[b.slices()],
                                     self.n_inputs[b.slices()]) for b in part])
            for b, (i, v, m, n) in zip(part, blocks):
                write_zarr_region(group, b.y0, b.x0, {"image": i, "variance": v, "mask": m})
                group["n_inputs"][b.slices()] = n


def _bits(cfg: CoaddConfig) -> dict:
    p = _masks.DEFAULT_PLANES
    return {
        "bad": p.bitmask(cfg.bad_mask_planes),
        "no_data": p.bitmask("NO_DATA"),
        "rejected": p.bitmask("REJECTED"),
        "clipped": p.bitmask("CLIPPED"),
    }


def build_coadd(inputs: Sequence[Exposure], patch: PatchInfo | None = None, *, out_cards=None, out_shape=None,
                xy0=(0, 0), config: CoaddConfig | None = None, weights=None, inputs_are_warps: bool | None = None,
                chunk: int | None = None) -> LazyCoadd:
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
            box = Box(exp.xy0[0] - xy0[0], exp.xy0[1] - xy0[1], exp.xy0[0] - xy0[0] + exp.shape[1],
                      exp.xy0[1] - xy0[1] + exp.shape[0])
            if box.intersection(full).empty:
                continue
            remap = None if exp.mask_planes == _masks.DEFAULT_PLANES else (exp.mask_planes, _masks.DEFAULT_PLANES)
            src = _GridSource(box=box, visit=_visit_of(exp), weight_index=len(sources),
                              image=_plane_store(exp.image), variance=_plane_store(exp.variance),
                              mask=_plane_store(exp.mask), remap=remap)
            poly = exp.metadata.get("footprint")
            if poly is None and not hasattr(exp.psf, "covers"):
                poly = [[xy0[0] + box.x0 - 0.5, xy0[1] + box.y0 - 0.5], [xy0[0] + box.x1 - 0.5, xy0[1] + box.y0 - 0.5],
                        [xy0[0] + box.x1 - 0.5, xy0[1] + box.y1 - 0.5], [xy0[0] + box.x0 - 0.5, xy0[1] + box.y1 - 0.5]]
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
                med = dask.delayed(_median_variance_of)(_sub(exp.variance)) if z is None else \
                    _median_variance_of(_sub(z)[...])
        else:
            box = source_box(exp, out_cards, out_shape)
            if box is None:
                continue
            src = _make_warp_source(exp, out_cards, config.warp, box, len(sources))
            cx, cy = (box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0
            psf = _warped_psf(exp, out_cards, cx, cy, config.warp.order)
            pin = _psf_input_of_calexp(exp, box)
            pin.polygon = footprint_polygon(exp, out_cards, xy0)
            scale2 = (src.calibration * _area_at(out_cards, exp, cx, cy)) ** 2
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
    kernels = _psf_matching_kernels(psfs, config) if (config.reject_artifacts and config.psf_match) else \
        [None] * len(sources)
    bits = _bits(config)
    boxes = _chunk_boxes(full, chunk)
    token = dask.base.tokenize(out_cards, out_shape, [s.box for s in sources], config.model_dump(),
                               [id(e) for e in inputs], chunk)
    halo = (max((k.shape[0] // 2 for k in kernels if k is not None), default=0) + config.artifact_grow
            if config.reject_artifacts else 0)
    # Sources, kernels and the configuration are literal graph nodes shared by the chunk
    # tasks that overlap them (traverse=False: dask must not walk into their arrays).
    src_d = [dask.delayed(s, traverse=False, name=f"coadd-source-{token}-{k}") for k, s in enumerate(sources)]
    ker_d = [None if k is None else dask.delayed(k, traverse=False, name=f"coadd-kernel-{token}-{i}")
             for i, k in enumerate(kernels)]
    cfg_d = dask.delayed(config, traverse=False, name=f"coadd-config-{token}")
    tasks = []
    for row in boxes:
        trow = []
        for b in row:
            near = b.grown(halo) if halo else b
            idx = [k for k, s in enumerate(sources) if s.box.overlaps(near)]
            parts = [sources[k].dask_parts(near) if sources[k].needs_dask() else None for k in idx]
            key = f"coadd-chunk-{token}-{b.x0}-{b.y0}"
            trow.append(dask.delayed(_coadd_chunk, pure=True)(
                b, [src_d[k] for k in idx], parts, wobj, [ker_d[k] for k in idx], cfg_d, bits, dask_key_name=key))
        tasks.append(trow)
    img, var, msk, nin = _assemble(tasks, boxes, (np.float32, np.float32, np.uint32, np.int32),
                                   ("coadd-image", "coadd-variance", "coadd-mask", "coadd-n-inputs"))
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
    return LazyCoadd(img, var, msk, nin, wobj, list(out_cards), tuple(int(v) for v in xy0),
                     visits, psf_inputs, chunk, meta, config)


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
            fwhms.append(p.fwhm(0.0, 0.0))
        except ProcskyValueError:
            continue
    if not fwhms:
        return [None] * len(psfs)
    target_fwhm = config.target_fwhm or 1.1 * max(fwhms)
    out = []
    for p in psfs:
        if p is None:
            out.append(None)
            continue
        n = max(p.size, int(2 * math.ceil(2.5 * target_fwhm)) + 1) | 1
        target = GaussianPsf.from_fwhm(target_fwhm, size=n).kernel()
        k = _matching_kernel(p.kernel(0.0, 0.0), target)
        # Trim to where the kernel has weight (faster convolution).
        r = min(n // 2, int(math.ceil(2.0 * target_fwhm)))
        c = k.shape[0] // 2
        k = k[c - r : c + r + 1, c - r : c + r + 1]
        out.append(k / k.sum())
    return out
