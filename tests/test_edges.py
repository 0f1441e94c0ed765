"""The smaller edges a newcomer meets in the first hour (issue 17).

Misspelled dimensions in ``--where``, command-line errors that name command-line flags,
truncated FITS files at ingest, units that astropy sees in catalogue Parquet files, BUNIT
in exported FITS, cut-outs from ``procsky export``, the git commit in the version, and the
licence and changelog files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from procsky.cli import main
from procsky.errors import ProcskyFileError, ProcskyValueError
from procsky.repo import Repo


@pytest.fixture
def repo(tmp_path):
    return Repo.create(tmp_path / "repo")


def _fill(repo):
    repo.add_dimension_records(
        "visit",
        [{"instrument": "simcam", "visit": v, "band": "g" if v % 2 else "r", "physical_filter": "x"} for v in (1, 2)],
    )
    for v in (1, 2):
        repo.put(pd.DataFrame({"v": [v]}), "src", {"instrument": "simcam", "visit": v, "detector": 0}, "run1")
    # a free data-ID key (not a standard dimension) on one dataset type only
    repo.put({"n": 1}, "metrics", {"visit": 1, "day_obs": 20260101}, "run1")


# ------------------------------------------------------------------ 1. unknown names in where
def test_query_refuses_unknown_dimension_with_a_hint(repo):
    _fill(repo)
    with pytest.raises(ProcskyValueError) as info:
        repo.query("src", "vist=1")
    msg = str(info.value)
    assert "'vist' (did you mean 'visit'?)" in msg
    assert "known dimensions:" in msg and "detector" in msg and "band" in msg
    # the error crosses process boundaries like every procsky error
    assert str(pickle.loads(pickle.dumps(info.value))) == msg
    # also under NOT, where a NULL column would have matched nothing as well
    with pytest.raises(ProcskyValueError, match="did you mean 'detector'"):
        repo.query(where="NOT detectr IN (1, 2)")
    # known names still work, including a free data-ID key carried by some dataset
    assert len(repo.query("src", "visit=1")) == 1
    assert len(repo.query("src", "run='run1' AND dataset_type='src'")) == 2
    assert len(repo.query(where="day_obs=20260101")) == 1
    assert len(repo.query("metrics", "day_obs > 0")) == 1
    # ... but not for a dataset type none of whose datasets has that key
    with pytest.raises(ProcskyValueError, match="'day_obs'.*not a dimension of src"):
        repo.query("src", "day_obs=20260101")


def test_cli_query_unknown_dimension(repo):
    _fill(repo)
    res = CliRunner().invoke(main, ["query", str(repo.root), "src", "--where", "vist=1"])
    assert res.exit_code != 0
    assert "did you mean 'visit'?" in res.output
    assert "Traceback" not in res.output


# ------------------------------------------------ 2. command-line errors name command-line flags
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """One simulated `tiny` calibrated frame (visit 1, detector 0), ~3 MB, a few seconds."""
    pytest.importorskip("galsim")
    from procsky.sim import simulate

    out = tmp_path_factory.mktemp("tiny1")
    res = simulate("tiny", out, visits=[1], detectors=[0], scheduler="sync", workers=1, progress=False)
    return res.images[0]


def test_cli_repo_create_existing_names_the_flag(tmp_path):
    root = tmp_path / "r"
    runner = CliRunner()
    assert runner.invoke(main, ["repo", "create", str(root)]).exit_code == 0
    res = runner.invoke(main, ["repo", "create", str(root)])
    assert res.exit_code != 0
    assert "--exist-ok" in res.output and "exist_ok=True" not in res.output
    assert runner.invoke(main, ["repo", "create", str(root), "--exist-ok"]).exit_code == 0
    # Python callers keep the Python remedy.
    with pytest.raises(ProcskyFileError, match="exist_ok=True"):
        Repo.create(root)


def test_cli_ingest_record_conflict_names_the_flag(repo, tiny_file):
    from procsky.instruments import get_instrument, ingest_files
    from procsky.repo.registry import RecordConflictError

    rec = dict(get_instrument("simcam").ingest_file(tiny_file)[0].records["visit"][0])
    rec["airmass"] = rec["airmass"] + 0.5  # as if the header had been corrected since
    repo.add_dimension_records("visit", [rec])
    runner = CliRunner()
    res = runner.invoke(main, ["ingest", str(repo.root), str(tiny_file), "-i", "simcam", "--no-progress"])
    assert res.exit_code != 0
    assert "--replace-records" in res.output and "replace=True" not in res.output
    assert "visit" in res.output
    assert repo.query() == []  # stopped before writing anything
    # The Python layers name their own arguments, and the error pickles with its details.
    with pytest.raises(RecordConflictError, match="replace_records=True") as info:
        ingest_files(repo, [tiny_file], "simcam")
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.element == "visit"
    with pytest.raises(RecordConflictError, match="pass replace=True"):
        repo.add_dimension_records("visit", [rec | {"airmass": 9.0}])
    res = runner.invoke(
        main, ["ingest", str(repo.root), str(tiny_file), "-i", "simcam", "--no-progress", "--replace-records"]
    )
    assert res.exit_code == 0, res.output
    assert len(repo.query("isr_exposure")) == 1
    assert repo.dimension_records("visit")[0]["airmass"] != rec["airmass"]


def test_cli_skymap_conflict_names_no_python_argument(repo):
    runner = CliRunner()
    base = ["skymap", "register", str(repo.root), "sm", "--kind", "discrete", "--center", "150,2", "--radius", "0.02"]
    assert runner.invoke(main, base).exit_code == 0
    res = runner.invoke(main, base[:-1] + ["0.03"])
    assert res.exit_code != 0
    assert "another name" in res.output and "replace=True" not in res.output


# ---------------------------------------------------------------- 3. truncated FITS at ingest
@pytest.mark.parametrize("instrument", ["simcam", "generic", "decam-cp", "90prime-cp", "mosaic3-cp", "noirlab-cp"])
def test_ingest_truncated_fits_says_truncated(repo, tiny_file, tmp_path, instrument):
    from procsky.instruments import ingest_files, instrument_names

    assert set(instrument_names()) <= {"simcam", "generic", "decam-cp", "90prime-cp", "mosaic3-cp", "noirlab-cp"}, (
        "a new instrument: add it to this test"
    )
    data = tiny_file.read_bytes()
    # named like a CP InstCal image so that every loader gets as far as reading it
    cut = tmp_path / "c4d_260101_000000_ooi_g_v1.fits"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProcskyFileError) as info:
        ingest_files(repo, [cut], instrument)
    msg = str(info.value)
    assert cut.name in msg and "truncated" in msg
    assert f"has {len(data) // 2} bytes" in msg and "headers describe at least" in msg
    assert repo.query() == []


def test_truncated_fits_messages(repo, tiny_file, tmp_path):
    from procsky.exposure import Exposure
    from procsky.instruments import get_instrument
    from procsky.instruments.base import check_fits_complete

    check_fits_complete(tiny_file)  # a whole file passes
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.fits"
    # cut inside a header, inside the pixels, and exactly after the primary HDU
    for n, want in (
        (1000, "ends inside the header of HDU #0"),
        (len(data) // 2, "HDU #2 MASK"),
        (2880, "ends after HDUs ['PRIMARY']"),
    ):
        cut.write_bytes(data[:n])
        for read in (Exposure.read, get_instrument("simcam").ingest_file):
            with pytest.raises(ProcskyFileError, match="truncated or corrupt") as info:
                read(cut)
            assert want in str(info.value) and f"{n} bytes" in str(info.value)
    cut.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(main, ["ingest", str(repo.root), str(cut), "-i", "simcam", "--no-progress"])
    assert res.exit_code != 0 and "cut.fits is truncated or corrupt" in res.output


# -------------------------------------------------- 4. astropy sees the units of catalogue Parquet
def _src_like(n=5):
    from procsky.tasks.calibrate import SRC_UNITS

    rng = np.random.default_rng(1)
    df = pd.DataFrame({name: rng.normal(size=n) for name in SRC_UNITS})
    df["psf_flux"] = rng.uniform(1e3, 1e5, n)
    df["flag_edge"] = rng.uniform(size=n) > 0.5
    df["id"] = np.arange(n, dtype=np.int64)
    df["kind"] = ["star", "galaxy", "star", "cr", "star"][:n]
    df.attrs["units"] = {**SRC_UNITS, "psf_flux": "nJy", "ref_mag": "mag(AB)"}
    df.attrs["meta"] = {"flux_unit": "nJy", "zero_point": 27.25, "photometry_status": "ok"}
    return df


def test_parquet_units_visible_to_astropy_pandas_and_dask(repo):
    import dask.dataframe as dd
    import pyarrow.parquet as pq
    from astropy import units as u
    from astropy.table import Table

    df = _src_like()
    df["ref_mag"] = 20.0
    ref = repo.put(df, "src", {"instrument": "simcam", "visit": 1, "detector": 0}, "run1")
    path = repo.path(ref)
    t = Table.read(path)
    assert t["ra"].unit == u.deg and t["psf_flux"].unit == u.nJy
    assert t["x"].unit == u.pix and t["ixx"].unit == u.pix**2
    assert t["sky"].unit == u.nJy / u.pix
    assert str(t["ref_mag"].unit) == "mag(AB)"
    assert t["flag_edge"].unit is None and t["flag_edge"].dtype == bool
    assert list(t["kind"]) == list(df["kind"])
    assert t.meta["zero_point"] == 27.25 and t.meta["photometry_status"] == "ok"
    assert t.colnames == list(df.columns)
    # pandas, dask and procsky read the same file as before, procsky metadata intact
    pd.testing.assert_frame_equal(pd.read_parquet(path), df, check_like=False)
    # (dask adds the hive-style folders of the data-ID path, instrument=simcam/..., as columns)
    got = dd.read_parquet(str(path)).compute().reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(df.columns)], df, check_dtype=False)  # dask: its own string dtype
    back = repo.get(ref)
    assert back.attrs["units"]["ra"] == "deg" and back.attrs["meta"]["zero_point"] == 27.25
    md = pq.read_schema(path).metadata
    assert b"procsky.units" in md and b"procsky.meta" in md and b"pandas" in md
    assert pq.read_schema(path).field("ra").metadata[b"unit"] == b"deg"


def test_parquet_astropy_table_and_edge_cases(repo):
    from astropy import units as u
    from astropy.table import Table

    t = Table({"flux": [1.0, 2.0], "name": ["a", "bcd"]}, meta={"origin": "test"})
    t["flux"].unit = u.nJy
    t["flux"].description = "PSF flux"
    ref = repo.put(t, "tbl", {"visit": 1}, "run1")
    back = Table.read(repo.path(ref))
    assert back["flux"].unit == u.nJy and back["flux"].description == "PSF flux"
    assert back.meta == {"origin": "test"} and list(back["name"]) == ["a", "bcd"]
    # an empty table with a string column, and a frame with a non-default index
    empty = pd.DataFrame({"s": pd.Series([], dtype=object), "v": np.array([], dtype=np.float32)})
    empty.attrs["units"] = {"v": "mas"}
    ref = repo.put(empty, "tbl", {"visit": 2}, "run1")
    back = Table.read(repo.path(ref))
    assert len(back) == 0 and back["v"].unit == u.mas
    indexed = pd.DataFrame({"v": [1.0, 2.0]}, index=pd.Index([10, 20], name="obj"))
    indexed.attrs["units"] = {"v": "s"}
    ref = repo.put(indexed, "tbl", {"visit": 3}, "run1")
    back = Table.read(repo.path(ref))
    assert back["v"].unit == u.s and list(back["obj"]) == [10, 20]
    pd.testing.assert_frame_equal(pd.read_parquet(repo.path(ref)), indexed)


# ----------------------------------------------------------------- 5. BUNIT in exported FITS
def _exposure(metadata=None, detector=None, photocalib=None, shape=(40, 50)):
    from astropy.wcs import WCS

    from procsky.exposure import Exposure

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [20.0, 15.0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    rng = np.random.default_rng(3)
    img = rng.normal(size=shape).astype(np.float32)
    return Exposure(
        img,
        np.full(shape, 2.0, np.float32),
        np.zeros(shape, np.uint32),
        wcs=w,
        metadata=metadata,
        detector=detector,
        photocalib=photocalib,
    )


def test_fits_bunit_follows_the_recorded_pixel_unit(tmp_path, tiny_file):
    from astropy import units as u
    from astropy.io import fits

    from procsky.exposure import Exposure
    from procsky.photocalib import PhotoCalib

    def headers(exp):
        path = exp.write(tmp_path / "x.fits")
        with fits.open(path) as h:
            return h["IMAGE"].header, h["VARIANCE"].header, h["MASK"].header

    # simulated calibrated frame: counts in ADU with a PhotoCalib
    sim = Exposure.read(tiny_file)
    assert sim.photocalib is not None and sim.image_unit == "adu"
    ih, vh, mh = headers(sim)
    assert ih["BUNIT"] == "adu" and vh["BUNIT"] == "adu2" and "MAGZERO" in ih.comments["BUNIT"]
    assert u.Unit(vh["BUNIT"]) == u.adu**2
    assert "BUNIT" not in mh and any("bit" in str(c).lower() for c in mh["COMMENT"])
    # ISR output in electrons (the raw's "adu" replaced by ISR's units)
    isr = _exposure({"units": "electron"}, {"image_units": "electron"}, PhotoCalib(0.5))
    ih, vh, _ = headers(isr)
    assert ih["BUNIT"] == "electron" and u.Unit(vh["BUNIT"]) == u.electron**2
    # warp/coadd: nJy per pixel, even when a calexp's "units" rides along in the metadata
    coadd = _exposure({"flux_unit": "nJy", "units": "electron"}, {"image_units": "electron"})
    ih, vh, _ = headers(coadd)
    assert ih["BUNIT"] == "nJy" and u.Unit(vh["BUNIT"]) == u.nJy**2
    assert coadd.to_xarray()["image"].attrs["units"] == "nJy"
    # a master dark is a rate
    ih, vh, _ = headers(_exposure({"units": "adu/s"}, {"image_units": "adu"}))
    assert u.Unit(ih["BUNIT"]) == u.adu / u.s and u.Unit(vh["BUNIT"]) == (u.adu / u.s) ** 2
    # nothing recorded: no guess
    ih, vh, _ = headers(_exposure())
    assert "BUNIT" not in ih and "BUNIT" not in vh


# ----------------------------------------------------------------- 6. cut-outs from procsky export
@pytest.fixture
def export_repo(repo):
    """A mostly empty 'coadd' (NaN and NO_DATA outside rows 8-30, columns 12-50) in a repository."""
    from procsky.masks import DEFAULT_PLANES

    exp = _exposure({"flux_unit": "nJy"}, shape=(60, 80))
    no_data = np.ones(exp.shape, bool)
    no_data[8:31, 12:51] = False
    exp.image[no_data & (np.arange(80)[None, :] % 2 == 0)] = np.nan  # NaN on some, NO_DATA on all
    exp.mask[no_data] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
    repo.put(exp, "coadd_test", {"skymap": "sm", "tract": 0, "patch": 1, "band": "r"}, "run1")
    return repo, exp


def _export(repo, tmp_path, *args):
    out = tmp_path / "out.fits"
    res = CliRunner().invoke(
        main, ["export", str(repo.root), "coadd_test", "--where", "patch=1", "--out", str(out), *args]
    )
    return res, out


def _same_sky(parent, cut, x0, y0, path):
    """The cut-out's pixel (i, j) and the parent's (x0 + i, y0 + j) are the same sky position,
    in procsky and in the written FITS header."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS

    xs, ys = np.array([0.0, 3.0, cut.shape[1] - 1.0]), np.array([0.0, 5.0, cut.shape[0] - 1.0])
    want = np.array(parent.pixel_to_sky(xs + x0, ys + y0))
    np.testing.assert_allclose(np.array(cut.pixel_to_sky(xs, ys)), want, rtol=0, atol=1e-10)
    with fits.open(path) as h, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy notes on the LTV cards
        hdr = h["IMAGE"].header
        got = np.array(WCS(hdr).pixel_to_world_values(xs, ys))
        assert (hdr["LTV1"], hdr["LTV2"]) == (-x0, -y0) and hdr["BUNIT"] == "nJy"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_export_bbox(export_repo, tmp_path):
    from procsky.exposure import Exposure

    repo, exp = export_repo
    res, out = _export(repo, tmp_path, "--bbox", "10,5,40,25")
    assert res.exit_code == 0, res.output
    assert "x 10:40, y 5:25 (of 80 x 60)" in res.output
    cut = Exposure.read(out)
    np.testing.assert_array_equal(cut.image, exp.image[5:25, 10:40])
    np.testing.assert_array_equal(cut.mask, exp.mask[5:25, 10:40])
    np.testing.assert_array_equal(cut.variance, exp.variance[5:25, 10:40])
    assert cut.xy0 == (10, 5)
    _same_sky(exp, cut, 10, 5, out)
    # a box reaching past the edge is clipped to the image
    res, out = _export(repo, tmp_path, "--bbox", "70,50,100,90")
    assert res.exit_code == 0 and Exposure.read(out).shape == (10, 10)


