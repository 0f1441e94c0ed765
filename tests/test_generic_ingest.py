"""Generic ingest keeps what real headers carry (issue 19 item 5): zero points, FILTER -> band,
companion mask/weight files, an exposure id from a named keyword. Synthetic FITS in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from click.testing import CliRunner

from procsky.cli import main
from procsky.errors import ProcskyFileError, ProcskyValueError
from procsky.instruments import ingest_files
from procsky.instruments.generic import filter_to_band
from procsky.masks import DEFAULT_PLANES
from procsky.photocalib import AB_NJY_ZP
from procsky.repo import Repo

SHAPE = (24, 32)


@pytest.fixture
def repo(tmp_path):
    return Repo.create(tmp_path / "repo")


def _frame(path, seed=0, ra=150.0, **cards):
    """A small image with a TAN WCS and the given header cards ((value, comment) tuples allowed)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, 2.0]
    w.wcs.crpix = [16, 12]
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    hdr = w.to_header()
    hdr["DATE-OBS"] = "2021-03-04T05:06:07"
    hdr["EXPTIME"] = 30.0
    for k, v in cards.items():
        hdr[k] = v
    data = np.random.default_rng(seed).normal(100.0, 5.0, SHAPE).astype(np.float32)
    fits.PrimaryHDU(data, header=hdr).writeto(path)
    return path


def _get(repo, ref):
    return repo.get(ref).compute()


# ------------------------------------------------------------------------ zero point
def test_zero_point_keywords_into_photocalib(repo, tmp_path):
    files = [
        _frame(tmp_path / "ztf.fits", 1, FILTER="ZTF_r", EXPID=1, MAGZP=26.3, MAGZPUNC=0.01),
        _frame(tmp_path / "eso.fits", 2, FILTER="r", EXPID=2, PHOTZP=27.1, MAGZERO=99.0),
        # MAGZP=0 is "not calibrated": skipped, MAGZERO used; MAGZP outranks PHOTZP when both are valid
        _frame(tmp_path / "mz.fits", 3, FILTER="r", EXPID=3, MAGZP=0.0, MAGZERO=25.5),
        _frame(tmp_path / "both.fits", 4, FILTER="r", EXPID=4, MAGZP=24.0, PHOTZP=28.0),
        # per second by its comment, and PTF's IMAGEZPT per second by definition
        _frame(tmp_path / "rate.fits", 5, FILTER="r", EXPID=5, ZP=(22.0, "mag zero point for 1 s")),
        _frame(tmp_path / "ptf.fits", 6, FILTER="r", EXPID=6, IMAGEZPT=22.0),
        # an image already in counts per second: no scaling
        _frame(tmp_path / "cps.fits", 7, FILTER="r", EXPID=7, ZP=(22.0, "per second"), BUNIT="ADU/s"),
        _frame(tmp_path / "f0.fits", 8, FILTER="r", EXPID=8, FLUXMAG0=1e11),
        _frame(tmp_path / "none.fits", 9, FILTER="r", EXPID=9),
    ]
    refs = {r.data_id["visit"]: r for r in ingest_files(repo, files, "generic")}
    zp = {v: (_get(repo, r).photocalib) for v, r in refs.items()}
    assert zp[1].zero_point == pytest.approx(26.3, abs=1e-9)
    assert zp[1].zero_point_err == pytest.approx(0.01, rel=1e-6)
    # counts * calibration = nJy: a 26.3 mag source gives one count
    assert zp[1].counts_to_njy(1.0) == pytest.approx(10 ** (-0.4 * (26.3 - AB_NJY_ZP)))
    assert zp[2].zero_point == pytest.approx(27.1)
    assert zp[3].zero_point == pytest.approx(25.5)
    assert zp[4].zero_point == pytest.approx(24.0)
    assert zp[5].zero_point == pytest.approx(22.0 + 2.5 * np.log10(30.0))
    assert zp[6].zero_point == pytest.approx(22.0 + 2.5 * np.log10(30.0))
    assert zp[7].zero_point == pytest.approx(22.0)
    assert zp[8].zero_point == pytest.approx(27.5)
    assert zp[9] is None
    meta = _get(repo, refs[5]).metadata
    assert meta["zero_point_keyword"] == "ZP" and meta["zero_point_per_second"] is True
    assert _get(repo, refs[3]).metadata["zero_point_skipped"] == ["MAGZP=0.0"]


