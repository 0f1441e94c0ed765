"""Time the whole ``calibrate`` task on a simulated 4096 x 4096 detector against peers.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_calibrate_task.py [--size 4096] [--out /tmp/bench-cal]
      [--reuse] [--no-peers]

One detector is drawn with ``procsky.sim`` (the ``tiny`` recipe's sky, PSF and artefacts,
on one detector of the given size), then on that same image:

* procsky ``calibrate_exposure``: background, cosmic rays, detection, measurement, PSF
  model, PSF fluxes, aperture correction, astrometric fit against the simulated reference
  catalogue, zero point (CPU seconds of this process);
* sep: background + matched-filter extraction + circular apertures;
* astroscrappy: cosmic rays;
* SExtractor + PSFEx, run as external programs (Debian ``source-extractor`` and
  ``psfex``) on a FITS file of the same pixels with the variance as weight map, using the
  PSFEx-preparation configuration they ship (CPU seconds of the child processes).

procsky's run is profiled step by step (``procsky.calibrate.state.StepProfile``): CPU, wall and the
resident-set peak of each step (background, cosmic rays: L.A.Cosmic / PSF-sharp tests / tracks,
detection, deblending, streaks, measurement, PSF model, PSF fluxes, aperture correction, astrometry,
photometry, other), and the peak of the whole call. The rows add up to the whole call: a step's
own time, without the steps named inside it.

SExtractor + PSFEx do less than ``calibrate`` (no cosmic-ray cleaning, astrometry or
photometric calibration), so the ratio against them is conservative. Times are CPU seconds
(``time.process_time`` / ``RUSAGE_CHILDREN``), less sensitive to other load than wall time.
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

SEX_SHARE = Path("/usr/share/source-extractor")
PSFEX_SHARE = Path("/usr/share/psfex")


from _peers import cpu  # noqa: E402 - this folder is on sys.path when run as a script


def trim_heap() -> None:
    """Collect garbage and return glibc's free heap to the system (``malloc_trim``; elsewhere nothing)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child_cpu(cmd, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, time.perf_counter() - w0


