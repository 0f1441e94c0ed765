"""Instrument-signature removal on Exposures: the functions a notebook calls.

:func:`run_isr` turns one raw frame into an ``isr_exposure`` (overscan-, bias-, dark- and
flat-corrected image in electrons or ADU, with the variance plane and the SAT / BAD /
NO_DATA masks); :func:`make_master_bias`, :func:`make_master_dark` and
:func:`make_master_flat` build the master calibrations from individual calibration
exposures. The per-array work (overscan model, clipped combination, saturation, variance)
is in :mod:`procsky.kernels.isr`; the tasks of :mod:`procsky.tasks.isr` read the inputs,
call these and return the outputs. Nothing here uses dask: a raw frame is one detector,
read into memory at once.

Layout of a raw frame: the detector description (``Exposure.detector``) gives either
``datasec`` / ``biassec`` (0-based ``[x0, x1, y0, y1]`` or FITS sections ``"[x1:x2,y1:y2]"``)
for a single amplifier, or ``amplifiers``: a list of dicts each with ``datasec``,
``biassec`` and optionally ``gain`` (e-/ADU), ``read_noise`` (e-) and ``saturation`` (ADU).
The output image is the union of the data sections (it must be a rectangle starting at
the union's corner); the WCS of the raw is shifted to the data section origin.

Units: ``bias`` is in ADU (overscan subtracted), ``dark`` in ADU per second (or a frame
with ``visit_info.exposure_time`` set, scaled by the ratio of exposure times), ``flat``
dimensionless. The output PhotoCalib is the raw's (ADU zero point) converted to the output
units.

Master darks flag hot pixels and bad columns (``defect_nsigma`` robust sigmas from the
median rate) as BAD, and :func:`run_isr` carries that mask into every exposure (defect
masking from the data, as ``cp_pipe``'s ``findDefects`` does on master darks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pydantic

from procsky import masks as _masks
from procsky.errors import AlgorithmError, NoWorkError, ProcskyValueError
from procsky.exposure import Exposure
from procsky.kernels.isr import (
    combine_frames,
    isr_variance,
    overscan_model,
    parse_section,
    saturation_mask,
)
from procsky.notes import note_degraded
from procsky.photocalib import PhotoCalib
from procsky.wcs import shift_wcs

__all__ = [
    "OverscanConfig",
    "IsrConfig",
    "MasterConfig",
    "MasterDarkConfig",
    "amplifier_layout",
    "amplifier_layout_or_none",
    "run_isr",
    "make_master_bias",
    "make_master_dark",
    "make_master_flat",
]

_BAD = _masks.bit("BAD")
_SAT = _masks.bit("SAT")
_NO_DATA = _masks.bit("NO_DATA")


class OverscanConfig(pydantic.BaseModel):
    """Overscan model per amplifier (see :func:`procsky.kernels.isr.overscan_model`)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    method: Literal["poly", "median_per_row", "median"] = "poly"
    """Legendre polynomial along the rows, clipped median per row, or one clipped median."""
    order: int = 3
    """Legendre order of the ``poly`` overscan model."""
    nsigma: float = 3.0
    """Clipping threshold of the overscan statistics (robust sigmas)."""


class IsrConfig(pydantic.BaseModel):
    """Settings of :func:`run_isr`."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    overscan: OverscanConfig = OverscanConfig()
    """Overscan model per amplifier."""
    do_bias: bool = True
    """Subtract the master bias when one is given."""
    do_dark: bool = True
    """Subtract the scaled master dark when one is given."""
    do_flat: bool = True
    """Divide by the master flat when one is given."""
    require_calibs: bool = False
    """Fail (AlgorithmError) when bias, dark or flat is missing instead of skipping that step."""
    units: Literal["electron", "adu"] = "electron"
    """Units of the output image: electrons (gain applied, LSST convention) or ADU."""
    saturation_tolerance: float = 5.0
    """Flag SAT from ``saturation - saturation_tolerance * read_noise`` (read-noise sigmas, ADU)."""
    adc_max: float | None = 65535.0
    """Raw value of digital saturation, ADU (None: no ADC check)."""
    saturation_grow: int = 1
    """Grow the SAT mask by this many pixels (LSST ``growSaturationFootprintSize = 1``: the
    partly filled pixels at the ends of a bleed trail are flagged too)."""
    min_flat: float = 0.2
    """Flat values below this are BAD (and NO_DATA when <= 0)."""
    variance_smoothing: int = 3
    """Boxcar (pixels) over which the Poisson term of the variance is averaged (1: per pixel);
    see :func:`procsky.kernels.isr.isr_variance` for why."""


class MasterConfig(pydantic.BaseModel):
    """Settings of the master-calibration builders."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    overscan: OverscanConfig = OverscanConfig()
    """Overscan model per amplifier of each calibration exposure."""
    nsigma: float = 3.0
    """Per-pixel clipping threshold of the combination (standard deviations)."""
    max_iter: int = 3
    """Clipping iterations of the combination."""
    min_frames: int = 3
    """Fewer input frames than this: AlgorithmError."""


