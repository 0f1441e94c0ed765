"""Warping: calexps resampled onto a sky grid (a patch) as lazy dask arrays.

The numerical work (Lanczos resampling, spline interpolation of the pixel mapping, PSF
kernel warping) is in :mod:`procsky.kernels.warp`; this module evaluates the WCS pixel
mappings, describes the per-chunk work as *sources* and builds the dask arrays through
:mod:`procsky._dask`. The coadd (:mod:`procsky.coadd`) reads the same sources to warp
calexps on the fly.

* An output chunk is one dask task, which receives only the small picklable source of the
  input (never the whole input); Zarr-backed dask inputs are read directly from their
  Zarr arrays inside the task, other dask inputs become task dependencies.
* A warp's PSF is a :class:`procsky.psf.GridImagePsf`: the input PSF warped onto the
  output frame on a grid of positions, valid where the input has data; its footprint
  polygon tells the coadd PSF where the input contributes (LSST's ``CoaddPsf``).

Public API: :class:`WarpConfig`, :func:`warp_exposure`, :func:`pixel_mapping`,
:func:`source_box`, :func:`footprint_polygon`, :func:`psf_grid_nodes`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydantic

from procsky import _dask
from procsky import masks as _masks
from procsky.errors import NoWorkError, ProcskyValueError
from procsky.exposure import Exposure
from procsky.kernels import warp as kw
from procsky.psf import GridImagePsf, ImagePsf, PsfModel
from procsky.skymap import Box
from procsky.wcs import wcs_from_cards

__all__ = [
    "WarpConfig",
    "footprint_polygon",
    "pixel_mapping",
    "psf_grid_nodes",
    "source_box",
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


# ----------------------------------------------------------------------------- mapping
_LOCAL = threading.local()


def _wcs(cards: Sequence, shape: tuple[int, int] | None = None) -> Any:
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


def pixel_mapping(
    out_cards: Sequence, in_cards: Sequence, box: Box, *, grid_step: int = 32, in_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
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
    xin, yin, _ = _mapping(out_cards, in_cards, box, grid_step, in_shape, area=False)
    return xin, yin


def _exact_mapping(out_cards: Sequence, in_cards: Sequence, in_shape, x, y) -> tuple[np.ndarray, np.ndarray]:
    ra, dec = _wcs(out_cards).pixel_to_world_values(x, y)
    with np.errstate(all="ignore"):
        xi, yi = _wcs(in_cards, in_shape).world_to_pixel_values(ra, dec)
    return np.asarray(xi, float), np.asarray(yi, float)


def _mapping_nodes(
    out_cards: Sequence, in_cards: Sequence, box: Box, grid_step: int, in_shape: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The grid (``gx, gy``, output pixels) on which the mapping of ``box`` is evaluated
    exactly (``xi, yi``, input pixels), or None when it must be evaluated at every pixel
    (``grid_step`` 0, a box too small for a grid, a mapping undefined at some node)."""
    if grid_step <= 0 or (box.nx <= 4 * grid_step and box.ny <= 4 * grid_step and box.nx * box.ny <= 4096):
        return None

    def grid(lo, hi):
        n = max(4, int(math.ceil((hi - 1 - lo) / grid_step)) + 1)
        return np.linspace(lo, hi - 1, n) if hi - lo > 1 else np.array([lo - 1.0, lo, lo + 1.0, lo + 2.0])

    gx, gy = grid(box.x0, box.x1), grid(box.y0, box.y1)
    gxx, gyy = np.meshgrid(gx, gy)
    xi, yi = _exact_mapping(out_cards, in_cards, in_shape, gxx, gyy)
    if not (np.all(np.isfinite(xi)) and np.all(np.isfinite(yi))):
        return None
    return gx, gy, xi, yi


