"""Instrument definitions and the ingest contract.

An :class:`Instrument` knows one camera: its detectors, gains, read noise, saturation,
header keywords, how its data-quality codes map to procsky mask planes, and its band
names. ``ingest_file(path)`` turns one file into :class:`IngestItem` s (one per detector)
carrying the dataset type, the data ID, the in-memory object and the dimension records
to register. Algorithms never look at instrument specifics; instruments never run
algorithms.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError

__all__ = [
    "Instrument",
    "IngestItem",
    "DetectorSpec",
    "register_instrument",
    "get_instrument",
    "instrument_names",
    "open_fits",
    "INGESTED_DATASET_TYPE",
]

#: Dataset type of ingested images whose instrument signature is already removed (NOIRLab
#: CP InstCal, simulated calibrated frames, any reduced FITS): the same type the ``isr``
#: task writes, so ``calibrate`` takes either, and never the name of calibrate's output.
INGESTED_DATASET_TYPE = "isr_exposure"

_REGISTRY: dict[str, type["Instrument"]] = {}


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


def _load_builtin() -> None:
    # Import the packaged definitions so they register themselves.
    from procsky.instruments import generic, noirlab_cp  # noqa: F401

    try:
        from procsky.instruments import simcam  # noqa: F401
    except ImportError:  # simcam needs the optional GalSim-free part only; tolerate absence
        pass


def get_instrument(name: str) -> Instrument:
    """An instance of the instrument called ``name``."""
    _load_builtin()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ProcskyKeyError(
            f"unknown instrument {name!r}; known instruments: {', '.join(sorted(_REGISTRY))}"
        ) from None


def instrument_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


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
