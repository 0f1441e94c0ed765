"""DIA measurement benchmark: ``detect_dia_sources`` on a simulated 2k x 2k difference image.

The pair comes from :func:`procsky.diffim.simulate_pair` (star field, science PSF varying
across the detector, deep template with better seeing) with transients added to the
science image: ``--n-dia`` DIA sources of which ``--dipole-fraction`` are dipoles (a star
that moved by ``--sep`` = 0.3-1.3 FWHM: its flux removed at the old position and added at the new one),
a sixth of the rest faded stars (negative sources) and the others new point sources. The
difference image is made once (:func:`procsky.diffim.subtract_images`), then
``detect_dia_sources`` is timed in CPU seconds (``time.process_time``: one warm-up run for
numba's compilation/cache load, median of ``--repeat``).

Reported: CPU seconds of detection + measurement, per 100 DIA sources, the number of
sources and dipoles found, and the same for the ``detect_dia_sources`` of an earlier
revision (``--before REV``, default 936bab7: every source's PSF stamp rendered by an FFT
shift, 16 more per dipole; loaded from ``git show REV:procsky/diffim/dia.py`` as a module of
the current package, so only the measurement code differs) with the largest differences of
the two catalogues; the CPU per dipole fit (``diffim._dipole_fit``, on the calls
``detect_dia_sources`` makes, recorded once) and with ``--scipy`` the former scipy fit
(``tests/test_kernels_dipole._dipole_fit_scipy``: LM with numerical Jacobian, FFT-shifted
PSF per evaluation) on the same calls. ``--profile`` prints where the time goes (cProfile,
cumulative, top entries of procsky's per-source steps).

Run::

    .venv/bin/python benchmarks/bench_dia.py [--size 2048] [--n-dia 200] [--repeat 3] [--before 936bab7]
                                             [--scipy 10] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_difference(size=2048, n_dia=200, dipole_fraction=0.3, seed=7, sep=(0.3, 1.3)):
    """A difference image with ``n_dia`` DIA sources; returns (diff, truth dict)."""
    from procsky.diffim import SubtractionConfig, _render_star, simulate_pair, subtract_images

    scale = (size / 2048.0) ** 2
    sci, tpl, truth = simulate_pair(
        (size, size),
        n_stars=int(4000 * scale),
        seeing_science=(2.0, 2.4),
        seeing_template=1.5,
        seed=seed,
        star_flux=(300.0, 1e5),
    )
    rng = np.random.default_rng(seed + 1)
    ny, nx = sci.image.shape
    img = sci.image.astype(np.float64)

    def sig(x, y):
        s = 2.0 + 0.4 * x / max(nx - 1, 1)
        return s, s, 0.0

    n_dip = int(round(dipole_fraction * n_dia))
    n_neg = (n_dia - n_dip) // 6
    n_pos = n_dia - n_dip - n_neg
    # positions on a jittered grid so that DIA sources do not blend with each other
    g = int(math.ceil(math.sqrt(n_dia)))
    step = (size - 160) / g
    cells = rng.permutation(g * g)[:n_dia]
    xs = 80 + (cells % g + rng.uniform(0.3, 0.7, n_dia)) * step
    ys = 80 + (cells // g + rng.uniform(0.3, 0.7, n_dia)) * step
    kinds = ["dipole"] * n_dip + ["negative"] * n_neg + ["positive"] * n_pos
    rows = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        f = float(np.exp(rng.uniform(np.log(5e3), np.log(5e4))))
        kind = kinds[k]
        if kind == "dipole":
            fwhm = 2.3548 * sig(x, y)[0]
            d = rng.uniform(sep[0], sep[1]) * fwhm
            t = rng.uniform(0, 2 * np.pi)
            xn, yn = x - 0.5 * d * np.cos(t), y - 0.5 * d * np.sin(t)
            xp, yp = x + 0.5 * d * np.cos(t), y + 0.5 * d * np.sin(t)
            _render_star(img, xn, yn, -f, sig, None, 20)
            _render_star(img, xp, yp, f, sig, None, 20)
            rows.append((kind, xp, yp, xn, yn, f))
        else:
            _render_star(img, x, y, f if kind == "positive" else -f, sig, None, 20)
            rows.append((kind, x, y, np.nan, np.nan, f))
    sci.image = img.astype(np.float32)
    diff, _, _ = subtract_images(sci, tpl, SubtractionConfig(spatial_order=1), lazy=False)
    return diff.compute(), rows


def _load_scipy_reference():
    path = os.path.join(ROOT, "tests", "test_kernels_dipole.py")
    spec = importlib.util.spec_from_file_location("_dipole_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._dipole_fit_scipy


def _load_before(rev):
    """``procsky.diffim.dia`` as it was at ``rev``, importable beside the current one."""
    import subprocess
    import tempfile

    src = subprocess.run(
        ["git", "show", f"{rev}:procsky/diffim/dia.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="bench_dia_"), "_dia_before.py")
    with open(path, "w") as fh:
        fh.write(src)
    name = "procsky.diffim._dia_before"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "procsky.diffim"
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cpu(fn, diff, repeat):
    """(median CPU s of ``repeat`` runs after a warm-up, the catalogue)."""
    df, _ = fn(diff)
    times = []
    for _ in range(repeat):
        t = time.process_time()
        df, _ = fn(diff)
        times.append(time.process_time() - t)
    return statistics.median(times), times, df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--n-dia", type=int, default=200)
    ap.add_argument("--dipole-fraction", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--scipy",
        type=int,
        default=0,
        metavar="N",
        help="also time the former scipy dipole fit on the first N recorded dipoles (slow: ~s each)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one run of detect_dia_sources")
    ap.add_argument(
        "--before",
        default="936bab7",
        metavar="REV",
        help="also time detect_dia_sources of this git revision ('' to skip)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--sep",
        type=float,
        nargs=2,
        default=(0.3, 1.3),
        metavar=("MIN", "MAX"),
        help="dipole separations in science FWHM (pairs beyond DiaConfig.dipole_radius = 1.5 FWHM "
        "are measured as two sources)",
    )
    args = ap.parse_args(argv)

    import procsky.diffim.dia as dm

    t0 = time.perf_counter()
    diff, rows = make_difference(args.size, args.n_dia, args.dipole_fraction, args.seed, tuple(args.sep))
    print(
        f"simulated + subtracted {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s wall; "
        f"PSF of the difference: {type(diff.psf).__name__} size {diff.psf.size}"
    )

    # warm-up (numba compilation / cache load), recording the dipole-fit calls
    calls = []
    orig = dm._dipole_fit

    def recording(*a, **k):
        calls.append((a, k))
        return orig(*a, **k)

    dm._dipole_fit = recording
    try:
        df, _ = dm.detect_dia_sources(diff)
    finally:
        dm._dipole_fit = orig

    times = []
    for _ in range(args.repeat):
        t = time.process_time()
        df, _ = dm.detect_dia_sources(diff)
        times.append(time.process_time() - t)
    t_med = statistics.median(times)
    n_src = len(df)
    n_dip = int(df.is_dipole.sum())
    n_fit = int((df.is_dipole & ~df.flag_dipole_fit).sum())

    before = None
    if args.before:
        old_mod = _load_before(args.before)
        tb, times_b, df_b = _cpu(old_mod.detect_dia_sources, diff, args.repeat)
        before = (tb, times_b, df_b)

    t = time.process_time()
    for a, k in calls:
        orig(*a, **k)
    t_dip = (time.process_time() - t) / max(len(calls), 1)
    t = time.process_time()
    for a, _k in calls:
        # the build _dipole_fit does (same crop)
        xp, yp, xn, yn, xy0, half = a[5:11]
        reach = half + int(math.ceil(0.5 * math.hypot(xp - xn, yp - yn))) + 3
        dm._oversampled_psf(
            a[4], xy0[0] + 0.5 * (xp + xn), xy0[1] + 0.5 * (yp + yn), size=2 * dm._fft_friendly_half(reach) + 1
        )
    t_os = (time.process_time() - t) / max(len(calls), 1)

    t_old = None
    if args.scipy and calls:
        ref = _load_scipy_reference()
        sub = calls[: args.scipy]
        t = time.process_time()
        olds = [ref(*a, **k) for a, k in sub]
        t_old = (time.process_time() - t) / len(sub)
        news = [orig(*a, **k) for a, k in sub]
        dchi = [n["chi2"] / o["chi2"] - 1 for n, o in zip(news, olds) if n and o]

    truth_dip = sum(1 for r in rows if r[0] == "dipole")
    # fitted dipoles against the injected ones (midpoint within 3 px)
    dsep, dflux = [], []
    fitted = df[df.is_dipole & ~df.flag_dipole_fit]
    for kind, xp, yp, xn, yn, f in rows:
        if kind != "dipole":
            continue
        r = np.hypot(fitted.x - 0.5 * (xp + xn), fitted.y - 0.5 * (yp + yn))
        if len(r) and r.min() < 3:
            i = int(np.argmin(r.to_numpy()))
            dsep.append(fitted.dipole_separation.iloc[i] - math.hypot(xp - xn, yp - yn))
            dflux.append(fitted.dipole_pos_flux.iloc[i] / f - 1)
    print()
    print(f"{'quantity':44s} {'value':>12s}")
    print(f"{'-' * 44} {'-' * 12}")
    print(f"{'DIA sources injected (dipoles)':44s} {f'{len(rows)} ({truth_dip})':>12s}")
    print(f"{'DIA sources found (dipoles, fitted)':44s} {f'{n_src} ({n_dip}, {n_fit})':>12s}")
    if dsep:
        print(
            f"{'  matched dipoles: median |d sep| px, |d flux|':44s} "
            f"{f'{np.median(np.abs(dsep)):.3f} {np.median(np.abs(dflux)):.3f}':>12s}"
        )
    print(f"{f'detect_dia_sources CPU s (median of {args.repeat})':44s} {t_med:12.3f}")
    print(f"{'  runs':44s} {' '.join(f'{x:.2f}' for x in times):>12s}")
    print(f"{'CPU s per 100 DIA sources':44s} {100 * t_med / max(n_src, 1):12.3f}")
    if before is not None:
        tb, times_b, df_b = before
        print(f"{f'before ({args.before}) CPU s (median of {args.repeat})':44s} {tb:12.3f}")
        print(f"{'  runs':44s} {' '.join(f'{x:.2f}' for x in times_b):>12s}")
        print(f"{'  CPU s per 100 DIA sources':44s} {100 * tb / max(len(df_b), 1):12.3f}")
        print(f"{'  speed-up':44s} {tb / max(t_med, 1e-9):12.1f}x")
        if len(df_b) == n_src:
            for c in ("psf_flux", "psf_flux_err", "psf_chi2", "dipole_pos_flux", "dipole_separation", "reliability"):
                a_, b_ = df[c].to_numpy(), df_b[c].to_numpy()
                ok = np.isfinite(a_) & np.isfinite(b_)
                rel = np.abs(a_[ok] - b_[ok]) / np.maximum(np.abs(b_[ok]), 1e-12)
                print(f"{f'  max |after/before - 1| {c}':44s} {(rel.max() if ok.any() else np.nan):12.2e}")
            flags = [c for c in df.columns if c.startswith("flag_") or c.startswith("is_")]
            n_flag = int(sum((df[c] != df_b[c]).sum() for c in flags))
            print(f"{'  flags that differ':44s} {n_flag:12d}")
        else:
            print(f"{'  sources before (differ in number)':44s} {len(df_b):12d}")
    print(f"{'dipole fit CPU ms per dipole (numba LM)':44s} {1e3 * t_dip:12.2f}")
    print(f"{'per-dipole PSF build it replaced (before), ms':44s} {1e3 * t_os:12.2f}")
    print(f"{'dipole fits CPU s per image':44s} {t_dip * len(calls):12.3f}")
    if t_old is not None:
        print(f"{f'former scipy fit CPU s per dipole ({len(sub)})':44s} {t_old:12.2f}")
        print(f"{'  speed-up':44s} {t_old / t_dip:12.0f}x")
        if dchi:
            print(f"{'  chi2 new/old - 1: median, max':44s} {f'{np.median(dchi):+.4f} {max(dchi):+.4f}':>12s}")

    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        dm.detect_dia_sources(diff)
        pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("cumulative")
        print()
        print("profile (cumulative s; cProfile overhead included):")
        names = (
            "detect_dia_sources",
            "detect_sources",
            "windowed_centroid",
            "_psf_fit",
            "render",
            "shift_image",
            "_moments",
            "_stamp_bad_fraction",
            "_dipole_fit",
            "_oversampled_psf",
            "fit_dipole",
            "_calibrate_and_locate",
            "kernel",
        )
        seen = {}
        for (fn, _line, name), (_cc, nc, _tt, ct, _callers) in st.stats.items():
            if name in names and ("procsky" in fn or name in ("fit_dipole",)):
                key = f"{os.path.basename(fn)}:{name}"
                c, t0_ = seen.get(key, (0, 0.0))
                seen[key] = (c + nc, t0_ + ct)
        for key, (c, t) in sorted(seen.items(), key=lambda kv: -kv[1][1]):
            print(f"  {key:44s} {t:8.3f} s  {c:6d} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
