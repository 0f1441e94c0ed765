"""Benchmark the single-frame kernels on a synthetic 4096 x 4096 detector against sep and astroscrappy.

Run:  .venv/bin/python benchmarks/bench_calibrate.py [--size 4096] [--stars 12000]

Times are CPU seconds of this process (``time.process_time``), so other load on the
machine inflates them less than wall-clock time would. The first call of every kernel is
made on a small frame first so numba compilation (cached on disk) is not counted.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from _peers import cpu
from procsky.calibrate import process_arrays
from procsky.kernels import detect_sources, estimate_background, find_cosmic_rays, measure_sources
from procsky.kernels.testing import add_cosmic_rays, make_star_field


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stars", type=int, default=12000)
    ap.add_argument("--crs", type=int, default=3000)
    ap.add_argument("--fwhm", type=float, default=4.0)
    args = ap.parse_args()
    n = args.size
    sigma = args.fwhm / (2 * math.sqrt(2 * math.log(2)))
    fr = make_star_field((n, n), args.stars, fwhm=args.fwhm, flux_range=(1e3, 5e5), sky=800.0, read_noise=5.0, seed=1)
    img, crmask = add_cosmic_rays(fr.image, args.crs, seed=2)
    var = fr.variance

    # warm-up (compilation / cache load) on a small cut
    process_arrays(img[:512, :512], var[:512, :512], psf_fwhm=args.fwhm)

    rows = []
    bkg, t_b, w_b = cpu(estimate_background, img, box_size=128)
    sub = img - bkg.background
    det, t_d, w_d = cpu(detect_sources, sub, var, psf_sigma=sigma, nsigma=5.0)
    cat, t_m, w_m = cpu(
        measure_sources, sub, var, None, det.x, det.y, psf_sigma=sigma, children=det.children, blended=det.blended
    )
    ours = t_b + t_d + t_m
    rows.append(("procsky background", t_b, w_b))
    rows.append((f"procsky detection ({len(det.x)} sources)", t_d, w_d))
    rows.append(("procsky measurement (centroid, moments, 5 apertures, Kron, local bkg, flags)", t_m, w_m))
    cr, t_c, w_c = cpu(find_cosmic_rays, img, var)
    rows.append(
        (f"procsky cosmic rays ({cr.n_pixels} px, {(cr.mask & crmask).sum() / crmask.sum():.3f} recovered)", t_c, w_c)
    )
    res, t_f, w_f = cpu(process_arrays, img, var, psf_fwhm=args.fwhm)
    rows.append(
        (
            f"procsky process_arrays (bkg x2, CR, detect x2, measure, PSF fit, CR tests, PSF fluxes; "
            f"FWHM {res.psf_info.get('fwhm_px', float('nan')):.3f})",
            t_f,
            w_f,
        )
    )

    peers = {}
    try:
        import sep  # noqa: F401 - skip cleanly when missing

        from _peers import sep_extract

        data, vard = img.astype(np.float64), var.astype(np.float64)  # sep works in float64; not timed

        def sep_run():
            return sep_extract(data, vard, sigma, pixstack=5_000_000)

        (objs, _), t_s, w_s = cpu(sep_run)
        rows.append((f"sep Background + extract (matched filter) + sum_circle ({len(objs)} objects)", t_s, w_s))
        peers["sep"] = t_s
    except ImportError:
        print("sep not installed: pip install sep")
    try:
        import astroscrappy

        (m, _), t_a, w_a = cpu(
            astroscrappy.detect_cosmics, img, invar=var, sigclip=4.5, objlim=5.0, gain=1.0, readnoise=5.0, satlevel=1e9
        )
        rows.append(
            (f"astroscrappy detect_cosmics ({m.sum()} px, {(m & crmask).sum() / crmask.sum():.3f} recovered)", t_a, w_a)
        )
        peers["astroscrappy"] = t_a
    except ImportError:
        print("astroscrappy not installed: pip install astroscrappy")

    print(f"\nsynthetic {n} x {n} frame, {args.stars} stars (FWHM {args.fwhm} px), {args.crs} cosmic-ray tracks")
    print(f"{'step':<100s} {'CPU s':>8s} {'wall s':>8s}")
    for name, t, w in rows:
        print(f"{name:<100s} {t:8.2f} {w:8.2f}")
    if "sep" in peers:
        print(f"ratio procsky (background+detection+measurement) / sep : {ours / peers['sep']:.2f}")
    if "astroscrappy" in peers:
        print(f"ratio procsky cosmic rays / astroscrappy               : {t_c / peers['astroscrappy']:.2f}")
    print(f"process_arrays total CPU: {t_f:.1f} s (goal for the whole calibrate task: < 20 s)")


if __name__ == "__main__":
    main()
