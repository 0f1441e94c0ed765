"""ISR kernels and tasks on synthetic raw frames (fast), the calibration-frame campaign on a
``tiny`` raw simulation (ingest -> ``calibs`` pipeline -> ``isr`` + ``calibrate``, fast), and
the raw/calibrated twins of ``tiny`` and ``small`` (slow).

The twins share one noise realisation (``procsky.sim.render``: the raw frame is the
calibrated frame with the signature put back), so "the same catalogue within noise"
is a much stronger statement than for two independent exposures: the flux differences
come only from the noise ISR adds (ADC rounding, the master bias and master flat built
from a few exposures) and from the independent PSF/zero-point fits, and their pulls
``(f_raw - f_cal) / sqrt(err_raw^2 + err_cal^2)`` have a spread far below 1 (which is
what two independent exposures would give).
"""

from __future__ import annotations

import numpy as np
import pytest

from procsky import masks
from procsky.errors import AlgorithmError, ProcskyValueError
from procsky.exposure import Exposure, VisitInfo
from procsky.isr import IsrConfig, run_isr
from procsky.kernels.isr import (
    clipped_median_rows,
    combine_frames,
    isr_variance,
    overscan_model,
    parse_section,
    saturation_mask,
)
from procsky.photocalib import PhotoCalib
from procsky.tasks.isr import (
    IsrTask,
    MakeMasterBiasTask,
    MakeMasterDarkTask,
    MakeMasterFlatTask,
)

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
    det = {
        "id": 0,
        "name": "D0",
        "gain": GAIN,
        "read_noise": RN,
        "saturation": SAT,
        "datasec": f"[1:{NX},1:{NY}]",
        "biassec": [NX, NX + NOS, 0, NY],
    }
    vi = VisitInfo(exposure_time=t, band="r", physical_filter="f-r", visit=1, instrument="test")
    return Exposure(
        raw.astype(np.float32),
        np.ones(raw.shape, np.float32),
        None,
        visit_info=vi,
        detector=det,
        photocalib=PhotoCalib.from_zero_point(28.0),
    )


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
    from procsky.tasks.base import DatasetKey

    task = IsrTask()
    raw = DatasetKey("raw", {"instrument": "sim", "visit": 1, "detector": 0, "band": "g", "physical_filter": "sim-g"})
    flats = [
        DatasetKey("flat", {"instrument": "sim", "detector": 0, "band": b, "physical_filter": f"sim-{b}"}) for b in "gr"
    ]
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
    bias_frames = [
        _raw(zeros, np.ones((NY, NX)), bias, zeros, t=0.0, level=1000 + 5 * k, seed=10 + k) for k in range(9)
    ]
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


def test_master_dark_task_rate_and_defects():
    expected, flat, bias, dark = _truth()
    zeros = np.zeros((NY, NX))
    dark = dark.copy()
    dark[:, 33] += 0.5  # a warm column (ADU/s)
    frames = [_raw(zeros, np.ones((NY, NX)), bias, dark, t=100.0, seed=40 + k) for k in range(5)]
    img = np.array(frames[2].image)
    img[60:63, 10:12] += 3000.0  # a cosmic ray in one frame
    frames[2] = Exposure(img, frames[2].variance, None, visit_info=frames[2].visit_info, detector=frames[2].detector)
    out = MakeMasterDarkTask().run(frames=frames, bias=_calib(bias))["dark"]
    assert out.metadata["units"] == "adu/s" and out.visit_info is None  # a rate: isr scales it by EXPTIME
    noise = RN / GAIN * np.sqrt(1 / 5) / 100.0
    ok = np.ones((NY, NX), bool)
    ok[10, 20] = ok[:, 33] = False
    assert abs(np.median(out.image[ok]) - 0.01) < 0.2 * noise
    assert np.std(out.image[ok] - 0.01) < 1.3 * noise
    assert out.image[10, 20] == pytest.approx(5.0 + 0.0, abs=5 * noise)
    bad = (out.mask & masks.bit("BAD")) != 0
    assert bad[10, 20] and bad[:, 33].all() and not bad[60:63, 10:12].any()
    assert bad.sum() <= NY + 1 + 2  # the defects, at most a couple of noise pixels
    with pytest.raises(AlgorithmError, match="exposure time"):
        MakeMasterDarkTask().run(frames=[_raw(zeros, np.ones((NY, NX)), bias, dark, t=0.0)] * 3)


