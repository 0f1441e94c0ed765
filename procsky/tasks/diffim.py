"""Difference-imaging tasks: ``make_template`` and ``subtract``.

* ``make_template`` (per {skymap, tract, patch, band}): coadd of the best-seeing warps of
  the patch (a configurable fraction, at least a minimum count), stored as ``template``;
  built with :func:`procsky.coadd.build_coadd`.
* ``subtract`` (per {instrument, visit, detector}): the difference image of a calexp
  (:func:`procsky.diffim.difference_image`: the overlapping template patches warped onto
  the detector's grid, Alard-Lupton PSF matching with spatial variation and a differential
  background, noise decorrelation, DIA detections flagged in the mask), handed to the
  executor as a lazy graph and computed once, when it is written. ``detect_dia``
  (:mod:`procsky.tasks.dia`) then measures the DIA sources on the stored difference and
  writes ``dia_source`` and the per-detector ``diffim_summary``.
"""

from __future__ import annotations

import math

import numpy as np
import pydantic

from procsky.coadd import CoaddConfig
from procsky.diffim import DiaConfig, SubtractionConfig, difference_image, warp_template_to_science
from procsky.errors import NoWorkError
from procsky.tasks.base import Input, Output, QuantumSpec, Task, TaskConfig, register_task

__all__ = ["MakeTemplateTask", "SubtractTask", "warp_template_to_science", "select_best_seeing", "visit_bands"]

_VD = ("instrument", "visit", "detector")
_PATCH = ("skymap", "tract", "patch")


def visit_bands(repo) -> dict:
    """``{(instrument, visit): record}`` of the registry's visit records ({} without a repo)."""
    if repo is None:
        return {}
    try:
        recs = repo.dimension_records("visit")
    except Exception:  # noqa: BLE001 - hand-made repositories have no visit records
        return {}
    return {(r.get("instrument"), r.get("visit")): r for r in recs}


def _band_of(data_id, records) -> str | None:
    if data_id.get("band") is not None:
        return data_id["band"]
    rec = records.get((data_id.get("instrument"), data_id.get("visit")))
    return None if rec is None else rec.get("band")


def select_best_seeing(fwhms, fraction: float, min_count: int, max_count: int | None = None) -> list[int]:
    """Indices of the best-seeing inputs: the best ``fraction`` but at least ``min_count``.

    Parameters
    ----------
    fwhms : sequence of float, pixels
        PSF FWHM of each input (NaN for unknown: never selected before known ones).
    fraction : float
        Fraction of the inputs kept (rounded up).
    min_count : int
        Minimum number kept (all when there are fewer).
    max_count : int, optional
        Maximum number kept.

    Returns
    -------
    list of int
        Sorted by FWHM, ties by input order.
    """
    f = np.asarray(fwhms, dtype=float)
    n = f.size
    k = max(int(math.ceil(fraction * n)), min(min_count, n))
    if max_count is not None:
        k = min(k, max_count)
    order = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")
    return [int(i) for i in order[:k]]


class MakeTemplateConfig(TaskConfig):
    """Configuration of :class:`MakeTemplateTask`."""

    best_seeing_fraction: float = pydantic.Field(0.5, gt=0, le=1)
    """Fraction of the warps (best seeing first) coadded into the template."""
    min_count: int = pydantic.Field(3, ge=1)
    """At least this many warps (all when fewer exist)."""
    max_count: int | None = None
    """At most this many warps."""
    coadd: CoaddConfig = CoaddConfig()
    """How the selected warps are combined (statistic, CompareWarp-style artifact rejection ...)."""


@register_task("make_template")
class MakeTemplateTask(Task):
    """Best-seeing coadd of a patch and band, stored as ``template``."""

    dimensions = _PATCH + ("band",)
    inputs = {"warps": Input("warp", ("instrument", "visit") + _PATCH, multiple=True, tolerate_missing=True)}
    outputs = {"template": Output("template", _PATCH + ("band",))}
    Config = MakeTemplateConfig
    config: MakeTemplateConfig
    parallel = True

    def quanta(self, repo, inputs, where):
        """One quantum per patch and band: warps grouped by their visit's band."""
        records = visit_bands(repo)
        groups: dict = {}
        for ds in inputs.get("warps", []):
            band = _band_of(ds.data_id, records)
            if band is None:
                continue
            qid = {**{d: ds.data_id[d] for d in _PATCH}, "band": band}
            if where is not None and not where(qid):
                continue
            key = tuple(qid[d] for d in _PATCH + ("band",))
            groups.setdefault(key, (qid, []))[1].append(ds)
        return [
            QuantumSpec(data_id=qid, inputs={"warps": sorted(lst, key=lambda d: d.key)})
            for _, (qid, lst) in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
        ]

    def run(self, warps):
        """Coadd the best-seeing warps; returns ``{"template": Exposure}`` (lazy planes)."""
        from procsky.coadd import build_coadd
        from procsky.wcs import shift_wcs, wcs_from_cards

        warps = [w for w in warps if w is not None]
        if not warps:
            raise NoWorkError("no warps for this patch and band")
        fwhm = []
        for w in warps:
            try:
                # Warp PSFs live in tract pixels; rank at the centre of the input's
                # footprint (which may cover only part of the patch), else the warp's centre.
                poly = (w.metadata or {}).get("footprint")
                if poly:
                    cx, cy = np.asarray(poly, float).mean(axis=0)
                else:
                    cx = w.xy0[0] + (w.shape[1] - 1) / 2.0
                    cy = w.xy0[1] + (w.shape[0] - 1) / 2.0
                fwhm.append(float(w.psf.fwhm(cx, cy)) if w.psf is not None else np.nan)
            except Exception:  # noqa: BLE001 - an unusable PSF ranks last
                fwhm.append(np.nan)
        chosen = select_best_seeing(
            fwhm, self.config.best_seeing_fraction, self.config.min_count, self.config.max_count
        )
        sel = [warps[i] for i in chosen]
        # Output grid: the union of the selected warps' boxes (tract pixels).
        x0 = min(w.xy0[0] for w in sel)
        y0 = min(w.xy0[1] for w in sel)
        x1 = max(w.xy0[0] + w.shape[1] for w in sel)
        y1 = max(w.xy0[1] + w.shape[0] for w in sel)
        ref = sel[0]
        _, cards = shift_wcs(wcs_from_cards(ref.wcs_cards), x0 - ref.xy0[0], y0 - ref.xy0[1], ref.wcs_cards)
        lazy = build_coadd(
            sel,
            out_cards=cards,
            out_shape=(y1 - y0, x1 - x0),
            xy0=(x0, y0),
            config=self.config.coadd,
            inputs_are_warps=True,
        )
        band = None
        if ref.visit_info is not None:
            band = ref.visit_info.band or None
        tpl = lazy.to_exposure(band=band)
        tpl.metadata["template_fwhm"] = [fwhm[i] for i in chosen]
        tpl.metadata["template_visits"] = [w.visit_info.visit if w.visit_info else None for w in sel]
        tpl.metadata["template_fraction"] = self.config.best_seeing_fraction
        return {"template": tpl}


