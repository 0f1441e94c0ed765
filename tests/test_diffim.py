"""Image subtraction and DIA sources on synthetic science/template pairs with known truth."""

from __future__ import annotations

import math

import dask
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from procsky.diffim import (
    SubtractionConfig,
    detect_dia_sources,
    forced_dia_photometry,
    simulate_pair,
    subtract_images,
)
from procsky.errors import AlgorithmError, ProcskyValueError
from procsky.photocalib import PhotoCalib


def _stamp_z(diff, truth, n=40, r=8, margin=30):
    """diff / sqrt(variance) in stamps around the brightest static stars."""
    z = diff.image / np.sqrt(diff.variance)
    st = truth["stars"]
    ny, nx = z.shape
    out = []
    for i in np.argsort(-st["flux"])[:n]:
        x, y = int(round(st["x"][i])), int(round(st["y"][i]))
        if margin < x < nx - margin and margin < y < ny - margin:
            out.append(z[y - r : y + r + 1, x - r : x + r + 1].ravel())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def varying_pair():
    # Science PSF sigma varies 2.0 -> 2.6 px across the detector; template 1.5 px, deep.
    return simulate_pair(
        (512, 512),
        n_stars=400,
        seeing_science=(2.0, 2.6),
        seeing_template=1.5,
        seed=11,
        n_transients=25,
        transient_flux=(400.0, 20000.0),
        flux_scale=0.8,
    )


@pytest.fixture(scope="module")
def varying_diff(varying_pair):
    sci, tpl, truth = varying_pair
    sci.photocalib = PhotoCalib(2.0)
    return subtract_images(sci, tpl, lazy=False)


def test_static_sky_subtracts_to_noise(varying_diff, varying_pair):
    diff, kern, summary = varying_diff
    z = _stamp_z(diff, varying_pair[2])
    assert 0.9 <= z.std() <= 1.2, z.std()
    assert abs(z.mean()) < 0.1
    assert summary["mode"] == "convolve_template"
    assert summary["kernel_sum"] == pytest.approx(1 / 0.8, rel=0.01)
    assert 0.9 < summary["residual_std_sigma"] < 1.15
    assert diff.psf is not None and diff.image.dtype == np.float32 and diff.mask.dtype == np.uint32
    # border pixels whose convolution left the image are NO_DATA
    nodata = diff.mask_bits("NO_DATA")
    assert np.all(diff.mask[:, 0] & nodata) and not np.any(diff.mask[256, 100:400] & nodata)


def test_spatially_varying_kernel_beats_constant(varying_pair):
    sci, tpl, truth = varying_pair
    # the kernels' residuals against the inputs' noise: without the model-error term, which
    # would carry the constant kernel's residual in the variance (kernel_model_error)
    cfg = {"decorrelate": False, "model_error": "off"}
    const, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=0, **cfg), lazy=False)
    vary, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=2, **cfg), lazy=False)
    z_c = _stamp_z(const, truth)
    z_v = _stamp_z(vary, truth)
    assert np.mean(z_v**2) < 0.6 * np.mean(z_c**2)
    assert 0.9 <= z_v.std() <= 1.2