@pytest.mark.slow
def test_raw_sim_through_isr_matches_calibrated_twin(tmp_path):
    sim = pytest.importorskip("procsky.sim")
    pytest.importorskip("galsim")
    sim.simulate(
        "tiny", tmp_path / "cal", mode="calibrated", scheduler="sync", visits=[1], detectors=[0], progress=False
    )
    sim.simulate("tiny", tmp_path / "raw", mode="raw", scheduler="sync", visits=[1], detectors=[0], progress=False)
    raw = Exposure.read(tmp_path / "raw/images/raw-v000001-d000.fits")
    cal = Exposure.read(tmp_path / "cal/images/calexp-v000001-d000.fits")
    c = tmp_path / "raw/calibs"
    out = run_isr(
        raw,
        Exposure.read(c / "bias-d000.fits"),
        Exposure.read(c / "dark-d000.fits"),
        Exposure.read(c / "flat-g-d000.fits"),
        IsrConfig(units="adu"),
    )
    diff = out.image - cal.image
    # ADC rounding (1/sqrt(12)) and the master-bias noise (rn/gain/sqrt(20)) only
    expect = np.sqrt(1 / 12 + (raw.detector["read_noise"] / raw.detector["gain"]) ** 2 / 20)
    assert abs(np.median(diff)) < 0.15
    assert np.std(diff) < 1.15 * expect
    assert np.array_equal(out.mask & masks.bit("BAD"), cal.mask & masks.bit("BAD"))
    assert np.median(out.variance / cal.variance) == pytest.approx(1.0, abs=0.06)


# ----------------------------------------------------- calibration frames -> masters -> ISR
def _match_catalogues(src_a, src_b, radius=1.0):
    """Match ``src_a`` to ``src_b`` within ``radius`` px.

    Returns ``ok`` (rows of ``src_a`` matched) and, per match, the PSF-flux pull, the S/N in
    ``src_a`` and ``clean`` (no BAD/SAT/edge/PSF-flux flag in either, finite pull).
    """
    from scipy.spatial import cKDTree

    d, j = cKDTree(np.c_[src_b.x, src_b.y]).query(np.c_[src_a.x, src_a.y], distance_upper_bound=radius)
    ok = np.isfinite(d)
    a, b = src_a[ok], src_b.iloc[j[ok]]
    pull = (b.psf_flux.to_numpy() - a.psf_flux.to_numpy()) / np.hypot(
        a.psf_flux_err.to_numpy(), b.psf_flux_err.to_numpy()
    )
    snr = (a.psf_flux / a.psf_flux_err).to_numpy()
    flags = ["flag_bad", "flag_saturated", "flag_edge", "psf_flux_flag"]
    clean = ~np.logical_or.reduce([a[f].to_numpy() | b[f].to_numpy() for f in flags])
    return ok, pull, snr, clean & np.isfinite(pull)


def _mad(x):
    return 1.4826 * float(np.median(np.abs(x - np.median(x))))


