"""calibrate: single-frame calibration against the simulator's truth, errors, pipeline wiring.

Fast tests use one detector of the ``tiny`` simulation (drawn once per module, a few
seconds). ``-m slow`` adds the ``small`` recipe (2048 x 2048 detector: enough stars for
the accuracy targets) and the raw -> ISR -> calibrate twin comparison.
"""

from __future__ import annotations

import functools
import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from procsky import masks
from procsky.errors import NoWorkError
from procsky.exposure import Exposure
from procsky.psf import SIGMA_TO_FWHM

galsim = pytest.importorskip("galsim")
sim = pytest.importorskip("procsky.sim")

from procsky.refcat import read_refcat_file  # noqa: E402
from procsky.sim.truth import SimTruth  # noqa: E402
from procsky.tasks.calibrate import CalibrateTask, calibrate_exposure  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared/data/real/legacysurvey"
# truth S/N of the bright isolated stars on which astrometry is judged (see ``_metrics``)
ASTRO_SNR_MIN = 100.0


def _draw(root: Path, recipe: str, mode: str, detectors, visits=(1,)):
    out = root / f"{recipe}_{mode}"
    sim.simulate(
        recipe, out, mode=mode, scheduler="sync", visits=list(visits), detectors=list(detectors), progress=False
    )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _draw(tmp_path_factory.mktemp("sim"), "tiny", "calibrated", [0])


def _true_wcs(tr):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(tr.wcs_header, sep="\n"))


@functools.lru_cache(maxsize=8)
def _sim_truth(d: Path, mtime_ns: int) -> SimTruth:
    return SimTruth(d)


def _truth_table(d: Path, name: str) -> pd.DataFrame:
    """A truth table of the simulation in ``d``, read once per version of its truth folder (the
    metric helpers of every detector of a visit read the same tables); callers filter, never
    modify it."""
    d = Path(d)
    return getattr(_sim_truth(d, (d / "truth").stat().st_mtime_ns), name)


def _truth(d: Path, visit: int, det: int):
    dets = _truth_table(d, "detectors")
    tr = dets[(dets.visit == visit) & (dets.detector == det)].iloc[0]
    ex = _truth_table(d, "exposures")
    ex = ex[(ex.visit == visit) & (ex.detector == det)].copy()
    obj = _truth_table(d, "objects").set_index("object_id")
    ex = ex.join(obj[["kind", "ra", "dec", "hlr_disk", "hlr_bulge"]], on="object_id")
    var_sky = tr.sky_level / tr.gain + (tr.read_noise / tr.gain) ** 2
    # optimal (matched-filter) S/N of the object as drawn: a Gaussian of the PSF sigma for
    # stars, of the PSF and the galaxy's half-light radius in quadrature for galaxies (an
    # extended galaxy spreads its counts over more sky noise than a star of equal flux)
    scale = 3600.0 * np.sqrt(abs(np.linalg.det(_true_wcs(tr).pixel_scale_matrix)))
    rhalf = np.fmax(ex.hlr_disk.fillna(0).to_numpy(), ex.hlr_bulge.fillna(0).to_numpy()) / scale
    ex["r_half_px"] = np.where(ex.kind.to_numpy() == "galaxy", rhalf, 0.0)
    sig2 = tr.psf_sigma_px**2 + (ex.r_half_px.to_numpy() / 1.1774) ** 2
    ex["snr"] = ex.counts / np.sqrt(4 * np.pi * sig2 * var_sky + ex.counts / tr.gain)
    crs = _truth_table(d, "cosmic_rays")
    crs = crs[(crs.visit == visit) & (crs.detector == det)]
    return tr, ex, crs, var_sky


def _spurious(d: Path, visit: int, det: int, tr, src, shape, margin: float = 15.0) -> np.ndarray:
    """Which detections are spurious: not assigned to any truth object.

    Definition (documented in issue 5's closing note):

    * truth objects of ANY brightness count (a detection of a real object below the S/N cut
      is not spurious), including objects up to ``margin`` px beyond the detector edge
      (their light spills onto it; positions from the simulator's true WCS), placed at their
      nearest on-detector point (a source cut by the edge is measured inside it);
    * a detection matches a truth object within ``max(4 px, 2 r_half)`` of it (``r_half``:
      the larger of the galaxy's disk and bulge half-light radii, 0 for stars) - the
      centroid of a faint extended galaxy legitimately wanders within its half-light
      radius;
    * matching is one-to-one, closest pairs first: a second detection of the same truth
      object (a shredded galaxy or star, a deblending artefact) is spurious, and so are
      cosmic-ray residuals, trail fragments and noise peaks with no object nearby.
    """
    from scipy.spatial import cKDTree

    obj = _truth_table(d, "objects")
    w = _true_wcs(tr)
    ox, oy = w.all_world2pix(obj.ra.to_numpy(), obj.dec.to_numpy(), 0)
    ny, nx = shape
    near = (ox > -margin) & (ox < nx + margin) & (oy > -margin) & (oy < ny + margin)
    ox, oy, obj = ox[near], oy[near], obj[near]
    # an object beyond the edge is seen, truncated, at its nearest on-detector point
    ox, oy = np.clip(ox, 0.0, nx - 1.0), np.clip(oy, 0.0, ny - 1.0)
    # on-detector objects: the exact truth positions of this exposure
    ex = _truth_table(d, "exposures")
    ex = ex[(ex.visit == visit) & (ex.detector == det)].set_index("object_id")
    on = obj.object_id.isin(ex.index).to_numpy()
    ox[on] = ex.loc[obj.object_id[on], "x"].to_numpy()
    oy[on] = ex.loc[obj.object_id[on], "y"].to_numpy()
    scale = 3600.0 * np.sqrt(abs(np.linalg.det(w.pixel_scale_matrix)))  # arcsec / pixel
    rhalf = np.fmax(obj.hlr_disk.fillna(0).to_numpy(), obj.hlr_bulge.fillna(0).to_numpy()) / scale
    radius = np.maximum(4.0, 2.0 * np.where(obj.kind.to_numpy() == "galaxy", rhalf, 0.0))
    sx, sy = src.x.to_numpy(), src.y.to_numpy()
    pairs = cKDTree(np.c_[sx, sy]).query_ball_tree(cKDTree(np.c_[ox, oy]), float(radius.max()))
    cand = [(float(np.hypot(sx[i] - ox[j], sy[i] - oy[j])), i, j) for i, js in enumerate(pairs) for j in js]
    cand = sorted(c for c in cand if c[0] <= radius[c[2]])
    used_src = np.zeros(len(src), bool)
    used_obj = np.zeros(len(ox), bool)
    for _, i, j in cand:
        if not used_src[i] and not used_obj[j]:
            used_src[i] = used_obj[j] = True
    return ~used_src