class MasterDarkConfig(MasterConfig):
    """Settings of :func:`make_master_dark`."""

    defect_nsigma: float = 5.0
    """Pixels whose dark rate lies this many robust sigmas (1.4826 MAD over the detector)
    from the median rate are BAD: hot pixels and bad columns. 0 disables."""
    defect_min_rate: float = 0.0
    """...and whose rate differs from the median by more than this (ADU/s)."""


# ------------------------------------------------------------------------- one raw frame
def amplifier_layout(detector: dict, shape: tuple[int, int], metadata: dict | None = None) -> list[dict]:
    """The amplifiers of a raw frame: ``[{"datasec", "biassec", "gain", "read_noise", "saturation"}]``.

    Sections are 0-based half-open ``(x0, x1, y0, y1)``. Gain, read noise and saturation
    default to the detector's.

    Raises
    ------
    ProcskyValueError
        No layout, or sections outside the frame.
    """
    detector = dict(detector or {})
    metadata = dict(metadata or {})
    amps = detector.get("amplifiers")
    if not amps:
        datasec = detector.get("datasec", metadata.get("datasec"))
        biassec = detector.get("biassec", metadata.get("biassec"))
        if datasec is None or biassec is None:
            raise ProcskyValueError(
                "the raw frame does not describe its overscan: give Exposure.detector['datasec'] and "
                "['biassec'] (0-based [x0, x1, y0, y1] or FITS '[x1:x2,y1:y2]'), or ['amplifiers']; "
                "the instrument definition should set them at ingest"
            )
        amps = [{"datasec": datasec, "biassec": biassec}]
    ny, nx = shape
    out = []
    for i, a in enumerate(amps):
        try:
            ds = parse_section(a["datasec"])
            bs = parse_section(a["biassec"])
        except (KeyError, ValueError) as exc:
            raise ProcskyValueError(
                f"amplifier {i}: bad datasec/biassec ({exc}); see the raw's detector description"
            ) from exc
        for name, (x0, x1, y0, y1) in (("datasec", ds), ("biassec", bs)):
            if x0 < 0 or y0 < 0 or x1 > nx or y1 > ny:
                raise ProcskyValueError(
                    f"amplifier {i}: {name} {list((x0, x1, y0, y1))} lies outside the {nx}x{ny} raw frame"
                )
        if bs[3] - bs[2] != ds[3] - ds[2] and bs[1] - bs[0] != ds[1] - ds[0]:
            raise ProcskyValueError(
                f"amplifier {i}: biassec {bs} shares neither rows nor columns with datasec {ds}; "
                "serial overscan must span the data rows"
            )
        out.append(
            {
                "datasec": ds,
                "biassec": bs,
                "gain": float(a.get("gain", detector.get("gain", 1.0)) or 1.0),
                "read_noise": float(a.get("read_noise", detector.get("read_noise", 0.0)) or 0.0),
                "saturation": float(a.get("saturation", detector.get("saturation", np.inf)) or np.inf),
            }
        )
    return out


def amplifier_layout_or_none(exp: Exposure) -> list[dict] | None:
    """:func:`amplifier_layout` of an exposure, or None when it has no overscan description."""
    try:
        return amplifier_layout(exp.detector, exp.shape, exp.metadata)
    except ProcskyValueError:
        return None


