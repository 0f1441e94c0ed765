"""Difference-imaging tasks: ``make_template`` and ``subtract``.

* ``make_template`` (per {skymap, tract, patch, band}): coadd of the best-seeing warps of
  the patch (a configurable fraction, at least a minimum count), stored as ``template``;
  built with :func:`procsky.coadd.build_coadd`.
* ``subtract`` (per {instrument, visit, detector}): warps the overlapping template patches
  onto the science detector's pixel grid (:func:`warp_template_to_science`, Lanczos3 via
  :func:`procsky.coadd.warp_exposure`), PSF-matches and subtracts
  (:func:`procsky.diffim.subtract_images`: Alard-Lupton kernel with spatial variation and a
  differential background, noise decorrelation), detects and measures DIA sources in both
  polarities (:func:`procsky.diffim.detect_dia_sources`). Outputs ``diff``, ``dia_source``
  and a per-detector ``diffim_summary`` dict.
"""

from __future__ import annotations

import math

import numpy as np
import pydantic

from procsky import masks as _masks
from procsky.diffim import DiaConfig, SubtractionConfig, detect_dia_sources, subtract_images
from procsky.errors import NoWorkError, ProcskyValueError
from procsky.exposure import Exposure
from procsky.notes import note_degraded
from procsky.pipeline.task import Input, Output, QuantumSpec, Task, TaskConfig, register_task

__all__ = ["MakeTemplateTask", "SubtractTask", "warp_template_to_science", "select_best_seeing", "visit_bands"]

_VD = ("instrument", "visit", "detector")
_PATCH = ("skymap", "tract", "patch")


def visit_bands(repo) -> dict:
    """``{(instrument, visit): record}`` of the registry's visit records ({} without a repo)."""
    if repo is None:
        return {}
    try:
        recs = repo.dimension_records("visit")
    except Exception:  # noqa: BLE001 - hand-made repositories have no visit records
        return {}
    return {(r.get("instrument"), r.get("visit")): r for r in recs}


def _band_of(data_id, records) -> str | None:
    if data_id.get("band") is not None:
        return data_id["band"]
    rec = records.get((data_id.get("instrument"), data_id.get("visit")))
    return None if rec is None else rec.get("band")


def select_best_seeing(fwhms, fraction: float, min_count: int, max_count: int | None = None) -> list[int]:
    """Indices of the best-seeing inputs: the best ``fraction`` but at least ``min_count``.

    Parameters
    ----------
    fwhms : sequence of float, pixels
        PSF FWHM of each input (NaN for unknown: never selected before known ones).
    fraction : float
        Fraction of the inputs kept (rounded up).
    min_count : int
        Minimum number kept (all when there are fewer).
    max_count : int, optional
        Maximum number kept.

    Returns
    -------
    list of int
        Sorted by FWHM, ties by input order.
    """
    f = np.asarray(fwhms, dtype=float)
    n = f.size
    k = max(int(math.ceil(fraction * n)), min(min_count, n))
    if max_count is not None:
        k = min(k, max_count)
    order = np.argsort(np.where(np.isfinite(f), f, np.inf), kind="stable")
    return [int(i) for i in order[:k]]


class MakeTemplateConfig(TaskConfig):
    """Configuration of :class:`MakeTemplateTask`."""

    best_seeing_fraction: float = pydantic.Field(0.5, gt=0, le=1)
    """Fraction of the warps (best seeing first) coadded into the template."""
    min_count: int = pydantic.Field(3, ge=1)
    """At least this many warps (all when fewer exist)."""
    max_count: int | None = None
    """At most this many warps."""
    statistic: str = "mean"
    """Coadd statistic (``mean``, ``clipped_mean``, ``median``)."""
    reject_artifacts: bool = True
    """CompareWarp-style artifact rejection (see :class:`procsky.coadd.CoaddConfig`)."""