def _metrics(d: Path, visit: int, det: int, calexp, src):
    """Compare a calibrated detector with the simulator's truth."""
    from scipy.spatial import cKDTree

    tr, ex, crs, var_sky = _truth(d, visit, det)
    tree = cKDTree(np.c_[src.x, src.y])
    stars = ex.kind.to_numpy() == "star"
    # stars within 2 px, galaxies (centroid of an extended profile) within max(4 px, 2 r_half)
    radius = np.where(stars, 2.0, np.maximum(4.0, 2.0 * ex.r_half_px.to_numpy()))
    dist, j = tree.query(np.c_[ex.x, ex.y])
    found = dist <= radius
    m = {}
    sel = (ex.snr >= 10).to_numpy()
    m["completeness_stars"] = float(found[sel & stars].mean())
    m["completeness_all"] = float(found[sel].mean())
    ttree = cKDTree(np.c_[ex.x, ex.y])
    spurious = _spurious(d, visit, det, tr, src, calexp.shape)
    m["spurious_fraction"] = float(spurious.mean()) if len(src) else 0.0
    m["n_spurious"] = int(spurious.sum())
    m["n_src"] = int(len(src))
    # bright isolated stars
    nb = np.array([len(v) for v in ttree.query_ball_point(np.c_[ex.x, ex.y], 12.0)])
    bright = found & stars & (ex.snr > 50).to_numpy() & (nb == 1)
    s = src.iloc[j[bright]]
    clean = ~(s.flag_saturated | s.flag_edge | s.flag_cr | s.flag_bad | s.flag_interpolated).to_numpy()
    s = s[clean]
    t = ex[bright][clean]
    m["n_bright"] = int(len(s))
    ratio = s.psf_flux.to_numpy() / t.flux.to_numpy()
    m["psf_flux_bias"] = float(np.median(ratio - 1))
    mid = (t.snr > 50).to_numpy() & (t.snr < 500).to_numpy()
    pulls = (s.psf_flux.to_numpy() - t.flux.to_numpy()) / s.psf_flux_err.to_numpy()
    m["pull_std_snr50_500"] = float(np.std(pulls[mid])) if mid.sum() > 3 else float("nan")
    m["pulls_snr50_500"] = pulls[mid]
    m["flux_ratios"] = ratio
    dra = (s.ra.to_numpy() - t.ra.to_numpy()) * np.cos(np.radians(t.dec.to_numpy())) * 3.6e6
    ddec = (s.dec.to_numpy() - t.dec.to_numpy()) * 3.6e6
    # Astrometry is judged on the stars whose own centroid noise is well below the 10 mas
    # target: truth S/N >= ASTRO_SNR_MIN. At S/N 50 the photon noise of any unbiased centroid is
    # 10-18 mas per axis for the seeing of `small` (the windowed centroid is within 1.5 % of the
    # Cramer-Rao bound: benchmarks/centroid_noise_floor.py), so a per-detector scatter of 8-16
    # such stars measures the noise, not the pipeline. All S/N 50-500 stars are checked through
    # their pulls instead (offset / reported error, ``astro_pulls``), and their scatter in excess
    # of the reported errors is printed for the record (``astro_excess_snr50_mas``).
    wtrue = _true_wcs(tr)
    scale_mas = 3.6e6 * np.sqrt(abs(np.linalg.det(wtrue.pixel_scale_matrix)))
    err = scale_mas * np.sqrt(0.5 * (s.x_err.to_numpy() ** 2 + s.y_err.to_numpy() ** 2))
    ok = np.isfinite(err) & ~s.centroid_flag.to_numpy()
    snr = t.snr.to_numpy()
    a = ok & (snr >= ASTRO_SNR_MIN)
    m["n_astro"] = int(a.sum())

    def scatter(sel):  # rms per axis about the mean, unbiased (ddof=1): 3-20 stars per detector
        if sel.sum() <= 1:
            return float("nan")
        return float(np.sqrt(0.5 * (np.var(dra[sel], ddof=1) + np.var(ddec[sel], ddof=1))))

    m["astro_median_mas"] = float(np.hypot(np.median(dra[a]), np.median(ddec[a]))) if a.any() else float("nan")
    m["astro_scatter_mas"] = scatter(a)
    m["astro_scatter_snr50_mas"] = scatter(ok)
    m["astro_excess_snr50_mas"] = (
        float(np.sqrt(max(0.0, m["astro_scatter_snr50_mas"] ** 2 - np.mean(err[ok] ** 2))))
        if ok.sum() > 1
        else float("nan")
    )
    pm = ok & mid
    m["astro_pulls_snr50_500"] = np.r_[dra[pm] / err[pm], ddec[pm] / err[pm]]
    # per star, for the S/N-binned table of benchmarks/eval_calibrate_small.py: the offset on the
    # sky (centroid and fitted WCS) and the centroid's offset from the truth position mapped to
    # pixels by the true WCS (centroid alone), both in mas
    tx, ty = wtrue.all_world2pix(t.ra.to_numpy(), t.dec.to_numpy(), 0)
    m["astro_stars"] = pd.DataFrame(
        {
            "snr": snr,
            "dra_mas": dra,
            "ddec_mas": ddec,
            "err_mas": err,
            "dx_mas": scale_mas * (s.x.to_numpy() - tx),
            "dy_mas": scale_mas * (s.y.to_numpy() - ty),
            "ra_err_mas": 3.6e6 * s.ra_err.to_numpy(),
            "dec_err_mas": 3.6e6 * s.dec_err.to_numpy(),
        }
    )[ok]
    big = crs[crs.counts > 5 * np.sqrt(var_sky)]
    crm = (np.asarray(calexp.mask) & masks.bit("CR")) != 0
    m["cr_recovered"] = float(crm[big.y, big.x].mean()) if len(big) else 1.0
    core = ex[stars & (ex.snr > 20).to_numpy()]
    iy = np.clip(np.round(core.y).astype(int), 0, crm.shape[0] - 1)
    ix = np.clip(np.round(core.x).astype(int), 0, crm.shape[1] - 1)
    # a core pixel flagged CR is a false flag unless a simulated hit fell on it or next to it
    hit = np.zeros(crm.shape, bool)
    hit[crs.y.to_numpy(), crs.x.to_numpy()] = True
    hit = ndimage.binary_dilation(hit, np.ones((3, 3), bool))
    m["star_cores_flagged_cr"] = int((crm[iy, ix] & ~hit[iy, ix]).sum())
    m["star_cores_hit_flagged_cr"] = int((crm[iy, ix] & hit[iy, ix]).sum())
    m["true_gauss_fwhm_px"] = float(SIGMA_TO_FWHM * tr.psf_sigma_px)
    # the half-maximum FWHM of the pixel-convolved PSF, what psf_fwhm_px reports (issue 19)
    m["true_fwhm_px"] = float(tr.psf_fwhm_pixel_px)
    m["true_magzero"] = float(tr.magzero)
    m["true_sky"] = float(tr.sky_level)
    return m


