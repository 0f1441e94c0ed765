"""Visit-level photometric calibration: one zero point per exposure from all its detectors.

``calibrate`` fits a zero point per detector from the few reference stars a detector
holds (7-20 on a typical simulated detector); with reference-catalogue errors of 5-20 mmag
that zero point scatters by a few mmag around the truth. After flat-fielding the zero
point of an exposure is common to all its detectors (up to known gain differences), so
mature pipelines calibrate per exposure: the DECam Community Pipeline's per-exposure
MAGZERO, DES Y-band/FGCM, LSST's visit-level ``finalizeCharacterization`` / FGCM stage.
:func:`visit_photometric_calibration` does the same: it pools the reference matches that
``calibrate`` stored in each detector's ``src`` (``ref_mag``, ``ref_mag_err``,
``calib_photometry_candidate``; aperture-corrected ``psf_flux``) and fits

    ZP_det = ZP_visit + (h_det - median_det h)

with ``h_det`` the header zero points of the detectors (their relative offsets, e.g. gain
differences of an ISR output in electrons, are kept when every detector has one; all zero
otherwise). ``ZP_visit`` is the clipped median of ``m_ref - m_inst - (h_det - median h)``
over all stars of the visit (``estimator="median"``, default) or a clipped inverse-variance
weighted mean (``estimator="weighted_mean"``). The two agree within their errors on the
simulations (``benchmarks/eval_calibrate_small.py``); the median is the default because it
does not rely on the catalogue's errors.

Per-detector offsets ``median(residuals of the detector's stars)`` and their errors are
reported as a flat-field diagnostic; with ``per_detector_offsets=True`` an offset more
significant than ``offset_nsigma`` is applied to that detector (default off: with a good
flat field the offsets are noise).

The record (the ``visit_photocalib`` dataset, dimensions instrument, visit): see
:func:`visit_photometric_calibration`; :func:`photocalib_for_detector` turns it into the
detector's final :class:`~procsky.photocalib.PhotoCalib` (used by ``warp`` and
``assemble_coadd_direct``). Each detector's aperture correction (already applied to the
``psf_flux`` of ``src``; the calexp pixels are not aperture corrected) is kept unchanged.

**Aperture to total.** ``calibrate`` also corrects ``psf_flux`` from its aperture to the total
flux with the growth curve of the detector's bright stars (``aperture_to_total`` in its
summary, :mod:`procsky.kernels.growth`). On one detector that factor rests on a few bright
stars whose wings beyond the aperture are measured to ~1 % each against the sky noise, so
per detector it scatters by a few tenths of a per cent. The PSF wings vary slowly over the
focal plane, so the visit uses one factor, the clipped inverse-variance weighted mean of the
detectors' factors (``aperture_to_total``; ``use_visit_aperture_to_total``), in place of each
detector's own before the zero point is fitted. The zero point is then that of the total
flux, the calexp pixels' calibration (without it, a PSF with extended wings biases the
visit zero point by several mmag).

The task ``visit_photometry`` (:mod:`procsky.tasks.photometry`) reads the ``src`` of every
detector of a visit and calls :func:`visit_photometric_calibration`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
import pydantic

from procsky.errors import NoWorkError
from procsky.notes import note_degraded
from procsky.photocalib import AB_NJY_ZP, PhotoCalib

__all__ = [
    "VisitPhotometryConfig",
    "apply_visit_photocalib",
    "photocalib_for_detector",
    "visit_photometric_calibration",
]


class VisitPhotometryConfig(pydantic.BaseModel):
    """Settings of :func:`visit_photometric_calibration`."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    estimator: Literal["median", "weighted_mean"] = "median"
    """Visit zero point: clipped median of the pooled ``m_ref - m_inst`` (default), or a clipped
    inverse-variance weighted mean (errors: reference and PSF-flux errors in quadrature,
    scaled by the reduced chi^2)."""
    nsigma: float = pydantic.Field(3.0, gt=0)
    """Clipping half-width (MAD sigmas for the median; error units for the weighted mean)."""
    min_stars: int = pydantic.Field(5, ge=1)
    """Fewer usable stars in the whole visit: NoWorkError (the warps then keep each calexp's own
    PhotoCalib)."""
    use_header_offsets: bool = True
    """Keep the detector-to-detector differences of the header (input) zero points when every
    detector has one (gain differences of an ISR output in electrons); otherwise assume one
    zero point for all detectors."""
    per_detector_offsets: bool = False
    """Apply a detector's offset from the visit zero point when it is significant."""
    offset_nsigma: float = pydantic.Field(3.0, gt=0)
    """Significance (offset / its error) above which an offset is applied."""
    offset_min_stars: int = pydantic.Field(5, ge=2)
    """Detectors with fewer stars never get their own offset."""
    use_visit_aperture_to_total: bool = True
    """Replace each detector's aperture-to-total factor (calibrate summary ``aperture_to_total``,
    already in its ``psf_flux``) by the visit's weighted mean before fitting the zero point."""