def test_calibs_pipeline_from_frames_then_isr_matches_calibrated_twin(tmp_path):
    """tiny, raw mode: ingest the raw and the bias/dark/flat exposures; build the masters with
    the ``calibs`` pipeline; run ``isr`` + ``calibrate`` of ``drp``; compare with the
    calibrated-mode twin."""
    pytest.importorskip("galsim")
    import glob

    from procsky.instruments import ingest_files
    from procsky.pipeline import run_pipeline
    from procsky.refcat import ingest_refcat, read_refcat_file
    from procsky.repo import Repo
    from procsky.sim import simulate
    from procsky.tasks.calibrate import calibrate_exposure

    raw, cal = tmp_path / "raw", tmp_path / "cal"
    res = simulate("tiny", raw, mode="raw", scheduler="sync", visits=[1], detectors=[0], progress=False)
    simulate("tiny", cal, mode="calibrated", scheduler="sync", visits=[1], detectors=[0], progress=False)
    rec = res.recipe.raw
    n_frames = {"bias_frame": rec.n_bias_frames, "dark_frame": rec.n_dark_frames, "flat_frame": rec.n_flat_frames}
    assert len(res.calib_frames) == sum(n_frames.values())  # visit 1 is g: g flats only
    repo = Repo.create(tmp_path / "repo")
    files = sorted(glob.glob(str(raw / "images/*.fits"))) + sorted(map(str, res.calib_frames))
    refs = ingest_files(repo, files, "simcam")
    types = [r.dataset_type for r in refs]
    assert {t: types.count(t) for t in set(types)} == {"raw": 1, **n_frames}
    ingest_refcat(repo, [raw / "refcat/refcat.parquet"], "sim")

    summary = run_pipeline(repo, "calibs", output="calibs/run1")
    assert summary.ok, str(summary)
    for label in ("make_master_bias", "make_master_dark", "make_master_flat"):
        assert f"{label}: succeeded 1" in str(summary), str(summary)
    bias = repo.get("bias", {"instrument": "simcam", "detector": 0}, run="calibs/run1").compute()
    dark = repo.get("dark", {"instrument": "simcam", "detector": 0}, run="calibs/run1").compute()
    flat = repo.get(
        "flat", {"instrument": "simcam", "detector": 0, "physical_filter": "simcam-g"}, run="calibs/run1"
    ).compute()
    # masters against the simulator's own: noise of a 5-frame clipped mean (and of its 20-frame
    # master); a median-centred clip of few frames costs up to ~25% in noise
    sim_bias = Exposure.read(raw / "calibs/bias-d000.fits")
    g, rn = sim_bias.detector["gain"], sim_bias.detector["read_noise"]
    dbias = bias.image - sim_bias.image
    assert abs(np.median(dbias)) < 0.1
    assert np.std(dbias) < 1.25 * (rn / g) * np.sqrt(1 / rec.n_bias_frames + 1 / 20)
    # master dark (ADU/s): every simulated defect found (hot pixels, bad columns), few others
    sim_dark = Exposure.read(raw / "calibs/dark-d000.fits")
    bad = masks.bit("BAD")
    true_bad, got_bad = (sim_dark.mask & bad) != 0, (dark.mask & bad) != 0
    assert got_bad[true_bad].all()
    assert (got_bad & ~true_bad).sum() < 1e-4 * got_bad.size
    # read noise of the darks and of the master bias subtracted from all of them
    rate_noise = rn / g * np.sqrt(1 / rec.n_dark_frames + 1 / rec.n_bias_frames) / rec.dark_exposure_time
    assert abs(np.median(dark.image - sim_dark.image)) < 0.2 * rate_noise
    assert np.std((dark.image - sim_dark.image)[~true_bad]) < 1.25 * rate_noise  # clipping with few frames
    sim_flat = Exposure.read(raw / "calibs/flat-g-d000.fits").image
    norm = float(np.median(flat.image / sim_flat))
    rel = flat.image / sim_flat / norm - 1
    assert np.std(rel) < 1.25 / np.sqrt(rec.n_flat_frames * rec.flat_level)

    summary = run_pipeline(
        repo, "drp", output="drp/run1", tasks=["isr", "calibrate"], where="instrument='simcam' AND visit=1"
    )
    assert summary.ok, str(summary)
    did = {"instrument": "simcam", "visit": 1, "detector": 0}
    isr = repo.get("isr_exposure", did, run="drp/run1").compute()
    assert isr.metadata["isr"]["missing"] == []
    src_b = repo.get("src", did, run="drp/run1")
    sum_b = repo.get("calibrate_summary", did, run="drp/run1")
    cal_exp = Exposure.read(cal / "images/calexp-v000001-d000.fits")
    _, src_a, sum_a = calibrate_exposure(cal_exp, [read_refcat_file(cal / "refcat/refcat.parquet")])
    # the defects found in the darks mask the exposure as the simulator's truth masks its twin
    isr_bad, cal_bad = (isr.mask & bad) != 0, (cal_exp.mask & bad) != 0
    assert isr_bad[cal_bad].all() and (isr_bad & ~cal_bad).sum() < 1e-4 * isr_bad.size
    ok, pull, snr, clean = _match_catalogues(src_a, src_b)
    assert ok.mean() > 0.9
    sel = clean & (snr > 5)
    assert sel.sum() > 30
    # tiny has ~5 PSF stars and ~10 reference stars, so the two independent calibrations
    # differ by ~1% for the brightest stars; the spread is still well inside the noise
    assert abs(np.median(pull[sel])) < 0.25
    assert _mad(pull[sel]) < 0.5
    # zero points: ISR output is in electrons and the master flat is normalised to median 1
    dzp = sum_b["zero_point"] - sum_a["zero_point"] - 2.5 * np.log10(g / norm)
    assert abs(dzp) < 3 * np.hypot(sum_a["zero_point_err"], sum_b["zero_point_err"]) + 0.005


