"""Coadd tasks: combine the warps (or calexps, warped on the fly) of a patch and band.

``assemble_coadd`` (quantum ``{skymap, tract, patch, band}``) gathers every ``warp`` of
the patch and band and returns the coadd as a lazy :class:`~procsky.exposure.Exposure`
built by :func:`procsky.coadd.build_coadd` (with its ``n_inputs`` plane); the executor
writes it in batches of whole chunks (:meth:`procsky.exposure.Exposure.write`).
``assemble_coadd_direct`` does the same from the calexps, warping on the fly (no warp
intermediates; a configuration choice, see ``benchmarks/bench_coadd.py``); it uses the
``visit_photocalib`` of each visit when present (as ``warp`` does).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import pydantic

from procsky.coadd import CoaddConfig
from procsky.errors import NoWorkError, ProcskyValueError
from procsky.photometry import apply_visit_photocalib
from procsky.tasks.base import (
    Input,
    Output,
    QuantumSpec,
    Task,
    TaskConfig,
    register_task,
)
from procsky.tasks.warp import WARP_DIMS, calexp_patch_groups

__all__ = ["AssembleCoaddConfig", "AssembleCoaddDirectTask", "AssembleCoaddTask"]

_PATCH_BAND = ("skymap", "tract", "patch", "band")


# The tasks' working memory per chunk task is 256 MiB, not the library's 64 MiB default:
# a pipeline worker runs one chunk task per thread and has room for more visits in memory.
_TASK_COADD = CoaddConfig(memory_budget=256 * 2**20)


class AssembleCoaddConfig(TaskConfig):
    """Configuration of the coadd tasks.

    ``coadd`` is the library configuration (:class:`procsky.coadd.CoaddConfig`, with its
    ``warp`` for calexps warped on the fly, whose ``chunk`` is the output chunk side). Its
    default equals the library's except ``memory_budget``: 256 MiB per chunk task, the
    value the tasks have always used (the library default is 64 MiB). Override e.g.
    ``assemble_coadd.coadd.statistic=median``.
    """

    skymap: str = "default"
    """Registered sky map (``assemble_coadd_direct``)."""
    coadd: CoaddConfig = _TASK_COADD
    """How the inputs are combined."""

    @pydantic.field_validator("coadd", mode="before")
    @classmethod
    def _over_task_default(cls, value):
        # A partial mapping (a pipeline override) updates the task's default, not the library's.
        if isinstance(value, Mapping):
            return _merged(_TASK_COADD.model_dump(), value)
        return value


def _merged(base: dict, update: Mapping) -> dict:
    """``base`` updated with ``update``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _patch_geometry(warps):
    meta = warps[0].metadata
    if "patch_box" not in meta or "patch_wcs" not in meta:
        raise ProcskyValueError(
            "the warps carry no patch geometry (metadata 'patch_box', 'patch_wcs'); make them with the warp task"
        )
    x0, y0, x1, y1 = meta["patch_box"]
    cards = [tuple(c) for c in meta["patch_wcs"]]
    return cards, (y1 - y0, x1 - x0), (x0, y0)


@register_task("assemble_coadd")
class AssembleCoaddTask(Task):
    """Coadd the warps of one patch and band."""

    dimensions = _PATCH_BAND
    inputs = {"warps": Input("warp", WARP_DIMS, multiple=True, tolerate_missing=True)}
    outputs = {"coadd": Output("coadd", _PATCH_BAND)}
    Config = AssembleCoaddConfig
    config: AssembleCoaddConfig
    parallel = True

    def run(self, warps, data_ids=None):
        """Build the coadd of ``warps`` (lazy planes; weights and PSF computed).

        Parameters
        ----------
        warps : list of Exposure
            Warps of one patch and band (from the warp task).

        Returns
        -------
        dict
            ``{"coadd": Exposure}``.
        """
        from procsky.coadd import build_coadd

        warps = [w for w in warps if w is not None]
        if not warps:
            raise NoWorkError("no warps for this patch and band")
        cards, shape, xy0 = _patch_geometry(warps)
        lazy = build_coadd(
            warps,
            out_cards=cards,
            out_shape=shape,
            xy0=xy0,
            config=self.config.coadd,
            inputs_are_warps=True,
            chunk=self.config.coadd.warp.chunk,
        )
        band = None
        if data_ids and data_ids.get("warps"):
            band = data_ids["warps"][0].get("band")
        exp = lazy.to_exposure(band=band or (warps[0].visit_info.band if warps[0].visit_info else None))
        exp.metadata.update({k: warps[0].metadata.get(k) for k in ("skymap", "tract", "patch")})
        return {"coadd": exp}


@register_task("assemble_coadd_direct")
class AssembleCoaddDirectTask(Task):
    """Coadd the calexps overlapping one patch and band, warping them on the fly."""

    dimensions = _PATCH_BAND
    inputs = {
        "calexps": Input("calexp", ("instrument", "visit", "detector"), multiple=True, tolerate_missing=True),
        "skymap": Input("skymap", ("skymap",)),
        "visit_photocalib": Input(
            "visit_photocalib", ("instrument", "visit"), multiple=True, optional=True, tolerate_missing=True
        ),
    }
    outputs = {"coadd": Output("coadd", _PATCH_BAND)}
    Config = AssembleCoaddConfig
    config: AssembleCoaddConfig
    parallel = True

    def quanta(self, repo, inputs, where):
        sm_key, skymap, photocalibs, groups = calexp_patch_groups(
            repo, self.config.skymap, "assemble_coadd_direct", inputs
        )
        by_patch: dict = defaultdict(list)
        for (_instrument, _visit, tract, patch, band), keys in groups:
            by_patch[(tract, patch, band)].extend(keys)
        specs = []
        for (tract, patch, band), keys in sorted(by_patch.items()):
            data_id = {"skymap": skymap.name, "tract": tract, "patch": patch, "band": band}
            if where is not None and not where(data_id):
                continue
            uniq = {k.key: k for k in keys}
            visits = sorted({(k.data_id.get("instrument"), k.data_id.get("visit")) for k in keys}, key=str)
            pcs = {p.key: p for v in visits for p in photocalibs.get(v, [])}
            specs.append(
                QuantumSpec(
                    data_id,
                    {
                        "calexps": [uniq[k] for k in sorted(uniq)],
                        "skymap": [sm_key],
                        "visit_photocalib": [pcs[k] for k in sorted(pcs)],
                    },
                )
            )
        return specs

    def run(self, calexps, skymap, visit_photocalib=None, data_id=None, data_ids=None):
        """Coadd the calexps (each scaled with its visit-level PhotoCalib when ``visit_photocalib``
        records are given, else with its own)."""
        from procsky.coadd import build_coadd
        from procsky.skymap import SkyMap

        if data_id is None or "tract" not in data_id:
            raise ProcskyValueError(
                "AssembleCoaddDirectTask.run needs the quantum data ID as data_id=...; the executor passes it "
                "to run() methods that accept a 'data_id' argument"
            )
        patch = SkyMap.from_record(skymap).patch(data_id["tract"], data_id["patch"])
        calexps = apply_visit_photocalib(calexps, visit_photocalib, (data_ids or {}).get("calexps"))
        lazy = build_coadd(
            calexps, patch, config=self.config.coadd, inputs_are_warps=False, chunk=self.config.coadd.warp.chunk
        )
        exp = lazy.to_exposure(band=data_id.get("band"))
        exp.metadata.update({"skymap": data_id.get("skymap"), "tract": patch.tract.id, "patch": patch.id})
        return {"coadd": exp}
