"""``simcam``: the simulated camera drawn by :mod:`procsky.sim`.

simcam is a focal plane of ``n_detectors_x`` x ``n_detectors_y`` identical CCDs separated
by gaps, with a 0.2 arcsec/pixel plate scale by default, a cubic radial optical
distortion (a few pixels at the focal-plane corner), small per-detector placement errors,
and LSST-like filters ``u g r i z y``. Each detector's WCS is an exact TAN-SIP: the
tangent point is the boresight, ``CRPIX`` is the optical axis in that detector's pixels,
``CD`` carries the plate scale, sky rotation and detector rotation, and the SIP ``A``/``B``
polynomials carry the radial distortion ``u (1 + k |u|^2)``
(``A_3_0 = A_1_2 = B_2_1 = B_0_3 = k``).

Files (written by :func:`procsky.sim.simulate`) are procsky MEF FITS exposures whose
PRIMARY header carries ``IMAGETYP`` (``calexp``, ``raw``, ``bias``, ``dark``, ``flat``),
``DETECTOR``, ``DETNAME``, ``GAIN``, ``RDNOISE``, ``SATURATE``, ``MAGZERO`` and, for
raw, ``DATASEC``/``BIASSEC``. Units are ADU throughout (``BUNIT``); mask bits are the
LSST planes (BAD, SAT ...).

Ingest maps them to datasets: ``calexp`` files -> ``isr_exposure``, ``raw`` -> ``raw``
(per visit and detector); master calibrations (``calibs/``) -> ``bias``, ``dark`` (per
detector) and ``flat`` (per detector and filter); individual calibration exposures
(``calib_frames/``: a camera-style PRIMARY HDU of uint16 ADU with ``EXPID``, ``DATASEC``,
``BIASSEC``) -> ``bias_frame`` / ``flat_frame`` with data ID {instrument, visit=EXPID,
detector} (+ band, physical_filter for flats) and a ``visit`` record whose
``observation_type`` is ``bias`` or ``flat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from procsky.errors import ProcskyFileError
from procsky.instruments.base import (
    CALIB_FRAME_DATASET_TYPES,
    INGESTED_DATASET_TYPE,
    DetectorSpec,
    IngestItem,
    Instrument,
    calib_frame_exposure,
    calib_frame_records,
    calibration_kind,
    check_fits_complete,
    register_instrument,
)

__all__ = [
    "SimcamInstrument",
    "SimcamGeometry",
    "DetectorPlacement",
    "BAND_DATA",
    "detector_name",
    "detector_wcs",
    "focal_plane_position",
]

#: Per-band site and filter data: dark-sky brightness (AB mag/arcsec^2, LSST SRD values),
#: extinction coefficient (mag/airmass) and effective wavelength (nm).
BAND_DATA: dict[str, dict[str, float]] = {
    "u": {"sky_mag": 22.9, "extinction": 0.45, "wavelength": 367.0},
    "g": {"sky_mag": 22.3, "extinction": 0.18, "wavelength": 482.0},
    "r": {"sky_mag": 21.2, "extinction": 0.10, "wavelength": 622.0},
    "i": {"sky_mag": 20.5, "extinction": 0.07, "wavelength": 754.0},
    "z": {"sky_mag": 19.6, "extinction": 0.05, "wavelength": 869.0},
    "y": {"sky_mag": 18.6, "extinction": 0.04, "wavelength": 971.0},
}


def detector_name(row: int, col: int) -> str:
    """simcam detector names are ``R<row>C<col>``."""
    return f"R{row}C{col}"


@dataclass(frozen=True)
class DetectorPlacement:
    """Where one detector sits in the focal plane.

    Parameters
    ----------
    id : int
    name : str
    row, col : int
    centre_x, centre_y : float, focal-plane pixels
        Position of the detector centre relative to the optical axis.
    rotation : float, rad
        Rotation of the detector pixel grid relative to the focal-plane axes.
    """

    id: int
    name: str
    row: int
    col: int
    centre_x: float
    centre_y: float
    rotation: float


class SimcamGeometry:
    """The simcam focal plane for a given :class:`procsky.sim.recipe.InstrumentConfig`.

    Parameters
    ----------
    config : InstrumentConfig
    seed : int
        Seeds the small detector placement errors (fixed for a recipe and seed).
    """

    def __init__(self, config, seed: int = 0):
        self.config = config
        c = config
        self.nx, self.ny = c.detector_nx, c.detector_ny
        self.width = c.n_detectors_x * c.detector_nx + (c.n_detectors_x - 1) * c.gap_px
        self.height = c.n_detectors_y * c.detector_ny + (c.n_detectors_y - 1) * c.gap_px
        #: distance of the focal-plane corner from the optical axis, pixels
        self.corner_radius = 0.5 * math.hypot(self.width, self.height)
        # Cubic radial distortion r -> r (1 + k r^2), k set so the corner moves by distortion_px.
        self.k = c.distortion_px / self.corner_radius**3 if self.corner_radius > 0 else 0.0
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7001]))
        placements = []
        for row in range(c.n_detectors_y):
            for col in range(c.n_detectors_x):
                det = row * c.n_detectors_x + col
                cx = -0.5 * self.width + col * (c.detector_nx + c.gap_px) + 0.5 * c.detector_nx
                cy = -0.5 * self.height + row * (c.detector_ny + c.gap_px) + 0.5 * c.detector_ny
                dx, dy = rng.normal(0.0, c.placement_rms_px, 2)
                rot = math.radians(rng.normal(0.0, c.placement_rotation_rms_deg))
                placements.append(DetectorPlacement(det, detector_name(row, col), row, col, cx + dx, cy + dy, rot))
        self.detectors: list[DetectorPlacement] = placements

    @property
    def n_detectors(self) -> int:
        return len(self.detectors)

    def spec(self, detector: int) -> DetectorSpec:
        c = self.config
        d = self.detectors[detector]
        return DetectorSpec(
            id=d.id,
            name=d.name,
            nx=c.detector_nx,
            ny=c.detector_ny,
            gain=c.gain,
            read_noise=c.read_noise,
            saturation=c.full_well / c.gain,
        )

    def detector_dict(self, detector: int) -> dict:
        """The ``Exposure.detector`` description (gain e-/ADU, read noise e-, saturation ADU)."""
        s = self.spec(detector)
        d = self.detectors[detector]
        return {
            "id": s.id,
            "name": s.name,
            "nx": s.nx,
            "ny": s.ny,
            "gain": s.gain,
            "read_noise": s.read_noise,
            "saturation": s.saturation,
            "focal_plane_x": d.centre_x,
            "focal_plane_y": d.centre_y,
            "rotation_deg": math.degrees(d.rotation),
        }

    def origin_pixel(self, detector: int) -> tuple[float, float]:
        """0-based pixel position of the optical axis in this detector's pixel grid."""
        d = self.detectors[detector]
        xc, yc = 0.5 * (self.nx - 1), 0.5 * (self.ny - 1)
        c, s = math.cos(d.rotation), math.sin(d.rotation)
        # f = R (p - pc) + C  =>  p0 = pc - R^T C
        return xc - (c * d.centre_x + s * d.centre_y), yc - (-s * d.centre_x + c * d.centre_y)


