"""PSF-model accuracy against the simulator's true PSF, detector by detector.

For every detector of the given visits of a calibrated `small` simulation, calibrate's own
star selection is run (up to the PSF fit, whose inputs are kept), then PSF models are fitted
to those stars with several settings and compared with the true PSF
(``procsky.sim.psf.truth_psf_image``) on a 6 x 6 grid of positions: the fractional PSF flux of
the true PSF fitted with the model (uniform weights, a faint source's case), minus its
median over the grid (the aperture correction fixes the flux scale). Printed: its rms per
detector and over each visit's detectors, for

* ``pixel``: the pixel polynomial alone, order by star count (3 stars per term), as before
  the warp (``PsfConfig(warp_order=-1)``, ``-c calibrate.psf.warp_order=-1``);
* ``warp``: calibrate's default (pixel order 0 plus the size/shear warp of order 1 on
  detectors with fewer than 33 PSF stars).

Both are fitted by ``procsky.calibrate.fit_detector_psf``, as calibrate fits them.

Usage::

    python benchmarks/eval_psf_model_small.py SIMDIR --visits 1,2,5,8,11,14,17,20,23,26,29

``SIMDIR`` is ``procsky.sim.simulate('small', SIMDIR, visits=[...])`` output (calibrated mode).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from procsky.calibrate import (
    CalibrationConfig,
    PsfConfig,
    fit_detector_psf,
    run_detection_steps,
    state_from_exposure,
)
from procsky.calibrate.psf import select_stars
from procsky.exposure import Exposure
from procsky.instruments.simcam import SimcamGeometry, focal_plane_position
from procsky.kernels import psfmodel as pm
from procsky.sim.psf import SimPsfParams, truth_psf_image
from procsky.sim.recipe import load_recipe
from procsky.sim.render import image_filename


def psf_inputs(exp: Exposure) -> tuple[np.ndarray, ...]:
    """Run calibrate's steps up to its PSF fit and return that fit's inputs (image, variance, mask, x, y)."""
    config = CalibrationConfig()
    state = state_from_exposure(exp, config)
    run_detection_steps(state, config)
    select_stars(state, config.psf)
    idx = np.flatnonzero(state.cand)
    return state.sub, state.var_det, state.mask, state.meas["x"][idx], state.meas["y"][idx]


# the two models compared, each fitted exactly as calibrate fits it with that configuration
VARIANTS = {"pixel": PsfConfig(warp_order=-1), "warp": PsfConfig()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("simdir", type=Path)
    ap.add_argument("--visits", default="2")
    ap.add_argument("--detectors", default="0,1,2,3,4,5,6,7,8")
    args = ap.parse_args()
    d = args.simdir
    rec = load_recipe(d / "recipe.yaml")
    geo = SimcamGeometry(rec.instrument, rec.seed)
    visits = pd.read_parquet(d / "truth" / "visits.parquet").set_index("visit")
    rows = []
    for v in map(int, args.visits.split(",")):
        par = SimPsfParams.from_dict(visits.loc[v])
        for det in map(int, args.detectors.split(",")):
            exp = Exposure.read(d / "images" / image_filename("calexp", v, det))
            inp = psf_inputs(exp)
            ny, nx = exp.shape
            rng = np.random.default_rng(100 * v + det)
            g = np.round(np.linspace(60, min(nx, ny) - 60, 6))
            pos = np.array([(gx + ox, gy + oy) for gy in g for gx in g for ox, oy in [rng.uniform(-0.5, 0.5, 2)]])
            truth = []
            for px, py in pos:
                fx, fy = focal_plane_position(geo, det, px, py)
                off = (px - np.floor(px + 0.5), py - np.floor(py + 0.5))
                truth.append(truth_psf_image(par, float(fx), float(fy), size=25, offset=off))
            truth = np.array(truth)
            row = {"visit": v, "detector": det, "n_candidates": len(inp[3])}
            for name, config in VARIANTS.items():
                model = fit_detector_psf(*inp, config)[0]
                if model is None:
                    row[name] = np.nan
                    continue
                st = pm.render_stamps(model, pos[:, 0], pos[:, 1], 25)
                f = np.sum(st * truth, axis=(1, 2)) / np.sum(st * st, axis=(1, 2))
                row[name] = 100 * float(np.std(f / np.median(f) - 1))
            rows.append(row)
            print(
                f"visit {v} detector {det}: {row['n_candidates']} stars, PSF-flux error rms "
                f"pixel {row['pixel']:.2f} %, warp {row['warp']:.2f} %",
                flush=True,
            )
    df = pd.DataFrame(rows)
    rms = df.groupby("visit")[["pixel", "warp"]].agg(lambda s: float(np.sqrt(np.mean(s**2))))
    print("\nrms over each visit's detectors (%):")
    print(rms.round(2).T.to_string())
    print(
        f"\nall {len(df)} detectors: pixel {np.sqrt(np.mean(df.pixel**2)):.2f} %, "
        f"warp {np.sqrt(np.mean(df.warp**2)):.2f} %; worst pixel {df.pixel.max():.2f} %, warp {df.warp.max():.2f} %"
    )


if __name__ == "__main__":
    main()
