"""Object catalogue tasks: ``make_objects`` and ``forced_phot``.

* ``make_objects`` (quantum ``{skymap, tract, patch}``): the coadds of every band of the
  patch -> ``object`` (Parquet, one row per object, band-prefixed columns in nJy,
  ``is_primary``) and ``object_summary`` (JSON: counts, noise scales, sky-object pulls,
  deblender flags, CPU per step), through :func:`procsky.objects.driver.make_objects`.
* ``forced_phot`` (quantum ``{skymap, tract, patch}``): PSF photometry at the patch's
  primary objects on every calexp overlapping the patch and on its difference image
  -> ``forced_source`` (one row per object, visit and detector: light curves from the data
  release), through :func:`procsky.objects.forced.forced_photometry`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from procsky.errors import NoWorkError, ProcskyValueError
from procsky.objects.driver import ObjectsConfig
from procsky.photometry import apply_visit_photocalib
from procsky.tasks.base import Input, Output, QuantumSpec, Task, TaskConfig, register_task
from procsky.tasks.warp import calexp_patch_groups

__all__ = ["ForcedPhotTask", "MakeObjectsTask"]

_PATCH = ("skymap", "tract", "patch")
_PATCH_BAND = _PATCH + ("band",)
_VD = ("instrument", "visit", "detector")


class MakeObjectsConfig(TaskConfig):
    """Configuration of :class:`MakeObjectsTask`."""

    objects: ObjectsConfig = ObjectsConfig()
    """Detection, deblending, measurement (:class:`procsky.objects.driver.ObjectsConfig`)."""


def _skymap_geometry(skymap_record, data_id):
    from procsky.skymap import SkyMap

    sm = SkyMap.from_record(skymap_record)
    tract = int(data_id["tract"])
    p = sm.patch(tract, int(data_id["patch"]))
    inner = (p.inner.x0, p.inner.y0, p.inner.x1, p.inner.y1)

    def owner(ra, dec):
        return np.array([sm.find_tract(float(r), float(d)) == tract for r, d in zip(ra, dec)], dtype=bool)

    return inner, owner


@register_task("make_objects")
class MakeObjectsTask(Task):
    """Detect, deblend and measure the objects of a patch on its coadds of every band."""

    dimensions = _PATCH
    inputs = {
        "coadds": Input("coadd", _PATCH_BAND, multiple=True, tolerate_missing=True),
        "skymap": Input("skymap", ("skymap",)),
    }
    outputs = {
        "object": Output("object", _PATCH),
        "summary": Output("object_summary", _PATCH),
    }
    Config = MakeObjectsConfig
    config: MakeObjectsConfig

    def run(self, coadds, skymap, data_id=None, data_ids=None):
        """Returns ``{"object": DataFrame, "summary": dict}``."""
        from procsky.objects.driver import make_objects

        if data_id is None or "tract" not in data_id:
            raise ProcskyValueError("MakeObjectsTask.run needs the quantum data ID as data_id=...")
        ids = (data_ids or {}).get("coadds") or [None] * len(coadds)
        by_band = {}
        for exp, did in zip(coadds, ids):
            if exp is None:
                continue
            band = (did or {}).get("band") or (exp.visit_info.band if exp.visit_info else None)
            if not band:
                raise ProcskyValueError("a coadd without a band: cannot build band-prefixed object columns")
            by_band[str(band)] = exp
        if not by_band:
            raise NoWorkError("no coadds for this patch")
        inner, owner = _skymap_geometry(skymap, data_id)
        cat = make_objects(
            by_band,
            self.config.objects,
            tract=int(data_id["tract"]),
            patch=int(data_id["patch"]),
            inner_box=inner,
            tract_owner=owner,
        )
        if len(cat.table) == 0:
            raise NoWorkError("no objects detected on this patch")
        summary = dict(cat.summary)
        summary.update({k: data_id[k] for k in _PATCH if k in data_id})
        return {"object": cat.table, "summary": summary}


class ForcedPhotConfig(TaskConfig):
    """Configuration of :class:`ForcedPhotTask`."""

    skymap: str = "default"
    """Registered sky map (to find the calexps overlapping each patch)."""
    primary_only: bool = True
    """Force only ``is_primary`` objects (each sky position once across patches)."""
    use_diffs: bool = True
    """Also measure the difference image of each calexp when the run has one."""


@register_task("forced_phot")
class ForcedPhotTask(Task):
    """Forced PSF photometry of a patch's objects on the calexps and differences covering it."""

    dimensions = _PATCH
    inputs = {
        "objects": Input("object", _PATCH),
        "calexps": Input("calexp", _VD, multiple=True, tolerate_missing=True),
        "diffs": Input("diff", _VD, multiple=True, optional=True, tolerate_missing=True),
        "visit_photocalib": Input(
            "visit_photocalib", ("instrument", "visit"), multiple=True, optional=True, tolerate_missing=True
        ),
        "skymap": Input("skymap", ("skymap",)),
    }
    outputs = {"forced_source": Output("forced_source", _PATCH)}
    Config = ForcedPhotConfig
    config: ForcedPhotConfig

    def quanta(self, repo, inputs, where):
        sm_key, skymap, photocalibs, groups = calexp_patch_groups(repo, self.config.skymap, "forced_phot", inputs)
        objects = {(int(k.data_id["tract"]), int(k.data_id["patch"])): k for k in inputs.get("objects", [])}
        diffs = {
            (k.data_id.get("instrument"), k.data_id.get("visit"), k.data_id.get("detector")): k
            for k in inputs.get("diffs", [])
        }
        by_patch: dict = {}
        for (_instrument, _visit, tract, patch, _band), keys in groups:
            if (tract, patch) not in objects:
                continue
            by_patch.setdefault((tract, patch), []).extend(keys)
        specs = []
        for (tract, patch), keys in sorted(by_patch.items()):
            data_id = {"skymap": skymap.name, "tract": tract, "patch": patch}
            if where is not None and not where(data_id):
                continue
            uniq = {k.key: k for k in keys}
            cal = [uniq[k] for k in sorted(uniq)]
            dfs = []
            if self.config.use_diffs:
                for k in cal:
                    d = diffs.get((k.data_id.get("instrument"), k.data_id.get("visit"), k.data_id.get("detector")))
                    if d is not None:
                        dfs.append(d)
            visits = sorted({(k.data_id.get("instrument"), k.data_id.get("visit")) for k in cal}, key=str)
            pcs = {p.key: p for v in visits for p in photocalibs.get(v, [])}
            specs.append(
                QuantumSpec(
                    data_id,
                    {
                        "objects": [objects[(tract, patch)]],
                        "calexps": cal,
                        "diffs": dfs,
                        "visit_photocalib": [pcs[k] for k in sorted(pcs)],
                        "skymap": [sm_key],
                    },
                )
            )
        return specs

    def run(self, objects, calexps, skymap, diffs=None, visit_photocalib=None, data_id=None, data_ids=None):
        """Returns ``{"forced_source": DataFrame}``."""
        from procsky.objects.forced import forced_photometry

        if objects is None or len(objects) == 0:
            raise NoWorkError("no objects to force")
        obj = objects
        if "sky_object" in obj:
            obj = obj[~obj["sky_object"].to_numpy(bool)]
        if self.config.primary_only and "is_primary" in obj:
            obj = obj[obj["is_primary"].to_numpy(bool)]
        if len(obj) == 0:
            raise NoWorkError("no primary objects on this patch")
        ids = data_ids or {}
        cal_ids = ids.get("calexps") or [None] * len(calexps)
        calexps = apply_visit_photocalib(calexps, visit_photocalib, cal_ids)
        diff_by_vd = {}
        for d, did in zip(diffs or [], ids.get("diffs") or [None] * len(diffs or [])):
            if d is not None and did:
                diff_by_vd[(did.get("instrument"), did.get("visit"), did.get("detector"))] = d
        if diff_by_vd:
            keys = list(diff_by_vd)
            dids = [dict(zip(("instrument", "visit", "detector"), k)) for k in keys]
            scaled = apply_visit_photocalib([diff_by_vd[k] for k in keys], visit_photocalib, dids)
            diff_by_vd = dict(zip(keys, scaled))
        matched = [
            diff_by_vd.get(((did or {}).get("instrument"), (did or {}).get("visit"), (did or {}).get("detector")))
            for did in cal_ids
        ]
        out = forced_photometry(obj, calexps, matched, data_ids=cal_ids)
        if len(out) == 0:
            raise NoWorkError("no object falls on any calexp of this patch")
        if data_id:
            out["tract"] = np.full(len(out), int(data_id["tract"]), dtype=np.int64)
            out["patch"] = np.full(len(out), int(data_id["patch"]), dtype=np.int64)
        units = dict(out.attrs.get("units", {}))
        out = pd.DataFrame(out)
        out.attrs["units"] = units
        return {"forced_source": out}