def focal_plane_position(geometry: SimcamGeometry, detector: int, x, y):
    """Undistorted focal-plane position (pixels from the optical axis) of detector pixels."""
    d = geometry.detectors[detector]
    x0, y0 = geometry.origin_pixel(detector)
    u = np.asarray(x, float) - x0
    v = np.asarray(y, float) - y0
    c, s = math.cos(d.rotation), math.sin(d.rotation)
    return c * u - s * v, s * u + c * v


def detector_wcs(
    geometry: SimcamGeometry, detector: int, boresight_ra: float, boresight_dec: float, rotation_deg: float
):
    """The exact TAN-SIP WCS of one detector for one pointing.

    Parameters
    ----------
    geometry : SimcamGeometry
    detector : int
    boresight_ra, boresight_dec : float, deg
    rotation_deg : float, deg
        Sky position angle of the focal-plane +y axis (0 = north up, east left).

    Returns
    -------
    astropy.wcs.WCS
    """
    from astropy.wcs import WCS, Sip

    d = geometry.detectors[detector]
    x0, y0 = geometry.origin_pixel(detector)
    scale = geometry.config.pixel_scale / 3600.0
    t = math.radians(rotation_deg)
    # sky rotation: focal plane (fx, fy) -> (xi, eta) with east to -x at rotation 0
    sky = np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    c, s = math.cos(d.rotation), math.sin(d.rotation)
    det = np.array([[c, -s], [s, c]])
    cd = scale * sky @ det
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [boresight_ra, boresight_dec]
    w.wcs.crpix = [x0 + 1.0, y0 + 1.0]
    w.wcs.cd = cd
    w.wcs.radesys = "ICRS"
    k = geometry.k
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[3, 0] = a[1, 2] = k
    b[2, 1] = b[0, 3] = k
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.pixel_shape = (geometry.nx, geometry.ny)
    w.wcs.set()
    return w


