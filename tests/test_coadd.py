"""Coaddition: laziness, flux and astrometry against truth, noise, artifacts, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from procsky import masks
from procsky.coadd import CoaddConfig, WarpConfig, build_coadd, warp_exposure
from procsky.exposure import Exposure, VisitInfo
from procsky.photocalib import PhotoCalib
from procsky.psf import GaussianPsf
from procsky.skymap import discrete_skymap
from procsky.wcs import wcs_from_cards

RA0, DEC0 = 150.0, 2.0


# ----------------------------------------------------------------------------- synthetic data
def make_skymap(inner=300, border=20, scale=0.2):
    return discrete_skymap(
        [(RA0, DEC0)],
        radius=inner * scale / 3600 / 2 * 0.999,
        pixel_scale=scale,
        patch_inner=inner,
        patch_border=border,
        name="test",
    )


def make_stars(n=25, seed=1, half=30.0, fmin=2e5, fmax=2e6):
    """Stars on a jittered grid (arcsec half-width ``half``), fluxes in nJy."""
    rng = np.random.default_rng(seed)
    k = int(math.ceil(math.sqrt(n)))
    g = np.linspace(-half, half, k)
    xx, yy = np.meshgrid(g, g)
    dx = (xx.ravel()[:n] + rng.uniform(-1, 1, n)) / 3600.0
    dy = (yy.ravel()[:n] + rng.uniform(-1, 1, n)) / 3600.0
    dec = DEC0 + dy
    ra = RA0 + dx / math.cos(math.radians(DEC0))
    flux = np.exp(rng.uniform(np.log(fmin), np.log(fmax), n))
    return ra, dec, flux


def visit_cards(seed, shape=(380, 380), scale=0.26, sip=True):
    rng = np.random.default_rng(1000 + seed)
    th = math.radians(rng.uniform(0, 360))
    s = scale / 3600.0
    ra = RA0 + rng.uniform(-4, 4) / 3600.0
    dec = DEC0 + rng.uniform(-4, 4) / 3600.0
    cards = [
        ("CTYPE1", "RA---TAN-SIP" if sip else "RA---TAN", ""),
        ("CTYPE2", "DEC--TAN-SIP" if sip else "DEC--TAN", ""),
        ("CRVAL1", ra, ""),
        ("CRVAL2", dec, ""),
        ("CRPIX1", shape[1] / 2 + rng.uniform(-5, 5), ""),
        ("CRPIX2", shape[0] / 2 + rng.uniform(-5, 5), ""),
        ("CD1_1", -s * math.cos(th), ""),
        ("CD1_2", s * math.sin(th), ""),
        ("CD2_1", s * math.sin(th), ""),
        ("CD2_2", s * math.cos(th), ""),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
    ]
    if sip:
        cards += [
            ("A_ORDER", 2, ""),
            ("B_ORDER", 2, ""),
            ("A_2_0", 2e-6 * rng.normal(), ""),
            ("A_1_1", 1e-6 * rng.normal(), ""),
            ("A_0_2", 1e-6, ""),
            ("B_2_0", 1e-6, ""),
            ("B_1_1", -2e-6 * rng.normal(), ""),
            ("B_0_2", 1e-6 * rng.normal(), ""),
        ]
    return cards


def render_gaussians(shape, x, y, counts, sigma):
    """Pixel-integrated circular Gaussians (exact box integrals)."""
    img = np.zeros(shape)
    r = int(math.ceil(6 * sigma))
    s2 = math.sqrt(2) * sigma
    for xi, yi, c in zip(x, y, counts):
        ix, iy = int(round(xi)), int(round(yi))
        x0, x1 = max(0, ix - r), min(shape[1], ix + r + 1)
        y0, y1 = max(0, iy - r), min(shape[0], iy + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1)
        ys = np.arange(y0, y1)
        fx = 0.5 * (erf((xs + 0.5 - xi) / s2) - erf((xs - 0.5 - xi) / s2))
        fy = 0.5 * (erf((ys + 0.5 - yi) / s2) - erf((ys - 0.5 - yi) / s2))
        img[y0:y1, x0:x1] += c * fy[:, None] * fx[None, :]
    return img


def make_visit(k, stars, *, shape=(380, 380), sky_sigma=None, noise=True, extra=None, flux_scale=None, seed=0):
    """One calexp: stars (ra, dec, flux nJy), WCS with rotation/offset/SIP, PhotoCalib, noise."""
    ra, dec, flux = stars
    rng = np.random.default_rng(seed * 7919 + k)
    cards = visit_cards(k, shape)
    wcs = wcs_from_cards(cards, shape)
    x, y = wcs.world_to_pixel_values(ra, dec)
    cal = PhotoCalib(10 ** (-0.4 * (rng.uniform(27.0, 28.0) - 31.4)))
    fwhm = rng.uniform(3.0, 4.2)
    psf = GaussianPsf.from_fwhm(fwhm)
    f = flux if flux_scale is None else flux * flux_scale
    counts = f / cal.calibration
    img = render_gaussians(shape, x, y, counts, psf.sigma)
    sky = sky_sigma if sky_sigma is not None else rng.uniform(4.0, 8.0)
    var = np.full(shape, sky**2) + np.maximum(img, 0) / 4.0
    if extra is not None:
        img = img + extra(k, shape)
    if noise:
        img = img + rng.normal(size=shape) * np.sqrt(var)
    exp = Exposure(
        img.astype(np.float32),
        var.astype(np.float32),
        wcs_cards=cards,
        psf=psf,
        photocalib=cal,
        visit_info=VisitInfo(band="r", visit=k, exposure_time=30.0),
    )
    return exp


def measure(image, x, y, r=12.0):
    import sep

    data = np.ascontiguousarray(np.nan_to_num(image).astype(np.float64))
    flux, _, flag = sep.sum_circle(data, np.asarray(x, float), np.asarray(y, float), r, subpix=5)
    xw, yw, _ = sep.winpos(data, np.asarray(x, float), np.asarray(y, float), np.full(len(x), 1.6))
    return flux, xw, yw, flag


# ----------------------------------------------------------------------------- tests
def test_build_coadd_is_lazy(tmp_path):
    from conftest import raise_if_dask_computes

    sm = make_skymap()
    patch = sm.patch(0, 0)
    stars = make_stars(9)
    paths = []
    for k in range(3):
        p = tmp_path / f"v{k}.zarr"
        make_visit(k, stars).write(p, chunks=128)
        paths.append(p)
    calexps = [Exposure.read(p) for p in paths]
    with raise_if_dask_computes():
        lazy = build_coadd(calexps, patch, config=CoaddConfig(warp=WarpConfig(chunk=128)))
        warps = [
            warp_exposure(c, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=WarpConfig(chunk=128)) for c in calexps
        ]
        lazy2 = build_coadd(warps, patch, config=CoaddConfig(statistic="median", warp=WarpConfig(chunk=128)))
    assert lazy.image.shape == patch.shape and lazy.image.chunksize == (128, 128)
    assert lazy2.image.shape == patch.shape
    # Each chunk task reads only the inputs that overlap it.
    corner = lazy.image[:8, :8].compute()
    assert corner.shape == (8, 8)


@pytest.fixture(scope="module")
def ten_visits():
    stars = make_stars(25)
    visits = [make_visit(k, stars) for k in range(10)]
    return stars, visits


def test_coadd_flux_and_positions(ten_visits):
    stars, visits = ten_visits
    sm = make_skymap()
    patch = sm.patch(0, 0)
    lazy = build_coadd(visits, patch, config=CoaddConfig(warp=WarpConfig(chunk=256)))
    exp = lazy.to_exposure(band="r").compute()
    ra, dec, flux = stars
    x, y = patch.wcs.world_to_pixel_values(ra, dec)
    f, xw, yw, flag = measure(exp.image, x, y)
    ok = np.isfinite(f) & (exp.mask[np.round(y).astype(int), np.round(x).astype(int)] & masks.bit("NO_DATA") == 0)
    ratio = f[ok] / flux[ok]
    assert ok.sum() >= 20
    assert abs(np.median(ratio) - 1) < 0.005, np.median(ratio)
    dpos = np.hypot(xw - x, yw - y)[ok] * 0.2 * 1000  # mas
    assert np.median(dpos) < 5.0, np.median(dpos)
    # The coadd PSF matches the stars' second moments where they are (3% of the trace).
    from procsky.psf import image_moments

    nin = np.asarray(lazy.n_inputs)
    n_checked = 0
    for i in np.argsort(-flux)[:8]:
        ix, iy = int(round(x[i])), int(round(y[i]))
        if not (12 <= ix < patch.shape[1] - 12 and 12 <= iy < patch.shape[0] - 12) or nin[iy, ix] < 5:
            continue
        _, _, sxx, syy, sxy = image_moments(exp.image[iy - 12 : iy + 13, ix - 12 : ix + 13])
        k = exp.psf.render(ix + patch.xy0[0], iy + patch.xy0[1], size=25, offset=(x[i] - ix, y[i] - iy))
        _, _, pxx, pyy, pxy = image_moments(k)
        t = pxx + pyy
        assert abs(sxx - pxx) / t < 0.03 and abs(syy - pyy) / t < 0.03 and abs(sxy - pxy) / t < 0.03, (i, nin[iy, ix])
        n_checked += 1
    assert n_checked >= 4
    # The coadd PSF is the weighted sum of warped Gaussians: round, FWHM within the inputs'.
    fw = exp.psf.fwhm(patch.xy0[0] + patch.shape[1] / 2, patch.xy0[1] + patch.shape[0] / 2) * 0.2
    in_fw = [v.psf.fwhm(0, 0) * 0.26 for v in visits]
    assert min(in_fw) * 0.97 < fw < max(in_fw) * 1.03
    assert exp.metadata["visits"] == list(range(10))


def test_coadd_noise_matches_variance(ten_visits):
    _, visits = ten_visits
    empty = [
        Exposure(
            v.image * 0 + np.random.default_rng(i).normal(size=v.shape).astype(np.float32) * np.sqrt(v.variance),
            v.variance,
            wcs_cards=v.wcs_cards,
            psf=v.psf,
            photocalib=v.photocalib,
            visit_info=v.visit_info,
        )
        for i, v in enumerate(visits)
    ]
    patch = make_skymap().patch(0, 0)
    exp = build_coadd(empty, patch, config=CoaddConfig(warp=WarpConfig(chunk=256))).to_exposure().compute()
    good = (exp.mask & masks.bit("NO_DATA")) == 0
    z = exp.image[good] / np.sqrt(exp.variance[good])
    # Each coadd pixel's marginal variance is exact (sum w^2 V); Lanczos correlates
    # neighbours but does not change the per-pixel scatter.
    assert abs(np.std(z) - 1) < 0.05, np.std(z)


def _trail(k, shape):
    if k != 3:
        return 0.0
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    d = np.abs(0.6 * xx - yy + 40) / math.hypot(0.6, 1)
    return 400.0 * np.exp(-0.5 * (d / 1.5) ** 2)


def _cosmics(k, shape):
    out = np.zeros(shape)
    if k in (1, 5, 7):
        rng = np.random.default_rng(k)
        for _ in range(20):
            y, x = rng.integers(5, shape[0] - 5), rng.integers(5, shape[1] - 5)
            out[y, x] += rng.uniform(500, 3000)
            out[y, x + 1] += rng.uniform(100, 1000)
    return out


def test_artifacts_rejected_variable_kept():
    stars = make_stars(16, seed=3)
    ra, dec, flux = stars
    # The star farthest from the satellite trail of visit 3 varies strongly between visits.
    x3, y3 = wcs_from_cards(visit_cards(3), (380, 380)).world_to_pixel_values(ra, dec)
    var_star = int(np.argmax(np.abs(0.6 * x3 - y3 + 40)))
    amp = np.array([0.5, 1.6, 0.7, 1.4, 0.6, 1.5, 0.8, 1.3, 0.55, 1.55])

    def scale(k):
        return np.where(np.arange(len(flux)) == var_star, amp[k], 1.0)

    visits = [
        make_visit(k, stars, flux_scale=scale(k), extra=lambda kk, sh: _trail(kk, sh) + _cosmics(kk, sh))
        for k in range(10)
    ]
    patch = make_skymap().patch(0, 0)
    exp = build_coadd(visits, patch, config=CoaddConfig(warp=WarpConfig(chunk=256))).to_exposure().compute()
    clean_visits = [make_visit(k, stars, flux_scale=scale(k)) for k in range(10)]
    clean = build_coadd(clean_visits, patch, config=CoaddConfig(warp=WarpConfig(chunk=256))).to_exposure().compute()
    good = ((exp.mask & masks.bit("NO_DATA")) == 0) & ((clean.mask & masks.bit("NO_DATA")) == 0)
    x, y = patch.wcs.world_to_pixel_values(ra, dec)
    yy, xx = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
    near_star = np.zeros(patch.shape, bool)
    for xs, ys in zip(x, y):
        near_star |= np.hypot(xx - xs, yy - ys) < 8
    z = (exp.image - clean.image) / np.sqrt(clean.variance)
    # Away from stars no artifact residual reaches 5 sigma.
    assert np.nanmax(np.abs(z[good & ~near_star])) < 5.0, np.nanmax(np.abs(z[good & ~near_star]))
    # On a star, rejecting one visit changes the effective PSF (not the flux); the mask says so.
    changed = good & near_star & (np.abs(z) > 5)
    assert np.all((exp.mask[changed] & masks.bit("REJECTED")) != 0)
    assert ((exp.mask & masks.bit("CLIPPED")) != 0).sum() > 300  # the trail and cosmic rays were found
    assert ((clean.mask & masks.bit("CLIPPED")) != 0).mean() < 0.01  # few false rejections
    v = var_star
    f, *_ = measure(exp.image, x[v : v + 1], y[v : v + 1])
    # The variable keeps all its epochs: its coadd flux is the weighted mean of its fluxes.
    w = np.array(exp.metadata["weights"])
    expected = flux[v] * np.sum(w * amp) / w.sum()
    assert abs(f[0] / expected - 1) < 0.01, f[0] / expected
    cm = exp.mask[int(round(y[v])) - 3 : int(round(y[v])) + 4, int(round(x[v])) - 3 : int(round(x[v])) + 4]
    assert not ((cm & masks.bit("CLIPPED")) != 0).any()


@pytest.mark.parametrize("statistic", ["median", "clipped_mean"])
def test_robust_statistics(ten_visits, statistic):
    stars, visits = ten_visits
    patch = make_skymap().patch(0, 0)
    cfg = CoaddConfig(statistic=statistic, reject_artifacts=False, warp=WarpConfig(chunk=256))
    exp = build_coadd(visits, patch, config=cfg).to_exposure().compute()
    ra, dec, flux = stars
    x, y = patch.wcs.world_to_pixel_values(ra, dec)
    f, *_ = measure(exp.image, x, y)
    ok = np.isfinite(f)
    # Median/clipped stacks of different seeing are not flux-exact at the core; 3%.
    assert abs(np.median(f[ok] / flux[ok]) - 1) < 0.03


@pytest.mark.parametrize("reject", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_coadd_memory_does_not_grow_with_visits(tmp_path, reject):
    """Peak traced memory of the pipeline's coadd write, for 10 and for 40 visits.

    The path the pipeline takes: :class:`AssembleCoaddTask` builds the lazy coadd from
    Zarr-backed warps, and the executor's ``_write`` hands it to the repository's
    :class:`ExposureStorage`, which writes it with :meth:`Exposure.write` (planes and
    ``n_inputs`` in batches of whole chunks, then the attributes). The attributes grow
    with the number of inputs by design (the coadd PSF keeps one warped PSF per input,
    ~15 kB per visit here); the patch is one write batch (4 chunks of 240 px), so that as
    on a real patch the batch of pixels, not the attributes, sets the peak. With artifact
    rejection ``memory_budget`` (1 MB) holds no visit's planes: every chunk task streams
    the visits twice (the model pass, then the outlier and accumulation pass).
    """
    import tracemalloc

    import dask

    from procsky.repo.storage import ExposureStorage
    from procsky.tasks.coadd import AssembleCoaddTask

    sm = make_skymap(inner=440)
    patch = sm.patch(0, 0)
    stars = make_stars(9, half=20.0)
    paths = []
    base = [
        warp_exposure(
            make_visit(k, stars), patch.wcs_cards, patch.shape, xy0=patch.xy0, config=WarpConfig(chunk=512)
        ).compute()
        for k in range(4)
    ]
    geometry = {"patch_box": patch.outer.to_list(), "patch_wcs": [list(c) for c in patch.wcs_cards]}
    rng = np.random.default_rng(5)
    for k in range(40):
        b = base[k % 4]
        # Independent noise per visit on top of a warped visit (cheaper than 40 warps).
        img = b.image + (rng.normal(size=b.shape) * np.sqrt(np.nan_to_num(b.variance))).astype(np.float32)
        w = Exposure(
            img,
            b.variance,
            b.mask,
            wcs_cards=b.wcs_cards,
            psf=b.psf,
            metadata={**b.metadata, **geometry},
            visit_info=VisitInfo(band="r", visit=k),
            xy0=b.xy0,
        )
        p = tmp_path / f"w{k}.zarr"
        w.write(p, chunks=240)
        paths.append(p)
    task = AssembleCoaddTask({"coadd": {"reject_artifacts": reject, "memory_budget": 2**20, "warp": {"chunk": 240}}})
    storage = ExposureStorage()
    # Warm up (imports, numba and FFT caches) so that only the coadd's own memory is traced.
    with dask.config.set(scheduler="synchronous"):
        storage.write(task.run([Exposure.read(p) for p in paths[:3]])["coadd"], tmp_path / "warm.zarr")
    peaks = {}
    for n in (10, 40):
        # The task's run (weights, the coadd PSF: one warped PSF per input like LSST's
        # CoaddPsf) is the client's part; the write computes every chunk, which is what
        # must not grow with the number of visits.
        coadd = task.run([Exposure.read(p) for p in paths[:n]])["coadd"]
        with dask.config.set(scheduler="synchronous"):
            tracemalloc.start()
            storage.write(coadd, tmp_path / f"c{n}.zarr")
            _, peaks[n] = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    print(f"peak traced memory (bytes), reject={reject}: {peaks}")
    assert peaks[40] < 1.2 * peaks[10], peaks
    out = Exposure.read(tmp_path / "c40.zarr")
    assert out.shape == patch.shape and out.metadata["visits"] == list(range(40))
    n_inputs = out.extra_planes["n_inputs"].compute()
    assert n_inputs.dtype == np.int32 and n_inputs.max() == 40


def test_tasks_quanta_run_and_export(tmp_path):
    """warp -> assemble_coadd through the quantum graph, then `procsky export` to FITS."""
    from astropy.io import fits
    from click.testing import CliRunner

    from procsky.cli import main
    from procsky.pipeline import Pipeline, make_graph
    from procsky.repo import Repo
    from procsky.skymap import register_skymap
    from procsky.tasks.coadd import AssembleCoaddDirectTask, AssembleCoaddTask
    from procsky.tasks.warp import WarpTask

    repo = Repo.create(tmp_path / "repo")
    stars = make_stars(9)
    for k in range(4):
        repo.put(
            make_visit(k, stars), "calexp", {"instrument": "simcam", "visit": k, "detector": 0, "band": "r"}, "calib"
        )
    sm = make_skymap()
    sm.name = "test"
    register_skymap(repo, sm)
    cfg = {"skymap": "test", "warp": {"chunk": 128}}
    coadd_cfg = {"coadd": {"warp": {"chunk": 128}}}
    pipe = Pipeline.from_tasks([("warp", WarpTask, cfg), ("coadd", AssembleCoaddTask, coadd_cfg)])
    graph = make_graph(repo, pipe, output="coadd_run", where="band='r'")
    warps_q = graph.quanta["warp"]
    assert sorted(q.data_id["visit"] for q in warps_q) == [0, 1, 2, 3]
    assert {(q.data_id["tract"], q.data_id["patch"]) for q in warps_q} == {(0, 0)}
    assert len(graph.quanta["coadd"]) == 1
    # Execute by hand the way the executor does (inputs read, run(), outputs put).
    wt = WarpTask(cfg)
    for q in warps_q:
        calexps = [repo.get(d.dataset_type, d.data_id, run=d.run) for d in q.inputs["calexps"]]
        skymap = repo.get("skymap", {"skymap": "test"})
        out = wt.run(calexps=calexps, skymap=skymap, data_id=q.data_id)
        repo.put(out["warp"], "warp", q.outputs["warp"].data_id, "coadd_run")
    cq = graph.quanta["coadd"][0]
    warps = [repo.get("warp", d.data_id, run="coadd_run") for d in cq.inputs["warps"]]
    coadd = AssembleCoaddTask(coadd_cfg).run(warps=warps, data_ids={"warps": [d.data_id for d in cq.inputs["warps"]]})
    repo.put(coadd["coadd"], "coadd", cq.outputs["coadd"].data_id, "coadd_run")
    # The direct task (warps on the fly) gives the same pixels.
    direct_task = AssembleCoaddDirectTask({"skymap": "test", "coadd": {"warp": {"chunk": 128}}})
    dq = direct_task.quanta(repo, {"calexps": [d for q in warps_q for d in q.inputs["calexps"]]}, None)
    assert len(dq) == 1 and dq[0].data_id == {"skymap": "test", "tract": 0, "patch": 0, "band": "r"}
    direct = direct_task.run(
        calexps=[repo.get(d.dataset_type, d.data_id, run=d.run) for d in dq[0].inputs["calexps"]],
        skymap=repo.get("skymap", {"skymap": "test"}),
        data_id=dq[0].data_id,
    )["coadd"].compute()
    stored = repo.get("coadd", cq.outputs["coadd"].data_id).compute()
    ok = np.isfinite(stored.image) & np.isfinite(direct.image)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(stored.image[ok], direct.image[ok], rtol=1e-4, atol=1e-3)
    assert stored.metadata["visits"] == [0, 1, 2, 3] and stored.psf is not None
    # The repository's write keeps the number of inputs per pixel; a warp has no such plane.
    assert stored.extra_planes["n_inputs"].max() == 4 and not warps[0].extra_planes
    out = tmp_path / "coadd.fits"
    res = CliRunner().invoke(
        main, ["export", str(repo.root), "coadd", "--where", "patch=0 AND band='r'", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    with fits.open(out) as hdul:
        np.testing.assert_array_equal(hdul["IMAGE"].data, stored.image)
        assert hdul["IMAGE"].header["CTYPE1"] == "RA---TAN"
    res = CliRunner().invoke(
        main, ["skymap", "register", str(repo.root), "test", "--kind", "discrete", "--center", "1,1"]
    )
    assert res.exit_code != 0 and "already registered" in res.output


def _decam_exposures(folder):
    import glob

    from procsky.instruments import get_instrument

    files = sorted(glob.glob(str(folder / "images/decam/CP/*/*/*_ooi_*.fits")))
    inst = get_instrument("decam-cp")
    out = []
    for f in files:
        e = inst.ingest_file(f)[0].obj
        # CP images keep their sky; subtract a constant (what calibrate's background step
        # does), since coadds and artifact rejection assume background-subtracted inputs.
        good = (e.mask == 0) & np.isfinite(e.image)
        e.image = (e.image - np.median(e.image[good])).astype(np.float32)
        out.append(e)
    return out


def _gaia(folder, mjd=None):
    """Gaia DR2 stars of a test case (ra, dec in deg), moved to ``mjd`` by proper motion."""
    import glob

    from astropy.io import fits

    g = np.concatenate([fits.getdata(f) for f in sorted(glob.glob(str(folder / "gaia/*.fits")))])
    ra, dec = g["ra"].astype(float), g["dec"].astype(float)
    if mjd is not None:
        dt = (mjd - 57205.875) / 365.25  # DR2 reference epoch J2015.5
        pmra, pmdec = np.nan_to_num(g["pmra"].astype(float)), np.nan_to_num(g["pmdec"].astype(float))
        dec = dec + pmdec * dt / 3.6e6
        ra = ra + pmra * dt / 3.6e6 / np.cos(np.radians(dec))
    return ra, dec, g["phot_g_mean_mag"].astype(float)


@pytest.mark.realdata
def test_real_decam_epochs_coadd_and_gaia(real_data):
    """Legacy Surveys DECam CP epochs (independent TPV WCSs) onto a discrete sky map."""
    ls = real_data / "legacysurvey"
    # testcase3: 8 epochs (g, r, z) of one spot; all of them cover its centre.
    exps = _decam_exposures(ls / "testcase3")
    assert len(exps) == 8
    cen = [e.pixel_to_sky((e.shape[1] - 1) / 2, (e.shape[0] - 1) / 2) for e in exps]
    ra, dec = np.mean([float(c[0]) for c in cen]), np.mean([float(c[1]) for c in cen])
    sm = discrete_skymap([(ra, dec)], radius=0.004, patch_inner=200, patch_border=10, name="tc3")
    patch = sm.patch(0, 0)
    for band in ("g", "z"):
        sel = [e for e in exps if e.visit_info.band == band]
        lazy = build_coadd(sel, patch, config=CoaddConfig(warp=WarpConfig(chunk=256)))
        co = lazy.to_exposure(band=band).compute()
        nin = np.asarray(lazy.n_inputs)
        assert (nin == len(sel)).sum() > 1000
        full = nin == len(sel)
        assert np.all(np.isfinite(co.image[full])) and np.all(co.variance[full] > 0)
        assert co.psf is None  # CP exposures carry no PSF model
        # testcase3's Gaia criterion cannot be evaluated: its 41x51 px cut-outs (8" x 13")
        # hold no Gaia DR2 star; the nearest lies 56 px (15") outside every epoch, far
        # beyond what proper motion (< 0.11"/yr, 4 yr) could move in. Checked on the
        # whole coadd footprint (every pixel with an input), with proper motion applied.
        mjd = np.mean([e.visit_info.mjd for e in sel])
        gra, gdec, _ = _gaia(ls / "testcase3", mjd)
        x, y = patch.wcs.world_to_pixel_values(gra, gdec)
        on = (x > -0.5) & (y > -0.5) & (x < patch.shape[1] - 0.5) & (y < patch.shape[0] - 0.5)
        on[on] &= nin[np.round(y[on]).astype(int), np.round(x[on]).astype(int)] > 0
        assert on.sum() == 0
    # testcase9: a G=18.2 star in 3 epochs; the coadd centroid lands on Gaia (moved by its
    # proper motion to the weighted mean epoch of the inputs). testcase6's only Gaia star
    # (G=10.5) is saturated and masked in every epoch (n_inputs 0 at its centre).
    for tc, expected in (("testcase9", 1),):
        exps = _decam_exposures(ls / tc)
        cen = [e.pixel_to_sky((e.shape[1] - 1) / 2, (e.shape[0] - 1) / 2) for e in exps]
        ra, dec = np.mean([float(c[0]) for c in cen]), np.mean([float(c[1]) for c in cen])
        patch = discrete_skymap([(ra, dec)], radius=0.004, patch_inner=200, patch_border=10).patch(0, 0)
        # Epochs of different bands: an astrometric coadd without artifact rejection.
        lazy = build_coadd(exps, patch, config=CoaddConfig(reject_artifacts=False, warp=WarpConfig(chunk=256)))
        co = lazy.to_exposure().compute()
        nin = np.asarray(lazy.n_inputs)
        w = lazy.resolved_weights()
        mjd = float(np.sum(w * [e.visit_info.mjd for e in exps]) / np.sum(w))
        gra, gdec, gmag = _gaia(ls / tc, mjd)
        x, y = patch.wcs.world_to_pixel_values(gra, gdec)
        inside = (x > 5) & (y > 5) & (x < patch.shape[1] - 6) & (y < patch.shape[0] - 6)
        inside[inside] &= nin[np.round(y[inside]).astype(int), np.round(x[inside]).astype(int)] == len(exps)
        assert inside.sum() == expected, (tc, inside.sum())
        _, xw, yw, _ = measure(co.image, x[inside], y[inside])
        offset = np.hypot(xw - x[inside], yw - y[inside]) * 0.2  # arcsec
        print(tc, "Gaia G", gmag[inside], "coadd - Gaia offset (arcsec)", offset)
        assert np.all(offset < 0.1), (tc, offset)


def test_combine_kernels_against_numpy():
    from procsky.kernels import coadd as kc

    rng = np.random.default_rng(4)
    n, shape = 9, (20, 30)
    img = rng.normal(size=(n,) + shape).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=(n,) + shape).astype(np.float32)
    msk = np.zeros((n,) + shape, np.uint32)
    msk[2, 5, 5] = masks.bit("BAD")
    img[3, 6, 6] = np.nan
    w = rng.uniform(0.5, 2.0, n)
    bad, nod = masks.bits("BAD", "NO_DATA"), masks.bit("NO_DATA")
    good = (msk == 0) & np.isfinite(img)
    # Weighted mean: stack and streaming versions equal the numpy formula.
    ww = np.where(good, w[:, None, None], 0)
    ref = (ww * np.nan_to_num(img)).sum(0) / ww.sum(0)
    refv = (ww**2 * var).sum(0) / ww.sum(0) ** 2
    i1, v1, m1, n1 = kc.combine_stack(img, var, msk, w, statistic="mean", bad_bits=bad, no_data_bit=nod)
    acc = kc.MeanAccumulator(shape, bad)
    for k in range(n):
        acc.add(img[k], var[k], msk[k], w[k])
    i2, v2, m2, n2 = acc.result(nod)
    np.testing.assert_allclose(i1, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(i2, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v2, refv, rtol=1e-5)
    assert n1[5, 5] == n - 1 and n2[6, 6] == n - 1 and m1[5, 5] == 0
    # Median.
    im, _, _, _ = kc.combine_stack(img, var, msk, w, statistic="median", bad_bits=bad, no_data_bit=nod)
    np.testing.assert_allclose(im, np.nanmedian(np.where(good, img, np.nan), axis=0), rtol=1e-6)
    # Streaming trimmed mean: drop the k highest and k lowest values.
    tm = kc.TrimmedMeanAccumulator(shape, 2)
    for k in range(n):
        tm.add(img[k], var[k], good[k])
    model, _, ng = tm.result()
    srt = np.sort(np.where(good, img, np.nan), axis=0)  # NaN last
    for j, i in [(0, 0), (5, 5), (6, 6), (10, 20)]:
        vals = srt[: ng[j, i], j, i]
        np.testing.assert_allclose(model[j, i], vals[2:-2].mean(), rtol=1e-6)


@pytest.mark.parametrize("method", ["auto", "separable", "direct", "fft"])
def test_psf_match_planes_against_fourier_convolution(method):
    """Real-space PSF matching (separable SVD terms, direct or batched FFT) equals the
    Fourier normalised convolution of :func:`procsky.kernels.psfmatch.convolve_planes`."""
    from procsky.kernels import coadd as kc
    from procsky.kernels import psfmatch as kpm

    rng = np.random.default_rng(7)
    ny, nx = 70, 83
    yy, xx = np.mgrid[-7:8, -7:8]
    gauss = np.exp(-0.5 * (yy**2 / 4.0 + xx**2 / 2.5))  # separable: one term
    ring = gauss + 2e-3 * rng.normal(size=gauss.shape)  # not separable to 1e-4
    img = (rng.normal(size=(ny, nx)) * 10 + 100).astype(np.float32)
    var = rng.uniform(1, 2, size=(ny, nx)).astype(np.float32)
    msk = np.zeros((ny, nx), np.uint32)
    nod = masks.bit("NO_DATA")
    for name, kernel in (("separable", gauss / gauss.sum()), ("fft", ring / ring.sum())):
        mk = kc.MatchingKernel(kernel, 1e-4, method)
        if method == "auto":
            assert mk.method == name  # the cheapest way for each
        for holes in (False, True):
            i, m = img.copy(), msk.copy()
            if holes:
                i[:10, :12] = np.nan
                m[40:44, 50:60] = nod
            ref = kpm.convolve_planes(i, var, m, kernel, 1.3, no_data_bit=nod)
            out = kc.psf_match_planes(i, var, m, mk, 1.3, no_data_bit=nod, bad_bits=nod)
            np.testing.assert_array_equal(out[2], ref[2])
            np.testing.assert_array_equal(np.isfinite(out[0]), np.isfinite(ref[0]))
            np.testing.assert_array_equal(out[3], np.isfinite(ref[0]))
            # float32 arithmetic; a separable approximation within 1e-4 of the kernel peak
            rtol = 1e-4 if mk.method == "separable" and name == "fft" else 1e-5
            np.testing.assert_allclose(out[0], ref[0], rtol=rtol)
            np.testing.assert_allclose(out[1], ref[1], rtol=5 * rtol)


def test_streaming_rejection_equals_in_memory_rejection(tmp_path):
    """The two-pass streaming rejection (with a 1 MB budget half of the visits are read
    and matched again in the second pass) gives the same coadd as when every visit's
    planes stay in memory, and as the same inputs read from Zarr warps: same rejected
    pixels, same values."""
    import dask

    stars = make_stars(9, seed=3, half=12.0)
    visits = [
        make_visit(k, stars, shape=(200, 200), extra=lambda kk, sh: _cosmics(kk, sh) + _trail(kk, sh)) for k in range(6)
    ]
    patch = make_skymap(inner=150).patch(0, 0)
    cfg = CoaddConfig(warp=WarpConfig(chunk=96))
    warps = [warp_exposure(v, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=cfg.warp).compute() for v in visits]
    paths = []
    for k, w in enumerate(warps):
        w.write(tmp_path / f"w{k}.zarr", chunks=96)
        paths.append(tmp_path / f"w{k}.zarr")
    out = {}
    with dask.config.set(scheduler="synchronous"):
        for name, inputs, budget in (
            ("kept", warps, 2**26),
            ("streamed", warps, 2**20),
            ("zarr", [Exposure.read(p) for p in paths], 2**20),
        ):
            c = cfg.model_copy(update={"memory_budget": budget})
            lazy = build_coadd(inputs, patch, config=c, inputs_are_warps=True)
            out[name] = dask.compute(lazy.image, lazy.variance, lazy.mask, lazy.n_inputs)
    rejected = (out["kept"][2] & masks.bit("REJECTED")) != 0
    assert rejected.sum() > 50  # the trail and the cosmic rays
    for name in ("streamed", "zarr"):
        np.testing.assert_array_equal(out[name][2], out["kept"][2])
        np.testing.assert_array_equal(out[name][3], out["kept"][3])
        np.testing.assert_allclose(out[name][0], out["kept"][0], rtol=1e-6)
        np.testing.assert_allclose(out[name][1], out["kept"][1], rtol=1e-6)


# ----------------------------------------------------------------------------- `small` simulation
def _isolated_stars(objects, x, y, shape, *, fmin=1e4, fmax=8e5, radius=30.0, max_contamination=0.01, edge=60):
    """Indices of isolated, unsaturated, non-variable truth stars on a pixel grid: other
    objects' total flux within ``radius`` px below ``max_contamination`` of the star's."""
    from scipy.spatial import cKDTree

    f = objects["flux_r"].to_numpy()
    star = (objects["kind"] == "star").to_numpy()
    cand = np.flatnonzero(
        star & (f > fmin) & (f < fmax) & (x > edge) & (y > edge) & (x < shape[1] - edge) & (y < shape[0] - edge)
    )
    tree = cKDTree(np.c_[x, y])
    keep = []
    for i in cand:
        nb = [j for j in tree.query_ball_point([x[i], y[i]], radius) if j != i]
        if f[nb].sum() < max_contamination * f[i]:
            keep.append(i)
    return np.array(keep, int)


def _cutout(lazy, ix, iy, h):
    """Planes of the coadd around (ix, iy), computing only the chunks that overlap."""
    import dask

    sl = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
    return dask.compute(lazy.image[sl], lazy.mask[sl], lazy.n_inputs[sl])


@pytest.mark.slow
def test_small_coadd_star_fluxes_positions_and_psf(small_r_det4, small_r_det4_calexps):
    """Flux, astrometry and PSF of the coadd of the ten r-band visits of `small` (detector 4).

    Fluxes: circular aperture of 17 px (3.4"), the aperture calibrate's zero point is tied
    to (``CalibrateConfig.apcorr_radius``: the photometric system is defined by it, so no
    further aperture correction applies), minus the local background (clipped median of
    a 30-50 px annulus: undetected faint galaxies add ~0.4 nJy/px to the sky). The coadd
    PSF model (stamps of 27 px) cannot give an aperture correction to 17 px, which is
    why the calibration aperture is used directly.
    """
    import pandas as pd
    import sep

    from procsky.psf import CoaddPsf, image_moments

    calexps = [small_r_det4_calexps[v] for v in sorted(small_r_det4_calexps)]
    cen = np.array([np.asarray(e.pixel_to_sky((e.shape[1] - 1) / 2, (e.shape[0] - 1) / 2), float) for e in calexps])
    ra0, dec0 = cen.mean(axis=0)
    sm = discrete_skymap(
        [(float(ra0), float(dec0))],
        radius=2000 * 0.2 / 3600 / 2 * 0.999,
        patch_inner=2000,
        patch_border=100,
        name="small",
    )
    patch = sm.patch(0, 0)
    lazy = build_coadd(calexps, patch, config=CoaddConfig(warp=WarpConfig(chunk=128)))  # artifact rejection on
    psf = lazy.psf()
    assert isinstance(psf, CoaddPsf)
    objects = pd.read_parquet(small_r_det4 / "truth/objects.parquet")
    x, y = patch.wcs.world_to_pixel_values(objects["ra"].to_numpy(), objects["dec"].to_numpy())
    idx = _isolated_stars(objects, x, y, patch.shape)
    h = 50
    rows = []
    for i in idx:
        ix, iy = int(round(x[i])), int(round(y[i]))
        img, msk, nin = _cutout(lazy, ix, iy, h)
        xc, yc = x[i] - ix + h, y[i] - iy + h
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        rr = np.hypot(xx - xc, yy - yc)
        core = rr <= 8
        # The same inputs over the star's core (an input's edge through the core mixes
        # PSFs); none saturated.
        if (
            nin[core].min() != nin[core].max()
            or nin[core].min() < 2
            or np.any(msk[core] & masks.bits("SAT", "NO_DATA"))
        ):
            continue
        ann = img[(rr >= 30) & (rr <= 50) & np.isfinite(img)]
        for _ in range(3):
            med, sd = np.median(ann), 1.4826 * np.median(np.abs(ann - np.median(ann)))
            ann = ann[np.abs(ann - med) < 3 * sd]
        data = np.ascontiguousarray(np.nan_to_num(img).astype(np.float64))
        flux, _, _ = sep.sum_circle(data, [xc], [yc], 17.0, subpix=5)
        flux = flux[0] - np.median(ann) * math.pi * 17.0**2
        xw, yw, _ = sep.winpos(data, [xc], [yc], [2.0])
        # Second moments of the star (background-subtracted, within 12 px) and of the coadd
        # PSF model rendered at that position with the same sub-pixel offset.
        st = (data - np.median(ann))[h - 12 : h + 13, h - 12 : h + 13]
        k = psf.render(ix + patch.xy0[0], iy + patch.xy0[1], size=25, offset=(x[i] - ix, y[i] - iy))
        rows.append(
            (
                i,
                flux / objects["flux_r"].iloc[i],
                (xw[0] - xc) * 200,
                (yw[0] - yc) * 200,
                image_moments(st),
                image_moments(k),
                int(nin[h, h]),
                objects["flux_r"].iloc[i],
            )
        )
    assert len(rows) >= 6, len(rows)
    ratio = np.array([r[1] for r in rows])
    dpos = np.hypot([r[2] for r in rows], [r[3] for r in rows])
    print(
        f"\n{len(rows)} isolated stars: flux / truth median {np.median(ratio):.5f} (each: {np.round(ratio, 4)}); "
        f"position offset median {np.median(dpos):.2f} mas"
    )
    assert abs(np.median(ratio) - 1) < 0.005, np.median(ratio)
    assert np.median(dpos) < 5.0, np.median(dpos)
    # Coadd PSF against the bright stars' images: second moments at each star's position
    # within 3% of the trace (the coadd PSF varies: the stars have 3 to 10 inputs). The
    # inputs' own PSF models (calibrate's) differ from their stars by up to ~1.5% in
    # 2 Ixy / T already (measured on the calexps), which the coadd PSF inherits.
    bright = [r for r in rows if r[7] > 1e5]
    assert len(bright) >= 3
    for r in bright:
        _, _, sxx, syy, sxy = r[4]
        _, _, pxx, pyy, pxy = r[5]
        t = pxx + pyy
        print(
            f"star {r[0]} ({r[6]} inputs): star Ixx Iyy Ixy {sxx:.3f} {syy:.3f} {sxy:.3f}; "
            f"coadd PSF {pxx:.3f} {pyy:.3f} {pxy:.3f} px^2"
        )
        assert abs(sxx - pxx) / t < 0.03 and abs(syy - pyy) / t < 0.03 and abs(sxy - pxy) / t < 0.03
