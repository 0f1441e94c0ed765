"""Detection on the coadds of a patch: per band and multiband, merged footprints and peaks.

The steps follow LSST's ``detectCoaddSources`` + ``mergeCoaddDetections``:

1. **Per band**: the coadd is filtered with its own PSF (``psf.kernel`` at the image centre;
   :func:`procsky.kernels.coadd_detection.matched_filter`), giving the significance
   ``nu_b`` the variance plane predicts.
2. **Measured noise**: the variance plane of a coadd is often wrong for the filtered image
   (resampling correlates the noise of the warps, so the per-pixel variance understates the
   noise of a sum over the PSF). The threshold is therefore set in units of the measured
   robust standard deviation of ``nu_b`` away from its footprints (LSST's
   ``thresholdType="pixel_stdev"``); ``noise_scale[b]`` records that standard deviation, i.e.
   measured noise / variance-plane noise of the filtered image.
3. **Multiband image**: ``nu_det = sum_b w_b z_b / sqrt(sum_b w_b^2)`` with ``z_b`` each
   band's significance in units of its measured noise: the S/N-weighted sum, which for a
   source of equal significance in every band is the optimal linear combination and whose
   noise stays Gaussian with unit variance, so "5 sigma" means the same as in one band. The
   chi^2 image of Szalay, Connolly & Szokoly (1999, AJ 117, 68), ``sum z_b^2``, has chi^2
   statistics with B degrees of freedom (a non-Gaussian tail whose threshold depends on the
   number of bands), responds to negative noise as much as to sources and gains a noise
   term per band without signal; its strength - sources bright in one band only - is
   covered here by the per-band detections, which are merged with the multiband ones.
4. **Sky objects** (LSST ``SkyObjectsTask`` and ``DynamicDetectionTask``): random positions
   farther than ``sky_radius`` from every positive or negative footprint, NO_DATA/BAD pixel
   and the coadd's edge, and from each other. Their PSF fluxes (unweighted PSF fit at the
   pixel, from the matched-filter planes) and errors (the variance plane's, times
   ``noise_scale``) must scatter with a pull standard deviation of 1; if the clipped pull
   std exceeds 1 by more than ``sky_pull_tolerance`` (and by more than 3 times its own
   statistical error), the threshold of that image is multiplied by it, the footprints are
   made again, and a note is made. A pull std below 1 is only noted: the pixel statistics
   include the light of undetected sources, which the sky objects avoid (on the simulated
   scenes the pixel noise of the filtered image is 1-4 % above the true 1), and lowering
   the threshold for it would add false detections.
5. **Merge** (LSST ``mergeCoaddDetections``): the union of all images' grown footprints,
   relabelled, gives the parents. Peaks are taken per image (persistence watershed of
   :func:`procsky.kernels.detection.deblend_footprints` on two peak-finding significance
   images: one smoothed with half the PSF sigma, and one filtered with the PSF lowered to
   zero mean within 1 FWHM - DAOFIND's kernel, Stetson 1987 - which fits a point source and
   a local constant together, so that a companion on a brighter neighbour's wing, a
   shoulder in any smoothed image, has a maximum of its own) and merged in priority
   order (bands in the given or configured order, the multiband image last): a peak closer
   than ``peak_same_radius`` to an existing one only sets ``detected_<image>`` on it; one
   farther than ``peak_merge_radius`` from every existing peak is new; one in between is
   dropped (LSST's ``maxSamePeak`` = 0.3" and ``minNewPeak`` = 1").

Public API: :class:`CoaddDetectionConfig`, :func:`detect_objects`, :class:`CoaddDetections`.
Positions are 0-based array coordinates of the coadd arrays (pixel centres at integers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pydantic
from scipy.spatial import cKDTree

from procsky.errors import ProcskyValueError
from procsky.exposure import Exposure
from procsky.kernels.coadd_detection import (
    clipped_std,
    enclosed_holes,
    label_argmax,
    lowered_kernel,
    matched_filters,
    place_separated,
    refine_peaks,
    robust_noise,
)
from procsky.kernels.detection import (
    any_bits,
    deblend_footprints,
    footprint_bboxes,
    grow_mask,
    label_components,
    relabel,
    significance_image,
)
from procsky.notes import note_degraded

__all__ = ["CoaddDetectionConfig", "CoaddDetections", "detect_objects", "MULTIBAND"]

#: Name of the combined multiband detection image in ``noise_scale``, ``sky_stats`` and the
#: ``detected_multiband`` / ``significance_multiband`` peak columns.
MULTIBAND = "multiband"


class CoaddDetectionConfig(pydantic.BaseModel):
    """How objects are detected on the coadds of a patch.

    Attributes
    ----------
    threshold : float, sigma
        Detection threshold in units of the measured noise of each detection image.
    threshold_type : {"measured", "variance"}
        ``"measured"``: the noise of each significance image is measured from its pixels
        (and checked with sky objects); ``"variance"``: the variance plane is trusted
        (``nu > threshold``; sky objects are measured and reported, nothing is rescaled).
    min_pixels : int
        Minimum number of above-threshold pixels of a footprint (before growing).
    grow : float, PSF sigmas
        Footprints are grown by ``grow * sigma_psf`` pixels (LSST ``nSigmaToGrow`` 2.4).
    multiband : bool
        Also detect on the combined multiband image.
    multiband_weights : dict of band to float, optional
        Weights ``w_b`` of the per-band unit-noise significance images; equal by default.
    priority : tuple of str, optional
        Order in which the bands' peaks are merged (LSST ``priorityList``); bands not
        listed follow in the given order. Default: the order of the ``coadds`` mapping.
    peak_merge_radius : float, arcsec
        A peak is new only if farther than this from every existing peak (``minNewPeak``).
    peak_same_radius : float, arcsec
        A peak closer than this to an existing peak flags it as detected in its image
        (``maxSamePeak``).
    deblend_sigma_factor : float
        Peaks are found on a significance image smoothed with a Gaussian of this many PSF
        sigmas (the full matched filter turns a companion within ~1 FWHM into a shoulder).
    peak_filter : {"gaussian", "lowered_psf", "both"}
        Peak-finding images: the Gaussian-smoothed one, the lowered-PSF one (a peak of it
        other than a footprint's highest must itself reach ``threshold`` there), or both
        (the lowered one's peaks added beyond half a FWHM of the Gaussian one's). Against
        ``make_coadd_scene`` truth (10 seeds), "both" finds both peaks of 5/30, 17/24 and
        38/45 pairs at 1-1.5, 1.5-2 and 2-3 FWHM ("gaussian": 1/30, 4/24, 28/45), 921/981
        objects of S/N >= 10 (867/981), no extra peak in either; on the demo's coadd 669/692
        (658/692) with the same 8 peaks off every truth object.
    peak_filter_radius : float, PSF FWHM
        Radius of the lowered PSF.
    peak_contrast : float, sigma
        A peak survives next to a brighter one only if it rises this much above the saddle.
    peak_false_rate : float
        Look-elsewhere correction of ``peak_contrast`` in large footprints (see
        :func:`procsky.kernels.detection.deblend_footprints`); 0 (off) by default: it guards
        single frames against trails, which a coadd rejects, and costs close pairs their
        second peak. Against ``make_coadd_scene`` truth (10 seeds) contrast 3 without it
        finds 750/756 resolvable S/N >= 10 objects (4 / 0.03: 742/756) and both peaks of
        28/45 pairs at 2-3 FWHM (22/45), with no extra peak in either case; on the demo's
        coadd 658/692 (646/692) with the same 8 peaks off every truth object.
    bad_mask_planes : tuple of str
        Pixels carrying no signal.
    edge_margin : float, pixels, optional
        Peaks closer than this to the array edge are dropped, and sky objects are kept at
        least this far (and ``sky_radius``) from it; default 3 PSF sigmas; 0 keeps them.
    n_sky_objects : int
        Number of sky objects wanted (LSST's dynamic detection uses 1000 per patch).
    sky_radius : float, arcsec
        Minimum distance of a sky object from footprints, bad pixels, the edge and other
        sky objects.
    min_sky_objects : int
        With fewer sky objects, no rescaling (a note says so).
    sky_pull_tolerance : float
        Relative excess of the sky objects' pull std over 1 that rescales the threshold.
    noise_warn_factor : float
        ``noise_scale`` outside ``[1/f, f]`` makes a note (the variance plane is far off).
    seed : int
        Seed of the sky-object positions.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    threshold: float = pydantic.Field(5.0, gt=0)
    threshold_type: Literal["measured", "variance"] = "measured"
    min_pixels: int = pydantic.Field(5, ge=1)
    grow: float = pydantic.Field(2.4, ge=0)
    multiband: bool = True
    multiband_weights: dict[str, float] | None = None
    priority: tuple[str, ...] | None = None
    peak_merge_radius: float = pydantic.Field(1.0, ge=0)
    peak_same_radius: float = pydantic.Field(0.3, ge=0)
    deblend_sigma_factor: float = pydantic.Field(0.5, gt=0)
    peak_filter: Literal["gaussian", "lowered_psf", "both"] = "both"
    peak_filter_radius: float = pydantic.Field(1.0, gt=0)
    peak_contrast: float = pydantic.Field(3.0, ge=0)
    peak_false_rate: float = pydantic.Field(0.0, ge=0)
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD")
    edge_margin: float | None = pydantic.Field(None, ge=0)
    n_sky_objects: int = pydantic.Field(1000, ge=0)
    sky_radius: float = pydantic.Field(1.6, gt=0)
    min_sky_objects: int = pydantic.Field(100, ge=3)
    sky_pull_tolerance: float = pydantic.Field(0.05, ge=0)
    noise_warn_factor: float = pydantic.Field(1.5, ge=1)
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _radii(self):
        if self.peak_same_radius > self.peak_merge_radius:
            raise ValueError(
                f"peak_same_radius ({self.peak_same_radius}) must not exceed peak_merge_radius "
                f"({self.peak_merge_radius}) arcsec"
            )
        return self


@dataclass
class CoaddDetections:
    """Merged detections of a patch (see :mod:`procsky.objects.detection`).

    Attributes
    ----------
    bands : list of str
    labels : ndarray (H, W) int32
        0 outside footprints, k = ``parent_id`` of the merged footprint.
    parents : DataFrame
        ``parent_id`` (1..n), ``x0``, ``y0``, ``x1``, ``y1`` (bbox, half-open, array px),
        ``area`` (px), ``n_peaks``.
    peaks : DataFrame
        ``peak_id`` (1..), ``parent_id``, ``x``, ``y`` (float px), ``significance`` (in the
        image that created the peak, measured-noise sigma), ``origin`` (that image's name),
        ``detected_<band>`` and ``detected_multiband`` (bool), ``significance_<band>`` and
        ``significance_multiband`` (matched-filter significance at the peak pixel, sigma).
    sky_objects : DataFrame
        ``sky_id``, ``x``, ``y`` (px), ``<band>_flux``, ``<band>_flux_err`` (nJy; PSF flux and
        its error from the variance plane times ``noise_scale``), ``multiband_significance``.
    noise_scale : dict
        Image name (band or ``"multiband"``) -> measured noise / variance-plane noise of the
        filtered image, times the sky objects' excess pull width where it raised the threshold
        (the factor flux errors of that image need).
    notes : list of dict
        The notes made (also sent to :func:`procsky.notes.note_degraded`).
    sky_stats : DataFrame
        Per image: ``image``, ``n_sky``, ``pull_mean``, ``pull_std`` (with the measured-noise
        errors), ``pull_std_variance`` (with the variance plane's errors),
        ``threshold_factor`` (1 unless rescaled), ``noise_offset`` (median significance away
        from sources, subtracted), ``threshold`` (applied to ``nu``, variance-plane sigma).
    """

    bands: list[str]
    labels: np.ndarray
    parents: pd.DataFrame
    peaks: pd.DataFrame
    sky_objects: pd.DataFrame
    noise_scale: dict
    notes: list = field(default_factory=list)
    sky_stats: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class _Image:
    """One detection image's working planes."""

    name: str
    nu: np.ndarray  # matched-filter significance, variance-plane units
    peak_maps: dict  # peak-finding filter kind -> its significance (variance-plane units, then unit noise)
    psf_sigma: float
    offset: float = 0.0
    scale: float = 1.0
    factor: float = 1.0
    den: np.ndarray | None = None
    k2: float = 1.0
    bad: np.ndarray | None = None  # pixels without signal in this image (bool)
    footprints: np.ndarray | None = None  # grown positive footprints (bool), enclosed holes filled
    holes: np.ndarray | None = None  # bad-pixel holes enclosed by the footprints (bool)
    negative: np.ndarray | None = None  # grown negative footprints (bool)

    def z(self) -> np.ndarray:
        """Significance in units of the measured noise."""
        return (self.nu - np.float32(self.offset)) / np.float32(self.scale)

    def threshold(self, cfg) -> float:
        """Threshold on ``nu``."""
        return self.offset + cfg.threshold * self.scale * self.factor


def _psf_sigma(kernel: np.ndarray) -> float:
    k = np.asarray(kernel, float)
    k = k / k.sum()
    ny, nx = k.shape
    yy, xx = np.mgrid[:ny, :nx]
    mx, my = (k * xx).sum(), (k * yy).sum()
    ixx = (k * (xx - mx) ** 2).sum()
    iyy = (k * (yy - my) ** 2).sum()
    ixy = (k * (xx - mx) * (yy - my)).sum()
    det = ixx * iyy - ixy * ixy
    return float(det**0.25) if det > 0 else 1.0


def _above(nu, thr, min_pixels, grow, bad):
    """Grown footprints of ``nu > thr`` components with at least ``min_pixels`` pixels."""
    above = (nu > np.float32(thr)) & ~bad
    if min_pixels > 1 and above.any():
        lab, n = label_components(above)
        area = np.bincount(lab.ravel(), minlength=n + 1)
        keep = area >= min_pixels
        keep[0] = False
        above = keep[lab]
    return grow_mask(above, float(grow)) if grow > 0 else above


def _make_footprints(im: _Image, cfg) -> None:
    """Grown footprints of one image, with the bad-pixel holes they enclose (the masked core of
    a saturated star) filled in and kept in ``im.holes``."""
    g = cfg.grow * im.psf_sigma
    bad = im.bad
    fp = _above(im.nu, im.threshold(cfg), cfg.min_pixels, g, bad)
    holes = np.zeros(fp.shape, bool)
    if bad is not None and bad.any() and fp.any():
        blab, nb = label_components(bad)
        enc = enclosed_holes(blab, nb, fp)
        if enc.any():
            holes = enc[blab]
            fp |= holes
    im.footprints, im.holes = fp, holes


def _note(notes, code, message, severity="warning", **details):
    notes.append(note_degraded(code, message, severity=severity, **details))


def _measure_noise(im: _Image, bad, cfg, notes):
    if cfg.threshold_type == "variance":
        im.offset, im.scale = 0.0, 1.0
        return
    grow = cfg.grow * im.psf_sigma
    med, std, n = robust_noise(im.nu, bad, clip=cfg.threshold, grow=grow)
    if not np.isfinite(std):
        _note(
            notes,
            "coadd_noise_unmeasured",
            f"{im.name}: only {n} source-free pixels with noise: the variance plane's noise is used",
            image=im.name,
            n_pixels=n,
        )
        med, std = 0.0, 1.0
    im.offset, im.scale = med, std
    src = np.abs(im.nu - np.float32(med)) > np.float32(cfg.threshold * std)
    if grow > 0:
        src = grow_mask(src, float(grow))
    for m in im.peak_maps.values():
        dmed, dstd, _ = robust_noise(m, bad, exclude=src)
        if np.isfinite(dstd):
            m -= np.float32(dmed)
            m /= np.float32(dstd)
            m[bad] = 0.0


def detect_objects(coadds: Mapping[str, Exposure], config: CoaddDetectionConfig | None = None) -> CoaddDetections:
    """Detect objects on the coadds of one patch (all bands on one pixel grid).

    Parameters
    ----------
    coadds : mapping of band to Exposure
        Background-subtracted coadds in nJy per pixel with variance, mask and PSF.
    config : CoaddDetectionConfig, optional

    Returns
    -------
    CoaddDetections
    """
    cfg = config if config is not None else CoaddDetectionConfig()
    bands = [str(b) for b in coadds]
    if not bands:
        raise ProcskyValueError("detect_objects needs at least one band's coadd, got an empty mapping")
    if MULTIBAND in bands:
        raise ProcskyValueError(f"a band may not be called {MULTIBAND!r} (the combined detection image's name)")
    shape = None
    for b in bands:
        exp = coadds[b]
        if exp.psf is None:
            raise ProcskyValueError(f"coadd of band {b!r} has no PSF; detection filters each band with its PSF")
        if shape is None:
            shape = exp.shape
        elif exp.shape != shape:
            raise ProcskyValueError(f"coadds must share one pixel grid: band {b!r} has shape {exp.shape}, not {shape}")
    assert shape is not None
    ny, nx = shape
    ref = coadds[bands[0]]
    if ref.wcs is None:
        raise ProcskyValueError(f"coadd of band {bands[0]!r} has no WCS; peak radii and sky radius are in arcsec")
    from procsky.wcs import pixel_scale

    scale_arcsec = pixel_scale(ref.wcs, (nx - 1) / 2.0, (ny - 1) / 2.0)
    notes: list = []

    # ---- per-band matched filter and noise
    images: list[_Image] = []
    bad_any = np.zeros(shape, bool)
    bad_all = np.ones(shape, bool)
    for b in bands:
        exp = coadds[b]
        img = np.asarray(exp.image)
        var = np.asarray(exp.variance)
        mask = np.asarray(exp.mask)
        names = [p for p in cfg.bad_mask_planes if p in exp.mask_planes]
        bits = exp.mask_bits(*names) if names else 0
        bad = any_bits(mask, bits) if bits else np.zeros(shape, bool)
        bad |= ~np.isfinite(img) | ~np.isfinite(var) | ~(var > 0)
        psf = exp.psf
        assert psf is not None
        # PSF models are addressed in the coadd's tract pixels: the centre of the array is at xy0 + centre.
        kernel = np.asarray(psf.kernel(exp.xy0[0] + (nx - 1) / 2.0, exp.xy0[1] + (ny - 1) / 2.0), float)
        if not (np.all(np.isfinite(kernel)) and kernel.sum() > 0):
            raise ProcskyValueError(f"the PSF kernel of band {b!r} at the coadd's centre has no positive finite sum")
        sig = _psf_sigma(kernel)
        kernel = kernel / kernel.sum()
        filters = [kernel]
        if cfg.peak_filter in ("lowered_psf", "both"):
            filters.append(lowered_kernel(kernel, cfg.peak_filter_radius * 2.3548 * sig))
        res = matched_filters(img, var, bad, filters, normalise=False)
        nu, _, den, k2 = res[0]  # the numerator is nu sqrt(den)
        maps = {}
        if cfg.peak_filter in ("gaussian", "both"):
            s_db = max(0.3, cfg.deblend_sigma_factor * sig)
            maps["gaussian"] = significance_image(np.where(bad, 0, img), np.where(bad, 0, var), sigma=s_db, bad=bad)
        if len(res) > 1:
            maps["lowered_psf"] = res[1][0]
        del res
        for m in maps.values():
            m[bad] = 0.0  # as nu: no peak on a pixel without data
        im = _Image(b, nu, maps, sig, den=den, k2=k2, bad=bad)
        _measure_noise(im, bad, cfg, notes)
        images.append(im)
        bad_any |= bad
        bad_all &= bad
    bad = bad_any  # pixels without signal in some band: no peaks, no sky objects there
    if cfg.multiband and len(bands) > 1:
        w = {b: 1.0 for b in bands}
        if cfg.multiband_weights:
            unknown = set(cfg.multiband_weights) - set(bands)
            if unknown:
                raise ProcskyValueError(f"multiband_weights names bands {sorted(unknown)} not among {bands}")
            w.update({b: float(v) for b, v in cfg.multiband_weights.items()})
        norm = np.float32(1.0 / math.sqrt(sum(v * v for v in w.values())))
        nu_mb = np.zeros(shape, np.float32)
        maps_mb = {kind: np.zeros(shape, np.float32) for kind in images[0].peak_maps}
        for im in images:
            wb = np.float32(w[im.name])
            nu_mb += wb * im.z()
            for kind, m in im.peak_maps.items():
                maps_mb[kind] += wb * m
        nu_mb *= norm
        nu_mb[bad] = 0.0
        for m in maps_mb.values():
            m *= norm
            m[bad] = 0.0
        mb = _Image(MULTIBAND, nu_mb, maps_mb, max(im.psf_sigma for im in images), bad=bad)
        _measure_noise(mb, bad, cfg, notes)
        images.append(mb)

    # ---- footprints (positive and negative), sky objects
    for im in images:
        g = cfg.grow * im.psf_sigma
        _make_footprints(im, cfg)
        im.negative = _above(-im.nu, -im.offset + cfg.threshold * im.scale, cfg.min_pixels, g, im.bad)
    r_sky = cfg.sky_radius / scale_arcsec
    margin = cfg.edge_margin if cfg.edge_margin is not None else float(max(im.psf_sigma for im in images) * 3.0)
    avoid = bad.copy()
    for im in images:
        avoid |= im.footprints
        avoid |= im.negative
    avoid = grow_mask(avoid, float(r_sky))
    edge = int(math.ceil(max(margin, r_sky)))
    allowed = ~avoid
    if edge > 0:
        allowed[:edge, :] = False
        allowed[-edge:, :] = False
        allowed[:, :edge] = False
        allowed[:, -edge:] = False
    sx, sy = place_separated(allowed, cfg.n_sky_objects, r_sky, cfg.seed)
    del avoid, allowed
    sky = pd.DataFrame(
        {"sky_id": np.arange(1, sx.size + 1, dtype=np.int64), "x": sx.astype(float), "y": sy.astype(float)}
    )
    stats = []
    for im in images:
        stats.append(_sky_check(im, sky, sx, sy, cfg, notes))
    sky_stats = pd.DataFrame(
        stats,
        columns=[
            "image",
            "n_sky",
            "pull_mean",
            "pull_std",
            "pull_std_variance",
            "threshold_factor",
            "noise_offset",
            "threshold",
        ],
    )
    # The flux errors' factor: the measured noise and, when the sky objects raised the threshold,
    # their excess pull width too.
    noise_scale = {im.name: float(im.scale * im.factor) for im in images}
    for im in images:
        f = cfg.noise_warn_factor
        if cfg.threshold_type == "measured" and not (1.0 / f <= im.scale <= f):
            _note(
                notes,
                "coadd_variance_plane_off",
                f"{im.name}: the measured noise of the PSF-filtered coadd is {im.scale:.2f} x what the variance "
                "plane predicts (correlated noise); thresholds use the measured noise",
                severity="info",
                image=im.name,
                noise_scale=im.scale,
            )

    # ---- merged parents
    union = np.zeros(shape, bool)
    for im in images:
        union |= im.footprints
    labels, n_par = label_components(union)
    del union

    # ---- peaks per image, merged in priority order
    order = _priority(bands, cfg)
    by_name = {im.name: im for im in images}
    names = [b for b in order] + ([MULTIBAND] if MULTIBAND in by_name else [])
    same_px = cfg.peak_same_radius / scale_arcsec
    new_px = cfg.peak_merge_radius / scale_arcsec
    px: list[float] = []
    py: list[float] = []
    psig: list[float] = []
    porigin: list[str] = []
    pdet: dict[str, list[bool]] = {n: [] for n in names}
    for name in names:
        x, y, s = _image_peaks(by_name[name], cfg, margin)
        n_old = len(px)
        if n_old:
            # each peak against the peaks merged before this image (its own are apart already)
            d, j = cKDTree(np.column_stack([px, py])).query(np.column_stack([x, y]), k=1)
        else:
            d, j = np.full(x.size, np.inf), np.zeros(x.size, np.int64)
        for i in range(x.size):
            if d[i] < same_px:
                pdet[name][int(j[i])] = True
            elif d[i] > new_px:
                px.append(float(x[i]))
                py.append(float(y[i]))
                psig.append(float(s[i]))
                porigin.append(name)
                for n in names:
                    pdet[n].append(n == name)
    peaks = _peaks_table(px, py, psig, porigin, pdet, names, bands, labels, images, shape)

    # ---- parents without peaks are dropped (their peaks were all on bad pixels or the edge)
    n_peaks = np.bincount(peaks["parent_id"].to_numpy(np.int64), minlength=n_par + 1) if n_par else np.zeros(1, int)
    keep = n_peaks > 0
    keep[0] = False
    mapping = np.zeros(n_par + 1, np.int32)
    mapping[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    if n_par and not keep[1:].all():
        labels = relabel(labels, mapping)
    n_new = int(keep.sum())
    peaks["parent_id"] = mapping[peaks["parent_id"].to_numpy(np.int64)].astype(np.int64)
    peaks = peaks[peaks["parent_id"].to_numpy() > 0]  # (a peak off every footprint: none expected)
    peaks = peaks.sort_values(["parent_id", "significance"], ascending=[True, False], kind="stable")
    peaks.insert(0, "peak_id", np.arange(1, len(peaks) + 1, dtype=np.int64))
    peaks = peaks.reset_index(drop=True)
    bb = footprint_bboxes(labels, n_new)
    area = np.bincount(labels.ravel(), minlength=n_new + 1)
    parents = pd.DataFrame(
        {
            "parent_id": np.arange(1, n_new + 1, dtype=np.int64),
            "x0": bb[1:, 2].astype(np.int64),
            "y0": bb[1:, 0].astype(np.int64),
            "x1": bb[1:, 3].astype(np.int64),
            "y1": bb[1:, 1].astype(np.int64),
            "area": area[1:].astype(np.int64),
            "n_peaks": np.bincount(peaks["parent_id"].to_numpy(np.int64), minlength=n_new + 1)[1:].astype(np.int64),
        }
    )
    if bad_all.all():
        _note(notes, "coadd_no_data", "every pixel of the patch's coadds is NO_DATA/BAD: no objects", severity="info")
    return CoaddDetections(
        bands=bands,
        labels=labels.astype(np.int32, copy=False),
        parents=parents,
        peaks=peaks,
        sky_objects=sky,
        noise_scale=noise_scale,
        notes=notes,
        sky_stats=sky_stats,
    )


def _priority(bands, cfg) -> list[str]:
    if not cfg.priority:
        return list(bands)
    first = [b for b in cfg.priority if b in bands]
    return first + [b for b in bands if b not in first]


def _sky_check(im: _Image, sky: pd.DataFrame, sx, sy, cfg, notes) -> list:
    """Sky-object fluxes and pulls of one image; rescales its threshold when they are off."""
    n = int(sx.size)
    if im.den is not None:
        # sky objects lie on pixels with data, where nu = num / sqrt(den)
        err_var = np.sqrt(np.maximum(im.den[sy, sx].astype(np.float64), 0.0)) / im.k2
        flux = im.nu[sy, sx].astype(np.float64) * err_var
        err = err_var * im.scale
        sky[f"{im.name}_flux"] = flux
        sky[f"{im.name}_flux_err"] = err
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = flux / err_var
    else:
        raw = im.nu[sy, sx].astype(np.float64)
        sky[f"{im.name}_significance"] = (raw - im.offset) / im.scale
    _, std_raw, _ = clipped_std(raw)
    mean, std, n_used = clipped_std((raw - im.offset) / im.scale)
    if n < cfg.min_sky_objects:
        if cfg.n_sky_objects > 0:
            _note(
                notes,
                "coadd_sky_objects_few",
                f"{im.name}: only {n} sky objects (< {cfg.min_sky_objects}) fit between the footprints: "
                "the threshold is not checked against them",
                severity="info",
                image=im.name,
                n_sky=n,
            )
    elif np.isfinite(std) and cfg.threshold_type == "measured":
        err_std = std / math.sqrt(2.0 * max(n_used - 1, 1))
        dev = std - 1.0
        if abs(dev) > cfg.sky_pull_tolerance and abs(dev) > 3.0 * err_std:
            if dev > 0:
                im.factor = float(std)
                _note(
                    notes,
                    "coadd_sky_pull_rescaled",
                    f"{im.name}: sky objects' PSF-flux pulls scatter with std {std:.3f} (n={n_used}) where the "
                    f"measured pixel noise predicts 1: the threshold is multiplied by {std:.3f}",
                    image=im.name,
                    pull_std=std,
                    n_sky=n_used,
                )
                _make_footprints(im, cfg)
            else:
                # the pixel statistics include the light of undetected sources, which the sky
                # objects avoid: lowering the threshold on that account adds false detections
                _note(
                    notes,
                    "coadd_sky_pull_low",
                    f"{im.name}: sky objects' PSF-flux pulls scatter with std {std:.3f} (n={n_used}), less than the "
                    "measured pixel noise predicts (unresolved light raises the latter): threshold kept",
                    severity="info",
                    image=im.name,
                    pull_std=std,
                    n_sky=n_used,
                )
    return [im.name, n, mean, std, std_raw, im.factor, im.offset, im.threshold(cfg)]


def _image_peaks(im: _Image, cfg, margin):
    """Peaks of one image's footprints: x, y (sub-pixel), significance (measured-noise sigma).

    Children of the persistence watershed on each peak-finding image (the peaks of a later
    one count only farther than half a PSF FWHM from those already found); a footprint with
    one child takes the matched filter's maximum instead (a steadier position for a faint or
    extended source); peaks around a bad-pixel hole enclosed by the footprint (the masked
    core of a saturated star, whose rim shows several maxima) become one peak at the hole's
    centroid, as LSST merges the peaks of a saturated core."""
    assert im.footprints is not None and im.bad is not None and im.holes is not None
    labels, n = label_components(im.footprints)
    e = np.zeros(0)
    if n == 0:
        return e, e, e
    z = im.z()
    ny, nx = z.shape
    thr = cfg.threshold * im.factor
    am = None
    xs, ys, zs = [e], [e], [e]
    for kind, db in im.peak_maps.items():
        s_db = max(0.3, cfg.deblend_sigma_factor * im.psf_sigma) if kind == "gaussian" else im.psf_sigma
        _, pk = deblend_footprints(
            db,
            labels,
            n,
            float(cfg.peak_contrast),
            0.0,
            0,
            float(cfg.peak_false_rate),
            float(max(1.0, 4.0 * np.pi * s_db * s_db)),
        )
        ix = pk[:, 0].astype(np.int64)
        iy = pk[:, 1].astype(np.int64)
        parent = pk[:, 3].astype(np.int64)
        single = np.bincount(parent, minlength=n + 1)[parent] == 1
        if single.any():
            if am is None:
                am = label_argmax(np.where(im.bad, np.float32(-np.inf), z), labels, n)
            use = single & (am[parent, 0] >= 0)
            ix[use] = am[parent[use], 0]
            iy[use] = am[parent[use], 1]
        zpk = z[iy, ix].astype(np.float64)
        # a peak must itself pass the threshold in the matched filter (a noise bump in a grown
        # footprint's wing does not), except the highest one of a footprint
        best = np.full(n + 1, -np.inf)
        np.maximum.at(best, parent, zpk)
        top = zpk >= best[parent]
        ok = (zpk >= thr) | top
        if kind == "lowered_psf":
            # the lowered filter's value is the point-source amplitude above the local
            # background: a companion must be a detection of its own, not a bump on a wing
            ok &= (db[iy, ix] >= thr) | top
        ok &= ~im.bad[iy, ix]
        if margin > 0:
            ok &= (ix >= margin) & (ix <= nx - 1 - margin) & (iy >= margin) & (iy <= ny - 1 - margin)
        ix, iy, zpk, single = ix[ok], iy[ok], zpk[ok], single[ok]
        xf, yf = refine_peaks(db, ix, iy)
        if single.any():
            xf[single], yf[single] = refine_peaks(z, ix[single], iy[single])
        have = np.concatenate(xs).size
        if have and xf.size:
            d, _ = cKDTree(np.column_stack([np.concatenate(xs), np.concatenate(ys)])).query(np.column_stack([xf, yf]))
            new = d > 0.5 * 2.3548 * im.psf_sigma
            xf, yf, zpk = xf[new], yf[new], zpk[new]
        xs.append(xf)
        ys.append(yf)
        zs.append(zpk)
    xf, yf, zpk = np.concatenate(xs), np.concatenate(ys), np.concatenate(zs)
    if im.holes.any() and xf.size:
        glab, ng = label_components(grow_mask(im.holes, float(2.3548 * im.psf_sigma)))
        g = glab[np.clip(np.rint(yf).astype(np.int64), 0, ny - 1), np.clip(np.rint(xf).astype(np.int64), 0, nx - 1)]
        if (g > 0).any():
            hy, hx = np.nonzero(im.holes)
            hl = glab[hy, hx]
            cnt = np.bincount(hl, minlength=ng + 1).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                cx = np.bincount(hl, weights=hx, minlength=ng + 1) / cnt
                cy = np.bincount(hl, weights=hy, minlength=ng + 1) / cnt
            keep = g == 0
            for lab in np.unique(g[g > 0]):
                members = np.flatnonzero(g == lab)
                top_i = members[np.argmax(zpk[members])]
                keep[top_i] = True
                xf[top_i], yf[top_i] = cx[lab], cy[lab]
            xf, yf, zpk = xf[keep], yf[keep], zpk[keep]
    return xf, yf, zpk


def _peaks_table(px, py, psig, porigin, pdet, names, bands, labels, images, shape) -> pd.DataFrame:
    x = np.asarray(px, float)
    y = np.asarray(py, float)
    ny, nx = shape
    ix = np.clip(np.rint(x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(np.int64), 0, ny - 1)
    cols: dict = {
        "parent_id": labels[iy, ix].astype(np.int64) if x.size else np.zeros(0, np.int64),
        "x": x,
        "y": y,
        "significance": np.asarray(psig, float),
        "origin": pd.Series(porigin, dtype=object),
    }
    for n in list(bands) + ([MULTIBAND] if MULTIBAND in names else []):
        cols[f"detected_{n}"] = np.asarray(pdet[n], bool) if n in pdet else np.zeros(x.size, bool)
    if MULTIBAND not in names:
        cols[f"detected_{MULTIBAND}"] = np.zeros(x.size, bool)
    for im in images:
        z = (im.nu[iy, ix].astype(np.float64) - im.offset) / im.scale if x.size else np.zeros(0)
        cols[f"significance_{im.name}"] = z
    return pd.DataFrame(cols)
