"""Warp + coadd benchmark: procsky against SWarp and reproject on the same inputs and grid.

Run:  .venv/bin/python benchmarks/bench_coadd.py [--visits 8] [--size 1500] [--patch 1800] [--repeat 1] [--chunk 0]

Inputs: synthetic calibrated visits (Gaussian stars of known nJy flux, rotated TAN WCSs
with offsets, 0.26"/px, different zero points, seeing and noise). SIP is left out because
SWarp reads only TPV distortions; all three tools see exactly the same WCSs. Output: one
patch (TAN, 0.2"/px) of a discrete sky map.

procsky and SWarp get the same I/O: both read their inputs from disk and write the coadd to
disk, each in its own child process.

* procsky: the calexps are stored as the pipeline stores them (Zarr, its default 1024 px
  storage chunks, ``procsky.exposure.DEFAULT_CHUNK``); the child process reads them, builds
  the coadd with the pipeline's default configuration (:func:`procsky.coadd.build_coadd`,
  ``WarpConfig()``: 1024 px output chunks; warps on the fly, Lanczos3, inverse-variance
  weighted mean, dask synchronous scheduler, one thread) and writes it (Zarr, with its PSF
  and ``n_inputs``), with and without artifact rejection.
* SWarp (``/usr/bin/SWarp``): reads the same pixels as FITS (image in nJy and a weight map
  1 / variance), LANCZOS3, COMBINE_TYPE WEIGHTED with MAP_WEIGHT weights, no background
  subtraction, FSCALASTRO FIXED (flux per pixel), 1 thread; writes coadd and weight FITS.
* reproject (in this process, in memory: a reference for accuracy, not for I/O):
  ``reproject_and_coadd`` with ``reproject_interp`` (bicubic), ``input_weights``
  (1 / variance), ``combine_function='mean'``; reproject conserves surface brightness, so
  its output is multiplied by the pixel-area ratio to compare fluxes.

Reported per tool: wall seconds, *whole-process* CPU seconds (the child's user + system
time from ``RUSAGE_CHILDREN``, Python start-up and imports included) and, for procsky,
*in-worker* CPU seconds (``time.process_time`` around read + build + write inside the
child, start-up excluded); with ``--repeat N`` the tools run interleaved N times (procsky,
SWarp, procsky with rejection, ...) and medians with min-max are printed. Then aperture
fluxes of the stars against truth and against SWarp, and the pixel-level agreement.
A first procsky child on a tiny patch loads numba's cache (compiling it if cold) and is
not counted.

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

from procsky.coadd import CoaddConfig, build_coadd
from procsky.exposure import Exposure, VisitInfo
from procsky.photocalib import PhotoCalib
from procsky.psf import GaussianPsf
from procsky.skymap import discrete_skymap
from procsky.warp import WarpConfig
from procsky.wcs import wcs_from_cards

# The test helpers (and pytest with them) are imported by the parent process only, so that
# a procsky child's start-up is the pipeline's own.
TESTS = str(Path(__file__).resolve().parents[1] / "tests")

RA0, DEC0 = 150.0, 2.0


def make_visits(n, size, stars, seed=0):
    sys.path.insert(0, TESTS)
    from test_coadd import render_gaussians

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


def _child_env() -> dict:
    """One thread for every library in a child process."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = "1"
    return env


def run_child(cmd, **kw):
    """Run ``cmd`` to completion; (stdout, wall s, whole-process CPU s from RUSAGE_CHILDREN)."""
    import resource

    r0, w0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env(), **kw).stdout
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out, time.perf_counter() - w0, cpu


def write_swarp_inputs(visits, patch, work: Path) -> list[str]:
    """The visits as SWarp reads them: image (nJy) and weight (1 / variance) FITS, and the
    output grid as ``coadd.head``."""
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
    return names


def run_swarp(names, work: Path):
    """SWarp in its own process; (wall s, whole-process CPU s)."""
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
    _, wall, cpu = run_child(cmd, cwd=work)
    return wall, cpu


def read_swarp(work: Path):
    from astropy.io import fits

    img = fits.getdata(work / "coadd.fits").astype(np.float64)
    wgt = fits.getdata(work / "coadd.weight.fits")
    img[wgt <= 0] = np.nan
    return img