def _overscan_subtract(
    raw: np.ndarray, amps: list[dict], config: OverscanConfig
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], dict]:
    """Overscan-subtract every amplifier; returns (data ADU, raw data, (x0, y0), maps)."""
    x0 = min(a["datasec"][0] for a in amps)
    x1 = max(a["datasec"][1] for a in amps)
    y0 = min(a["datasec"][2] for a in amps)
    y1 = max(a["datasec"][3] for a in amps)
    area = sum((a["datasec"][1] - a["datasec"][0]) * (a["datasec"][3] - a["datasec"][2]) for a in amps)
    if area != (x1 - x0) * (y1 - y0):
        raise ProcskyValueError(
            f"the amplifiers' data sections do not tile the rectangle [{x0}:{x1}, {y0}:{y1}]; check the layout"
        )
    out = np.empty((y1 - y0, x1 - x0), dtype=np.float64)
    maps = {k: np.empty(out.shape) for k in ("gain", "read_noise", "saturation")}
    for a in amps:
        dx0, dx1, dy0, dy1 = a["datasec"]
        bx0, bx1, by0, by1 = a["biassec"]
        data = raw[dy0:dy1, dx0:dx1].astype(np.float64)
        ov = raw[by0:by1, bx0:bx1].astype(np.float64)
        if by1 - by0 == dy1 - dy0:  # serial overscan: one value per row
            model = overscan_model(ov, method=config.method, order=config.order, nsigma=config.nsigma)
            data = data - model[:, None]
        else:  # parallel overscan: one value per column
            model = overscan_model(ov.T, method=config.method, order=config.order, nsigma=config.nsigma)
            data = data - model[None, :]
        sl = (slice(dy0 - y0, dy1 - y0), slice(dx0 - x0, dx1 - x0))
        out[sl] = data
        maps["gain"][sl] = a["gain"]
        maps["read_noise"][sl] = a["read_noise"]
        maps["saturation"][sl] = a["saturation"]
    return out, raw[y0:y1, x0:x1], (x0, y0), maps


def _calib_plane(calib: Exposure | None, shape: tuple[int, ...], name: str) -> tuple[Any, Any, Any]:
    """Image, variance and mask (float64, float64, uint32 arrays) of a master calibration,
    checked against the data shape; three None without one."""
    if calib is None:
        return None, None, None
    c = calib.compute()
    img = np.asarray(c.image, dtype=np.float64)
    if img.shape != tuple(shape):
        raise ProcskyValueError(
            f"master {name} has shape {img.shape} but the raw data section is {tuple(shape)}; "
            f"use a {name} made for this detector (trimmed to the data section)"
        )
    return img, np.asarray(c.variance, dtype=np.float64), np.asarray(c.mask, dtype=np.uint32)