def test_export_center_size_and_trim(export_repo, tmp_path):
    from procsky.exposure import Exposure

    repo, exp = export_repo
    ra, dec = (float(v) for v in exp.pixel_to_sky(30.0, 20.0))
    for size in ("11", "2.2arcsec", "0.03667arcmin"):  # 0.2 arcsec pixels
        res, out = _export(repo, tmp_path, "--center", f"{ra:.10f},{dec:.10f}", "--size", size)
        assert res.exit_code == 0, res.output
        cut = Exposure.read(out)
        assert cut.shape == (11, 11) and cut.xy0 == (25, 15)
        np.testing.assert_allclose(cut.sky_to_pixel(ra, dec), (5.0, 5.0), atol=1e-6)
        np.testing.assert_array_equal(cut.image, exp.image[15:26, 25:36])
        _same_sky(exp, cut, 25, 15, out)
    # --trim: the box of the pixels with data
    res, out = _export(repo, tmp_path, "--trim")
    assert res.exit_code == 0, res.output
    cut = Exposure.read(out)
    assert cut.shape == (23, 39) and cut.xy0 == (12, 8)
    np.testing.assert_array_equal(cut.image, exp.image[8:31, 12:51])
    _same_sky(exp, cut, 12, 8, out)
    # --trim inside a cut-out
    res, out = _export(repo, tmp_path, "--bbox", "0,0,20,20", "--trim")
    assert res.exit_code == 0 and Exposure.read(out).xy0 == (12, 8) and Exposure.read(out).shape == (12, 8)
    assert exp.data_bbox() == (12, 8, 51, 31)