def _clipped_median(d: np.ndarray, nsigma: float, max_iter: int = 10):
    """(median, error of the median, used mask) with MAD-sigma clipping.

    The same estimator as calibrate's per-detector zero point
    (:func:`procsky.kernels.astrometry.photometric_zero_point`), on differences ``d``.
    """
    from procsky.kernels.astrometry import photometric_zero_point

    zp, err, _, used = photometric_zero_point(d, np.zeros_like(d), nsigma=nsigma, max_iter=max_iter)
    return zp, err, used


def _clipped_weighted_mean(d: np.ndarray, e: np.ndarray, nsigma: float, max_iter: int = 10):
    """(mean, error, used mask): inverse-variance weighted mean, clipping points beyond
    ``nsigma`` of their error times sqrt(reduced chi^2); starts from the median (robust start)."""
    used = np.isfinite(d) & np.isfinite(e) & (e > 0)
    centre = float(np.median(d[used]))
    scale = 1.0
    # first pass: clip around the median with MAD-scaled errors so that one outlier cannot
    # drag the first mean
    r = (d - centre) / e
    mad = 1.4826 * float(np.median(np.abs(r[used])))
    if mad > 0:
        used &= np.abs(r) <= nsigma * max(mad, 1.0)
    mean = centre
    for _ in range(max_iter):
        w = 1.0 / e[used] ** 2
        mean = float(np.sum(w * d[used]) / np.sum(w))
        chi2 = float(np.sum(w * (d[used] - mean) ** 2) / max(used.sum() - 1, 1))
        scale = math.sqrt(max(chi2, 1.0))
        new = np.isfinite(d) & np.isfinite(e) & (e > 0) & (np.abs(d - mean) <= nsigma * e * scale)
        if new.sum() == 0 or (new == used).all():
            break
        used = new
    w = 1.0 / e[used] ** 2
    return mean, scale / math.sqrt(float(np.sum(w))), used


