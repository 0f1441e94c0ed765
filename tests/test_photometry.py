"""The visit-photometry stage: library function (procsky.photometry) and thin task."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydantic
import pytest

from procsky.photometry import VisitPhotometryConfig, visit_photometric_calibration
from procsky.tasks.base import override_config
from procsky.tasks.photometry import VisitPhotometryTask


def _src(rng: np.random.Generator, zp: float, n: int = 60) -> pd.DataFrame:
    m_true = rng.uniform(17, 20, n)
    flux = 10 ** (-0.4 * (m_true - zp))  # counts
    src = pd.DataFrame(
        {
            "psf_flux": flux * 10 ** (-0.4 * (zp - 31.4)),
            "psf_flux_err": 0.01 * flux,
            "ref_mag": m_true + rng.normal(0, 0.01, n),
            "ref_mag_err": np.full(n, 0.01),
            "calib_photometry_candidate": np.ones(n, bool),
        }
    )
    src.attrs["meta"] = {"zero_point": zp, "zero_point_err": 0.003, "header_zero_point": zp}
    return src


def test_task_config_nests_library_config_and_task_equals_library():
    task = VisitPhotometryTask()
    assert task.config.photometry == VisitPhotometryConfig()
    with pytest.raises(pydantic.ValidationError):
        task.config.photometry.nsigma = 2.0  # frozen
    cfg = override_config(task.config, {"photometry.estimator": "weighted_mean"})
    assert cfg.photometry.estimator == "weighted_mean" and task.config.photometry.estimator == "median"
    rng = np.random.default_rng(1)
    srcs = [_src(rng, 30.0 + 0.01 * k) for k in range(3)]
    ids = [{"instrument": "x", "visit": 4, "detector": k} for k in range(3)]
    out = VisitPhotometryTask(config=cfg).run(srcs, data_ids={"src": ids}, data_id={"visit": 4})["visit_photocalib"]
    ref = visit_photometric_calibration(srcs, [0, 1, 2], None, cfg.photometry, visit=4)
    assert json.dumps(out, sort_keys=True) == json.dumps(ref, sort_keys=True)  # NaN-aware equality
    assert out["estimator"] == "weighted_mean"
