"""Tests of the survey simulator (procsky.sim) on the ``tiny`` recipe."""

from __future__ import annotations

import filecmp
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

galsim = pytest.importorskip("galsim")

from procsky.errors import ProcskyValueError  # noqa: E402
from procsky.exposure import Exposure  # noqa: E402
from procsky.sim import load_recipe, recipe_names, simulate  # noqa: E402
from procsky.sim.recipe import validate_recipe  # noqa: E402
from procsky.sim.truth import SimTruth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The whole tiny survey, calibrated mode, on 2 worker processes."""
    out = tmp_path_factory.mktemp("sim") / "tiny"
    load0 = os.getloadavg()[0]
    res = simulate("tiny", out, scheduler="processes", workers=2, progress=False)
    # other jobs on a shared machine slow us down: remember how busy the CPUs were
    res.busy = max(1.0, 0.5 * (load0 + os.getloadavg()[0]) / (os.cpu_count() or 1))
    return res


def _all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- recipes
def test_recipes_load_and_match_datasets_copies():
    assert {"tiny", "small", "medium"} <= set(recipe_names())
    for name in ("tiny", "small", "medium"):
        r = load_recipe(name)
        assert r.name == name and r.bands
        packaged = ROOT / "procsky" / "sim" / "recipes" / f"{name}.yaml"
        project = ROOT / "datasets" / f"{name}.yaml"
        if project.exists():
            assert packaged.read_text() == project.read_text(), f"datasets/{name}.yaml differs from the packaged copy"
    tiny = load_recipe("tiny")
    assert (tiny.instrument.n_detectors_x, tiny.instrument.n_detectors_y) == (2, 2)
    assert len(tiny.band_names) == 2 and 4 <= tiny.n_visits <= 6
    small = load_recipe("small")
    assert small.instrument.detector_nx == 2048 and small.n_detectors == 9 and len(small.bands) == 3
    # recipes travel to dask workers
    assert pickle.loads(pickle.dumps(tiny)) == tiny


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d.update(colour="blue"), "colour"),
        (lambda d: d["instrument"].update(pixel_scal=0.3), "instrument.pixel_scal"),
        (lambda d: d["bands"][0].update(exposure_time=-5), "bands.0.exposure_time"),
        (lambda d: d.update(bands=[]), "bands"),
    ],
)
def test_bad_recipes_name_the_key(change, key):
    data = load_recipe("tiny").model_dump(mode="json")
    change(data)
    with pytest.raises(ProcskyValueError) as err:
        validate_recipe(data, "test.yaml")
    assert key in str(err.value)


def test_bad_recipe_file_through_cli(tmp_path):
    from click.testing import CliRunner

    from procsky.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nseed: 1\nbands:\n  - {name: r, exposure_time: -30, n_visits: 2, depth: 24}\n")
    result = CliRunner().invoke(main, ["sim", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "bands.0.exposure_time" in result.output and "must be > 0" in result.output
    result = CliRunner().invoke(main, ["sim", "no-such-recipe", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "tiny" in result.output


def test_cli_sim_subset(tiny, tmp_path):
    from click.testing import CliRunner

    from procsky.cli import main

    out = tmp_path / "cli"
    res = CliRunner().invoke(
        main,
        [
            "sim",
            "tiny",
            "--out",
            str(out),
            "--visits",
            "3",
            "--detectors",
            "0-1",
            "--scheduler",
            "sync",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 calexp images" in res.output
    for name in ("calexp-v000003-d000.fits", "calexp-v000003-d001.fits"):
        assert filecmp.cmp(out / "images" / name, tiny.out / "images" / name, shallow=False)


# -------------------------------------------------------------------------- generation
def test_tiny_layout_and_speed(tiny):
    out = tiny.out
    r = tiny.recipe
    # "tiny generates in under a minute on 2 cores": scaled by the machine's load when shared
    assert tiny.seconds < 60.0 * tiny.busy, f"tiny took {tiny.seconds:.1f} s on 2 workers (load factor {tiny.busy:.1f})"
    assert len(tiny.images) == r.n_visits * r.n_detectors
    for name in ("objects", "exposures", "lightcurves", "visits", "detectors", "cosmic_rays", "defects"):
        assert (out / "truth" / f"{name}.parquet").is_file()
    assert (out / "refcat" / "refcat.parquet").is_file()
    assert load_recipe(out / "recipe.yaml") == r

    t = SimTruth(out)
    objects = t.objects
    assert set(objects["kind"]) == {"star", "galaxy", "variable", "transient"}
    for c in ["object_id", "kind", "ra", "dec"] + [f"flux_{b}" for b in r.band_names]:
        assert c in objects.columns
    assert objects["object_id"].is_unique
    for c in ("object_id", "visit", "detector", "band", "x", "y", "flux", "counts"):
        assert c in t.exposures.columns
    for c in ("object_id", "visit", "mjd", "band", "flux"):
        assert c in t.lightcurves.columns
    ref = t.refcat
    for c in (
        ["ref_id", "ra", "dec", "ra_err", "dec_err"]
        + [f"mag_{b}" for b in r.band_names]
        + [f"mag_{b}_err" for b in r.band_names]
    ):
        assert c in ref.columns
    assert len(ref) > 10 and (ref["ra_err"] > 0).all()
    # refcat magnitudes scatter about the truth by their errors
    m = ref.merge(objects, on="object_id", suffixes=("", "_true"))
    pull = (m["mag_r"] - (31.4 - 2.5 * np.log10(m["flux_r"]))) / m["mag_r_err"]
    assert 0.6 < pull.std() < 1.5

    # transients are absent before they explode and vary; variables keep their mean
    lc = t.lightcurves.merge(objects[["object_id", "kind"]], on="object_id")
    assert lc.groupby("object_id")["flux"].std().min() > 0
    # header keywords and the MAGZERO convention
    exp = Exposure.read(tiny.images[0])
    from astropy.io import fits

    h = fits.getheader(tiny.images[0], 0)
    for k in ("MAGZERO", "GAIN", "RDNOISE", "SATURATE", "IMAGETYP", "DETECTOR", "EXPTIME", "MJD-OBS", "BAND"):
        assert k in h, k
    row = t.exposures.iloc[0]
    zp = t.detectors.query(f"visit == {row.visit} and detector == {row.detector}")["magzero"].iloc[0]
    assert row["counts"] == pytest.approx(row["flux"] * 10 ** (0.4 * (zp - 31.4)))
    assert exp.wcs is not None and exp.wcs.sip is not None


def test_truth_positions_follow_the_distorted_wcs(tiny):
    """Truth x, y are the file's TAN-SIP WCS applied to the true ra, dec; SIP moves pixels."""
    t = SimTruth(tiny.out)
    for path in tiny.images[:4]:
        exp = Exposure.read(path)
        h = exp.visit_info
        det = exp.detector["id"]
        rows = t.exposures.query(f"visit == {h.visit} and detector == {det}").merge(
            t.objects[["object_id", "ra", "dec"]]
        )
        x, y = exp.wcs.all_world2pix(rows["ra"], rows["dec"], 0)
        assert np.allclose(x, rows["x"], atol=1e-4) and np.allclose(y, rows["y"], atol=1e-4)
        # the distortion is real: pure TAN (no SIP) differs by up to a few pixels
        lin = exp.wcs.deepcopy()
        lin.sip = None
        xl, yl = lin.wcs_world2pix(rows["ra"], rows["dec"], 0)
        shift = np.hypot(xl - x, yl - y).max()
        assert 0.05 < shift < 10.0