def _star_table(src: pd.DataFrame, detector: int, summary: dict | None) -> tuple[pd.DataFrame, dict]:
    """Usable reference stars of one detector: ``m_ref - m_inst`` (instrumental magnitudes in the
    calexp's counts) and its error, plus the detector's calibrate record."""
    meta = dict(src.attrs.get("meta", {}) or {})
    summary = summary or {}
    zp_det = meta.get("zero_point", summary.get("zero_point"))
    info = {
        "detector_zero_point": float(zp_det) if zp_det is not None else float("nan"),
        "detector_zero_point_err": float(meta.get("zero_point_err", summary.get("zero_point_err", float("nan")))),
        "header_zero_point": float(meta.get("header_zero_point", summary.get("header_zero_point", float("nan")))),
        "apcorr": float(summary.get("apcorr", float("nan"))),
        "aperture_to_total": float(summary.get("aperture_to_total", 1.0)),
        "aperture_to_total_err": float(summary.get("aperture_to_total_err", float("nan"))),
        "photometry_status": meta.get("photometry_status", summary.get("photometry_status", "")),
    }
    need = {"ref_mag", "ref_mag_err", "calib_photometry_candidate", "psf_flux", "psf_flux_err"}
    if zp_det is None or not np.isfinite(info["detector_zero_point"]) or not need <= set(src.columns):
        return pd.DataFrame(columns=["detector", "d", "err"]), info
    sel = src["calib_photometry_candidate"].to_numpy(bool)
    f = src["psf_flux"].to_numpy(float)[sel]
    fe = src["psf_flux_err"].to_numpy(float)[sel]
    ref = src["ref_mag"].to_numpy(float)[sel]
    ref_err = src["ref_mag_err"].to_numpy(float)[sel]
    with np.errstate(divide="ignore", invalid="ignore"):
        # psf_flux [nJy] = counts * calibration(zp_det): m_inst = -2.5 log10(counts)
        m_inst = -2.5 * np.log10(f) + (AB_NJY_ZP - info["detector_zero_point"])
        inst_err = 2.5 / math.log(10.0) * fe / f
    d = ref - m_inst
    err = np.hypot(np.where(np.isfinite(ref_err), ref_err, np.nan), inst_err)
    ok = np.isfinite(d) & np.isfinite(err) & (f > 0)
    return pd.DataFrame({"detector": detector, "d": d[ok], "err": err[ok]}), info