def test_calibrate_tiny_against_truth(tiny):
    exp = Exposure.read(tiny / "images/calexp-v000001-d000.fits")
    ref = read_refcat_file(tiny / "refcat/refcat.parquet")
    calexp, src, summary = calibrate_exposure(exp, [ref])
    m = _metrics(tiny, 1, 0, calexp, src)
    # tiny has ~6 reference stars and ~6 PSF stars per detector: targets loosened accordingly;
    # the design targets are checked on `small` (slow test below)
    assert summary["zero_point"] == pytest.approx(m["true_magzero"], abs=0.005)
    assert summary["psf_fwhm_px"] == pytest.approx(m["true_fwhm_px"], rel=0.015)
    assert summary["sky_level"] == pytest.approx(m["true_sky"], rel=0.01)
    assert m["astro_median_mas"] < 5.0 and m["astro_scatter_mas"] < 10.0
    assert abs(m["psf_flux_bias"]) < 0.01
    assert m["completeness_stars"] >= 0.95 and m["completeness_all"] >= 0.9
    assert m["cr_recovered"] >= 0.9 and m["star_cores_flagged_cr"] == 0
    # products
    assert summary["photometry_status"].startswith("fitted") and summary["astrometry_status"].startswith("fitted")
    assert calexp.psf is not None and calexp.wcs is not None and calexp.wcs.sip is not None
    assert calexp.photocalib.zero_point == pytest.approx(summary["zero_point"])
    assert (np.asarray(calexp.mask) & masks.bit("DETECTED")).any()
    assert abs(float(np.median(calexp.image))) < 0.5 * summary["sky_rms"]  # background subtracted
    for col in (
        "id",
        "x",
        "y",
        "x_err",
        "y_err",
        "ra",
        "dec",
        "psf_flux",
        "psf_flux_err",
        "ap_flux_3",
        "ap_flux_3_err",
        "ixx",
        "iyy",
        "ixy",
        "sky",
        "flag_edge",
        "flag_saturated",
        "calib_psf_used",
    ):
        assert col in src.columns, col
    assert src["flag_edge"].dtype == bool and src["id"].is_unique
    assert src.attrs["units"]["psf_flux"] == "nJy" and src.attrs["units"]["ra"] == "deg"
    # sky position errors (deg): the centroid error through the WCS, never below it (the fitted
    # WCS's error adds in quadrature)
    assert src.attrs["units"]["ra_err"] == "deg" and summary["astrometry_wcs_err_max_mas"] > 0
    assert src.attrs["meta"]["ra_err_includes_wcs"]
    scale = summary["pixel_scale_arcsec"] / 3600.0
    good = np.isfinite(src.x_err) & np.isfinite(src.ra_err)
    assert good.mean() > 0.9
    assert (src.ra_err[good] >= 0.99 * scale * np.minimum(src.x_err, src.y_err)[good]).all()
    assert summary["n_sources"] == len(src) and summary["psf_n_stars"] >= 5


def test_calibrate_without_refcat_keeps_header(tiny):
    exp = Exposure.read(tiny / "images/calexp-v000001-d000.fits")
    calexp, src, summary = calibrate_exposure(exp, None)
    assert summary["zero_point"] == pytest.approx(exp.photocalib.zero_point)
    assert "no reference catalogue" in summary["astrometry_status"]
    assert "header zero point" in summary["photometry_status"]
    assert calexp.wcs_cards == exp.wcs_cards
    assert np.isfinite(src.psf_flux).sum() > 10
    # header WCS: ra_err holds the centroid error only, and says so
    assert not src.attrs["meta"]["ra_err_includes_wcs"] and np.isfinite(src.ra_err).mean() > 0.9


def test_calibrate_no_work_on_tiny_or_empty_images(tiny):
    exp = Exposure.read(tiny / "images/calexp-v000001-d000.fits").compute()
    with pytest.raises(NoWorkError, match="usable pixels"):
        calibrate_exposure(exp[0:60, 0:60], None)
    dead = exp.copy()
    dead.mask[...] = masks.bit("NO_DATA")
    with pytest.raises(NoWorkError, match="usable pixels"):
        calibrate_exposure(dead, None)


