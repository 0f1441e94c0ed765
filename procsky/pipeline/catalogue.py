"""Reading the data release's catalogues from a repository: objects near a position, light curves.

The ``object`` and ``forced_source`` tables are stored per (skymap, tract, patch) as
Parquet (:mod:`procsky.tasks.objects`). These functions read only what a question needs
(pyarrow filters on ``ra``/``dec`` or ``object_id``), so they stay quick on a full
release; :func:`catalogue_frame` gives every patch's table as one ``dask.dataframe``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from procsky.errors import ProcskyKeyError, ProcskyValueError

__all__ = ["catalogue_frame", "find_objects", "light_curve"]


def _refs(repo, dataset_type: str, run, where=None):
    refs = repo.query(dataset_type, where=where, run=run)
    if not refs:
        scope = f" in run {run!r}" if run else ""
        raise ProcskyKeyError(
            f"no {dataset_type!r} datasets{scope}{' matching ' + where if where else ''}; run the drp pipeline "
            "through make_objects / forced_phot first (procsky run drp ...)"
        )
    # One dataset per data ID: the newest run wins (query returns every run's).
    seen: dict = {}
    for r in refs:
        key = json.dumps(r.data_id, sort_keys=True, default=str)
        if key not in seen or str(r.created or "") > str(seen[key].created or ""):
            seen[key] = r
    return list(seen.values())


def _read(repo, ref, filters=None, columns=None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(str(repo.path(ref)), filters=filters, columns=columns)
    df = table.to_pandas()
    md = table.schema.metadata or {}
    units = json.loads(md[b"procsky.units"]) if b"procsky.units" in md else {}
    df.attrs["units"] = {k: v for k, v in units.items() if k in df.columns}
    return df


def _angsep_arcsec(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1)))) * 3600.0


def find_objects(
    repo,
    ra: float,
    dec: float,
    radius_arcsec: float = 2.0,
    *,
    run: str | Sequence[str] | None = None,
    primary_only: bool = True,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Objects within ``radius_arcsec`` of (``ra``, ``dec``), nearest first.

    Parameters
    ----------
    repo : procsky.repo.Repo
    ra, dec : float, deg
    radius_arcsec : float
    run : str or list of str, optional
        Run(s) holding ``object`` datasets (default: every run, newest dataset per patch).
    primary_only : bool
        Only ``is_primary`` rows (each sky position once across patch overlaps).
    columns : list of str, optional
        Columns to read (``object_id``, ``ra``, ``dec`` are always read).

    Returns
    -------
    pandas.DataFrame
        The matching rows plus ``sep_arcsec``; units in ``attrs["units"]``.
    """
    if not radius_arcsec > 0:
        raise ProcskyValueError(f"radius must be > 0 arcsec, got {radius_arcsec}")
    r_deg = radius_arcsec / 3600.0
    dra = r_deg / max(math.cos(math.radians(dec)), 1e-6)
    filters = [("dec", ">=", dec - r_deg), ("dec", "<=", dec + r_deg)]
    if dra < 180:
        lo, hi = (ra - dra) % 360.0, (ra + dra) % 360.0
        if lo <= hi:
            filters += [("ra", ">=", lo), ("ra", "<=", hi)]
    if primary_only:
        filters.append(("is_primary", "==", True))
    cols = None if columns is None else list(dict.fromkeys(["object_id", "ra", "dec", *columns]))
    frames, units = [], {}
    for ref in _refs(repo, "object", run):
        df = _read(repo, ref, filters=filters, columns=cols)
        units.update(df.attrs.get("units", {}))
        if len(df):
            frames.append(df)
    if not frames:
        out = pd.DataFrame(columns=["object_id", "ra", "dec", "sep_arcsec"])
    else:
        out = pd.concat(frames, ignore_index=True)
        out["sep_arcsec"] = _angsep_arcsec(ra, dec, out["ra"], out["dec"])
        out = out[out["sep_arcsec"] <= radius_arcsec].sort_values("sep_arcsec").reset_index(drop=True)
    units["sep_arcsec"] = "arcsec"
    out.attrs["units"] = {k: v for k, v in units.items() if k in out.columns}
    return out


def light_curve(
    repo,
    object_id: int,
    *,
    run: str | Sequence[str] | None = None,
    band: str | None = None,
) -> pd.DataFrame:
    """The forced-photometry light curve of one object (every band unless ``band``), by time.

    Returns the object's ``forced_source`` rows: ``mjd``, ``band``, ``visit``, ``detector``,
    ``psf_flux``/``psf_flux_err`` (calexp) and ``psf_diff_flux``/``psf_diff_flux_err``
    (difference image), nJy.
    """
    filters: list[tuple[str, str, object]] = [("object_id", "==", int(object_id))]
    if band:
        filters.append(("band", "==", str(band)))
    frames, units = [], {}
    for ref in _refs(repo, "forced_source", run):
        df = _read(repo, ref, filters=filters)
        units.update(df.attrs.get("units", {}))
        if len(df):
            frames.append(df)
    if not frames:
        raise ProcskyKeyError(
            f"object {object_id} has no forced photometry{' in band ' + band if band else ''}"
            f"{' in run ' + repr(run) if run else ''} (is it a primary object? `procsky objects near` lists them)"
        )
    out = pd.concat(frames, ignore_index=True).sort_values(["mjd", "band"]).reset_index(drop=True)
    out.attrs["units"] = units
    return out


def catalogue_frame(repo, dataset_type: str = "object", *, run=None, columns: Sequence[str] | None = None):
    """Every patch's ``object`` (or ``forced_source``) table as one lazy ``dask.dataframe``."""
    from procsky._dask import dataframe_from_parquet

    paths = [str(repo.path(r)) for r in _refs(repo, dataset_type, run)]
    return dataframe_from_parquet(paths, columns=list(columns) if columns else None)
