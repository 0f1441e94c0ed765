"""The object table (reference band, is_primary, ids, units) and forced photometry on visits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from procsky.exposure import Exposure, VisitInfo
from procsky.objects.forced import forced_photometry, light_curve_chi2
from procsky.objects.table import (
    PARENT_OFFSET,
    SKY_OBJECT_OFFSET,
    choose_reference_band,
    column_unit,
    make_object_id,
    object_table,
)


def _meas(flux, err, flag=None):
    d = {"psf_flux": np.asarray(flux, float), "psf_flux_err": np.asarray(err, float)}
    if flag is not None:
        d["flag_psf_flux"] = np.asarray(flag, bool)
    return pd.DataFrame(d)


def test_reference_band_follows_priority_then_snr():
    meas = {
        "g": _meas([100, 100, 100, 5], [1, 1, 1, 1]),
        "r": _meas([100, 5, 100, 3], [1, 1, 1, 1], flag=[False, False, True, False]),
        "i": _meas([100, 100, 2, 1], [1, 1, 1, 1]),
    }
    ref = choose_reference_band(meas, min_snr=10)
    # i first when S/N >= 10; then r unless flagged; then g; with no band above the cut,
    # the band of highest S/N.
    assert list(ref) == ["i", "i", "g", "g"]
    assert list(choose_reference_band(meas, priority=("r", "g", "i"), min_snr=10)) == ["r", "g", "g", "g"]


def test_object_ids_are_unique_across_patches_and_kinds():
    a = make_object_id(3, 7, [1, 2, PARENT_OFFSET + 1, SKY_OBJECT_OFFSET + 1])
    b = make_object_id(3, 8, [1, 2, PARENT_OFFSET + 1, SKY_OBJECT_OFFSET + 1])
    c = make_object_id(4, 7, [1, 2, PARENT_OFFSET + 1, SKY_OBJECT_OFFSET + 1])
    allids = np.concatenate([a, b, c])
    assert len(set(allids.tolist())) == 12
    assert (allids >> 40).tolist() == [3] * 8 + [4] * 4
    assert ((allids >> 24) & 0xFFFF).tolist() == [7] * 4 + [8] * 4 + [7] * 4
    # Patch ids of small patches pass 1000: still unique.
    assert make_object_id(0, 1000, [1])[0] != make_object_id(1, 0, [1])[0]
    with pytest.raises(ValueError):
        make_object_id(0, 0, [1 << 24])
    with pytest.raises(ValueError):
        make_object_id(0, 1 << 16, [1])


def test_array_psf_addresses_the_model_in_the_exposures_frame():
    from procsky.psf import GaussianPsf, PsfModel, array_psf

    class Varying(PsfModel):
        """Width grows with x: tells where it was evaluated."""

        size = 21

        def kernel(self, x, y):
            return GaussianPsf(1.0 + x / 1000.0, size=21).kernel()

        def to_dict(self):
            return {}

    base = Varying()
    shifted = array_psf(base, (500, 300))
    np.testing.assert_allclose(shifted.kernel(10.0, 20.0), base.kernel(510.0, 320.0))
    np.testing.assert_allclose(
        shifted.render(10.0, 20.0, offset=(0.3, 0.0)), base.render(510.0, 320.0, offset=(0.3, 0.0))
    )
    assert array_psf(base, (0, 0)) is base and array_psf(None, (5, 5)) is None


def test_column_units():
    assert column_unit("g_psf_flux") == "nJy"
    assert column_unit("r_cmodel_flux_err") == "nJy"
    assert column_unit("r_ap_flux_1p0") == "nJy"
    assert column_unit("ra") == "deg"
    assert column_unit("g_ixx") == "pixel2"
    assert column_unit("r_kron_radius") == "pixel"
    assert column_unit("is_primary") is None
    assert column_unit("g_flag_psf_flux") is None
    assert column_unit("g_extendedness") is None


def test_is_primary_counts_each_position_once():
    # Five children: two inside the inner box, one outside it, one of a skipped blend's
    # second peak (a duplicate of its parent), one outside the tract's own region.
    children = pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5],
            "parent_id": [1, 2, 3, 3, 4],
            "x": [10.0, 50.0, 95.0, 96.0, 40.0],
            "y": [10.0, 50.0, 50.0, 52.0, 80.0],
            "deblend_flag_skipped": [False, False, True, True, False],
        }
    )
    ref = children[["x", "y"]].copy()
    forced = {"r": pd.DataFrame({"psf_flux": [1.0] * 5, "psf_flux_err": [0.1] * 5})}
    sky = {"r": pd.DataFrame({"sky_id": [1], "x": [70.0], "y": [70.0], "psf_flux": [0.01], "psf_flux_err": [0.1]})}
    t = object_table(
        children,
        forced,
        ref,
        np.array(["r"] * 5),
        pixel_to_sky=lambda x, y: (150.0 + np.asarray(x) * 1e-4, 2.0 + np.asarray(y) * 1e-4),
        xy0=(100, 200),
        tract=2,
        patch=5,
        inner_box=(100, 200, 190, 270),  # tract pixels: array x in [0, 90), y in [0, 70)
        tract_owner=lambda ra, dec: np.asarray(dec) < 2.0 + 75e-4,
        sky_objects=sky,
    )
    assert len(t) == 6
    assert t["is_primary"].tolist() == [True, True, False, False, False, False]
    assert t["detect_is_deblended_leaf"].tolist()[:5] == [True, True, True, False, True]
    assert t["detect_is_patch_inner"].tolist()[:5] == [True, True, False, False, False]
    assert t["sky_object"].tolist() == [False] * 5 + [True]
    assert t["x"].iloc[0] == 110.0 and t["y"].iloc[0] == 210.0
    assert (t["parent_id"].iloc[:5] != 0).all()  # none is flagged isolated here
    assert t["object_id"].is_unique
    assert t.attrs["units"]["r_psf_flux"] == "nJy" and t.attrs["units"]["ra"] == "deg"


def _star_frames(n_epochs, seed=0):
    from procsky.sim.coadd_scene import make_coadd_scene

    sc = make_coadd_scene(bands=("r",), shape=(160, 160), n_stars=12, n_galaxies=0, n_pairs=0, seed=seed, noise=False)
    base = sc.exposures["r"]
    rng = np.random.default_rng(seed + 1)
    clean = np.asarray(base.image, np.float64)
    var = np.asarray(base.variance)
    frames = []
    for k in range(n_epochs):
        img = (clean + rng.normal(0, np.sqrt(var))).astype(np.float32)
        frames.append(
            Exposure(
                img,
                var,
                np.zeros(img.shape, np.uint32),
                wcs_cards=base.wcs_cards,
                psf=base.psf,
                visit_info=VisitInfo(band="r", visit=100 + k, mjd=60000.0 + k),
                metadata={"calibrate": {"apcorr": 1.0, "growth": {"correction": 1.0}}},
            )
        )
    return sc, frames


def test_forced_photometry_of_constant_stars_matches_truth_and_errors():
    sc, frames = _star_frames(12)
    stars = sc.truth.assign(object_id=sc.truth["id"].astype(np.int64))
    fs = forced_photometry(stars, frames, data_ids=[{"visit": 100 + k, "detector": 0} for k in range(len(frames))])
    assert set(fs["visit"]) == set(range(100, 112))
    assert (fs["detector"] == 0).all()
    assert len(fs) == 12 * len(stars)
    # Each star's mean forced flux against truth, and chi^2/dof of its light curve.
    lc = light_curve_chi2(fs)
    truth = stars.set_index("object_id")["r_flux"]
    mean = lc["mean_flux"].droplevel("band")
    bright = truth[truth > 5000].index
    rel = (mean[bright] / truth[bright] - 1).to_numpy()
    assert abs(np.median(rel)) < 0.005, rel
    pooled = float(lc["chi2_dof"].mean())
    assert 0.8 < pooled < 1.25, lc
    assert fs.attrs["units"]["psf_flux"] == "nJy"
    # Without a difference image the diff columns are NaN and flagged.
    assert fs["psf_diff_flux"].isna().all() and fs["flag_diff"].all()


def test_forced_photometry_reads_the_difference_image():
    sc, frames = _star_frames(2)
    stars = sc.truth.assign(object_id=sc.truth["id"].astype(np.int64))
    # A "difference" with one star brightened by 2000 nJy: only that star shows flux.
    d = frames[0]
    img = np.zeros(d.shape, np.float64)
    row = stars.iloc[0]
    ix, iy = int(round(row.x)), int(round(row.y))
    k = d.psf.render(row.x, row.y, offset=(row.x - ix, row.y - iy))
    h = k.shape[0] // 2
    img[iy - h : iy + h + 1, ix - h : ix + h + 1] += 2000.0 * k
    diff = Exposure(
        img.astype(np.float32), d.variance, d.mask, wcs_cards=d.wcs_cards, psf=d.psf, visit_info=d.visit_info
    )
    fs = forced_photometry(stars, frames[:1], [diff], data_ids=[{"visit": 100, "detector": 0}])
    got = fs.set_index("object_id")["psf_diff_flux"]
    assert got[row.object_id] == pytest.approx(2000.0, rel=0.01)
    others = got.drop(index=row.object_id)
    assert (others.abs() < 5 * fs.set_index("object_id")["psf_diff_flux_err"].drop(index=row.object_id)).all()
    assert not fs["flag_diff"].any()
