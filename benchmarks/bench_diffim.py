"""Benchmark: procsky difference imaging against SFFT (Hu et al. 2022) on the CPU.

Both tools get the same synthetic science/template pair (:func:`procsky.diffim.simulate_pair`:
a star field, science PSF varying across the detector, deep template with better seeing,
transients) and fit the same model class: a kernel varying as a 2nd-order polynomial over
the detector plus a differential background (SFFT: delta-function pixel basis solved in
Fourier space, ``KerPolyOrder=2``, ``BGPolyOrder`` = ours; procsky: Alard-Lupton Gaussian
basis on star stamps). SFFT runs through ``sfft.CustomizedPacket`` with the Numpy backend
and no source masking (its "crowded" mode without SExtractor pre-processing: the masked
images are the images), on as many threads as this script may use.

Measured, per size:

* wall time of the subtraction (fit + convolution; SFFT's one-off numba compilation is
  timed separately and excluded);
* residual quality: in 17x17 stamps around the 200 brightest static stars, the std and mean
  of ``diff / sigma`` with ``sigma^2 = V_sci + ksum^2 V_tpl`` (the noise of the
  difference without correlation), for procsky without decorrelation (same quantity as
  SFFT) and with it (``diff / sqrt(variance plane)``); and the ratio of the diff std in
  star stamps to the diff std on empty sky.

Usage::

    .venv/bin/python benchmarks/bench_diffim.py [--sizes 2048 4096] [--threads 2] [--out /tmp/bench_diffim.json]
    .venv/bin/python benchmarks/bench_diffim.py --quantum demo-out/repo [--visit 1 --detector 0]

The second form times one ``subtract`` quantum of the demo's drp run in process, step by
step (thread CPU; the pipeline's workers run one quantum per thread).

Needs ``pip install sfft`` (CPU backend uses pyFFTW and numba). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def _stamp_stats(diff, sigma, truth, n=200, r=8, margin=40):
    st = truth["stars"]
    ny, nx = diff.shape
    zs, ds = [], []
    for i in np.argsort(-st["flux"])[: 3 * n]:
        x, y = int(round(st["x"][i])), int(round(st["y"][i]))
        if margin < x < nx - margin and margin < y < ny - margin:
            d = diff[y - r : y + r + 1, x - r : x + r + 1]
            s = sigma[y - r : y + r + 1, x - r : x + r + 1]
            if np.all(np.isfinite(d)):
                zs.append((d / s).ravel())
                ds.append(d.ravel())
        if len(zs) >= n:
            break
    z = np.concatenate(zs)
    return float(z.std()), float(z.mean()), np.concatenate(ds)


def _sky_std(diff, truth, margin=40, r=12):
    ny, nx = diff.shape
    mask = np.zeros(diff.shape, bool)
    st = truth["stars"]
    for x, y in zip(st["x"], st["y"]):
        ix, iy = int(round(x)), int(round(y))
        mask[max(iy - r, 0) : iy + r + 1, max(ix - r, 0) : ix + r + 1] = True
    inner = np.zeros(diff.shape, bool)
    inner[margin:-margin, margin:-margin] = True
    sel = inner & ~mask & np.isfinite(diff)
    return float(np.std(diff[sel]))


def run_size(n, threads, seed=1, *, sfft_half_width=None, mem_limit_gb=20.0, spatial_order=2, sfft=True):
    from procsky.diffim import SubtractionConfig, simulate_pair, subtract_images

    scale = (n / 2048.0) ** 2
    t0 = time.time()
    sci, tpl, truth = simulate_pair(
        (n, n),
        n_stars=int(5000 * scale),
        seeing_science=(2.0, 2.6),
        seeing_template=1.5,
        seed=seed,
        n_transients=int(50 * scale),
        transient_flux=(2000.0, 20000.0),
        star_flux=(300.0, 2e5),
    )
    t_sim = time.time() - t0
    res = {"size": n, "n_stars": int(5000 * scale), "simulate_s": t_sim, "threads": threads}
    print(f"[{n}] simulated in {t_sim:.1f} s", file=sys.stderr, flush=True)

    # ---- procsky: warm-up on a small pair with the same configuration (numba compilation),
    # then the best of two runs of each configuration.
    s0, t0_, _ = simulate_pair((384, 384), n_stars=250, seeing_science=(2.0, 2.6), seeing_template=1.5, seed=2)
    for dec in (False, True):
        subtract_images(s0, t0_, SubtractionConfig(decorrelate=dec, spatial_order=spatial_order), lazy=False)
    import dask

    with dask.config.set(scheduler="threads", num_workers=threads):
        for key, dec in (("procsky_s", False), ("procsky_decorrelated_s", True)):
            best = np.inf
            for _ in range(2):
                t = time.time()
                d, kern, summ = subtract_images(
                    sci, tpl, SubtractionConfig(decorrelate=dec, chunk=1024, spatial_order=spatial_order), lazy=False
                )
                best = min(best, time.time() - t)
            res[key] = best
            if dec:
                diff_d = d
            else:
                diff_nd = d
    print(
        f"[{n}] procsky {res['procsky_s']:.1f} s (decorrelated {res['procsky_decorrelated_s']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    import resource

    res["procsky_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ksum = summ["kernel_sum"]
    sigma = np.sqrt(sci.variance + ksum**2 * tpl.variance)
    zstd, zmean, dvals = _stamp_stats(diff_nd.image, sigma, truth)
    res["procsky"] = {
        "stamp_z_std": zstd,
        "stamp_z_mean": zmean,
        "stamp_over_sky_std": float(np.std(dvals) / _sky_std(diff_nd.image, truth)),
        "kernel_half_width": summ["kernel_half_width"],
        "n_stamps_used": summ["n_stamps_used"],
    }
    zstd_d, zmean_d, _ = _stamp_stats(diff_d.image, np.sqrt(diff_d.variance), truth)
    res["procsky_decorrelated"] = {"stamp_z_std": zstd_d, "stamp_z_mean": zmean_d}
    h = summ["kernel_half_width"]
    res["procsky_spatial_order_used"] = summ["spatial_order_used"]
    if not sfft:
        return res

    # ---- SFFT, in a child process under a memory limit (its dense linear system grows
    # as (kernel pixels x spatial terms)^2 and can exhaust a shared machine).
    import subprocess

    from astropy.io import fits

    with tempfile.TemporaryDirectory(prefix="bench_diffim_") as tmp:
        fits.PrimaryHDU(tpl.image.astype(np.float64)).writeto(os.path.join(tmp, "ref.fits"))
        fits.PrimaryHDU(sci.image.astype(np.float64)).writeto(os.path.join(tmp, "sci.fits"))
        sfft_h = h if sfft_half_width is None else sfft_half_width
        res["sfft_kernel_half_width"] = sfft_h
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--sfft-worker",
            tmp,
            str(sfft_h),
            str(threads),
            str(mem_limit_gb),
            str(spatial_order),
        ]
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        res["sfft_total_s"] = time.time() - t
        info_path = os.path.join(tmp, "info.json")
        if proc.returncode != 0 or not os.path.exists(info_path):
            tail = (proc.stderr or proc.stdout)[-600:]
            res["sfft_error"] = f"SFFT exited with {proc.returncode}: {tail}"
            return res
        with open(info_path) as f:
            res.update(json.load(f))
        sdiff = fits.getdata(os.path.join(tmp, "diff.fits")).astype(np.float64)
    zstd_s, zmean_s, svals = _stamp_stats(sdiff, sigma, truth)
    res["sfft"] = {
        "stamp_z_std": zstd_s,
        "stamp_z_mean": zmean_s,
        "stamp_over_sky_std": float(np.std(svals) / _sky_std(sdiff, truth)),
    }
    return res


def _sfft_worker(tmp, half_width, threads, mem_limit_gb, spatial_order):
    """Child process: run SFFT's customized packet (Numpy backend) on tmp/ref.fits, tmp/sci.fits."""
    import contextlib
    import io
    import re
    import resource

    lim = int(float(mem_limit_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    from sfft.CustomizedPacket import Customized_Packet

    ref, sci, diff = (os.path.join(tmp, f"{k}.fits") for k in ("ref", "sci", "diff"))
    buf = io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(buf):
        Customized_Packet.CP(
            FITS_REF=ref,
            FITS_SCI=sci,
            FITS_mREF=ref,
            FITS_mSCI=sci,
            ForceConv="REF",
            GKerHW=int(half_width),
            FITS_DIFF=diff,
            KerPolyOrder=int(spatial_order),
            BGPolyOrder=1,
            ConstPhotRatio=False,
            BACKEND_4SUBTRACT="Numpy",
            NUM_CPU_THREADS_4SUBTRACT=int(threads),
            VERBOSE_LEVEL=1,
        )
    wall = time.time() - t
    text = buf.getvalue()
    comp = re.search(r"Compilations of SFFT-SUBTRACTION TAKES \[([0-9.]+) s\]", text)
    sub = re.search(r"Report: SFFT-SUBTRACTION TAKES \[([0-9.]+) s\]", text)
    info = {
        "sfft_wall_s": wall,
        "sfft_compile_s": float(comp.group(1)) if comp else None,
        "sfft_s": float(sub.group(1)) if sub else wall,
        "sfft_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f)


def run_quantum(repo_root, run="demo/drp", visit=None, detector=None, reps=3):
    """CPU of one ``subtract`` quantum of a drp run (``python -m procsky.demo``), in process:
    the steps of the task (template warp, subtraction, DIA detection mask) and the whole
    quantum as the executor runs it (inputs read, ``SubtractTask.run``, the lazy difference
    computed on the synchronous scheduler while it is written to Zarr). Thread CPU seconds,
    best of ``reps`` after a warm-up (numba compilation)."""
    import shutil
    from pathlib import Path

    from procsky import _dask
    from procsky.diffim import DiaConfig, dia_detection_mask, subtract_images, warp_template_to_science
    from procsky.repo import Repo
    from procsky.repo.storage import get_storage_class
    from procsky.tasks.diffim import SubtractConfig, SubtractTask

    repo = Repo(Path(repo_root))
    refs = sorted(repo.query("calexp", run=run), key=lambda r: (r.data_id["visit"], r.data_id["detector"]))
    if visit is not None:
        refs = [r for r in refs if r.data_id["visit"] == visit and r.data_id["detector"] == detector]
    ref = refs[0]
    band = {r["visit"]: r.get("band") for r in repo.dimension_records("visit")}[ref.data_id["visit"]]
    trefs = [t for t in repo.query("template", run=run) if t.data_id.get("band") == band]
    cfg = SubtractConfig()
    task = SubtractTask(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench_diffim_quantum_"))

    def quantum():
        calexp, tpls = repo.get(ref), [repo.get(t) for t in trefs]
        with _dask.task_scheduler(False):
            get_storage_class("Exposure").write(task.run(calexp=calexp, templates=tpls)["diff"], tmp / "diff.zarr")
        shutil.rmtree(tmp / "diff.zarr")

    sci = repo.get(ref).compute()
    tpls = [repo.get(t) for t in trefs]
    state = {}

    def warp():
        state["tpl"] = warp_template_to_science(tpls, sci, order=cfg.warp_order)

    def subtract():
        state["diff"] = subtract_images(sci, state["tpl"], cfg.subtraction, lazy=False)[0]

    def detect():
        dia_detection_mask(state["diff"], DiaConfig(nsigma=cfg.detection_threshold), static=sci.image)

    res = {"data_id": dict(ref.data_id), "templates": len(trefs)}
    with _dask.task_scheduler(False):
        for name, fn in (("quantum", quantum), ("template_warp", warp), ("subtract", subtract), ("dia_mask", detect)):
            fn()
            best = np.inf
            for _ in range(reps):
                t = time.thread_time()
                fn()
                best = min(best, time.thread_time() - t)
            res[f"{name}_cpu_s"] = best
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/bench_diffim.json")
    ap.add_argument(
        "--sfft-half-width",
        type=int,
        default=None,
        help="SFFT kernel half-width (default: procsky's, from the PSF widths)",
    )
    ap.add_argument(
        "--mem-limit-gb",
        type=float,
        default=20.0,
        help="address-space limit of the SFFT process (SFFT peaks at ~11 GB RSS on 2048² with 2 threads)",
    )
    ap.add_argument(
        "--spatial-order",
        type=int,
        default=2,
        help="kernel spatial polynomial order of both tools (SFFT's KerPolyOrder)",
    )
    ap.add_argument("--no-sfft", action="store_true", help="time procsky only")
    ap.add_argument("--sfft-worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument(
        "--quantum",
        metavar="REPO",
        help="instead: CPU of one subtract quantum of the drp run in REPO (e.g. demo-out/repo), per step",
    )
    ap.add_argument("--visit", type=int, default=None, help="with --quantum (default: the first calexp)")
    ap.add_argument("--detector", type=int, default=None, help="with --quantum")
    args = ap.parse_args(argv)
    if args.sfft_worker:
        _sfft_worker(*args.sfft_worker)
        return 0
    if args.quantum:
        # thread CPU of the calling thread: the quantum's own work, as the executor counts it
        r = run_quantum(args.quantum, visit=args.visit, detector=args.detector)
        print(json.dumps(r, indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = []
    for n in args.sizes:
        r = run_size(
            n,
            args.threads,
            sfft_half_width=args.sfft_half_width,
            mem_limit_gb=args.mem_limit_gb,
            spatial_order=args.spatial_order,
            sfft=not args.no_sfft,
        )
        r["spatial_order"] = args.spatial_order
        if "sfft_s" in r:
            r["time_ratio_sfft_over_procsky"] = r["sfft_s"] / r["procsky_s"]
            r["residual_ratio_procsky_over_sfft"] = r["procsky"]["stamp_z_std"] / r["sfft"]["stamp_z_std"]
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