def test_determinism(tiny, tmp_path):
    """Same recipe and seed: bit-identical files; another seed: different pixels."""
    again = simulate("tiny", tmp_path / "again", scheduler="processes", workers=2, progress=False)
    files = _all_files(tiny.out)
    assert files == _all_files(again.out)
    match, mismatch, errors = filecmp.cmpfiles(tiny.out, again.out, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, f"files differ between identical runs: {mismatch + errors}"

    # one image drawn alone, on threads, equals the same image drawn in the full run
    sub = simulate("tiny", tmp_path / "sub", scheduler="threads", workers=2, visits=[2], detectors=[1], progress=False)
    assert filecmp.cmp(sub.images[0], tiny.out / "images" / sub.images[0].name, shallow=False)

    other = simulate("tiny", tmp_path / "other", seed=43, scheduler="sync", visits=[2], detectors=[1], progress=False)
    a = Exposure.read(other.images[0]).image
    b = Exposure.read(tiny.out / "images" / other.images[0].name).image
    assert not np.array_equal(a, b)


def _isolated_bright_stars(t: SimTruth, row, image, variance, mask, crs):
    """Truth stars of one image that are bright, unsaturated, unblended and clean."""
    ny, nx = image.shape
    exp = t.exposures.query(f"visit == {row.visit} and detector == {row.detector}").merge(
        t.objects[["object_id", "kind", "hlr_disk"]], on="object_id"
    )
    fwhm = row.psf_fwhm_px
    radius = 5.0 * fwhm
    yy, xx = np.mgrid[0:ny, 0:nx]
    sat_peak = row.saturation * 2 * math.pi * row.psf_sigma_px**2 * 0.7
    cr = np.zeros((ny, nx), bool)
    cr[crs["y"], crs["x"]] = True
    out = []
    for o in exp[exp["kind"] == "star"].itertuples():
        if not (radius + 3 < o.x < nx - radius - 3 and radius + 3 < o.y < ny - radius - 3):
            continue
        if not 5e4 < o.counts < sat_peak:
            continue
        ap = np.hypot(xx - o.x, yy - o.y) < radius
        sigma = float(np.sqrt(variance[ap].sum()))
        others = exp[exp["object_id"] != o.object_id]
        reach = radius + 3 * fwhm + 5 * np.nan_to_num(others["hlr_disk"].to_numpy()) / 0.2
        d = np.hypot(others["x"] - o.x, others["y"] - o.y).to_numpy()
        if ((d < reach) & (others["counts"].to_numpy() > 0.3 * sigma)).any():
            continue
        if mask[ap].any() or cr[ap].any():
            continue
        out.append((o, ap, sigma))
    return out


def test_truth_matches_pixels(tiny):
    """Bright isolated stars: aperture flux = truth within 3 sigma; centroid = truth within 0.02 px."""
    t = SimTruth(tiny.out)
    pulls, offsets = [], []
    for row in t.detectors.itertuples():
        exp = Exposure.read(tiny.out / row.file)
        ny, nx = exp.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        sub = exp.image.astype(np.float64) - t.sky(row.visit, row.detector, xx, yy)
        crs = t.cosmic_rays.query(f"visit == {row.visit} and detector == {row.detector}")
        for o, ap, sigma in _isolated_bright_stars(t, row, exp.image, exp.variance, exp.mask, crs):
            pulls.append((sub[ap].sum() - o.counts) / sigma)
            # expected centroid noise: source-limited sigma/sqrt(N_e) plus sky-limited
            # sqrt(8 pi) sigma^2 sigma_sky / F, times 1.5 for adaptive (not optimal) weights
            s2 = row.psf_sigma_px**2
            noise = 1.5 * math.sqrt(
                s2 / (o.counts * row.gain) + 8 * math.pi * s2 * s2 * np.median(exp.variance[ap]) / o.counts**2
            )
            if noise > 0.02 / 3:
                continue
            h = int(5 * row.psf_fwhm_px)
            x0, y0 = int(round(o.x)), int(round(o.y))
            cut = galsim.ImageD(sub[y0 - h : y0 + h + 1, x0 - h : x0 + h + 1], xmin=x0 - h, ymin=y0 - h)
            mom = galsim.hsm.FindAdaptiveMom(cut, strict=False)
            assert mom.moments_status == 0
            offsets.append((mom.moments_centroid.x - o.x, mom.moments_centroid.y - o.y))
    pulls = np.array(pulls)
    offsets = np.array(offsets)
    assert len(pulls) >= 5, "tiny should have several bright isolated stars"
    assert np.all(np.abs(pulls) < 3.0), pulls
    assert abs(np.median(pulls)) < 1.0
    assert len(offsets) >= 2, "tiny should have a few stars bright enough for a 0.02 px centroid test"
    assert np.all(np.abs(offsets) < 0.02), offsets


def test_noise_matches_variance(tiny):
    """Empty-sky pixels scatter about the true sky with the variance plane's variance (2%)."""
    from procsky.sim.render import render_detector
    from procsky.sim.scene import build_scene
    from procsky.sim.survey import select_objects

    r = tiny.recipe
    scene = build_scene(r)
    t = SimTruth(tiny.out)
    ratios = []
    for visit, det in ((1, 0), (4, 3)):
        vrow = scene.visits.set_index("visit", drop=False).loc[visit]
        img = render_detector(r, vrow.to_dict(), det, select_objects(scene, vrow, det), keep_expected=True)
        exp = Exposure.read(tiny.out / "images" / f"calexp-v{visit:06d}-d{det:03d}.fits")
        # the file holds exactly what the renderer draws (no hidden state between tasks)
        assert np.array_equal(exp.image, img.calibrated)
        ny, nx = exp.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        sky = t.sky(visit, det, xx, yy)
        gain = r.instrument.gain
        crs = t.cosmic_rays.query(f"visit == {visit} and detector == {det}")
        cr = np.zeros((ny, nx), bool)
        cr[crs["y"], crs["x"]] = True
        from scipy.ndimage import binary_dilation

        cr = binary_dilation(cr, iterations=1)
        empty = (img.expected / gain - sky < 0.01 * np.sqrt(sky / gain)) & (exp.mask == 0) & ~cr
        assert empty.mean() > 0.3
        resid = (exp.image - sky)[empty]
        ratios.append(resid.var() / exp.variance[empty].mean())
        assert abs(resid.mean()) < 0.02 * math.sqrt(exp.variance[empty].mean())
    assert np.allclose(ratios, 1.0, atol=0.02), ratios


def test_raw_mode_calibrates_back(tiny, tmp_path):
    """(raw - overscan - bias - dark * t) / flat reproduces the calibrated twin within noise."""
    raw = simulate("tiny", tmp_path / "raw", mode="raw", scheduler="sync", visits=[1, 4], detectors=[2], progress=False)
    calibs = {p.name for p in raw.calibs}
    assert calibs == {"bias-d002.fits", "dark-d002.fits", "flat-g-d002.fits", "flat-r-d002.fits"}
    from astropy.io import fits

    nx = tiny.recipe.instrument.detector_nx
    for path in raw.images:
        h = fits.getheader(path, 0)
        assert h["IMAGETYP"] == "raw" and h["BIASSEC"] == f"[{nx + 1}:{nx + tiny.recipe.raw.overscan_columns},1:512]"
        r = Exposure.read(path).image.astype(np.float64)
        band = h["BAND"]
        bias = Exposure.read(tmp_path / "raw" / "calibs" / "bias-d002.fits").image
        dark = Exposure.read(tmp_path / "raw" / "calibs" / "dark-d002.fits").image
        flat = Exposure.read(tmp_path / "raw" / "calibs" / f"flat-{band}-d002.fits").image
        overscan = r[:, nx:].mean()
        isr = (r[:, :nx] - overscan - bias - dark * h["EXPTIME"]) / flat
        cal = Exposure.read(tiny.out / "images" / path.name.replace("raw-", "calexp-"))
        good = cal.mask == 0
        pull = ((isr - cal.image) / np.sqrt(cal.variance))[good]
        assert abs(pull.mean()) < 0.05
        assert pull.std() < 0.2  # ADC rounding and master-bias noise only
        # and the signature was really there
        assert np.abs(r[:, :nx] - cal.image)[good].mean() > 100


def test_artefacts_present(tiny):
    t = SimTruth(tiny.out)
    det = t.detectors
    assert (det["n_saturated"] > 0).any(), "tiny should contain saturated stars"
    assert len(t.cosmic_rays) > 0 and len(t.defects) > 0
    # saturated pixels are masked SAT and bleed along columns
    row = det.sort_values("n_saturated").iloc[-1]
    exp = Exposure.read(tiny.out / row["file"])
    sat = (exp.mask & (1 << 1)) != 0
    ys, xs = np.nonzero(sat)
    assert np.ptp(ys) > np.ptp(xs)
    # bad columns and hot pixels are masked BAD; cosmic rays are not masked
    d = t.defects.query(f"detector == {row['detector']}")
    bad = (exp.mask & 1) != 0
    assert all(bad[r.y0, r.x] for r in d.itertuples())
    cr = t.cosmic_rays.query(f"visit == {row['visit']} and detector == {row['detector']}")
    assert not ((exp.mask[cr["y"], cr["x"]] & (1 << 3)) != 0).any()
    # the PSF varies across the focal plane
    assert det.groupby("visit")["psf_e1"].std().max() > 1e-3
    assert det["psf_fwhm"].between(0.4, 2.0).all()


def test_truth_psf_matches_star_image(tiny):
    """The truth PSF model reproduces a bright star's image (shape residual < 5% of peak)."""
    t = SimTruth(tiny.out)
    for row in t.detectors.itertuples():
        exp = Exposure.read(tiny.out / row.file)
        ny, nx = exp.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        crs = t.cosmic_rays.query(f"visit == {row.visit} and detector == {row.detector}")
        stars = _isolated_bright_stars(t, row, exp.image, exp.variance, exp.mask, crs)
        if not stars:
            continue
        o = stars[0][0]
        x0, y0 = int(round(o.x)), int(round(o.y))
        h = 10
        cut = exp.image[y0 - h : y0 + h + 1, x0 - h : x0 + h + 1] - t.sky(row.visit, row.detector, x0, y0)
        from procsky.instruments.simcam import SimcamGeometry, focal_plane_position
        from procsky.sim.psf import truth_psf_image

        g = SimcamGeometry(tiny.recipe.instrument, tiny.recipe.seed)
        fx, fy = focal_plane_position(g, row.detector, o.x, o.y)
        model = (
            truth_psf_image(t.psf_params(row.visit), float(fx), float(fy), size=2 * h + 1, offset=(o.x - x0, o.y - y0))
            * o.counts
        )
        resid = np.abs(cut - model).max() / model.max()
        assert resid < 0.05
        return
    pytest.fail("no isolated bright star found")


def test_ingest_items(tiny, tmp_path):
    from procsky.instruments.simcam import SimcamInstrument

    inst = SimcamInstrument()
    items = inst.ingest_file(tiny.images[0])
    assert len(items) == 1
    it = items[0]
    assert it.dataset_type == "isr_exposure"
    assert set(it.data_id) == {"instrument", "visit", "detector", "band", "physical_filter"}
    assert it.data_id["physical_filter"] == f"simcam-{it.data_id['band']}"
    assert it.records["visit"][0]["visit"] == it.data_id["visit"]
    assert it.records["detector"][0]["name"].startswith("R")
    raw = simulate("tiny", tmp_path / "raw", mode="raw", scheduler="sync", visits=[1], detectors=[0], progress=False)
    assert inst.ingest_file(raw.images[0])[0].dataset_type == "raw"
    kinds = {inst.ingest_file(p)[0].dataset_type for p in raw.calibs}
    assert kinds == {"bias", "dark", "flat"}
    flat = [inst.ingest_file(p)[0] for p in raw.calibs if p.name.startswith("flat-g")][0]
    assert flat.data_id == {"instrument": "simcam", "detector": 0, "band": "g", "physical_filter": "simcam-g"}
    from procsky.errors import ProcskyFileError

    with pytest.raises(ProcskyFileError):
        inst.ingest_file(tiny.out / "recipe.yaml")


def test_procsky_ingest_simcam(tiny, tmp_path):
    """`procsky ingest REPO DIR/images/*.fits --instrument simcam` registers isr_exposures."""
    from click.testing import CliRunner

    from procsky.cli import main

    runner = CliRunner()
    repo = tmp_path / "repo"
    res = runner.invoke(main, ["repo", "create", str(repo)])
    assert res.exit_code == 0, res.output
    files = [str(p) for p in tiny.images[:4]]
    res = runner.invoke(main, ["ingest", str(repo), *files, "--instrument", "simcam", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["query", str(repo), "isr_exposure"])
    assert res.exit_code == 0 and "physical_filter=simcam-" in res.output


def test_satellite_trail_is_drawn():
    """With satellite_probability 1 every visit has a trail: a straight bright line."""
    from procsky.sim.recipe import Recipe
    from procsky.sim.render import render_detector
    from procsky.sim.scene import build_scene
    from procsky.sim.survey import select_objects

    data = load_recipe("tiny").model_dump(mode="json")
    data["artifacts"]["satellite_probability"] = 1.0
    data["stars"]["density"] = 0.0
    data["galaxies"]["density"] = 0.0
    data["variables"]["number"] = 0
    data["transients"]["number"] = 0
    r = Recipe.model_validate(data)
    scene = build_scene(r)
    v = scene.visits.iloc[0]
    assert v["satellite"]
    hits = 0
    for det in range(r.n_detectors):
        img = render_detector(r, v.to_dict(), det, select_objects(scene, v, det), keep_expected=True)
        if not img.summary["satellite"]:
            continue
        hits += 1
        s = img.summary
        ny, nx = img.expected.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        sky = s["sky_level"] + s["sky_grad_x"] * (xx - (nx - 1) / 2) + s["sky_grad_y"] * (yy - (ny - 1) / 2)
        excess = img.expected - sky * r.instrument.gain
        ys, xs = np.nonzero(excess > 0.5 * excess.max())
        # the brightest pixels lie on one straight line (a thin trail)
        coef = np.polyfit(xs, ys, 1) if np.ptp(xs) >= np.ptp(ys) else np.polyfit(ys, xs, 1)
        resid = (ys - np.polyval(coef, xs)) if np.ptp(xs) >= np.ptp(ys) else (xs - np.polyval(coef, ys))
        assert np.abs(resid).max() < 5 * v["sat_sigma_px"] + 2
        assert excess.max() == pytest.approx(v["sat_peak_e"], rel=0.02)
        assert np.abs(excess).min() < 1e-6 * excess.max()  # no trail far from the line
        # SimTruth gives the same line in detector pixels
        from procsky.sim.truth import _line_in_pixels

        x0, y0, ang, sig, peak = _line_in_pixels(r, v, det)
        d = -(xs - x0) * np.sin(ang) + (ys - y0) * np.cos(ang)
        assert np.abs(d).max() < 1.5 * sig
    assert hits >= 1
