"""``visit_photometry``: one photometric zero point per visit from the ``src`` of all its detectors.

The task (:class:`VisitPhotometryTask`, quantum {instrument, visit}) reads the ``src``
catalogues (and ``calibrate_summary`` records) of every detector of a visit and writes the
``visit_photocalib`` record (StructuredData); the fit is
:func:`procsky.photometry.visit_photometric_calibration`, whose settings the task config
holds as ``photometry`` (override e.g. ``visit_photometry.photometry.estimator=weighted_mean``).
"""

from __future__ import annotations

from procsky.errors import ProcskyValueError
from procsky.photometry import VisitPhotometryConfig, visit_photometric_calibration

# re-exported for the modules that import it from here (tasks.warp); new code imports procsky.photometry
from procsky.photometry import photocalib_for_detector as photocalib_for_detector
from procsky.tasks.base import Input, Output, Task, TaskConfig, register_task

__all__ = ["VisitPhotometryTaskConfig", "VisitPhotometryTask"]

_VD = ("instrument", "visit", "detector")
_V = ("instrument", "visit")


class VisitPhotometryTaskConfig(TaskConfig):
    """Configuration of :class:`VisitPhotometryTask`."""

    photometry: VisitPhotometryConfig = VisitPhotometryConfig()
    """Settings of :func:`procsky.photometry.visit_photometric_calibration`."""


@register_task("visit_photometry")
class VisitPhotometryTask(Task):
    """Fit one photometric zero point per visit from the ``src`` of all its detectors."""

    dimensions = _V
    inputs = {
        "src": Input("src", _VD, multiple=True, tolerate_missing=True),
        "summaries": Input("calibrate_summary", _VD, multiple=True, optional=True, tolerate_missing=True),
    }
    outputs = {"visit_photocalib": Output("visit_photocalib", _V)}
    Config = VisitPhotometryTaskConfig
    config: VisitPhotometryTaskConfig

    def run(self, src, summaries=None, data_ids=None, data_id=None):
        """Returns ``{"visit_photocalib": dict}`` (see :func:`visit_photometric_calibration`)."""
        ids = (data_ids or {}).get("src") or []
        if len(ids) != len(src):
            # src tables do not name their detector: without the data IDs every zero point
            # would be attached to the wrong detector.
            raise ProcskyValueError(
                "VisitPhotometryTask.run needs data_ids={'src': [data ID per src]}; the executor passes "
                "them to run() methods that accept 'data_ids' (or call visit_photometric_calibration directly)"
            )
        dets = [i.get("detector") for i in ids]
        summ = None
        sids = (data_ids or {}).get("summaries") or []
        if summaries and len(sids) == len(summaries):
            by_det = {i.get("detector"): s for i, s in zip(sids, summaries)}
            summ = [by_det.get(k) for k in dets]
        visit = (data_id or {}).get("visit")
        config = self.config.photometry
        return {"visit_photocalib": visit_photometric_calibration(src, dets, summ, config, visit=visit)}
