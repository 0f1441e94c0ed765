"""Sky maps: the tracts and patches that coadds are built on.

A sky map tiles the sky with *tracts*, each a TAN (gnomonic) projection centred on its own
point, cut into *patches* of ``patch_inner`` x ``patch_inner`` pixels; each patch's outer
box adds a ``patch_border`` on every side so that neighbouring patches overlap (objects
near an inner edge are measured whole in one of them). Two kinds:

``rings``
    After LSST's ``RingsSkyMap`` (skymap package, ``ringsSkyMap.py``): the sphere is cut
    into ``num_rings`` rings of equal declination height ``pi / (num_rings + 1)`` plus a
    polar cap tract at each pole; each ring holds as many tracts of equal RA width as are
    needed for that width to be at most the ring height at the ring's widest latitude.
    Tract ids run from the south cap (0) northwards, RA increasing within a ring. Each tract
    covers its own cell plus ``tract_overlap`` degrees on each side. The default
    ``num_rings=120`` gives tracts about 1.49 deg across.
``discrete``
    Tracts at user-given centres with a given radius (small fields, tests, targeted data).

Pixel conventions follow procsky: arrays ``[y, x]``, 0-based integer pixel centres. Tract
pixel coordinates run over the tract box ``(0, 0)-(nx, ny)``; a patch array's pixel (0, 0)
is tract pixel ``patch.outer.x0, patch.outer.y0`` (its ``xy0``). Patch ids are
``py * n_patches_x + px``, stable integers like tract ids.

A sky map is defined entirely by its :class:`SkyMapConfig`; its SHA-256 hash identifies
the geometry. :func:`register_skymap` stores it in a repository as a ``skymap``
dimension record so that every process rebuilds the same tracts (:func:`load_skymap`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import pydantic

from procsky.errors import ConflictError, ProcskyKeyError, ProcskyValueError

__all__ = [
    "Box",
    "PatchInfo",
    "SkyMap",
    "SkyMapConfig",
    "TractInfo",
    "discrete_skymap",
    "footprint_points",
    "load_skymap",
    "register_skymap",
    "rings_skymap",
]


@dataclass(frozen=True)
class Box:
    """An integer pixel box ``[x0, x1) x [y0, y1)`` (0-based, end exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def nx(self) -> int:
        return self.x1 - self.x0

    @property
    def ny(self) -> int:
        return self.y1 - self.y0

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        return (self.ny, self.nx)

    @property
    def empty(self) -> bool:
        return self.nx <= 0 or self.ny <= 0

    def intersection(self, other: Box) -> Box:
        return Box(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1))

    def overlaps(self, other: Box) -> bool:
        return not self.intersection(other).empty

    def shifted(self, dx: int, dy: int) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def grown(self, n: int) -> Box:
        return Box(self.x0 - n, self.y0 - n, self.x1 + n, self.y1 + n)

    def slices(self) -> tuple[slice, slice]:
        """``(slice(y0, y1), slice(x0, x1))`` for indexing ``[y, x]`` arrays."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def to_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


class SkyMapConfig(pydantic.BaseModel):
    """Geometry of a sky map (frozen; its hash names the geometry).

    Attributes
    ----------
    kind : {"rings", "discrete"}
    pixel_scale : float, arcsec/pixel
        Pixel scale at each tract centre (default 0.2, as LSST).
    patch_inner : int, pixels
        Side of a patch's inner (non-overlapping) region (default 4000).
    patch_border : int, pixels
        Overlap added on each side of a patch (default 100).
    tract_overlap : float, deg
        Extra sky added around each tract's own cell (rings) (default 1 arcmin, as LSST).
    num_rings : int
        Number of declination rings between the polar caps (rings; default 120 gives
        tracts of ~1.49 deg).
    ra_start : float, deg
        RA of the first tract centre of every ring (rings).
    centers : list of (ra, dec), deg
        Tract centres (discrete).
    radius : float, deg
        Half-side of each discrete tract.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    kind: Literal["rings", "discrete"] = "rings"
    pixel_scale: float = pydantic.Field(0.2, gt=0)
    patch_inner: int = pydantic.Field(4000, gt=0)
    patch_border: int = pydantic.Field(100, ge=0)
    tract_overlap: float = pydantic.Field(1.0 / 60.0, ge=0)
    num_rings: int = pydantic.Field(120, ge=1)
    ra_start: float = 0.0
    centers: tuple[tuple[float, float], ...] = ()
    radius: float = pydantic.Field(0.5, gt=0)

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.kind == "discrete" and not self.centers:
            raise ValueError("a discrete sky map needs at least one centre (ra, dec) in degrees")
        for _ra, dec in self.centers:
            if not -90.0 <= dec <= 90.0:
                raise ValueError(f"centre dec {dec} is outside [-90, 90] deg")
        return self

    def config_hash(self) -> str:
        """SHA-256 (hex, 16 characters) of the canonical JSON of the configuration."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TractInfo:
    """One tract: id, centre, TAN WCS and pixel box.

    Attributes
    ----------
    id : int
    ra, dec : float, deg
        Centre (the TAN tangent point).
    box : Box
        Tract pixel box, ``(0, 0)-(nx, ny)``.
    n_patches : (int, int)
        Number of patches along x and y.
    ra_range, dec_range : (float, float), deg
        The tract's own cell (rings; where :meth:`SkyMap.find_tract` assigns a point), or
        ``None`` for discrete tracts.
    """

    id: int
    ra: float
    dec: float
    box: Box
    n_patches: tuple[int, int]
    pixel_scale: float
    patch_inner: int
    patch_border: int
    ra_range: tuple[float, float] | None = None
    dec_range: tuple[float, float] | None = None

    @property
    def wcs_cards(self) -> list[tuple[str, object, str]]:
        """FITS cards of the tract WCS (north up, east left)."""
        return _tan_cards(self.ra, self.dec, (self.box.nx - 1) / 2.0, (self.box.ny - 1) / 2.0, self.pixel_scale)

    @property
    def wcs(self):
        """astropy WCS of the tract (pixel (0, 0) = tract box origin); a fresh copy."""
        from procsky.wcs import wcs_from_cards

        return wcs_from_cards(self.wcs_cards, self.box.shape)

    def patch_index(self, patch: int) -> tuple[int, int]:
        """(px, py) of a patch id."""
        npx, npy = self.n_patches
        if not 0 <= int(patch) < npx * npy:
            raise ProcskyKeyError(f"tract {self.id} has patches 0..{npx * npy - 1} ({npx} x {npy}); no patch {patch}")
        return int(patch) % npx, int(patch) // npx

    def patch(self, patch: int) -> PatchInfo:
        """The :class:`PatchInfo` of a patch id."""
        px, py = self.patch_index(patch)
        b, n = self.patch_border, self.patch_inner
        inner = Box(b + px * n, b + py * n, b + (px + 1) * n, b + (py + 1) * n)
        return PatchInfo(self, int(patch), (px, py), inner, inner.grown(b))

    def patches_overlapping(self, box: Box) -> list[int]:
        """Ids of patches whose *outer* box overlaps a tract pixel box."""
        b, n = self.patch_border, self.patch_inner
        npx, npy = self.n_patches

        # Outer box of patch p along an axis: [p n, (p + 1) n + 2 b).
        def rng(lo, hi, count):
            first = max(0, int(math.floor((lo - 2 * b) / n)))
            last = min(count - 1, int(math.floor((hi - 1) / n)))
            return range(first, last + 1)

        out = []
        for py in rng(box.y0, box.y1, npy):
            for px in rng(box.x0, box.x1, npx):
                p = self.patch(py * npx + px)
                if p.outer.overlaps(box):
                    out.append(p.id)
        return out

    def to_record(self, skymap: str) -> dict:
        """A ``tract`` dimension record."""
        return {
            "skymap": skymap,
            "tract": self.id,
            "ra": self.ra,
            "dec": self.dec,
            "nx": self.box.nx,
            "ny": self.box.ny,
            "n_patches_x": self.n_patches[0],
            "n_patches_y": self.n_patches[1],
        }


@dataclass(frozen=True)
class PatchInfo:
    """One patch of a tract.

    Attributes
    ----------
    tract : TractInfo
    id : int
        ``py * n_patches_x + px``.
    index : (int, int)
        (px, py).
    inner, outer : Box
        In tract pixels; ``outer`` is ``inner`` grown by the border.
    """

    tract: TractInfo
    id: int
    index: tuple[int, int]
    inner: Box
    outer: Box

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the patch (outer) arrays."""
        return self.outer.shape

    @property
    def xy0(self) -> tuple[int, int]:
        """Tract pixel of patch array pixel (0, 0)."""
        return (self.outer.x0, self.outer.y0)

    @property
    def wcs_cards(self) -> list[tuple[str, object, str]]:
        """FITS cards of the patch WCS (pixel (0, 0) = outer box origin)."""
        t = self.tract
        cx = (t.box.nx - 1) / 2.0 - self.outer.x0
        cy = (t.box.ny - 1) / 2.0 - self.outer.y0
        return _tan_cards(t.ra, t.dec, cx, cy, t.pixel_scale)

    @property
    def wcs(self):
        """astropy WCS of the patch arrays; a fresh copy."""
        from procsky.wcs import wcs_from_cards

        return wcs_from_cards(self.wcs_cards, self.shape)

    @property
    def data_id(self) -> dict:
        return {"tract": self.tract.id, "patch": self.id}


