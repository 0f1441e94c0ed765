"""DIA tasks: ``detect_dia``, ``associate_dia`` and ``forced_dia``.

* ``detect_dia`` (per {instrument, visit, detector}): DIA detection in both polarities and
  measurement (:func:`procsky.diffim.detect_dia_sources`) on a stored ``diff``, with the
  calexp as the static sky of the registration-noise term of the detection score. Writes
  ``dia_source`` and the per-detector ``diffim_summary`` (the subtraction summary stored
  with the difference plus the DIA source counts). Run after ``subtract``, it measures the
  difference once it is stored, so that the difference is computed once.
* ``associate_dia`` (per {skymap, tract}): gathers every ``dia_source`` of the run and
  associates them into ``dia_object`` (:func:`procsky.kernels.associate.associate_sources`:
  nearest object within 1 arcsec, visits in time order, sources by id; running mean
  positions and counts). When the tract's template patches are known, only sources inside
  them are kept, so that two tracts do not both own a source.
* ``forced_dia`` (per {instrument, visit, detector}): PSF photometry on the difference
  image at every DIA object position on the detector -> ``dia_forced_source`` (light
  curves, nJy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pydantic

from procsky.diffim import DiaConfig, detect_dia_sources, diffim_summary, forced_dia_photometry, with_recorded_summary
from procsky.errors import NoWorkError
from procsky.kernels.associate import associate_sources
from procsky.tasks.base import Input, Output, QuantumSpec, Task, TaskConfig, register_task

__all__ = ["DetectDiaTask", "AssociateDiaTask", "ForcedDiaTask", "associate_dia_sources"]

_VD = ("instrument", "visit", "detector")
_PATCH = ("skymap", "tract", "patch")


class DetectDiaConfig(TaskConfig):
    """Configuration of :class:`DetectDiaTask`."""

    dia: DiaConfig = DiaConfig()
    """Detection threshold, dipole pairing, flags (:class:`procsky.diffim.DiaConfig`)."""


@register_task("detect_dia")
class DetectDiaTask(Task):
    """Detection in both polarities and measurement on a difference image."""

    dimensions = _VD
    inputs = {
        "diff": Input("diff", _VD),
        "static": Input("calexp", _VD, optional=True),
    }
    outputs = {
        "dia_source": Output("dia_source", _VD),
        "summary": Output("diffim_summary", _VD),
    }
    Config = DetectDiaConfig
    config: DetectDiaConfig

    def run(self, diff, static=None, data_ids=None):
        """Returns ``{"dia_source": DataFrame, "summary": dict}``."""
        if diff is None:
            raise NoWorkError("no difference image")
        sky = None if static is None else np.asarray(static.image, dtype=np.float32)
        diff = with_recorded_summary(diff)
        df, _ = detect_dia_sources(diff, self.config.dia, static=sky)
        did = (data_ids or {}).get("diff") or {}
        for k in ("visit", "detector"):
            if k in did:
                df[k] = np.full(len(df), int(did[k]), dtype=np.int64)
        return {"dia_source": df, "summary": diffim_summary(diff, df)}


def associate_dia_sources(sources: list, data_ids: list | None = None, *, radius_arcsec: float = 1.0, keep=None):
    """Associate DIA source tables into a DIA object table.

    Parameters
    ----------
    sources : list of pandas.DataFrame
        ``dia_source`` tables (columns ``ra``, ``dec``, ``mjd``, ``dia_source_id``,
        ``psf_flux``, ``psf_flux_err``; ``visit``/``detector`` from the table or ``data_ids``).
    data_ids : list of dict, optional
        Data ID of each table.
    radius_arcsec : float, arcsec
    keep : callable, optional
        ``keep(ra, dec) -> bool array``: sources outside are dropped (tract ownership).

    Returns
    -------
    dia_object : pandas.DataFrame
        ``dia_object_id``, ``ra``, ``dec`` (deg, mean), ``n_dia_sources``, ``first_mjd``,
        ``last_mjd``, ``mean_psf_flux``, ``max_abs_snr``, ``n_negative``, ``band`` list.
    dia_source : pandas.DataFrame
        All sources with their ``dia_object_id``.
    """
    frames = []
    for k, df in enumerate(sources):
        if df is None or len(df) == 0:
            continue
        df = df.copy()
        did = (data_ids[k] if data_ids is not None else None) or {}
        for key in ("visit", "detector"):
            if key not in df and key in did:
                df[key] = np.full(len(df), int(did[key]), dtype=np.int64)
        frames.append(df)
    cols = [
        "dia_object_id",
        "ra",
        "dec",
        "n_dia_sources",
        "first_mjd",
        "last_mjd",
        "mean_psf_flux",
        "max_abs_snr",
        "n_negative",
    ]
    if not frames:
        raise NoWorkError("no DIA sources to associate")
    src = pd.concat(frames, ignore_index=True)
    if "visit" not in src:
        src["visit"] = 0
    if "detector" not in src:
        src["detector"] = 0
    if keep is not None:
        src = src[np.asarray(keep(src["ra"].to_numpy(), src["dec"].to_numpy()), bool)].reset_index(drop=True)
        if len(src) == 0:
            raise NoWorkError("no DIA source falls inside this tract")
    # Source ids unique across detectors: (detector, per-image id) ordering within a visit.
    order_id = src["detector"].to_numpy(np.int64) * 10_000_000 + src["dia_source_id"].to_numpy(np.int64)
    obj, ra, dec, n, first, last = associate_sources(
        src["ra"], src["dec"], src["mjd"], src["visit"], order_id, radius_arcsec=radius_arcsec
    )
    src["dia_object_id"] = obj
    good = obj >= 0
    s = src[good]
    g = s.groupby("dia_object_id")
    out = pd.DataFrame(
        {
            "dia_object_id": np.arange(len(ra), dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "n_dia_sources": n,
            "first_mjd": first,
            "last_mjd": last,
        }
    )
    out["mean_psf_flux"] = g["psf_flux"].mean().reindex(out.dia_object_id).to_numpy()
    snr = (s["psf_flux"] / s["psf_flux_err"]).abs()
    out["max_abs_snr"] = snr.groupby(s["dia_object_id"]).max().reindex(out.dia_object_id).to_numpy()
    if "is_negative" in s:
        out["n_negative"] = (
            s["is_negative"]
            .groupby(s["dia_object_id"])
            .sum()
            .reindex(out.dia_object_id)
            .fillna(0)
            .astype(np.int64)
            .to_numpy()
        )
    else:
        out["n_negative"] = 0
    out = out[cols]
    out.attrs["units"] = {"ra": "deg", "dec": "deg", "first_mjd": "d", "last_mjd": "d", "mean_psf_flux": "nJy"}
    return out, src


class AssociateDiaConfig(TaskConfig):
    """Configuration of :class:`AssociateDiaTask`."""

    radius_arcsec: float = pydantic.Field(1.0, gt=0)
    """Association radius, arcsec."""
    min_reliability: float = pydantic.Field(0.0, ge=0, le=1)
    """Sources with a lower reliability score are not associated."""
    skip_flagged: bool = True
    """Drop sources flagged edge, masked or next to saturated pixels before associating."""


@register_task("associate_dia")
class AssociateDiaTask(Task):
    """DIA sources of the run -> DIA objects of a tract."""

    dimensions = ("skymap", "tract")
    inputs = {
        "dia_sources": Input("dia_source", _VD, multiple=True, tolerate_missing=True),
        "templates": Input("template", _PATCH + ("band",), multiple=True, optional=True),
    }
    outputs = {"dia_object": Output("dia_object", ("skymap", "tract"))}
    Config = AssociateDiaConfig
    config: AssociateDiaConfig

    def quanta(self, repo, inputs, where):
        """One quantum per tract holding templates, each gathering every DIA source."""
        srcs = sorted(inputs.get("dia_sources", []), key=lambda d: d.key)
        tpls = inputs.get("templates", [])
        tracts: dict = {}
        for t in tpls:
            qid = {"skymap": t.data_id["skymap"], "tract": t.data_id["tract"]}
            if where is not None and not where(qid):
                continue
            tracts.setdefault((str(qid["skymap"]), int(qid["tract"])), (qid, []))[1].append(t)
        if not srcs or not tracts:
            return []
        return [
            QuantumSpec(data_id=qid, inputs={"dia_sources": srcs, "templates": sorted(lst, key=lambda d: d.key)})
            for _, (qid, lst) in sorted(tracts.items())
        ]

    def run(self, dia_sources, templates=None, data_ids=None):
        keep_fn = _inside_templates(templates) if templates else None
        frames: list[Any] = []
        for df in dia_sources:
            if df is None:
                frames.append(None)
                continue
            m = np.ones(len(df), bool)
            if self.config.skip_flagged:
                for c in ("flag_edge", "flag_masked", "flag_saturated_nearby"):
                    if c in df:
                        m &= ~df[c].to_numpy(bool)
            if "reliability" in df:
                m &= df["reliability"].to_numpy(float) >= self.config.min_reliability
            frames.append(df[m])
        dids = (data_ids or {}).get("dia_sources")
        obj, _ = associate_dia_sources(frames, dids, radius_arcsec=self.config.radius_arcsec, keep=keep_fn)
        return {"dia_object": obj}


def _inside_templates(templates):
    """``keep(ra, dec)``: inside the pixel grid of any template (patch) exposure."""
    grids = [(t.wcs_cards, t.shape) for t in templates if t is not None and t.wcs_cards]
    if not grids:
        return None

    def keep(ra, dec):
        from procsky.wcs import wcs_from_cards

        inside = np.zeros(len(ra), bool)
        for cards, (ny, nx) in grids:
            w = wcs_from_cards(cards, (ny, nx))
            assert w is not None, "grids holds only templates with WCS cards"
            x, y = w.world_to_pixel_values(ra, dec)
            inside |= (x >= -0.5) & (y >= -0.5) & (x < nx - 0.5) & (y < ny - 0.5)
        return inside

    return keep


class ForcedDiaConfig(TaskConfig):
    """Configuration of :class:`ForcedDiaTask`."""

    min_sources: int = pydantic.Field(1, ge=1)
    """Only DIA objects with at least this many DIA sources get forced photometry."""


@register_task("forced_dia")
class ForcedDiaTask(Task):
    """Forced PSF photometry at every DIA object position on one difference image."""

    dimensions = _VD
    inputs = {
        "diff": Input("diff", _VD),
        "dia_objects": Input("dia_object", ("skymap", "tract"), multiple=True),
    }
    outputs = {"dia_forced_source": Output("dia_forced_source", _VD)}
    Config = ForcedDiaConfig
    config: ForcedDiaConfig

    def run(self, diff, dia_objects, data_ids=None):
        objs = [o for o in dia_objects if o is not None and len(o)]
        if not objs:
            raise NoWorkError("no DIA objects")
        tids = (data_ids or {}).get("dia_objects") or [None] * len(dia_objects)
        frames = []
        for o, did in zip(dia_objects, tids):
            if o is None or len(o) == 0:
                continue
            o = o[o["n_dia_sources"] >= self.config.min_sources]
            f = forced_dia_photometry(diff, o["ra"].to_numpy(), o["dec"].to_numpy(), o["dia_object_id"].to_numpy())
            if did and "tract" in did:
                f["tract"] = np.full(len(f), int(did["tract"]), dtype=np.int64)
            frames.append(f)
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        did = (data_ids or {}).get("diff") or {}
        for k in ("visit", "detector"):
            if k in did:
                out[k] = np.full(len(out), int(did[k]), dtype=np.int64)
        if len(out) == 0:
            raise NoWorkError("no DIA object falls on this detector")
        out.attrs["units"] = {
            "psf_flux": "nJy",
            "psf_flux_err": "nJy",
            "x": "pixel",
            "y": "pixel",
            "ra": "deg",
            "dec": "deg",
            "mjd": "d",
        }
        return {"dia_forced_source": out}