def test_transients_detected_measured_and_no_false_positives(varying_diff, varying_pair):
    diff, kern, summary = varying_diff
    truth = varying_pair[2]
    df, mask = detect_dia_sources(diff)
    assert df.attrs["flux_unit"] == "nJy"
    assert mask.dtype == np.uint32 and np.any(mask & diff.mask_bits("DETECTED"))
    tr = truth["transients"]
    cal = 2.0
    tree = cKDTree(np.column_stack([df.x, df.y]))
    d, i = tree.query(np.column_stack([tr["x"], tr["y"]]))
    found = d < 2.0
    # expected S/N from the measured error of the matched source (or the median error)
    err = np.where(found, df.psf_flux_err.to_numpy()[np.minimum(i, len(df) - 1)], np.median(df.psf_flux_err))
    bright = tr["flux"] * cal / err >= 10
    assert bright.sum() >= 15
    assert found[bright].mean() >= 0.95
    pull = (df.psf_flux.to_numpy()[i] - tr["flux"] * cal) / err
    assert np.mean(np.abs(pull[found & bright]) < 3) >= 0.95
    # everything detected is a transient: < 5 false detections per 2048^2 at 5 sigma
    false = np.ones(len(df), bool)
    false[i[found]] = False
    clean = false & ~df.flag_masked.to_numpy() & ~df.flag_edge.to_numpy()
    # (a 512^2 image is 1/16 of a 2048^2 detector: at most one false detection here)
    assert clean.sum() <= 1
    assert set(["psf_flux", "psf_flux_err", "is_dipole", "reliability", "ixx", "flag_edge", "ra", "dec"]) <= set(df)
    assert df.reliability.between(0, 1).all()
    assert not df.is_negative.to_numpy()[i[found]].any()


def test_negative_and_dipole_sources():
    sci, tpl, truth = simulate_pair(
        (256, 256), n_stars=120, seeing_science=(2.2, 2.2), seeing_template=1.5, seed=5, variable_delta=None
    )
    # A star that faded (negative) and one that moved by 1.5 px (dipole).
    from procsky.diffim import _render_star

    img = sci.image.astype(np.float64)
    sig = lambda x, y: (2.2, 2.2, 0.0)  # noqa: E731
    _render_star(img, 60.3, 70.2, -5000.0, sig, None, 20)
    _render_star(img, 180.0, 190.0, -20000.0, sig, None, 20)
    _render_star(img, 181.5, 190.0, 20000.0, sig, None, 20)
    sci.image = img.astype(np.float32)
    diff, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=0, degrees=(4, 2, 2)), lazy=False)
    df, _ = detect_dia_sources(diff)
    neg = df[(df.x - 60.3).abs().lt(2) & (df.y - 70.2).abs().lt(2)]
    assert len(neg) == 1 and bool(neg.is_negative.iloc[0])
    assert neg.psf_flux.iloc[0] == pytest.approx(-5000.0, abs=3 * neg.psf_flux_err.iloc[0])
    dip = df[(df.x - 180.75).abs().lt(3) & (df.y - 190).abs().lt(3)]
    assert len(dip) == 1 and bool(dip.is_dipole.iloc[0])
    assert dip.dipole_separation.iloc[0] == pytest.approx(1.5, abs=0.5)
    assert dip.dipole_pos_flux.iloc[0] == pytest.approx(20000.0, rel=0.2)


def test_convolve_science_when_template_is_broader():
    sci, tpl, truth = simulate_pair(
        (320, 320), n_stars=200, seeing_science=(1.4, 1.4), seeing_template=2.2, seed=8, template_depth=8.0
    )
    diff, kern, summary = subtract_images(sci, tpl, SubtractionConfig(spatial_order=1, degrees=(4, 2, 2)), lazy=False)
    assert summary["mode"] == "convolve_science"
    z = _stamp_z(diff, truth, margin=40)
    assert 0.85 <= z.std() <= 1.25 and abs(z.mean()) < 0.1
    forced = subtract_images(
        sci,
        tpl,
        SubtractionConfig(mode="convolve_template", spatial_order=0, degrees=(4, 2, 2), decorrelate=False),
        lazy=False,
    )[2]
    assert forced["mode"] == "convolve_template"


def test_chunked_convolution_equals_single_chunk_and_lazy(varying_pair):
    sci, tpl, truth = varying_pair
    cfg = dict(spatial_order=1, degrees=(2, 2, 2), n_cells=3)
    a, ka, _ = subtract_images(sci, tpl, SubtractionConfig(chunk=512, **cfg), lazy=False)
    b, kb, _ = subtract_images(sci, tpl, SubtractionConfig(chunk=100, **cfg), lazy=True)
    assert b.is_lazy
    b = b.compute()
    np.testing.assert_allclose(b.image, a.image, atol=1e-3 * float(np.abs(a.image).max()))
    np.testing.assert_allclose(b.variance, a.variance, rtol=1e-4)
    np.testing.assert_array_equal(b.mask, a.mask)