def run_isr(
    raw: Exposure,
    bias: Exposure | None = None,
    dark: Exposure | None = None,
    flat: Exposure | None = None,
    config: IsrConfig | None = None,
) -> Exposure:
    """Remove the instrument signature of one raw frame.

    Parameters
    ----------
    raw : Exposure
        Raw frame (ADU) with overscan; its ``detector`` gives the layout, gain (e-/ADU),
        read noise (e-) and saturation (ADU above bias).
    bias, dark, flat : Exposure, optional
        Master calibrations trimmed to the data section (bias ADU, dark ADU/s, flat
        dimensionless); their BAD pixels are carried into the output mask.
    config : IsrConfig, optional

    Returns
    -------
    Exposure
        Image and variance in electrons (or ADU), mask with SAT, BAD, NO_DATA; WCS shifted
        to the data section; ``metadata["isr"]`` records the steps done.
    """
    config = config or IsrConfig()
    raw = raw.compute()
    rimg = np.asarray(raw.image, dtype=np.float64)
    amps = amplifier_layout(raw.detector, rimg.shape, raw.metadata)
    data, raw_data, (ox, oy), maps = _overscan_subtract(rimg, amps, config.overscan)
    shape = data.shape
    mask = np.zeros(shape, dtype=np.uint32)
    rmask = np.asarray(raw.mask, dtype=np.uint32)[oy : oy + shape[0], ox : ox + shape[1]]
    mask |= rmask & np.uint32(_BAD | _SAT | _NO_DATA)
    gain = maps["gain"]
    rn = maps["read_noise"]
    nonfinite = ~np.isfinite(data)
    steps: dict[str, Any] = {"overscan": config.overscan.method}
    missing: list[str] = []
    # Saturation on the overscan-subtracted ADU, before anything rescales the pixels.
    sat_level = maps["saturation"] - config.saturation_tolerance * rn / gain
    sat = saturation_mask(data, np.inf, raw=raw_data, adc_max=config.adc_max) | (data >= sat_level)
    if config.saturation_grow > 0 and sat.any():
        sat = saturation_mask(sat.astype(np.float64), 0.5, grow=config.saturation_grow)
    mask[sat] |= np.uint32(_SAT)
    bias_var = None
    if config.do_bias:
        b, bias_var, bm = _calib_plane(bias, shape, "bias")
        if b is None:
            missing.append("bias")
        else:
            data -= b
            mask |= bm & np.uint32(_BAD)
            steps["bias"] = True
    if config.do_dark:
        d, _, dm = _calib_plane(dark, shape, "dark")
        if d is None:
            missing.append("dark")
        else:
            t = raw.visit_info.exposure_time if raw.visit_info is not None else float("nan")
            if not (math.isfinite(t) and t >= 0):
                raise ProcskyValueError(
                    "cannot scale the dark: the raw has no exposure time (visit_info.exposure_time); "
                    "set it at ingest or run with do_dark=False"
                )
            td = dark.visit_info.exposure_time if dark is not None and dark.visit_info is not None else float("nan")
            scale = t / td if (math.isfinite(td) and td > 0) else t  # a frame of td s, or a rate per s
            data -= d * scale
            mask |= dm & np.uint32(_BAD)
            steps["dark"] = float(scale)
    f = None
    if config.do_flat:
        f, _, fm = _calib_plane(flat, shape, "flat")
        if f is None:
            missing.append("flat")
        else:
            mask |= fm & np.uint32(_BAD)
            low = ~(f > config.min_flat) | ~np.isfinite(f)
            mask[low] |= np.uint32(_BAD)
            mask[~(f > 0) | ~np.isfinite(f)] |= np.uint32(_NO_DATA)
            f = np.where(low, 1.0, f)
            data /= f
            steps["flat"] = True
    if missing and config.require_calibs:
        raise AlgorithmError(
            f"ISR needs {missing} for {raw.visit_info.visit if raw.visit_info else '?'} but none was given; "
            "ingest the master calibrations (bias, dark, flat) or set require_calibs=False"
        )
    if missing:
        note_degraded("isr_calib_missing", f"no master {', '.join(missing)}: that ISR step skipped", missing=missing)
    variance = isr_variance(np.nan_to_num(data), gain, rn, f, bias_var, smooth=config.variance_smoothing)
    mask[nonfinite] |= np.uint32(_NO_DATA)
    data[nonfinite] = 0.0
    variance = np.where(nonfinite, np.inf, variance).astype(np.float32)
    if not np.any((mask & np.uint32(_NO_DATA)) == 0):
        raise NoWorkError("every pixel of the raw frame is NO_DATA after ISR")
    photocalib = raw.photocalib
    if config.units == "electron":
        data *= gain
        variance = (variance * gain * gain).astype(np.float32)
        if photocalib is not None:
            g = float(np.median(gain))
            photocalib = PhotoCalib(photocalib.calibration / g, photocalib.calibration_err / g)
    wcs, cards = shift_wcs(raw.wcs, ox, oy, raw.wcs_cards or None)
    if wcs is not None:
        wcs.pixel_shape = (shape[1], shape[0])
    detector = dict(raw.detector)
    for k in ("datasec", "biassec", "amplifiers"):
        detector.pop(k, None)
    detector["image_units"] = config.units
    detector["nx"], detector["ny"] = shape[1], shape[0]
    meta = dict(raw.metadata)
    for k in ("datasec", "biassec"):
        meta.pop(k, None)
    meta["units"] = config.units
    meta["imagetyp"] = "isr"
    meta["isr"] = {**steps, "missing": missing}
    return Exposure(
        data.astype(np.float32),
        variance,
        mask,
        wcs=wcs,
        wcs_cards=cards or None,
        psf=raw.psf,
        photocalib=photocalib,
        visit_info=raw.visit_info,
        detector=detector,
        metadata=meta,
        mask_planes=raw.mask_planes,
        xy0=(raw.xy0[0] + ox, raw.xy0[1] + oy),
    )


# ------------------------------------------------------------------------- master frames
def _trimmed(frame: Exposure, config: MasterConfig) -> tuple[np.ndarray, np.ndarray, Exposure]:
    """Overscan-subtracted data section and mask of a calibration exposure (as is when it has
    no overscan description), and the exposure read into memory."""
    frame = frame.compute()
    img = np.asarray(frame.image, dtype=np.float64)
    amps = amplifier_layout_or_none(frame)
    if amps is None:  # already trimmed and overscan-corrected
        return img, np.asarray(frame.mask, dtype=np.uint32), frame
    data, _, (ox, oy), _ = _overscan_subtract(img, amps, config.overscan)
    m = np.asarray(frame.mask, dtype=np.uint32)[oy : oy + data.shape[0], ox : ox + data.shape[1]]
    return data, m, frame