def test_export_cutout_errors(export_repo, tmp_path):
    repo, exp = export_repo
    ra, dec = (float(v) for v in exp.pixel_to_sky(30.0, 20.0))
    for args, want in (
        (["--bbox", "1,2,3"], "4 comma-separated integers"),
        (["--bbox", "10,10,5,20"], "X1 must exceed X0"),
        (["--bbox", "100,100,120,120"], "misses this 80 x 60 exposure"),
        (["--bbox", "1,1,5,5", "--center", f"{ra},{dec}", "--size", "5"], "not both"),
        (["--center", f"{ra},{dec}"], "go together"),
        (["--center", f"{ra + 1},{dec}", "--size", "5"], "outside this exposure"),
        (["--center", f"{ra},{dec}", "--size", "5 furlongs"], "neither a number of pixels nor an angle"),
        (["--bbox", "0,0,10,5", "--trim"], "no pixel of the cut-out has data"),
    ):
        res, _ = _export(repo, tmp_path, *args)
        assert res.exit_code != 0 and want in res.output, (args, res.output)


# --------------------------------------------------------------- 7. the commit in the version
def test_version_carries_the_git_commit(repo):
    import shutil
    import subprocess

    import procsky
    from procsky import _version

    info = procsky.version_info()
    assert info.version == _version.release()
    root = _version._ROOT
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not running from a git checkout")
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # HEAD may move while this runs (commits by others): compare with a fresh read
    assert _version.git_commit.__wrapped__(root) == head
    assert procsky.__version__.startswith(info.version + "+g")
    assert info.dirty in (True, False)
    assert _version.code_version() == str(info)
    ref = repo.put({"n": 1}, "metrics", {"visit": 1}, "run1")
    assert ref.provenance["code_version"] == _version.code_version()


