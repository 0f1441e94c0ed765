"""Warp task: resample the calexps of one visit onto one patch.

Quantum ``{instrument, visit, skymap, tract, patch}`` (LSST ``MakeWarpTask``): the
calexps of the visit that overlap the patch are each resampled (Lanczos3, flux scaled to
nJy per patch pixel) and combined into one ``warp`` covering the chunk-aligned box they
touch; where detectors overlap, the inverse-variance weighted mean is taken. The mapping
visit/detector -> tract/patch is made by :meth:`WarpTask.quanta` from each calexp's WCS
footprint and the sky map. When the visit has a ``visit_photocalib`` (the
``visit_photometry`` stage: one zero point per visit from all its detectors), each calexp
is scaled to nJy with it instead of its own per-detector PhotoCalib.

The sky map is an input dataset (``skymap``, dimensions ``{skymap}``, a dict written by
``procsky skymap register``), so that ``run`` needs no repository.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from procsky.coadd import warp_visit
from procsky.errors import ProcskyValueError
from procsky.photometry import apply_visit_photocalib
from procsky.tasks.base import (
    DatasetKey,
    Input,
    Output,
    QuantumSpec,
    Task,
    TaskConfig,
    register_task,
)
from procsky.warp import WarpConfig

__all__ = [
    "WarpTask",
    "WarpTaskConfig",
    "load_task_skymap",
    "overlapping_patches",
    "skymap_input",
    "visit_photocalib_index",
    "calexp_patch_groups",
]

log = logging.getLogger(__name__)

_VD = ("instrument", "visit", "detector")
WARP_DIMS = ("instrument", "visit", "skymap", "tract", "patch", "band")


class WarpTaskConfig(TaskConfig):
    """Configuration of :class:`WarpTask`."""

    skymap: str = "default"
    """Name of the registered sky map."""
    warp: WarpConfig = WarpConfig()
    """How the calexps are resampled (Lanczos order, WCS grid step, chunk side: coadds read
    whole chunks); :class:`procsky.warp.WarpConfig`. Override e.g. ``warp.warp.order=4``."""


def skymap_input(repo, name: str) -> DatasetKey:
    """The ``skymap`` dataset of a registered sky map, as a quantum input."""
    from procsky.errors import ProcskyKeyError

    refs = repo.query("skymap", {"skymap": name}) if "skymap" in {d.name for d in repo.dataset_types()} else []
    if not refs:
        raise ProcskyKeyError(
            f"no 'skymap' dataset named {name!r} in {repo.root}; register the sky map first with "
            f"`procsky skymap register {repo.root} {name} ...`"
        )
    ref = refs[0]
    return DatasetKey("skymap", dict(ref.data_id), run=ref.run, id=ref.id)


def load_task_skymap(repo, name: str, task: str):
    """``(dataset key, SkyMap)`` of the registered sky map ``name``, for a task's ``quanta``."""
    from procsky.skymap import SkyMap

    if repo is None:
        raise ProcskyValueError(f"the {task} task needs the repository to map visits to patches")
    key = skymap_input(repo, name)
    return key, SkyMap.from_record(repo.get(key.dataset_type, key.data_id, run=key.run))


def overlapping_patches(repo, skymap, calexp_keys) -> dict:
    """(instrument, visit, tract, patch) -> calexp DatasetKeys overlapping that patch.

    Footprints come from each calexp's stored WCS (read lazily from the repository; for
    predicted calexps, from the isr_exposure or raw of the same data ID).
    """
    from procsky.skymap import footprint_points

    groups: dict = defaultdict(list)
    for key in calexp_keys:
        exp = _header_of(repo, key)
        if exp is None or exp.wcs is None:
            log.warning("no WCS for %s %s; it is left out of the warps", key.dataset_type, key.data_id)
            continue
        ra, dec = footprint_points(exp.wcs, exp.shape)
        for tract, patches in skymap.tracts_patches_for_sky(ra, dec).items():
            for patch in patches:
                groups[(key.data_id["instrument"], key.data_id["visit"], tract, patch)].append(key)
    return groups


def _header_of(repo, key: DatasetKey):
    # A predicted calexp (the graph is built before calibrate runs) has no file yet: its
    # footprint comes from the exposure calibrate will read, whose header WCS is close
    # enough to pick patches (patches carry a 100 px border).
    for dataset_type in (key.dataset_type, "isr_exposure", "raw"):
        try:
            ref = repo.find(dataset_type, key.data_id, run=key.run if dataset_type == key.dataset_type else None)
        except Exception:
            ref = None
        if ref is not None:
            return repo.get(ref)
    return None