def test_light_curve_amplitude():
    amp = 6000.0
    phases = np.linspace(0, 2 * np.pi, 6, endpoint=False) + 0.3
    fluxes = []
    for n, ph in enumerate(phases):
        sci, tpl, truth = simulate_pair(
            (256, 256),
            n_stars=150,
            seeing_science=(2.0, 2.0),
            seeing_template=1.5,
            seed=21,
            variable_delta=amp * np.sin(ph),
            noise_seed=n,
        )
        diff, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=0, degrees=(4, 2, 2)), lazy=False)
        st = truth["stars"]
        f = forced_dia_photometry(diff, x=[st["x"][0]], y=[st["y"][0]], ids=[7])
        assert list(f.dia_object_id) == [7]
        fluxes.append(f.psf_flux.iloc[0])
    s = np.sin(phases)
    c = np.cos(phases)
    A = np.column_stack([s, c, np.ones_like(s)])
    coef = np.linalg.lstsq(A, np.array(fluxes), rcond=None)[0]
    assert np.hypot(coef[0], coef[1]) == pytest.approx(amp, rel=0.05)


def test_errors_say_what_to_do():
    sci, tpl, _ = simulate_pair((128, 128), n_stars=2, seed=3)
    with pytest.raises(ProcskyValueError, match="warp the template"):
        subtract_images(sci, tpl[0:100, 0:100], lazy=False)
    with pytest.raises(AlgorithmError, match="kernel"):
        subtract_images(sci, tpl, lazy=False)


def test_select_best_seeing():
    from procsky.tasks.diffim import select_best_seeing

    f = [3.0, 1.0, np.nan, 2.0, 5.0, 4.0]
    assert select_best_seeing(f, 0.5, 1) == [1, 3, 0]
    assert select_best_seeing(f, 0.1, 2) == [1, 3]
    assert select_best_seeing(f[:1], 0.5, 3) == [0]
    assert select_best_seeing(f, 1.0, 1, max_count=2) == [1, 3]