def test_config_is_a_tree_of_frozen_step_configs(tmp_path):
    """One frozen config per step, nested in the task config; pipeline overrides use dotted paths."""
    import pydantic

    from procsky.calibrate import CalibrationConfig, PsfConfig
    from procsky.pipeline import load_pipeline
    from procsky.tasks.calibrate import CalibrateConfig

    c = CalibrateConfig()
    assert isinstance(c, CalibrationConfig) and c.psf == PsfConfig() and c.detection.nsigma == 5.0
    with pytest.raises(pydantic.ValidationError):
        CalibrateConfig(psf_order=1)  # the flat names are gone
    with pytest.raises(pydantic.ValidationError):
        c.psf.order = 1  # frozen
    (tmp_path / "p.yaml").write_text(
        "description: t\ntasks:\n  - label: calibrate\n    task: calibrate\n"
        "    config: {psf: {stamp_size: 21}, detection.nsigma: 4.5}\n"
    )
    cfg = load_pipeline(tmp_path / "p.yaml", ["calibrate.psf.order=1", "calibrate.refcat_visit_radius_deg=2"])[
        "calibrate"
    ].config
    assert (cfg.psf.order, cfg.psf.stamp_size, cfg.psf.warp_order) == (1, 21, 1)
    assert cfg.detection.nsigma == 4.5 and cfg.refcat_visit_radius_deg == 2.0


def test_task_run_and_refcat_shards_in_quanta(tiny, tmp_path):
    from procsky.instruments import ingest_files
    from procsky.pipeline import run_pipeline
    from procsky.refcat import ingest_refcat
    from procsky.repo import Repo

    repo = Repo.create(tmp_path / "repo")
    ingest_files(repo, sorted(glob.glob(str(tiny / "images/*.fits"))), "simcam", run="simcam/raw")
    ingest_refcat(repo, [tiny / "refcat/refcat.parquet"], "sim", healpix_level=9)
    # a far-away catalogue must not be attached
    far = read_refcat_file(tiny / "refcat/refcat.parquet")
    far["ra"] = far["ra"] + 40.0
    far.to_parquet(tmp_path / "far.parquet")
    ingest_refcat(repo, [tmp_path / "far.parquet"], "sim", healpix_level=9, run="refcats/far")
    yaml_text = "tasks:\n  - label: calibrate\n    task: calibrate\n"
    (tmp_path / "p.yaml").write_text(yaml_text)
    summary = run_pipeline(repo, str(tmp_path / "p.yaml"), output="cal")
    assert summary.ok, str(summary)
    src = repo.get("src", {"instrument": "simcam", "visit": 1, "detector": 0}, run="cal")
    stats = repo.get("calibrate_summary", {"instrument": "simcam", "visit": 1, "detector": 0}, run="cal")
    calexp = repo.get("calexp", {"instrument": "simcam", "visit": 1, "detector": 0}, run="cal")
    assert len(src) == stats["n_sources"] and stats["photometry_status"].startswith("fitted")
    assert calexp.psf is not None
    # the quantum's summary carries the per-step CPU of calibrate (thread CPU, no memory column)
    steps = {r["step"]: r for r in stats["step_profile"]}
    assert {"background", "cosmic rays: L.A.Cosmic", "detection", "measurement", "PSF model", "other"} <= set(steps)
    assert steps["background"]["calls"] == 2 and all("peak_mb" not in r for r in steps.values())
    assert all(r["cpu_s"] >= 0.0 and r["wall_s"] >= 0.0 for r in steps.values())
    assert sum(r["cpu_s"] for r in steps.values()) > 0.0
    # quanta: only shards near the boresight
    from procsky.pipeline.graph import Where, _existing

    cands = {
        "exposure": _existing(repo, "isr_exposure", ["simcam/raw"], Where(None), "x"),
        "refcat": _existing(repo, "refcat", None, Where(None), "x"),
    }
    specs = CalibrateTask().quanta(repo, cands, None)
    assert len(specs) == 1
    attached = specs[0].inputs["refcat"]
    assert attached and all(d.run == "refcats/sim" for d in attached)
    assert len(attached) < len(cands["refcat"])


@pytest.mark.skipif(not REAL.exists(), reason="real Legacy Surveys cut-outs (../shared/data/real) not available")
def test_real_decam_cutouts_process_or_no_work():
    from procsky.instruments import get_instrument

    inst = get_instrument("noirlab-cp")
    outcomes = []
    # every InstCal image of every test case: DECam (testcase*), 90Prime and Mosaic-3 (mzlsbass3)
    for case in sorted(p for p in REAL.iterdir() if p.is_dir()):
        gaia = [read_refcat_file(f) for f in sorted(glob.glob(str(case / "gaia/*.fits")))]
        for f in sorted(glob.glob(str(case / "images/**/*_ooi_*"), recursive=True)):
            for item in inst.ingest_file(f):
                outcomes.append(_calibrate_outcome(item.obj, gaia or None))
    print("Legacy Surveys cut-outs:", {k: outcomes.count(k) for k in sorted(set(outcomes))})
    assert outcomes and set(outcomes) <= {"ok", "no_work", "failed"}


def _calibrate_outcome(exp, gaia) -> str:
    from procsky.errors import AlgorithmError

    try:
        calibrate_exposure(exp, gaia)
        return "ok"
    except NoWorkError as exc:
        assert str(exc)
        return "no_work"
    except AlgorithmError as exc:  # a documented failure, never a crash
        assert str(exc)
        return "failed"


# ------------------------------------------------------------------ `small`: a whole visit
SMALL_VISIT = 2  # r band; detector 4 comes from the shared session draw ``small_r_det4``


