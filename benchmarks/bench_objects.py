"""Object catalogue benchmark (issue 21): procsky's ``make_objects`` against SExtractor's
dual-image mode on the same multiband coadd scene with truth.

Run:  .venv/bin/python benchmarks/bench_objects.py [--size 1024] [--bands g,r,i] [--repeat 1]
          [--density 40] [--pair-frac 0.3] [--seed 0] [--deblend-time-limit S] [--workdir DIR] [--json out.json]
      .venv/bin/python benchmarks/bench_objects.py --size 4096 --repeat 1   # the issue's memory figure

Inputs: :func:`procsky.sim.coadd_scene.make_coadd_scene` (GalSim, nJy per pixel, 0.2"/px,
Moffat PSF of 0.8" FWHM in every band, white noise with a matching variance plane):
``--density`` truth objects per arcmin^2, ``--pair-frac`` of them in close pairs separated
by 1-3 r-band FWHM, the rest 40 % stars / 60 % galaxies. The scene is kept in ``--workdir``
(pickled exposures + truth) and reused when its parameters match.

Tools, run interleaved ``--repeat`` times (procsky, SExtractor, procsky, ...), each as a
child process so that its peak resident memory (``ru_maxrss`` from ``os.wait4``) is its own:

* procsky: a child loads the pickled exposures, runs :func:`procsky.objects.make_objects`
  once on a 256^2 cutout (warm-up: numba's compilation or cache load; its CPU is reported
  as ``warmup_cpu_s``), then on the whole patch with ``ObjectsConfig()`` defaults, timing
  it with ``time.process_time`` (in-process CPU, start-up and warm-up excluded). Peak RSS
  is the child's high-water mark (Python, imports and the loaded coadds included; the RSS
  before ``make_objects`` is reported beside it).
* SExtractor (``source-extractor``, 1 thread): dual-image mode, ``det.fits,<band>.fits``,
  once per band. Detection image: the sum of the bands (``--detect sum``; variance = sum of
  variances) or the r band (``--detect r``), with its variance map (``WEIGHT_TYPE
  MAP_VAR``). Defaults otherwise (DETECT_THRESH 1.5, DETECT_MINAREA 5, DEBLEND_NTHRESH 32,
  DEBLEND_MINCONT 0.005, CLEAN Y), a Gaussian filter matching the PSF
  (``gauss_4.0_7x7.conv``), BACK_TYPE MANUAL 0 (the coadds are background-subtracted, as
  procsky assumes). Fluxes: FLUX_AUTO (Kron, SExtractor's total flux: the one compared),
  FLUX_ISO, and FLUX_APER in a 3-FWHM diameter aperture corrected to total with the PSF's
  encircled energy (a point-source correction: exact for stars, low for galaxies; used for
  colours, where it cancels). FLUX_PSF needs PSFEx and is not used. CPU is the children's
  user + system time (``os.wait4``), all bands, whole process.

Against truth (one-to-one greedy matching within 0.5 FWHM, nearest first; procsky's primary,
non-sky rows at their reference positions, SExtractor's X/Y_IMAGE - 1):

* completeness of truth objects with an approximate PSF-weighted r-band S/N >= 10;
  spurious = detections with no truth object within 1 FWHM; duplicates = detections not
  matched one-to-one but within 1 FWHM of a truth object (shreds, doubled peaks);
* close pairs binned by separation (1-1.5, 1.5-2, 2-3 FWHM): the fraction with both members
  found; the rms relative flux error (all bands pooled, members found by both tools) of
  procsky (``<band>_psf_flux`` for true stars, ``<band>_cmodel_flux`` for true galaxies:
  "truth-kind"; and the same choice made by procsky's ``r_extendedness``: "ext") against
  SExtractor's FLUX_AUTO and FLUX_ISO; the g-r colour rms (mag) for both (procsky: the same
  fluxes; SExtractor: aperture and AUTO colours);
* isolated (non-pair) objects, the same figures, as a reference;
* procsky's sky-object pull std per band (``summary['sky_object_pulls']``).

Prints a compact table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PIXEL_SCALE = 0.2
PSF_FWHM = 0.8
SKY_SIGMA = 15.0
SEP_BINS = ((1.0, 1.5), (1.5, 2.0), (2.0, 3.0))
APER_FWHM = 3.0  # SExtractor aperture diameter in PSF FWHM


# --------------------------------------------------------------------------- scene
def scene_params(args) -> dict:
    area = (args.size * PIXEL_SCALE / 60.0) ** 2
    n = int(round(args.density * area))
    n_pairs = int(round(args.pair_frac * n / 2))
    n_single = n - 2 * n_pairs
    n_stars = int(round(0.4 * n_single))
    return {
        "bands": list(args.bands),
        "shape": [args.size, args.size],
        "n_stars": n_stars,
        "n_galaxies": n_single - n_stars,
        "n_pairs": n_pairs,
        "seed": args.seed,
    }


def build_scene(work: Path, params: dict):
    """Make (or reuse) the scene; write the FITS files SExtractor reads."""
    from astropy.io import fits

    key = work / "scene.json"
    pkl = work / "scene.pkl"
    if key.exists() and pkl.exists() and json.loads(key.read_text()) == params:
        with open(pkl, "rb") as f:
            exposures, truth = pickle.load(f)
        return exposures, truth, 0.0
    from procsky.sim.coadd_scene import make_coadd_scene

    t0 = time.perf_counter()
    sc = make_coadd_scene(
        bands=params["bands"],
        shape=tuple(params["shape"]),
        pixel_scale=PIXEL_SCALE,
        psf_fwhm=PSF_FWHM,
        n_stars=params["n_stars"],
        n_galaxies=params["n_galaxies"],
        n_pairs=params["n_pairs"],
        sky_sigma=SKY_SIGMA,
        seed=params["seed"],
    )
    wall = time.perf_counter() - t0
    with open(pkl, "wb") as f:
        pickle.dump((sc.exposures, sc.truth), f, protocol=pickle.HIGHEST_PROTOCOL)
    for b, e in sc.exposures.items():
        hdr = fits.Header()
        for k, v, c in e.wcs_cards:
            hdr[k] = (v, c)
        fits.writeto(work / f"{b}.fits", np.asarray(e.image, np.float32), hdr, overwrite=True)
        fits.writeto(work / f"{b}.var.fits", np.asarray(e.variance, np.float32), hdr, overwrite=True)
    key.write_text(json.dumps(params))
    return sc.exposures, sc.truth, wall


def write_detection_image(work: Path, exposures, mode: str) -> None:
    from astropy.io import fits

    bands = sorted(exposures)
    hdr = fits.getheader(work / f"{bands[0]}.fits")
    if mode == "sum":
        img = sum(np.asarray(exposures[b].image, np.float64) for b in bands)
        var = sum(np.asarray(exposures[b].variance, np.float64) for b in bands)
    else:
        img = np.asarray(exposures[mode].image, np.float64)
        var = np.asarray(exposures[mode].variance, np.float64)
    fits.writeto(work / "det.fits", img.astype(np.float32), hdr, overwrite=True)
    fits.writeto(work / "det.var.fits", var.astype(np.float32), hdr, overwrite=True)


# --------------------------------------------------------------------------- children
def run_child(cmd, cwd) -> tuple[float, float, float]:
    """Run ``cmd``; return (user + system CPU s, peak RSS MiB, wall s) of that child alone."""
    t0 = time.perf_counter()
    with open(Path(cwd) / "child.log", "ab") as log:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        tail = (Path(cwd) / "child.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} failed (status {status}):\n{tail}")
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, wall


def procsky_child(work: Path, out: Path, warmup: bool = True, time_limit: float | None = None) -> None:
    """The procsky child: warm up on a cutout, then make_objects on the patch."""
    import resource

    from procsky.exposure import Exposure
    from procsky.objects.driver import ObjectsConfig, make_objects

    with open(work / "scene.pkl", "rb") as f:
        exposures, _ = pickle.load(f)
    from procsky.objects.deblend import DeblendConfig

    # the deblender's time limit is wall seconds per blend: on a loaded machine it cuts big blends
    cfg = ObjectsConfig() if time_limit is None else ObjectsConfig(deblend=DeblendConfig(time_limit=time_limit))
    n = min(256, next(iter(exposures.values())).shape[0])
    cut = {
        b: Exposure(
            np.ascontiguousarray(e.image[:n, :n]),
            np.ascontiguousarray(e.variance[:n, :n]),
            np.ascontiguousarray(e.mask[:n, :n]),
            wcs_cards=e.wcs_cards,
            psf=e.psf,
            visit_info=e.visit_info,
            metadata=e.metadata,
            xy0=e.xy0,
        )
        for b, e in exposures.items()
    }
    t0 = time.process_time()
    if warmup:
        make_objects(cut, cfg)
    warm = time.process_time() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0, w0 = time.process_time(), time.perf_counter()
    cat = make_objects(exposures, cfg)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cat.table.to_pickle(out / "procsky_table.pkl")
    summary = {
        "make_objects_cpu_s": cpu,
        "make_objects_wall_s": wall,
        "warmup_cpu_s": warm,
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss,
        "summary": cat.summary,
    }
    (out / "procsky_run.json").write_text(json.dumps(summary, default=float))


def sextractor_config(work: Path, sex: str) -> None:
    (work / "bench.param").write_text(
        "\n".join(
            ["NUMBER", "X_IMAGE", "Y_IMAGE", "FLUX_AUTO", "FLUXERR_AUTO", "FLUX_ISO", "FLUXERR_ISO"]
            + ["MAG_ISO", "FLUX_APER(1)", "FLUXERR_APER(1)", "KRON_RADIUS", "FLAGS"]
        )
        + "\n"
    )
    share = Path("/usr/share/source-extractor")
    shutil.copy(share / "default.conv", work / "default.conv")
    shutil.copy(share / "gauss_4.0_7x7.conv", work / "gauss.conv")
    shutil.copy(share / "default.nnw", work / "default.nnw")
    (work / "default.sex").write_text(subprocess.run([sex, "-d"], check=True, capture_output=True, text=True).stdout)


def run_sextractor(work: Path, sex: str, bands) -> tuple[float, float, float]:
    cpu = rss = wall = 0.0
    aper = APER_FWHM * PSF_FWHM / PIXEL_SCALE
    for b in bands:
        c, r, w = run_child(
            [sex, f"det.fits,{b}.fits", "-c", "default.sex", "-PARAMETERS_NAME", "bench.param"]
            + ["-CATALOG_NAME", f"sex_{b}.fits", "-CATALOG_TYPE", "FITS_1.0"]
            + ["-WEIGHT_TYPE", "MAP_VAR,MAP_VAR", "-WEIGHT_IMAGE", f"det.var.fits,{b}.var.fits"]
            + ["-FILTER_NAME", "gauss.conv", "-BACK_TYPE", "MANUAL", "-BACK_VALUE", "0.0,0.0"]
            + ["-DEBLEND_NTHRESH", "32", "-DEBLEND_MINCONT", "0.005", "-MAG_ZEROPOINT", "31.4"]
            + ["-PHOT_APERTURES", f"{aper:.3f}", "-PIXEL_SCALE", "0", "-SEEING_FWHM", f"{PSF_FWHM}"]
            + ["-SATUR_LEVEL", "1e18", "-CHECKIMAGE_TYPE", "NONE", "-NTHREADS", "1", "-VERBOSE_TYPE", "QUIET"]
            + ["-MEMORY_PIXSTACK", "3000000", "-MEMORY_OBJSTACK", "30000"],
            work,
        )
        cpu += c
        rss = max(rss, r)
        wall += w
    return cpu, rss, wall


def read_sextractor(work: Path, bands, ee_aper: float) -> pd.DataFrame:
    from astropy.io import fits

    cols = {}
    for i, b in enumerate(bands):
        with fits.open(work / f"sex_{b}.fits") as h:
            d = h[-1].data
            if i == 0:
                cols["x"] = np.asarray(d["X_IMAGE"], float) - 1.0
                cols["y"] = np.asarray(d["Y_IMAGE"], float) - 1.0
            cols[f"{b}_auto"] = np.asarray(d["FLUX_AUTO"], float)
            cols[f"{b}_iso"] = np.asarray(d["FLUX_ISO"], float)
            cols[f"{b}_aper"] = np.asarray(d["FLUX_APER"], float).reshape(-1) / ee_aper
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- evaluation
def match(tx, ty, dx, dy, radius):
    """Greedy one-to-one matching, nearest first: truth index -> detection index (-1)."""
    from scipy.spatial import cKDTree

    out = np.full(len(tx), -1, np.int64)
    if len(dx) == 0 or len(tx) == 0:
        return out
    tree = cKDTree(np.c_[dx, dy])
    pairs = tree.query_ball_point(np.c_[tx, ty], radius)
    cand = [(math.hypot(tx[i] - dx[j], ty[i] - dy[j]), i, j) for i, js in enumerate(pairs) for j in js]
    used = np.zeros(len(dx), bool)
    for _, i, j in sorted(cand):
        if out[i] < 0 and not used[j]:
            out[i], used[j] = j, True
    return out


def psf_ee(radius_px: float) -> float:
    """Encircled energy of the scene's PSF (GalSim Moffat beta 3.5) within ``radius_px``."""
    import galsim

    im = galsim.Moffat(beta=3.5, fwhm=PSF_FWHM).drawImage(nx=201, ny=201, scale=PIXEL_SCALE / 4).array
    yy, xx = np.indices(im.shape)
    r = np.hypot(xx - 100, yy - 100) * 0.25
    return float(im[r <= radius_px].sum() / im.sum())


