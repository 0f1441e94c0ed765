"""Sky maps: tract and patch geometry, look-ups, registration."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from procsky.errors import ConflictError, ProcskyKeyError
from procsky.skymap import (
    Box,
    SkyMap,
    discrete_skymap,
    load_skymap,
    register_skymap,
    rings_skymap,
)
from procsky.wcs import wcs_from_cards


@pytest.fixture(scope="module")
def rings():
    return rings_skymap(name="rings")


def test_rings_layout(rings):
    # LSST's RingsSkyMap with 120 rings has about 18.9 thousand tracts of ~1.5 deg.
    assert 18000 < len(rings) < 20000
    t = rings.tract(rings.find_tract(244.78, 12.07))
    assert t.n_patches == (7, 7)
    assert t.box.nx == 7 * 4000 + 200
    side = t.box.nx * 0.2 / 3600
    assert 1.4 < side < 1.7
    # Ids are stable: same config, same tract.
    again = rings_skymap(name="other")
    assert again.find_tract(244.78, 12.07) == t.id and again.config_hash == rings.config_hash
    assert again.tract(t.id) == t


def test_every_point_lands_inside_its_tract(rings):
    rng = np.random.default_rng(0)
    ra = rng.uniform(0, 360, 400)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 400)))
    ra = np.concatenate([ra, [0.0, 359.999, 10.0, 10.0]])
    dec = np.concatenate([dec, [0.0, 0.0, 89.99, -89.99]])
    for r, d in zip(ra, dec):
        t = rings.tract(rings.find_tract(r, d))
        x, y = t.wcs.world_to_pixel_values(r, d)
        # Inside the tract with margin for patch borders (overlap).
        assert 100 <= x < t.box.nx - 100 and 100 <= y < t.box.ny - 100, (r, d, t.id)


def test_patch_geometry(rings):
    t = rings.tract(5000)
    p = t.patch(8)
    assert p.index == (1, 1)
    assert p.inner == Box(4100, 4100, 8100, 8100)
    assert p.outer == Box(4000, 4000, 8200, 8200)
    assert p.shape == (4200, 4200) and p.xy0 == (4000, 4000)
    # The patch WCS is the tract WCS shifted to the outer-box origin.
    pw, tw = p.wcs, t.wcs
    for xx, yy in [(0, 0), (4199, 10), (2000, 3000)]:
        a = pw.pixel_to_world_values(xx, yy)
        b = tw.pixel_to_world_values(xx + 4000, yy + 4000)
        assert np.allclose(a, b, atol=1e-10)
    # The pixel scale is 0.2"/px at the tract centre.
    from procsky.wcs import pixel_scale

    assert abs(pixel_scale(t.wcs) - 0.2) < 1e-9
    with pytest.raises(ProcskyKeyError):
        t.patch(49)
    # Neighbouring patches overlap by twice the border.
    q = t.patch(9)
    assert p.outer.intersection(q.outer).nx == 200


def test_find_patches_of_a_footprint(rings):
    # A 2k x 4k detector with rotation, on the boundary between two tracts.
    edge = rings.tract(rings.find_tract(0.0, 0.7)).ra_range[1]
    cards = [
        ("CTYPE1", "RA---TAN", ""),
        ("CTYPE2", "DEC--TAN", ""),
        ("CRVAL1", edge, ""),
        ("CRVAL2", 0.7, ""),
        ("CRPIX1", 1024.0, ""),
        ("CRPIX2", 2048.0, ""),
        ("CD1_1", -7.2e-5 * np.cos(0.3), ""),
        ("CD1_2", 7.2e-5 * np.sin(0.3), ""),
        ("CD2_1", 7.2e-5 * np.sin(0.3), ""),
        ("CD2_2", 7.2e-5 * np.cos(0.3), ""),
    ]
    wcs = wcs_from_cards(cards, (4096, 2048))
    found = rings.find_patches(wcs, (4096, 2048))
    assert found
    # Every pixel of the detector (sampled) lies in the outer box of a listed patch.
    yy, xx = np.mgrid[0:4096:301, 0:2048:301]
    ra, dec = wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    hit = np.zeros(ra.shape, bool)
    for tid, patches in found.items():
        t = rings.tract(tid)
        x, y = t.wcs.world_to_pixel_values(ra, dec)
        for pid in patches:
            o = t.patch(pid).outer
            hit |= (o.x0 <= x) & (x < o.x1) & (o.y0 <= y) & (y < o.y1)
    assert hit.all()
    # The footprint straddles a tract boundary: both tracts are listed.
    assert len(found) >= 2


def test_discrete_skymap_and_registration(tmp_path):
    from procsky.repo import Repo

    sm = discrete_skymap([(244.78, 12.07), (10.0, -5.0)], radius=0.05, name="tc3", patch_inner=1000, patch_border=50)
    assert len(sm) == 2
    t = sm.tract(0)
    assert t.n_patches == (2, 2)
    assert sm.find_tract(244.79, 12.06) == 0
    found = sm.tracts_patches_for_sky([244.78], [12.07])
    assert list(found) == [0]
    # Pickle round trip (sky maps travel to workers).
    assert pickle.loads(pickle.dumps(sm)) == sm
    repo = Repo.create(tmp_path / "repo")
    assert register_skymap(repo, sm, tracts=True) == 3
    assert register_skymap(repo, sm) == 0  # idempotent
    back = load_skymap(repo, "tc3")
    assert back == sm and back.tract(1) == sm.tract(1)
    other = discrete_skymap([(1.0, 1.0)], radius=0.05, name="tc3")
    with pytest.raises(ConflictError):
        register_skymap(repo, other)
    with pytest.raises(ProcskyKeyError, match="register one"):
        load_skymap(repo, "nope")


def test_skymap_config_validation():
    from procsky.errors import ProcskyValueError

    with pytest.raises(ProcskyValueError, match="centre"):
        SkyMap({"kind": "discrete"})
    with pytest.raises(ProcskyValueError):
        SkyMap({"kind": "rings", "pixel_scale": -1})
