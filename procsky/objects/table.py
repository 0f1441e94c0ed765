"""The ``object`` table: one row per deblended object of a patch, band-prefixed columns.

Follows the layout of LSST's Object table (``writeObjectTable`` after
``mergeCoaddMeasurements``): identifiers and the reference band's position first, then
per band ``<band>_psf_flux``, ``<band>_cmodel_flux`` ... from the *forced* measurement
(every band measured at the reference band's position and with its shapes, so colours
come from one model), in nJy, with the column units in ``attrs["units"]`` (the Parquet
storage keeps them, so astropy's ``Table.read`` shows them).

``is_primary`` marks the rows that count a position of the sky once across patch and
tract overlaps (LSST's ``detect_isPrimary``): the object's centre lies in the patch's
inner region (``detect_is_patch_inner``) and in the tract's inner region, the part of
the sky nearer this tract's centre than any other (``detect_is_tract_inner``), and the
row is a deblended leaf (a child of a deblended blend, or an isolated source, or the
parent of a blend the deblender skipped; ``detect_is_deblended_leaf``). Sky objects
(empty positions, ``sky_object``) are never primary.

The reference band of each object is the first band of ``priority`` (LSST's
``mergeCoaddMeasurements.priorityList``: i, r, z, y, g, u) in which its PSF flux has
S/N >= ``min_snr`` and the measurement has no failure flag; failing that, the band of
highest PSF-flux S/N.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "DEFAULT_BAND_PRIORITY",
    "choose_reference_band",
    "column_unit",
    "make_object_id",
    "object_table",
]

DEFAULT_BAND_PRIORITY = ("i", "r", "z", "y", "g", "u")

#: Bits of ``object_id``: tract << 40 | patch << 24 | local id (tract < 2^23, patch < 2^16).
_LOCAL_BITS = 24
_PATCH_BITS = 16
PARENT_OFFSET = 1 << 22
"""Local ids of blend parents (``parent_id``; parents have no row of their own) start here."""
SKY_OBJECT_OFFSET = 1 << 23
"""Local ids from this value on are sky objects; children and isolated sources are below
``PARENT_OFFSET``."""


def make_object_id(tract: int, patch: int, local) -> np.ndarray:
    """Repository-unique object ids: ``tract << 40 | patch << 24 | local``."""
    local = np.asarray(local, dtype=np.int64)
    if local.size and (local.min() < 0 or local.max() >= 1 << _LOCAL_BITS):
        raise ValueError(f"local object ids must be in [0, 2^{_LOCAL_BITS}), got {local.min()}..{local.max()}")
    if not (0 <= int(patch) < 1 << _PATCH_BITS and 0 <= int(tract) < 1 << (63 - _LOCAL_BITS - _PATCH_BITS)):
        raise ValueError(f"tract {tract} / patch {patch} out of the object id's range (patch < 2^{_PATCH_BITS})")
    return (int(tract) << (_LOCAL_BITS + _PATCH_BITS)) | (int(patch) << _LOCAL_BITS) | local


_FLUX = re.compile(r"(^|_)(flux|flux_err|background)(_|$)")


def column_unit(name: str) -> str | None:
    """The unit of an object-table column from its name (None for dimensionless)."""
    base = re.sub(r"^[a-z]_", "", name) if re.match(r"^[ugrizy]_", name) else name
    if base in ("ra", "dec") or base.endswith(("_ra", "_dec")):
        return "deg"
    if base == "local_background" or base.endswith("_local_background"):
        return "nJy / pixel"
    if _FLUX.search(base) and not base.startswith(("flag", "n_")) and not base.endswith("_chi2"):
        return "nJy"
    if base in ("x", "y", "x_err", "y_err", "kron_radius", "hsm_sigma") or base.endswith(
        ("_x", "_y", "_radius", "_r_px")
    ):
        return "pixel"
    if base in ("ixx", "iyy", "ixy") or base.endswith(("_ixx", "_iyy", "_ixy")):
        return "pixel2"
    if base.endswith("_arcsec"):
        return "arcsec"
    return None


def choose_reference_band(
    measurements: Mapping[str, pd.DataFrame],
    *,
    priority: Sequence[str] = DEFAULT_BAND_PRIORITY,
    min_snr: float = 10.0,
) -> np.ndarray:
    """The reference band of each row (measurements of the same rows in every band).

    Parameters
    ----------
    measurements : mapping band -> DataFrame
        Unforced per-band measurements with ``psf_flux``, ``psf_flux_err`` and optional
        ``flag_psf_flux`` columns, rows aligned across bands.
    priority : sequence of str
        Bands in order of preference; bands not listed come after, in the mapping's order.
    min_snr : float

    Returns
    -------
    numpy.ndarray of str
    """
    bands = [b for b in priority if b in measurements] + [b for b in measurements if b not in priority]
    if not bands:
        raise ValueError("no band measurements to choose a reference band from")
    n = len(measurements[bands[0]])
    snr = np.empty((len(bands), n))
    ok = np.empty((len(bands), n), bool)
    for i, b in enumerate(bands):
        m = measurements[b]
        f = m["psf_flux"].to_numpy(float)
        e = m["psf_flux_err"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(np.isfinite(f) & np.isfinite(e) & (e > 0), f / e, -np.inf)
        snr[i] = s
        bad = m["flag_psf_flux"].to_numpy(bool) if "flag_psf_flux" in m else np.zeros(n, bool)
        ok[i] = (s >= min_snr) & ~bad
    first_ok = np.where(ok.any(axis=0), ok.argmax(axis=0), snr.argmax(axis=0))
    return np.asarray(bands, dtype=object)[first_ok].astype(str)


def object_table(
    children: pd.DataFrame,
    forced: Mapping[str, pd.DataFrame],
    reference: pd.DataFrame,
    ref_band: np.ndarray,
    *,
    pixel_to_sky: Callable,
    xy0: tuple[int, int] = (0, 0),
    tract: int = 0,
    patch: int = 0,
    inner_box: tuple[int, int, int, int] | None = None,
    tract_owner: Callable | None = None,
    sky_objects: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Assemble the ``object`` table of one patch.

    Parameters
    ----------
    children : DataFrame
        The deblender's rows (``id``, ``parent_id``, ``n_siblings``, ``is_isolated``,
        ``deblend_flag_*``; see :class:`procsky.objects.deblend.Deblended`).
    forced : mapping band -> DataFrame
        Forced measurement in each band, rows aligned with ``children`` (columns without
        band prefix; :func:`procsky.objects.measure.measure_band`).
    reference : DataFrame
        The reference band's unforced measurement of each row (``x``, ``y`` centroid in
        array pixels, shapes ...), rows aligned with ``children``.
    ref_band : array of str
    pixel_to_sky : callable
        ``(x, y) -> (ra, dec)`` deg, array pixels of the coadd.
    xy0 : (int, int)
        Tract pixel of the coadd's array [0, 0].
    tract, patch : int
    inner_box : (x0, y0, x1, y1) tract pixels, optional
        The patch's inner region (half-open); None: every position is inner.
    tract_owner : callable, optional
        ``(ra, dec) -> bool array``: inside this tract's inner region; None: all True.
    sky_objects : mapping band -> DataFrame, optional
        Forced PSF photometry at the sky objects (``sky_id``, ``x``, ``y``, ``psf_flux``,
        ``psf_flux_err``), appended as ``sky_object`` rows.

    Returns
    -------
    pandas.DataFrame
    """
    n = len(children)
    x = reference["x"].to_numpy(float) if "x" in reference else children["x"].to_numpy(float)
    y = reference["y"].to_numpy(float) if "y" in reference else children["y"].to_numpy(float)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    x = np.where(bad, children["x"].to_numpy(float), x)
    y = np.where(bad, children["y"].to_numpy(float), y)
    ra, dec = pixel_to_sky(x, y)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    local = children["id"].to_numpy(np.int64)
    parent = children["parent_id"].to_numpy(np.int64) if "parent_id" in children else np.zeros(n, np.int64)
    # An isolated source is its own parent: parent_id 0 (LSST's convention).
    isolated = children["is_isolated"].to_numpy(bool) if "is_isolated" in children else np.zeros(n, bool)
    cols: dict[str, np.ndarray] = {
        "object_id": make_object_id(tract, patch, local),
        "parent_id": np.where(
            (parent > 0) & ~isolated, make_object_id(tract, patch, PARENT_OFFSET + np.maximum(parent, 0)), 0
        ),
        "tract": np.full(n, int(tract), np.int64),
        "patch": np.full(n, int(patch), np.int64),
        "ra": ra,
        "dec": dec,
        "x": x + xy0[0],
        "y": y + xy0[1],
        "ref_band": np.asarray(ref_band, dtype=object).astype(str),
    }
    for c in ("n_siblings", "is_isolated", "deblend_iterations"):
        if c in children:
            cols[c] = children[c].to_numpy()
    deblend_flags = [c for c in children.columns if c.startswith("deblend_flag")]
    for c in deblend_flags:
        cols[c] = children[c].to_numpy(bool)
    skipped = np.zeros(n, bool)
    for c in ("deblend_flag_skipped", "deblend_flag_too_big", "deblend_flag_timeout"):
        if c in children:
            skipped |= children[c].to_numpy(bool)
    # A skipped blend keeps one row, its parent's pixels: only the first child of each such
    # parent is a leaf (the others duplicate it).
    leaf = np.ones(n, bool)
    if skipped.any():
        firsts = ~pd.Series(parent).where(skipped, -1 - np.arange(n)).duplicated().to_numpy()
        leaf = ~skipped | firsts
    tx, ty = x + xy0[0], y + xy0[1]
    if inner_box is not None:
        bx0, by0, bx1, by1 = inner_box
        # Pixel centres at integers: the inner box [x0, x1) holds centres in [x0 - 0.5, x1 - 0.5).
        patch_inner = (tx >= bx0 - 0.5) & (tx < bx1 - 0.5) & (ty >= by0 - 0.5) & (ty < by1 - 0.5)
    else:
        patch_inner = np.ones(n, bool)
    tract_inner = np.asarray(tract_owner(ra, dec), bool) if tract_owner is not None else np.ones(n, bool)
    cols["detect_is_patch_inner"] = patch_inner
    cols["detect_is_tract_inner"] = tract_inner
    cols["detect_is_deblended_leaf"] = leaf
    cols["sky_object"] = np.zeros(n, bool)
    cols["is_primary"] = patch_inner & tract_inner & leaf
    # The reference band's position, shapes and classification; its fluxes are the <band>_
    # columns of that band (forced, calibrated and corrected), not repeated here.
    refm = reference.drop(columns=[c for c in reference.columns if c in ("id", "x", "y") or "flux" in c])
    for c in refm.columns:
        cols[f"ref_{c}"] = refm[c].to_numpy()
    for band in sorted(forced):
        m = forced[band]
        if len(m) != n:
            raise ValueError(f"forced measurement of band {band} has {len(m)} rows for {n} objects")
        for c in m.columns:
            # the forced positions are the reference's (the table's x, y in tract pixels)
            if c in ("id", "x", "y", "x_err", "y_err"):
                continue
            cols[f"{band}_{c}"] = m[c].to_numpy()
    out = pd.DataFrame(cols)
    if sky_objects:
        out = pd.concat([out, _sky_rows(sky_objects, out.columns, pixel_to_sky, xy0, tract, patch)], ignore_index=True)
    units = {c: u for c in out.columns if (u := column_unit(c)) is not None}
    out.attrs["units"] = units
    return out


