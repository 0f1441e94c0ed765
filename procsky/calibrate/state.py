"""The state the calibrate steps pass along: pixel planes, detections, measurements, PSF, WCS, zero point."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from procsky.exposure import Exposure
from procsky.kernels.background import Background
from procsky.kernels.cosmicray import CosmicRayResult
from procsky.kernels.detection import DetectionResult
from procsky.kernels.growth import GrowthCorrection
from procsky.kernels.psfmodel import PsfModelArrays
from procsky.masks import MaskPlanes
from procsky.photocalib import PhotoCalib

__all__ = ["CalibrateState"]

#: the mask planes the steps set or read, by name
PLANE_NAMES = ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "NO_DATA", "STREAK")


def _later() -> Any:
    """A field that a step fills: unset (AttributeError on access) until then, left out of the repr."""
    return field(init=False, repr=False)


@dataclass
class CalibrateState:
    """What the calibrate steps have found so far; each step reads some fields and fills others.

    The pixel planes are in-memory numpy arrays of the detector (counts of the input image);
    ``sub`` is the working image: background-subtracted, cosmic rays repaired, trails removed.
    Per-source arrays (``meas``, ``cand``, ``used``, ``reserved``, ``stamps``, ``child_ids``,
    ``psf_flux``, ...) are aligned with ``det`` and shrink together when detections are dropped.
    A field a step has not filled yet is unset: reading it raises AttributeError.
    """

    image: np.ndarray
    """Input image, float32, non-finite or zero-variance pixels set to 0."""
    variance: np.ndarray
    """Variance plane of the calexp, float32 (inf where the input is unusable)."""
    mask: np.ndarray
    """Mask plane, uint32, planes named by ``planes``."""
    planes: MaskPlanes
    bit: dict[str, int]
    """Bit value of each plane of ``PLANE_NAMES``."""
    bad_input: np.ndarray
    """Pixels whose input value or variance was unusable (NO_DATA)."""
    var_det: np.ndarray
    """Variance used by detection and measurement (0 where the input's is not finite)."""
    xy0: tuple[int, int] = (0, 0)
    exposure: Exposure = _later()
    """The computed input exposure (unset when the steps run on bare arrays)."""

    # background and cosmic rays
    sub: np.ndarray = _later()
    background_first: Background = _later()
    background: Background = _later()
    cosmic_rays: CosmicRayResult | None = None
    """L.A.Cosmic's result (None when cosmic rays are not searched)."""
    n_cr: int = 0
    n_cr_sources: int = 0
    # detection
    sigma0: float = float("nan")
    """Gaussian sigma of the first seeing guess, pixels."""
    sigma: float = float("nan")
    """Gaussian sigma of the stellar locus, pixels."""
    det: DetectionResult = _later()
    child_ids: np.ndarray = _later()
    streaks: list[dict] = field(default_factory=list)
    streak_model: np.ndarray | None = None
    # measurement and PSF
    meas: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    cand: np.ndarray = _later()
    used: np.ndarray = _later()
    reserved: np.ndarray = _later()
    psf_model: PsfModelArrays | None = None
    """The kernel's PSF model (None for the Gaussian fallback)."""
    psf: Any = None
    """procsky PSF (PolynomialImagePsf, or GaussianPsf fallback), parent pixels."""
    psf_info: dict[str, Any] = field(default_factory=dict)
    stamps: np.ndarray = _later()
    sigma_psf: float = float("nan")
    # photometry of the sources
    apcorr: float = 1.0
    apcorr_err: float = float("nan")
    n_apcorr: int = 0
    apcorr_radius: float = float("nan")
    """The aperture the PSF fluxes were corrected to, pixels (``measurement.apcorr_radius``)."""
    growth: GrowthCorrection = _later()
    psf_flux: np.ndarray = _later()
    psf_flux_err: np.ndarray = _later()
    flux_sys: float = 0.0
    # astrometry
    wcs: Any = None
    wcs_cards: Any = None
    astro: dict[str, Any] = field(default_factory=dict)
    refs: pd.DataFrame | None = None
    ref_on: pd.DataFrame | None = None
    """Reference stars on the detector (None without a reference catalogue or a WCS)."""
    bright: np.ndarray = _later()
    # photometric calibration
    photocalib: PhotoCalib = _later()
    phot: dict[str, Any] = field(default_factory=dict)
    phot_used: np.ndarray = _later()
    ref_mag: np.ndarray = _later()
    ref_mag_err: np.ndarray = _later()
    phot_cand: np.ndarray = _later()
    header_zp: float = float("nan")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def n_det(self) -> int:
        """Number of detections (0 before detection)."""
        det = getattr(self, "det", None)
        return 0 if det is None else len(det.x)