def _tan_cards(ra: float, dec: float, cx: float, cy: float, scale: float) -> list[tuple[str, object, str]]:
    """TAN WCS cards with the tangent point at 0-based pixel (cx, cy)."""
    s = scale / 3600.0
    return [
        ("WCSAXES", 2, "number of WCS axes"),
        ("CTYPE1", "RA---TAN", "gnomonic projection"),
        ("CTYPE2", "DEC--TAN", "gnomonic projection"),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
        ("CRVAL1", float(ra % 360.0), "tract centre RA (deg)"),
        ("CRVAL2", float(dec), "tract centre Dec (deg)"),
        ("CRPIX1", float(cx) + 1.0, "1-based pixel of the tract centre"),
        ("CRPIX2", float(cy) + 1.0, "1-based pixel of the tract centre"),
        ("CD1_1", -s, "deg/pixel (east left)"),
        ("CD1_2", 0.0, ""),
        ("CD2_1", 0.0, ""),
        ("CD2_2", s, "deg/pixel (north up)"),
        ("RADESYS", "ICRS", ""),
    ]


def _gnomonic(ra, dec, ra0, dec0):
    """Gnomonic projection (standard coordinates, radians) of points (deg) about (ra0, dec0)."""
    ra, dec = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(dec) * np.sin(ra - a0) / cosc
        eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return xi, eta, cosc