@pytest.fixture(scope="module")
def small_visit_metrics(small_r_det4, tmp_path_factory):
    """All 9 detectors of visit 2 of `small` calibrated and compared with truth.

    Returns ``{detector: (metrics, summary, reserved_dT, src)}``; ~1.5 CPU-min (8 draws + 9
    calibrations). The same numbers are printed by ``benchmarks/eval_calibrate_small.py``.
    """
    from procsky.sim.render import image_filename

    others = [0, 1, 2, 3, 5, 6, 7, 8]
    d = tmp_path_factory.mktemp("small_visit2")
    sim.simulate(
        "small",
        d,
        mode="calibrated",
        visits=[SMALL_VISIT],
        detectors=others,
        scheduler="processes",
        workers=2,
        progress=False,
    )
    ref = [read_refcat_file(d / "refcat/refcat.parquet")]
    out = {}
    for det in range(9):
        folder = small_r_det4 if det == 4 else d
        exp = Exposure.read(folder / "images" / image_filename("calexp", SMALL_VISIT, det))
        calexp, src, summary = calibrate_exposure(exp, ref)
        m = _metrics(folder, SMALL_VISIT, det, calexp, src)
        out[det] = (m, summary, np.asarray(calexp.metadata["calibrate"]["psf"].get("reserved_dT", []), float), src)
    return out


@pytest.mark.slow
def test_calibrate_small_visit_detection_psf_astrometry(small_visit_metrics):
    """Every detector of the visit: PSF FWHM, astrometry, detection, cosmic rays; held-back
    PSF residuals pooled over the visit.

    Astrometry per detector on bright isolated stars of truth S/N >= ``ASTRO_SNR_MIN`` (3-20
    per detector): median offset <= 5 mas, scatter <= 10 mas; all bright isolated stars of S/N
    50-500 through their pulls, offset over reported error: std
    0.85-1.2 (~80-110 stars in the visit; see ``_metrics``); those of S/N > 500 against
    ``src.ra_err``/``dec_err``, which include the fitted WCS's error: std 0.75-1.3.

    Detection: completeness >= 95 % of truth sources with S/N >= 10 (S/N of the object as
    drawn, see ``_truth``) per detector, and fewer than 1 % spurious detections
    (``_spurious``: a detection not assigned one-to-one to a truth object of any brightness
    within max(4 px, 2 r_half); shreds, cosmic-ray residuals, trail pieces and noise count) in
    the visit's catalogue. A detector holds ~250 detections and ~0.6 spurious ones, so its own
    fraction exceeds 1 % by Poisson chance on ~2-3 % of detectors; each detector is held to 2 %.
    A 2048 x 2048 detector of `small` holds only 6-15 PSF stars, 0-3 of them held back,
    so the held-back dT/T is judged on all held-back stars of the visit (~20).
    """
    for det, (m, summary, *_) in small_visit_metrics.items():
        where = f"detector {det}: {m}"
        assert summary["psf_fwhm_px"] == pytest.approx(m["true_fwhm_px"], rel=0.01), where
        assert m["n_astro"] >= 3, where
        assert m["astro_median_mas"] <= 5.0 and m["astro_scatter_mas"] <= 10.0, where
        assert m["completeness_all"] >= 0.95 and m["completeness_stars"] >= 0.95, where
        assert m["spurious_fraction"] < 0.02, where
        assert m["cr_recovered"] >= 0.95 and m["star_cores_flagged_cr"] == 0, where
    ms = [m for m, *_ in small_visit_metrics.values()]
    assert sum(m["n_spurious"] for m in ms) < 0.01 * sum(m["n_src"] for m in ms)
    pulls = np.concatenate([m["astro_pulls_snr50_500"] for m in ms])
    assert pulls.size > 100 and 0.85 <= np.std(pulls) <= 1.2
    # src.ra_err / dec_err add the fitted WCS's own error (~1 mas): the pulls of the brightest
    # stars, whose centroid errors are below it, stay near 1 (with x_err alone: 1.6-2.5)
    st = pd.concat([m["astro_stars"] for m in ms])
    b = st[st.snr > 500]
    sky_pulls = np.r_[b.dra_mas / b.ra_err_mas, b.ddec_mas / b.dec_err_mas]
    assert sky_pulls.size > 30 and 0.75 <= np.std(sky_pulls) <= 1.3, np.std(sky_pulls)
    dT = np.concatenate([r for _, _, r, _ in small_visit_metrics.values()])
    assert dT.size > 10 and abs(np.median(dT)) < 0.01


@pytest.mark.slow
def test_calibrate_small_visit_psf_fluxes(small_visit_metrics):
    """PSF-flux bias and pulls of bright isolated stars (truth S/N 50-500) pooled over the
    visit: |median(psf_flux / truth - 1)| < 0.5 % and pull std 0.9-1.1.

    Per detector the standard deviation of ~10 pulls has a ~25 % sampling error, so the
    0.9-1.1 window is tested on the pulls of all 9 detectors (~110 stars). The pulls use the
    fitted zero point (its error included). ``psf_flux_err`` includes the PSF model's
    cross-validated flux error of each detector (``summary["psf_flux_sys"]``, from its own
    PSF stars, no truth); without it the pulls of the brightest stars are too wide.
    """
    pulls = np.concatenate([m["pulls_snr50_500"] for m, *_ in small_visit_metrics.values()])
    ratios = np.concatenate([m["flux_ratios"] for m, *_ in small_visit_metrics.values()])
    assert pulls.size > 60
    assert abs(np.median(ratios - 1)) < 0.005
    assert 0.9 <= np.std(pulls) <= 1.1, f"pull std {np.std(pulls):.2f} over {pulls.size} stars"


def _visit_calibration(small_visit_metrics, **config):
    from procsky.tasks.photometry import VisitPhotometryConfig, visit_photometric_calibration

    dets = sorted(small_visit_metrics)
    return visit_photometric_calibration(
        [small_visit_metrics[k][3] for k in dets],
        dets,
        [small_visit_metrics[k][1] for k in dets],
        VisitPhotometryConfig(**config),
        visit=SMALL_VISIT,
    )


