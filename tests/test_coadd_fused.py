"""The fused warp-into-accumulator of the plain weighted-mean coadd, and Lanczos3's
written-out taps: the same sums and samples as warping full planes and adding them."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from procsky import masks
from procsky.coadd import CoaddConfig, build_coadd
from procsky.exposure import Exposure
from procsky.kernels.coadd import MeanAccumulator
from procsky.kernels.warp import warp_planes
from procsky.skymap import Box
from procsky.warp import WarpConfig, _chunk_boxes, _make_warp_source, source_box
from test_coadd import make_skymap, make_stars, make_visit

BAD = masks.DEFAULT_PLANES.bitmask(("NO_DATA", "BAD", "SAT", "EDGE"))
NO_DATA = masks.bit("NO_DATA")


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """Two calexps (one with SAT and NO_DATA pixels and a NaN) stored as Zarr, and a patch."""
    stars = make_stars(16, half=25.0)
    folder = tmp_path_factory.mktemp("fused")
    calexps = []
    for k in range(2):
        exp = make_visit(k, stars, shape=(220, 240))
        if k == 1:
            exp.mask[50:53, 60:64] |= np.uint32(masks.bit("SAT"))
            exp.mask[120, 30:90] |= np.uint32(NO_DATA)
            exp.image[150, 150] = np.nan
        exp.write(folder / f"c{k}.zarr", chunks=64)
        calexps.append(Exposure.read(folder / f"c{k}.zarr"))
    return calexps, make_skymap(inner=260).patch(0, 0)


def test_fused_accumulation_is_the_plane_path(field):
    """Warping each calexp straight into the mean's sums gives the sums of warping its
    planes (``read``) and adding them, bit for bit, on every chunk of the patch (edges,
    corners, chunks a calexp only grazes)."""
    calexps, patch = field
    cfg = WarpConfig(chunk=96)
    full = Box(0, 0, patch.shape[1], patch.shape[0])
    n_chunks = n_fused = 0
    for k, c in enumerate(calexps):
        src = _make_warp_source(c, patch.wcs_cards, cfg, source_box(c, patch.wcs_cards, patch.shape), k)
        for row in _chunk_boxes(full, cfg.chunk):
            for b in row:
                a = MeanAccumulator(b.shape, BAD)
                src.accumulate(b, None, a, 0.7 + k)
                ref = MeanAccumulator(b.shape, BAD)
                ref.add(*src.read(b), 0.7 + k)
                for name in ("sw", "swi", "sw2v", "mask_or", "n"):
                    np.testing.assert_array_equal(getattr(a, name), getattr(ref, name), err_msg=name)
                n_chunks += 1
                n_fused += int(ref.n.any())
    assert n_chunks == 2 * 16 and n_fused >= 20


def test_fused_coadd_matches_the_warped_planes_coadd(field):
    """The coadd of the calexps (fused path) against the coadd of their warps (planes
    made first): image within 1e-5 of its rms, identical masks and n_inputs."""
    calexps, patch = field
    cfg = CoaddConfig(reject_artifacts=False, warp=WarpConfig(chunk=96))
    fused = build_coadd(calexps, patch, config=cfg, inputs_are_warps=False)
    fi, fv, fm, fn = dask.compute(fused.image, fused.variance, fused.mask, fused.n_inputs)
    from procsky.warp import warp_exposure

    warps = [warp_exposure(c, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=cfg.warp) for c in calexps]
    planes = build_coadd(warps, patch, config=cfg, inputs_are_warps=True)
    pi, pv, pm, pn = dask.compute(planes.image, planes.variance, planes.mask, planes.n_inputs)
    np.testing.assert_array_equal(fn, pn)
    np.testing.assert_array_equal(fm, pm)
    ok = fn > 0
    assert ok.mean() > 0.5 and (fn == 2).any() and (fn == 1).any()
    rms = np.std(pi[ok])
    assert np.max(np.abs(fi[ok] - pi[ok])) <= 1e-5 * rms
    np.testing.assert_allclose(fv[ok], pv[ok], rtol=1e-6)


def test_lanczos3_written_out_taps_are_the_general_loops():
    """Lanczos3 samples whose taps all have weight take written-out straight-line code; its
    image and variance are bit-identical to the general loops (taken here with a mask
    radius below the order), and its mask is the OR over the whole footprint."""
    rng = np.random.default_rng(3)
    shape = (90, 100)
    image = rng.normal(10, 3, shape).astype(np.float32)
    var = rng.uniform(0.5, 2, shape).astype(np.float32)
    msk = np.zeros(shape, np.uint32)
    msk[40, 50] = masks.bit("SAT")
    yy, xx = np.mgrid[0:80, 0:80].astype(float)
    th = 0.3
    xin = 12 + 0.77 * (np.cos(th) * xx - np.sin(th) * yy) + 20
    yin = 5 + 0.77 * (np.sin(th) * xx + np.cos(th) * yy)
    fast = warp_planes(image, var, msk, xin, yin, 1.7)
    loops = warp_planes(image, var, msk, xin, yin, 1.7, mask_radius=2.999)
    ok = np.isfinite(fast[0])
    assert ok.mean() > 0.5
    np.testing.assert_array_equal(fast[0], loops[0])
    np.testing.assert_array_equal(fast[1], loops[1])
    sat = (fast[2] & masks.bit("SAT")) != 0
    # the whole 6 x 6 footprint: every sample within 3 px per axis of the SAT pixel
    near = (np.abs(xin - 50) < 3) & (np.abs(yin - 40) < 3)
    np.testing.assert_array_equal(sat[ok], near[ok])