def test_template_and_subtract_tasks():
    from astropy.wcs import WCS

    from procsky.coadd import warp_exposure
    from procsky.diffim import warp_template_to_science
    from procsky.exposure import VisitInfo
    from procsky.tasks.dia import DetectDiaTask
    from procsky.tasks.diffim import MakeTemplateTask, SubtractTask

    shape = (192, 192)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -10.0]
    w.wcs.crpix = [96.5, 96.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    warps = []
    for n, seeing in enumerate([2.4, 1.4, 1.6]):
        exp, _, truth = simulate_pair(shape, n_stars=120, seeing_science=(seeing, seeing), seed=41, noise_seed=n, wcs=w)
        exp.photocalib = PhotoCalib(0.5)
        exp.visit_info = VisitInfo(mjd=60000.0 + n, band="g", visit=10 + n)
        warps.append(warp_exposure(exp, exp.wcs_cards, shape, full=True).compute())
    out = MakeTemplateTask({"best_seeing_fraction": 0.5, "min_count": 2, "coadd": {"reject_artifacts": False}}).run(
        warps
    )
    tpl = out["template"].compute()
    assert tpl.metadata["template_visits"] == [11, 12]
    assert tpl.psf is not None and tpl.psf.fwhm(96, 96) < 1.7 * 2.3548
    sci, _, truth = simulate_pair(
        shape,
        n_stars=120,
        seeing_science=(2.2, 2.2),
        seed=41,
        noise_seed=9,
        n_transients=3,
        transient_flux=(8000.0, 10000.0),
        wcs=w,
    )
    sci.photocalib = PhotoCalib(0.5)
    sci.visit_info = VisitInfo(mjd=60010.0, band="g", visit=20)
    did = {"instrument": "x", "visit": 20, "detector": 1}
    with dask.config.set(scheduler=_no_compute):  # the task builds a graph, computes nothing
        res = SubtractTask({"subtraction": {"spatial_order": 0, "degrees": [4, 2, 2]}}).run(
            sci, [tpl], data_ids={"calexp": did}
        )
    assert set(res) == {"diff"} and res["diff"].is_lazy
    diff = res["diff"].compute()
    res = DetectDiaTask().run(diff, sci, data_ids={"diff": did})
    dia, summary = res["dia_source"], res["summary"]
    assert summary["n_dia_sources"] == len(dia) and summary["mode"] == "convolve_template"
    assert summary["kernel_sum"] == pytest.approx(2.0, rel=0.03)  # counts per nJy of the 0.5 nJy/count science
    tree = cKDTree(np.column_stack([dia.x, dia.y]))
    d, i = tree.query(np.column_stack([truth["transients"]["x"], truth["transients"]["y"]]))
    assert np.all(d < 1.5)
    np.testing.assert_allclose(dia.psf_flux.to_numpy()[i], 0.5 * truth["transients"]["flux"], rtol=0.1)
    assert (dia.visit == 20).all()
    det = diff.mask_bits("DETECTED")
    for x, y in zip(truth["transients"]["x"], truth["transients"]["y"]):
        assert diff.mask[int(round(y)), int(round(x))] & det
    # the same outputs as subtracting and detecting at once
    wt = warp_template_to_science([tpl], sci)
    d0, k0, s0 = subtract_images(sci, wt, SubtractionConfig(spatial_order=0, degrees=(4, 2, 2)), lazy=False)
    df0, m0 = detect_dia_sources(d0, static=np.asarray(sci.image, np.float32))
    for a, b in ((diff.image, d0.image), (diff.variance, d0.variance), (diff.mask, m0)):
        np.testing.assert_array_equal(a, b)
    assert diff.psf.to_dict() == d0.psf.to_dict()
    pd.testing.assert_frame_equal(dia[list(df0.columns)], df0)
    assert summary["kernel"] == k0.to_dict() and {k: summary[k] for k in s0} == s0


def _no_compute(*args, **kwargs):
    raise AssertionError("a dask graph was computed")


# ----------------------------------------------------------------------------- slow: sim
def _template_flux(lc, truth, calexps, tvis, weights, oids, band="r"):
    """Truth flux of each object in the template and its calibration uncertainty.

    The coadd's per-visit weights (``metadata["weights"]``, in input order) applied to the
    truth light curve at the template epochs, over the template visits that cover the
    object (an input pixel that is NO_DATA, BAD, SAT or EDGE - ``CoaddConfig.bad_mask_planes``
    - or off its detector does not enter the coadd mean). The uncertainty propagates each
    input's photometric calibration error (``PhotoCalib.calibration_err``).
    """
    import pandas as pd

    tl = lc[(lc.band == band) & lc.visit.isin(tvis)].pivot(index="object_id", columns="visit", values="flux")
    tl = tl.reindex(index=oids, columns=tvis).to_numpy()
    pos = truth.set_index("object_id").loc[oids]
    cover = np.zeros(tl.shape, bool)
    rel = np.array([calexps[t].photocalib.calibration_err / calexps[t].photocalib.calibration for t in tvis])
    for j, t in enumerate(tvis):
        c = calexps[t]
        x, y = c.sky_to_pixel(pos.ra.to_numpy(), pos.dec.to_numpy())
        ix, iy = np.round(x).astype(int), np.round(y).astype(int)
        inside = (ix >= 0) & (iy >= 0) & (ix < c.shape[1]) & (iy < c.shape[0])
        ok = np.zeros(len(ix), bool)
        ok[inside] = (c.mask[iy[inside], ix[inside]] & c.mask_bits("NO_DATA", "BAD", "SAT", "EDGE")) == 0
        cover[:, j] = ok
    w = cover * np.asarray(weights, float)[None, :]
    sw = np.where(w.sum(axis=1) > 0, w.sum(axis=1), np.nan)
    flux = (tl * w).sum(axis=1) / sw
    err = np.sqrt(((tl * w * rel[None, :]) ** 2).sum(axis=1)) / sw
    return pd.Series(flux, index=oids), pd.Series(err, index=oids)


@pytest.mark.slow
def test_small_simulation_dia(small_r_det4, small_r_det4_calexps):
    """`small`, detector 4, r band: template = coadd of the 3 best-seeing of the 10 visits,
    the other 7 subtracted; the issue's criteria against truth."""
    import pandas as pd

    from procsky.coadd import CoaddConfig, build_coadd
    from procsky.tasks.dia import associate_dia_sources
    from procsky.tasks.diffim import select_best_seeing

    calexps = small_r_det4_calexps
    visits = sorted(calexps)
    fwhm = [calexps[v].psf.fwhm(1024, 1024) for v in visits]
    tvis = [visits[i] for i in select_best_seeing(fwhm, 0.3, 3)]
    truth = pd.read_parquet(small_r_det4 / "truth/objects.parquet")
    lc = pd.read_parquet(small_r_det4 / "truth/lightcurves.parquet")
    tl = lc[lc.band == "r"]
    var_ids = tl.object_id.unique()
    stars = truth[(truth.kind == "star") & (truth.flux_r > 2e4) & (truth.flux_r < 1e6)]
    results, diffs, dfs = {}, {}, {}
    n_false, n_false_raw, n_expected, n_found, n_good_flux, n_reliable = 0, 0, 0, 0, 0, 0
    bad_flux, pulls, found_src = [], [], []
    for v in visits:
        if v in tvis:
            continue
        sci = calexps[v]
        tpl = (
            build_coadd(
                [calexps[t] for t in tvis],
                out_cards=sci.wcs_cards,
                out_shape=sci.shape,
                config=CoaddConfig(reject_artifacts=False),
                inputs_are_warps=False,
            )
            .to_exposure()
            .compute()
        )
        diff, kern, summ = subtract_images(sci, tpl, lazy=False)
        df, _ = detect_dia_sources(diff, static=np.asarray(sci.image, np.float32))  # as SubtractTask
        diffs[v], dfs[v] = diff, df
        # per-detector summary: kernel size, residual statistics
        assert summ["kernel_size"] == 2 * summ["kernel_half_width"] + 1 and summ["n_stamps_used"] >= 3
        assert 0.9 < summ["residual_std_sigma"] < 1.1 and abs(summ["residual_median_sigma"]) < 0.1
        # static sky: stamps around bright static stars subtract to the noise
        x, y = diff.sky_to_pixel(stars.ra.to_numpy(), stars.dec.to_numpy())
        z = diff.image / np.sqrt(diff.variance)
        bad = diff.mask & diff.mask_bits("NO_DATA", "SAT", "BAD", "CR", "EDGE", "INTRP")
        zs, per_star = [], []
        for xx, yy in zip(x, y):
            ix, iy = int(round(xx)), int(round(yy))
            if (
                30 < ix < diff.shape[1] - 30
                and 30 < iy < diff.shape[0] - 30
                and not bad[iy - 8 : iy + 9, ix - 8 : ix + 9].any()
            ):
                zs.append(z[iy - 8 : iy + 9, ix - 8 : ix + 9].ravel())
                per_star.append(zs[-1].std())
        zs = np.concatenate(zs)
        robust = 1.4826 * np.median(np.abs(zs - np.median(zs)))
        ok_frac = np.mean((np.array(per_star) >= 0.8) & (np.array(per_star) <= 1.3))
        # variables and transients: expected difference = now - their flux in the template
        now = tl[tl.visit == v].set_index("object_id").flux.reindex(var_ids)
        tpl_flux, tpl_cal_err = _template_flux(lc, truth, calexps, tvis, tpl.metadata["weights"], var_ids)
        exp_diff = (now - tpl_flux).dropna()
        rel_s = sci.photocalib.calibration_err / sci.photocalib.calibration
        pos = truth.set_index("object_id").loc[exp_diff.index]
        ox, oy = diff.sky_to_pixel(pos.ra.to_numpy(), pos.dec.to_numpy())
        inside = (ox > 40) & (oy > 40) & (ox < diff.shape[1] - 40) & (oy < diff.shape[0] - 40)
        err = np.median(df.psf_flux_err)
        tree = cKDTree(np.column_stack([df.x, df.y]))
        matched = np.zeros(len(df), bool)
        for k, (oid, f) in enumerate(exp_diff.items()):
            if not inside[k]:
                continue
            d, i = tree.query([ox[k], oy[k]])
            if d < 2:
                matched[i] = True
            if abs(f) / err >= 10:
                n_expected += 1
                if d < 2:
                    n_found += 1
                    r = df.iloc[i]
                    found_src.append((v, int(r.dia_source_id), int(oid)))
                    # sigma: the measurement's, plus the photometric calibration errors of the
                    # science exposure and of the template inputs (truth is in true nJy)
                    sig = math.sqrt(r.psf_flux_err**2 + (f * rel_s) ** 2 + tpl_cal_err[oid] ** 2)
                    good = abs(r.psf_flux - f) < 3 * sig
                    pulls.append(round(float((r.psf_flux - f) / sig), 2))
                    n_good_flux += good
                    n_reliable += r.reliability >= 0.5
                    if not good:
                        bad_flux.append((v, int(oid), round(float(f)), round(float(r.psf_flux)), round(sig)))
        # False detections at 5 sigma outside masked pixels, among the sources the stored
        # reliability score accepts (>= 0.5: PSF-like shape, PSF-fit chi2 near 1, little
        # masked weight); the raw count is reported too.
        clean = ~matched & ~df.flag_masked.to_numpy() & ~df.flag_edge.to_numpy() & ~df.flag_saturated_nearby.to_numpy()
        n_false_raw += int(clean.sum())
        n_false += int((clean & (df.reliability.to_numpy() >= 0.5)).sum())
        false_v = (int(clean.sum()), int((clean & (df.reliability.to_numpy() >= 0.5)).sum()))
        results[v] = {
            "z_std": round(float(zs.std()), 3),
            "z_robust": round(float(robust), 3),
            "z_median": round(float(np.median(zs)), 3),
            "ok_frac": round(float(ok_frac), 2),
            "n_det": len(df),
            "false": false_v,
            "kernel": summ["kernel_size"],
            "resid": round(summ["residual_std_sigma"], 3),
        }
    objects, assoc = associate_dia_sources(list(dfs.values()))
    # each truth variable/transient detected at S/N >= 10 is associated into one DIA object
    obj_of = assoc.set_index(["visit", "dia_source_id"]).dia_object_id
    per_truth = {}
    for v, sid, oid in found_src:
        per_truth.setdefault(oid, set()).add(int(obj_of.loc[(v, sid)]))
    print(
        "small sim DIA:",
        results,
        "template visits",
        tvis,
        "expected",
        n_expected,
        "found",
        n_found,
        "good flux",
        n_good_flux,
        bad_flux,
        "pulls",
        pulls,
        "DIA objects per truth object",
        {k: len(o) for k, o in per_truth.items()},
        "reliable",
        n_reliable,
        "false (raw)",
        n_false_raw,
        "false (reliability >= 0.5)",
        n_false,
        "visits",
        len(diffs),
    )
    for v, r in results.items():
        # pooled robust std and median over the stars' stamps, and most stars individually
        assert 0.9 <= r["z_robust"] <= 1.2 and abs(r["z_median"]) < 0.1 and r["ok_frac"] >= 0.75, (v, r)
    assert n_expected >= 10
    assert n_found / n_expected >= 0.95
    assert all(len(o) == 1 for o in per_truth.values()), per_truth
    assert n_good_flux / n_found >= 0.95, bad_flux
    assert n_reliable / n_found >= 0.95  # the reliability cut below keeps the real ones
    assert n_false / len(diffs) < 5, results
    # Light curves: forced photometry at the DIA object of each bright variable on every
    # difference image; amplitude of a sinusoid of the truth period within 5% of truth.
    var = truth[(truth.kind == "variable") & (truth.flux_r * truth.amplitude > 5000)]
    checked = 0
    for _, row in var.iterrows():
        tree = cKDTree(np.column_stack([objects.ra * np.cos(np.radians(row.dec)), objects.dec]))
        d, i = tree.query([row.ra * np.cos(np.radians(row.dec)), row.dec])
        if d * 3600 > 1.0:
            continue
        mjd, flux = [], []
        for v, diff in diffs.items():
            f = forced_dia_photometry(
                diff, [objects.ra.iloc[i]], [objects.dec.iloc[i]], [objects.dia_object_id.iloc[i]]
            )
            if len(f) and not f.flag_edge.iloc[0] and np.isfinite(f.psf_flux.iloc[0]):
                mjd.append(calexps[v].visit_info.mjd)
                flux.append(f.psf_flux.iloc[0])
        if len(flux) < 6:
            continue
        ph = 2 * np.pi * (np.array(mjd) - row.t0) / row.period
        coef = np.linalg.lstsq(np.column_stack([np.sin(ph), np.cos(ph), np.ones_like(ph)]), np.array(flux), rcond=None)[
            0
        ]
        amp, amp_true = np.hypot(coef[0], coef[1]), row.flux_r * row.amplitude
        print("light curve", row.object_id, "amplitude", round(amp), "truth", round(amp_true))
        assert amp == pytest.approx(amp_true, rel=0.05)
        checked += 1
    assert checked >= 1


def test_task_quanta_group_by_band():
    from procsky.tasks.base import DatasetKey
    from procsky.tasks.dia import AssociateDiaTask
    from procsky.tasks.diffim import MakeTemplateTask, SubtractTask

    cal = [
        DatasetKey("calexp", {"instrument": "c", "visit": v, "detector": 1, "band": b}) for v, b in [(1, "g"), (2, "r")]
    ]
    tpl = [DatasetKey("template", {"skymap": "s", "tract": 0, "patch": p, "band": b}) for p in (0, 1) for b in "gr"]
    specs = SubtractTask().quanta(None, {"calexp": cal, "templates": tpl}, None)
    assert [s.data_id["visit"] for s in specs] == [1, 2]
    assert all({t.data_id["band"] for t in s.inputs["templates"]} == {s.data_id["band"]} for s in specs)
    assert all(len(s.inputs["templates"]) == 2 for s in specs)
    warps = [
        DatasetKey("warp", {"instrument": "c", "visit": v, "skymap": "s", "tract": 0, "patch": 3, "band": b})
        for v, b in [(1, "g"), (2, "r"), (3, "g")]
    ]
    specs = MakeTemplateTask().quanta(None, {"warps": warps}, None)
    assert [(s.data_id["band"], len(s.inputs["warps"])) for s in specs] == [("g", 2), ("r", 1)]
    srcs = [DatasetKey("dia_source", {"instrument": "c", "visit": v, "detector": 1}) for v in (1, 2)]
    specs = AssociateDiaTask().quanta(None, {"dia_sources": srcs, "templates": tpl}, None)
    assert (
        len(specs) == 1 and specs[0].data_id == {"skymap": "s", "tract": 0} and len(specs[0].inputs["dia_sources"]) == 2
    )
