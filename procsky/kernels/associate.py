"""Association of DIA sources into DIA objects, on numpy arrays.

Sources are processed visit by visit in time order (then by source id within a visit), as
alert production sees them (LSST ``AssociationTask``): each source joins the nearest
existing DIA object within the match radius, each object taking at most one source per
visit (closest pairs first); unmatched sources start new objects. Object positions are the
running mean of their sources' unit vectors, so the match radius is a true angle at any
declination and across RA = 0. The result does not depend on the input order of the
arrays: it is sorted first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["radec_to_xyz", "xyz_to_radec", "associate_sources"]


def radec_to_xyz(ra, dec):
    """Unit vectors ``(n, 3)`` of positions in degrees."""
    ra = np.radians(np.asarray(ra, dtype=np.float64))
    dec = np.radians(np.asarray(dec, dtype=np.float64))
    c = np.cos(dec)
    return np.column_stack([c * np.cos(ra), c * np.sin(ra), np.sin(dec)])


def xyz_to_radec(xyz):
    """RA in [0, 360) and Dec (degrees) of (not necessarily unit) vectors ``(n, 3)``."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    dec = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    return ra, dec


def associate_sources(ra, dec, mjd, visit, source_id, *, radius_arcsec=1.0):
    """Associate sources into objects.

    Parameters
    ----------
    ra, dec : array_like (n,), deg
        Source positions.
    mjd : array_like (n,), days
        Visit midpoint times; visits are processed in order of (mjd, visit).
    visit : array_like (n,) int
        Visit of each source (sources of one visit never join the same object).
    source_id : array_like (n,) int
        Orders sources within a visit.
    radius_arcsec : float, arcsec
        Match radius (1 arcsec by default, LSST's ``maxDistArcSeconds``).

    Returns
    -------
    object_index : ndarray (n,) int64
        Object of each input source (0-based, objects numbered in order of creation).
    ra_obj, dec_obj : ndarray (n_obj,), deg
        Mean positions.
    n_sources : ndarray (n_obj,) int64
    first_mjd, last_mjd : ndarray (n_obj,), days
    """
    from scipy.spatial import cKDTree

    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    mjd = np.asarray(mjd, dtype=np.float64)
    visit = np.asarray(visit, dtype=np.int64)
    sid = np.asarray(source_id, dtype=np.int64)
    n = ra.size
    if not (dec.size == mjd.size == visit.size == sid.size == n):
        raise ValueError("ra, dec, mjd, visit and source_id must have the same length")
    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    obj = np.full(n, -1, dtype=np.int64)
    if n == 0:
        z = np.zeros(0)
        return obj, z, z, np.zeros(0, np.int64), z, z
    finite = np.isfinite(ra) & np.isfinite(dec)
    order = np.lexsort((sid, visit, np.nan_to_num(mjd, nan=np.inf)))
    xyz = radec_to_xyz(np.where(finite, ra, 0.0), np.where(finite, dec, 0.0))
    # chord length of the match angle
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    sums: list[np.ndarray] = []  # sum of unit vectors per object
    counts: list[int] = []
    first: list[float] = []
    last: list[float] = []
    # visit groups in processing order
    ov = visit[order]
    om = mjd[order]
    breaks = np.nonzero((ov[1:] != ov[:-1]) | (om[1:] != om[:-1]))[0] + 1
    for group in np.split(order, breaks):
        group = group[finite[group]]
        if group.size == 0:
            continue
        pairs = []
        if sums:
            centers = np.array(sums)
            centers /= np.linalg.norm(centers, axis=1)[:, None]
            tree = cKDTree(centers)
            for rank, s in enumerate(group):
                for o in tree.query_ball_point(xyz[s], r=chord):
                    d = float(np.linalg.norm(centers[o] - xyz[s]))
                    pairs.append((d, rank, o))
        pairs.sort()
        used_obj = set()
        for _d, rank, o in pairs:
            s = group[rank]
            if obj[s] >= 0 or o in used_obj:
                continue
            obj[s] = o
            used_obj.add(o)
            sums[o] = sums[o] + xyz[s]
            counts[o] += 1
            first[o] = min(first[o], mjd[s])
            last[o] = max(last[o], mjd[s])
        for s in group:
            if obj[s] < 0:
                obj[s] = len(sums)
                sums.append(xyz[s].copy())
                counts.append(1)
                first.append(mjd[s])
                last.append(mjd[s])
    ra_o, dec_o = xyz_to_radec(np.array(sums))
    return (
        obj,
        ra_o,
        dec_o,
        np.array(counts, dtype=np.int64),
        np.array(first, dtype=np.float64),
        np.array(last, dtype=np.float64),
    )
