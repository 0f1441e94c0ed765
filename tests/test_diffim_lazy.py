"""Lazy differences: building one computes nothing; computing it runs the subtraction once
and gives the numbers the eager path gives; the stored difference measures as in memory."""

from __future__ import annotations

import json

import dask
import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

import procsky.diffim as dm
import procsky.diffim.subtract as dm_subtract
from procsky.diffim import SubtractionConfig, simulate_pair, subtract_images
from procsky.errors import ProcskyValueError
from procsky.exposure import Exposure, VisitInfo
from procsky.photocalib import PhotoCalib
from procsky.psf import psf_from_dict

_CFG = SubtractionConfig(spatial_order=0, degrees=(4, 2, 2))


def _same(a: dict, b: dict) -> bool:
    """Equal dicts, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def _no_compute(*args, **kwargs):
    raise AssertionError("a dask graph was computed")


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -10.0]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


@pytest.fixture(scope="module")
def pair():
    shape = (160, 160)
    sci, tpl, truth = simulate_pair(
        shape,
        n_stars=100,
        seeing_science=(2.2, 2.2),
        seeing_template=1.5,
        seed=5,
        n_transients=3,
        transient_flux=(8000.0, 10000.0),
        wcs=_wcs(shape),
    )
    # the same calibration: the pair is drawn at one flux scale (the kernel sum is ~1)
    sci.photocalib = PhotoCalib(0.5)
    tpl.photocalib = PhotoCalib(0.5)
    sci.visit_info = VisitInfo(mjd=60010.0, band="g", visit=20)
    return sci, tpl, truth


def test_subtract_images_builds_without_computing_and_computes_once(pair, monkeypatch):
    sci, tpl, _ = pair
    eager, k0, s0 = subtract_images(sci, tpl, _CFG, lazy=False)
    calls = []
    real = dm_subtract._subtract_now

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(dm_subtract, "_subtract_now", counting)
    with dask.config.set(scheduler=_no_compute):
        diff, kern, summary = subtract_images(sci, tpl, _CFG)
    assert diff.is_lazy and not calls
    with dask.config.set(scheduler="synchronous"):
        got = diff.compute()  # planes, PSF and metadata in one call: the subtraction runs once
        assert diff.psf.to_dict() == eager.psf.to_dict()
        assert len(calls) == 1
        # parts computed on their own run it again, as any dask collection computed separately
        assert _same(summary.compute(), s0) and kern.compute().to_dict() == k0.to_dict()
    assert len(calls) == 3
    for a, b in ((got.image, eager.image), (got.variance, eager.variance), (got.mask, eager.mask)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert _same(got.metadata["diffim"], s0)


def test_lazy_errors_at_build_need_no_pixels(pair):
    sci, tpl, _ = pair
    with dask.config.set(scheduler=_no_compute), pytest.raises(ProcskyValueError, match="warp the template"):
        subtract_images(sci, tpl[0:100, 0:100])


def test_stored_difference_measures_as_in_memory(pair, tmp_path):
    from procsky.tasks.dia import DetectDiaTask

    sci, tpl, truth = pair
    with dask.config.set(scheduler=_no_compute):
        lazy = dm.difference_image(sci, [tpl], _CFG)
    eager = dm.difference_image(sci, [tpl], _CFG, lazy=False)
    with dask.config.set(scheduler="synchronous"):
        lazy.write(tmp_path / "diff.zarr")
    stored = Exposure.read(tmp_path / "diff.zarr").compute()
    for a, b in ((stored.image, eager.image), (stored.variance, eager.variance), (stored.mask, eager.mask)):
        np.testing.assert_array_equal(a, b)
    assert lazy.psf.to_dict() == eager.psf.to_dict()
    assert stored.psf.to_dict() == psf_from_dict(eager.psf.to_dict()).to_dict()  # the storage round trip
    did = {"diff": {"instrument": "x", "visit": 20, "detector": 1}}
    a = DetectDiaTask().run(stored, sci, data_ids=did)
    b = DetectDiaTask().run(eager, sci, data_ids=did)
    pd.testing.assert_frame_equal(a["dia_source"], b["dia_source"])
    assert len(a["dia_source"]) >= 3
    assert _same(a["summary"], b["summary"]) and a["summary"]["n_dia_sources"] == len(a["dia_source"])


def test_lazy_difference_computes_on_a_distributed_cluster(pair, tmp_path):
    """The graph of a lazy difference holds only picklable tasks whose inputs are the pixel
    planes: a notebook's Client (worker processes) computes and writes it."""
    from distributed import Client, LocalCluster

    sci, tpl, _ = pair
    eager, _, s0 = subtract_images(sci, tpl, _CFG, lazy=False)
    # Zarr-backed inputs, as the pipeline reads them.
    sci.write(tmp_path / "sci.zarr", chunks=64)
    tpl.write(tmp_path / "tpl.zarr", chunks=64)
    lazy_sci, lazy_tpl = Exposure.read(tmp_path / "sci.zarr"), Exposure.read(tmp_path / "tpl.zarr")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        diff, _, _ = subtract_images(lazy_sci, lazy_tpl, _CFG)
        diff.write(tmp_path / "diff.zarr")
    got = Exposure.read(tmp_path / "diff.zarr").compute()
    np.testing.assert_array_equal(got.image, eager.image)
    np.testing.assert_array_equal(got.variance, eager.variance)
    np.testing.assert_array_equal(got.mask, eager.mask)
    assert got.psf.to_dict() == psf_from_dict(eager.psf.to_dict()).to_dict()
    assert _same(got.metadata["diffim"], json.loads(json.dumps(s0)))


def test_eager_convolution_is_the_lazy_one():
    """The subtraction convolves its numpy planes at once (``_convolve_exposure_now``): the
    chunks, margins and values of the dask path (``convolve_exposure_arrays``), bit for bit."""
    from procsky.kernels import psfmatch as pm

    rng = np.random.default_rng(5)
    basis = pm.make_basis([1.0, 2.0], [2, 1], 5)
    coeffs = rng.normal(size=(basis.n_basis, 3)) * 0.1
    coeffs[0, 0] = 1.0
    kern = pm.MatchingKernel(basis, coeffs, 1, np.zeros(1), 0, (230, 200))
    img = rng.normal(size=(150, 170)).astype(np.float32)
    var = rng.uniform(1, 2, size=img.shape).astype(np.float32)
    msk = np.where(rng.uniform(size=img.shape) < 0.01, 1 << 3, 0).astype(np.uint32)
    for chunk in (64, 256):  # several chunks (through dask), one chunk (called directly)
        kw = dict(xy0=(40, 30), spread_bits=1 << 3, core_bits=0, chunk=chunk)
        lazy = dask.compute(*dm_subtract.convolve_exposure_arrays(img, var, msk, kern, **kw))
        now = dm_subtract._convolve_exposure_now(img, var, msk, kern, **kw)
        for a, b in zip(lazy, now):
            np.testing.assert_array_equal(a, b)
