"""Instrument definitions and ingest, on the real Legacy Surveys CP cut-outs."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from click.testing import CliRunner

from procsky.cli import main
from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError
from procsky.instruments import get_instrument, ingest_files, instrument_names
from procsky.masks import DEFAULT_PLANES
from procsky.repo import Repo

CAMERAS = {"c4d_": "decam-cp", "ksb_": "90prime-cp", "k4m_": "mosaic3-cp"}


def _ooi_files(real_data):
    files = sorted(p for p in (real_data / "legacysurvey").rglob("*_ooi_*.fits") if "calib" not in p.parts)
    assert files, "no ooi files found"
    return files


def _instrument_of(path):
    return next(v for k, v in CAMERAS.items() if path.name.startswith(k))


@pytest.fixture
def repo(tmp_path):
    return Repo.create(tmp_path / "repo")


def test_ingest_every_ooi_file(repo, real_data):
    files = _ooi_files(real_data)
    by_inst = {}
    for f in files:
        by_inst.setdefault(_instrument_of(f), []).append(f)
    total = 0
    for inst, fs in by_inst.items():
        total += len(ingest_files(repo, fs, inst))
    assert total == len(files)  # every cut-out has one CCD
    refs = repo.query("isr_exposure")
    assert len(refs) == len(files)
    assert {r.data_id["instrument"] for r in refs} == {"DECam", "90prime", "Mosaic3"}
    # Sky positions from the stored WCS agree with astropy on the original header.
    for f in files:
        with fits.open(f) as h:
            hdr = h[1].header
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                w0 = WCS(hdr)
            shape = h[1].data.shape
        inst = get_instrument(_instrument_of(f))
        item = inst.ingest_file(f)[0]
        ref = repo.find("isr_exposure", item.data_id)
        exp = repo.get("isr_exposure", ref.data_id, run=ref.run)
        yy, xx = np.mgrid[0 : shape[0] : 4, 0 : shape[1] : 4]
        a = np.array(w0.pixel_to_world_values(xx.ravel(), yy.ravel()))
        b = np.array(exp.wcs.pixel_to_world_values(xx.ravel(), yy.ravel()))
        sep = np.hypot((a[0] - b[0]) * np.cos(np.deg2rad(a[1])), a[1] - b[1]) * 3600e3
        assert sep.max() < 1.0, f"{f.name}: stored WCS differs by {sep.max():.3g} mas"
        assert exp.wcs_cards and any(k.startswith("PV1_") for k, *_ in exp.wcs_cards), "TPV terms lost"
    # Re-ingesting is harmless.
    again = ingest_files(repo, by_inst["decam-cp"], "decam-cp")
    assert len(again) == 0 and len(again.skipped) == len(by_inst["decam-cp"])


def _copy_triplet(src, dst_dir):
    out = []
    for code in "iwd":
        p = src.with_name(src.name.replace("_ooi_", f"_oo{code}_"))
        out.append(shutil.copy(p, dst_dir / p.name))
    return [type(src)(p) for p in out]


def test_weights_and_dq_codes(tmp_path, real_data):
    src = next(f for f in _ooi_files(real_data) if f.name.startswith("c4d_"))
    ooi, oow, ood = _copy_triplet(src, tmp_path)
    with fits.open(oow, mode="update") as h:
        h[1].data[0, :5] = 0.0  # zero weight -> NO_DATA
        ivar = h[1].data.astype(np.float64).copy()
    with fits.open(ood, mode="update") as h:
        for code in range(1, 9):
            h[1].data[2, code] = code
    item = get_instrument("decam-cp").ingest_file(ooi)[0]
    exp = item.obj
    nd = 1 << DEFAULT_PLANES["NO_DATA"]
    assert np.all(exp.mask[0, :5] & nd)
    assert np.all(np.isnan(exp.variance[0, :5]))
    good = ivar > 0
    np.testing.assert_allclose(exp.variance[good], (1.0 / ivar[good]).astype(np.float32), rtol=1e-6)
    expected = {1: "BAD", 2: "NO_DATA", 3: "SAT", 4: "SAT", 5: "CR", 6: "SUSPECT", 7: "SUSPECT", 8: "STREAK"}
    for code, plane in expected.items():
        assert exp.mask[2, code] & (1 << DEFAULT_PLANES[plane]), f"DQ code {code} should set {plane}"
    assert exp.mask[2, 0] == 0


def test_bad_inputs_change_nothing(repo, tmp_path, real_data):
    good = next(f for f in _ooi_files(real_data) if f.name.startswith("c4d_"))
    notfits = tmp_path / "c4d_000000_000000_ooi_g_x.fits"
    notfits.write_text("hello, I am not a FITS file\n")
    with pytest.raises(ProcskyFileError, match="not a FITS"):
        ingest_files(repo, [good, notfits], "generic")
    # A FITS without WCS given to an instrument that needs one.
    nowcs = tmp_path / "nowcs.fits"
    fits.PrimaryHDU(np.zeros((10, 10), np.float32)).writeto(nowcs)
    with pytest.raises(ProcskyValueError, match="no celestial WCS"):
        ingest_files(repo, [nowcs], "generic")
    # A truncated file.
    trunc = tmp_path / "trunc.fits"
    data = good.read_bytes()
    trunc.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ProcskyFileError, match="truncated|damaged|not a readable"):
        ingest_files(repo, [trunc], "generic")
    # An unknown instrument.
    with pytest.raises(ProcskyKeyError, match="unknown instrument"):
        ingest_files(repo, [good], "hubble")
    # The wrong camera.
    ksb = next(f for f in _ooi_files(real_data) if f.name.startswith("ksb_"))
    with pytest.raises(ProcskyValueError, match="90prime-cp"):
        ingest_files(repo, [ksb], "decam-cp")
    assert repo.query() == []


def test_generic_instrument(repo, tmp_path, real_data):
    src = next(f for f in _ooi_files(real_data) if f.name.startswith("c4d_"))
    with fits.open(src) as h:
        hdr = h[0].header.copy()
        hdr.update(h[1].header)
        data = h[1].data.astype(np.float32)
    hdr["GAIN"] = 4.0
    hdr["SATURATE"] = float(np.nanmax(data)) - 1
    path = tmp_path / "img.fits"
    fits.PrimaryHDU(data, header=hdr).writeto(path)
    (ref,) = ingest_files(repo, [path], "generic")
    exp = repo.get("isr_exposure", ref.data_id).compute()
    assert exp.mask[np.unravel_index(np.nanargmax(data), data.shape)] & (1 << DEFAULT_PLANES["SAT"])
    assert np.all(exp.variance > 0)
    assert ref.data_id["band"] == hdr["BAND"]


def test_cli_ingest_and_errors(tmp_path, real_data):
    runner = CliRunner()
    repo_path = tmp_path / "r"
    files = [str(f) for f in _ooi_files(real_data) if f.name.startswith("c4d_")][:3]
    res = runner.invoke(main, ["repo", "create", str(repo_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["ingest", str(repo_path), *files, "--instrument", "decam-cp", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "ingested 3 dataset(s)" in res.output
    for args, pattern in [
        (["ingest", str(repo_path), files[0], "--instrument", "nope"], "unknown instrument"),
        (["ingest", str(tmp_path / "missing"), files[0], "--instrument", "decam-cp"], "repo"),
    ]:
        res = runner.invoke(main, args)
        assert res.exit_code != 0
        assert pattern in res.output.lower()
        assert "Traceback" not in res.output
    assert {"generic", "decam-cp", "90prime-cp", "mosaic3-cp"} <= set(instrument_names())


# ------------------------------------------------------------------ calibration frames
def test_calibration_kind_and_master_detection():
    from procsky.instruments.base import calibration_kind, is_master_calibration

    kinds = {
        "zero": "bias",
        "BIAS": "bias",
        "Dome Flat": "flat",
        "sky_flat": "flat",
        "twilight flat": "flat",
        "dark": "dark",
        "Master Bias": "bias",
        "object": None,
        "raw": None,
        "calexp": None,
    }
    for value, kind in kinds.items():
        assert calibration_kind(fits.Header([("IMAGETYP", value)])) == kind, value
    assert calibration_kind(fits.Header([("OBSTYPE", "zero")])) == "bias"
    assert calibration_kind(fits.Header()) is None
    assert is_master_calibration(fits.Header([("IMAGETYP", "zero"), ("NCOMBINE", 11)]))
    assert is_master_calibration(fits.Header([("IMAGETYP", "flat"), ("PRODTYPE", "MasterCal")]))
    assert not is_master_calibration(fits.Header([("IMAGETYP", "zero"), ("NCOMBINE", 1)]))


def _camera_frame(path, imagetyp, expnum, value, extra=(), ny=40, nx=50, nos=8, master=False):
    rng = np.random.default_rng(expnum)
    data = rng.normal(value, 2.0, (ny, nx + (0 if master else nos))).astype(np.float32)
    hdr = fits.Header(
        [
            ("IMAGETYP", imagetyp),
            ("GAIN", 2.0),
            ("RDNOISE", 4.0),
            ("EXPTIME", 0.0),
            ("CCDNUM", 3),
            ("MJD-OBS", 60000.0 + expnum / 1e4),
        ]
    )
    for key, v in extra:
        hdr[key] = v
    if master:
        hdr["NCOMBINE"] = 9
    else:
        hdr["EXPNUM"] = expnum
        hdr["DATASEC"] = f"[1:{nx},1:{ny}]"
        hdr["BIASSEC"] = f"[{nx + 1}:{nx + nos},1:{ny}]"
    fits.PrimaryHDU(data, header=hdr).writeto(path)
    return data


def test_generic_ingests_calibration_frames_without_wcs(repo, tmp_path):
    files = []
    for k in range(3):
        files.append(tmp_path / f"zero{k}.fits")
        _camera_frame(files[-1], "zero", 100 + k, 1000.0)
    files.append(tmp_path / "flat0.fits")
    flat_data = _camera_frame(files[-1], "DOME FLAT", 200, 15000.0, [("FILTER", "r DECam SDSS"), ("EXPTIME", 3.0)])
    files.append(tmp_path / "mbias.fits")
    _camera_frame(files[-1], "zero", 300, 2.0, master=True)
    refs = ingest_files(repo, files, "generic")
    got = {(r.dataset_type, r.data_id.get("visit")) for r in refs}
    assert got == {("bias_frame", 100), ("bias_frame", 101), ("bias_frame", 102), ("flat_frame", 200), ("bias", None)}
    flat_ref = next(r for r in refs if r.dataset_type == "flat_frame")
    assert flat_ref.data_id == {
        "instrument": "generic",
        "visit": 200,
        "detector": 3,
        "band": "r",
        "physical_filter": "r DECam SDSS",
    }
    exp = repo.get(flat_ref).compute()
    # the layout the ISR needs, and the exposure time that scales a dark
    assert exp.detector["biassec"] == "[51:58,1:40]" and exp.detector["datasec"] == "[1:50,1:40]"
    assert exp.visit_info.exposure_time == 3.0 and exp.detector["gain"] == 2.0
    assert np.array_equal(exp.image, flat_data)
    recs = {r["visit"]: r for r in repo.dimension_records("visit")}
    assert recs[100]["observation_type"] == "bias" and recs[200]["observation_type"] == "flat"
    assert recs[200]["band"] == "r"
    master = repo.get(next(r for r in refs if r.dataset_type == "bias")).compute()
    assert master.shape == (40, 50) and "biassec" not in master.detector


def test_simcam_calibration_frames_noise_and_ingest(repo, tmp_path):
    """Bias and flat exposures drawn by the simulator have the masters' pattern and the stated noise."""
    from procsky.instruments.simcam import SimcamGeometry
    from procsky.sim.recipe import load_recipe
    from procsky.sim.render import (
        bias_pattern,
        calib_exposure_id,
        flat_field,
        write_calib_frames,
    )

    data = load_recipe("tiny").model_dump(mode="json")
    data["raw"].update(n_bias_frames=3, n_dark_frames=1, n_flat_frames=2)
    recipe = load_recipe(data)
    names = write_calib_frames(recipe, 1, ["r"], tmp_path / "frames")
    assert names == [f"bias-e{calib_exposure_id('bias', k):06d}-d001.fits" for k in (1, 2, 3)] + [
        f"dark-e{calib_exposure_id('dark', 1):06d}-d001.fits"
    ] + [f"flat-e{calib_exposure_id('flat', k, 'r'):06d}-d001.fits" for k in (1, 2)]
    refs = ingest_files(repo, [tmp_path / "frames" / n for n in names], "simcam")
    assert [r.dataset_type for r in refs] == ["bias_frame"] * 3 + ["dark_frame"] + ["flat_frame"] * 2
    assert refs[0].data_id == {"instrument": "simcam", "visit": 900001, "detector": 1}
    assert refs[3].data_id == {"instrument": "simcam", "visit": 900501, "detector": 1}
    assert refs[4].data_id == {
        "instrument": "simcam",
        "visit": 903001,
        "detector": 1,
        "band": "r",
        "physical_filter": "simcam-r",
    }
    geom = SimcamGeometry(recipe.instrument, recipe.seed)
    g, rn, nx = recipe.instrument.gain, recipe.instrument.read_noise, geom.nx
    pattern = bias_pattern(recipe, geom, 1)
    b = repo.get(refs[0]).compute()
    img = np.asarray(b.image, dtype=np.float64)
    level = np.mean(img[:, nx:])  # the median of rounded values is an integer
    resid = img[:, :nx] - level - pattern
    assert abs(np.median(resid)) < 0.3
    # read noise plus ADC rounding
    assert np.std(resid) == pytest.approx(np.hypot(rn / g, 1 / np.sqrt(12)), rel=0.03)
    f = repo.get(refs[4]).compute()
    fimg = np.asarray(f.image, dtype=np.float64)[:, :nx] - np.mean(f.image[:, nx:]) - pattern
    response = flat_field(recipe, geom, 1, "r")
    ratio = fimg / response
    lamp = np.median(ratio) * g
    assert lamp == pytest.approx(recipe.raw.flat_level, rel=0.12)  # the lamp drifts by 3% rms
    # Poisson + read noise of a lamp exposure, cosmic rays and defects clipped away
    good = np.abs(ratio - np.median(ratio)) < 6 * np.sqrt(lamp) / g
    expect = np.sqrt(lamp * response + rn**2) / g / response
    assert np.std((ratio - np.median(ratio))[good]) == pytest.approx(np.median(expect), rel=0.05)
    assert f.visit_info.exposure_time == recipe.raw.flat_exposure_time
    # a dark exposure: hot pixels at their simulated rate (over the exposure time)
    from procsky.sim.render import detector_defects

    d = repo.get(refs[3]).compute()
    t = d.visit_info.exposure_time
    assert t == recipe.raw.dark_exposure_time
    dimg = np.asarray(d.image, dtype=np.float64)[:, :nx] - np.mean(d.image[:, nx:]) - pattern
    hot = detector_defects(recipe, geom, 1).query("kind == 'hot_pixel'")
    rate = dimg[hot.y0.to_numpy(), hot.x.to_numpy()] * g / t
    assert np.median(rate / hot.value.to_numpy()) == pytest.approx(1.0, abs=0.05)
