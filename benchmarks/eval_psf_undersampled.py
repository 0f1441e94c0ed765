"""PSF fluxes and FWHM of calibrate against the simulator's truth on an undersampled regime (issue 19 item 3).

Every calexp of a simulation (e.g. the ``undersampled`` recipe, FWHM 1.6-1.8 px at 1"/px) is
calibrated in-process (``procsky.tasks.calibrate.calibrate_exposure``); bright (aperture S/N > 100),
unsaturated, isolated (no truth object brighter than 1 % of it within 8 px) truth stars are matched
(< 1 px) to sources not flagged saturated, CR, interpolated, blended, edge or bad. Printed, per
detector: the summary's FWHM (half maximum) against the truth's pixel-convolved half maximum
(``psf_fwhm_pixel_px``), the moment FWHM against ``psf_fwhm_moment_px``, the PSF stars used, the median
``psf_flux`` / truth flux and the pixel-phase amplitude of ``psf_flux / ap_flux_6`` (centre minus
corner, from a 4-MAD-clipped fit against ``q = (cos 2 pi fx + cos 2 pi fy) / 2``, ``fx, fy`` the truth
centre's offsets from the nearest pixel centre); pooled: the medians of ``psf_flux`` / truth of the
stars within 0.15 px of a pixel centre and of a pixel corner, and the same amplitude fits.

Usage::

    python -c 'from procsky.sim import simulate; simulate("undersampled", "U", visits=[1, 2, 3],
               detectors=[0, 1], scheduler="sync", progress=False)'
    python benchmarks/eval_psf_undersampled.py U [--no-cr] [--no-supersampling]
"""

from __future__ import annotations

import argparse
import glob
import json
import re

import numpy as np
from scipy.spatial import cKDTree

from procsky.exposure import Exposure
from procsky.refcat import read_refcat_file
from procsky.sim.truth import SimTruth
from procsky.tasks.calibrate import CalibrateConfig, calibrate_exposure

FLAGS = ("flag_saturated", "flag_cr", "flag_interpolated", "flag_blended", "psf_flux_flag", "flag_edge", "flag_bad")


def phase_amplitude(y: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> tuple[float, float]:
    """Centre minus corner of a fit ``y = a + b q`` clipped at 4 MAD-sigma, and its error."""
    q = 0.5 * (np.cos(2 * np.pi * fx) + np.cos(2 * np.pi * fy))
    a = np.column_stack([np.ones_like(q), q])
    keep = np.ones(len(y), bool)
    for _ in range(5):
        c = np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
        res = y - a @ c
        keep = np.abs(res) < 4 * 1.4826 * np.median(np.abs(res[keep]))
    cov = np.linalg.inv(a[keep].T @ a[keep]) * np.var(res[keep])
    return round(2 * float(c[1]), 4), round(2 * float(np.sqrt(cov[1, 1])), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("simdir")
    ap.add_argument("--no-cr", action="store_true", help="cosmic-ray steps off")
    ap.add_argument("--no-supersampling", action="store_true", help="psf.undersampled_fwhm=0")
    ap.add_argument("--visits", type=int, nargs="+", help="only these visits (default all calexps)")
    ap.add_argument("--detectors", type=int, nargs="+", help="only these detectors")
    args = ap.parse_args()
    d = CalibrateConfig().model_dump()
    if args.no_cr:
        d["cosmic_rays"]["enabled"] = False
    if args.no_supersampling and "undersampled_fwhm" in d["psf"]:
        d["psf"]["undersampled_fwhm"] = 0.0
    cfg = CalibrateConfig.model_validate(d)
    truth = SimTruth(args.simdir)
    refcat = read_refcat_file(f"{args.simdir}/refcat/refcat.parquet")
    kinds = truth.objects.set_index("object_id").kind
    pooled = []
    for f in sorted(glob.glob(f"{args.simdir}/images/calexp-*.fits")):
        v, dd = map(int, re.findall(r"v(\d+)-d(\d+)", f)[0])
        if (args.visits and v not in args.visits) or (args.detectors and dd not in args.detectors):
            continue
        _, src, summ = calibrate_exposure(Exposure.read(f), refcat, cfg)
        det = truth.detectors[(truth.detectors.visit == v) & (truth.detectors.detector == dd)].iloc[0]
        ex = truth.exposures[(truth.exposures.visit == v) & (truth.exposures.detector == dd)].reset_index(drop=True)
        xy, fl = ex[["x", "y"]].to_numpy(), ex.flux.to_numpy()
        near = cKDTree(xy).query_ball_point(xy, 8.0)
        iso = np.array([all(fl[j] < 0.01 * fl[i] for j in nb if j != i) for i, nb in enumerate(near)])
        dist, j = cKDTree(src[["x", "y"]].to_numpy()).query(xy)
        s = src.iloc[j].reset_index(drop=True)
        ok = (dist < 1) & (kinds.reindex(ex.object_id).to_numpy() == "star") & ~ex.saturated.to_numpy() & iso
        ok &= ((s.ap_flux_6 / s.ap_flux_6_err).to_numpy() > 100) & ~s[list(FLAGS)].any(axis=1).to_numpy()
        r = (s.psf_flux / ex.flux).to_numpy()[ok]
        pa = (s.psf_flux / s.ap_flux_6).to_numpy()[ok]
        fx = (ex.x - np.round(ex.x)).to_numpy()[ok]
        fy = (ex.y - np.round(ex.y)).to_numpy()[ok]
        pooled.append(np.column_stack([r, pa, fx, fy]))
        row = dict(
            visit=v,
            detector=dd,
            fwhm=round(summ["psf_fwhm_px"], 4),
            truth_fwhm_pixel=round(float(det.psf_fwhm_pixel_px), 4),
            fwhm_rel_err=round(summ["psf_fwhm_px"] / float(det.psf_fwhm_pixel_px) - 1, 4),
            moment_fwhm=round(float(summ.get("psf_moment_fwhm_px", np.nan)), 4),
            truth_moment_fwhm=round(float(det.psf_fwhm_moment_px), 4),
            psf_model=summ["psf_model"],
            n_psf_stars=summ["psf_n_stars"],
            n_reserved=int(src.calib_psf_reserved.sum()),
            psf_flux_sys=round(float(summ.get("psf_flux_sys", np.nan)), 4),
            reserved_dT_median=round(float(summ.get("psf_reserved_dT_median", np.nan)), 4),
            n_stars=int(ok.sum()),
            psf_over_truth_median=round(float(np.median(r)), 4),
            psf_over_ap6_phase_amplitude=phase_amplitude(pa, fx, fy),
        )
        print(json.dumps(row))
    r, pa, fx, fy = np.concatenate(pooled).T
    cen = np.hypot(fx, fy) < 0.15
    cor = np.hypot(np.abs(fx) - 0.5, np.abs(fy) - 0.5) < 0.15
    print(
        json.dumps(
            dict(
                n_stars=len(r),
                psf_over_truth_median=round(float(np.median(r)), 4),
                psf_over_truth_mad=round(float(1.4826 * np.median(np.abs(r - np.median(r)))), 4),
                n_centre=int(cen.sum()),
                n_corner=int(cor.sum()),
                centre_median=round(float(np.median(r[cen])), 4),
                corner_median=round(float(np.median(r[cor])), 4),
                psf_over_truth_phase_amplitude=phase_amplitude(r, fx, fy),
                psf_over_ap6_phase_amplitude=phase_amplitude(pa, fx, fy),
            )
        )
    )


if __name__ == "__main__":
    main()
