"""Warp + coadd benchmark: procsky against SWarp and reproject on the same inputs and grid.

Run:  .venv/bin/python benchmarks/bench_coadd.py [--visits 8] [--size 1500] [--patch 2000]

Inputs: synthetic calibrated visits (Gaussian stars of known nJy flux, rotated TAN WCSs
with offsets, 0.26"/px, different zero points, seeing and noise). SIP is left out because
SWarp reads only TPV distortions; all three tools see exactly the same WCSs. Output: one
patch (TAN, 0.2"/px) of a discrete sky map.

* procsky: :func:`procsky.coadd.build_coadd` from the calexps (warps on the fly), Lanczos3,
  inverse-variance weighted mean; with and without artifact rejection; dask synchronous
  scheduler (one thread).
* SWarp (``/usr/bin/SWarp``): LANCZOS3, COMBINE_TYPE WEIGHTED with MAP_WEIGHT weights
  (1 / variance), no background subtraction, FSCALASTRO FIXED (flux per pixel), 1 thread.
* reproject: ``reproject_and_coadd`` with ``reproject_interp`` (bicubic), ``input_weights``
  (1 / variance), ``combine_function='mean'``; reproject conserves surface brightness, so
  its output is multiplied by the pixel-area ratio to compare fluxes.

Reported: wall and CPU seconds per tool, throughput ratios (output pixels per second),
aperture fluxes of the stars against truth and against SWarp, pixel-level agreement.

``--modes`` instead compares the two ways of feeding a coadd (issue 6, item 4), each in
its own process so that its peak resident memory (``ru_maxrss``) is its own: the calexps
are on disk (Zarr) and the coadd is written to Zarr either

* ``on-the-fly``: :func:`~procsky.coadd.build_coadd` from the calexps (each output chunk
  task warps the parts of the calexps it needs), or
* ``intermediate``: every calexp is first warped (:func:`~procsky.warp.warp_exposure`)
  and written to Zarr; the coadd then reads those warps.

Run:  .venv/bin/python benchmarks/bench_coadd.py --modes [--visits 8] [--size 1500]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procsky.coadd import CoaddConfig, build_coadd
from procsky.exposure import Exposure, VisitInfo
from procsky.photocalib import PhotoCalib
from procsky.psf import GaussianPsf
from procsky.skymap import discrete_skymap
from procsky.warp import WarpConfig
from procsky.wcs import wcs_from_cards
from test_coadd import make_stars, measure, render_gaussians

RA0, DEC0 = 150.0, 2.0


def make_visits(n, size, stars, seed=0):
    out = []
    for k in range(n):
        rng = np.random.default_rng(seed * 1000 + k)
        th = math.radians(rng.uniform(0, 360))
        s = 0.26 / 3600
        cards = [
            ("CTYPE1", "RA---TAN", ""),
            ("CTYPE2", "DEC--TAN", ""),
            ("CRVAL1", RA0 + rng.uniform(-5, 5) / 3600, ""),
            ("CRVAL2", DEC0 + rng.uniform(-5, 5) / 3600, ""),
            ("CRPIX1", size / 2 + 0.5, ""),
            ("CRPIX2", size / 2 + 0.5, ""),
            ("CD1_1", -s * math.cos(th), ""),
            ("CD1_2", s * math.sin(th), ""),
            ("CD2_1", s * math.sin(th), ""),
            ("CD2_2", s * math.cos(th), ""),
            ("CUNIT1", "deg", ""),
            ("CUNIT2", "deg", ""),
        ]
        wcs = wcs_from_cards(cards, (size, size))
        x, y = wcs.world_to_pixel_values(stars[0], stars[1])
        cal = PhotoCalib(10 ** (-0.4 * (rng.uniform(27, 28) - 31.4)))
        psf = GaussianPsf.from_fwhm(rng.uniform(3.0, 4.2))
        img = render_gaussians((size, size), x, y, stars[2] / cal.calibration, psf.sigma)
        var = np.full((size, size), rng.uniform(4, 8) ** 2) + np.maximum(img, 0) / 4
        img = img + rng.normal(size=img.shape) * np.sqrt(var)
        out.append(
            Exposure(
                img.astype(np.float32),
                var.astype(np.float32),
                wcs_cards=cards,
                psf=psf,
                photocalib=cal,
                visit_info=VisitInfo(band="r", visit=k),
            )
        )
    return out


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_procsky(visits, patch, reject):
    import dask

    cfg = CoaddConfig(reject_artifacts=reject, warp=WarpConfig(chunk=512))
    with dask.config.set(scheduler="synchronous"):
        return build_coadd(visits, patch, config=cfg).to_exposure().compute().image


def run_swarp(visits, patch, work: Path):
    from astropy.io import fits

    names = []
    for k, v in enumerate(visits):
        cal = v.photocalib.calibration
        h = fits.Header()
        for key, val, com in v.wcs_cards:
            h[key] = (val, com)
        fits.writeto(work / f"v{k}.fits", (v.image * cal).astype(np.float32), h, overwrite=True)
        fits.writeto(work / f"v{k}.weight.fits", (1.0 / (v.variance * cal * cal)).astype(np.float32), h, overwrite=True)
        names.append(str(work / f"v{k}.fits"))
    head = fits.Header()
    head["NAXIS"] = 2
    head["NAXIS1"], head["NAXIS2"] = patch.shape[1], patch.shape[0]
    for key, val, com in patch.wcs_cards:
        head[key] = (val, com)
    (work / "coadd.head").write_text(head.tostring(sep="\n", endcard=True) + "\n")
    cmd = [
        "/usr/bin/SWarp",
        *names,
        "-IMAGEOUT_NAME",
        str(work / "coadd.fits"),
        "-WEIGHTOUT_NAME",
        str(work / "coadd.weight.fits"),
        "-RESAMPLING_TYPE",
        "LANCZOS3",
        "-COMBINE_TYPE",
        "WEIGHTED",
        "-WEIGHT_TYPE",
        "MAP_WEIGHT",
        "-WEIGHT_SUFFIX",
        ".weight.fits",
        "-SUBTRACT_BACK",
        "N",
        "-FSCALASTRO_TYPE",
        "FIXED",
        "-RESAMPLE_DIR",
        str(work),
        "-NTHREADS",
        "1",
        "-WRITE_XML",
        "N",
        "-VERBOSE_TYPE",
        "QUIET",
        "-COPY_KEYWORDS",
        "",
        "-CENTER_TYPE",
        "MANUAL",
    ]
    c0, w0 = os.times(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=work, capture_output=True)
    c1 = os.times()
    wall = time.perf_counter() - w0
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    img = fits.getdata(work / "coadd.fits").astype(np.float64)
    wgt = fits.getdata(work / "coadd.weight.fits")
    img[wgt <= 0] = np.nan
    return img, wall, cpu


def run_reproject(visits, patch):
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd

    data = [((v.image * v.photocalib.calibration).astype(np.float64), v.wcs) for v in visits]
    weights = [1.0 / (v.variance.astype(np.float64) * v.photocalib.calibration**2) for v in visits]
    out, foot = reproject_and_coadd(
        data,
        patch.wcs,
        shape_out=patch.shape,
        input_weights=weights,
        reproject_function=reproject_interp,
        combine_function="mean",
        order="bicubic",
    )
    out = out * (0.2 / 0.26) ** 2  # surface brightness -> flux per output pixel
    out[foot == 0] = np.nan
    return out


def run_mode(mode, folder: Path, n, patch_inner, reject):
    """One coadd feeding mode on calexps stored in ``folder``; returns a result dict."""
    import resource

    import dask

    from procsky.warp import warp_exposure

    sm = discrete_skymap(
        [(RA0, DEC0)],
        radius=patch_inner * 0.2 / 3600 / 2 * 0.999,
        patch_inner=patch_inner,
        patch_border=50,
        name="bench",
    )
    patch = sm.patch(0, 0)
    wcfg = WarpConfig(chunk=512)
    cfg = CoaddConfig(reject_artifacts=reject, warp=wcfg)
    calexps = [Exposure.read(folder / f"calexp{k}.zarr") for k in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    with dask.config.set(scheduler="synchronous"):
        if mode == "intermediate":
            inputs = []
            for k, c in enumerate(calexps):
                w = warp_exposure(c, patch.wcs_cards, patch.shape, xy0=patch.xy0, config=wcfg)
                w.write(folder / f"warp{k}.zarr", chunks=wcfg.chunk)
                inputs.append(Exposure.read(folder / f"warp{k}.zarr"))
            t_warp = time.perf_counter() - t0
            lazy = build_coadd(inputs, patch, config=cfg, inputs_are_warps=True)
        else:
            t_warp = 0.0
            lazy = build_coadd(calexps, patch, config=cfg, inputs_are_warps=False)
        lazy.write(folder / f"coadd-{mode}.zarr")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "mode": mode,
        "wall": wall,
        "cpu": cpu,
        "warp_wall": t_warp,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "npix": patch.shape[0] * patch.shape[1],
    }


def main_modes(args):
    import json

    work = Path(tempfile.mkdtemp(prefix="bench_coadd_modes_"))
    try:
        half = args.patch * 0.2 / 2 * 0.8
        stars = make_stars(args.stars, seed=2, half=half, fmin=1e5, fmax=3e6)
        for k, v in enumerate(make_visits(args.visits, args.size, stars)):
            v.write(work / f"calexp{k}.zarr", chunks=512)
        print(
            f"{args.visits} calexps of {args.size}x{args.size} px on disk (Zarr) -> patch of {args.patch + 100} px "
            f"(chunks 512, dask synchronous, artifact rejection {'on' if args.reject else 'off'}); "
            "each mode in its own process"
        )
        print(f"{'mode':14s} {'wall s':>8s} {'cpu s':>8s} {'of which warps s':>17s} {'peak RSS MB':>12s}")
        results = {}
        for mode in ("on-the-fly", "intermediate"):
            cmd = [
                sys.executable,
                __file__,
                "--run-mode",
                mode,
                "--folder",
                str(work),
                "--visits",
                str(args.visits),
                "--patch",
                str(args.patch),
            ] + (["--reject"] if args.reject else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            results[mode] = r
            print(f"{mode:14s} {r['wall']:8.2f} {r['cpu']:8.2f} {r['warp_wall']:17.2f} {r['peak_rss_mb']:12.0f}")
        a = Exposure.read(work / "coadd-on-the-fly.zarr").image.compute()
        b = Exposure.read(work / "coadd-intermediate.zarr").image.compute()
        ok = np.isfinite(a) & np.isfinite(b)
        print(
            f"max |difference| between the two coadds: {np.max(np.abs(a[ok] - b[ok])):.3g} nJy "
            f"(coadd pixel rms {1.4826 * np.median(np.abs(a[ok])):.3g} nJy)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", action="store_true", help="compare on-the-fly and intermediate warps")
    ap.add_argument("--reject", action="store_true", help="artifact rejection in --modes")
    ap.add_argument("--run-mode", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--visits", type=int, default=8)
    ap.add_argument("--size", type=int, default=1500, help='visit side, pixels (0.26"/px)')
    ap.add_argument("--patch", type=int, default=1800, help='patch inner side, pixels (0.2"/px)')
    ap.add_argument("--stars", type=int, default=400)
    args = ap.parse_args()
    if args.run_mode:
        import json

        print(json.dumps(run_mode(args.run_mode, Path(args.folder), args.visits, args.patch, args.reject)))
        return
    if args.modes:
        main_modes(args)
        return
    half = args.patch * 0.2 / 2 * 0.8
    stars = make_stars(args.stars, seed=2, half=half, fmin=1e5, fmax=3e6)
    visits = make_visits(args.visits, args.size, stars)
    sm = discrete_skymap(
        [(RA0, DEC0)], radius=args.patch * 0.2 / 3600 / 2 * 0.999, patch_inner=args.patch, patch_border=50, name="bench"
    )
    patch = sm.patch(0, 0)
    npix = patch.shape[0] * patch.shape[1]
    # Warm-up (numba cache load) on a tiny problem.
    small = discrete_skymap([(RA0, DEC0)], radius=0.003, patch_inner=64, patch_border=4).patch(0, 0)
    run_procsky(visits[:2], small, True)

    rows = {}
    ours, w, c = timed(lambda: run_procsky(visits, patch, False))
    rows["procsky (mean)"] = (ours, w, c)
    ours_r, w, c = timed(lambda: run_procsky(visits, patch, True))
    rows["procsky (mean + artifact rejection)"] = (ours_r, w, c)
    work = Path(tempfile.mkdtemp(prefix="bench_coadd_"))
    try:
        sw, w, c = run_swarp(visits, patch, work)
        rows["SWarp 2.41 (LANCZOS3, WEIGHTED)"] = (sw, w, c)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"SWarp failed: {e}")
        sw = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rp, w, c = timed(lambda: run_reproject(visits, patch))
    rows["reproject_and_coadd (bicubic)"] = (rp, w, c)

    print(
        f"{args.visits} visits of {args.size}x{args.size} px -> patch {patch.shape[1]}x{patch.shape[0]} px "
        f"({npix / 1e6:.2f} Mpix)"
    )
    base = rows["procsky (mean)"][1]
    print(f"{'tool':45s} {'wall s':>8s} {'cpu s':>8s} {'Mpix/s':>8s} {'wall / procsky':>15s}")
    for name, (_, w, c) in rows.items():
        print(f"{name:45s} {w:8.2f} {c:8.2f} {npix / 1e6 / w:8.3f} {w / base:15.2f}")

    ra, dec, flux = stars
    x, y = patch.wcs.world_to_pixel_values(ra, dec)
    print("\naperture fluxes (r = 12 px) of stars covered by every tool:")
    meas = {}
    for name, (img, _, _) in rows.items():
        f, xw, yw, _ = measure(img, x, y)
        meas[name] = (f, xw, yw)
    ok = np.ones(len(x), bool)
    for _name, (img, _, _) in rows.items():
        ix, iy = (
            np.clip(np.round(x).astype(int), 0, patch.shape[1] - 1),
            np.clip(np.round(y).astype(int), 0, patch.shape[0] - 1),
        )
        ok &= np.isfinite(img[iy, ix]) & (x > 15) & (y > 15) & (x < patch.shape[1] - 15) & (y < patch.shape[0] - 15)
    print(f"  {ok.sum()} stars")
    for name, (f, xw, yw) in meas.items():
        r = f[ok] / flux[ok]
        d = np.hypot(xw - x, yw - y)[ok] * 200
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        print(
            f"  {name:45s} flux/truth median {np.median(r):.5f} (scatter {mad:.4f});"
            f" centroid offset median {np.median(d):.2f} mas"
        )
    if sw is not None:
        sname = "SWarp 2.41 (LANCZOS3, WEIGHTED)"
        for name, (f, _, _) in meas.items():
            if name != sname:
                r = f[ok] / meas[sname][0][ok]
                print(f"  {name:45s} flux / SWarp median {np.median(r):.5f}")
        both = np.isfinite(ours) & np.isfinite(sw)
        diff = (ours - sw)[both]
        print(
            f"\npixel difference procsky - SWarp: median {np.median(diff):.3g} nJy, robust rms "
            f"{1.4826 * np.median(np.abs(diff - np.median(diff))):.3g} nJy (coadd noise rms "
            f"{np.nanmedian(np.abs(ours)) * 1.4826:.3g} nJy)"
        )


if __name__ == "__main__":
    main()
