"""Reference catalogues: normalisation, HEALPix sharding, loading by cone and by WCS, CLI."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError
from procsky.refcat import (
    apply_proper_motion,
    ingest_refcat,
    list_refcats,
    load_refcat,
    load_refcat_for_wcs,
    normalise_refcat,
    read_refcat_file,
    shards_in_cone,
)
from procsky.repo import Repo

GAIA = sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "shared/data/real/legacysurvey/*/gaia/*.fits")))


def _sim_like(n=400, ra0=150.0, dec0=2.0, half=0.6, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "ref_id": np.arange(1, n + 1),
            "ra": ra0 + rng.uniform(-half, half, n) / np.cos(np.radians(dec0)),
            "dec": dec0 + rng.uniform(-half, half, n),
            "ra_err": np.full(n, 1e-7),
            "dec_err": np.full(n, 1e-7),
            "epoch_mjd": np.full(n, 57388.0),
            "mag_g": rng.uniform(15, 20, n),
            "mag_g_err": np.full(n, 0.01),
        }
    )
    return df


def _write_parquet(df, path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_pandas(df, preserve_index=False)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), b"units": json.dumps({"ra_err": "deg"}).encode()})
    pq.write_table(t, path)
    return path


def _wcs(ra0=150.0, dec0=2.0, n=512, scale=0.2):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    w.wcs.cd = [[-scale / 3600, 0], [0, scale / 3600]]
    w.wcs.set()
    return w


def test_normalise_sim_like_and_gaia_like():
    df = normalise_refcat(_sim_like(5))
    assert list(df.columns[:8]) == ["ref_id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "epoch_mjd"]
    assert df.attrs["units"]["mag_g"] == "mag(AB)" and df.attrs["units"]["ra_err"] == "deg"
    gaia = pd.DataFrame(
        {
            "source_id": [1, 2],
            "ra": [10.0, 10.1],
            "dec": [-5.0, -5.1],
            "ra_error": [0.36, 0.72],
            "dec_error": [3.6, 0.1],
            "pmra": [10.0, np.nan],
            "pmdec": [-20.0, np.nan],
            "ref_epoch": [2015.5, 2015.5],
            "phot_g_mean_mag": [17.0, 18.0],
            "phot_g_mean_flux_over_error": [1085.7, 108.57],
            "phot_bp_mean_mag": [17.5, np.nan],
            "phot_bp_mean_flux_over_error": [100.0, np.nan],
            "phot_rp_mean_mag": [16.5, np.nan],
            "phot_rp_mean_flux_over_error": [100.0, np.nan],
        }
    )
    g = normalise_refcat(gaia)
    assert g["ra_err"].tolist() == pytest.approx([1e-7, 2e-7])  # mas -> deg
    assert g["epoch_mjd"].iloc[0] == pytest.approx(51544.5 + 15.5 * 365.25)
    assert g["mag_G_err"].tolist() == pytest.approx([0.001, 0.01], rel=1e-3)
    # BP-RP = 1: G - r = -0.12879 + 0.24662 - 0.027464 - 0.049465
    assert g["mag_r"].iloc[0] == pytest.approx(17.0 - (-0.12879 + 0.24662 - 0.027464 - 0.049465))
    assert np.isnan(g["mag_r"].iloc[1]) and np.isnan(g["mag_r_err"].iloc[1])
    with pytest.raises(ProcskyValueError, match="ra/dec"):
        normalise_refcat(pd.DataFrame({"x": [1.0]}))


def test_proper_motion_moves_positions():
    df = normalise_refcat(
        pd.DataFrame(
            {
                "ra": [10.0, 20.0],
                "dec": [60.0, 0.0],
                "pmra": [3600.0, np.nan],
                "pmdec": [-3600.0, np.nan],
                "ref_epoch": [2000.0, 2000.0],
            }
        )
    )
    moved = apply_proper_motion(df, 51544.5 + 365.25)
    assert moved["dec"].iloc[0] == pytest.approx(60.0 - 3.6 / 3600, abs=1e-9)
    assert moved["ra"].iloc[0] == pytest.approx(10.0 + 3.6 / 3600 / np.cos(np.radians(60.0)), abs=1e-9)
    assert moved["ra"].iloc[1] == 20.0 and moved["epoch_mjd"].iloc[1] == pytest.approx(51544.5)


def test_ingest_shards_and_load(tmp_path):
    repo = Repo.create(tmp_path / "repo")
    cat = _sim_like()
    f = _write_parquet(cat, tmp_path / "ref.parquet")
    refs = ingest_refcat(repo, [f], "sim", healpix_level=8)
    assert len(refs) > 4  # a 1.2 deg field spans several level-8 (14 arcmin) shards
    total = sum(len(repo.get(r)) for r in refs)
    assert total == len(cat)
    assert list_refcats(repo)["sim"]["n_shards"] == len(refs)
    # a cone loads only the shards it needs, and exactly the sources inside it
    got = load_refcat(repo, "sim", 150.0, 2.0, 0.1)
    sep = np.hypot((cat.ra - 150.0) * np.cos(np.radians(2.0)), cat.dec - 2.0)
    assert set(cat.ref_id[sep < 0.1 - 1e-4]) <= set(got["ref_id"]) <= set(cat.ref_id[sep < 0.1 + 1e-4])
    keep = shards_in_cone([r.data_id for r in refs], 150.0, 2.0, 0.1)
    assert 0 < len(keep) < len(refs)
    # a detector footprint
    w = _wcs()
    det = load_refcat_for_wcs(repo, "sim", w, (512, 512), margin_px=0)
    x, y = w.world_to_pixel_values(cat.ra.to_numpy(), cat.dec.to_numpy())
    inside = (x > -0.5) & (x < 511.5) & (y > -0.5) & (y < 511.5)
    assert set(det["ref_id"]) == set(cat.ref_id[inside])
    by_id = det.set_index("ref_id")
    ids = cat.ref_id[inside].to_numpy()
    assert np.allclose(by_id.loc[ids, "x"], x[inside]) and np.allclose(by_id.loc[ids, "y"], y[inside])
    assert det.attrs["units"]["x"] == "pixel"
    with pytest.raises(ProcskyValueError, match="already has"):
        ingest_refcat(repo, [f], "sim")
    with pytest.raises(ProcskyKeyError, match="ingest-refcat"):
        load_refcat(repo, "nope", 150.0, 2.0, 0.1)


def test_bad_files(tmp_path):
    with pytest.raises(ProcskyFileError, match="no such"):
        read_refcat_file(tmp_path / "missing.parquet")
    p = tmp_path / "bad.parquet"
    p.write_text("not parquet")
    with pytest.raises(ProcskyFileError, match="cannot read"):
        read_refcat_file(p)
    q = tmp_path / "x.txt"
    q.write_text("1")
    with pytest.raises(ProcskyFileError, match="format"):
        read_refcat_file(q)


def test_cli_ingest_refcat(tmp_path):
    from click.testing import CliRunner

    from procsky.cli import main

    Repo.create(tmp_path / "repo")
    f = _write_parquet(_sim_like(50, half=0.05), tmp_path / "ref.parquet")
    res = CliRunner().invoke(main, ["ingest-refcat", str(tmp_path / "repo"), str(f), "--name", "sim"])
    assert res.exit_code == 0, res.output
    assert "ingested refcat 'sim'" in res.output
    res = CliRunner().invoke(main, ["ingest-refcat", str(tmp_path / "repo"), str(f), "--name", "sim"])
    assert res.exit_code != 0 and "already has" in res.output


@pytest.mark.skipif(not GAIA, reason="real Gaia subsets (../shared/data/real/legacysurvey) not available")
def test_ingest_real_gaia_chunks(tmp_path):
    repo = Repo.create(tmp_path / "repo")
    refs = ingest_refcat(repo, GAIA, "gaia_dr2")
    assert refs
    df = load_refcat(repo, "gaia_dr2", 244.78, 12.07, 0.05)
    assert len(df) > 5
    assert df["ra_err"].median() < 1e-6  # sub-mas..mas errors in degrees
    assert np.isfinite(df["mag_G"]).all()
    assert (df["epoch_mjd"] > 57000).all()
