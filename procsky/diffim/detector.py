"""One detector's difference as the ``subtract`` task stores it, and its summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from procsky import _dask
from procsky import masks as _masks
from procsky.errors import NoWorkError, ProcskyValueError
from procsky.kernels import psfmatch as _pm

from .dia import DiaConfig, dia_detection_mask
from .lazy import deferred, deferred_exposure
from .subtract import SubtractionConfig, _subtract_now

if TYPE_CHECKING:
    from procsky.psf import PsfModel

__all__ = [
    "warp_template_to_science",
    "difference_image",
    "diffim_summary",
    "with_recorded_summary",
    "note_subtraction",
    "DIFFERENCE_METADATA",
]


def warp_template_to_science(templates, science, *, order: int = 3):
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
    from procsky.coadd import WarpConfig, warp_exposure
    from procsky.exposure import Exposure

    if science.wcs is None:
        raise ProcskyValueError("the science exposure has no WCS; it cannot be matched to a template")
    ny, nx = science.shape
    nodata = np.uint32(_masks.bit("NO_DATA"))
    img = np.zeros((ny, nx), np.float32)
    var = np.zeros((ny, nx), np.float32)
    msk = np.full((ny, nx), nodata, np.uint32)
    filled = np.zeros((ny, nx), bool)
    best: tuple[PsfModel | None, int, bool] = (None, -1, False)
    cfg = WarpConfig(order=order, chunk=max(ny, nx) if max(ny, nx) <= 4096 else 2048)
    for tpl in templates:
        if tpl is None:
            continue
        try:
            w = warp_exposure(tpl, science.wcs_cards, (ny, nx), xy0=(0, 0), config=cfg, full=True)
        except NoWorkError:
            continue
        i, v, m = _dask.evaluate(w.image, w.variance, w.mask)
        ok = ((m & nodata) == 0) & np.isfinite(i) & ~filled
        img[ok], var[ok], msk[ok] = i[ok], v[ok], m[ok]
        filled |= ok
        covers_center = bool(((m & nodata) == 0)[ny // 2, nx // 2])
        score = int(ok.sum())
        if w.psf is not None and ((covers_center and not best[2]) or (covers_center == best[2] and score > best[1])):
            best = (w.psf, score, covers_center)
    if not filled.any():
        raise NoWorkError("no template patch overlaps this detector")
    return Exposure(
        img,
        var,
        msk,
        wcs=science.wcs,
        wcs_cards=science.wcs_cards,
        psf=best[0],
        detector=science.detector,
        xy0=science.xy0,
        metadata={"flux_unit": "nJy", "template_coverage": float(filled.mean())},
    )


#: Metadata keys a detector difference (:func:`difference_image`) adds to the calexp's.
DIFFERENCE_METADATA = ("diffim", "diffim_record")


def difference_image(
    calexp,
    templates,
    config: SubtractionConfig | None = None,
    *,
    detection: DiaConfig | None = None,
    warp_order: int = 3,
    kernel_mask=None,
    lazy: bool = True,
):
    """The difference image of one detector, as the ``subtract`` task stores it.

    The template patches are warped onto the calexp's grid (:func:`warp_template_to_science`),
    subtracted (:func:`subtract_images`) and the DIA detections of both polarities flagged
    in the mask (:func:`dia_detection_mask`, with the calexp as the static sky of the
    registration-noise term, as :func:`detect_dia_sources` is then called on it).
    ``metadata`` gains ``diffim`` (the summary) and ``diffim_record``: JSON text of the
    summary (non-finite values kept, which JSON metadata turns into null), the matching
    kernel (:meth:`MatchingKernel.to_dict`) and the template coverage, from which
    :func:`diffim_summary` is made. Degraded-mode notes (few kernel stamps, variance not
    rescaled, partial template) are made when the difference is computed.

    With ``lazy`` (the default) nothing is computed: the planes are dask arrays and the
    metadata values delayed parts of one graph task (see :func:`procsky.diffim.lazy.deferred`).
    ``kernel_mask`` (boolean, the calexp's shape) leaves pixels out of the kernel fit, as
    in :func:`subtract_images`.
    """
    cfg = config or SubtractionConfig()
    det = detection or DiaConfig()
    if not lazy:
        return _difference_now(calexp, templates, cfg, det, warp_order, kernel_mask)
    result = deferred(_difference_now, calexp, list(templates), cfg, det, warp_order, kernel_mask, name="difference")
    return deferred_exposure(result, calexp, part=lambda r: r, metadata_keys=DIFFERENCE_METADATA)


def _difference_now(calexp, templates, cfg: SubtractionConfig, det: DiaConfig, warp_order: int, kernel_mask=None):
    import json

    science = calexp.compute()
    tpl = warp_template_to_science(templates, science, order=warp_order)
    diff, kernel, summary = _subtract_now(science, tpl, cfg, kernel_mask=kernel_mask)
    # A template coadded from the science visit itself shares its noise: the difference is
    # then quieter than any variance plane of the inputs predicts (the measured rescale of
    # _check_variance corrects the plane; the summary says why it was needed).
    visit = science.visit_info.visit if science.visit_info is not None else None
    tvisits = {v for t in templates for v in ((t.metadata or {}).get("template_visits") or []) if v is not None}
    summary["science_in_template"] = bool(visit is not None and visit in tvisits)
    # the science image is the static sky of the registration-noise term of the score
    mask = dia_detection_mask(diff, det, static=np.asarray(science.image, dtype=np.float32))
    coverage = tpl.metadata.get("template_coverage")
    note_subtraction(summary, cfg.spatial_order, coverage)
    meta = dict(diff.metadata)
    meta["diffim_record"] = json.dumps(
        {"summary": summary, "template_coverage": coverage, "kernel": kernel.to_dict()}, default=_json_value
    )
    return diff._replace(mask=mask, metadata=meta)


def _json_value(obj: Any) -> Any:
    """numpy scalars and arrays, tuples -> JSON values (as the repository's JSON storage)."""
    tolist = getattr(obj, "tolist", None)
    if tolist is not None and getattr(obj, "ndim", 0) > 0:
        return tolist()
    item = getattr(obj, "item", None)
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def note_subtraction(summary: dict, spatial_order: int, template_coverage: float | None = None) -> None:
    """Degraded-mode notes of one subtraction: kernel order capped by few stamps, noise too
    far from the variance plane to rescale, partial template coverage."""
    from procsky.notes import note_degraded

    need, n = _pm._min_stamps(spatial_order), summary.get("n_stamps_used")
    if n is not None and n < need:
        note_degraded(
            "few_kernel_stamps",
            f"only {n} of {summary.get('n_stamps')} kernel stamps used (< {need} for "
            f"spatial_order={spatial_order}): kernel spatial order "
            f"{summary.get('spatial_order_used')}",
            n_stamps_used=n,
            spatial_order_used=summary.get("spatial_order_used"),
        )
    res = summary.get("residual_std_sigma")
    if res is not None and summary.get("variance_rescale") == 1.0 and (not np.isfinite(res) or abs(res - 1.0) > 0.5):
        note_degraded(
            "variance_not_rescaled",
            f"the difference's noise is {res:.2f} x what its variance plane "
            "predicts, too far from 1 to rescale: detection thresholds are off by that factor",
            residual_std_sigma=res,
        )
    cov = template_coverage
    if cov is not None and cov < 0.9:
        note_degraded(
            "template_partial_coverage",
            f"the template covers {100 * cov:.0f} % of the detector: the rest of the difference image is NO_DATA",
            severity="info",
            coverage=cov,
        )


def with_recorded_summary(diff):
    """``diff`` with ``metadata["diffim"]`` as :func:`difference_image` made it (from
    ``diffim_record``: stored JSON metadata turns non-finite values into null, which would
    change what :func:`detect_dia_sources` reads there); ``diff`` itself without a record."""
    import json

    text = (diff.metadata or {}).get("diffim_record")
    if not text:
        return diff
    return diff._replace(metadata={**diff.metadata, "diffim": json.loads(text)["summary"]})


def diffim_summary(diff, dia_sources) -> dict:
    """The per-detector ``diffim_summary`` of a difference made by :func:`difference_image`
    and its DIA sources: the subtraction summary, the DIA source counts, the template
    coverage and the matching kernel."""
    import json

    record = json.loads((diff.metadata or {}).get("diffim_record") or "{}")
    summary = dict(record.get("summary") or {})
    dia = dia_sources
    summary.update(
        {
            "n_dia_sources": int(len(dia)),
            "n_dia_positive": int((~dia.is_negative & ~dia.is_dipole).sum()),
            "n_dia_negative": int(dia.is_negative.sum()),
            "n_dia_dipoles": int(dia.is_dipole.sum()),
            "template_coverage": record.get("template_coverage"),
            "kernel": record.get("kernel"),
        }
    )
    return summary