class SkyMap:
    """Tracts and patches of a sky map (see the module docstring).

    Parameters
    ----------
    config : SkyMapConfig or dict
    name : str, optional
        Repository name of the sky map (defaults to ``"<kind>-<hash>"``).
    """

    def __init__(self, config: SkyMapConfig | dict, name: str | None = None):
        if isinstance(config, dict):
            try:
                config = SkyMapConfig(**config)
            except pydantic.ValidationError as e:
                raise ProcskyValueError(f"invalid sky map configuration: {e}") from e
        self.config = config
        self.name = name or f"{config.kind}-{config.config_hash()}"
        self._tracts: dict[int, TractInfo] = {}

    def __repr__(self) -> str:
        return f"<SkyMap {self.name!r} {self.config.kind} {len(self)} tracts, hash {self.config_hash}>"

    def __reduce__(self):
        return (SkyMap, (self.config.model_dump(mode="json"), self.name))

    def __eq__(self, other) -> bool:
        return isinstance(other, SkyMap) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config_hash)

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()

    # ------------------------------------------------------------------ ring layout
    @cached_property
    def _rings(self) -> list[tuple[float, float, int]]:
        """(dec_lo, dec_hi, n_tracts) in degrees for each ring (rings kind)."""
        n = self.config.num_rings
        h = 180.0 / (n + 1)
        rings = []
        for i in range(n):
            lo = -90.0 + h * (i + 0.5)
            hi = lo + h
            widest = min(abs(lo), abs(hi)) if lo * hi > 0 else 0.0
            ntr = max(1, int(math.ceil(360.0 * math.cos(math.radians(widest)) / h)))
            rings.append((lo, hi, ntr))
        return rings

    @cached_property
    def _ring_offsets(self) -> list[int]:
        offs, k = [], 1  # tract 0 is the south cap
        for _, _, ntr in self._rings:
            offs.append(k)
            k += ntr
        return offs

    def __len__(self) -> int:
        if self.config.kind == "discrete":
            return len(self.config.centers)
        return 2 + sum(r[2] for r in self._rings)

    @property
    def tract_ids(self) -> range:
        return range(len(self))

    def tract(self, tract_id: int) -> TractInfo:
        """The :class:`TractInfo` of a tract id."""
        tract_id = int(tract_id)
        if not 0 <= tract_id < len(self):
            raise ProcskyKeyError(f"sky map {self.name!r} has tracts 0..{len(self) - 1}; no tract {tract_id}")
        t = self._tracts.get(tract_id)
        if t is None:
            t = self._make_tract(tract_id)
            self._tracts[tract_id] = t
        return t

    def patch(self, tract_id: int, patch_id: int) -> PatchInfo:
        """The :class:`PatchInfo` of (tract, patch)."""
        return self.tract(tract_id).patch(patch_id)

    def _make_tract(self, tid: int) -> TractInfo:
        c = self.config
        if c.kind == "discrete":
            ra, dec = c.centers[tid]
            half = math.tan(math.radians(c.radius))  # standard-coordinate half side
            return self._tract_from_extent(tid, ra % 360.0, dec, -half, half, -half, half, None, None)
        h = 180.0 / (c.num_rings + 1)
        ov = c.tract_overlap
        if tid == 0 or tid == len(self) - 1:
            south = tid == 0
            dec0 = -90.0 if south else 90.0
            edge = -90.0 + h / 2.0 if south else 90.0 - h / 2.0
            half = math.tan(math.radians(90.0 - abs(edge) + ov))
            return self._tract_from_extent(
                tid, 0.0, dec0, -half, half, -half, half, (0.0, 360.0), (-90.0, edge) if south else (edge, 90.0)
            )
        ring = max(i for i, o in enumerate(self._ring_offsets) if o <= tid)
        lo, hi, ntr = self._rings[ring]
        k = tid - self._ring_offsets[ring]
        width = 360.0 / ntr
        ra = (c.ra_start + k * width) % 360.0
        dec = 0.5 * (lo + hi)
        # Project the cell boundary (grown by the overlap) to get the tract extent.
        ras = np.concatenate([np.linspace(-width / 2 - ov, width / 2 + ov, 25)] * 2)
        decs = np.concatenate([np.full(25, max(lo - ov, -89.999)), np.full(25, min(hi + ov, 89.999))])
        ras = np.concatenate([ras, np.full(25, -width / 2 - ov), np.full(25, width / 2 + ov)])
        mid = np.linspace(max(lo - ov, -89.999), min(hi + ov, 89.999), 25)
        decs = np.concatenate([decs, mid, mid])
        xi, eta, _ = _gnomonic(ra + ras, decs, ra, dec)
        ra_lo, ra_hi = ra - width / 2, ra + width / 2
        return self._tract_from_extent(
            tid, ra, dec, xi.min(), xi.max(), eta.min(), eta.max(), (ra_lo % 360.0, ra_hi % 360.0), (lo, hi)
        )

    def _tract_from_extent(self, tid, ra, dec, xmin, xmax, ymin, ymax, ra_range, dec_range) -> TractInfo:
        c = self.config
        scale = math.radians(c.pixel_scale / 3600.0)
        # Symmetric about the centre: half-size in pixels along each axis.
        hx = max(abs(xmin), abs(xmax)) / scale
        hy = max(abs(ymin), abs(ymax)) / scale
        npx = max(1, int(math.ceil(2 * hx / c.patch_inner)))
        npy = max(1, int(math.ceil(2 * hy / c.patch_inner)))
        nx = npx * c.patch_inner + 2 * c.patch_border
        ny = npy * c.patch_inner + 2 * c.patch_border
        return TractInfo(
            id=tid,
            ra=float(ra),
            dec=float(dec),
            box=Box(0, 0, nx, ny),
            n_patches=(npx, npy),
            pixel_scale=c.pixel_scale,
            patch_inner=c.patch_inner,
            patch_border=c.patch_border,
            ra_range=ra_range,
            dec_range=dec_range,
        )

    # ----------------------------------------------------------------- look-ups
    def find_tract(self, ra: float, dec: float) -> int:
        """The tract whose own cell holds (ra, dec) in degrees (nearest centre for discrete)."""
        c = self.config
        if c.kind == "discrete":
            cen = np.array(c.centers, float)
            d = _angsep(ra, dec, cen[:, 0], cen[:, 1])
            return int(np.argmin(d))
        h = 180.0 / (c.num_rings + 1)
        if dec < -90.0 + h / 2.0:
            return 0
        if dec >= 90.0 - h / 2.0:
            return len(self) - 1
        ring = min(int((dec + 90.0 - h / 2.0) // h), c.num_rings - 1)
        ntr = self._rings[ring][2]
        width = 360.0 / ntr
        k = int(math.floor(((ra - c.ra_start + width / 2.0) % 360.0) / width)) % ntr
        return self._ring_offsets[ring] + k

    def _candidate_tracts(self, ra, dec) -> set[int]:
        c = self.config
        if c.kind == "discrete":
            return set(range(len(self)))
        h = 180.0 / (c.num_rings + 1)
        cands: set[int] = set()
        for r, d in zip(np.atleast_1d(ra), np.atleast_1d(dec)):
            for dd in (d - h, d, d + h):
                dd = min(max(dd, -90.0), 90.0)
                t = self.find_tract(r, dd)
                cands.add(t)
                if 0 < t < len(self) - 1:
                    ring = max(i for i, o in enumerate(self._ring_offsets) if o <= t)
                    off, ntr = self._ring_offsets[ring], self._rings[ring][2]
                    cands.update({off + (t - off - 1) % ntr, off + (t - off + 1) % ntr})
        return cands

    def tracts_patches_for_sky(self, ra, dec) -> dict[int, list[int]]:
        """Tracts and patches whose outer boxes hold the bounding box of sky points (deg).

        Parameters
        ----------
        ra, dec : array, deg
            Points outlining a footprint (e.g. :func:`footprint_points`).

        Returns
        -------
        dict of int -> list of int
            Tract id -> sorted patch ids. Conservative: a patch is listed when the
            footprint's bounding box in tract pixels overlaps the patch outer box.
        """
        ra = np.atleast_1d(np.asarray(ra, float))
        dec = np.atleast_1d(np.asarray(dec, float))
        out: dict[int, list[int]] = {}
        for tid in sorted(self._candidate_tracts(ra, dec)):
            t = self.tract(tid)
            xi, eta, cosc = _gnomonic(ra, dec, t.ra, t.dec)
            if np.any(cosc <= 0.1):  # points more than ~84 deg away: not this tract
                continue
            scale = math.radians(t.pixel_scale / 3600.0)
            # Tract pixel coordinates of the TAN projection (east left, north up).
            x = -xi / scale + (t.box.nx - 1) / 2.0
            y = eta / scale + (t.box.ny - 1) / 2.0
            box = Box(
                int(math.floor(x.min())),
                int(math.floor(y.min())),
                int(math.ceil(x.max())) + 1,
                int(math.ceil(y.max())) + 1,
            )
            if not box.overlaps(t.box):
                continue
            patches = t.patches_overlapping(box)
            if patches:
                out[tid] = sorted(patches)
        return out

    def find_patches(self, wcs, shape: tuple[int, int], *, n_edge: int = 16) -> dict[int, list[int]]:
        """Tracts and patches an image footprint touches.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            The image WCS.
        shape : (ny, nx)
            Image shape in pixels.
        n_edge : int
            Points sampled along each edge (distortion makes edges curved).

        Returns
        -------
        dict of int -> list of int
            Tract id -> patch ids.
        """
        ra, dec = footprint_points(wcs, shape, n_edge=n_edge)
        return self.tracts_patches_for_sky(ra, dec)

    # --------------------------------------------------------------- records
    def to_record(self) -> dict:
        """The ``skymap`` dimension record (name, hash, configuration JSON)."""
        return {
            "skymap": self.name,
            "hash": self.config_hash,
            "kind": self.config.kind,
            "n_tracts": len(self),
            "config": self.config.model_dump(mode="json"),
        }

    @classmethod
    def from_record(cls, record: dict) -> SkyMap:
        sm = cls(record["config"], name=record["skymap"])
        if record.get("hash") and record["hash"] != sm.config_hash:
            raise ProcskyValueError(
                f"sky map {record['skymap']!r} record has hash {record['hash']} but its configuration "
                f"hashes to {sm.config_hash}; the record was edited or written by another procsky version"
            )
        return sm


def _angsep(ra1, dec1, ra2, dec2):
    """Angular separation in degrees (haversine)."""
    ra1, dec1, ra2, dec2 = (np.deg2rad(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


def footprint_points(wcs, shape: tuple[int, int], *, n_edge: int = 16):
    """Sky points (ra, dec in deg) along the edges of an image (pixel-edge outline).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
    shape : (ny, nx)
    n_edge : int
        Points per edge.
    """
    ny, nx = shape
    t = np.linspace(0.0, 1.0, n_edge)
    xs = np.concatenate([-0.5 + t * nx, np.full(n_edge, nx - 0.5), nx - 0.5 - t * nx, np.full(n_edge, -0.5)])
    ys = np.concatenate([np.full(n_edge, -0.5), -0.5 + t * ny, np.full(n_edge, ny - 0.5), ny - 0.5 - t * ny])
    from procsky.wcs import copy_wcs

    ra, dec = copy_wcs(wcs).pixel_to_world_values(xs, ys)
    return np.asarray(ra), np.asarray(dec)


def rings_skymap(name: str | None = None, **config) -> SkyMap:
    """A rings sky map (keywords of :class:`SkyMapConfig`)."""
    return SkyMap(SkyMapConfig(kind="rings", **config), name=name)


def discrete_skymap(centers, radius: float, name: str | None = None, **config) -> SkyMap:
    """A discrete sky map: one tract per centre.

    Parameters
    ----------
    centers : list of (ra, dec), deg
    radius : float, deg
        Half-side of each tract.
    name : str, optional
    **config
        Other :class:`SkyMapConfig` keywords (``pixel_scale``, ``patch_inner`` ...).
    """
    centers = tuple((float(r), float(d)) for r, d in centers)
    return SkyMap(SkyMapConfig(kind="discrete", centers=centers, radius=radius, **config), name=name)


def register_skymap(repo, skymap: SkyMap, *, tracts: bool = False, run: str = "skymaps") -> int:
    """Store a sky map in a repository: a ``skymap`` dimension record, and the same
    record as a ``skymap`` dataset (data ID ``{skymap: name}``, in ``run``) that tasks take
    as an input (as LSST's ``skyMap`` dataset).

    Parameters
    ----------
    repo : procsky.repo.Repo
    skymap : SkyMap
    tracts : bool
        Also add a ``tract`` record per tract (discrete maps; a rings map has thousands).
    run : str
        Run of the ``skymap`` dataset.

    Returns
    -------
    int
        Records newly inserted (0 when the identical sky map was already registered).

    Raises
    ------
    ConflictError
        A different sky map is already registered under the same name.
    """
    try:
        n = repo.add_dimension_records("skymap", [skymap.to_record()])
    except ConflictError as e:
        raise ConflictError(
            f"a different sky map is already registered as {skymap.name!r}; register this one under "
            f"another name (its hash is {skymap.config_hash})"
        ) from e
    if tracts:
        n += repo.add_dimension_records("tract", [skymap.tract(t).to_record(skymap.name) for t in skymap.tract_ids])
    if repo.find("skymap", {"skymap": skymap.name}) is None:
        repo.put(skymap.to_record(), "skymap", {"skymap": skymap.name}, run)
    return n


def load_skymap(repo, name: str) -> SkyMap:
    """Rebuild a registered sky map by name."""
    recs = repo.dimension_records("skymap")
    for r in recs:
        if r.get("skymap") == name:
            return SkyMap.from_record(r)
    known = ", ".join(sorted(str(r.get("skymap")) for r in recs)) or "none"
    raise ProcskyKeyError(
        f"no sky map {name!r} in {getattr(repo, 'root', repo)} (registered: {known}); "
        "register one with `procsky skymap register`"
    )
