"""procsky.sim.evaluate (the figures `make demo` prints) and the demo's timing table.

The whole chain runs in CI through `make demo`, which fails when a quantum fails or the
DIA purity is not sane; these tests pin the pieces that do not need a pipeline run.
"""

import numpy as np

from procsky.demo import _timing_text
from procsky.sim.evaluate import _sky_match, _stats, format_evaluation


def test_sky_match_nearest_within_radius():
    rng = np.random.default_rng(3)
    ra2 = 150 + rng.uniform(-0.05, 0.05, 200)
    dec2 = 2 + rng.uniform(-0.05, 0.05, 200)
    # the first 50 catalogue objects, moved by 0.3 arcsec; then 5 positions far from all
    ra1 = np.r_[ra2[:50] + 0.3 / 3600 / np.cos(np.radians(dec2[:50])), 151.0 + np.arange(5) * 0.01]
    dec1 = np.r_[dec2[:50], np.full(5, 3.0)]
    idx, sep = _sky_match(ra1, dec1, ra2, dec2, 1.0)
    assert (idx[:50] == np.arange(50)).all()
    np.testing.assert_allclose(sep[:50], 0.3, rtol=1e-6)
    assert (idx[50:] == -1).all()
    idx, _ = _sky_match(ra1, dec1, ra2, dec2, 0.2)  # tighter than the offsets: nothing
    assert (idx == -1).all()
    idx, sep = _sky_match([], [], ra2, dec2, 1.0)
    assert idx.size == 0 and sep.size == 0


def test_stats_ignore_missing_values():
    s = _stats([1.0, None, 3.0, float("nan"), 2.0])
    assert s["n"] == 3 and s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0
    assert _stats([None]) is None


def test_format_evaluation_shows_every_section():
    ev = {
        "run": "demo/drp",
        "single_frame": {
            "n_detector_visits": 32,
            "sources_per_detector": _stats([100, 120, 140]),
            "psf_fwhm_arcsec": _stats([0.8, 1.1, 1.4]),
            "psf_stars_per_detector": _stats([12, 14]),
            "zero_point_minus_truth_mmag": _stats([0.5, 1.0, -1.0]),
            "detector_zero_point_scatter_mmag": _stats([1.0, -1.0]),
            "bright_star_offset_mas": {"n": 700, "median_ra": 0.1, "median_dec": -0.1, "rms_per_axis": 8.0},
            "bright_star_psf_mag_minus_truth_mmag": _stats([-1.0, 0.0, 1.0]),
        },
        "coadd": {"g": {"m5": 25.25, "n_inputs": 4, "area_fraction": 0.7, "nea_px": 60.0}},
        "dia": {
            "n_differences": 32,
            "residual_std_sigma": _stats([0.7, 1.0]),
            "kernel_stamps_used": _stats([20]),
            "registration_sigma_px": _stats([0.01, 0.02]),
            "recovered": {"variable": {"truth": 5, "recovered": 5}, "transient": {"truth": 3, "recovered": 3}},
            "n_dia_objects": 44,
            "n_dia_sources": 500,
            "n_false_objects": 33,
            "false_objects_per_detector_visit": 33 / 32,
            "false_on": {"star": 22, "galaxy": 2, "nothing": 9},
        },
    }
    text = format_evaluation(ev)
    for needle in (
        "sources per detector",
        "PSF FWHM",
        "zero point - truth",
        "zero-point scatter",
        "astrometry vs truth",
        "5-sigma point-source depth 25.25",
        "variables 5/5",
        "transients 3/3",
        "33 with no truth counterpart (1.03 per detector-visit)",
        "22 static stars",
    ):
        assert needle in text, (needle, text)
    # a run that stopped before difference imaging says nothing about DIA
    assert "difference imaging" not in format_evaluation({**ev, "dia": {"n_differences": 0}})


def test_demo_timing_table():
    report = {
        "tasks": [
            {"task": "subtract", "quanta": 32, "wall_seconds": {"median": 3.0}, "cpu_seconds": {"median": 2.0}},
            {"task": "isr", "quanta": 0, "wall_seconds": None, "cpu_seconds": None},
        ]
    }
    text = _timing_text(report)
    assert "subtract" in text and "wall/CPU  1.5" in text and "isr" not in text
