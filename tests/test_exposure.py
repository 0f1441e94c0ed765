"""Exposure data model: storage round trips, WCS fidelity, laziness, pickling."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from conftest import raise_if_dask_computes
from procsky import Exposure, VisitInfo
from procsky.errors import ProcskyFileError, ProcskyValueError
from procsky.masks import DEFAULT_PLANES, MaskPlanes, bit
from procsky.photocalib import PhotoCalib, mag_to_njy, njy_to_mag
from procsky.psf import GaussianPsf, ImagePsf, PolynomialImagePsf, psf_from_dict
from procsky.wcs import wcs_cards


def _quiet_wcs(header):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _tpv_header(real_data):
    path = next((real_data / "legacysurvey" / "testcase3" / "images").rglob("*_ooi_*.fits"))
    with fits.open(path) as h:
        return h[1].header.copy(), h[1].data.shape


def _sip_header(real_data):
    hdr = (
        fits.Header.fromtextfile(str(real_data / "ccdproc" / "sip-wcs.fit"))
        if False
        else fits.getheader(real_data / "ccdproc" / "sip-wcs.fit")
    )
    return hdr


def _random_exposure(shape, cards, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    image.flat[::97] = np.float32(np.nan)  # NaN payloads must survive too
    variance = rng.uniform(1, 2, size=shape).astype(np.float32)
    mask = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    return Exposure(
        image,
        variance,
        mask,
        wcs_cards=cards,
        psf=GaussianPsf.from_fwhm(3.5, 0.05, -0.02),
        photocalib=PhotoCalib.from_zero_point(28.3, 0.01),
        visit_info=VisitInfo(exposure_time=30.0, mjd=60000.5, band="r", physical_filter="r_03", visit=7, airmass=1.2),
        detector={"id": 3, "name": "R0C1", "gain": 1.7},
        metadata={"note": "test", "nested": {"a": [1, 2]}},
    )


def _assert_same(a: Exposure, b: Exposure):
    a, b = a.compute(), b.compute()
    assert np.array_equal(a.image.view(np.uint32), b.image.view(np.uint32)), "image bits differ"
    assert np.array_equal(a.variance.view(np.uint32), b.variance.view(np.uint32)), "variance bits differ"
    assert np.array_equal(a.mask, b.mask), "mask bits differ"
    assert a.psf == b.psf
    assert a.photocalib == b.photocalib
    assert a.visit_info == b.visit_info
    assert a.detector == b.detector and a.metadata == b.metadata
    assert a.mask_planes == b.mask_planes and a.xy0 == b.xy0


def _max_sky_sep_arcsec(w1, w2, shape, step=3):
    yy, xx = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    a = np.array(w1.pixel_to_world_values(xx.ravel(), yy.ravel()))
    b = np.array(w2.pixel_to_world_values(xx.ravel(), yy.ravel()))
    dra = (a[0] - b[0]) * np.cos(np.deg2rad(a[1]))
    return float(np.max(np.hypot(dra, a[1] - b[1])) * 3600)


@pytest.mark.parametrize("suffix", [".zarr", ".fits", ".fits.gz"])
@pytest.mark.parametrize("kind", ["tpv", "sip"])
def test_round_trip_exact(tmp_path, real_data, suffix, kind):
    if kind == "tpv":
        header, shape = _tpv_header(real_data)
    else:
        header = _sip_header(real_data)
        shape = (60, 80)
    cards = wcs_cards(header)
    exp = _random_exposure(shape, cards)
    path = exp.write(tmp_path / f"exp{suffix}")
    back = Exposure.read(path)
    _assert_same(exp, back)
    # Stored cards are the original ones, verbatim (TPV PV terms / SIP A_, B_ kept).
    assert [c[0] for c in back.wcs_cards] == [c[0] for c in cards]
    if kind == "tpv":
        assert any(k.startswith("PV1_") for k, *_ in back.wcs_cards)
    else:
        assert any(k.startswith("A_") for k, *_ in back.wcs_cards)
    assert _max_sky_sep_arcsec(_quiet_wcs(header), back.wcs, shape) < 1e-6


def test_sip_distortion_is_used(real_data):
    header = _sip_header(real_data)
    w = _quiet_wcs(header)
    assert w.sip is not None
    exp = _random_exposure((60, 80), wcs_cards(w))
    assert exp.wcs.sip is not None
    assert _max_sky_sep_arcsec(w, exp.wcs, (60, 80)) < 1e-6


def test_zarr_is_lazy_and_slices_lazily(tmp_path):
    exp = _random_exposure((300, 200), [], seed=2)
    exp.write(tmp_path / "e.zarr", chunks=100)
    with raise_if_dask_computes():
        back = Exposure.read(tmp_path / "e.zarr")
        cut = back[50:150, 20:180]
        ds = cut.to_xarray()
        assert cut.is_lazy and ds["image"].chunks is not None
        assert back.image.chunksize == (100, 100)
    np.testing.assert_array_equal(cut.image.compute(), exp.image[50:150, 20:180])
    assert cut.xy0 == (20, 50)


def test_zarr_codecs_and_zstd_stores_read(tmp_path):
    """Float planes are stored with Blosc-LZ4 (shuffled), the mask with zstd; a store whose
    float planes are zstd-compressed (as written before) reads back identically."""
    import zarr

    exp = _random_exposure((120, 90), [], seed=3)
    exp.write(tmp_path / "e.zarr", chunks=64)
    g = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")
    for name in ("image", "variance"):
        (codec,) = g[name].compressors
        assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "lz4"
    assert type(g["mask"].compressors[0]).__name__ == "ZstdCodec"
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    for name in ("image", "variance", "mask"):
        old.create_array(name, data=np.asarray(g[name][...]), chunks=(64, 64), dimension_names=("y", "x"))
    old.attrs["procsky"] = g.attrs["procsky"]
    assert type(old["image"].compressors[0]).__name__ == "ZstdCodec"
    for path in ("e.zarr", "old.zarr"):
        back = Exposure.read(tmp_path / path).compute()
        np.testing.assert_array_equal(back.image, exp.image)
        np.testing.assert_array_equal(back.variance, exp.variance)
        np.testing.assert_array_equal(back.mask, exp.mask)


def test_cutout_wcs_follows(real_data):
    header, shape = _tpv_header(real_data)
    exp = _random_exposure(shape, wcs_cards(header))
    cut = exp[10:30, 5:25]
    ra, dec = cut.pixel_to_sky([0, 3], [0, 7])
    ra0, dec0 = exp.pixel_to_sky([5, 8], [10, 17])
    np.testing.assert_allclose(ra, ra0, atol=1e-12)
    np.testing.assert_allclose(dec, dec0, atol=1e-12)


def test_unaligned_dask_write_refused(tmp_path):
    import dask.array as da

    img = da.zeros((200, 200), chunks=(70, 70), dtype=np.float32)
    exp = Exposure(img)
    with pytest.raises(ProcskyValueError, match="align"):
        exp.write(tmp_path / "bad.zarr", chunks=64)
    exp.write(tmp_path / "ok.zarr", chunks=70)  # dask chunks are the storage chunks: fine


def test_region_writer_refuses_unaligned(tmp_path):
    from procsky.exposure import create_zarr_exposure, write_zarr_region

    g = create_zarr_exposure(tmp_path / "c.zarr", (100, 100), 50, Exposure(np.zeros((1, 1))).attributes())
    write_zarr_region(g, 50, 0, {"image": np.ones((50, 50), np.float32)})
    with pytest.raises(ProcskyValueError, match="not aligned"):
        write_zarr_region(g, 25, 0, {"image": np.ones((50, 50), np.float32)})
    back = Exposure.read(tmp_path / "c.zarr").compute()
    assert back.image[50:, :50].sum() == 2500 and back.image[:50].sum() == 0


def test_pickle_round_trip():
    exp = _random_exposure((20, 30), [], seed=3)
    _assert_same(exp, pickle.loads(pickle.dumps(exp)))
    for psf in (GaussianPsf(2.0, 0.1, 0.0), ImagePsf(np.outer([1, 2, 1], [1, 2, 1]))):
        assert pickle.loads(pickle.dumps(psf)) == psf


def test_read_errors(tmp_path):
    with pytest.raises(ProcskyFileError, match="no such"):
        Exposure.read(tmp_path / "missing.zarr")
    p = tmp_path / "junk.fits"
    p.write_bytes(b"not a fits file at all")
    with pytest.raises(ProcskyFileError):
        Exposure.read(p)
    with pytest.raises(ProcskyValueError, match="format"):
        Exposure(np.zeros((2, 2))).write(tmp_path / "x.txt")


def test_mask_planes():
    assert [
        DEFAULT_PLANES[n]
        for n in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA")
    ] == list(range(9))
    planes = MaskPlanes().with_plane("GHOST")
    assert planes["GHOST"] not in DEFAULT_PLANES.values()
    assert bit("SAT") == 2
    with pytest.raises(KeyError, match="unknown mask plane"):
        DEFAULT_PLANES["NOPE"]
    # Remapping to a map with other bit numbers keeps the meaning of every bit.
    target = MaskPlanes({n: 31 - b for n, b in DEFAULT_PLANES.items()})
    m = np.array([bit("SAT") | bit("CR")], dtype=np.uint32)
    out = DEFAULT_PLANES.remap(m, target)
    assert out[0] == (1 << target["SAT"]) | (1 << target["CR"])


def test_psf_models():
    g = GaussianPsf.from_fwhm(4.0)
    assert g.kernel(0, 0).sum() == pytest.approx(1.0)
    # Pixel-integrated kernel moments agree with the analytic ones (plus the 1/12 px^2 box term).
    from procsky.psf import image_moments

    _, _, ixx, iyy, ixy = image_moments(g.kernel(0, 0))
    assert ixx == pytest.approx(g.moments()[0] + 1 / 12, rel=2e-3)
    img = ImagePsf(g.kernel(0, 0))
    assert img.fwhm(10, 10) == pytest.approx(np.sqrt((4.0 / 2.3548) ** 2 + 1 / 12) * 2.3548, rel=5e-3)
    # A shifted render moves the centroid by the offset.
    xc, yc, *_ = image_moments(img.render(0, 0, offset=(0.3, -0.2)))
    assert xc == pytest.approx(0.3, abs=0.01) and yc == pytest.approx(-0.2, abs=0.01)
    # Polynomial PSF: linear variation of width across the detector.
    k1, k2 = GaussianPsf(1.5).kernel(), GaussianPsf(2.0).kernel()
    n = max(k1.shape[0], k2.shape[0])
    k1 = np.pad(k1, (n - k1.shape[0]) // 2)
    coeffs = np.stack([(k1 + k2) / 2, (k2 - k1) / 2, np.zeros_like(k2)])
    poly = PolynomialImagePsf(coeffs, 1, 1000, 1000, 1000, 1000)
    assert poly.fwhm(0, 1000) < poly.fwhm(2000, 1000)
    for model in (g, img, poly):
        assert psf_from_dict(model.to_dict()) == model


def test_photocalib():
    pc = PhotoCalib.from_zero_point(27.0, 0.003)
    assert pc.zero_point == pytest.approx(27.0)
    assert pc.zero_point_err == pytest.approx(0.003)
    assert pc.counts_to_mag(1.0) == pytest.approx(27.0)
    assert njy_to_mag(mag_to_njy(22.5)) == pytest.approx(22.5)
    assert mag_to_njy(31.4) == pytest.approx(1.0)


def test_fits_write_is_deterministic_and_takes_extra_cards(tmp_path):
    import hashlib
    import time

    exp = _random_exposure((30, 40), [], seed=5)
    exp.write(tmp_path / "a.fits", primary_header={"GAIN": 1.5, "DATASEC": "[1:40,1:30]"})
    time.sleep(1.1)
    exp.write(tmp_path / "b.fits", primary_header={"GAIN": 1.5, "DATASEC": "[1:40,1:30]"})
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.fits", "b.fits")]
    assert digest[0] == digest[1]
    assert fits.getheader(tmp_path / "a.fits", 0)["GAIN"] == 1.5
    _assert_same(exp, Exposure.read(tmp_path / "a.fits"))