@pytest.mark.slow
def test_raw_small_isr_calibrate_matches_calibrated_twin(small_r_det4, tmp_path):
    """Issue 5, ISR criterion: raw-mode `small` (visit 2, detector 4) through master bias, dark
    and flat built from the simulated exposures, ISR and calibrate gives the catalogue of its
    calibrated-mode twin (the shared `small_r_det4` draw)."""
    pytest.importorskip("galsim")
    from procsky.instruments import get_instrument
    from procsky.refcat import read_refcat_file
    from procsky.sim import simulate
    from procsky.tasks.calibrate import calibrate_exposure

    raw = tmp_path / "raw"
    res = simulate("small", raw, mode="raw", visits=[2], detectors=[4], scheduler="sync", progress=False)
    simcam = get_instrument("simcam")
    frames = [simcam.ingest_file(p)[0] for p in res.calib_frames]
    bias_frames = [f.obj for f in frames if f.dataset_type == "bias_frame"]
    flat_frames = [f.obj for f in frames if f.dataset_type == "flat_frame"]
    assert {f.data_id["band"] for f in frames if f.dataset_type == "flat_frame"} == {"r"}
    dark_frames = [f.obj for f in frames if f.dataset_type == "dark_frame"]
    bias = MakeMasterBiasTask().run(frames=bias_frames)["bias"]
    dark = MakeMasterDarkTask().run(frames=dark_frames, bias=bias)["dark"]
    flat = MakeMasterFlatTask().run(frames=flat_frames, bias=bias, dark=dark)["flat"]
    isr = run_isr(Exposure.read(raw / "images/raw-v000002-d004.fits"), bias, dark, flat)
    refcat = [read_refcat_file(small_r_det4 / "refcat/refcat.parquet")]
    _, src_b, sum_b = calibrate_exposure(isr, refcat)
    cal_exp = Exposure.read(small_r_det4 / "images/calexp-v000002-d004.fits")
    _, src_a, sum_a = calibrate_exposure(cal_exp, refcat)

    # The noise ISR adds per pixel (ADC rounding, master-bias and master-flat noise), measured
    # on the sky, predicts the spread of the pulls of faint (sky-limited) sources:
    # sqrt(var_added / (2 var_pixel)), with the errors of both catalogues in the denominator.
    g = isr.detector["gain"]
    norm = float(np.median(flat.image / Exposure.read(raw / "calibs/flat-r-d004.fits").image))
    diff = isr.image / g * norm - cal_exp.image
    var_pix = float(np.median(cal_exp.variance))
    sky = (isr.mask == 0) & (cal_exp.mask == 0) & (cal_exp.image < np.median(cal_exp.image) + 3 * np.sqrt(var_pix))
    predicted = float(np.std(diff[sky])) / np.sqrt(2 * var_pix)
    assert predicted < 0.15

    bad = masks.bit("BAD")
    isr_bad, cal_bad = (isr.mask & bad) != 0, (cal_exp.mask & bad) != 0
    assert isr_bad[cal_bad].all() and (isr_bad & ~cal_bad).sum() < 1e-4 * isr_bad.size

    ok, pull, snr, clean = _match_catalogues(src_a, src_b)
    unsat = ~src_a.flag_saturated.to_numpy()
    snr_all = (src_a.psf_flux / src_a.psf_flux_err).to_numpy()
    assert ok[unsat].mean() >= 0.95  # saturated plateaus deblend differently: reported, not judged
    assert ok[unsat & (snr_all >= 20)].mean() >= 0.99
    sel = clean & (snr > 5)
    faint = sel & (snr < 50)
    assert sel.sum() > 300 and faint.sum() > 250
    med, std_all, std_faint = float(np.median(pull[sel])), float(np.std(pull[sel])), float(np.std(pull[faint]))
    print(
        f"small v2 d4: matched {ok.mean():.3f} (unsaturated {ok[unsat].mean():.3f}), pulls: median {med:.3f}, "
        f"std {std_all:.3f} (S/N>5), std {std_faint:.3f} (5<S/N<50, predicted {predicted:.3f}), "
        f"zero points {sum_a['zero_point']:.4f} / {sum_b['zero_point'] - 2.5 * np.log10(g / norm):.4f}"
    )
    assert abs(med) < 0.05
    assert 0.8 * predicted < std_faint < 1.5 * predicted
    assert std_all < 0.3  # independent exposures would give 1
    dzp = sum_b["zero_point"] - sum_a["zero_point"] - 2.5 * np.log10(g / norm)
    assert abs(dzp) < 0.003  # the zero-point tolerance (3 mmag)


def test_isr_task_configs_nest_the_library_settings():
    """Each ISR task config holds the frozen library settings of :mod:`procsky.isr` (same
    defaults as before the split); pipeline overrides address them with dotted paths."""
    import pydantic

    from procsky.isr import MasterConfig, MasterDarkConfig, OverscanConfig
    from procsky.tasks.base import override_config

    cfg = IsrTask().config
    assert cfg.isr == IsrConfig() and cfg.isr.overscan == OverscanConfig(method="poly", order=3, nsigma=3.0)
    assert MakeMasterBiasTask().config.master == MasterConfig()
    assert MakeMasterDarkTask().config.master == MasterDarkConfig()
    assert MakeMasterDarkTask().config.master.defect_nsigma == 5.0
    new = override_config(cfg, {"isr.units": "adu", "isr.overscan.order": 2})
    assert new.isr.units == "adu" and new.isr.overscan.order == 2 and cfg.isr.units == "electron"
    with pytest.raises(pydantic.ValidationError):
        IsrConfig(overscan_order=2)  # the overscan settings live in IsrConfig.overscan