def test_zero_point_key_and_unit_override(repo, tmp_path):
    f = _frame(tmp_path / "a.fits", FILTER="g", EXPID=11, MAGZP=26.0, MYZP=20.0)
    (ref,) = ingest_files(repo, [f], "generic", zero_point_key="MYZP", zero_point_unit="per-second")
    assert _get(repo, ref).photocalib.zero_point == pytest.approx(20.0 + 2.5 * np.log10(30.0))
    g = _frame(tmp_path / "b.fits", FILTER="g", EXPID=12, IMAGEZPT=22.0)
    (ref,) = ingest_files(repo, [g], "generic", zero_point_unit="image")
    assert _get(repo, ref).photocalib.zero_point == pytest.approx(22.0)


# ------------------------------------------------------------------------ bands
@pytest.mark.parametrize(
    "name, band",
    [
        ("ZTF_r", "r"),
        ("ZTF_g", "g"),
        ("zr", "r"),
        ("zi", "i"),
        ("r DECam SDSS c0002 6430.0 1500.0", "r"),
        ("VR DECam c0007 6300.0 2600.0", "VR"),
        ("g'", "g"),
        ("SDSS g", "g"),
        ("rp", "r"),
        ("HSC-R2", "r"),
        ("HSC-I", "i"),
        ("HSC-Y", "y"),
        ("g.00000", "g"),
        ("Y", "y"),
        ("V", "V"),
        ("R", "R"),
        ("I", "I"),
        ("Johnson V", "V"),
        ("Rc", "R"),
        ("Ks", "Ks"),
        ("o", "o"),
        ("Clear", "clear"),
        ("N964 DECam c0008 9645.0 94.0", None),
        ("Halpha", None),
    ],
)
def test_filter_to_band_table(name, band):
    assert filter_to_band(name) == band


def test_band_map_and_physical_filter(repo, tmp_path):
    files = [
        _frame(tmp_path / "a.fits", 1, FILTER="ZTF_r", EXPID=1),
        _frame(tmp_path / "b.fits", 2, FILTER="Halpha", EXPID=2),
        _frame(tmp_path / "c.fits", 3, FILTER="R", EXPID=3),
        _frame(tmp_path / "d.fits", 4, FILTER="r DECam SDSS c0002 6430.0 1500.0", BAND="r", EXPID=4),
    ]
    # an unknown filter stops the whole ingest, naming the option, before anything is written
    with pytest.raises(ProcskyValueError, match=r"no band for filter 'Halpha'.*--band-map 'Halpha=BAND'"):
        ingest_files(repo, files, "generic")
    assert repo.query() == []
    refs = ingest_files(repo, files, "generic", band_map={"halpha": "N656", "R": "r"})
    got = {r.data_id["visit"]: (r.data_id["band"], r.data_id["physical_filter"]) for r in refs}
    assert got == {
        1: ("r", "ZTF_r"),
        2: ("N656", "Halpha"),  # case-insensitive user entry
        3: ("r", "R"),  # the user maps Johnson R to r
        4: ("r", "r DECam SDSS c0002 6430.0 1500.0"),  # physical_filter keeps the raw value
    }
    assert _get(repo, refs[0]).visit_info.band == "r"