@pytest.mark.slow
def test_calibrate_small_visit_zero_point(small_visit_metrics, capsys):
    """Final zero point (visit-level ``visit_photocalib``) within 3 mmag of the truth on every
    detector of the visit.

    The per-detector zero points of ``calibrate`` (7-18 reference stars with 5-20 mmag errors
    each, and each detector's own aperture-to-total factor) are printed for the record: they
    scatter by a few mmag, up to 10 on some visits. The final PhotoCalib is the visit's: one
    zero point of the total flux from the ~100 reference stars of all 9 detectors and the
    visit's aperture-to-total factor (the 17-px aperture flux alone leaves the zero point a
    few mmag off).
    """
    rec = _visit_calibration(small_visit_metrics)
    truth = {det: m["true_magzero"] for det, (m, *_) in small_visit_metrics.items()}
    with capsys.disabled():
        per = {det: round(1000 * (s["zero_point"] - truth[det]), 1) for det, (_, s, *_) in small_visit_metrics.items()}
        final = {int(k): round(1000 * (v["zero_point"] - truth[int(k)]), 1) for k, v in rec["detectors"].items()}
        print(
            f"\nvisit {SMALL_VISIT} zero point - truth (mmag): calibrate per detector {per}; "
            f"visit-level {final} (err {1000 * rec['zero_point_err']:.1f}, {rec['n_stars']} stars)"
        )
    assert rec["n_detectors"] == 9 and rec["n_stars"] > 50
    for det, (m, summary, *_) in small_visit_metrics.items():
        entry = rec["detectors"][str(det)]
        assert entry["zero_point"] == pytest.approx(m["true_magzero"], abs=0.003), f"detector {det}: {entry}"
        assert entry["detector_zero_point"] == pytest.approx(summary["zero_point"])


@pytest.mark.slow
def test_visit_photometry_small_estimators_and_offsets(small_visit_metrics):
    """Both estimators within 3 mmag of the truth; the per-detector offsets (flat-field
    diagnostic) are consistent with noise on `small` (no flat-field error is simulated), so
    the optional per-detector term applies none and the final zero points stay within 3 mmag."""
    truth = small_visit_metrics[4][0]["true_magzero"]
    wm = _visit_calibration(small_visit_metrics, estimator="weighted_mean")
    assert wm["zero_point"] == pytest.approx(truth, abs=0.003)
    rec = _visit_calibration(small_visit_metrics, per_detector_offsets=True)
    chi = [v["offset"] / v["offset_err"] for v in rec["detectors"].values()]
    assert np.all(np.abs(chi) < 3), chi
    for k, v in rec["detectors"].items():
        assert v["zero_point"] == pytest.approx(truth, abs=0.003), k


@pytest.mark.slow
def test_raw_isr_calibrate_matches_calibrated_twin(tmp_path):
    from scipy.spatial import cKDTree

    from procsky.tasks.isr import run_isr

    cal = _draw(tmp_path, "tiny", "calibrated", [1])
    raw = _draw(tmp_path, "tiny", "raw", [1])
    ref = [read_refcat_file(cal / "refcat/refcat.parquet")]
    _, src_a, sum_a = calibrate_exposure(Exposure.read(cal / "images/calexp-v000001-d001.fits"), ref)
    c = raw / "calibs"
    isr = run_isr(
        Exposure.read(raw / "images/raw-v000001-d001.fits"),
        Exposure.read(c / "bias-d001.fits"),
        Exposure.read(c / "dark-d001.fits"),
        Exposure.read(c / "flat-g-d001.fits"),
    )
    _, src_b, sum_b = calibrate_exposure(isr, ref)
    d, j = cKDTree(np.c_[src_b.x, src_b.y]).query(np.c_[src_a.x, src_a.y], distance_upper_bound=1.0)
    ok = np.isfinite(d)
    assert ok.mean() > 0.9
    a, b = src_a[ok], src_b.iloc[j[ok]]
    good = (a.psf_flux / a.psf_flux_err).to_numpy() > 10
    # compare instrumental fluxes (ADU; ISR output is in electrons): the zero points are fitted
    # independently on ~7 reference stars and are compared separately below
    gain = isr.detector["gain"]
    cal_a = 10 ** (-0.4 * (sum_a["zero_point"] - 31.4))
    cal_b = 10 ** (-0.4 * (sum_b["zero_point"] - 31.4))
    ca = a.psf_flux.to_numpy()[good] / cal_a
    cb = b.psf_flux.to_numpy()[good] / cal_b / gain
    err = a.psf_flux_err.to_numpy()[good] / cal_a
    # the same photons: differences well inside the noise (ADC rounding + master-bias noise)
    assert np.median(np.abs(cb - ca) / err) < 0.3
    assert abs(np.median(cb / ca - 1)) < 0.01
    dzp = sum_a["zero_point"] - (sum_b["zero_point"] - 2.5 * np.log10(gain))
    assert abs(dzp) < 3 * np.hypot(sum_a["zero_point_err"], sum_b["zero_point_err"]) + 0.005


def test_pipeline_isr_then_calibrate_on_raw(tmp_path):
    from procsky.instruments import ingest_files
    from procsky.pipeline import run_pipeline
    from procsky.refcat import ingest_refcat
    from procsky.repo import Repo

    raw = _draw(tmp_path, "tiny", "raw", [0])
    repo = Repo.create(tmp_path / "repo")
    files = sorted(glob.glob(str(raw / "images/*.fits"))) + sorted(glob.glob(str(raw / "calibs/*-d000.fits")))
    ingest_files(repo, files, "simcam", run="simcam/raw")
    ingest_refcat(repo, [raw / "refcat/refcat.parquet"], "sim")
    (tmp_path / "p.yaml").write_text(
        "tasks:\n  - label: isr\n    task: isr\n  - label: calibrate\n    task: calibrate\n"
    )
    summary = run_pipeline(repo, str(tmp_path / "p.yaml"), output="proc")
    assert summary.ok, str(summary)
    did = {"instrument": "simcam", "visit": 1, "detector": 0}
    isr = repo.get("isr_exposure", did, run="proc")
    assert isr.metadata["isr"]["missing"] == [] and isr.shape == (512, 512)
    stats = repo.get("calibrate_summary", did, run="proc")
    tr = pd.read_parquet(raw / "truth/detectors.parquet").query("visit == 1 and detector == 0").iloc[0]
    # ISR output is in electrons: zero point of one electron
    assert stats["zero_point"] == pytest.approx(tr.magzero + 2.5 * np.log10(tr.gain), abs=0.01)