def visit_photometric_calibration(
    srcs, detectors, summaries=None, config: VisitPhotometryConfig | None = None, *, visit=None
) -> dict:
    """One photometric zero point for a visit from the ``src`` catalogues of its detectors.

    Parameters
    ----------
    srcs : list of pandas.DataFrame
        ``src`` of each detector (from ``calibrate``: ``ref_mag``, ``ref_mag_err``,
        ``calib_photometry_candidate``, aperture-corrected ``psf_flux`` in nJy, and
        ``attrs["meta"]["zero_point"]``, the detector zero point that made those nJy).
    detectors : list of int
        Detector ids, in the order of ``srcs``.
    summaries : list of dict, optional
        ``calibrate_summary`` of each detector (same order; fallback for the zero points,
        and the aperture corrections are recorded).
    config : VisitPhotometryConfig, optional
    visit : int, optional
        Recorded in the output.

    Returns
    -------
    dict
        JSON-able record (the ``visit_photocalib`` dataset): ``zero_point`` (mag of one count;
        of a detector at the median header zero point when header offsets are used, else of
        every detector), ``zero_point_err``, ``n_stars``, ``scatter`` (MAD sigma of the pooled
        residuals, mag), ``estimator``, ``status``, and ``detectors``: detector id (str) ->
        ``{calibration, calibration_err, zero_point, zero_point_err, offset, offset_err,
        n_stars, offset_applied, header_offset, detector_zero_point, apcorr, ...}`` where
        ``calibration`` (nJy per count) is the final PhotoCalib of that detector and
        ``offset`` is the median residual of its stars from the visit solution (mag).

    Raises
    ------
    NoWorkError
        Fewer than ``config.min_stars`` usable reference stars in the visit.
    """
    config = config or VisitPhotometryConfig()
    summaries = list(summaries) if summaries else [None] * len(srcs)
    if len(summaries) != len(srcs):
        summaries = [None] * len(srcs)
    tables, infos = [], {}
    for src, det, summ in zip(srcs, detectors, summaries):
        if src is None:
            continue
        t, info = _star_table(src, int(det), summ)
        tables.append(t)
        infos[int(det)] = info
    if not infos:
        raise NoWorkError("no src catalogue for this visit")
    stars = pd.concat(tables, ignore_index=True)
    # one aperture-to-total factor for the visit in place of each detector's noisy own
    gc_dets = np.array([infos[k]["aperture_to_total"] for k in infos])
    gc_errs = np.array([infos[k]["aperture_to_total_err"] for k in infos])
    gc_ok = np.isfinite(gc_dets) & np.isfinite(gc_errs) & (gc_errs > 0)
    gc_visit, gc_visit_err, gc_n = 1.0, float("nan"), 0
    if config.use_visit_aperture_to_total and gc_ok.any():
        g, ge, gu = _clipped_weighted_mean(gc_dets[gc_ok], gc_errs[gc_ok], config.nsigma)
        if np.isfinite(g) and g > 0:
            gc_visit, gc_visit_err, gc_n = float(g), float(ge), int(gu.sum())
    if config.use_visit_aperture_to_total and gc_n == 0:
        note_degraded(
            "visit_aperture_to_total_unavailable",
            f"no usable aperture-to-total factor on the {len(infos)} detector(s): each keeps its own",
            severity="info",
        )
    gc_shift = {}
    for k, info_k in infos.items():
        gk = info_k["aperture_to_total"]
        use_k = config.use_visit_aperture_to_total and gc_n > 0 and np.isfinite(gk) and gk > 0
        # m_inst of the detector's counts (which carry its own factor) -> with the visit factor
        gc_shift[k] = 2.5 * math.log10(gc_visit / gk) if use_k else 0.0
        info_k["aperture_to_total_applied"] = gc_visit if use_k else gk
    if len(stars):
        stars["d"] = stars["d"].to_numpy(float) + np.array([gc_shift[k] for k in stars["detector"].to_numpy(int)])
    heads = np.array([infos[k]["header_zero_point"] for k in infos])
    use_head = config.use_header_offsets and np.isfinite(heads).all()
    h_ref = float(np.median(heads)) if use_head else 0.0
    head_off = {k: (infos[k]["header_zero_point"] - h_ref if use_head else 0.0) for k in infos}
    if len(stars) < config.min_stars:
        raise NoWorkError(
            f"only {len(stars)} usable reference stars in the visit (< min_stars={config.min_stars}); "
            "the detectors keep their own zero points"
        )
    det_of = stars["detector"].to_numpy(int)
    d = stars["d"].to_numpy(float) - np.array([head_off[k] for k in det_of])
    e = stars["err"].to_numpy(float)
    if config.estimator == "median":
        zp, zp_err, used = _clipped_median(d, config.nsigma)
    else:
        zp, zp_err, used = _clipped_weighted_mean(d, e, config.nsigma)
    if int(used.sum()) < config.min_stars:
        raise NoWorkError(f"only {int(used.sum())} reference stars survive clipping (< min_stars={config.min_stars})")
    resid = d - zp
    # reported scatter: MAD sigma of the used stars' residuals (mag), whatever the estimator
    scatter = 1.4826 * float(np.median(np.abs(resid[used])))
    dets = {}
    for k, info in infos.items():
        mine = det_of == k
        r = resid[mine]
        n = int(np.isfinite(r).sum())
        off = off_err = float("nan")
        k_used = 0
        if n >= 2:
            off, off_err, u = _clipped_median(r, config.nsigma)
            k_used = int(u.sum())
        elif n == 1:
            off = float(r[np.isfinite(r)][0])
        # the error of a detector offset cannot be smaller than the visit scatter allows
        if n >= 2 and scatter > 0:
            off_err = max(off_err, 1.2533 * scatter / math.sqrt(max(k_used, 1)))
        applied = bool(
            config.per_detector_offsets
            and k_used >= config.offset_min_stars
            and np.isfinite(off)
            and np.isfinite(off_err)
            and off_err > 0
            and abs(off) > config.offset_nsigma * off_err
        )
        zp_k = zp + head_off[k] + (off if applied else 0.0)
        zp_k_err = math.hypot(zp_err, off_err) if applied else zp_err
        pc = PhotoCalib.from_zero_point(zp_k, zp_k_err)
        dets[str(k)] = {
            "calibration": pc.calibration,
            "calibration_err": pc.calibration_err,
            "zero_point": zp_k,
            "zero_point_err": zp_k_err,
            "offset": off,
            "offset_err": off_err,
            "offset_applied": applied,
            "n_stars": n,
            "n_used": int(used[mine].sum()),
            "header_offset": head_off[k],
            **info,
        }
    n_used = int(used.sum())
    return {
        "visit": None if visit is None else int(visit),
        "zero_point": zp,
        "zero_point_err": zp_err,
        "n_stars": n_used,
        "n_candidates": len(stars),
        "n_detectors": sum(1 for v in dets.values() if v["n_stars"] > 0),
        "scatter": scatter,
        "estimator": config.estimator,
        "header_offsets_used": bool(use_head),
        "aperture_to_total": gc_visit,
        "aperture_to_total_err": gc_visit_err,
        "aperture_to_total_n_detectors": gc_n,
        "status": (
            f"visit zero point from {n_used} reference stars on "
            f"{sum(1 for v in dets.values() if v['n_used'] > 0)} detectors ({config.estimator})"
        ),
        "detectors": dets,
    }


