"""Run a simulated survey: scene, per-detector drawing in parallel through dask, outputs.

Output layout (stable; see ``datasets/README.md``)::

    DIR/recipe.yaml                 the recipe as used (seed included, defaults filled in)
    DIR/images/calexp-v<visit>-d<det>.fits   calibrated mode (or raw-v... in raw mode)
    DIR/calibs/bias-d<det>.fits, dark-d<det>.fits, flat-<band>-d<det>.fits   (raw mode: masters)
    DIR/calib_frames/{bias,dark,flat}-e<expid>-d<det>.fits   (raw mode: the individual
                                    exposures, ``raw.n_bias_frames``, ``raw.n_dark_frames``
                                    and ``raw.n_flat_frames`` per band of the visits drawn)
    DIR/truth/objects.parquet       every object: id, kind, position, flux per band (nJy), shape
    DIR/truth/exposures.parquet     per visit/detector/object: true pixel position, flux, counts
    DIR/truth/lightcurves.parquet   variables and transients at every visit
    DIR/truth/visits.parquet        pointing, conditions, zero point, sky, PSF model parameters
    DIR/truth/detectors.parquet     per visit/detector: sky, PSF at centre, WCS header, counts
    DIR/truth/cosmic_rays.parquet   hit pixels
    DIR/truth/defects.parquet       bad columns and hot pixels
    DIR/refcat/refcat.parquet       Gaia-like reference catalogue of the stars

Every random number comes from a generator seeded by (seed, purpose, visit, detector), so
the pixels do not depend on the scheduler, the number of workers or the subset drawn.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from procsky.errors import ProcskyValueError
from procsky.sim.recipe import Recipe, load_recipe
from procsky.sim.render import image_filename, render_detector, write_calib_frames, write_calibs, write_detector
from procsky.sim.scene import Scene, build_scene, detector_footprints, epoch_flux

if TYPE_CHECKING:
    from dask.callbacks import Callback

__all__ = ["simulate", "SimulationResult", "select_objects", "draw_visit_detector"]

_MARGIN_ARCSEC = 40.0


@dataclass
class SimulationResult:
    """What :func:`simulate` wrote."""

    out: Path
    recipe: Recipe
    mode: str
    images: list[Path] = field(default_factory=list)
    calibs: list[Path] = field(default_factory=list)
    calib_frames: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time spent drawing and writing images, all workers
    n_objects: int = 0


def select_objects(scene: Scene, visit_row, detector: int, footprint=None) -> pd.DataFrame:
    """Objects near one detector of one visit, with their flux (nJy) at that epoch and band."""
    if footprint is None:
        footprint = detector_footprints(scene, visit_row)[detector]
    x0, x1, y0, y1 = footprint
    o = scene.objects
    xi, eta = o["xi"].to_numpy(), o["eta"].to_numpy()
    m = (
        (xi > x0 - _MARGIN_ARCSEC)
        & (xi < x1 + _MARGIN_ARCSEC)
        & (eta > y0 - _MARGIN_ARCSEC)
        & (eta < y1 + _MARGIN_ARCSEC)
    )
    sub = o[m]
    band = visit_row.band
    cols = {
        "object_id": sub["object_id"].to_numpy(),
        "kind": sub["kind"].to_numpy(),
        "ra": sub["ra"].to_numpy(),
        "dec": sub["dec"].to_numpy(),
        "flux": epoch_flux(sub, band, visit_row.mjd),
    }
    if "hlr_disk" in sub:
        for c in ("hlr_disk", "hlr_bulge", "g1", "g2", "shear_g1", "shear_g2"):
            cols[c] = np.nan_to_num(sub[c].to_numpy(dtype=float), nan=0.0)
        cols["bulge_fraction"] = np.nan_to_num(sub[f"bulge_fraction_{band}"].to_numpy(dtype=float), nan=0.0)
    return pd.DataFrame(cols)


def draw_visit_detector(recipe: Recipe, visit: dict, detector: int, objects: pd.DataFrame, out: str, mode: str):
    """Worker task: draw and write one detector image; return its truth tables and CPU seconds."""
    cpu0 = time.process_time()
    img = render_detector(recipe, visit, detector, objects, raw=(mode == "raw"))
    kind = "raw" if mode == "raw" else "calexp"
    name = image_filename(kind, img.visit, detector)
    write_detector(recipe, visit, img, Path(out) / "images" / name, kind)
    summary = dict(img.summary, file=f"images/{name}")
    return img.truth, img.cosmic_rays, summary, time.process_time() - cpu0


def _calib_task(recipe, detector, bands, out):
    return write_calibs(recipe, detector, bands, Path(out) / "calibs")


def _calib_frames_task(recipe, detector, bands, out):
    return write_calib_frames(recipe, detector, bands, Path(out) / "calib_frames")


def _tqdm_callback(total: int, desc: str, enabled: bool) -> Callback:
    """A dask local-scheduler callback driving a tqdm bar (one tick per finished task)."""
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    class _CB(Callback):
        def _start(self, dsk):
            self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=True)

        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple) and key and str(key[0]).startswith("draw"):
                self.bar.update(1)
            elif isinstance(key, str) and key.startswith("draw"):
                self.bar.update(1)

        def _finish(self, dsk, state, errored):
            self.bar.close()

    return _CB()


def simulate(
    recipe,
    out,
    *,
    seed: int | None = None,
    mode: str = "calibrated",
    scheduler: str = "processes",
    workers: int | None = None,
    visits=None,
    detectors=None,
    progress: bool = True,
) -> SimulationResult:
    """Simulate a survey and write images, truth and reference catalogues to ``out``.

    Parameters
    ----------
    recipe : str, Path, dict or Recipe
        A recipe name (``tiny``, ``small``, ``medium``), a YAML path, a mapping or a Recipe.
    out : str or Path
        Output directory (created; existing files of the same name are replaced).
    seed : int, optional
        Overrides the recipe's seed.
    mode : {"calibrated", "raw"}
        ``calibrated``: instrument-signature-removed images (image, variance, mask).
        ``raw``: images with overscan, bias, dark and flat pattern, plus master calibs
        and the individual bias, dark and flat exposures (``recipe.raw.n_bias_frames``,
        ``n_dark_frames``, ``n_flat_frames``; flats for the bands of the visits drawn).
    scheduler : {"processes", "threads", "sync"}
        dask local scheduler. GalSim holds the GIL through much of its drawing, so
        processes scale better (see ``benchmarks/bench_sim.py``).
    workers : int, optional
        Number of worker processes/threads (default: the CPUs available).
    visits, detectors : list of int, optional
        Draw only these (the pixels of each image do not depend on the subset).
    progress : bool
        Show a progress bar.
    """
    import dask

    if mode not in ("calibrated", "raw"):
        raise ProcskyValueError(f"mode must be 'calibrated' or 'raw', got {mode!r}")
    if scheduler not in ("processes", "threads", "sync", "synchronous"):
        raise ProcskyValueError(f"scheduler must be 'processes', 'threads' or 'sync', got {scheduler!r}")
    t0 = time.perf_counter()
    recipe = load_recipe(recipe).with_seed(seed)
    out = Path(out)
    for sub in ("images", "truth", "refcat") + (("calibs", "calib_frames") if mode == "raw" else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())

    scene = build_scene(recipe)
    all_visits = scene.visits["visit"].tolist()
    want_visits = all_visits if visits is None else [int(v) for v in visits]
    unknown = sorted(set(want_visits) - set(all_visits))
    if unknown:
        raise ProcskyValueError(f"visits {unknown} are not in recipe {recipe.name!r} (visits 1..{len(all_visits)})")
    n_det = scene.geometry.n_detectors
    want_dets = list(range(n_det)) if detectors is None else [int(d) for d in detectors]
    bad = [d for d in want_dets if not 0 <= d < n_det]
    if bad:
        raise ProcskyValueError(f"detectors {bad} do not exist: simcam in recipe {recipe.name!r} has 0..{n_det - 1}")

    tasks = []
    vrows = scene.visits.set_index("visit", drop=False)
    for v in want_visits:
        row = vrows.loc[v]
        vdict = row.to_dict()
        vdict = {k: (v_.item() if isinstance(v_, np.generic) else v_) for k, v_ in vdict.items()}
        fps = detector_footprints(scene, row)
        for d in want_dets:
            objs = select_objects(scene, row, d, fps[d])
            tasks.append(
                dask.delayed(draw_visit_detector, pure=False)(
                    recipe, vdict, d, objs, str(out), mode, dask_key_name=f"draw-{v}-{d}"
                )
            )
    calib_tasks = []
    if mode == "raw":
        bands = recipe.band_names
        calib_tasks = [
            dask.delayed(_calib_task, pure=False)(recipe, d, bands, str(out), dask_key_name=f"calib-{d}")
            for d in want_dets
        ]
        frame_bands = [b for b in bands if b in set(vrows.loc[want_visits, "band"])]
        calib_tasks += [
            dask.delayed(_calib_frames_task, pure=False)(
                recipe, d, frame_bands, str(out), dask_key_name=f"calib-frames-{d}"
            )
            for d in want_dets
        ]
    sched = "sync" if scheduler in ("sync", "synchronous") else scheduler
    kwargs: dict[str, Any] = {"scheduler": sched}
    if sched != "sync":
        kwargs["num_workers"] = workers or os.cpu_count() or 1
    with _tqdm_callback(len(tasks), f"procsky sim {recipe.name}", progress):
        from procsky import _dask

        results, calib_names = _dask.evaluate(tasks, calib_tasks, **kwargs)

    truth = [r[0] for r in results]
    crs = [r[1] for r in results]
    summaries = [r[2] for r in results]
    _write_parquet(_concat(truth, ["visit", "detector", "object_id"]), out / "truth" / "exposures.parquet")
    _write_parquet(_concat(crs, ["visit", "detector", "y", "x"]), out / "truth" / "cosmic_rays.parquet")
    _write_parquet(
        pd.DataFrame(summaries).sort_values(["visit", "detector"]).reset_index(drop=True),
        out / "truth" / "detectors.parquet",
    )
    objects = scene.objects.drop(columns=["flux_ref"])
    _write_parquet(objects, out / "truth" / "objects.parquet")
    _write_parquet(scene.visits, out / "truth" / "visits.parquet")
    _write_parquet(scene.lightcurves(), out / "truth" / "lightcurves.parquet")
    from procsky.sim.render import detector_defects

    defects = pd.concat([detector_defects(recipe, scene.geometry, d) for d in range(n_det)], ignore_index=True)
    _write_parquet(defects, out / "truth" / "defects.parquet")
    _write_parquet(scene.refcat(), out / "refcat" / "refcat.parquet")

    res = SimulationResult(out=out, recipe=recipe, mode=mode, n_objects=len(scene.objects))
    res.images = [out / s["file"] for s in sorted(summaries, key=lambda s: (s["visit"], s["detector"]))]
    n_cal = len(calib_names) // 2
    res.calibs = [out / "calibs" / n for names in calib_names[:n_cal] for n in names]
    res.calib_frames = [out / "calib_frames" / n for names in calib_names[n_cal:] for n in names]
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = float(sum(r[3] for r in results))
    return res


def _concat(frames, order):
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(order, kind="stable").reset_index(drop=True)


_UNITS = {
    "ra": "deg",
    "dec": "deg",
    "ra_err": "deg",
    "dec_err": "deg",
    "x": "pixel",
    "y": "pixel",
    "flux": "nJy",
    "counts": "adu",
    "mjd": "d",
    "hlr_disk": "arcsec",
    "hlr_bulge": "arcsec",
    "xi": "arcsec",
    "eta": "arcsec",
    "period": "d",
    "t0": "d",
    "rise": "d",
    "decay": "d",
    "electrons": "electron",
    "sky_level": "adu",
    "psf_fwhm": "arcsec",
    "psf_fwhm_px": "pixel",
}


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Parquet with units in the schema metadata; written deterministically."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    units = {c: u for c, u in _UNITS.items() if c in df.columns}
    units.update({c: "nJy" for c in df.columns if c.startswith("flux_")})
    units.update({c: "mag(AB)" for c in df.columns if c.startswith("mag_")})
    meta = dict(table.schema.metadata or {})
    meta[b"units"] = json.dumps(units, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