def simulate_detector(size: int, out: Path):
    from procsky.sim import simulate
    from procsky.sim.recipe import load_recipe

    recipe = load_recipe("tiny").model_dump(mode="json")
    recipe["name"] = f"bench{size}"
    recipe["description"] = f"one {size}x{size} detector for the calibrate benchmark"
    recipe["instrument"].update(n_detectors_x=1, n_detectors_y=1, detector_nx=size, detector_ny=size)
    recipe["bands"] = [{"name": "r", "exposure_time": 30, "n_visits": 1, "depth": 24.2}]
    recipe["dither"] = {"pattern": "list", "offsets_arcsec": [[0, 0]], "rotations_deg": [0]}
    res = simulate(recipe, out, seed=7, scheduler="sync", progress=False)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--out", default="/tmp/procsky-bench-calibrate")
    ap.add_argument("--reuse", action="store_true", help="reuse the simulation in --out when there is one")
    ap.add_argument("--no-peers", action="store_true", help="time procsky only")
    args = ap.parse_args()
    out = Path(args.out)
    reuse = args.reuse and (out / "recipe.yaml").exists() and any((out / "images").glob("*.fits"))
    if out.exists() and not reuse:
        shutil.rmtree(out)
    if (out / "astromatic").exists():
        shutil.rmtree(out / "astromatic")

    from procsky.calibrate import calibrate_exposure
    from procsky.calibrate.state import StepProfile
    from procsky.instruments import get_instrument
    from procsky.refcat import read_refcat_file

    t_sim = float("nan")
    if not reuse:
        (_, t_sim, _) = cpu(simulate_detector, args.size, out)
    image_path = sorted((out / "images").glob("*.fits"))[0]
    exp = get_instrument("simcam").ingest_file(image_path)[0].obj.compute()
    refcat = read_refcat_file(out / "refcat" / "refcat.parquet")
    fwhm_px = float(yaml.safe_load((out / "recipe.yaml").read_text())["seeing"]["median_fwhm"]) / 0.2

    # Warm up numba (compiled code is cached on disk; loading it is not what we time).
    calibrate_exposure(exp[:1024, :1024].compute(), refcat)
    # the warm-up's freed heap (~45 MB) goes back to the system, as in a process that has not run it
    trim_heap()

    rows = []
    profile = StepProfile(memory=True)
    (calexp, src, summary), t_cal, w_cal = cpu(calibrate_exposure, exp, refcat, profile=profile)
    del calexp, src
    rows.append(
        (
            f"procsky calibrate_exposure ({summary['n_sources']} sources, PSF FWHM "
            f'{summary["psf_fwhm_arcsec"]:.3f}", astrometry {summary.get("astrometry_status", "?")}, '
            f"zp {summary['zero_point']:.3f})",
            t_cal,
            w_cal,
        )
    )

    image = np.asarray(exp.image, dtype=np.float64)
    variance = np.asarray(exp.variance, dtype=np.float64)
    sigma = fwhm_px / (2 * math.sqrt(2 * math.log(2)))
    peers: dict[str, float] = {}
    if args.no_peers:
        print_table(args.size, image_path, t_sim, rows, peers, t_cal, profile)
        return
    try:
        import sep  # noqa: F401 - skip cleanly when missing

        from _peers import sep_extract

        def sep_run():
            return sep_extract(image, variance, sigma)[0]

        objs, t_s, w_s = cpu(sep_run)
        rows.append((f"sep background + extract + apertures ({len(objs)} objects)", t_s, w_s))
        peers["sep"] = t_s
    except ImportError:
        print("sep not installed (pip install sep): skipped")
    try:
        import astroscrappy

        (m, _), t_a, w_a = cpu(
            astroscrappy.detect_cosmics,
            image.astype(np.float32),
            invar=variance.astype(np.float32),
            sigclip=4.5,
            objlim=5.0,
            gain=1.0,
            readnoise=5.0,
            satlevel=1e9,
        )
        rows.append((f"astroscrappy detect_cosmics ({int(m.sum())} px)", t_a, w_a))
        peers["astroscrappy"] = t_a
    except ImportError:
        print("astroscrappy not installed (pip install astroscrappy): skipped")

    sex, psfex = shutil.which("source-extractor") or shutil.which("sex"), shutil.which("psfex")
    if sex and psfex and (PSFEX_SHARE / "prepsfex.sex").exists():
        from astropy.io import fits

        work = out / "astromatic"
        work.mkdir()
        header = fits.Header()
        for k, v, c in exp.wcs_cards:
            header[k] = (v, c)
        fits.PrimaryHDU(image.astype(np.float32), header=header).writeto(work / "image.fits")
        fits.PrimaryHDU(variance.astype(np.float32)).writeto(work / "variance.fits")
        gain = float(exp.detector.get("gain", 1.0) or 1.0)
        # PSFEx selects stars on SNR_WIN, which the shipped prepsfex.param lacks.
        params = (PSFEX_SHARE / "prepsfex.param").read_text()
        if "SNR_WIN" not in params:
            params += "\nSNR_WIN\n"
        (work / "prepsfex.param").write_text(params)
        t_x, w_x = child_cpu(
            [
                sex,
                "image.fits",
                "-c",
                str(PSFEX_SHARE / "prepsfex.sex"),
                "-PARAMETERS_NAME",
                "prepsfex.param",
                "-FILTER_NAME",
                str(SEX_SHARE / "default.conv"),
                "-STARNNW_NAME",
                str(SEX_SHARE / "default.nnw"),
                "-CATALOG_NAME",
                "image.ldac",
                "-CATALOG_TYPE",
                "FITS_LDAC",
                "-WEIGHT_TYPE",
                "MAP_VAR",
                "-WEIGHT_IMAGE",
                "variance.fits",
                "-DETECT_THRESH",
                "5",
                "-ANALYSIS_THRESH",
                "5",
                "-GAIN",
                str(gain),
                "-SEEING_FWHM",
                f"{fwhm_px * 0.2:.3f}",
                "-BACK_SIZE",
                "128",
                "-VERBOSE_TYPE",
                "QUIET",
            ],
            work,
        )
        rows.append(("SExtractor (PSFEx preparation run: background, detection, apertures, vignets)", t_x, w_x))
        t_p, w_p = child_cpu(
            [
                psfex,
                "image.ldac",
                "-c",
                str(PSFEX_SHARE / "default.psfex"),
                "-PSFVAR_DEGREES",
                "2",
                "-CHECKPLOT_TYPE",
                "NONE",
                "-CHECKIMAGE_TYPE",
                "NONE",
                "-WRITE_XML",
                "N",
                "-VERBOSE_TYPE",
                "QUIET",
            ],
            work,
        )
        rows.append(("PSFEx (polynomial degree 2)", t_p, w_p))
        peers["sextractor+psfex"] = t_x + t_p
    else:
        print("SExtractor/PSFEx not installed (apt-get install source-extractor psfex): skipped")

    print_table(args.size, image_path, t_sim, rows, peers, t_cal, profile)


def print_table(size, image_path, t_sim, rows, peers, t_cal, profile) -> None:
    print(f"\nsimulated {size} x {size} detector ({image_path.name}); simulation took {t_sim:.1f} CPU s")
    print(f"{'step':<110s} {'CPU s':>8s} {'wall s':>8s}")
    for name, t, w in rows:
        print(f"{name:<110s} {t:8.2f} {w:8.2f}")
    for peer, t in peers.items():
        print(f"ratio procsky calibrate / {peer:<18s}: {t_cal / t:6.2f}")
    table = profile.table()
    print("\nprocsky calibrate_exposure by step (own time, without the steps named inside it):")
    print(f"{'step':<32s} {'calls':>5s} {'CPU s':>8s} {'wall s':>8s} {'peak RSS MB':>12s}")
    order = [
        "background",
        "cosmic rays: L.A.Cosmic",
        "cosmic rays: PSF-sharp tests",
        "cosmic rays: tracks",
        "detection",
        "deblending",
        "streaks",
        "measurement",
        "PSF model",
        "PSF fluxes",
        "aperture correction",
        "astrometry",
        "photometry",
        "other",
    ]
    table.sort(key=lambda r: order.index(r["step"]) if r["step"] in order else len(order))
    for r in table:
        print(f"{r['step']:<32s} {r['calls']:5d} {r['cpu_s']:8.2f} {r['wall_s']:8.2f} {r['peak_mb']:12.0f}")
    print(f"{'sum':<32s} {'':5s} {sum(r['cpu_s'] for r in table):8.2f} {sum(r['wall_s'] for r in table):8.2f}")
    print(
        f"calibrate peak RSS {profile.peak_mb:.0f} MB (RSS at its start {profile.start_rss_mb:.0f} MB, "
        f"input exposure and reference catalogue included)"
    )
    print(f"calibrate CPU: {t_cal:.1f} s (goal <= 10 CPU s and <= 1 GB peak for a 4k x 4k detector)")


if __name__ == "__main__":
    main()