def approx_snr(truth: pd.DataFrame, band: str) -> np.ndarray:
    """PSF-weighted S/N with a Gaussian approximation of the observed profile."""
    s_psf = PSF_FWHM / 2.3548 / PIXEL_SCALE
    s_gal = truth["hlr"].to_numpy(float) / 1.1774 / PIXEL_SCALE
    neff = 4 * math.pi * (s_psf**2 + s_gal**2)
    return truth[f"{band}_flux"].to_numpy(float) / (SKY_SIGMA * np.sqrt(neff))


def evaluate(truth, det: dict, bands, r_band: str) -> dict:
    """det: tool -> DataFrame with x, y and flux columns ``<band>_<kind>``."""
    fwhm_px = PSF_FWHM / PIXEL_SCALE
    tx, ty = truth["x"].to_numpy(float), truth["y"].to_numpy(float)
    snr = approx_snr(truth, r_band)
    idx = {t: match(tx, ty, d["x"].to_numpy(float), d["y"].to_numpy(float), 0.5 * fwhm_px) for t, d in det.items()}
    res: dict = {"n_truth": len(truth), "n_truth_snr10": int((snr >= 10).sum()), "tools": {}}
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[tx, ty])
    for t, d in det.items():
        near = np.array([len(v) > 0 for v in tree.query_ball_point(np.c_[d["x"], d["y"]], fwhm_px)], bool)
        matched = np.zeros(len(d), bool)
        matched[idx[t][idx[t] >= 0]] = True
        res["tools"][t] = {
            "n_detections": len(d),
            "completeness_snr10": float((idx[t][snr >= 10] >= 0).mean()),
            "spurious": float((~near).mean()) if len(d) else float("nan"),
            "duplicates": float((near & ~matched).mean()) if len(d) else float("nan"),
        }
    # pairs: one row per member; separation in r-band FWHM
    ids = truth["id"].to_numpy()
    pos = {int(i): k for k, i in enumerate(ids)}
    partner = np.array([pos.get(int(p), -1) for p in truth["pair"].to_numpy()])
    in_pair = partner >= 0
    sep = np.full(len(truth), np.nan)
    sep[in_pair] = np.hypot(tx[in_pair] - tx[partner[in_pair]], ty[in_pair] - ty[partner[in_pair]]) / fwhm_px
    star = (truth["kind"] == "star").to_numpy()

    def fluxes(t, b, j, which):
        d = det[t]
        if t == "procsky":
            psf = d[f"{b}_psf_flux"].to_numpy(float)[j]
            cm = d[f"{b}_cmodel_flux"].to_numpy(float)[j]
            if which == "truth-kind":
                sel = star_m
            else:
                sel = d["r_extendedness"].to_numpy(float)[j] < 0.5
            return np.where(sel, psf, cm)
        return d[f"{b}_{which}"].to_numpy(float)[j]

    variants = {"procsky": ["truth-kind", "ext"], "sextractor": ["auto", "iso", "aper"]}

    def group_stats(sel):
        out = {"n_objects": int(sel.sum())}
        both_tools = sel & (idx["procsky"] >= 0) & (idx["sextractor"] >= 0)
        out["n_common"] = int(both_tools.sum())
        nonlocal star_m
        star_m = star[both_tools]
        for t, vs in variants.items():
            j = idx[t][both_tools]
            for v in vs:
                rel = []
                for b in bands:
                    f = fluxes(t, b, j, v)
                    rel.append(f / truth[f"{b}_flux"].to_numpy(float)[both_tools] - 1.0)
                rel_a = np.concatenate(rel) if rel else np.array([])
                fin = np.isfinite(rel_a)
                k = f"{t}:{v}"
                out[f"flux_rms[{k}]"] = float(np.sqrt(np.mean(rel_a[fin] ** 2))) if fin.any() else float("nan")
                out[f"flux_mad[{k}]"] = (
                    float(1.4826 * np.median(np.abs(rel_a[fin] - np.median(rel_a[fin])))) if fin.any() else float("nan")
                )
                out[f"flux_nonfinite[{k}]"] = int((~fin).sum())
                if "g" in bands and "r" in bands:
                    fg, fr = fluxes(t, "g", j, v), fluxes(t, "r", j, v)
                    ok = np.isfinite(fg) & np.isfinite(fr) & (fg > 0) & (fr > 0)
                    true_gr = -2.5 * np.log10(truth["g_flux"].to_numpy(float)[both_tools] / truth["r_flux"][both_tools])
                    dgr = -2.5 * np.log10(np.where(ok, fg, 1.0) / np.where(ok, fr, 1.0)) - true_gr
                    out[f"gr_rms[{k}]"] = float(np.sqrt(np.mean(dgr[ok] ** 2))) if ok.any() else float("nan")
                    out[f"gr_bad[{k}]"] = int((~ok).sum())
        return out

    star_m = star
    res["pairs"] = {}
    for lo, hi in SEP_BINS:
        sel = in_pair & (sep >= lo) & (sep < hi)
        g = group_stats(sel)
        a = np.flatnonzero(sel)
        for t in det:
            g[f"both_found[{t}]"] = (
                float(np.mean([(idx[t][i] >= 0) and (idx[t][partner[i]] >= 0) for i in a])) if len(a) else float("nan")
            )
        res["pairs"][f"{lo:g}-{hi:g}"] = g
    res["isolated_snr10"] = group_stats(~in_pair & (snr >= 10))
    return res