def test_pipeline_visit_photometry_then_warp(tiny, tmp_path):
    """drp isr, calibrate, visit_photometry, warp on `tiny`: the warp is scaled with the
    visit-level PhotoCalib (its metadata says so, and a doctored visit zero point scales the
    warp's pixels accordingly)."""
    from procsky.instruments import ingest_files
    from procsky.pipeline import run_pipeline
    from procsky.refcat import ingest_refcat
    from procsky.repo import Repo
    from procsky.skymap import register_skymap, rings_skymap
    from procsky.tasks.warp import WarpTask

    repo = Repo.create(tmp_path / "repo")
    ingest_files(repo, sorted(glob.glob(str(tiny / "images/*.fits"))), "simcam", run="simcam/raw")
    ingest_refcat(repo, [tiny / "refcat/refcat.parquet"], "sim")
    register_skymap(repo, rings_skymap(name="default"))
    summary = run_pipeline(
        repo, "drp", where="instrument='simcam'", output="drp", tasks=["isr", "calibrate", "visit_photometry", "warp"]
    )
    assert summary.ok, str(summary)
    vid = {"instrument": "simcam", "visit": 1}
    rec = repo.get("visit_photocalib", vid, run="drp")
    stats = repo.get("calibrate_summary", {**vid, "detector": 0}, run="drp")
    tr = pd.read_parquet(tiny / "truth/detectors.parquet").query("visit == 1 and detector == 0").iloc[0]
    assert rec["visit"] == 1 and rec["n_stars"] >= 5 and set(rec["detectors"]) == {"0"}
    assert rec["zero_point"] == pytest.approx(tr.magzero, abs=0.005)
    assert rec["detectors"]["0"]["detector_zero_point"] == pytest.approx(stats["zero_point"])
    src = repo.get("src", {**vid, "detector": 0}, run="drp")
    assert {"ref_mag", "ref_mag_err", "calib_photometry_candidate"} <= set(src.columns)
    assert src.attrs["meta"]["zero_point"] == pytest.approx(stats["zero_point"])
    assert src["calib_photometry_candidate"].sum() >= rec["n_stars"]
    warps = repo.query("warp", run="drp")
    assert warps
    w = repo.get(warps[0])
    assert w.metadata["photocalib"]["source"] == "visit_photocalib"
    assert w.metadata["photocalib"]["zero_point"] == pytest.approx(rec["detectors"]["0"]["zero_point"])
    # flux scaling: the same warp with the visit zero point 0.1 mag fainter is 10**(-0.04) dimmer
    calexp = repo.get("calexp", {**vid, "detector": 0}, run="drp")
    skymap = repo.get("skymap", {"skymap": "default"})
    did = dict(warps[0].data_id)
    shifted = json_copy(rec)
    for v in shifted["detectors"].values():
        v["calibration"] *= 10 ** (-0.04)
    task = WarpTask({"skymap": "default"})
    ids = {"calexps": [{**vid, "detector": 0}]}
    a = task.run([calexp], skymap, visit_photocalib=rec, data_id=did, data_ids=ids)["warp"].compute()
    b = task.run([calexp], skymap, visit_photocalib=shifted, data_id=did, data_ids=ids)["warp"].compute()
    img_a, img_b = np.asarray(a.image, float), np.asarray(b.image, float)
    ok = np.isfinite(img_a) & np.isfinite(img_b) & (np.abs(img_a) > 0)
    assert ok.sum() > 1000
    assert np.median(img_b[ok] / img_a[ok]) == pytest.approx(10 ** (-0.04), rel=1e-5)
    assert np.array_equal(np.asarray(w.image)[ok], img_a[ok])


def json_copy(obj):
    import json

    return json.loads(json.dumps(obj))


def _synthetic_src(rng, zp_true, zp_det, n=40, ref_err=0.01, flat_offset=0.0, header=float("nan")):
    """A ``src`` as calibrate writes it: psf_flux in nJy with the detector zero point ``zp_det``
    for stars whose counts follow ``zp_true`` (+ a flat-field error ``flat_offset``, mag)."""
    from procsky.photocalib import AB_NJY_ZP

    m_true = rng.uniform(17, 21, n)
    counts = 10 ** (-0.4 * (m_true - zp_true - flat_offset))
    snr = 200.0
    counts_obs = counts * (1 + rng.normal(0, 1 / snr, n))
    cal = 10 ** (-0.4 * (zp_det - AB_NJY_ZP))
    src = pd.DataFrame(
        {
            "psf_flux": counts_obs * cal,
            "psf_flux_err": counts * cal / snr,
            "ref_mag": m_true + rng.normal(0, ref_err, n),
            "ref_mag_err": np.full(n, ref_err),
            "calib_photometry_candidate": np.ones(n, bool),
        }
    )
    src.attrs["meta"] = {"zero_point": zp_det, "zero_point_err": 0.003, "header_zero_point": header}
    return src