def test_git_commit_read_from_dot_git(tmp_path):
    from procsky._version import VersionInfo, _git_dirty, git_commit

    read = git_commit.__wrapped__  # uncached
    sha, sha2 = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
    root = tmp_path / "co"
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    assert read(root) is None  # no HEAD
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert read(root) is None  # unborn branch
    (root / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha2} refs/heads/main\n")
    assert read(root) == sha2
    (root / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert read(root) == sha  # a loose ref wins over packed-refs
    (root / ".git" / "HEAD").write_text(sha2 + "\n")
    assert read(root) == sha2  # detached
    # a worktree: .git is a file pointing at its git dir, branches in the common dir
    wt = tmp_path / "wt"
    wt.mkdir()
    gd = root / ".git" / "worktrees" / "wt"
    gd.mkdir(parents=True)
    (gd / "HEAD").write_text("ref: refs/heads/main\n")
    (gd / "commondir").write_text("../..\n")
    (wt / ".git").write_text(f"gitdir: {gd}\n")
    assert read(wt) == sha
    assert read(tmp_path / "nowhere") is None
    assert _git_dirty(tmp_path / "nowhere") is None  # git refuses: unknown, no exception
    assert str(VersionInfo("0.1.0", sha, True)) == "0.1.0+g0123456.dirty"
    assert str(VersionInfo("0.1.0", sha, False)) == "0.1.0+g0123456"
    assert str(VersionInfo("0.1.0")) == "0.1.0"
    assert str(VersionInfo("0.0.0+unknown", sha)) == "0.0.0+unknown.g0123456"
