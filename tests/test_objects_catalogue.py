"""The object catalogue of a patch end to end (detect, deblend, measure, force, tabulate)
against the truth of a multiband scene, through the ``make_objects`` task."""

from __future__ import annotations

import numpy as np
import pytest

from procsky.sim.coadd_scene import make_coadd_scene
from procsky.skymap import discrete_skymap
from procsky.tasks.objects import MakeObjectsTask


def _match(tx, ty, ox, oy, r=1.5):
    """Nearest object within ``r`` px of each truth position (-1 if none)."""
    from scipy.spatial import cKDTree

    if len(ox) == 0:
        return np.full(len(tx), -1)
    d, i = cKDTree(np.column_stack([ox, oy])).query(np.column_stack([tx, ty]))
    return np.where(d <= r, i, -1)


@pytest.fixture(scope="module")
def run():
    sm = discrete_skymap([(150.0, 2.0)], radius=0.015, name="t", pixel_scale=0.2, patch_inner=300, patch_border=40)
    tract = sm.tract(0)
    # The middle patch of the tract, so that part of the scene lies outside its inner box.
    pid = (tract.n_patches[1] // 2) * tract.n_patches[0] + tract.n_patches[0] // 2
    patch = sm.patch(0, pid)
    scene = make_coadd_scene(
        bands=("g", "r"),
        shape=patch.shape,
        n_stars=25,
        n_galaxies=30,
        n_pairs=8,
        wcs_cards=patch.wcs_cards,
        xy0=patch.xy0,
        seed=11,
    )
    task = MakeObjectsTask()
    coadds = [scene.exposures["g"], scene.exposures["r"]]
    data_id = {"skymap": "t", "tract": 0, "patch": pid}
    out = task.run(
        coadds,
        sm.to_record(),
        data_id=data_id,
        data_ids={"coadds": [{**data_id, "band": "g"}, {**data_id, "band": "r"}]},
    )
    return scene, patch, out


def test_object_table_against_truth(run):
    scene, patch, out = run
    obj, summary = out["object"], out["summary"]
    t = scene.truth
    real = obj[~obj["sky_object"]]
    prim = real[real["is_primary"]]
    # Tract pixels of the truth; inner region decides primary.
    tx, ty = t["x"].to_numpy() + patch.xy0[0], t["y"].to_numpy() + patch.xy0[1]
    inner = (tx >= patch.inner.x0) & (tx < patch.inner.x1 - 1) & (ty >= patch.inner.y0) & (ty < patch.inner.y1 - 1)
    sig = scene.sky_sigma["r"]
    fwhm_px = scene.psf_fwhm["r"] / scene.pixel_scale
    nea = 4 * np.pi * (fwhm_px / 2.3548) ** 2  # Gaussian-equivalent noise area
    snr = np.hypot(t["g_flux"], t["r_flux"]) / (sig * np.sqrt(nea))
    m = _match(tx, ty, real["x"].to_numpy(), real["y"].to_numpy())
    # Resolvable: no brighter truth object within 2 FWHM (closer companions are the
    # deblender's harder cases, judged by the benchmark).
    from scipy.spatial import cKDTree

    flux = (t["g_flux"] + t["r_flux"]).to_numpy()
    near = cKDTree(np.column_stack([tx, ty])).query_ball_point(np.column_stack([tx, ty]), 2 * fwhm_px)
    resolvable = np.array([all(flux[j] <= flux[i] for j in js if j != i) for i, js in enumerate(near)])
    bright = (snr >= 10) & inner & resolvable
    assert (m[bright] >= 0).mean() >= 0.95, (m[bright] >= 0).mean()
    # Every primary object has a truth counterpart (spurious < 1 %, here at most one).
    back = _match(prim["x"].to_numpy(), prim["y"].to_numpy(), tx, ty, r=2.0)
    assert (back < 0).sum() <= max(1, int(0.01 * len(prim))), prim[back < 0][["x", "y"]]
    # Each truth object inside the inner region is counted once by a primary object.
    mp = _match(tx, ty, prim["x"].to_numpy(), prim["y"].to_numpy())
    hits = mp[bright & (mp >= 0)]
    assert len(np.unique(hits)) == len(hits)
    # Isolated bright stars: PSF flux within 0.5 % of truth (median), g-r within 5 mmag rms.
    isolated = np.array([len(js) == 1 for js in near])
    stars = (t["kind"] == "star") & isolated & (snr > 50) & (m >= 0)
    rows = real.iloc[m[stars]]
    for b in ("g", "r"):
        rel = rows[f"{b}_psf_flux"].to_numpy() / t.loc[stars, f"{b}_flux"].to_numpy() - 1
        assert abs(np.median(rel)) < 0.005, (b, np.median(rel))
    # g-r: no systematic offset (< 5 mmag) and residuals as the errors say (pull std ~ 1).
    gr = -2.5 * np.log10(rows["g_psf_flux"].to_numpy() / rows["r_psf_flux"].to_numpy())
    gr_t = -2.5 * np.log10(t.loc[stars, "g_flux"].to_numpy() / t.loc[stars, "r_flux"].to_numpy())
    gr_err = (
        1.0857
        * np.hypot(rows["g_psf_flux_err"] / rows["g_psf_flux"], rows["r_psf_flux_err"] / rows["r_psf_flux"]).to_numpy()
    )
    assert abs(np.median(gr - gr_t)) * 1000 < 5.0
    assert 0.6 < np.std((gr - gr_t) / gr_err) < 1.4, np.std((gr - gr_t) / gr_err)
    # Stars and galaxies of S/N > 50 classified by extendedness >= 95 %.
    sel = (snr > 50) & (m >= 0) & isolated
    ext = real["ref_extendedness"].to_numpy()[m[sel]]
    assert (ext == (t.loc[sel, "kind"] == "galaxy").to_numpy()).mean() >= 0.95
    # Sky objects scatter as their errors say (within 3 standard errors of a std of n values).
    for b in ("g", "r"):
        p = summary["sky_object_pulls"][b]
        assert p["n"] >= 20 and abs(p["std"] - 1) < 3 / np.sqrt(2 * p["n"]), summary["sky_object_pulls"]
    assert obj.attrs["units"]["g_psf_flux"] == "nJy"
    assert summary["n_objects"] >= len(prim)