def run_procsky_child(folder: Path, n: int, patch_inner: int, reject: bool, out: str, chunk: int = 0):
    """procsky in its own process: read the Zarr calexps, build and write the coadd.
    Returns (result dict of :func:`run_mode`, wall s, whole-process CPU s)."""
    import json

    cmd = [
        sys.executable,
        __file__,
        "--run-mode",
        "on-the-fly",
        "--folder",
        str(folder),
        "--visits",
        str(n),
        "--patch",
        str(patch_inner),
        "--out",
        out,
        "--chunk",
        str(chunk),
    ] + (["--reject"] if reject else [])
    stdout, wall, cpu = run_child(cmd)
    return json.loads(stdout.strip().splitlines()[-1]), wall, cpu


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


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: ``VmHWM`` of ``/proc/self/status`` (Linux),
    else ``ru_maxrss``. Linux's ``ru_maxrss`` of a child started by fork + exec keeps the
    parent's resident size at the fork (the high-water mark of the replaced address space
    survives ``exec``), so a parent holding 40 visits in memory made its children look
    larger; ``VmHWM`` belongs to the child's own address space."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_patch(patch_inner: int):
    """The output patch: ``patch_inner`` + 2 x 50 px at 0.2"/px, centred on the stars."""
    sm = discrete_skymap(
        [(RA0, DEC0)],
        radius=patch_inner * 0.2 / 3600 / 2 * 0.999,
        patch_inner=patch_inner,
        patch_border=50,
        name="bench",
    )
    return sm.patch(0, 0)


