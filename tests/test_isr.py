"""ISR kernels and tasks on synthetic raw frames (fast) and on a raw/calibrated sim twin (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from procsky import masks
from procsky.errors import AlgorithmError, ProcskyValueError
from procsky.exposure import Exposure, VisitInfo
from procsky.kernels.isr import (
    clipped_median_rows,
    combine_frames,
    isr_variance,
    overscan_model,
    parse_section,
    saturation_mask,
)
from procsky.photocalib import PhotoCalib
from procsky.tasks.isr import IsrConfig, IsrTask, MakeMasterBiasTask, MakeMasterFlatTask, run_isr

NY, NX, NOS = 96, 80, 16
GAIN, RN, SAT = 2.0, 6.0, 30000.0


def _truth(seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:NY, 0:NX]
    sky_e = 400.0 + 0.5 * xx  # electrons per pixel, incident
    star = 20000.0 * np.exp(-0.5 * ((xx - 40) ** 2 + (yy - 50) ** 2) / 2.0**2)
    flat = 1.0 + 0.05 * np.sin(xx / 9.0) + 0.02 * (yy / NY) + rng.normal(0, 0.005, (NY, NX))
    bias = 3.0 * np.sin(yy / 7.0) + 0.01 * xx  # ADU, overscan-subtracted structure
    dark = np.full((NY, NX), 0.01)  # ADU/s
    dark[10, 20] = 5.0  # hot pixel
    return sky_e + star, flat, bias, dark


def _raw(expected_e, flat, bias, dark, t=30.0, level=1000.0, seed=2, slope=2.0, noise=True):
    rng = np.random.default_rng(seed)
    e = expected_e * flat
    q = rng.poisson(e).astype(float) if noise else e.copy()
    q += dark * t * GAIN
    if noise:
        q += rng.normal(0, RN, q.shape)
    ramp = level + slope * np.linspace(0, 1, NY)[:, None]
    raw = np.empty((NY, NX + NOS))
    raw[:, :NX] = q / GAIN + bias + ramp
    raw[:, NX:] = ramp + (rng.normal(0, RN / GAIN, (NY, NOS)) if noise else 0.0)
    det = {"id": 0, "name": "D0", "gain": GAIN, "read_noise": RN, "saturation": SAT,
           "datasec": "[1:%d,1:%d]" % (NX, NY), "biassec": [NX, NX + NOS, 0, NY]}
    vi = VisitInfo(exposure_time=t, band="r", physical_filter="f-r", visit=1, instrument="test")
    return Exposure(raw.astype(np.float32), np.ones(raw.shape, np.float32), None, visit_info=vi, detector=det,
                    photocalib=PhotoCalib.from_zero_point(28.0))


def _calib(img, bad=None):
    m = np.zeros(img.shape, np.uint32)
    if bad is not None:
        m[bad] |= masks.bit("BAD")
    return Exposure(img.astype(np.float32), np.zeros(img.shape, np.float32), m)


def test_parse_section():
    assert parse_section("[1:512,1:256]") == (0, 512, 0, 256)
    assert parse_section("[512:1, 3:4]") == (0, 512, 2, 4)
    assert parse_section([5, 9, 0, 3]) == (5, 9, 0, 3)
    with pytest.raises(ValueError, match="FITS form"):
        parse_section("1:5,1:5")


def test_clipped_median_rows_matches_numpy_and_rejects_outliers():
    rng = np.random.default_rng(0)
    block = rng.normal(10.0, 1.0, (50, 31))
    block[:, 3] = 1e4  # a hot column in the overscan
    got = clipped_median_rows(block, 3.0, 5)
    ref = np.median(np.delete(block, 3, axis=1), axis=1)
    assert np.allclose(got, ref, atol=0.15)
    assert np.isnan(clipped_median_rows(np.full((2, 3), np.nan), 3.0, 5)).all()


@pytest.mark.parametrize("method", ["poly", "median_per_row", "median"])
def test_overscan_model_recovers_level(method):
    rng = np.random.default_rng(3)
    level = 500.0 + (2.0 if method != "median" else 0.0) * np.linspace(0, 1, 200)
    ov = level[:, None] * np.ones((200, 24)) + rng.normal(0, 2.0, (200, 24))
    model = overscan_model(ov, method=method, order=2)
    tol = 1.5 if method == "median_per_row" else 0.3
    assert np.max(np.abs(model - level)) < tol
    with pytest.raises(ValueError, match="overscan method"):
        overscan_model(ov, method="spline")


def test_combine_frames_against_numpy_and_clips_outliers():
    rng = np.random.default_rng(4)
    stack = rng.normal(100.0, 5.0, (7, 20, 30))
    clean_mean = stack.mean(axis=0)
    stack[2, 5, 6] = 1e5  # a cosmic ray in one frame
    mean, var, n = combine_frames(stack, nsigma=3.0, max_iter=3)
    assert abs(mean[5, 6] - np.delete(stack[:, 5, 6], 2).mean()) < 1e-3
    assert n[5, 6] == 6
    # elsewhere, nothing is clipped for Gaussian data in most pixels
    assert np.median(np.abs(mean - clean_mean)) < 1e-3
    assert np.allclose(np.median(var), 25.0 / 7, rtol=0.3)
    masks_ = np.zeros(stack.shape, bool)
    masks_[:, 0, 0] = True
    mean, var, n = combine_frames(stack, masks_)
    assert np.isnan(mean[0, 0]) and n[0, 0] == 0


def test_saturation_and_variance():
    img = np.array([[10.0, 29999.0, 30000.0]])
    raw = np.array([[100.0, 100.0, 65535.0]])
    assert saturation_mask(img, 30000.0).tolist() == [[False, False, True]]
    assert saturation_mask(img, np.inf, raw=raw, adc_max=65535.0).tolist() == [[False, False, True]]
    v = isr_variance(np.array([[100.0, -5.0]]), 2.0, 4.0)
    assert np.allclose(v, [[50.0 + 4.0, 4.0]])


def test_isr_recovers_signal_noise_free():
    expected, flat, bias, dark = _truth()
    raw = _raw(expected, flat, bias, dark, noise=False)
    cfg = IsrConfig(units="electron")
    out = run_isr(raw, _calib(bias), _calib(dark), _calib(flat), cfg)
    assert out.shape == (NY, NX)
    # electrons incident before the flat: expected_e
    assert np.allclose(out.image, expected, rtol=1e-4, atol=0.5)
    assert out.metadata["isr"]["missing"] == []
    assert out.photocalib.zero_point == pytest.approx(28.0 + 2.5 * np.log10(GAIN))
    adu = run_isr(raw, _calib(bias), _calib(dark), _calib(flat), IsrConfig(units="adu"))
    assert np.allclose(adu.image * GAIN, out.image, rtol=1e-5, atol=1e-2)


def test_isr_noise_matches_variance_plane():
    expected, flat, bias, dark = _truth()
    raw = _raw(expected, flat, bias, dark, noise=True)
    out = run_isr(raw, _calib(bias), _calib(dark), _calib(flat), IsrConfig())
    pull = (out.image - expected) / np.sqrt(out.variance)
    sky = (np.abs(np.arange(NX)[None, :] - 40) > 10) & np.ones((NY, 1), bool)
    assert abs(np.mean(pull[sky])) < 0.1
    assert 0.9 < np.std(pull[sky]) < 1.1


def test_isr_masks_saturation_defects_and_low_flat():
    expected, flat, bias, dark = _truth()
    expected = expected.copy()
    expected[50, 40] = 1e6  # far above full well
    flat = flat.copy()
    flat[0, 0] = 0.0
    raw = _raw(expected, flat, bias, dark, noise=False)
    bad = np.zeros((NY, NX), bool)
    bad[:, 7] = True
    out = run_isr(raw, _calib(bias, bad), _calib(dark), _calib(flat), IsrConfig())
    m = out.mask
    assert m[50, 40] & masks.bit("SAT")
    assert (m[:, 7] & masks.bit("BAD")).all()
    assert m[0, 0] & masks.bit("NO_DATA") and m[0, 0] & masks.bit("BAD")
    assert not (m[30, 60] & (masks.bit("SAT") | masks.bit("BAD")))


def test_isr_without_calibs_and_errors():
    expected, flat, bias, dark = _truth()
    raw = _raw(expected, flat, bias, dark, noise=False)
    out = run_isr(raw, config=IsrConfig(units="adu"))
    assert out.metadata["isr"]["missing"] == ["bias", "dark", "flat"]
    with pytest.raises(AlgorithmError, match="require_calibs"):
        run_isr(raw, config=IsrConfig(require_calibs=True))
    bare = Exposure(raw.image, detector={"gain": 1.0})
    with pytest.raises(ProcskyValueError, match="biassec"):
        run_isr(bare)
    with pytest.raises(ProcskyValueError, match="shape"):
        run_isr(raw, _calib(bias[:10]))


def test_isr_task_quanta_pick_matching_flat():
    from procsky.pipeline.task import DatasetKey

    task = IsrTask()
    raw = DatasetKey("raw", {"instrument": "sim", "visit": 1, "detector": 0, "band": "g", "physical_filter": "sim-g"})
    flats = [DatasetKey("flat", {"instrument": "sim", "detector": 0, "band": b, "physical_filter": f"sim-{b}"})
             for b in "gr"]
    bias = [DatasetKey("bias", {"instrument": "sim", "detector": d}) for d in (0, 1)]
    specs = task.quanta(None, {"raw": [raw], "flat": flats, "bias": bias, "dark": []}, None)
    assert len(specs) == 1
    assert specs[0].inputs["flat"][0].data_id["band"] == "g"
    assert specs[0].inputs["bias"][0].data_id["detector"] == 0
    assert specs[0].inputs["dark"] == []
    assert specs[0].data_id == {"instrument": "sim", "visit": 1, "detector": 0}


def test_master_bias_and_flat_tasks():
    expected, flat, bias, dark = _truth()
    rng = np.random.default_rng(9)
    zeros = np.zeros((NY, NX))
    bias_frames = [_raw(zeros, np.ones((NY, NX)), bias, zeros, t=0.0, level=1000 + 5 * k, seed=10 + k)
                   for k in range(9)]
    mb = MakeMasterBiasTask().run(frames=bias_frames)["bias"]
    assert mb.shape == (NY, NX)
    assert np.std(mb.image - bias) < 1.5 * RN / GAIN / 3.0  # noise ~ rn/gain/sqrt(9)
    with pytest.raises(AlgorithmError, match="min_frames"):
        MakeMasterBiasTask().run(frames=bias_frames[:2])
    lamp = np.full((NY, NX), 20000.0)
    flat_frames = [_raw(lamp * (1 + 0.1 * k), flat, bias, zeros, t=1.0, seed=20 + k) for k in range(5)]
    mf = MakeMasterFlatTask().run(frames=flat_frames, bias=_calib(bias))["flat"]
    assert np.median(mf.image) == pytest.approx(1.0, abs=1e-6)
    want = flat / np.median(flat)
    assert np.std(mf.image / want - 1) < 0.01
    del rng


@pytest.mark.slow
def test_raw_sim_through_isr_matches_calibrated_twin(tmp_path):
    sim = pytest.importorskip("procsky.sim")
    pytest.importorskip("galsim")
    sim.simulate("tiny", tmp_path / "cal", mode="calibrated", scheduler="sync", visits=[1], detectors=[0],
                 progress=False)
    sim.simulate("tiny", tmp_path / "raw", mode="raw", scheduler="sync", visits=[1], detectors=[0], progress=False)
    raw = Exposure.read(tmp_path / "raw/images/raw-v000001-d000.fits")
    cal = Exposure.read(tmp_path / "cal/images/calexp-v000001-d000.fits")
    c = tmp_path / "raw/calibs"
    out = run_isr(raw, Exposure.read(c / "bias-d000.fits"), Exposure.read(c / "dark-d000.fits"),
                  Exposure.read(c / "flat-g-d000.fits"), IsrConfig(units="adu"))
    diff = out.image - cal.image
    # ADC rounding (1/sqrt(12)) and the master-bias noise (rn/gain/sqrt(20)) only
    expect = np.sqrt(1 / 12 + (raw.detector["read_noise"] / raw.detector["gain"]) ** 2 / 20)
    assert abs(np.median(diff)) < 0.15
    assert np.std(diff) < 1.15 * expect
    assert np.array_equal(out.mask & masks.bit("BAD"), cal.mask & masks.bit("BAD"))
    assert np.median(out.variance / cal.variance) == pytest.approx(1.0, abs=0.06)
