"""Instrument definitions and the ingest contract.

An :class:`Instrument` knows one camera: its detectors, gains, read noise, saturation,
header keywords, how its data-quality codes map to procsky mask planes, and its band
names. ``ingest_file(path)`` turns one file into :class:`IngestItem` s (one per detector)
carrying the dataset type, the data ID, the in-memory object and the dimension records
to register. Algorithms never look at instrument specifics; instruments never run
algorithms.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError
from procsky.fitscheck import check_fits_complete

__all__ = [
    "Instrument",
    "IngestItem",
    "DetectorSpec",
    "register_instrument",
    "get_instrument",
    "instrument_names",
    "open_fits",
    "check_fits_complete",
    "header_float",
    "INGESTED_DATASET_TYPE",
    "CALIB_FRAME_DATASET_TYPES",
    "calibration_kind",
    "is_master_calibration",
    "calib_frame_exposure",
    "calib_frame_records",
]

#: Dataset type of ingested images whose instrument signature is already removed (NOIRLab
#: CP InstCal, simulated calibrated frames, any reduced FITS): the same type the ``isr``
#: task writes, so ``calibrate`` takes either, and never the name of calibrate's output.
INGESTED_DATASET_TYPE = "isr_exposure"

#: Dataset type of one raw calibration exposure of one detector, by calibration kind. The
#: master builders (``make_master_bias``, ``make_master_flat``) combine them into the
#: master ``bias`` / ``dark`` / ``flat`` datasets that ``isr`` reads; masters ingested
#: directly are registered under those names.
CALIB_FRAME_DATASET_TYPES = {"bias": "bias_frame", "dark": "dark_frame", "flat": "flat_frame"}

# IMAGETYP / OBSTYPE values (lower case, spaces and underscores removed) of calibrations.
_CALIB_WORDS = {
    "bias": "bias",
    "zero": "bias",
    "biasframe": "bias",
    "zeroframe": "bias",
    "dark": "dark",
    "darkframe": "dark",
    "darkcurrent": "dark",
    "flat": "flat",
    "flatfield": "flat",
    "flatframe": "flat",
    "domeflat": "flat",
    "skyflat": "flat",
    "twilightflat": "flat",
    "twiflat": "flat",
    "dflat": "flat",
    "sflat": "flat",
    "tflat": "flat",
    "lampflat": "flat",
    "internalflat": "flat",
}

_REGISTRY: dict[str, type[Instrument]] = {}


def calibration_kind(header) -> str | None:
    """``"bias"``, ``"dark"`` or ``"flat"`` when a FITS header describes a calibration frame.

    Looks at ``IMAGETYP``, ``OBSTYPE`` and ``OBSTYPE``-like keywords (``IMGTYPE``,
    ``FRAMETYP``) as written by IRAF, NOAO, ESO and most observatory software:
    ``zero``/``bias``, ``dark``, ``flat`` / ``dome flat`` / ``sky flat`` / ``twilight flat``
    (case, spaces and underscores ignored; a ``master`` prefix or suffix is allowed).
    ``None`` for anything else (science frames).
    """
    for key in ("IMAGETYP", "OBSTYPE", "IMGTYPE", "FRAMETYP", "HIERARCH ESO DPR TYPE"):
        if key not in header:
            continue
        word = str(header[key]).strip().lower().replace(" ", "").replace("_", "").replace("-", "")
        word = word.removeprefix("master").removesuffix("master")
        if word in _CALIB_WORDS:
            return _CALIB_WORDS[word]
    return None


def is_master_calibration(header) -> bool:
    """Whether a calibration header describes a combined (master) frame, not one exposure.

    True when ``NCOMBINE`` > 1, when ``IMAGETYP``/``OBSTYPE``/``PRODTYPE``/``PROCTYPE``
    says ``master`` (NOIRLab ``MasterCal``, ccdproc-style ``master bias``), or when a
    procsky exposure (``IMAGE``/``MASK``/``VARIANCE``) has no exposure id (``EXPID``).
    """
    try:
        if int(header.get("NCOMBINE", 1)) > 1:
            return True
    except (TypeError, ValueError):
        pass
    for key in ("IMAGETYP", "OBSTYPE", "PRODTYPE", "PROCTYPE"):
        if "master" in str(header.get(key, "")).lower():
            return True
    return False


def header_float(header, *keys, default=float("nan")) -> float:
    """First of ``keys`` present in ``header`` as a float (sexagesimal strings are not parsed)."""
    for k in keys:
        if k in header:
            try:
                return float(header[k])
            except (TypeError, ValueError):
                continue
    return default


def calib_frame_exposure(
    data, header, *, instrument: str, detector: dict, visit: int, band: str = "", physical_filter: str = "", source=None
):
    """An :class:`~procsky.exposure.Exposure` of one raw calibration exposure of one detector.

    Parameters
    ----------
    data : 2-d array, ADU
        The pixels as read out, overscan included.
    header : astropy.io.fits.Header
        ``DATASEC``/``BIASSEC`` (FITS sections) give the layout the ISR needs; ``EXPTIME``
        (s) scales the dark; ``MJD-OBS`` is the start of the exposure.
    instrument : str
    detector : dict
        ``id``, ``name``, ``gain`` (e-/ADU), ``read_noise`` (e-), ``saturation`` (ADU).
    visit : int
        Exposure id.
    band, physical_filter : str
        Of a flat (empty for bias and dark).
    source : path, optional
        Recorded in the metadata.

    Returns
    -------
    Exposure
        Image in ADU; variance ``max(I - overscan, 0) / gain + (rn / gain)^2``; mask
        NO_DATA on non-finite pixels; ``detector`` with ``datasec``/``biassec`` when the
        header has them; ``visit_info`` with the exposure time.
    """
    from procsky.exposure import Exposure, VisitInfo
    from procsky.masks import DEFAULT_PLANES

    image = np.asarray(data, dtype=np.float64)
    if image.ndim != 2:
        raise ProcskyValueError(f"{source or 'calibration frame'}: expected a 2-d image, got shape {image.shape}")
    det = {k: v for k, v in dict(detector).items() if v is not None}
    for key, name in (("DATASEC", "datasec"), ("BIASSEC", "biassec")):
        if key in header and str(header[key]).strip():
            det[name] = str(header[key]).strip()
    gain = float(det.get("gain") or 1.0)
    rn = float(det.get("read_noise") or 0.0)
    level = 0.0
    if "biassec" in det:
        from procsky.kernels.isr import parse_section

        try:
            x0, x1, y0, y1 = parse_section(det["biassec"])
        except ValueError as e:
            raise ProcskyValueError(f"{source or 'calibration frame'}: bad BIASSEC {det['biassec']!r}: {e}") from e
        ov = image[y0:y1, x0:x1]
        level = float(np.nanmedian(ov)) if ov.size else 0.0
    finite = np.isfinite(image)
    variance = (np.maximum(np.where(finite, image, level) - level, 0.0) / gain + (rn / gain) ** 2).astype(np.float32)
    mask = np.zeros(image.shape, dtype=np.uint32)
    mask[~finite] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
    exptime = header_float(header, "EXPTIME", "EXPOSURE", "ITIME", "DARKTIME", default=0.0)
    mjd = header_float(header, "MJD-OBS", "MJD")
    if np.isfinite(mjd):
        mjd += 0.5 * exptime / 86400.0
    vi = VisitInfo(
        exposure_time=exptime,
        mjd=mjd,
        band=band or "",
        physical_filter=physical_filter or "",
        instrument=instrument,
        visit=int(visit),
    )
    kind = calibration_kind(header) or "unknown"
    meta = {"imagetyp": kind, "frame": True}
    if source is not None:
        meta["source_file"] = str(Path(source).resolve())
    return Exposure(
        np.where(finite, image, 0.0).astype(np.float32), variance, mask, visit_info=vi, detector=det, metadata=meta
    )


def calib_frame_records(
    instrument: str, kind: str, visit: int, exposure, physical_filter: str = "", band: str = ""
) -> dict[str, list[dict]]:
    """The ``visit`` (exposure) record of a calibration frame: its type, time and filter."""
    vi = exposure.visit_info
    rec = {"instrument": instrument, "visit": int(visit), "observation_type": kind}
    if physical_filter:
        rec["physical_filter"] = physical_filter
    if band:
        rec["band"] = band
    for k in ("mjd", "exposure_time"):
        v = getattr(vi, k, None) if vi is not None else None
        rec[k] = None if v is None or not np.isfinite(v) else float(v)
    return {"visit": [rec]}


@dataclass(frozen=True)
class DetectorSpec:
    """Static description of one detector.

    Parameters
    ----------
    id : int
        Detector number (stable integer used in data IDs).
    name : str
        Name used by the camera (``N4``, ``ccd2`` ...).
    nx, ny : int, pixels
        Size of the science area.
    gain : float, e-/ADU
    read_noise : float, e-
    saturation : float, ADU
    """

    id: int
    name: str
    nx: int = 0
    ny: int = 0
    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = float("inf")

    def to_record(self, instrument: str) -> dict:
        return {
            "instrument": instrument,
            "detector": int(self.id),
            "name": self.name,
            "nx": int(self.nx),
            "ny": int(self.ny),
            "gain": float(self.gain),
            "read_noise": float(self.read_noise),
            "saturation": None if not np.isfinite(self.saturation) else float(self.saturation),
        }


@dataclass
class IngestItem:
    """One dataset produced by ingesting a file.

    Parameters
    ----------
    dataset_type : str
        ``raw``, ``isr_exposure``, ``bias``, ``dark``, ``flat`` ...
    data_id : dict
        Dimension values (instrument, visit, detector, band, physical_filter ...).
    obj : Exposure
        The in-memory dataset.
    records : dict of str to list of dict
        Dimension records to register first (``{"visit": [...], "detector": [...]}``).
    """

    dataset_type: str
    data_id: dict
    obj: Any
    records: dict[str, list[dict]] = field(default_factory=dict)


class Instrument:
    """Base class of camera definitions; subclass and decorate with :func:`register_instrument`."""

    #: Name used on the command line (``--instrument NAME``).
    name: ClassVar[str] = ""
    #: One-line description for ``procsky ingest --help``.
    description: ClassVar[str] = ""
    #: Abstract band of each physical filter name (or a prefix of it).
    bands: ClassVar[dict[str, str]] = {}

    def ingest_file(self, path: str | Path) -> list[IngestItem]:
        """Read one file into ingest items (one per detector)."""
        raise NotImplementedError

    # Helpers for subclasses -------------------------------------------------
    def band_of(self, physical_filter: str) -> str:
        """The abstract band of a physical filter name."""
        f = (physical_filter or "").strip()
        if f in self.bands:
            return self.bands[f]
        for prefix, band in sorted(self.bands.items(), key=lambda kv: -len(kv[0])):
            if f.startswith(prefix):
                return band
        if f[:1] in "ugrizyY" and f:
            return f[0].lower() if f[0] != "Y" else "y"
        raise ProcskyValueError(
            f"instrument {self.name!r} does not know filter {physical_filter!r}; known: {sorted(self.bands)}"
        )


def register_instrument(cls: type[Instrument]) -> type[Instrument]:
    """Class decorator: make an instrument available by its ``name``."""
    if not cls.name:
        raise ProcskyValueError(f"instrument class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


#: The packaged cameras by name, as ``"module:Class"``: imported on first use, so this module
#: imports no camera module (the camera modules import this one).
_BUILTIN: dict[str, str] = {
    "generic": "procsky.instruments.generic:GenericInstrument",
    "decam-cp": "procsky.instruments.noirlab_cp:DecamCP",
    "90prime-cp": "procsky.instruments.noirlab_cp:NinetyPrimeCP",
    "mosaic3-cp": "procsky.instruments.noirlab_cp:Mosaic3CP",
    "noirlab-cp": "procsky.instruments.noirlab_cp:AnyCP",
    "simcam": "procsky.instruments.simcam:SimcamInstrument",
}


def _instrument_class(name: str) -> type[Instrument]:
    """The class registered as ``name``, importing its packaged module on first use."""
    if name not in _REGISTRY and name in _BUILTIN:
        module_name, _, attr = _BUILTIN[name].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        _REGISTRY.setdefault(name, cls)  # the module's @register_instrument did this already
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ProcskyKeyError(
            f"unknown instrument {name!r}; known instruments: {', '.join(instrument_names())}"
        ) from None


def get_instrument(name: str, **options) -> Instrument:
    """An instance of the instrument called ``name``, built with its ingest ``options`` (if it takes any)."""
    cls = _instrument_class(name)
    if not options:
        return cls()
    if cls.__init__ is object.__init__:
        raise ProcskyValueError(
            f"instrument {name!r} takes no ingest options (got {', '.join(sorted(options))}); "
            "they are options of the 'generic' instrument"
        )
    return cls(**options)


def instrument_names() -> list[str]:
    """Names of the packaged and the registered instruments."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def open_fits(path: str | Path):
    """Open a FITS file fully into memory, with clear errors for non-FITS and truncated files."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    path = Path(path)
    if not path.exists():
        raise ProcskyFileError(f"no such file: {path}")
    if path.is_dir():
        raise ProcskyFileError(f"{path} is a directory, not a FITS file")
    with open(path, "rb") as fh:
        head = fh.read(30)
    if not head.startswith(b"SIMPLE  =") and not head[:2] == b"\x1f\x8b":
        raise ProcskyFileError(f"{path} is not a FITS file (it does not start with 'SIMPLE  =')")
    check_fits_complete(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)
            warnings.filterwarnings("ignore", message=".*non-standard.*")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data  # force reading: truncation shows here
        return hdul
    except (OSError, ValueError, TypeError, AstropyUserWarning, IndexError) as e:
        raise ProcskyFileError(f"{path} is not a readable FITS file (truncated or damaged?): {e}") from e