def test_visit_photometric_calibration_synthetic():
    """Pooling over detectors; header (gain) offsets kept; a significant flat-field offset is
    reported and applied only when asked; too few stars is no work."""
    from procsky.tasks.photometry import VisitPhotometryConfig, photocalib_for_detector, visit_photometric_calibration

    rng = np.random.default_rng(3)
    zp = 30.0
    gains = {0: 0.0, 1: 0.1, 2: -0.05}  # electrons: zero points differ by 2.5 log10(gain)
    srcs = [
        _synthetic_src(
            rng, zp + g, zp + g + rng.normal(0, 0.004), header=zp + g + 0.02, flat_offset=0.05 if k == 2 else 0.0
        )
        for k, g in gains.items()
    ]
    rec = visit_photometric_calibration(srcs, list(gains), visit=7)
    assert rec["visit"] == 7 and rec["header_offsets_used"] and rec["n_detectors"] == 3
    for k, g in gains.items():
        e = rec["detectors"][str(k)]
        assert e["header_offset"] == pytest.approx(g, abs=1e-9)
        expect = zp + g + (0.05 if k == 2 else 0.0)
        if k != 2:
            assert e["zero_point"] == pytest.approx(expect, abs=0.01)
        assert not e["offset_applied"]
        assert photocalib_for_detector(rec, k).zero_point == pytest.approx(e["zero_point"])
    # the 50 mmag flat-field error of detector 2 is a significant offset; applied only on request
    assert rec["detectors"]["2"]["offset"] > 5 * rec["detectors"]["2"]["offset_err"]
    rec2 = visit_photometric_calibration(srcs, list(gains), config=VisitPhotometryConfig(per_detector_offsets=True))
    assert rec2["detectors"]["2"]["offset_applied"] and not rec2["detectors"]["0"]["offset_applied"]
    assert rec2["detectors"]["2"]["zero_point"] == pytest.approx(zp + gains[2] + 0.05, abs=0.01)
    # without header zero points every detector shares one zero point
    for s in srcs:
        s.attrs["meta"]["header_zero_point"] = float("nan")
    rec3 = visit_photometric_calibration(srcs[:1], [0])
    assert not rec3["header_offsets_used"] and rec3["zero_point"] == pytest.approx(zp, abs=0.005)
    with pytest.raises(NoWorkError):
        visit_photometric_calibration(
            [s.iloc[:1] for s in srcs], list(gains), config=VisitPhotometryConfig(min_stars=5)
        )
    assert photocalib_for_detector(None, 0) is None


def test_visit_photometry_uses_one_aperture_to_total_factor():
    """calibrate multiplies psf_flux by its own growth-curve factor (noisy per detector); the
    visit replaces it by the detectors' weighted mean, so the zero point is that of the total
    flux and no detector's own error reaches it."""
    from procsky.tasks.photometry import VisitPhotometryConfig, visit_photometric_calibration

    rng = np.random.default_rng(5)
    zp, loss = 30.0, 0.005  # 0.5 % of the light beyond the aperture
    own = {0: 1.005, 1: 1.009, 2: 1.001, 3: 1.005}  # detector factors (truth 1.005) and errors
    errs = {0: 0.0005, 1: 0.004, 2: 0.004, 3: 0.0005}
    srcs, summaries = [], []
    for k, g in own.items():
        # counts in the aperture = total x (1 - loss); calibrate multiplies them by its factor g
        s = _synthetic_src(rng, zp + 2.5 * np.log10((1 - loss) * g), zp, n=200, ref_err=0.002)
        srcs.append(s)
        summaries.append({"zero_point": zp, "aperture_to_total": g, "aperture_to_total_err": errs[k]})
    rec = visit_photometric_calibration(srcs, list(own), summaries)
    assert rec["aperture_to_total"] == pytest.approx(1.005, abs=0.0005)
    for k in own:
        e = rec["detectors"][str(k)]
        assert e["aperture_to_total_applied"] == pytest.approx(rec["aperture_to_total"])
        # the zero point of total counts: the truth (0.5 mmag), whatever the detector's own factor
        assert e["zero_point"] == pytest.approx(zp, abs=0.0007), k
    off = visit_photometric_calibration(
        srcs, list(own), summaries, VisitPhotometryConfig(use_visit_aperture_to_total=False)
    )
    assert off["aperture_to_total"] == 1.0 and off["detectors"]["1"]["aperture_to_total_applied"] == 1.009


@pytest.mark.slow
def test_calibrate_small_trailed_detector(tmp_path):
    """`small` visit 14, detector 3: a satellite trail crosses the detector. Calibrate finds
    it (STREAK plane), subtracts the fitted trail and detects again, so the trail is not
    shredded into spurious sources, and the astrometry and detection criteria hold there."""
    from procsky.sim.render import image_filename

    sim.simulate("small", tmp_path, mode="calibrated", visits=[14], detectors=[3], scheduler="sync", progress=False)
    exp = Exposure.read(tmp_path / "images" / image_filename("calexp", 14, 3))
    calexp, src, summary = calibrate_exposure(exp, [read_refcat_file(tmp_path / "refcat/refcat.parquet")])
    assert summary["n_streaks"] == 1
    streak = calexp.metadata["calibrate"]["streaks"][0]
    assert streak["length"] > 1900
    on = (np.asarray(calexp.mask) & calexp.mask_planes.bitmask("STREAK")) != 0
    assert 0.001 < on.mean() < 0.05
    m = _metrics(tmp_path, 14, 3, calexp, src)
    where = f"{m}"
    assert m["spurious_fraction"] < 0.01, where
    assert m["astro_median_mas"] <= 5.0 and m["astro_scatter_mas"] <= 10.0, where
    assert m["completeness_all"] >= 0.95, where
    assert m["cr_recovered"] >= 0.95 and m["star_cores_flagged_cr"] == 0, where
    # no bright star biased by the trail (the pull std is judged over a whole visit, see
    # test_calibrate_small_visit_psf_fluxes: ~15 stars give it a ~20 % sampling error)
    assert np.max(np.abs(m["pulls_snr50_500"])) < 4.0 and abs(m["psf_flux_bias"]) < 0.005, where
    # sources on the trail are flagged and kept out of the calibration fits
    assert src.flag_streak.any()
    assert not (src.flag_streak & (src.calib_psf_used | src.calib_astrometry_used | src.calib_photometry_used)).any()
