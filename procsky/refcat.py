"""Reference catalogues: ingest into a repository in HEALPix shards, load by sky region.

A reference catalogue (astrometric and photometric standards: the simulator's
``refcat.parquet``, Gaia subsets ...) is normalised to one schema and cut into HEALPix
shards (NESTED scheme, level 7 by default: pixels of ~27 arcmin), each stored as a
``refcat`` DataFrame dataset with data ID ``{"refcat": NAME, "healpix_level": L,
"healpix": PIX}`` in the run ``refcats/NAME``. A detector loads only the shards that
overlap it (:func:`load_refcat`, :func:`load_refcat_for_wcs`), and a pipeline task can
attach the shards to its quanta from their data IDs alone (:func:`shards_in_cone`) so
that its ``run()`` does no I/O.

Normalised schema (units in ``df.attrs["units"]`` and the Parquet schema metadata):

==================  =========  ======================================================
column              unit       meaning
==================  =========  ======================================================
``ref_id``          --         int64 identifier (``source_id`` for Gaia)
``ra``, ``dec``     deg        ICRS position at ``epoch_mjd``
``ra_err``          deg        error of ``ra * cos(dec)``
``dec_err``         deg        error of ``dec``
``pm_ra``           mas/yr     proper motion ``mu_alpha* = mu_alpha cos(dec)``; NaN if none
``pm_dec``          mas/yr     proper motion in dec; NaN if none
``epoch_mjd``       d          epoch of the positions (TAI MJD)
``mag_<band>``      mag(AB)    magnitude per band (``g``, ``r`` ... or ``G``, ``BP``, ``RP``)
``mag_<band>_err``  mag(AB)    its error
==================  =========  ======================================================

Gaia-like inputs (``source_id``, ``ra_error`` ..., ``phot_g_mean_mag``) are recognised:
errors are converted from mas to degrees, ``ref_epoch`` (Julian year) to MJD, magnitude
errors from ``phot_*_mean_flux_over_error`` (``1.0857 / (S/N)``). Gaia magnitudes are
Vega-based; they are stored as ``mag_G``, ``mag_BP``, ``mag_RP`` (the Gaia DR2 Vega-AB
offsets are below 0.1 mag and are not applied: these columns are for astrometry and
approximate photometry only). Approximate SDSS-like ``mag_g``, ``mag_r``, ``mag_i`` are
derived from G and BP-RP with the Gaia DR2 polynomial relations (Evans et al. 2018,
A&A 616, A4, table A.2; valid roughly for 0 < BP-RP < 2.5); their published scatter
(0.07 to 0.17 mag) is added in quadrature to the errors, so a photometric calibration
against them is approximate. There is no z-band relation; calibrate z against ``mag_RP``
only with care.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError

__all__ = [
    "REFCAT_DATASET_TYPE",
    "DEFAULT_HEALPIX_LEVEL",
    "REFCAT_UNITS",
    "read_refcat_file",
    "normalise_refcat",
    "ingest_refcat",
    "refcat_run",
    "list_refcats",
    "shards_in_cone",
    "shard_ids_for_cone",
    "load_refcat",
    "load_refcat_for_wcs",
    "select_in_footprint",
    "wcs_cone",
    "concat_shards",
    "apply_proper_motion",
]

REFCAT_DATASET_TYPE = "refcat"
DEFAULT_HEALPIX_LEVEL = 7
MAS_TO_DEG = 1.0 / 3.6e6

#: Units of the fixed columns (``mag_*`` columns are ``mag(AB)``).
REFCAT_UNITS = {
    "ra": "deg",
    "dec": "deg",
    "ra_err": "deg",
    "dec_err": "deg",
    "pm_ra": "mas/yr",
    "pm_dec": "mas/yr",
    "epoch_mjd": "d",
}

# Gaia DR2 -> SDSS: G - X = sum_k c_k (BP - RP)^k, scatter sigma (Evans et al. 2018, table A.2).
_GAIA_TO_SDSS = {
    "g": ((0.13518, -0.46245, -0.25171, 0.021349), 0.16497),
    "r": ((-0.12879, 0.24662, -0.027464, -0.049465), 0.066739),
    "i": ((-0.29676, 0.64728, -0.10141), 0.098957),
}
_GAIA_COLOUR_RANGE = (-0.5, 2.7)


# ------------------------------------------------------------------------------ reading
def read_refcat_file(path: str | Path) -> pd.DataFrame:
    """Read one catalogue file (Parquet, FITS table, CSV/ECSV) and normalise it.

    Parameters
    ----------
    path : str or Path
        ``*.parquet``, ``*.fits`` / ``*.fits.gz`` / ``*.fit`` (first table HDU), ``*.csv``
        or ``*.ecsv``.

    Returns
    -------
    pandas.DataFrame
        In the normalised schema (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise ProcskyFileError(f"no such reference catalogue file: {path}")
    name = path.name.lower()
    units: dict[str, str] = {}
    try:
        if name.endswith(".parquet"):
            import json

            import pyarrow.parquet as pq

            table = pq.read_table(str(path))
            md = table.schema.metadata or {}
            if b"units" in md:
                try:
                    units = json.loads(md[b"units"])
                except ValueError:
                    units = {}
            df = table.to_pandas()
        elif name.endswith((".fits", ".fits.gz", ".fit", ".fts")):
            from astropy.table import Table

            t = Table.read(str(path))
            units = {c: str(t[c].unit) for c in t.colnames if t[c].unit is not None}
            df = _table_to_pandas(t)
        elif name.endswith((".csv", ".ecsv")):
            from astropy.table import Table

            t = Table.read(str(path), format="ascii.ecsv" if name.endswith(".ecsv") else "ascii.csv")
            units = {c: str(t[c].unit) for c in t.colnames if t[c].unit is not None}
            df = _table_to_pandas(t)
        else:
            raise ProcskyFileError(
                f"cannot tell the format of reference catalogue {path}; use .parquet, .fits, .fits.gz, .csv or .ecsv"
            )
    except ProcskyFileError:
        raise
    except Exception as exc:  # pyarrow/astropy raise many kinds for a damaged file
        raise ProcskyFileError(f"cannot read reference catalogue {path}: {exc}") from exc
    try:
        return normalise_refcat(df, units=units)
    except ProcskyValueError as exc:
        raise ProcskyValueError(f"{path}: {exc}") from exc


def _table_to_pandas(t) -> pd.DataFrame:
    cols = {}
    for c in t.colnames:
        col = t[c]
        if col.ndim > 1:
            continue  # vector columns are not part of the schema
        data = np.asarray(col.filled(np.nan) if hasattr(col, "filled") and col.dtype.kind == "f" else col)
        if data.dtype.byteorder not in ("=", "|"):
            data = data.astype(data.dtype.newbyteorder("="))
        cols[c] = data
    return pd.DataFrame(cols)


def _col(df: pd.DataFrame, *names: str):
    lower = {c.lower(): c for c in df.columns}
    for n in names:
        if n in df.columns:
            return df[n].to_numpy()
        if n.lower() in lower:
            return df[lower[n.lower()]].to_numpy()
    return None


def _err_to_deg(values, unit: str | None, default: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    u = (unit or default).strip().lower()
    if u in ("deg", "degree", "degrees"):
        return v
    if u in ("arcsec", "asec", "arcsecond"):
        return v / 3600.0
    if u in ("mas", "milliarcsec"):
        return v * MAS_TO_DEG
    raise ProcskyValueError(f"unknown angle unit {unit!r} for a position error; use deg, arcsec or mas")


def normalise_refcat(df: pd.DataFrame, *, units: dict | None = None) -> pd.DataFrame:
    """Bring a catalogue table to the normalised reference-catalogue schema.

    Parameters
    ----------
    df : pandas.DataFrame
        procsky-sim-like (``ref_id, ra, dec, ra_err, dec_err, mag_<b>, mag_<b>_err``) or
        Gaia-like (``source_id, ra, dec, ra_error, dec_error, phot_g_mean_mag`` ...).
    units : dict, optional
        Column units from the file (position errors default to degrees for procsky-style
        ``ra_err`` and to mas for Gaia-style ``ra_error``).

    Returns
    -------
    pandas.DataFrame
    """
    units = dict(units or {})
    ra = _col(df, "ra", "ra_icrs", "raj2000")
    dec = _col(df, "dec", "de_icrs", "dej2000", "decl")
    if ra is None or dec is None:
        raise ProcskyValueError(
            f"reference catalogue has no ra/dec columns (columns: {list(df.columns)[:20]}); "
            "name the positions 'ra' and 'dec' in degrees"
        )
    n = len(df)
    out = pd.DataFrame(index=pd.RangeIndex(n))
    ids = _col(df, "ref_id", "source_id", "id", "object_id")
    out["ref_id"] = np.asarray(ids, dtype=np.int64) if ids is not None else np.arange(n, dtype=np.int64)
    out["ra"] = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
    out["dec"] = np.asarray(dec, dtype=np.float64)
    gaia = "ra_error" in df.columns or "phot_g_mean_mag" in df.columns
    for axis in ("ra", "dec"):
        if f"{axis}_err" in df.columns:
            out[f"{axis}_err"] = _err_to_deg(df[f"{axis}_err"], units.get(f"{axis}_err"), "deg")
        elif f"{axis}_error" in df.columns:
            out[f"{axis}_err"] = _err_to_deg(df[f"{axis}_error"], units.get(f"{axis}_error"), "mas")
        else:
            out[f"{axis}_err"] = np.full(n, np.nan)
    pmra = _col(df, "pm_ra", "pmra")
    pmdec = _col(df, "pm_dec", "pmdec")
    out["pm_ra"] = np.asarray(pmra, dtype=np.float64) if pmra is not None else np.full(n, np.nan)
    out["pm_dec"] = np.asarray(pmdec, dtype=np.float64) if pmdec is not None else np.full(n, np.nan)
    epoch = _col(df, "epoch_mjd")
    if epoch is not None:
        out["epoch_mjd"] = np.asarray(epoch, dtype=np.float64)
    else:
        jyear = _col(df, "ref_epoch", "epoch")
        # Julian year -> MJD: J2000.0 = MJD 51544.5, 365.25 d per Julian year.
        out["epoch_mjd"] = (
            51544.5 + (np.asarray(jyear, dtype=np.float64) - 2000.0) * 365.25
            if jyear is not None
            else np.full(n, np.nan)
        )
    mags = {}
    if gaia:
        for band, key in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
            m = _col(df, f"phot_{key}_mean_mag")
            if m is None:
                continue
            snr = _col(df, f"phot_{key}_mean_flux_over_error")
            m = np.asarray(m, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                err = (
                    2.5 / math.log(10.0) / np.asarray(snr, dtype=np.float64) if snr is not None else np.full(n, np.nan)
                )
            mags[band] = (m, err)
        if "G" in mags and "BP" in mags and "RP" in mags:
            g, gerr = mags["G"]
            colour = mags["BP"][0] - mags["RP"][0]
            ok = np.isfinite(colour) & (colour > _GAIA_COLOUR_RANGE[0]) & (colour < _GAIA_COLOUR_RANGE[1])
            for band, (coeffs, scatter) in _GAIA_TO_SDSS.items():
                poly = sum(c * colour**k for k, c in enumerate(coeffs))
                m = np.where(ok, g - poly, np.nan)
                mags[band] = (m, np.sqrt(np.nan_to_num(gerr, nan=0.0) ** 2 + scatter**2))
    for c in df.columns:
        if c.startswith("mag_") and not c.endswith("_err"):
            band = c[4:]
            err = df[f"{c}_err"].to_numpy(dtype=np.float64) if f"{c}_err" in df.columns else np.full(n, np.nan)
            mags[band] = (df[c].to_numpy(dtype=np.float64), err)
    for band, (m, err) in mags.items():
        m = np.asarray(m, dtype=np.float64)
        out[f"mag_{band}"] = m
        out[f"mag_{band}_err"] = np.where(np.isfinite(m), np.asarray(err, dtype=np.float64), np.nan)
    good = (
        np.isfinite(out["ra"].to_numpy()) & np.isfinite(out["dec"].to_numpy()) & (np.abs(out["dec"].to_numpy()) <= 90)
    )
    out = out[good].reset_index(drop=True)
    _set_units(out)
    return out


def _set_units(df: pd.DataFrame) -> pd.DataFrame:
    units = {c: u for c, u in REFCAT_UNITS.items() if c in df.columns}
    units.update({c: "mag(AB)" for c in df.columns if c.startswith("mag_")})
    units.update({c: "pixel" for c in ("x", "y") if c in df.columns})
    df.attrs["units"] = units
    return df


def apply_proper_motion(df: pd.DataFrame, mjd: float) -> pd.DataFrame:
    """Move positions to epoch ``mjd`` (TAI MJD) with the proper motions (linear, tangent plane).

    Sources without proper motion keep their positions. Returns a new frame whose
    ``epoch_mjd`` is ``mjd`` for the moved sources.
    """
    out = df.copy()
    if not len(out) or not np.isfinite(mjd):
        return out
    pmra = out["pm_ra"].to_numpy(dtype=np.float64)
    pmdec = out["pm_dec"].to_numpy(dtype=np.float64)
    ep = out["epoch_mjd"].to_numpy(dtype=np.float64)
    ok = np.isfinite(pmra) & np.isfinite(pmdec) & np.isfinite(ep)
    if not ok.any():
        return out
    dt = (mjd - ep) / 365.25  # years
    cosd = np.cos(np.radians(out["dec"].to_numpy()))
    dra = np.where(ok, pmra * dt * MAS_TO_DEG / np.maximum(cosd, 1e-6), 0.0)
    ddec = np.where(ok, pmdec * dt * MAS_TO_DEG, 0.0)
    out["ra"] = np.mod(out["ra"].to_numpy() + dra, 360.0)
    out["dec"] = out["dec"].to_numpy() + ddec
    out["epoch_mjd"] = np.where(ok, mjd, ep)
    out.attrs = dict(df.attrs)
    return out


# ------------------------------------------------------------------------------ shards
def _nside(level: int) -> int:
    if not 0 <= int(level) <= 29:
        raise ProcskyValueError(f"healpix_level must be 0..29, got {level}")
    return 1 << int(level)


def refcat_run(name: str) -> str:
    """The run holding the shards of refcat ``name`` (``refcats/<name>``)."""
    return f"refcats/{name}"


def ingest_refcat(
    repo, files: Sequence[str | Path], name: str, *, healpix_level: int = DEFAULT_HEALPIX_LEVEL, run: str | None = None
) -> list:
    """Ingest catalogue files into ``repo`` as HEALPix-sharded ``refcat`` datasets.

    Every file is read and normalised before anything is written, so a bad file changes
    nothing. Sources found in several files (same ``ref_id``) are kept once.

    Parameters
    ----------
    repo : procsky.repo.Repo
    files : sequence of str or Path
        Parquet, FITS, CSV/ECSV catalogues (see :func:`read_refcat_file`).
    name : str
        Catalogue name (``gaia_dr2``, ``sim``); a word of letters, digits, ``_`` and ``-``.
    healpix_level : int
        HEALPix level of the shards (NESTED; ``nside = 2**level``); 7 gives ~27 arcmin
        pixels, a few per wide-field detector.
    run : str, optional
        Output run, default ``refcats/<name>``.

    Returns
    -------
    list of DatasetRef
        One per shard written.
    """
    import re

    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", name):
        raise ProcskyValueError(
            f"refcat name {name!r} is not valid; use letters, digits, '_' and '-' (e.g. 'gaia_dr2')"
        )
    paths = [Path(f) for f in files]
    if not paths:
        raise ProcskyValueError("no reference catalogue files given; pass at least one file")
    run = run or refcat_run(name)
    existing = [r for r in _refcat_refs(repo, name) if r.run == run]
    if existing:
        raise ProcskyValueError(
            f"refcat {name!r} already has {len(existing)} shard(s) in run {run!r}; ingest under another "
            "--name, or remove the old shards first (`procsky prune`)"
        )
    frames = [read_refcat_file(f) for f in paths]
    df = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    df = df.drop_duplicates("ref_id", keep="first").reset_index(drop=True)
    if not len(df):
        raise ProcskyValueError(f"the reference catalogue files {[str(f) for f in paths]} hold no usable sources")
    nside = _nside(healpix_level)
    pix = lonlat_to_healpix(df["ra"].to_numpy() * u.deg, df["dec"].to_numpy() * u.deg, nside, order="nested")
    pix = np.asarray(pix, dtype=np.int64)
    refs = []
    order = np.argsort(pix, kind="stable")
    spix = pix[order]
    bounds = np.flatnonzero(np.diff(spix)) + 1
    for idx in np.split(order, bounds):
        shard = df.iloc[idx].reset_index(drop=True)
        _set_units(shard)
        shard.attrs["meta"] = {
            "refcat": name,
            "healpix_level": int(healpix_level),
            "healpix": int(pix[idx[0]]),
            "sources": [f.name for f in paths],
        }
        data_id = {"refcat": name, "healpix_level": int(healpix_level), "healpix": int(pix[idx[0]])}
        refs.append(repo.put(shard, REFCAT_DATASET_TYPE, data_id, run))
    return refs


def _refcat_refs(repo, name: str | None = None, run=None) -> list:
    if REFCAT_DATASET_TYPE not in {dt.name for dt in repo.dataset_types()}:
        return []
    refs = repo.query(REFCAT_DATASET_TYPE, run=run)
    return [r for r in refs if name is None or r.data_id.get("refcat") == name]


def list_refcats(repo) -> dict[str, dict]:
    """Reference catalogues in ``repo``: name -> {"runs", "n_shards", "healpix_level"}."""
    out: dict[str, dict] = {}
    for r in _refcat_refs(repo):
        nm = r.data_id.get("refcat")
        d = out.setdefault(nm, {"runs": set(), "n_shards": 0, "healpix_level": r.data_id.get("healpix_level")})
        d["runs"].add(r.run)
        d["n_shards"] += 1
    for d in out.values():
        d["runs"] = sorted(d["runs"])
    return out


def shard_ids_for_cone(ra: float, dec: float, radius_deg: float, healpix_level: int) -> np.ndarray:
    """HEALPix (NESTED) pixels of a level that may overlap a cone.

    The search radius is padded by the pixel size so that pixels whose centre lies outside
    the cone but whose area reaches into it are included.

    Parameters
    ----------
    ra, dec : float, deg
    radius_deg : float, deg
    healpix_level : int

    Returns
    -------
    ndarray of int64
    """
    import astropy.units as u
    from astropy_healpix import HEALPix, nside_to_pixel_resolution

    nside = _nside(healpix_level)
    hp = HEALPix(nside=nside, order="nested")
    pad = nside_to_pixel_resolution(nside).to_value(u.deg)
    r = min(float(radius_deg) + pad, 180.0)
    return np.asarray(hp.cone_search_lonlat(float(ra) * u.deg, float(dec) * u.deg, r * u.deg), dtype=np.int64)


def shards_in_cone(
    data_ids: Iterable[dict], ra: float, dec: float, radius_deg: float, name: str | None = None
) -> list[int]:
    """Indices of the shard data IDs (as stored) that may overlap a cone.

    Works on data IDs only (no I/O), for :meth:`procsky.pipeline.Task.quanta`.

    Parameters
    ----------
    data_ids : iterable of dict
        ``{"refcat", "healpix_level", "healpix"}`` data IDs.
    ra, dec, radius_deg : float, deg
    name : str, optional
        Keep only this refcat.

    Returns
    -------
    list of int
        Positions in ``data_ids``.
    """
    data_ids = list(data_ids)
    by_level: dict[int, set[int]] = {}
    keep = []
    for i, d in enumerate(data_ids):
        if name is not None and d.get("refcat") != name:
            continue
        if "healpix" not in d or "healpix_level" not in d:
            continue
        level = int(d["healpix_level"])
        if level not in by_level:
            by_level[level] = set(shard_ids_for_cone(ra, dec, radius_deg, level).tolist())
        if int(d["healpix"]) in by_level[level]:
            keep.append(i)
    return keep


def concat_shards(shards: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate shard DataFrames (dropping duplicates), keeping the units."""
    shards = [s for s in shards if s is not None and len(s)]
    if not shards:
        return _set_units(
            pd.DataFrame(
                {
                    c: pd.Series(dtype=np.int64 if c == "ref_id" else np.float64)
                    for c in ("ref_id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "epoch_mjd")
                }
            )
        )
    df = pd.concat(shards, ignore_index=True, sort=False).drop_duplicates("ref_id").reset_index(drop=True)
    return _set_units(df)


def _angular_sep_deg(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    # haversine: stable at small separations
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


def load_refcat(
    repo, name: str, ra: float, dec: float, radius_deg: float, *, epoch_mjd: float | None = None, run=None
) -> pd.DataFrame:
    """Reference sources of ``name`` within ``radius_deg`` of (ra, dec).

    Parameters
    ----------
    repo : procsky.repo.Repo
    name : str
        Catalogue name given at ingest.
    ra, dec, radius_deg : float, deg
    epoch_mjd : float, optional
        Move positions to this epoch with the proper motions (when present).
    run : str or list, optional
        Runs to search (default: every run).

    Returns
    -------
    pandas.DataFrame
        Normalised schema, only the sources inside the cone.
    """
    refs = _refcat_refs(repo, name, run)
    if not refs:
        known = sorted(list_refcats(repo))
        raise ProcskyKeyError(
            f"no reference catalogue {name!r} in {repo.root} (known: {', '.join(known) or 'none'}); "
            f"ingest one with `procsky ingest-refcat {repo.root} FILE... --name {name}`"
        )
    keep = shards_in_cone([r.data_id for r in refs], ra, dec, radius_deg, name)
    df = concat_shards([repo.get(refs[i]) for i in keep])
    if len(df):
        df = df[_angular_sep_deg(ra, dec, df["ra"], df["dec"]) <= radius_deg].reset_index(drop=True)
    if epoch_mjd is not None:
        df = apply_proper_motion(df, epoch_mjd)
    return _set_units(df)


def wcs_cone(wcs, shape: tuple[int, int], margin_px: float = 0.0) -> tuple[float, float, float]:
    """A cone (ra, dec, radius) in degrees enclosing a detector of ``shape`` (ny, nx)."""
    ny, nx = shape
    xs = np.array([-0.5 - margin_px, nx - 0.5 + margin_px, nx - 0.5 + margin_px, -0.5 - margin_px, 0.5 * (nx - 1)])
    ys = np.array([-0.5 - margin_px, -0.5 - margin_px, ny - 0.5 + margin_px, ny - 0.5 + margin_px, 0.5 * (ny - 1)])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    sep = _angular_sep_deg(ra[4], dec[4], ra[:4], dec[:4])
    return float(ra[4]), float(dec[4]), float(np.max(sep))


def select_in_footprint(df: pd.DataFrame, wcs, shape: tuple[int, int], margin_px: float = 0.0) -> pd.DataFrame:
    """Rows of a reference catalogue that fall on a detector (plus ``margin_px``).

    Adds columns ``x``, ``y`` (0-based pixel positions through ``wcs``).
    """
    if not len(df):
        out = df.copy()
        out["x"] = pd.Series(dtype=np.float64)
        out["y"] = pd.Series(dtype=np.float64)
        return _set_units(out)
    ra0, dec0, rad = wcs_cone(wcs, shape, margin_px)
    near = _angular_sep_deg(ra0, dec0, df["ra"], df["dec"]) <= rad * 1.05 + 1e-6
    sub = df[near.to_numpy() if hasattr(near, "to_numpy") else near].reset_index(drop=True)
    if not len(sub):
        sub = sub.copy()
        sub["x"] = pd.Series(dtype=np.float64)
        sub["y"] = pd.Series(dtype=np.float64)
        return _set_units(sub)
    x, y = wcs.world_to_pixel_values(sub["ra"].to_numpy(), sub["dec"].to_numpy())
    ny, nx = shape
    on = (x > -0.5 - margin_px) & (x < nx - 0.5 + margin_px) & (y > -0.5 - margin_px) & (y < ny - 0.5 + margin_px)
    sub = sub[on].reset_index(drop=True).copy()
    sub["x"] = np.asarray(x)[on]
    sub["y"] = np.asarray(y)[on]
    return _set_units(sub)


def load_refcat_for_wcs(
    repo, name: str, wcs, shape: tuple[int, int], *, margin_px: float = 50.0, epoch_mjd: float | None = None, run=None
) -> pd.DataFrame:
    """Reference sources falling on a detector of ``shape`` (ny, nx) with ``wcs``.

    Parameters
    ----------
    repo : procsky.repo.Repo
    name : str
    wcs : astropy.wcs.WCS
    shape : (int, int)
        Detector shape (ny, nx), pixels.
    margin_px : float, pixels
        Also keep sources this far outside the detector (for matching with a WCS that is
        a little off).
    epoch_mjd : float, optional
        Apply proper motions to this epoch.
    run : str or list, optional

    Returns
    -------
    pandas.DataFrame
        Normalised schema plus ``x``, ``y`` (pixels).
    """
    from procsky.wcs import copy_wcs

    w = copy_wcs(wcs)
    ra, dec, rad = wcs_cone(w, shape, margin_px)
    df = load_refcat(repo, name, ra, dec, rad * 1.05, epoch_mjd=epoch_mjd, run=run)
    return select_in_footprint(df, w, shape, margin_px)