def test_unmatched_filter_fallbacks(tmp_path):
    f = _frame(tmp_path / "a.fits", FILTER="Halpha 6563/3", EXPID=5)
    for mode, band in (("unknown", "unknown"), ("keep", "Halpha_6563_3")):
        repo = Repo.create(tmp_path / mode)
        (ref,) = ingest_files(repo, [f], "generic", unmatched_filter=mode)
        assert ref.data_id["band"] == band and ref.data_id["physical_filter"] == "Halpha 6563/3"
    # no filter keyword at all: band 'unknown' as before
    repo = Repo.create(tmp_path / "nofilter")
    (ref,) = ingest_files(repo, [_frame(tmp_path / "n.fits", EXPID=6)], "generic")
    assert ref.data_id["band"] == "unknown"


# ------------------------------------------------------------------------ mask and weight
def test_companion_mask_and_weight(repo, tmp_path):
    img = _frame(tmp_path / "sci.fits", FILTER="g", EXPID=1)
    values = np.zeros(SHAPE, np.int32)
    values[1, 2] = 1  # -> BAD (default)
    values[3, 4] = 4  # bit 2 -> SAT
    values[5, 6] = 4 | 16  # SAT and (unmapped bit 4) BAD
    fits.PrimaryHDU(values).writeto(tmp_path / "sci_mask.fits")
    rms = np.full(SHAPE, 2.0, np.float32)
    rms[7, 8] = 0.0  # no data
    fits.PrimaryHDU(rms).writeto(tmp_path / "sci.rms.fits")
    (ref,) = ingest_files(
        repo,
        [img],
        "generic",
        mask_pattern="{stem}_mask.fits",
        mask_planes={2: "SAT"},
        weight_pattern="{stem}.rms.fits",
        weight_kind="rms",
    )
    exp = _get(repo, ref)
    bad, sat, nd = (1 << DEFAULT_PLANES[p] for p in ("BAD", "SAT", "NO_DATA"))
    assert exp.mask[1, 2] == bad and exp.mask[3, 4] == sat and exp.mask[5, 6] == sat | bad
    assert exp.mask[7, 8] == nd and np.isnan(exp.variance[7, 8])
    assert np.count_nonzero(exp.mask) == 4
    v = exp.variance.copy()
    v[7, 8] = 4.0
    np.testing.assert_array_equal(v, 4.0)


def test_weight_kinds_and_missing_companion(tmp_path):
    img = _frame(tmp_path / "x.fits", FILTER="g", EXPID=1)
    w = np.full(SHAPE, 0.25, np.float32)
    fits.PrimaryHDU(w).writeto(tmp_path / "x.weight.fits")
    for kind, var in (("invvar", 4.0), ("variance", 0.25)):
        repo = Repo.create(tmp_path / kind)
        (ref,) = ingest_files(repo, [img], "generic", weight_pattern="{stem}.weight.fits", weight_kind=kind)
        np.testing.assert_allclose(_get(repo, ref).variance, var)
    repo = Repo.create(tmp_path / "missing")
    with pytest.raises(ProcskyFileError, match="no mask file .*x_bpm.fits"):
        ingest_files(repo, [img], "generic", mask_pattern="{stem}_bpm.fits")
    # a good-pixel map: zeros are bad
    good = np.ones(SHAPE, np.uint8)
    good[0, 0] = 0
    fits.PrimaryHDU(good).writeto(tmp_path / "x_good.fits")
    (ref,) = ingest_files(repo, [img], "generic", mask_pattern="{stem}_good.fits", mask_good_nonzero=True)
    m = _get(repo, ref).mask
    assert m[0, 0] == 1 << DEFAULT_PLANES["BAD"] and np.count_nonzero(m) == 1
    with pytest.raises(ProcskyValueError, match="valid options"):
        ingest_files(repo, [img], "generic", mask_patern="x")
    with pytest.raises(ProcskyValueError, match="takes no ingest options"):
        ingest_files(repo, [img], "simcam", visit_key="EXPID")