def visit_photocalib_index(keys) -> dict:
    """(instrument, visit) -> [DatasetKey] of the candidate ``visit_photocalib`` datasets."""
    out: dict = {}
    for k in keys or []:
        out.setdefault((k.data_id.get("instrument"), k.data_id.get("visit")), []).append(k)
    return {key: sorted(v, key=lambda k: k.key)[:1] for key, v in out.items()}


def calexp_patch_groups(repo, skymap_name: str, task: str, inputs) -> tuple:
    """What the ``quanta`` of tasks gathering calexps per patch share.

    Returns ``(skymap key, SkyMap, visit_photocalib index, groups)`` with ``groups`` a
    list of ``((instrument, visit, tract, patch, band), calexp keys sorted by key)`` in a
    stable order. The band comes from the keys when they carry one, else from the visit
    records (read once).
    """
    sm_key, skymap = load_task_skymap(repo, skymap_name, task)
    groups = overlapping_patches(repo, skymap, inputs.get("calexps", []))
    photocalibs = visit_photocalib_index(inputs.get("visit_photocalib", []))
    records = None
    out = []
    for (instrument, visit, tract, patch), keys in sorted(groups.items(), key=lambda kv: str(kv[0])):
        bands = {k.data_id.get("band") for k in keys} - {None}
        if len(bands) == 1:
            band = bands.pop()
        else:
            if records is None:
                records = {(r.get("instrument"), r.get("visit")): r for r in repo.dimension_records("visit")}
            band = (records.get((instrument, visit)) or {}).get("band") or ""
        out.append(((instrument, visit, tract, patch, band), sorted(keys, key=lambda k: k.key)))
    return sm_key, skymap, photocalibs, out


@register_task("warp")
class WarpTask(Task):
    """Resample a visit's calexps onto a patch (see the module docstring)."""

    dimensions = ("instrument", "visit", "skymap", "tract", "patch")
    inputs = {
        "calexps": Input("calexp", _VD, multiple=True, tolerate_missing=True),
        "skymap": Input("skymap", ("skymap",)),
        "visit_photocalib": Input("visit_photocalib", ("instrument", "visit"), optional=True),
    }
    outputs = {"warp": Output("warp", WARP_DIMS)}
    Config = WarpTaskConfig
    config: WarpTaskConfig
    parallel = True

    def quanta(self, repo, inputs, where):
        sm_key, skymap, photocalibs, groups = calexp_patch_groups(repo, self.config.skymap, "warp", inputs)
        specs = []
        for (instrument, visit, tract, patch, band), keys in groups:
            data_id = {
                "instrument": instrument,
                "visit": visit,
                "skymap": skymap.name,
                "tract": tract,
                "patch": patch,
                "band": band,
            }
            if where is not None and not where(data_id):
                continue
            specs.append(
                QuantumSpec(
                    data_id,
                    {"calexps": keys, "skymap": [sm_key], "visit_photocalib": photocalibs.get((instrument, visit), [])},
                )
            )
        return specs

    def run(self, calexps, skymap, visit_photocalib=None, data_id=None, data_ids=None):
        """Warp the calexps onto the quantum's patch.

        Parameters
        ----------
        calexps : list of Exposure
        skymap : dict
            The ``skymap`` dataset (dimension record of the sky map).
        visit_photocalib : dict, optional
            The visit's ``visit_photocalib`` (:mod:`procsky.tasks.photometry`): when given,
            each calexp is scaled to nJy with its detector's visit-level PhotoCalib instead of
            the calexp's own (per-detector) one.
        data_id : dict
            Quantum data ID (``tract``, ``patch`` ...).

        Returns
        -------
        dict
            ``{"warp": Exposure}`` (lazy planes, nJy per pixel).
        """
        from procsky.skymap import SkyMap

        if data_id is None or "tract" not in data_id or "patch" not in data_id:
            raise ProcskyValueError(
                "WarpTask.run needs the quantum data ID (tract, patch) as data_id=...; the executor "
                "passes it to run() methods that accept a 'data_id' argument"
            )
        sm = SkyMap.from_record(skymap)
        patch = sm.patch(data_id["tract"], data_id["patch"])
        calexps = apply_visit_photocalib(calexps, visit_photocalib, (data_ids or {}).get("calexps"))
        return {"warp": warp_visit(calexps, patch, self.config.warp, skymap_name=sm.name)}
