"""The state the calibrate steps pass along: pixel planes, detections, measurements, PSF, WCS, zero point."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from procsky.exposure import Exposure
from procsky.kernels.background import Background, interpolate_mesh, interpolate_mesh_at
from procsky.kernels.cosmicray import CosmicRayResult
from procsky.kernels.detection import DetectionResult
from procsky.kernels.growth import GrowthCorrection
from procsky.kernels.psfmodel import PsfModelArrays
from procsky.masks import MaskPlanes
from procsky.photocalib import PhotoCalib

__all__ = ["CalibrateState", "StepProfile", "release_background_plane", "restore_background_plane", "timed"]

#: the mask planes the steps set or read, by name
PLANE_NAMES = ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "NO_DATA", "STREAK")


def _rss_high_water_mb() -> float:
    """The process's resident-set high-water mark (``VmHWM``), MB; NaN where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _reset_high_water() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0: ``5`` into
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StepProfile:
    """CPU (``time.process_time``), wall (``time.perf_counter``) and peak memory of each calibrate step.

    Steps are named and may nest (a kernel's phase inside a step): a step's CPU and wall are its own,
    without the nested steps' (so the rows add up to the whole), and a step that runs several times
    sums its runs. The peak memory of a step is the process's resident-set high-water mark while it
    ran (its nested steps included), read from the kernel, which resets the mark at each step
    boundary (``/proc/self/clear_refs``): exact, and no sampling thread. With ``memory=False``
    (or where the mark cannot be reset) peaks are NaN. Not thread-safe: one calibrate per profile.

    ``cpu_clock`` is the CPU clock read at step boundaries: the process's (default; a benchmark
    alone in its process) or ``time.thread_time`` where other threads of the process run other
    work (a worker running several quanta). There ``memory=False``: the high-water mark is the
    process's, and resetting it would disturb whoever else reads it.
    """

    def __init__(self, memory: bool = True, cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.cpu_clock = cpu_clock
        self.memory = bool(memory) and _reset_high_water()
        self.rows: dict[str, list[float]] = {}
        self._stack: list[list[float]] = []  # per open step: [child cpu, child wall, peak MB]
        self.peak_mb = float("nan")
        self.start_rss_mb = float("nan")

    def _fold_peak(self) -> float:
        """The high-water mark since the last reset, folded into every open step's peak, then reset."""
        hwm = _rss_high_water_mb()
        for frame in self._stack:
            frame[2] = hwm if np.isnan(frame[2]) else max(frame[2], hwm)
        _reset_high_water()
        return hwm

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.memory:
            if not self._stack:
                self.start_rss_mb = _rss_high_water_mb() if np.isnan(self.start_rss_mb) else self.start_rss_mb
            self._fold_peak()
        frame = [0.0, 0.0, float("nan")]
        self._stack.append(frame)
        c0, w0 = self.cpu_clock(), time.perf_counter()
        try:
            yield
        finally:
            cpu, wall = self.cpu_clock() - c0, time.perf_counter() - w0
            if self.memory:
                self._fold_peak()
            self._stack.pop()
            row = self.rows.setdefault(name, [0.0, 0.0, float("nan"), 0])
            row[0] += cpu - frame[0]
            row[1] += wall - frame[1]
            row[2] = max(row[2], frame[2]) if not np.isnan(row[2]) else frame[2]
            row[3] += 1
            if self._stack:
                parent = self._stack[-1]
                parent[0] += cpu
                parent[1] += wall
                parent[2] = max(parent[2], frame[2]) if not np.isnan(parent[2]) else frame[2]
            elif self.memory:
                self.peak_mb = frame[2] if np.isnan(self.peak_mb) else max(self.peak_mb, frame[2])

    def table(self) -> list[dict[str, Any]]:
        """One dict per step in the order first run: ``step``, ``calls``, ``cpu_s``, ``wall_s``, ``peak_mb``."""
        return [
            {"step": k, "calls": int(v[3]), "cpu_s": v[0], "wall_s": v[1], "peak_mb": v[2]}
            for k, v in self.rows.items()
        ]

    def records(self, digits: int = 3) -> list[dict[str, Any]]:
        """:meth:`table` as JSON-able records (times rounded to ``digits`` decimals; ``peak_mb`` only when
        memory was profiled), for a quantum's metadata."""
        out = []
        for r in self.table():
            rec = {"step": r["step"], "calls": r["calls"], "cpu_s": round(r["cpu_s"], digits)}
            rec["wall_s"] = round(r["wall_s"], digits)
            if np.isfinite(r["peak_mb"]):
                rec["peak_mb"] = round(r["peak_mb"], 1)
            out.append(rec)
        return out


def timed(profile: StepProfile | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``profile.step(name)``, or a context that does nothing without a profile."""
    return contextlib.nullcontext() if profile is None else profile.step(name)


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
    """Input image, float32, non-finite or zero-variance pixels set to 0 (the input array itself when it
    is float32 without such pixels: the steps never write it)."""
    mask: np.ndarray
    """Mask plane, uint32, planes named by ``planes``."""
    planes: MaskPlanes
    bit: dict[str, int]
    """Bit value of each plane of ``PLANE_NAMES``."""
    bad_input: tuple[np.ndarray, np.ndarray]
    """Pixels whose input value or variance was unusable (NO_DATA): their (y, x) coordinates (few), an
    index of the planes (``sub[state.bad_input] = 0``)."""
    var_det: np.ndarray
    """Variance used by detection and measurement, float32: 0 where the input's is unusable (the only
    variance plane the state holds; :attr:`variance` is the calexp's)."""
    xy0: tuple[int, int] = (0, 0)
    profile: StepProfile | None = field(default=None, repr=False)
    """Per-step CPU, wall and peak memory, recorded when set (``calibrate_exposure(profile=...)``)."""
    exposure: Exposure = _later()
    """The computed input exposure, for its metadata (unset when the steps run on bare arrays): its image
    is ``image``'s, its variance and mask are read-only placeholders (NaN, 0) holding no memory."""

    # background and cosmic rays
    sub: np.ndarray = _later()
    background_first: Background | None = None
    """The first-pass background, until the second pass replaces it (then None)."""
    background: Background = _later()
    cosmic_rays: CosmicRayResult | None = None
    """L.A.Cosmic's result (None when cosmic rays are not searched), without its image and variance
    planes (None: the repaired values are in ``sub`` and ``var_det``)."""
    n_cr: int = 0
    n_cr_sources: int = 0
    # detection
    sigma0: float = float("nan")
    """Gaussian sigma of the first seeing guess, pixels."""
    sigma: float = float("nan")
    """Gaussian sigma of the stellar locus, pixels."""
    det: DetectionResult = _later()
    """The final detections; ``significance``, ``detected`` and ``footprints`` are empty (0 x 0): the
    DETECTED plane of ``mask`` holds the grown footprints, and a footprint's pixels are those of its
    children (``child_parent[det.children]`` is the footprint label of a pixel)."""
    child_parent: np.ndarray = _later()
    """Footprint (parent) label of each child label of ``det.children`` (0 for 0), int32, kept whole
    when detections are dropped."""
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
    def variance(self) -> np.ndarray:
        """Variance plane of the calexp, float32 (a new array): ``var_det`` with inf where the input was
        unusable and no cosmic-ray repair gave a value. The steps keep one variance plane (``var_det``,
        repaired in place); this one is made when the calexp is."""
        out = self.var_det.copy()
        ys, xs = self.bad_input
        if ys.size:
            repaired = (self.mask[ys, xs] & np.uint32(self.bit["CR"])) != 0
            out[ys[~repaired], xs[~repaired]] = np.float32(np.inf)
        return out

    def background_at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The final background model at integer pixels (ys, xs), float32: the values of its plane, from
        the mesh when the plane was released (:func:`release_background_plane`)."""
        bkg = self.background
        if bkg.background.strides != (0, 0):
            return bkg.background[ys, xs]
        ny, nx = bkg.background.shape
        by, bx = bkg.box_size
        ys = np.asarray(ys, dtype=np.int64)
        xs = np.asarray(xs, dtype=np.int64)
        return interpolate_mesh_at(
            np.asarray(bkg.mesh_background, dtype=np.float64), ny, nx, by, bx, ys.ravel(), xs.ravel()
        ).reshape(ys.shape)

    @property
    def n_det(self) -> int:
        """Number of detections (0 before detection)."""
        det = getattr(self, "det", None)
        return 0 if det is None else len(det.x)


def release_background_plane(bkg: Background) -> Background:
    """``bkg`` without its whole-frame background plane: in its place a read-only NaN array of the same
    shape that holds no memory (a broadcast scalar); :meth:`CalibrateState.background_at` evaluates the
    model from the mesh (the same float32 values as the plane)."""
    return bkg._replace(background=np.broadcast_to(np.float32(np.nan), bkg.background.shape))


def restore_background_plane(bkg: Background) -> Background:
    """``bkg`` with its whole-frame plane again (after :func:`release_background_plane`): the mesh
    interpolated as ``estimate_background`` did (the same float32 values)."""
    if bkg.background.strides != (0, 0):
        return bkg
    ny, nx = bkg.background.shape
    by, bx = bkg.box_size
    plane = interpolate_mesh(np.asarray(bkg.mesh_background, dtype=np.float64), ny, nx, by, bx)
    return bkg._replace(background=plane)