def photocalib_for_detector(record: dict | None, detector) -> PhotoCalib | None:
    """The final PhotoCalib of ``detector`` from a ``visit_photocalib`` record (None if absent)."""
    if not record:
        return None
    entry = (record.get("detectors") or {}).get(str(int(detector))) if detector is not None else None
    if entry is None:
        # a detector without src (calibrate failed or had no work) still shares the visit zero point
        # only when no header offsets are in play
        if record.get("header_offsets_used") or record.get("zero_point") is None:
            return None
        return PhotoCalib.from_zero_point(float(record["zero_point"]), float(record.get("zero_point_err", 0.0)))
    return PhotoCalib(float(entry["calibration"]), float(entry.get("calibration_err", 0.0)))


def apply_visit_photocalib(calexps, records, data_ids=None):
    """Calexps whose PhotoCalib is replaced by the visit-level one of their detector.

    Parameters
    ----------
    calexps : list of Exposure
    records : dict, list of dict, or None
        ``visit_photocalib`` record(s) (one per visit); None: calexps returned unchanged.
    data_ids : list of dict, optional
        Data IDs of ``calexps`` (their ``visit`` and ``detector``); by default read from each
        calexp's ``visit_info`` and ``detector``.

    Returns
    -------
    list of Exposure
        Shallow copies (planes shared) with ``photocalib`` replaced where the record has the
        detector, and ``metadata["photocalib"]`` saying which calibration was used.
    """
    if not records:
        note_degraded(
            "no_visit_photocalib",
            f"no visit_photocalib (visit_photometry had no work or did not run): "
            f"the {len(calexps)} calexp(s) keep their own detector zero points",
        )
        return list(calexps)
    if isinstance(records, dict):
        records = [records]
    by_visit = {r.get("visit"): r for r in records if r}
    out = []
    for i, c in enumerate(calexps):
        did = data_ids[i] if data_ids is not None and i < len(data_ids) and data_ids[i] else {}
        visit = did.get("visit", c.visit_info.visit if c.visit_info is not None else None)
        det = did.get("detector", (c.detector or {}).get("id"))
        rec = by_visit.get(visit) or (records[0] if len(records) == 1 and records[0].get("visit") is None else None)
        pc = photocalib_for_detector(rec, det)
        if pc is None:
            note_degraded(
                "detector_zero_point_kept",
                f"visit {visit} detector {det} has no visit-level zero point: its calexp keeps its own",
                visit=visit,
                detector=det,
            )
            out.append(c)
            continue
        meta = dict(c.metadata)
        meta["photocalib"] = {
            "source": "visit_photocalib",
            "zero_point": pc.zero_point,
            "zero_point_err": pc.zero_point_err,
            "calexp_zero_point": None if c.photocalib is None else c.photocalib.zero_point,
        }
        out.append(c._replace(photocalib=pc, metadata=meta))
    return out
