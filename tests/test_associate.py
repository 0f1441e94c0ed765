"""Association of DIA sources into DIA objects, forced photometry and the DIA tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from procsky.diffim import SubtractionConfig, detect_dia_sources, simulate_pair, subtract_images
from procsky.exposure import VisitInfo
from procsky.kernels.associate import associate_sources, radec_to_xyz, xyz_to_radec
from procsky.photocalib import PhotoCalib
from procsky.tasks.dia import AssociateDiaTask, ForcedDiaTask, associate_dia_sources


def test_radec_roundtrip():
    ra = np.array([0.0, 359.9999, 120.0, 45.0])
    dec = np.array([0.0, -30.0, 89.9, -89.0])
    r2, d2 = xyz_to_radec(radec_to_xyz(ra, dec))
    np.testing.assert_allclose(d2, dec, atol=1e-10)
    np.testing.assert_allclose(np.cos(np.radians(r2 - ra)), 1.0, atol=1e-12)


def test_nearest_within_radius_and_one_source_per_visit():
    a = 1 / 3600.0
    # visit 1: two sources 3" apart; visit 2: one source 0.4" from the first, one 0.6" from
    # the first as well (only the closest may join), one 2" away from everything.
    ra = np.array([10.0, 10.0 + 3 * a, 10.0 + 0.4 * a, 10.0 - 0.6 * a, 10.0 + 1.5 * a])
    dec = np.array([-5.0, -5.0, -5.0, -5.0, -5.0 + 2 * a])
    mjd = np.array([1.0, 1.0, 2.0, 2.0, 2.0])
    visit = np.array([1, 1, 2, 2, 2])
    sid = np.array([0, 1, 0, 1, 2])
    obj, ro, do, n, first, last = associate_sources(ra, dec, mjd, visit, sid, radius_arcsec=1.0)
    assert obj.tolist() == [0, 1, 0, 2, 3]
    assert n.tolist() == [2, 1, 1, 1]
    assert first[0] == 1.0 and last[0] == 2.0
    # running mean position of object 0: between its two sources (cos(dec) scaled RA)
    assert ro[0] == pytest.approx(10.0 + 0.2 * a, abs=0.02 * a)
    # order of the input arrays does not matter
    perm = np.array([4, 2, 0, 3, 1])
    obj2, ro2, *_ = associate_sources(ra[perm], dec[perm], mjd[perm], visit[perm], sid[perm], radius_arcsec=1.0)
    assert obj2.tolist() == obj[perm].tolist()
    # radius matters
    obj3, *_ = associate_sources(ra, dec, mjd, visit, sid, radius_arcsec=0.3)
    assert len(set(obj3.tolist())) == 5


def test_association_across_ra_zero():
    a = 1 / 3600.0
    obj, ro, do, n, *_ = associate_sources([359.99999, 0.2 * a], [0.0, 0.0], [1.0, 2.0], [1, 2], [0, 0])
    assert obj.tolist() == [0, 0] and n.tolist() == [2]
    assert ro[0] > 359.9 or ro[0] < 0.1


def test_empty_and_bad_inputs():
    obj, ro, *_ = associate_sources([], [], [], [], [])
    assert obj.size == 0 and ro.size == 0
    with pytest.raises(ValueError, match="radius"):
        associate_sources([1.0], [1.0], [1.0], [1], [1], radius_arcsec=0)


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 1, shape[0] / 2 + 1]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


@pytest.fixture(scope="module")
def epochs():
    """Four epochs of one field: two transients (one per pair of epochs) and a variable star."""
    shape = (256, 256)
    wcs = _wcs(shape)
    out = []
    for n in range(4):
        # the transients exist in the first two epochs only; the variable star in all
        sci, tpl, truth = simulate_pair(
            shape,
            n_stars=150,
            seeing_science=(2.0, 2.0),
            seeing_template=1.5,
            seed=31,
            noise_seed=n,
            n_transients=2 if n < 2 else 0,
            transient_flux=(8000.0, 8000.0),
            variable_delta=[3000.0, -3000.0, 3000.0, -3000.0][n],
            wcs=wcs,
        )
        sci.photocalib = PhotoCalib(0.5)
        sci.visit_info = VisitInfo(mjd=60000.0 + n, band="r", visit=100 + n)
        sci.detector = {"id": 3}
        if n == 0:
            first_truth = truth
        diff, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=0, degrees=(4, 2, 2)), lazy=False)
        out.append((diff, first_truth))
    return out


def test_dia_chain_associates_transients_and_builds_light_curves(epochs):
    tables = []
    for diff, _truth in epochs:
        df, _ = detect_dia_sources(diff)
        tables.append(df)
    truth = epochs[0][1]
    objects, sources = associate_dia_sources(tables)
    assert (sources.groupby("visit").dia_object_id.nunique() == sources.groupby("visit").size()).all()
    # each transient (epochs 0 and 1) became exactly one DIA object with two sources
    wcs = epochs[0][0].wcs
    for x, y in zip(truth["transients"]["x"], truth["transients"]["y"]):
        ra, dec = wcs.pixel_to_world_values(x, y)
        sep = np.hypot((objects.ra - ra) * np.cos(np.radians(dec)), objects.dec - dec) * 3600
        near = objects[sep < 1.0]
        assert len(near) == 1 and int(near.n_dia_sources.iloc[0]) == 2
    # the variable star is detected in every epoch and forms one object with 4 sources
    vx, vy = truth["stars"]["x"][0], truth["stars"]["y"][0]
    vra, vdec = wcs.pixel_to_world_values(vx, vy)
    sep = np.hypot((objects.ra - vra) * np.cos(np.radians(vdec)), objects.dec - vdec) * 3600
    var_obj = objects[sep < 1.0]
    assert len(var_obj) == 1 and int(var_obj.n_dia_sources.iloc[0]) == 4 and int(var_obj.n_negative.iloc[0]) == 2
    # forced photometry through the task: light curve of the variable, in nJy
    task = ForcedDiaTask()
    curve = []
    for diff, _ in epochs:
        out = task.run(
            diff,
            [objects],
            data_ids={
                "diff": {"visit": diff.visit_info.visit, "detector": 3},
                "dia_objects": [{"skymap": "s", "tract": 0}],
            },
        )
        f = out["dia_forced_source"]
        assert set(f.dia_object_id) <= set(objects.dia_object_id)
        assert (f.visit == diff.visit_info.visit).all() and (f.tract == 0).all()
        curve.append(float(f[f.dia_object_id == var_obj.dia_object_id.iloc[0]].psf_flux.iloc[0]))
    # +-3000 counts x 0.5 nJy/count: amplitude within 5%
    amp = (np.mean(curve[::2]) - np.mean(curve[1::2])) / 2
    assert amp == pytest.approx(1500.0, rel=0.05)


def test_associate_task_keeps_sources_inside_templates(epochs):
    diff0 = epochs[0][0]
    df, _ = detect_dia_sources(diff0)
    tpl = diff0[0:128, 0:256]  # a "patch" covering the lower half of the detector
    task = AssociateDiaTask({"radius_arcsec": 1.0})
    out = task.run([df], [tpl], data_ids={"dia_sources": [{"visit": 100, "detector": 3}]})
    obj = out["dia_object"]
    x, y = diff0.sky_to_pixel(obj.ra.to_numpy(), obj.dec.to_numpy())
    assert len(obj) >= 1 and np.all(y < 128)
    assert obj.attrs["units"]["ra"] == "deg"
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in df.columns})
    from procsky.errors import NoWorkError

    with pytest.raises(NoWorkError):
        task.run([empty], None)