@register_task("make_template")
class MakeTemplateTask(Task):
    """Best-seeing coadd of a patch and band, stored as ``template``."""

    dimensions = _PATCH + ("band",)
    inputs = {"warps": Input("warp", ("instrument", "visit") + _PATCH, multiple=True, tolerate_missing=True)}
    outputs = {"template": Output("template", _PATCH + ("band",))}
    Config = MakeTemplateConfig
    parallel = True

    def quanta(self, repo, inputs, where):
        """One quantum per patch and band: warps grouped by their visit's band."""
        records = visit_bands(repo)
        groups: dict = {}
        for ds in inputs.get("warps", []):
            band = _band_of(ds.data_id, records)
            if band is None:
                continue
            qid = {**{d: ds.data_id[d] for d in _PATCH}, "band": band}
            if where is not None and not where(qid):
                continue
            key = tuple(qid[d] for d in _PATCH + ("band",))
            groups.setdefault(key, (qid, []))[1].append(ds)
        return [QuantumSpec(data_id=qid, inputs={"warps": sorted(lst, key=lambda d: d.key)})
                for _, (qid, lst) in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]

    def run(self, warps):
        """Coadd the best-seeing warps; returns ``{"template": Exposure}`` (lazy planes)."""
        from procsky.coadd import CoaddConfig, build_coadd
        from procsky.wcs import shift_wcs, wcs_from_cards

        warps = [w for w in warps if w is not None]
        if not warps:
            raise NoWorkError("no warps for this patch and band")
        fwhm = []
        for w in warps:
            try:
                # Warp PSFs live in tract pixels; rank at the centre of the input's
                # footprint (which may cover only part of the patch), else the warp's centre.
                poly = (w.metadata or {}).get("footprint")
                if poly:
                    cx, cy = np.asarray(poly, float).mean(axis=0)
                else:
                    cx = w.xy0[0] + (w.shape[1] - 1) / 2.0
                    cy = w.xy0[1] + (w.shape[0] - 1) / 2.0
                fwhm.append(float(w.psf.fwhm(cx, cy)) if w.psf is not None else np.nan)
            except Exception:  # noqa: BLE001 - an unusable PSF ranks last
                fwhm.append(np.nan)
        chosen = select_best_seeing(fwhm, self.config.best_seeing_fraction, self.config.min_count,
                                    self.config.max_count)
        sel = [warps[i] for i in chosen]
        # Output grid: the union of the selected warps' boxes (tract pixels).
        x0 = min(w.xy0[0] for w in sel)
        y0 = min(w.xy0[1] for w in sel)
        x1 = max(w.xy0[0] + w.shape[1] for w in sel)
        y1 = max(w.xy0[1] + w.shape[0] for w in sel)
        ref = sel[0]
        _, cards = shift_wcs(wcs_from_cards(ref.wcs_cards), x0 - ref.xy0[0], y0 - ref.xy0[1], ref.wcs_cards)
        cfg = CoaddConfig(statistic=self.config.statistic, reject_artifacts=self.config.reject_artifacts)
        lazy = build_coadd(sel, out_cards=cards, out_shape=(y1 - y0, x1 - x0), xy0=(x0, y0), config=cfg,
                           inputs_are_warps=True)
        band = None
        if ref.visit_info is not None:
            band = ref.visit_info.band or None
        tpl = lazy.to_exposure(band=band)
        tpl.metadata["template_fwhm"] = [fwhm[i] for i in chosen]
        tpl.metadata["template_visits"] = [w.visit_info.visit if w.visit_info else None for w in sel]
        tpl.metadata["template_fraction"] = self.config.best_seeing_fraction
        return {"template": tpl}


