"""Instrument-signature removal: ``isr`` and the master-calibration builders.

Tasks
-----
``isr`` (:class:`IsrTask`, quantum {instrument, visit, detector})
    ``raw`` + optional ``bias``, ``dark`` (per detector) and ``flat`` (per detector and
    physical filter, or band) -> ``isr_exposure``: overscan-, bias-, dark- and
    flat-corrected image in electrons (or ADU, ``isr.units="adu"``), with the variance plane
    and the SAT / BAD / NO_DATA masks. ``calibrate`` takes ``isr_exposure`` as input.
``make_master_bias`` (:class:`MakeMasterBiasTask`, quantum {instrument, detector})
    every ``bias_frame`` of a detector -> ``bias`` (overscan-subtracted, clipped mean).
``make_master_dark`` (:class:`MakeMasterDarkTask`, quantum {instrument, detector})
    every ``dark_frame`` of a detector (+ optional ``bias``) -> ``dark``: clipped mean of
    the bias-subtracted frames divided by their exposure times (ADU/s), hot pixels and
    bad columns flagged BAD; ``isr`` carries that mask into every exposure.
``make_master_flat`` (:class:`MakeMasterFlatTask`, quantum {instrument, detector,
physical_filter})
    every ``flat_frame`` of a detector and filter (+ optional ``bias``, ``dark``) ->
    ``flat`` normalised to median 1.

The ``calibs`` pipeline (``procsky/pipelines/calibs.yaml``) runs the three builders on the
ingested ``bias_frame`` / ``dark_frame`` / ``flat_frame`` datasets. The work is done by
:mod:`procsky.isr` (layout, units and conventions are described there); each task config
holds that module's settings as a nested field (``isr.isr.units=adu``,
``make_master_dark.master.defect_nsigma=4``).
"""

from __future__ import annotations

from procsky.isr import (
    IsrConfig,
    MasterConfig,
    MasterDarkConfig,
    make_master_bias,
    make_master_dark,
    make_master_flat,
    run_isr,
)
from procsky.tasks.base import (
    DatasetKey,
    Input,
    Output,
    QuantumSpec,
    Task,
    TaskConfig,
    complete_data_id,
    register_task,
)

__all__ = [
    "IsrTaskConfig",
    "IsrTask",
    "MasterTaskConfig",
    "MasterDarkTaskConfig",
    "MakeMasterBiasTask",
    "MakeMasterFlatTask",
    "MakeMasterDarkTask",
]

_VD = ("instrument", "visit", "detector")


class IsrTaskConfig(TaskConfig):
    """Configuration of :class:`IsrTask`."""

    isr: IsrConfig = IsrConfig()
    """Settings of :func:`procsky.isr.run_isr`."""


def _match_calibs(quantum_id: dict, candidates: list[DatasetKey], keys: tuple[str, ...]) -> list[DatasetKey]:
    """Calibration datasets agreeing with the quantum on ``keys`` (only those both define)."""
    out = []
    for ds in candidates:
        if all(ds.data_id.get(k) == quantum_id[k] for k in keys if k in quantum_id and k in ds.data_id):
            out.append(ds)
    return out


