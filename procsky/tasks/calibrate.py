"""Single-frame calibration task: ``calibrate`` turns an ``isr_exposure`` (the ISR output, or an
ingested instrument-calibrated frame) into ``calexp``, ``src`` and ``calibrate_summary``.

The work is done by :func:`procsky.calibrate.calibrate_exposure` (background, cosmic rays,
detection, measurement, PSF, astrometry, photometry, catalogue: one module per step in
:mod:`procsky.calibrate`). The task attaches the reference catalogue shards near the visit to
each quantum and calls it; its configuration is the library's :class:`CalibrationConfig` (one
nested model per step: ``-c calibrate.psf.order=1``) plus ``refcat_visit_radius_deg``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from procsky.calibrate import SRC_UNITS, CalibrationConfig, calibrate_exposure, fit_detector_psf
from procsky.calibrate.state import StepProfile
from procsky.tasks.base import Input, Output, Task, TaskConfig, default_quanta, register_task

__all__ = ["CalibrateConfig", "CalibrateTask", "calibrate_exposure", "fit_detector_psf", "SRC_UNITS"]

_VD = ("instrument", "visit", "detector")


class CalibrateConfig(TaskConfig, CalibrationConfig):
    """Configuration of :class:`CalibrateTask`: the library's :class:`~procsky.calibrate.CalibrationConfig`
    (``background``, ``cosmic_rays``, ``detection``, ``measurement``, ``psf``, ``astrometry``,
    ``photometry``, ``min_usable_pixels``, ``refcat_name``) plus the task's own fields."""

    refcat_visit_radius_deg: float = 1.5
    """Radius around the visit boresight within which shards are attached to a quantum, deg."""


@register_task("calibrate")
class CalibrateTask(Task):
    """Calibrate one detector from the ISR output (``isr_exposure``).

    The reference catalogue shards (``refcat`` datasets) within ``refcat_visit_radius_deg``
    of the visit boresight are attached to each quantum by :meth:`quanta`, so :meth:`run`
    does no I/O.
    """

    dimensions = _VD
    inputs = {
        "exposure": Input("isr_exposure", _VD),
        "refcat": Input("refcat", (), multiple=True, optional=True),
    }
    outputs = {
        "calexp": Output("calexp", _VD),
        "src": Output("src", _VD),
        "summary": Output("calibrate_summary", _VD),
    }
    Config = CalibrateConfig
    config: CalibrateConfig

    def quanta(self, repo: Any, inputs: Mapping[str, list], where: Any) -> list:
        """Default join on the exposure, then only the refcat shards near the visit."""
        from procsky.refcat import shards_in_cone

        shards = list(inputs.get("refcat", []))
        names = sorted({d.data_id.get("refcat") for d in shards})
        name = self.config.refcat_name
        if name is None and len(names) > 1:
            from procsky.errors import ProcskyValueError

            raise ProcskyValueError(
                f"several reference catalogues are available ({', '.join(map(str, names))}); choose one with "
                f"-c {self.task_name or 'calibrate'}.refcat_name=NAME"
            )
        name = name or (names[0] if names else None)
        specs = default_quanta(self, {**inputs, "refcat": []})
        boresights: dict = {}
        for spec in specs:
            if not shards:
                spec.inputs["refcat"] = []
                continue
            key = (spec.data_id.get("instrument"), spec.data_id.get("visit"))
            if key not in boresights:
                boresights[key] = _boresight(repo, *key)
            bs = boresights[key]
            cand = [d for d in shards if d.data_id.get("refcat") == name]
            if bs is not None:
                keep = shards_in_cone(
                    [d.data_id for d in cand], bs[0], bs[1], self.config.refcat_visit_radius_deg, name
                )
                cand = [cand[i] for i in keep]
            spec.inputs["refcat"] = sorted(cand, key=lambda d: d.key)
        return specs

    def run(self, exposure: Any, refcat: Any = None) -> dict[str, Any]:
        """Calibrate; returns ``{"calexp", "src", "summary"}``.

        The summary carries ``step_profile``: each step's CPU (of this thread: a worker may run
        other quanta beside) and wall seconds (:meth:`StepProfile.records`), for the run's report."""
        profile = StepProfile(memory=False, cpu_clock=time.thread_time)
        calexp, src, summary = calibrate_exposure(exposure, refcat or None, self.config, profile=profile)
        summary = {**summary, "step_profile": profile.records()}
        return {"calexp": calexp, "src": src, "summary": summary}


def _boresight(repo: Any, instrument: Any, visit: Any) -> tuple[float, float] | None:
    """(ra, dec) of a visit from the registry's visit record, or None."""
    if repo is None or visit is None:
        return None
    try:
        recs = repo.dimension_records("visit", f"instrument='{instrument}' AND visit={int(visit)}")
    except Exception:  # no visit records (hand-made repository): attach every shard
        return None
    for r in recs:
        ra, dec = r.get("boresight_ra"), r.get("boresight_dec")
        if ra is not None and dec is not None and np.isfinite(ra) and np.isfinite(dec):
            return float(ra), float(dec)
    return None