def _master_exposure(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, template: Exposure, kind: str, n: int
) -> Exposure:
    """A master calibration Exposure with the detector description of ``template`` (trimmed)."""
    det = dict(template.detector)
    for k in ("datasec", "biassec", "amplifiers"):
        det.pop(k, None)
    det["nx"], det["ny"] = image.shape[1], image.shape[0]
    return Exposure(
        image, variance, mask, detector=det, metadata={"imagetyp": kind, "n_frames": int(n), "combine": "clipped mean"}
    )


def _frame_isr_config(config: MasterConfig) -> IsrConfig:
    """ISR of a calibration exposure: overscan, bias (and dark), in ADU, no flat, no ADC check."""
    return IsrConfig(
        overscan=config.overscan, do_flat=False, units="adu", adc_max=None, saturation_tolerance=0.0, saturation_grow=0
    )


def _frame_isr(frame: Exposure, bias: Exposure | None, dark: Exposure | None, icfg: IsrConfig) -> Exposure:
    """Run ISR on one calibration exposure; frames without overscan only get bias/dark removed.

    ``bias`` and ``dark`` should be in memory (the master builders compute them once).
    """
    c = frame.compute()  # read once
    if amplifier_layout_or_none(c) is not None:
        return run_isr(c, bias, dark, None, icfg)
    img = np.asarray(c.image, dtype=np.float64)
    if bias is not None and icfg.do_bias:
        img = img - np.asarray(bias.image, dtype=np.float64)
    if dark is not None and icfg.do_dark:
        t = c.visit_info.exposure_time if c.visit_info is not None else float("nan")
        td = dark.visit_info.exposure_time if dark.visit_info is not None else float("nan")
        if math.isfinite(t):
            scale = t / td if (math.isfinite(td) and td > 0) else t
            img = img - np.asarray(dark.image, dtype=np.float64) * scale
    return Exposure(img.astype(np.float32), mask=c.mask, detector=c.detector, visit_info=c.visit_info)


def make_master_bias(frames: Sequence[Exposure], config: MasterConfig | None = None) -> Exposure:
    """Master bias of a detector: its overscan-subtracted bias frames, clipped mean (ADU).

    Raises
    ------
    AlgorithmError
        Fewer than ``config.min_frames`` frames.
    """
    config = config or MasterConfig()
    if len(frames) < config.min_frames:
        raise AlgorithmError(f"{len(frames)} bias frame(s) for a master bias; need >= min_frames={config.min_frames}")
    trimmed = [_trimmed(f, config) for f in frames]
    shapes = {t[0].shape for t in trimmed}
    if len(shapes) != 1:
        raise ProcskyValueError(f"bias frames have different data shapes {sorted(shapes)}; combine one detector")
    stack = np.stack([t[0] for t in trimmed])
    bad = np.stack([(t[1] & np.uint32(_BAD | _NO_DATA)) != 0 for t in trimmed])
    mean, var, n = combine_frames(stack, bad, nsigma=config.nsigma, max_iter=config.max_iter)
    mask = np.where(n == 0, np.uint32(_NO_DATA | _BAD), np.uint32(0)).astype(np.uint32)
    mean = np.nan_to_num(mean)
    var = np.nan_to_num(var, nan=0.0)
    return _master_exposure(mean, var, mask, trimmed[0][2], "bias", len(frames))