def _mapping(
    out_cards: Sequence,
    in_cards: Sequence,
    box: Box,
    grid_step: int,
    in_shape: tuple[int, int] | None,
    *,
    area: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`pixel_mapping` and (``area=True``) the output-to-input pixel area ratio
    ``|det d(xin, yin)/d(x, y)|`` at every pixel of ``box``: from the mapping grid's splines
    (:func:`procsky.kernels.warp.interpolate_mapping`), or, where the mapping is evaluated
    exactly, by central differences of the exact mapping on the box grown by one pixel
    (so that strips one pixel wide get their area too)."""
    nodes = _mapping_nodes(out_cards, in_cards, box, grid_step, in_shape)
    if nodes is None:
        return _exact_box_mapping(out_cards, in_cards, box, in_shape, area=area)
    gx, gy, xi, yi = nodes
    xs = np.arange(box.x0, box.x1, dtype=float)
    ys = np.arange(box.y0, box.y1, dtype=float)
    if not area:
        return kw.interpolate_grid(gx, gy, xi, xs, ys), kw.interpolate_grid(gx, gy, yi, xs, ys), None
    return kw.interpolate_mapping(gx, gy, xi, yi, xs, ys)


def _exact_box_mapping(
    out_cards: Sequence, in_cards: Sequence, box: Box, in_shape: tuple[int, int] | None, *, area: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The exact mapping at every pixel of ``box`` and (``area=True``) the area ratio by
    central differences on the box grown by one pixel."""
    g = 1 if area else 0
    xx, yy = np.meshgrid(np.arange(box.x0 - g, box.x1 + g, dtype=float), np.arange(box.y0 - g, box.y1 + g, dtype=float))
    xi, yi = _exact_mapping(out_cards, in_cards, in_shape, xx, yy)
    if not area:
        return xi, yi, None
    with np.errstate(invalid="ignore"):
        ratio = kw.area_ratio(xi, yi)[1:-1, 1:-1]
    return xi[1:-1, 1:-1], yi[1:-1, 1:-1], ratio


def _jacobian(
    out_cards: Sequence, in_cards: Sequence, x: float, y: float, in_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """d(x_in, y_in)/d(x_out, y_out) at output pixel (x, y), by central differences."""
    b = Box(int(math.floor(x)) - 1, int(math.floor(y)) - 1, int(math.floor(x)) + 2, int(math.floor(y)) + 2)
    xi, yi = pixel_mapping(out_cards, in_cards, b, grid_step=0, in_shape=in_shape)
    return np.array(
        [[(xi[1, 2] - xi[1, 0]) / 2, (xi[2, 1] - xi[0, 1]) / 2], [(yi[1, 2] - yi[1, 0]) / 2, (yi[2, 1] - yi[0, 1]) / 2]]
    )


# ----------------------------------------------------------------------------- sources
def _zarr_of(arr: Any) -> Any:
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


_is_dask = _dask.is_dask


def _plane_store(a: Any) -> Any:
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

    def dask_parts(self, box: Box) -> Any:
        return None

    def read(self, box: Box, parts: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image, variance and mask of the source on output pixels ``box`` (NaN/NO_DATA
        where it has no data); ``parts`` are the dask dependencies of :meth:`dask_parts`."""
        raise NotImplementedError

    def accumulate(self, box: Box, parts: Any, acc: Any, weight: float) -> None:
        """Add the source's pixels on output pixels ``box`` to a weighted-mean accumulator
        (:class:`procsky.kernels.coadd.MeanAccumulator` over ``box``) with ``weight``."""
        i, v, m = self.read(box, parts)
        acc.add(i, v, m, weight)


@dataclass
class _WarpSource(_Source):
    """A calexp resampled on the fly; ``box`` is its footprint on the output grid."""

    image: Any = None
    variance: Any = None
    mask: Any = None
    in_cards: list = field(default_factory=list)
    in_shape: tuple = (0, 0)
    out_cards: list = field(default_factory=list)
    calibration: float = 1.0
    warp: WarpConfig = WarpConfig()
    remap: Any = None

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
        reg = Box(
            max(0, int(np.floor(xi[ok].min())) - a),
            max(0, int(np.floor(yi[ok].min())) - a),
            min(nx, int(np.ceil(xi[ok].max())) + a + 1),
            min(ny, int(np.ceil(yi[ok].max())) + a + 1),
        )
        return None if reg.empty else reg

    def _inputs(self, box: Box, parts=None):
        """What warping ``box`` needs: (the part of ``box`` the source covers, the mapping
        grid or None, the exact mapping and area where there is no grid, the input region
        and its image, variance and mask), or None when the source has no pixel there."""
        inter = box.intersection(self.box)
        if inter.empty:
            return None
        nodes = _mapping_nodes(self.out_cards, self.in_cards, inter, self.warp.grid_step, self.in_shape)
        exact = None
        if nodes is None:
            exact = _exact_box_mapping(self.out_cards, self.in_cards, inter, self.in_shape)
            mapping = exact[:2]
        else:
            mapping = (nodes[2], nodes[3])  # the nodes include the box edges: enough for the region
        if parts is not None:
            reg, img, var, msk = parts
            # The dependency covers the region for the whole requested box; crop to ours.
            img, var, msk = np.asarray(img), np.asarray(var), np.asarray(msk)
        else:
            reg = self._input_region(inter, mapping)
            if reg is None:
                return None
            sl = reg.slices()
            img, var, msk = (np.asarray(p[sl]) for p in (self.image, self.variance, self.mask))
        if self.remap is not None:
            msk = self.remap[0].remap(msk.astype(np.uint32), self.remap[1])
        return inter, nodes, exact, reg, img, var, msk

    def read(self, box: Box, parts=None):
        return self._warp_planes(box, self._inputs(box, parts))

    def _grid_args(
        self, inter: Box, nodes, img, var, msk
    ) -> tuple[Any, Any, Any, Any, Any, Any, Any, np.ndarray, np.ndarray]:
        """The leading arguments of the grid kernels (``warp_planes_grid``, ``warp_grid_accumulate``)."""
        gx, gy, xi, yi = nodes
        xs = np.arange(inter.x0, inter.x1, dtype=float)
        ys = np.arange(inter.y0, inter.y1, dtype=float)
        return img, var, msk, gx, gy, xi, yi, xs, ys

    def _warp_planes(self, box: Box, got):
        """Warped image, variance and mask of ``box`` from :meth:`_inputs`' result ``got``."""
        out_img = np.full(box.shape, np.nan, np.float32)
        out_var = np.full(box.shape, np.nan, np.float32)
        out_msk = np.full(box.shape, _NO_DATA, np.uint32)
        if got is None:
            return out_img, out_var, out_msk
        inter, nodes, exact, reg, img, var, msk = got
        order, radius = self.warp.order, self.warp.mask_radius
        if nodes is None:
            xin, yin, area = exact
            wi, wv, wm = kw.warp_planes(
                img,
                var,
                msk,
                xin - reg.x0,
                yin - reg.y0,
                self.calibration * area,
                order=order,
                mask_radius=radius,
                no_data_bit=_NO_DATA,
            )
        else:
            # Mapping splines and pixel area evaluated inside the kernel, row by row.
            wi, wv, wm = kw.warp_planes_grid(
                *self._grid_args(inter, nodes, img, var, msk),
                offset=(reg.x0, reg.y0),
                calibration=self.calibration,
                order=order,
                mask_radius=radius,
                no_data_bit=_NO_DATA,
            )
        dst = inter.shifted(-box.x0, -box.y0).slices()
        out_img[dst], out_var[dst], out_msk[dst] = wi, wv, wm
        return out_img, out_var, out_msk

    def accumulate(self, box: Box, parts: Any, acc: Any, weight: float) -> None:
        """Warp straight into the accumulator (:func:`procsky.kernels.warp.warp_grid_accumulate`:
        each warped row is added as it is made, the input region read once, no warped
        planes); the sums are bit-identical to ``acc.add(*self.read(box, parts), weight)``.
        Boxes whose mapping is evaluated exactly (no grid) take that path."""
        got = self._inputs(box, parts)
        if got is None:
            return
        inter, nodes, exact, reg, img, var, msk = got
        if nodes is None:  # the planes of the inputs already read, not a second read
            i, v, m = self._warp_planes(box, got)
            acc.add(i, v, m, weight)
            return
        kw.warp_grid_accumulate(
            *self._grid_args(inter, nodes, img, var, msk),
            (acc.sw, acc.swi, acc.sw2v, acc.mask_or, acc.n),
            (inter.y0 - box.y0, inter.x0 - box.x0),
            weight,
            int(acc.bad_bits),
            offset=(reg.x0, reg.y0),
            calibration=self.calibration,
            order=self.warp.order,
            mask_radius=self.warp.mask_radius,
            no_data_bit=_NO_DATA,
        )


def _outline_mapping(
    out_cards: Sequence, in_cards: Sequence, box: Box, in_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    n = 9
    xs = np.concatenate(
        [
            np.linspace(box.x0, box.x1 - 1, n),
            np.full(n, box.x1 - 1.0),
            np.linspace(box.x0, box.x1 - 1, n),
            np.full(n, float(box.x0)),
        ]
    )
    ys = np.concatenate(
        [
            np.full(n, float(box.y0)),
            np.linspace(box.y0, box.y1 - 1, n),
            np.full(n, box.y1 - 1.0),
            np.linspace(box.y0, box.y1 - 1, n),
        ]
    )
    ow, iw = _wcs(out_cards), _wcs(in_cards, in_shape)
    ra, dec = ow.pixel_to_world_values(xs, ys)
    with np.errstate(all="ignore"):
        xi, yi = iw.world_to_pixel_values(ra, dec)
    return np.asarray(xi, float), np.asarray(yi, float)


def source_box(
    exposure: Exposure, out_cards: Sequence, out_shape: tuple[int, int], *, chunk: int | None = None
) -> Box | None:
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
    b = Box(
        int(np.floor(x.min())) - 1, int(np.floor(y.min())) - 1, int(np.ceil(x.max())) + 2, int(np.ceil(y.max())) + 2
    ).intersection(full)
    if b.empty:
        return None
    if chunk:
        b = Box(
            b.x0 // chunk * chunk,
            b.y0 // chunk * chunk,
            min(full.x1, -(-b.x1 // chunk) * chunk),
            min(full.y1, -(-b.y1 // chunk) * chunk),
        )
    return b


# ----------------------------------------------------------------------------- chunks
def _chunk_boxes(box: Box, chunk: int) -> list[list[Box]]:
    """Chunk boxes tiling ``box`` (relative grid starting at box origin), row-major."""
    ys = list(range(box.y0, box.y1, chunk))
    xs = list(range(box.x0, box.x1, chunk))
    return [[Box(x, y, min(x + chunk, box.x1), min(y + chunk, box.y1)) for x in xs] for y in ys]


def _warp_chunk(box: Box, source: _Source, parts: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, var, msk = source.read(box, parts)
    return img, var, msk


def _median_variance_of(arr: Any) -> float:
    """Median of the finite, positive values of a (subsampled) variance plane."""
    a = np.asarray(arr, dtype=np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    if a.size == 0:
        return float("nan")
    return float(np.median(a))


def _sub(arr: Any, n: int = 64) -> Any:
    """A strided subsample of a plane (about n x n values) for robust statistics."""
    ny, nx = arr.shape
    return arr[:: max(1, ny // n), :: max(1, nx // n)]


# ----------------------------------------------------------------------------- warp
def warp_exposure(
    calexp: Exposure,
    out_cards: Sequence,
    out_shape: tuple[int, int],
    *,
    xy0: tuple[int, int] = (0, 0),
    config: WarpConfig | None = None,
    full: bool = False,
    metadata: dict | None = None,
) -> Exposure:
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
    img, var, msk = _dask.from_chunk_tasks(
        tasks,
        [[b.shape for b in row] for row in boxes],
        (np.float32, np.float32, np.uint32),
        ("warp-image", "warp-variance", "warp-mask"),
    )
    from procsky.wcs import shift_wcs

    wcs, cards = shift_wcs(wcs_from_cards(out_cards), box.x0, box.y0, list(out_cards))
    wcs = wcs_from_cards(cards, box.shape)
    cx, cy = (box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0
    psf = _grid_psf([_psf_input_of_calexp(calexp, box)], [1.0], out_cards, box, xy0, config.psf_grid_step, config.order)
    med = _calexp_median_variance(calexp)
    scale = src.calibration * _area_at(out_cards, calexp, cx, cy)
    meta = dict(calexp.metadata)
    meta.update(
        {
            "warp_box": box.to_list(),
            "median_variance": None if med is None else float(med * scale * scale),
            "visit": None if calexp.visit_info is None else calexp.visit_info.visit,
            "flux_unit": "nJy" if calexp.photocalib is not None else meta.get("flux_unit", "counts"),
            "lanczos_order": config.order,
        }
    )
    poly = footprint_polygon(calexp, out_cards, xy0)
    if poly is not None:
        meta["footprint"] = poly.tolist()  # outline of the calexp, tract pixels (coadd PSF coverage)
    meta.update(metadata or {})
    return Exposure(
        img,
        var,
        msk,
        wcs=wcs,
        wcs_cards=cards,
        psf=psf,
        photocalib=None,
        visit_info=calexp.visit_info,
        detector=calexp.detector,
        metadata=meta,
        mask_planes=_masks.DEFAULT_PLANES,
        xy0=(int(xy0[0]) + box.x0, int(xy0[1]) + box.y0),
    )


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


def _area_at(out_cards: Sequence, exp: Exposure, x: float, y: float) -> float:
    jac = _jacobian(out_cards, exp.wcs_cards, x, y, exp.shape)
    return float(abs(np.linalg.det(jac)))


def _make_warp_source(calexp: Exposure, out_cards: Sequence, config: WarpConfig, box: Box, widx: int) -> _WarpSource:
    if calexp.wcs is None:
        raise ProcskyValueError("cannot warp an exposure without a WCS; run calibrate (astrometry) first")
    remap = None
    if calexp.mask_planes != _masks.DEFAULT_PLANES:
        remap = (calexp.mask_planes, _masks.DEFAULT_PLANES)
    cal = calexp.photocalib.calibration if calexp.photocalib is not None else 1.0
    return _WarpSource(
        box=box,
        visit=None if calexp.visit_info is None else calexp.visit_info.visit,
        weight_index=widx,
        image=_plane_store(calexp.image),
        variance=_plane_store(calexp.variance),
        mask=_plane_store(calexp.mask),
        in_cards=list(calexp.wcs_cards),
        in_shape=tuple(calexp.shape),
        out_cards=list(out_cards),
        calibration=float(cal),
        warp=config,
        remap=remap,
    )


# Sub-pixel phases per axis over which a warped PSF is averaged (see _warped_kernel).
PSF_WARP_PHASES = 2


def _warped_kernel(psf: PsfModel, x: float, y: float, jac: np.ndarray, order: int) -> np.ndarray:
    """The PSF at input position (x, y) (parent pixels) as the image warp renders a star,
    in output pixels: averaged over the sub-pixel phases at which the warp samples the input.

    A Lanczos warp that samples the input at phase ``f`` applies the discrete filter
    ``L(n + f)`` to every star there, so a warped star is its PSF smoothed by that filter
    (undersampled stars, FWHM < 2.5 px, lose several per cent of their peak at half-pixel
    phases); warping the PSF kernel at phase 0 is the identity and misses it, and a coadd
    PSF built that way is sharper than the coadd's stars (PSF fluxes 2 % low on the
    ``undersampled`` regime). The phase drifts across an input (a 0.3 % scale difference
    between a detector and the patch cycles it every ~300 px), faster than a PSF grid can
    follow, so the kernel is the mean over ``PSF_WARP_PHASES``^2 phases uniform in the pixel:
    each star's smoothing then scatters about it instead of being missed on average
    (LSST's ``WarpedPsf`` warps the kernel at a single phase). The smoothing is a smooth,
    even function of the phase, so 2 phases per axis (+-1/4 px) give the mean of 8 to 2e-4
    in PSF flux. On a warp of Gaussian stars (phase-averaged), a PSF fit with the phase-0
    kernel gives fluxes 3.5 % low at FWHM 1.4 px and 0.5 % low at 1.7 px, but 0.3-0.4 %
    high at 2-3 px and 0.2 % (3.5 px) to 0.1 % (4.5 px) high: Lanczos-3 slightly sharpens
    moderately sampled stars at half-pixel phases.
    """
    n = PSF_WARP_PHASES
    phases = (np.arange(n) + 0.5) / n - 0.5
    acc = None
    for fy in phases:
        for fx in phases:
            k = psf.render(x, y, offset=(float(fx), float(fy)))
            w = kw.warp_kernel_image(k, jac, order=order, offset=(float(fx), float(fy)))
            acc = w if acc is None else acc + w
    assert acc is not None
    return acc / acc.sum()


def _warped_psf(exp: Exposure, out_cards: Sequence, x: float, y: float, order: int) -> PsfModel | None:
    """The exposure's PSF at output pixel (x, y), resampled into the output frame."""
    if exp.psf is None:
        return None
    jac = _jacobian(out_cards, exp.wcs_cards, x, y, exp.shape)
    ow = _wcs(out_cards)
    ra, dec = ow.pixel_to_world_values(x, y)
    xi, yi = exp.wcs.world_to_pixel_values(ra, dec)
    # PSF models use parent-detector coordinates.
    img = _warped_kernel(exp.psf, float(xi) + exp.xy0[0], float(yi) + exp.xy0[1], jac, order)
    return ImagePsf(img)


def psf_grid_nodes(lo: int, hi: int, step: int) -> np.ndarray:
    """Node positions of a PSF grid over pixels ``lo .. hi - 1`` (parent/tract frame).

    The multiples of ``step`` inside the range plus both ends, so that grids of different
    boxes (warps of several detectors, a coadd of those warps) share their inner nodes. A
    range with no inner multiple also gets its middle: from its two ends alone, the PSF at
    the centre of a small patch was the mean of its corners' (PSFs widening from the optical
    axis: 5 % too large in second moments, coadd PSF fluxes 1.4 % high on the ``correlated``
    regime's 430 px patch).
    """
    lo, hi = int(lo), int(hi) - 1
    inner = np.arange(-(-lo // step) * step, hi + 1, step)
    nodes = np.unique(np.concatenate([[lo], inner, [hi]]).astype(float))
    if nodes.size == 2 and hi - lo >= 64:
        nodes = np.array([lo, 0.5 * (lo + hi), hi], float)
    return nodes


def _node_mapping(
    out_cards: Sequence, in_cards: Sequence, in_shape: tuple[int, int], x: Any, y: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    def kernels_at(
        self, out_cards: Sequence, xy0: tuple[int, int], x: Any, y: Any, order: int
    ) -> list[np.ndarray | None]:
        """Kernels (or None where not covered) at output pixels (x, y), 1-d arrays."""
        out: list[np.ndarray | None] = [None] * len(x)
        if self.psf is None:
            return out
        inside = np.array(
            [self.box.x0 <= a < self.box.x1 and self.box.y0 <= b < self.box.y1 for a, b in zip(x, y)], bool
        )
        if not inside.any():
            return out
        # only calexp inputs get here: a warp's PSF is already on the output grid (_component)
        idx = np.flatnonzero(inside)
        xi, yi, jac = _node_mapping(out_cards, self.in_cards, self.in_shape, np.asarray(x)[idx], np.asarray(y)[idx])
        ny, nx = self.in_shape
        for j, k in enumerate(idx):
            if not (
                np.isfinite(xi[j]) and np.isfinite(yi[j]) and -0.5 <= xi[j] <= nx - 0.5 and -0.5 <= yi[j] <= ny - 0.5
            ):
                continue
            out[k] = _warped_kernel(
                self.psf, float(xi[j]) + self.in_xy0[0], float(yi[j]) + self.in_xy0[1], jac[j], order
            )
        return out


def _grid_psf(
    inputs: Sequence[_PsfInput],
    weights: Sequence[float],
    out_cards: Sequence,
    region: Box,
    xy0: tuple[int, int],
    step: int,
    order: int,
) -> GridImagePsf | None:
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
    from procsky.kernels.psfmatch import pad_kernel  # here: a plain warp needs none of psfmatch's kernels

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
                acc[k] = pad_kernel(acc[k], n) + wt * pad_kernel(ker, n)
            tot[k] += wt
    valid = tot > 0
    if not valid.any():
        return None
    size = max(a.shape[0] for a in acc if a is not None)
    kernels = np.zeros((x.size, size, size))
    for j in np.flatnonzero(valid):
        kernels[j] = pad_kernel(acc[j], size) / tot[j]
    return GridImagePsf(
        kernels.reshape(gy.size, gx.size, size, size), gx + xy0[0], gy + xy0[1], valid.reshape(gy.size, gx.size)
    )


def _psf_input_of_calexp(exp: Exposure, box: Box) -> _PsfInput:
    return _PsfInput("calexp", exp.psf, box, list(exp.wcs_cards), tuple(exp.shape), tuple(exp.xy0))


def footprint_polygon(
    exposure: Exposure, out_cards: Sequence, xy0: tuple[int, int] = (0, 0), n_edge: int = 16
) -> np.ndarray | None:
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


def _component(
    pin: _PsfInput, out_cards: Sequence, xy0: tuple[int, int], step: int, order: int
) -> tuple[PsfModel | None, Any]:
    """(PSF in the output's tract frame, footprint polygon) of one coadd input."""
    if pin.psf is None:
        return None, None
    if pin.kind == "warp":
        return pin.psf, pin.polygon
    one = _grid_psf([pin], [1.0], out_cards, pin.box, xy0, step, order)
    return one, pin.polygon
