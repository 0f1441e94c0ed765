"""The object catalogue of one patch, step by step: detect, deblend, measure, force, tabulate.

:func:`make_objects` is what the ``make_objects`` task runs and what a notebook calls on
the coadds of a patch (one :class:`~procsky.exposure.Exposure` per band, on one pixel
grid, in nJy). The steps follow LSST's coadd processing (detectCoaddSources,
mergeCoaddDetections, deblendCoaddSources, measureCoaddSources, mergeCoaddMeasurements,
forcedPhotCoadd, writeObjectTable):

1. :func:`procsky.objects.detection.detect_objects`: per-band and multiband detection,
   footprints and peaks merged across bands, sky objects;
2. :func:`procsky.objects.deblend.deblend`: the multiband scarlet-like deblender;
3. :func:`procsky.objects.measure.measure_band` in every band (unforced), then the
   reference band of each object (:func:`procsky.objects.table.choose_reference_band`);
4. the same measurement forced at the reference band's positions and shapes in every band;
5. forced PSF photometry at the sky objects in every band (their flux scatter against
   their errors is the check of the noise model: pull std within 5 % of 1, else a note);
6. :func:`procsky.objects.table.object_table`.

The summary (counts, noise scales, sky-object pull widths, deblender flags, CPU per step)
is stored beside the table as ``object_summary``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pydantic

from procsky.errors import NoWorkError, ProcskyValueError
from procsky.notes import note_degraded
from procsky.objects.deblend import DeblendConfig, Deblended, deblend
from procsky.objects.detection import CoaddDetectionConfig, CoaddDetections, detect_objects
from procsky.objects.measure import MeasureConfig, measure_band
from procsky.objects.table import DEFAULT_BAND_PRIORITY, choose_reference_band, object_table

__all__ = ["ObjectCatalogue", "ObjectsConfig", "make_objects", "sky_object_photometry"]


class ObjectsConfig(pydantic.BaseModel):
    """Configuration of :func:`make_objects` (each step's own configuration inside)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    detection: CoaddDetectionConfig = CoaddDetectionConfig()
    """Detection on the coadds and the multiband detection image, merging, sky objects."""
    deblend: DeblendConfig = DeblendConfig()
    """The multiband deblender."""
    measure: MeasureConfig = MeasureConfig()
    """Per-band measurement (and forced measurement)."""
    band_priority: tuple[str, ...] = DEFAULT_BAND_PRIORITY
    """Reference band order of preference (LSST's priorityList)."""
    reference_min_snr: float = pydantic.Field(10.0, ge=0)
    """PSF-flux S/N an object needs in a band for it to be the reference band."""
    sky_pull_tolerance: float = pydantic.Field(0.05, gt=0)
    """Sky-object pull std farther than this from 1 is reported (``sky_object_pulls``)."""
    aperture_correction: bool = True
    """Scale each band's PSF fluxes by the median ratio of the largest aperture flux to the
    PSF flux of bright isolated stars (LSST's coadd aperture corrections): the coadd PSF
    inherits its inputs' models, whose stamps miss part of the wings."""
    apcorr_min_stars: int = pydantic.Field(5, ge=1)
    """Fewer such stars: no aperture correction in that band (a note says so)."""
    scale_flux_errors: bool = True
    """Multiply each band's flux errors by the measured noise of its PSF-filtered coadd over
    what the variance plane predicts (``detections.noise_scale``): resampling correlates a
    coadd's pixel noise, so errors summed over pixels as if independent are too small (the
    sky objects check the result)."""


@dataclass
class ObjectCatalogue:
    """What :func:`make_objects` returns: the table and the intermediate products."""

    table: pd.DataFrame
    detections: CoaddDetections
    deblended: Deblended
    summary: dict = field(default_factory=dict)


def _in_memory(exp):
    return exp.compute() if getattr(exp, "is_lazy", False) else exp


def sky_object_photometry(coadd, sky: pd.DataFrame) -> pd.DataFrame:
    """Forced PSF fluxes at the sky objects (array pixels ``x``, ``y``) of one band's coadd."""
    from procsky.diffim import forced_dia_photometry

    x0, y0 = coadd.xy0
    if len(sky) == 0:
        return pd.DataFrame({"sky_id": [], "x": [], "y": [], "psf_flux": [], "psf_flux_err": []})
    f = forced_dia_photometry(
        coadd,
        ids=sky["sky_id"].to_numpy(np.int64),
        x=sky["x"].to_numpy(float) + x0,
        y=sky["y"].to_numpy(float) + y0,
    )
    f = f.rename(columns={"dia_object_id": "sky_id"}).set_index("sky_id").reindex(sky["sky_id"].to_numpy())
    out = pd.DataFrame(
        {
            "sky_id": sky["sky_id"].to_numpy(np.int64),
            "x": sky["x"].to_numpy(float),
            "y": sky["y"].to_numpy(float),
            "psf_flux": f["psf_flux"].to_numpy(float),
            "psf_flux_err": f["psf_flux_err"].to_numpy(float),
        }
    )
    return out


def _error_scale(value) -> float:
    v = float(value) if value is not None else 1.0
    return v if np.isfinite(v) and v > 0 else 1.0


def _scale_flux_errors(table: pd.DataFrame, scale: float) -> None:
    """Multiply the flux-error columns (``*flux*_err``) of ``table`` by ``scale`` in place."""
    if scale == 1.0:
        return
    for c in table.columns:
        if c.endswith("_err") and "flux" in c:
            table[c] = table[c] * scale


def _largest_aperture(columns) -> str | None:
    best, radius = None, -1.0
    for c in columns:
        if c.startswith("ap_flux_") and not c.endswith("_err"):
            try:
                r = float(c[len("ap_flux_") :].replace("p", "."))
            except ValueError:
                continue
            if r > radius:
                best, radius = c, r
    return best


def _apply_aperture_correction(
    meas: pd.DataFrame, forced: pd.DataFrame, band: str, min_stars: int, *, xy=None, pixel_scale=float("nan")
) -> dict:
    """Median largest-aperture / PSF flux of bright isolated unflagged point sources of
    ``meas``, applied to the PSF fluxes of ``meas`` and ``forced`` (in place).

    A star counts only with no other object within twice the aperture's radius (``xy``:
    every object's array position; ``pixel_scale`` arcsec/px): a neighbour's wing inside the
    aperture would raise the correction."""
    ap = _largest_aperture(meas.columns)
    if ap is None:
        return {"value": 1.0, "n": 0, "status": "no aperture flux"}
    f = meas["psf_flux"].to_numpy(float)
    e = meas["psf_flux_err"].to_numpy(float)
    a = meas[ap].to_numpy(float)
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0) & (f > 100 * e) & np.isfinite(a)
    if "extendedness" in meas:
        ok &= meas["extendedness"].to_numpy(float) == 0
    if "blendedness" in meas:
        ok &= np.nan_to_num(meas["blendedness"].to_numpy(float), nan=1.0) < 0.01
    for c in ("flag_psf_flux", f"flag_{ap}", "flag_ap", "flag_bad_center", "flag_saturated_center", "flag_edge"):
        if c in meas:
            ok &= ~meas[c].to_numpy(bool)
    if xy is not None and len(xy) > 1 and np.isfinite(pixel_scale) and pixel_scale > 0:
        from scipy.spatial import cKDTree

        radius_px = float(ap[len("ap_flux_") :].replace("p", ".")) / pixel_scale
        d, _ = cKDTree(xy).query(xy, k=2)
        ok &= d[:, 1] > 2 * radius_px
    n = int(ok.sum())
    if n < min_stars:
        note_degraded(
            "coadd_apcorr_default",
            f"{band}: only {n} bright isolated stars (< {min_stars}) for the coadd aperture correction: PSF fluxes "
            "are not corrected to the aperture and may miss the PSF model's lost wing light",
            severity="warning",
            band=band,
            n_stars=n,
        )
        return {"value": 1.0, "n": n, "aperture": ap, "status": "too few stars"}
    r = a[ok] / f[ok]
    med = float(np.median(r))
    mad = float(np.median(np.abs(r - med))) * 1.4826
    keep = np.abs(r - med) <= 3 * max(mad, 1e-6)
    value = float(np.median(r[keep]))
    err = float(1.2533 * np.std(r[keep]) / np.sqrt(keep.sum())) if keep.sum() > 1 else float("nan")
    # The model fluxes go through the same PSF model: the same correction (their ratio to the
    # PSF flux, the extendedness test, is unchanged).
    for t in (meas, forced):
        for c in t.columns:
            if c.startswith(("psf_flux", "cmodel_flux", "exp_flux", "dev_flux")) and not c.endswith("_chi2"):
                t[c] = t[c] * value
    return {"value": value, "err": err, "n": int(keep.sum()), "aperture": ap, "status": "ok"}