def run_mode(mode, folder: Path, n, patch_inner, reject, out=None, chunk=0):
    """One coadd feeding mode on calexps stored in ``folder`` (read, coadded and written to
    ``folder / out``); returns a result dict (``cpu``: CPU seconds of this work in this
    process, start-up excluded)."""

    import dask

    from procsky.warp import warp_exposure

    patch = bench_patch(patch_inner)
    # By default the pipeline's configuration (1024 px output chunks). With 512 px output
    # chunks on 512 px calexp chunks (``--chunk 512``) each input chunk is decoded ~5 times
    # (once per output chunk whose input region touches it): Zarr reads take 1.2-1.9 CPU-s
    # instead of 0.5-0.65, but artifact rejection is cheaper (its stack of input strips fits
    # ``memory_budget``).
    wcfg = WarpConfig(chunk=chunk) if chunk else WarpConfig()
    cfg = CoaddConfig(reject_artifacts=reject, warp=wcfg)
    t0, c0 = time.perf_counter(), time.process_time()
    calexps = [Exposure.read(folder / f"calexp{k}.zarr") for k in range(n)]
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
        lazy.write(folder / (out or f"coadd-{mode}.zarr"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "mode": mode,
        "wall": wall,
        "cpu": cpu,
        "warp_wall": t_warp,
        "peak_rss_mb": peak_rss_mb(),
        "npix": patch.shape[0] * patch.shape[1],
    }


def main_modes(args):
    import json

    work = Path(tempfile.mkdtemp(prefix="bench_coadd_modes_"))
    try:
        half = args.patch * 0.2 / 2 * 0.8
        sys.path.insert(0, TESTS)
        from test_coadd import make_stars

        stars = make_stars(args.stars, seed=2, half=half, fmin=1e5, fmax=3e6)
        for k, v in enumerate(make_visits(args.visits, args.size, stars)):
            v.write(work / f"calexp{k}.zarr", chunks=args.chunk or None)  # the pipeline's storage chunks
        print(
            f"{args.visits} calexps of {args.size}x{args.size} px on disk (Zarr) -> patch of {args.patch + 100} px "
            f"(chunks {args.chunk or WarpConfig().chunk}, dask synchronous, "
            f"artifact rejection {'on' if args.reject else 'off'}); "
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
                "--chunk",
                str(args.chunk),
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


def _stat(values) -> str:
    v = np.asarray(values, float)
    return f"{np.median(v):7.2f}" if v.size == 1 else f"{np.median(v):7.2f} ({v.min():.2f}-{v.max():.2f})"


def main_same_io(args):
    """procsky and SWarp, each reading its inputs from disk and writing the coadd, in child
    processes run interleaved ``args.repeat`` times; reproject in memory as a reference."""
    sys.path.insert(0, TESTS)
    from test_coadd import make_stars, measure

    half = args.patch * 0.2 / 2 * 0.8
    stars = make_stars(args.stars, seed=2, half=half, fmin=1e5, fmax=3e6)
    visits = make_visits(args.visits, args.size, stars)
    patch = bench_patch(args.patch)
    npix = patch.shape[0] * patch.shape[1]
    work = Path(tempfile.mkdtemp(prefix="bench_coadd_"))
    try:
        for k, v in enumerate(visits):
            v.write(work / f"calexp{k}.zarr", chunks=args.chunk or None)  # as the pipeline stores calexps
        names = write_swarp_inputs(visits, patch, work)
        # Warm-up: numba's cache loaded (compiled if cold) on a tiny patch; not counted.
        for reject in (False, True):
            run_procsky_child(work, min(2, args.visits), 64, reject, "warmup.zarr", args.chunk)
        sname = "SWarp 2.41 (LANCZOS3, WEIGHTED)"
        runs: dict = {"procsky (mean)": [], "procsky (mean + artifact rejection)": [], sname: []}
        have_swarp = True
        for _ in range(args.repeat):
            r, w, c = run_procsky_child(work, args.visits, args.patch, False, "coadd-mean.zarr", args.chunk)
            runs["procsky (mean)"].append((w, c, r["cpu"]))
            if have_swarp:
                try:
                    w, c = run_swarp(names, work)
                    runs[sname].append((w, c, None))
                except (FileNotFoundError, subprocess.CalledProcessError) as e:
                    print(f"SWarp failed: {e}")
                    have_swarp = False
            if not args.no_reject:
                r, w, c = run_procsky_child(work, args.visits, args.patch, True, "coadd-reject.zarr", args.chunk)
                runs["procsky (mean + artifact rejection)"].append((w, c, r["cpu"]))
        images = {"procsky (mean)": Exposure.read(work / "coadd-mean.zarr").image.compute().astype(np.float64)}
        if not args.no_reject:
            images["procsky (mean + artifact rejection)"] = (
                Exposure.read(work / "coadd-reject.zarr").image.compute().astype(np.float64)
            )
        if have_swarp:
            images[sname] = read_swarp(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rp_row = None
    if not args.no_reproject:
        images["reproject_and_coadd (bicubic)"], w, c = timed(lambda: run_reproject(visits, patch))
        rp_row = (w, c)

    print(
        f"{args.visits} visits of {args.size}x{args.size} px -> patch {patch.shape[1]}x{patch.shape[0]} px "
        f"({npix / 1e6:.2f} Mpix); procsky and SWarp read their inputs from disk and write the coadd, each in "
        f"its own process, run interleaved {args.repeat} time(s): median (min-max)"
    )
    print(f"{'tool':40s} {'wall s':>20s} {'whole-process CPU s':>22s} {'in-worker CPU s':>22s}")
    for name, rs in runs.items():
        if not rs:
            continue
        inw = [x[2] for x in rs if x[2] is not None]
        print(
            f"{name:40s} {_stat([x[0] for x in rs]):>20s} {_stat([x[1] for x in rs]):>22s} "
            f"{_stat(inw) if inw else '-':>22s}"
        )
    if rp_row is not None:
        print(f"{'reproject_and_coadd (bicubic), in memory':40s} {rp_row[0]:20.2f} {'-':>22s} {rp_row[1]:22.2f}")
    mean = runs["procsky (mean)"]
    if runs[sname]:
        sw_cpu = float(np.median([x[1] for x in runs[sname]]))
        print(
            f"procsky / SWarp CPU: whole process {np.median([x[1] for x in mean]) / sw_cpu:.3f}, "
            f"in-worker {np.median([x[2] for x in mean]) / sw_cpu:.3f}"
        )
    rej = runs["procsky (mean + artifact rejection)"]
    if rej:
        print(
            f"artifact rejection on / off, in-worker CPU: "
            f"{np.median([x[2] for x in rej]) / np.median([x[2] for x in mean]):.3f}"
        )

    ra, dec, flux = stars
    x, y = patch.wcs.world_to_pixel_values(ra, dec)
    print("\naperture fluxes (r = 12 px) of stars covered by every tool:")
    meas = {}
    for name, img in images.items():
        f, xw, yw, _ = measure(img, x, y)
        meas[name] = (f, xw, yw)
    ok = np.ones(len(x), bool)
    ix = np.clip(np.round(x).astype(int), 0, patch.shape[1] - 1)
    iy = np.clip(np.round(y).astype(int), 0, patch.shape[0] - 1)
    for img in images.values():
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
    if sname in images:
        for name, (f, _, _) in meas.items():
            if name != sname:
                r = f[ok] / meas[sname][0][ok]
                print(f"  {name:45s} flux / SWarp median {np.median(r):.5f}")
        ours, sw = images["procsky (mean)"], images[sname]
        both = np.isfinite(ours) & np.isfinite(sw)
        diff = (ours - sw)[both]
        print(
            f"\npixel difference procsky - SWarp: median {np.median(diff):.3g} nJy, robust rms "
            f"{1.4826 * np.median(np.abs(diff - np.median(diff))):.3g} nJy (coadd noise rms "
            f"{np.nanmedian(np.abs(ours)) * 1.4826:.3g} nJy)"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", action="store_true", help="compare on-the-fly and intermediate warps")
    ap.add_argument("--reject", action="store_true", help="artifact rejection in --modes")
    ap.add_argument("--run-mode", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--visits", type=int, default=8)
    ap.add_argument("--size", type=int, default=1500, help='visit side, pixels (0.26"/px)')
    ap.add_argument("--patch", type=int, default=1800, help='patch inner side, pixels (0.2"/px)')
    ap.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="calexp storage and coadd output chunk side (default: the pipeline's, 1024)",
    )
    ap.add_argument("--stars", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each tool (medians printed)")
    ap.add_argument("--no-reject", action="store_true", help="skip the run with artifact rejection")
    ap.add_argument("--no-reproject", action="store_true", help="skip reproject_and_coadd")
    args = ap.parse_args()
    if args.run_mode:
        import json

        res = run_mode(args.run_mode, Path(args.folder), args.visits, args.patch, args.reject, args.out, args.chunk)
        print(json.dumps(res))
        return
    if args.modes:
        main_modes(args)
        return
    main_same_io(args)


if __name__ == "__main__":
    main()