def procsky_rows(table: pd.DataFrame) -> pd.DataFrame:
    t = table[table["is_primary"].astype(bool) & ~table["sky_object"].astype(bool)]
    return t.reset_index(drop=True)


# --------------------------------------------------------------------------- main
def print_report(res: dict, runs: dict, bands) -> None:
    ev = res["eval"]
    print(f"\ntruth objects {ev['n_truth']} (r S/N >= 10: {ev['n_truth_snr10']})")
    print(
        f"{'tool':12s} {'n_det':>6s} {'compl(S/N>=10)':>15s} {'spurious':>9s} {'dupl':>7s} {'CPU s':>14s} "
        f"{'peak RSS MiB':>13s}"
    )
    for t, s in ev["tools"].items():
        cpu = runs[t]["cpu_s"]
        cpu_s = f"{np.median(cpu):.1f} [{min(cpu):.1f}-{max(cpu):.1f}]"
        print(
            f"{t:12s} {s['n_detections']:6d} {s['completeness_snr10']:15.3f} {s['spurious']:9.4f} "
            f"{s['duplicates']:7.4f} "
            f"{cpu_s:>14s} {max(runs[t]['peak_rss_mib']):13.0f}"
        )
    p = runs["procsky"]
    print(
        f"procsky: in-process make_objects CPU (median) {np.median(p['cpu_s']):.1f} s, warm-up (compile/cache + 256^2) "
        f"{np.median(p['warmup_cpu_s']):.1f} s, RSS before make_objects {max(p['rss_before_mib']):.0f} MiB; "
        f"SExtractor CPU = child user+sys, {len(bands)} dual-mode runs"
    )
    summ = res.get("procsky_summary") or {}
    print(
        "procsky sky-object pull std:",
        res.get("sky_object_pulls"),
        "| deblender flags:",
        {k[len("n_deblend_flag_") :]: v for k, v in summ.items() if k.startswith("n_deblend_flag_")},
        "| CPU per step:",
        summ.get("cpu_s"),
    )
    keys = ["procsky:truth-kind", "procsky:ext", "sextractor:auto", "sextractor:iso", "sextractor:aper"]
    print(
        f"\n{'group':12s} {'n':>4s} {'both P/S':>10s} "
        + " ".join(f"{k.split(':')[0][0]}:{k.split(':')[1]:>10s}" for k in keys)
        + "\n(per group: rel. flux rms, all bands; rel. flux 1.4826 MAD; g-r rms mag; over members found by both)"
    )
    groups = dict(res["eval"]["pairs"], isolated=res["eval"]["isolated_snr10"])
    for g, s in groups.items():
        both = f"{s.get('both_found[procsky]', float('nan')):.2f}/{s.get('both_found[sextractor]', float('nan')):.2f}"
        fl = " ".join(f"{s[f'flux_rms[{k}]']:12.3f}" for k in keys)
        gr = " ".join(f"{s.get(f'gr_rms[{k}]', float('nan')):12.3f}" for k in keys)
        mad = " ".join(f"{s[f'flux_mad[{k}]']:12.3f}" for k in keys)
        print(f"{g:12s} {s['n_common']:4d} {both:>10s} {fl}")
        print(f"{'  (MAD)':12s} {'':4s} {'':>10s} {mad}")
        print(f"{'  (g-r)':12s} {'':4s} {'':>10s} {gr}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--bands", type=lambda s: s.split(","), default=["g", "r", "i"])
    ap.add_argument("--density", type=float, default=40.0, help="truth objects per arcmin^2")
    ap.add_argument("--pair-frac", type=float, default=0.3, help="fraction of the objects in close pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each tool")
    ap.add_argument("--detect", default="sum", help="SExtractor detection image: 'sum' of the bands or a band")
    ap.add_argument("--workdir", help="work (and reuse the scene) here instead of a temporary folder")
    ap.add_argument("--json", help="write the figures here as well")
    ap.add_argument("--no-warmup", action="store_true", help="skip procsky's warm-up run (tests only)")
    ap.add_argument(
        "--deblend-time-limit",
        type=float,
        help="procsky's DeblendConfig.time_limit (wall s per blend; default: the pipeline's default)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        procsky_child(Path(args.child), Path(args.child), warmup=not args.no_warmup, time_limit=args.deblend_time_limit)
        return {}
    sex = shutil.which("source-extractor") or shutil.which("sex")
    if sex is None:
        raise SystemExit("source-extractor not found (apt-get install -y source-extractor)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        params = scene_params(args)
        exposures, truth, scene_wall = build_scene(work, params)
        bands = sorted(exposures)
        write_detection_image(work, exposures, args.detect)
        sextractor_config(work, sex)
        runs: dict = {
            "procsky": {"cpu_s": [], "child_cpu_s": [], "warmup_cpu_s": [], "peak_rss_mib": [], "rss_before_mib": []},
            "sextractor": {"cpu_s": [], "peak_rss_mib": [], "wall_s": []},
        }
        summary = None
        for _ in range(args.repeat):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(work)]
            cmd += ["--no-warmup"] if args.no_warmup else []
            if args.deblend_time_limit is not None:
                cmd += ["--deblend-time-limit", str(args.deblend_time_limit)]
            c, r, _w = run_child(cmd, work)
            pj = json.loads((work / "procsky_run.json").read_text())
            runs["procsky"]["cpu_s"].append(pj["make_objects_cpu_s"])
            runs["procsky"]["child_cpu_s"].append(c)
            runs["procsky"]["warmup_cpu_s"].append(pj["warmup_cpu_s"])
            runs["procsky"]["peak_rss_mib"].append(r)
            runs["procsky"]["rss_before_mib"].append(pj["rss_before_mib"])
            summary = pj["summary"]
            c, r, w = run_sextractor(work, sex, bands)
            runs["sextractor"]["cpu_s"].append(c)
            runs["sextractor"]["peak_rss_mib"].append(r)
            runs["sextractor"]["wall_s"].append(w)
        ee = psf_ee(0.5 * APER_FWHM * PSF_FWHM / PIXEL_SCALE)
        det = {
            "procsky": procsky_rows(pd.read_pickle(work / "procsky_table.pkl")),
            "sextractor": read_sextractor(work, bands, ee),
        }
        r_band = "r" if "r" in bands else bands[0]
        res = {
            "command": " ".join(sys.argv),
            "scene": dict(
                params, pixel_scale=PIXEL_SCALE, psf_fwhm=PSF_FWHM, sky_sigma=SKY_SIGMA, density=args.density
            ),
            "scene_wall_s": scene_wall,
            "sextractor_detect": args.detect,
            "deblend_time_limit": args.deblend_time_limit,
            "aper_ee": ee,
            "runs": runs,
            "procsky_summary": summary,
            "sky_object_pulls": {b: round(v["std"], 4) for b, v in (summary or {}).get("sky_object_pulls", {}).items()},
            "eval": evaluate(truth, det, bands, r_band),
        }
        print_report(res, runs, bands)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()