def _pull_std(t: pd.DataFrame) -> tuple[float, float, int]:
    f, e = t["psf_flux"].to_numpy(float), t["psf_flux_err"].to_numpy(float)
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    if ok.sum() < 5:
        return float("nan"), float("nan"), int(ok.sum())
    p = f[ok] / e[ok]
    robust = 1.4826 * float(np.median(np.abs(p - np.median(p))))
    return float(np.std(p)), robust, int(ok.sum())


def _reference_rows(meas: Mapping[str, pd.DataFrame], ref_band: np.ndarray) -> pd.DataFrame:
    """Row i of the measurement in band ``ref_band[i]``."""
    bands = list(meas)
    first = meas[bands[0]]
    cols = {}
    for c in first.columns:
        vals = first[c].to_numpy().copy()
        for b in bands[1:]:
            sel = ref_band == b
            if sel.any() and c in meas[b]:
                vals[sel] = meas[b][c].to_numpy()[sel]
        cols[c] = vals
    return pd.DataFrame(cols)


def make_objects(
    coadds: Mapping[str, Any],
    config: ObjectsConfig | None = None,
    *,
    tract: int = 0,
    patch: int = 0,
    inner_box: tuple[int, int, int, int] | None = None,
    tract_owner: Callable | None = None,
) -> ObjectCatalogue:
    """Detect, deblend and measure the objects of one patch.

    Parameters
    ----------
    coadds : mapping band -> Exposure
        The patch's coadds (nJy per pixel, one pixel grid; lazy planes are computed).
    config : ObjectsConfig, optional
    tract, patch : int
        Encoded in ``object_id``.
    inner_box : (x0, y0, x1, y1), optional
        The patch's inner region in tract pixels (for ``is_primary``).
    tract_owner : callable, optional
        ``(ra, dec) -> bool array``: inside the tract's inner region.

    Returns
    -------
    ObjectCatalogue
    """
    config = config or ObjectsConfig()
    if not coadds:
        raise NoWorkError("no coadds to detect objects on")
    coadds = {b: _in_memory(e) for b, e in coadds.items() if e is not None}
    shapes = {e.shape for e in coadds.values()}
    if len(shapes) != 1 or len({tuple(e.xy0) for e in coadds.values()}) != 1:
        raise ProcskyValueError(
            f"the coadds of a patch must share one pixel grid; got shapes {sorted(shapes)} and origins "
            f"{sorted({tuple(e.xy0) for e in coadds.values()})}"
        )
    bands = sorted(coadds)
    cpu: dict[str, float] = {}

    def step(name, fn, *args, **kw):
        t0 = time.process_time()
        out = fn(*args, **kw)
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - t0
        return out

    det = step("detect", detect_objects, coadds, config.detection)
    deb = step("deblend", deblend, coadds, det, config.deblend)
    n = len(deb.children)
    first = coadds[bands[0]]
    summary: dict[str, Any] = {
        "bands": bands,
        "n_parents": int(len(det.parents)),
        "n_peaks": int(len(det.peaks)),
        "n_objects": int(n),
        "n_sky_objects": int(len(det.sky_objects)),
        "noise_scale": {str(k): float(v) for k, v in det.noise_scale.items()},
    }
    for c in deb.children.columns:
        if c.startswith("deblend_flag"):
            summary[f"n_{c}"] = int(deb.children[c].astype(bool).sum())
    if n == 0:
        note_degraded("no_objects", "no object detected on the patch's coadds", severity="warning")
        table = pd.DataFrame()
        summary["cpu_s"] = cpu
        return ObjectCatalogue(table, det, deb, summary)
    meas = {b: step("measure", measure_band, deb, coadds[b], b, config.measure) for b in bands}
    ref_band = choose_reference_band(meas, priority=config.band_priority, min_snr=config.reference_min_snr)
    reference = _reference_rows(meas, ref_band)
    forced = {
        b: step("forced_measure", measure_band, deb, coadds[b], b, config.measure, reference=reference) for b in bands
    }
    sky = {b: step("sky_objects", sky_object_photometry, coadds[b], det.sky_objects) for b in bands}
    scales = {b: _error_scale(det.noise_scale.get(b)) if config.scale_flux_errors else 1.0 for b in bands}
    for b in bands:
        for table_ in (meas[b], forced[b], sky[b]):
            _scale_flux_errors(table_, scales[b])
    summary["flux_err_scale"] = scales
    if config.aperture_correction:
        from procsky.wcs import pixel_scale

        xy = np.column_stack([deb.children["x"].to_numpy(float), deb.children["y"].to_numpy(float)])
        scale = pixel_scale(first.wcs) if first.wcs is not None else float("nan")
        summary["aperture_correction"] = {
            b: _apply_aperture_correction(meas[b], forced[b], b, config.apcorr_min_stars, xy=xy, pixel_scale=scale)
            for b in bands
        }
    big = {b: v for b, v in scales.items() if v > 1.0 + config.sky_pull_tolerance}
    if big:
        note_degraded(
            "coadd_correlated_noise",
            "flux errors scaled up for the coadd's correlated noise: "
            + ", ".join(f"{b} x{v:.3f}" for b, v in sorted(big.items()))
            + " (measured noise of the PSF-filtered coadd over the variance plane's prediction)",
            severity="info",
            **{f"scale_{b}": v for b, v in big.items()},
        )
    pulls = {}
    for b, t in sky.items():
        std, robust, m = _pull_std(t)
        pulls[b] = {"std": std, "robust_std": robust, "n": m}
        if np.isfinite(std) and abs(std - 1.0) > config.sky_pull_tolerance:
            note_degraded(
                "sky_object_pulls",
                f"{b}-band sky-object flux / error has std {std:.3f} over {m} empty positions (expected 1 within "
                f"{config.sky_pull_tolerance:g}): the coadd's variance plane misstates its noise, so flux errors "
                "and S/N in this band are off by that factor",
                severity="warning",
                band=b,
                pull_std=std,
            )
    summary["sky_object_pulls"] = pulls
    summary["reference_band_counts"] = {str(k): int(v) for k, v in pd.Series(ref_band).value_counts().items()}
    table = step(
        "table",
        object_table,
        deb.children,
        forced,
        reference,
        ref_band,
        pixel_to_sky=first.pixel_to_sky,
        xy0=tuple(first.xy0),
        tract=tract,
        patch=patch,
        inner_box=inner_box,
        tract_owner=tract_owner,
        sky_objects=sky,
    )
    summary["n_primary"] = int(table["is_primary"].sum())
    summary["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    return ObjectCatalogue(table, det, deb, summary)