# ------------------------------------------------------------------------ visit id
def test_shared_date_obs_needs_visit_key(repo, tmp_path):
    files = [
        _frame(tmp_path / f"f{k}.fits", k, ra=150 + k, FILTER="ZTF_r", FRAMEID=f"ztf_2021_{k:03d}") for k in (1, 2)
    ]
    with pytest.raises(ProcskyValueError, match=r"same isr_exposure data ID.*visit from DATE-OBS.*--visit-key"):
        ingest_files(repo, files, "generic")
    assert repo.query() == []
    refs = ingest_files(repo, files, "generic", visit_key="FRAMEID")
    assert len({r.data_id["visit"] for r in refs}) == 2
    assert _get(repo, refs[0]).metadata["visit_source"] == "FRAMEID"
    g = _frame(tmp_path / "g.fits", FILTER="g", EXPID=4242)
    (ref,) = ingest_files(repo, [g], "generic", visit_key="EXPID")
    assert ref.data_id["visit"] == 4242
    with pytest.raises(ProcskyValueError, match="no NOPE keyword"):
        ingest_files(repo, [g], "generic", visit_key="NOPE")


def test_cli_generic_options(tmp_path):
    runner = CliRunner()
    repo_path = tmp_path / "r"
    assert runner.invoke(main, ["repo", "create", str(repo_path)]).exit_code == 0
    files = [str(_frame(tmp_path / f"f{k}.fits", k, FILTER="Halpha", EXPNO=k + 10, MAGZP=25.0)) for k in (1, 2)]
    fits.PrimaryHDU(np.zeros(SHAPE, np.int16)).writeto(tmp_path / "f1_mask.fits")
    fits.PrimaryHDU(np.ones(SHAPE, np.int16)).writeto(tmp_path / "f2_mask.fits")
    base = ["ingest", str(repo_path), *files, "-i", "generic", "--no-progress"]
    res = runner.invoke(main, base)
    assert res.exit_code != 0 and "--band-map" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, [*base, "--band-map", "Halpha=N656"])
    assert res.exit_code != 0 and "--visit-key" in res.output
    res = runner.invoke(
        main, [*base, "--band-map", "Halpha=N656", "--visit-key", "EXPNO", "--mask-pattern", "{stem}_mask.fits"]
    )
    assert res.exit_code == 0, res.output
    repo = Repo(repo_path)
    refs = sorted(repo.query("isr_exposure"), key=lambda r: r.data_id["visit"])
    assert [(r.data_id["visit"], r.data_id["band"]) for r in refs] == [(11, "N656"), (12, "N656")]
    e1, e2 = (_get(repo, r) for r in refs)
    assert np.count_nonzero(e1.mask) == 0 and np.all(e2.mask == 1 << DEFAULT_PLANES["BAD"])
    assert e1.photocalib.zero_point == pytest.approx(25.0)
    res = runner.invoke(main, [*base, "--mask-bit", "x=SAT"])
    assert res.exit_code != 0 and "--mask-bit" in res.output


def test_substitution_pattern_and_ignored_bits(repo, tmp_path):
    """ZTF-style names (``_sciimg`` -> ``_mskimg``) and a bit that marks sources, ignored."""
    img = _frame(tmp_path / "ztf_20210304_sciimg.fits", FILTER="ZTF_g", EXPID=7, MAGZP=26.0)
    values = np.zeros(SHAPE, np.int16)
    values[2, 3] = 2  # bit 1: a source pixel
    values[4, 5] = 2 | 32  # a saturated source pixel
    values[6, 7] = 1  # bit 0: a track -> BAD by default
    fits.PrimaryHDU(values).writeto(tmp_path / "ztf_20210304_mskimg.fits")
    (ref,) = ingest_files(repo, [img], "generic", mask_pattern="s/sciimg/mskimg/", mask_planes={1: "none", 5: "SAT"})
    m = _get(repo, ref).mask
    assert m[2, 3] == 0 and m[4, 5] == 1 << DEFAULT_PLANES["SAT"] and m[6, 7] == 1 << DEFAULT_PLANES["BAD"]
    assert np.count_nonzero(m) == 2
    with pytest.raises(ProcskyValueError, match="does not match"):
        ingest_files(repo, [img], "generic", mask_pattern="s/nomatch/x/")