def make_master_dark(
    frames: Sequence[Exposure], bias: Exposure | None = None, config: MasterDarkConfig | None = None
) -> Exposure:
    """Master dark of a detector: bias-subtracted dark frames per second, clipped mean (ADU/s),
    with hot pixels and bad columns flagged BAD (``config.defect_nsigma``).

    The result is a rate: :func:`run_isr` scales it by the exposure time.

    Raises
    ------
    AlgorithmError
        Fewer than ``config.min_frames`` frames, or a frame without a positive exposure time.
    """
    config = config or MasterDarkConfig()
    if len(frames) < config.min_frames:
        raise AlgorithmError(f"{len(frames)} dark frame(s) for a master dark; need >= min_frames={config.min_frames}")
    icfg = _frame_isr_config(config).model_copy(update={"do_dark": False})
    bias = None if bias is None else bias.compute()  # read the master once, not per frame
    images, bads = [], []
    template = None
    for f in frames:
        t = f.visit_info.exposure_time if f.visit_info is not None else float("nan")
        if not (math.isfinite(t) and t > 0):
            raise AlgorithmError(f"a dark frame has exposure time {t}; darks need EXPTIME > 0 (set at ingest)")
        exp = _frame_isr(f, bias, None, icfg)
        template = template or exp
        images.append(np.asarray(exp.image, dtype=np.float64) / t)
        bads.append((np.asarray(exp.mask) & np.uint32(_BAD | _NO_DATA)) != 0)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ProcskyValueError(f"dark frames have different data shapes {sorted(shapes)}; combine one detector")
    mean, var, n = combine_frames(np.stack(images), np.stack(bads), nsigma=config.nsigma, max_iter=config.max_iter)
    good = n > 0
    mask = np.zeros(mean.shape, np.uint32)
    mask[~good] |= np.uint32(_NO_DATA | _BAD)
    n_defects = 0
    if config.defect_nsigma > 0 and good.any():
        v = mean[good].astype(np.float64)
        med = float(np.median(v))
        sig = 1.4826 * float(np.median(np.abs(v - med)))
        dev = np.abs(np.where(good, mean, med) - med)
        hot = good & (dev > config.defect_nsigma * sig) & (dev > config.defect_min_rate)
        mask[hot] |= np.uint32(_BAD)
        n_defects = int(hot.sum())
    mean = np.where(good, mean, 0.0).astype(np.float32)
    var = np.nan_to_num(var, nan=0.0).astype(np.float32)
    assert template is not None  # the shape check above needs at least one frame
    out = _master_exposure(mean, var, mask, template, "dark", len(frames))
    out.metadata.update(units="adu/s", n_defects=n_defects)
    return out


def make_master_flat(
    frames: Sequence[Exposure],
    bias: Exposure | None = None,
    dark: Exposure | None = None,
    config: MasterConfig | None = None,
) -> Exposure:
    """Master flat of a detector and filter: bias/dark-corrected frames normalised by their
    median, clipped mean, normalised to median 1; pixels below 0.2 are BAD.

    Raises
    ------
    AlgorithmError
        Fewer than ``config.min_frames`` frames, a frame without a positive median, or a
        combination without positive pixels.
    """
    config = config or MasterConfig()
    if len(frames) < config.min_frames:
        raise AlgorithmError(f"{len(frames)} flat frame(s) for a master flat; need >= min_frames={config.min_frames}")
    icfg = _frame_isr_config(config)
    bias = None if bias is None else bias.compute()  # read the masters once, not per frame
    dark = None if dark is None else dark.compute()
    images, bads, scales = [], [], []
    template = None
    for f in frames:
        exp = _frame_isr(f, bias, dark, icfg)
        template = template or exp
        img = np.asarray(exp.image, dtype=np.float64)
        bad = (np.asarray(exp.mask) & np.uint32(_BAD | _NO_DATA | _SAT)) != 0
        med = float(np.median(img[~bad])) if (~bad).any() else float("nan")
        if not (math.isfinite(med) and med > 0):
            raise AlgorithmError(f"a flat frame has median {med}; flats must be well exposed (positive)")
        images.append(img)
        bads.append(bad)
        scales.append(med)
    mean, var, n = combine_frames(
        np.stack(images), np.stack(bads), nsigma=config.nsigma, max_iter=config.max_iter, scales=scales
    )
    good = n > 0
    norm = float(np.median(mean[good])) if good.any() else float("nan")
    if not (math.isfinite(norm) and norm > 0):
        raise AlgorithmError("the combined flat has no positive pixels")
    mean = mean / norm
    var = var / norm**2
    mask = np.zeros(mean.shape, np.uint32)
    mask[~good] |= np.uint32(_NO_DATA | _BAD)
    mask[good & ~(mean > 0.2)] |= np.uint32(_BAD)
    mean = np.where(good, mean, 1.0).astype(np.float32)
    var = np.nan_to_num(var, nan=0.0).astype(np.float32)
    assert template is not None  # the shape check above needs at least one frame
    return _master_exposure(mean, var, mask, template, "flat", len(frames))