@register_task("isr")
class IsrTask(Task):
    """Instrument-signature removal of one raw detector frame (see the module docstring)."""

    dimensions = _VD
    inputs = {
        "raw": Input("raw", _VD),
        "bias": Input("bias", ("instrument", "detector"), optional=True),
        "dark": Input("dark", ("instrument", "detector"), optional=True),
        "flat": Input("flat", ("instrument", "detector"), optional=True),
    }
    outputs = {"isr_exposure": Output("isr_exposure", _VD)}
    Config = IsrTaskConfig
    config: IsrTaskConfig

    def quanta(self, repo, inputs, where):
        """One quantum per raw; calibrations matched on instrument, detector and filter."""
        specs = []
        for raw in sorted(inputs.get("raw", []), key=lambda d: d.key):
            qid = {k: raw.data_id[k] for k in self.dimensions}
            full = dict(raw.data_id)
            chosen = {"raw": [raw]}
            for name in ("bias", "dark", "flat"):
                keys = ("instrument", "detector") + (("physical_filter", "band") if name == "flat" else ())
                got = _match_calibs(full, inputs.get(name, []), keys)
                if name == "flat":
                    # a flat must agree on the filter: drop flats that say nothing about it
                    got = [d for d in got if "physical_filter" in d.data_id or "band" in d.data_id] or got
                chosen[name] = sorted(got, key=lambda d: d.key)[:1]
            data_id = complete_data_id(self, qid, [raw])
            specs.append(QuantumSpec(data_id=data_id, inputs=chosen))
        return specs

    def run(self, raw, bias=None, dark=None, flat=None):
        """Run ISR; returns ``{"isr_exposure": Exposure}``."""
        return {"isr_exposure": run_isr(raw, bias, dark, flat, self.config.isr)}


# ------------------------------------------------------------------------- master frames
class MasterTaskConfig(TaskConfig):
    """Configuration of :class:`MakeMasterBiasTask` and :class:`MakeMasterFlatTask`."""

    master: MasterConfig = MasterConfig()
    """Settings of :func:`procsky.isr.make_master_bias` / :func:`~procsky.isr.make_master_flat`."""


class MasterDarkTaskConfig(TaskConfig):
    """Configuration of :class:`MakeMasterDarkTask`."""

    master: MasterDarkConfig = MasterDarkConfig()
    """Settings of :func:`procsky.isr.make_master_dark`."""


@register_task("make_master_bias")
class MakeMasterBiasTask(Task):
    """Master bias of a detector: overscan-subtracted ``bias_frame`` s, clipped mean (ADU)."""

    dimensions = ("instrument", "detector")
    inputs = {"frames": Input("bias_frame", _VD, multiple=True)}
    outputs = {"bias": Output("bias", ("instrument", "detector"))}
    Config = MasterTaskConfig
    config: MasterTaskConfig

    def run(self, frames):
        """Combine; returns ``{"bias": Exposure}``."""
        return {"bias": make_master_bias(frames, self.config.master)}


@register_task("make_master_dark")
class MakeMasterDarkTask(Task):
    """Master dark of a detector: bias-subtracted ``dark_frame`` s per second, clipped mean
    (ADU/s), with hot pixels and bad columns flagged BAD."""

    dimensions = ("instrument", "detector")
    inputs = {
        "frames": Input("dark_frame", _VD, multiple=True),
        "bias": Input("bias", ("instrument", "detector"), optional=True),
    }
    outputs = {"dark": Output("dark", ("instrument", "detector"))}
    Config = MasterDarkTaskConfig
    config: MasterDarkTaskConfig

    def run(self, frames, bias=None):
        """Combine; returns ``{"dark": Exposure}`` (a rate: ISR scales it by the exposure time)."""
        return {"dark": make_master_dark(frames, bias, self.config.master)}


@register_task("make_master_flat")
class MakeMasterFlatTask(Task):
    """Master flat of a detector and filter: bias/dark-corrected frames normalised by their
    median, clipped mean, normalised to median 1; pixels below 0.2 are BAD."""

    dimensions = ("instrument", "detector", "physical_filter")
    inputs = {
        "frames": Input("flat_frame", _VD + ("physical_filter",), multiple=True),
        "bias": Input("bias", ("instrument", "detector"), optional=True),
        "dark": Input("dark", ("instrument", "detector"), optional=True),
    }
    outputs = {"flat": Output("flat", ("instrument", "detector", "physical_filter"))}
    Config = MasterTaskConfig
    config: MasterTaskConfig

    def run(self, frames, bias=None, dark=None):
        """Combine; returns ``{"flat": Exposure}``."""
        return {"flat": make_master_flat(frames, bias, dark, self.config.master)}