def _sky_rows(sky: Mapping[str, pd.DataFrame], columns, pixel_to_sky, xy0, tract, patch) -> pd.DataFrame:
    first = next(iter(sky.values()))
    m = len(first)
    x = first["x"].to_numpy(float)
    y = first["y"].to_numpy(float)
    ra, dec = pixel_to_sky(x, y)
    rows: dict[str, np.ndarray] = {
        "object_id": make_object_id(tract, patch, SKY_OBJECT_OFFSET + first["sky_id"].to_numpy(np.int64)),
        "parent_id": np.zeros(m, np.int64),
        "tract": np.full(m, int(tract), np.int64),
        "patch": np.full(m, int(patch), np.int64),
        "ra": np.asarray(ra, float),
        "dec": np.asarray(dec, float),
        "x": x + xy0[0],
        "y": y + xy0[1],
        "ref_band": np.full(m, "", dtype=object),
        "sky_object": np.ones(m, bool),
        "is_primary": np.zeros(m, bool),
        "detect_is_patch_inner": np.zeros(m, bool),
        "detect_is_tract_inner": np.zeros(m, bool),
        "detect_is_deblended_leaf": np.zeros(m, bool),
    }
    for band, t in sky.items():
        for c in ("psf_flux", "psf_flux_err"):
            rows[f"{band}_{c}"] = t[c].to_numpy(float)
    df = pd.DataFrame(rows)
    return df.reindex(columns=[c for c in columns if c in df.columns] + [c for c in df.columns if c not in columns])