# ------------------------------------------------------------------------ subtraction
def warp_template_to_science(templates, science: Exposure, *, order: int = 3) -> Exposure:
    """Resample template patches onto the science exposure's pixel grid and merge them.

    Parameters
    ----------
    templates : list of Exposure
        Template patches (with WCS and PSF), nJy per template pixel.
    science : Exposure
        Science exposure with a WCS; its grid, ``xy0`` and detector are used.
    order : int
        Lanczos order.

    Returns
    -------
    Exposure
        numpy planes on the science grid (nJy per science pixel); pixels covered by no
        template are NO_DATA; PSF = the warped PSF of the patch covering the detector
        centre (else of the patch covering the most pixels).

    Raises
    ------
    NoWorkError
        No template overlaps the science exposure.
    """
    import dask

    from procsky.coadd import WarpConfig, warp_exposure

    if science.wcs is None:
        raise ProcskyValueError("the science exposure has no WCS; it cannot be matched to a template")
    ny, nx = science.shape
    nodata = np.uint32(_masks.bit("NO_DATA"))
    img = np.zeros((ny, nx), np.float32)
    var = np.zeros((ny, nx), np.float32)
    msk = np.full((ny, nx), nodata, np.uint32)
    filled = np.zeros((ny, nx), bool)
    best = (None, -1, False)
    cfg = WarpConfig(order=order, chunk=max(ny, nx) if max(ny, nx) <= 4096 else 2048)
    for tpl in templates:
        if tpl is None:
            continue
        try:
            w = warp_exposure(tpl, science.wcs_cards, (ny, nx), xy0=(0, 0), config=cfg, full=True)
        except NoWorkError:
            continue
        i, v, m = dask.compute(w.image, w.variance, w.mask)
        ok = ((m & nodata) == 0) & np.isfinite(i) & ~filled
        img[ok], var[ok], msk[ok] = i[ok], v[ok], m[ok]
        filled |= ok
        covers_center = bool(((m & nodata) == 0)[ny // 2, nx // 2])
        score = int(ok.sum())
        if w.psf is not None and ((covers_center and not best[2]) or (covers_center == best[2] and score > best[1])):
            best = (w.psf, score, covers_center)
    if not filled.any():
        raise NoWorkError("no template patch overlaps this detector")
    return Exposure(img, var, msk, wcs=science.wcs, wcs_cards=science.wcs_cards, psf=best[0],
                    detector=science.detector, xy0=science.xy0,
                    metadata={"flux_unit": "nJy", "template_coverage": float(filled.mean())})


class SubtractConfig(TaskConfig):
    """Configuration of :class:`SubtractTask` (see :class:`procsky.diffim.SubtractionConfig`)."""

    mode: str = "auto"
    """``auto`` (convolve the sharper image), ``convolve_template`` or ``convolve_science``."""
    degrees: tuple[int, ...] = (6, 4, 2)
    """Polynomial degree of each Gaussian of the Alard-Lupton basis."""
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Gaussian widths in units of the matching sigma."""
    spatial_order: int = pydantic.Field(2, ge=0, le=4)
    """Maximum order of the spatial variation of the kernel (chosen by cross-validation)."""
    background_order: int = pydantic.Field(1, ge=0, le=4)
    """Order of the differential background."""
    kernel_half_width: int | None = None
    """Kernel half-width in pixels (default from the PSF widths)."""
    min_snr: float = 30.0
    """Minimum significance of kernel stars."""
    n_cells: int = 5
    """Kernel stars are spread over n_cells x n_cells cells ..."""
    per_cell: int = 6
    """... with at most this many per cell."""
    decorrelate: bool = True
    """Apply the noise-decorrelation afterburner."""
    chunk: int = 1024
    """Dask chunk side of the convolution, pixels."""
    detection_threshold: float = 5.0
    """DIA detection threshold, sigma."""
    warp_order: int = 3
    """Lanczos order of the template warp."""
    template_search_radius: float = 2.0
    """Templates whose patch centre is farther than this from the visit boresight are not
    read (degrees; used only when the registry knows the boresight and the sky map)."""

    def subtraction(self) -> SubtractionConfig:
        return SubtractionConfig(mode=self.mode, degrees=tuple(self.degrees), scales=tuple(self.scales),
                                 spatial_order=self.spatial_order, background_order=self.background_order,
                                 kernel_half_width=self.kernel_half_width, min_snr=self.min_snr,
                                 n_cells=self.n_cells, per_cell=self.per_cell, decorrelate=self.decorrelate,
                                 chunk=self.chunk)


@register_task("subtract")
class SubtractTask(Task):
    """Template warp, Alard-Lupton subtraction, DIA detection and measurement per detector."""

    dimensions = _VD
    inputs = {
        "calexp": Input("calexp", _VD),
        "templates": Input("template", _PATCH + ("band",), multiple=True),
    }
    outputs = {
        "diff": Output("diff", _VD),
        "dia_source": Output("dia_source", _VD),
        "summary": Output("diffim_summary", _VD),
    }
    Config = SubtractConfig
    # One detector's subtraction is a few CPU-seconds of numpy/numba work: it runs in the
    # worker thread that holds the quantum (parallelism comes from the many detectors of a
    # stage). As a ``parallel`` task every quantum seceded from its worker at once and
    # queued its small graphs behind every other quantum's, so each quantum's wall time was
    # the whole stage's (300 s of wall for 1-2 s of CPU per quantum on the demo) and its
    # CPU time was not counted in its thread.
    parallel = False

    def quanta(self, repo, inputs, where):
        """Per calexp; templates of the visit's band (near its boresight when known)."""
        records = visit_bands(repo)
        templates = list(inputs.get("templates", []))
        centers = _patch_centers(repo, templates)
        out = []
        for ds in sorted(inputs.get("calexp", []), key=lambda d: d.key):
            did = {d: ds.data_id[d] for d in _VD if d in ds.data_id}
            if len(did) != len(_VD) or (where is not None and not where(did)):
                continue
            spec = QuantumSpec(data_id=did, inputs={"calexp": [ds]})
            band = _band_of(ds.data_id, records)
            cand = [t for t in templates if band is None or t.data_id.get("band") == band]
            rec = records.get((did.get("instrument"), did.get("visit"))) or {}
            ra, dec = rec.get("boresight_ra"), rec.get("boresight_dec")
            if ra is not None and dec is not None and centers:
                r = self.config.template_search_radius
                cand = [t for t in cand if t.key not in centers or _sep(ra, dec, *centers[t.key]) <= r]
            if not cand:
                continue
            spec.inputs["templates"] = sorted(cand, key=lambda d: d.key)
            if band is not None:
                spec.data_id.setdefault("band", band)
            out.append(spec)
        return out

    def run(self, calexp, templates, data_ids=None):
        """Returns ``{"diff": Exposure, "dia_source": DataFrame, "summary": dict}``."""
        if calexp is None:
            raise NoWorkError("no calexp")
        science = calexp.compute()
        tpl = warp_template_to_science(templates, science, order=self.config.warp_order)
        diff, kernel, summary = subtract_images(science, tpl, self.config.subtraction())
        # the science image is the static sky of the registration-noise term of the score
        dia, mask = detect_dia_sources(diff, DiaConfig(nsigma=self.config.detection_threshold),
                                       static=np.asarray(science.image, dtype=np.float32))
        diff = diff._replace(mask=mask)
        did = (data_ids or {}).get("calexp") or {}
        for k in ("visit", "detector"):
            if k in did:
                dia[k] = np.full(len(dia), int(did[k]), dtype=np.int64)
        summary = dict(summary)
        summary.update({
            "n_dia_sources": int(len(dia)),
            "n_dia_positive": int((~dia.is_negative & ~dia.is_dipole).sum()),
            "n_dia_negative": int(dia.is_negative.sum()),
            "n_dia_dipoles": int(dia.is_dipole.sum()),
            "template_coverage": tpl.metadata.get("template_coverage"),
            "kernel": kernel.to_dict(),
        })
        _note_subtraction(summary, self.config)
        return {"diff": diff, "dia_source": dia, "summary": summary}


def _note_subtraction(summary: dict, config: SubtractConfig) -> None:
    """Degraded-mode notes of one subtraction (kernel order capped by few stamps, partial template)."""
    from procsky.kernels.psfmatch import _min_stamps

    need, n = _min_stamps(config.spatial_order), summary.get("n_stamps_used")
    if n is not None and n < need:
        note_degraded("few_kernel_stamps", f"only {n} of {summary.get('n_stamps')} kernel stamps used (< {need} for "
                      f"spatial_order={config.spatial_order}): kernel spatial order "
                      f"{summary.get('spatial_order_used')}", n_stamps_used=n, spatial_order_used=summary.get("spatial_order_used"))
    res = summary.get("residual_std_sigma")
    if res is not None and summary.get("variance_rescale") == 1.0 and (not np.isfinite(res) or abs(res - 1.0) > 0.5):
        note_degraded("variance_not_rescaled", f"the difference's noise is {res:.2f} x what its variance plane "
                      "predicts, too far from 1 to rescale: detection thresholds are off by that factor",
                      residual_std_sigma=res)
    cov = summary.get("template_coverage")
    if cov is not None and cov < 0.9:
        note_degraded("template_partial_coverage", f"the template covers {100 * cov:.0f} % of the detector: the rest "
                      "of the difference image is NO_DATA", severity="info", coverage=cov)


def _sep(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _patch_centers(repo, templates) -> dict:
    """``{dataset key: (ra, dec)}`` of template patch centres (empty when unknown)."""
    if repo is None or not templates:
        return {}
    try:
        from procsky.skymap import load_skymap
    except ImportError:
        return {}
    out = {}
    maps = {}
    for t in templates:
        name = t.data_id.get("skymap")
        try:
            if name not in maps:
                maps[name] = load_skymap(repo, name)
            p = maps[name].patch(t.data_id["tract"], t.data_id["patch"])
            ny, nx = p.shape
            ra, dec = p.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
            out[t.key] = (float(ra), float(dec))
        except Exception:  # noqa: BLE001 - unknown sky map: keep every template
            return {}
    return out