@register_instrument
class SimcamInstrument(Instrument):
    """Ingest of files written by ``procsky sim`` (calexp, raw, bias, dark, flat)."""

    name = "simcam"
    description = "simulated camera of procsky.sim (calibrated or raw MEF FITS, ADU)"
    bands = {f"simcam-{b}": b for b in BAND_DATA}

    def ingest_file(self, path: str | Path) -> list[IngestItem]:
        from astropy.io import fits

        from procsky.exposure import Exposure

        path = Path(path)
        if not path.exists():
            raise ProcskyFileError(f"no such file: {path}")
        check_fits_complete(path)
        try:
            header = fits.getheader(path, 0)
        except OSError as e:
            raise ProcskyFileError(f"{path} is not a readable FITS file: {e}") from e
        kind = str(header.get("IMAGETYP", "")).strip().lower()
        if kind not in {"calexp", "raw"}:
            kind = calibration_kind(header) or kind
        if header.get("INSTRUME", "") != "simcam" or kind not in {"calexp", "raw", "bias", "dark", "flat"}:
            raise ProcskyFileError(
                f"{path} is not a simcam file (INSTRUME={header.get('INSTRUME')!r}, "
                f"IMAGETYP={header.get('IMAGETYP')!r}); "
                "simcam ingests the images/, calibs/ and calib_frames/ files written by `procsky sim`"
            )
        if kind in CALIB_FRAME_DATASET_TYPES and "EXPID" in header:
            return [self._calib_frame(path, header, kind)]
        exp = Exposure.read(path)
        det = int(header["DETECTOR"])
        det_record = {
            "instrument": self.name,
            "detector": det,
            "name": str(header["DETNAME"]),
            "nx": int(header["DETNX"]),
            "ny": int(header["DETNY"]),
            "gain": float(header["GAIN"]),
            "read_noise": float(header["RDNOISE"]),
            "saturation": float(header["SATURATE"]),
        }
        records: dict[str, list[dict]] = {"detector": [det_record]}
        data_id = {"instrument": self.name, "detector": det}
        if kind in ("calexp", "raw"):  # "calexp" files are ISR-removed frames: see INGESTED_DATASET_TYPE
            vi = exp.visit_info
            if vi is None or vi.visit is None:
                raise ProcskyFileError(f"{path} has no visit number (a {kind} simcam file must)")
            data_id.update(visit=int(vi.visit), band=vi.band, physical_filter=vi.physical_filter)
            records["visit"] = [
                {
                    "instrument": self.name,
                    "visit": int(vi.visit),
                    "band": vi.band,
                    "physical_filter": vi.physical_filter,
                    "mjd": vi.mjd,
                    "exposure_time": vi.exposure_time,
                    "airmass": vi.airmass,
                    "boresight_ra": vi.boresight_ra,
                    "boresight_dec": vi.boresight_dec,
                    "rotation_angle": vi.rotation_angle,
                }
            ]
        elif kind == "flat":
            band = str(header["BAND"])
            data_id.update(band=band, physical_filter=f"simcam-{band}")
        dataset_type = INGESTED_DATASET_TYPE if kind == "calexp" else kind
        return [IngestItem(dataset_type=dataset_type, data_id=data_id, obj=exp, records=records)]

    def _calib_frame(self, path: Path, header, kind: str) -> IngestItem:
        """One raw bias/dark/flat exposure of one detector (camera-style single-HDU FITS)."""
        from procsky.instruments.base import open_fits

        with open_fits(path) as hdul:
            data = hdul[0].data
            if data is None or getattr(data, "ndim", 0) != 2:
                raise ProcskyFileError(f"{path}: a simcam calibration frame has its pixels in the PRIMARY HDU")
            data = np.asarray(data, dtype=np.float64)
        det = int(header["DETECTOR"])
        detector = {
            "id": det,
            "name": str(header["DETNAME"]),
            "nx": int(header["DETNX"]),
            "ny": int(header["DETNY"]),
            "gain": float(header["GAIN"]),
            "read_noise": float(header["RDNOISE"]),
            "saturation": float(header["SATURATE"]),
        }
        visit = int(header["EXPID"])
        band = physical_filter = ""
        if kind == "flat":
            band = str(header["BAND"]).strip()
            physical_filter = str(header.get("FILTER", f"simcam-{band}")).strip()
        exp = calib_frame_exposure(
            data,
            header,
            instrument=self.name,
            detector=detector,
            visit=visit,
            band=band,
            physical_filter=physical_filter,
            source=path,
        )
        data_id = {"instrument": self.name, "visit": visit, "detector": det}
        if kind == "flat":
            data_id.update(band=band, physical_filter=physical_filter)
        records = {
            "detector": [
                {
                    "instrument": self.name,
                    "detector": det,
                    "name": detector["name"],
                    "nx": detector["nx"],
                    "ny": detector["ny"],
                    "gain": detector["gain"],
                    "read_noise": detector["read_noise"],
                    "saturation": detector["saturation"],
                }
            ]
        }
        records.update(calib_frame_records(self.name, kind, visit, exp, physical_filter, band))
        return IngestItem(dataset_type=CALIB_FRAME_DATASET_TYPES[kind], data_id=data_id, obj=exp, records=records)