# ------------------------------------------------------------------------ subtraction
class SubtractConfig(TaskConfig):
    """Configuration of :class:`SubtractTask`."""

    subtraction: SubtractionConfig = SubtractionConfig()
    """PSF matching and subtraction (:class:`procsky.diffim.SubtractionConfig`)."""
    detection_threshold: float = pydantic.Field(5.0, gt=0)
    """Threshold of the DIA detections flagged in the difference's mask (DETECTED,
    DETECTED_NEGATIVE), sigma; ``detect_dia`` measures the sources at its own threshold."""
    warp_order: int = 3
    """Lanczos order of the template warp."""
    template_search_radius: float = 2.0
    """Templates whose patch centre is farther than this from the visit boresight are not
    read (degrees; used only when the registry knows the boresight and the sky map)."""


@register_task("subtract")
class SubtractTask(Task):
    """Template warp, Alard-Lupton subtraction and DIA detection mask per detector (lazy)."""

    dimensions = _VD
    inputs = {
        "calexp": Input("calexp", _VD),
        "templates": Input("template", _PATCH + ("band",), multiple=True),
    }
    outputs = {"diff": Output("diff", _VD)}
    Config = SubtractConfig
    config: SubtractConfig
    # One detector's subtraction is a few CPU-seconds of numpy/numba work: it runs in the
    # worker thread that holds the quantum (parallelism comes from the many detectors of a
    # stage). As a ``parallel`` task every quantum would secede from its worker and queue
    # its small graphs behind every other quantum's, its wall time becoming the stage's.
    parallel = False

    def quanta(self, repo, inputs, where):
        """Per calexp; templates of the visit's band (near its boresight when known)."""
        records = visit_bands(repo)
        templates = list(inputs.get("templates", []))
        centers = _patch_centers(repo, templates)
        out = []
        for ds in sorted(inputs.get("calexp", []), key=lambda d: d.key):
            did = {d: ds.data_id[d] for d in _VD if d in ds.data_id}
            if len(did) != len(_VD) or (where is not None and not where(did)):
                continue
            spec = QuantumSpec(data_id=did, inputs={"calexp": [ds]})
            band = _band_of(ds.data_id, records)
            cand = [t for t in templates if band is None or t.data_id.get("band") == band]
            rec = records.get((did.get("instrument"), did.get("visit"))) or {}
            ra, dec = rec.get("boresight_ra"), rec.get("boresight_dec")
            if ra is not None and dec is not None and centers:
                r = self.config.template_search_radius
                cand = [t for t in cand if t.key not in centers or _sep(ra, dec, *centers[t.key]) <= r]
            if not cand:
                continue
            spec.inputs["templates"] = sorted(cand, key=lambda d: d.key)
            if band is not None:
                spec.data_id.setdefault("band", band)
            out.append(spec)
        return out

    def run(self, calexp, templates, data_ids=None):
        """Returns ``{"diff": Exposure}``: a lazy difference image, computed when written."""
        if calexp is None:
            raise NoWorkError("no calexp")
        diff = difference_image(
            calexp,
            templates,
            self.config.subtraction,
            detection=DiaConfig(nsigma=self.config.detection_threshold),
            warp_order=self.config.warp_order,
        )
        return {"diff": diff}


def _sep(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _patch_centers(repo, templates) -> dict:
    """``{dataset key: (ra, dec)}`` of template patch centres (empty when unknown)."""
    if repo is None or not templates:
        return {}
    try:
        from procsky.skymap import load_skymap
    except ImportError:
        return {}
    out = {}
    maps = {}
    for t in templates:
        name = t.data_id.get("skymap")
        try:
            if name not in maps:
                maps[name] = load_skymap(repo, name)
            p = maps[name].patch(t.data_id["tract"], t.data_id["patch"])
            ny, nx = p.shape
            ra, dec = p.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
            out[t.key] = (float(ra), float(dec))
        except Exception:  # noqa: BLE001 - unknown sky map: keep every template
            return {}
    return out
