"""``generic``: any FITS image with a celestial WCS, and calibration frames.

Each 2-d image HDU with a celestial WCS becomes one detector. Variance comes from a
``VARIANCE`` HDU, or ``1/w`` of a ``WEIGHT``/``IVAR`` HDU, or else is estimated as the
clipped background noise plus the Poisson term of the sources when the header gives a
``GAIN``. NaN pixels are masked NO_DATA and pixels at or above ``SATURATE`` are masked SAT.

Calibration frames are recognised by ``IMAGETYP``/``OBSTYPE`` (``zero``/``bias``, ``dark``,
``flat``, ``dome flat`` ...; see :func:`procsky.instruments.base.calibration_kind`) and
need no WCS. A single exposure becomes ``bias_frame`` / ``dark_frame`` / ``flat_frame``
with data ID {instrument, visit, detector} (+ band, physical_filter for flats; the visit is
``EXPNUM``/``EXPID``/... or a hash of ``DATE-OBS``), keeping ``DATASEC``/``BIASSEC`` for
the ISR. A combined frame (``NCOMBINE`` > 1, or ``master`` in ``IMAGETYP``/``PRODTYPE``/
``PROCTYPE``) becomes the master ``bias`` / ``dark`` / ``flat`` with data ID {instrument,
detector} (+ band, physical_filter for flats); a master dark with ``EXPTIME`` is scaled
by the ISR by the ratio of exposure times, one without is taken as a rate per second.
"""

from __future__ import annotations

import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from procsky.errors import ProcskyValueError
from procsky.exposure import Exposure, VisitInfo
from procsky.instruments.base import (
    CALIB_FRAME_DATASET_TYPES,
    INGESTED_DATASET_TYPE,
    IngestItem,
    Instrument,
    calib_frame_exposure,
    calib_frame_records,
    calibration_kind,
    header_float,
    is_master_calibration,
    open_fits,
    register_instrument,
)
from procsky.masks import DEFAULT_PLANES
from procsky.wcs import has_celestial_wcs, wcs_cards

__all__ = ["GenericInstrument", "header_float", "visit_info_from_header", "robust_sigma"]

_VAR_NAMES = {"VARIANCE", "VAR"}
_WEIGHT_NAMES = {"WEIGHT", "WHT", "IVAR", "INVVAR", "WEIGHTS"}
_MASK_NAMES = {"MASK", "DQ", "BPM", "FLAGS"}


def _sexagesimal(value, hours: bool) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    import astropy.units as u
    from astropy.coordinates import Angle

    try:
        return Angle(str(value), unit=u.hourangle if hours else u.deg).deg
    except ValueError:
        return float("nan")


def visit_info_from_header(header, *, instrument: str, band: str, physical_filter: str, visit: int) -> VisitInfo:
    """A VisitInfo from common FITS keywords (EXPTIME, MJD-OBS, AIRMASS, RA/DEC, ...)."""
    mjd = header_float(header, "MJD-OBS", "MJD", "MJDSTART")
    exptime = header_float(header, "EXPTIME", "EXPOSURE", "ITIME")
    if np.isfinite(mjd) and np.isfinite(exptime) and "MJD-OBS" in header:
        mjd = mjd + 0.5 * exptime / 86400.0  # MJD-OBS is the start; VisitInfo wants the midpoint
    return VisitInfo(
        exposure_time=exptime,
        mjd=mjd,
        band=band,
        physical_filter=physical_filter,
        airmass=header_float(header, "AIRMASS", "SECZ"),
        boresight_ra=_sexagesimal(header.get("TELRA", header.get("RA")), hours=True),
        boresight_dec=_sexagesimal(header.get("TELDEC", header.get("DEC")), hours=False),
        rotation_angle=header_float(header, "ROTANGLE", "ROTSKYPA", default=float("nan")),
        observatory=str(header.get("OBSERVAT", header.get("TELESCOP", ""))).strip(),
        instrument=instrument,
        visit=int(visit),
    )


def robust_sigma(data: np.ndarray) -> float:
    """1.4826 x median absolute deviation of the finite values, clipped once at 5 sigma."""
    v = data[np.isfinite(data)]
    if v.size == 0:
        return float("nan")
    med = np.median(v)
    s = 1.4826 * np.median(np.abs(v - med))
    if s > 0:
        v = v[np.abs(v - med) < 5 * s]
        med = np.median(v)
        s = 1.4826 * np.median(np.abs(v - med))
    return float(s)


def _stable_visit(header, path: Path) -> int:
    for key in ("VISIT", "EXPNUM", "EXPID", "FRAMENUM"):
        if key in header:
            try:
                value = int(header[key])
                if value > 0:
                    return value
            except (TypeError, ValueError):
                pass
    digits = re.sub(r"\D", "", str(header.get("OBSID", "")))
    if digits:
        return int(digits[-15:])
    key = str(header.get("DATE-OBS", "")) + str(header.get("MJD-OBS", "")) or path.name
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


@register_instrument
class GenericInstrument(Instrument):
    """Any FITS image with a celestial WCS."""

    name = "generic"
    description = "any FITS image with a celestial WCS (one detector per image HDU)"

    def ingest_file(self, path) -> list[IngestItem]:
        path = Path(path)
        hdul = open_fits(path)
        with hdul:
            names = [h.name.upper() for h in hdul]
            if {"IMAGE", "MASK", "VARIANCE"} <= set(names):
                exp = Exposure.read(path)
                kind = calibration_kind(hdul[0].header)
                if kind is not None:
                    return [self._procsky_calib_item(exp, hdul[0].header, path, kind)]
                return [self._item_from_exposure(exp, hdul[0].header, path, 0)]
            primary = hdul[0].header
            planes = [
                i
                for i, h in enumerate(hdul)
                if h.data is not None
                and getattr(h.data, "ndim", 0) == 2
                and h.name.upper() not in _VAR_NAMES | _WEIGHT_NAMES | _MASK_NAMES
            ]
            if not planes:
                raise ProcskyValueError(f"{path} has no 2-d image HDU to ingest")
            items = []
            for n, i in enumerate(planes):
                header = hdul[i].header.copy()
                if i != 0:
                    for card in primary.cards:
                        if card.keyword not in header and card.keyword not in (
                            "SIMPLE",
                            "EXTEND",
                            "NAXIS",
                            "BITPIX",
                            "COMMENT",
                            "HISTORY",
                            "",
                        ):
                            header.append(card)
                kind = calibration_kind(header)
                if kind is not None:
                    det = int(header.get("CCDNUM", n)) if str(header.get("CCDNUM", n)).isdigit() else n
                    items.append(self._calib_item(path, header, hdul, i, kind, det))
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ok = has_celestial_wcs(header)
                if not ok:
                    raise ProcskyValueError(
                        f"{path} HDU {i} has no celestial WCS (CTYPE/CRVAL/CD cards); the 'generic' instrument "
                        "needs one. Solve the astrometry first (e.g. astrometry.net) or use an instrument "
                        "definition that supplies a WCS."
                    )
                image = np.asarray(hdul[i].data, dtype=np.float32)
                variance = self._variance(hdul, header, image)
                mask = np.zeros(image.shape, dtype=np.uint32)
                mask[~np.isfinite(image)] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
                sat = header_float(header, "SATURATE", "SATURATA")
                if np.isfinite(sat):
                    with np.errstate(invalid="ignore"):
                        mask[image >= sat] |= np.uint32(1 << DEFAULT_PLANES["SAT"])
                image = np.where(np.isfinite(image), image, 0).astype(np.float32)
                det = int(header.get("CCDNUM", n)) if str(header.get("CCDNUM", n)).isdigit() else n
                items.append(self._item(path, header, image, variance, mask, det))
            return items

    # -- calibration frames ------------------------------------------------------------
    def _calib_filter(self, header, kind):
        if kind != "flat":
            return "", ""
        physical_filter = str(header.get("FILTER", header.get("BAND", "unknown"))).strip() or "unknown"
        try:
            band = str(header.get("BAND", "")).strip() or self.band_of(physical_filter)
        except ProcskyValueError:
            band = "unknown"
        return band, physical_filter

    def _calib_item(self, path, header, hdul, index, kind, detector) -> IngestItem:
        """One calibration HDU: a raw exposure (``<kind>_frame``) or a master (``<kind>``)."""
        band, physical_filter = self._calib_filter(header, kind)
        det = {
            "id": int(detector),
            "name": str(header.get("EXTNAME", header.get("CCDNAME", header.get("DETNAME", detector)))),
            "gain": header_float(header, "GAIN", "EGAIN", default=1.0),
            "read_noise": header_float(header, "RDNOISE", "READNOIS", "RON", default=0.0),
            "saturation": header_float(header, "SATURATE", "SATURATA"),
        }
        det = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in det.items()}
        data = np.asarray(hdul[index].data, dtype=np.float64)
        data_id = {"instrument": self.name, "detector": int(detector)}
        if kind == "flat":
            data_id.update(band=band, physical_filter=physical_filter)
        records: dict[str, list[dict]] = {
            "instrument": [{"instrument": self.name}],
            "detector": [{"instrument": self.name, "detector": int(detector), "name": str(det["name"])}],
        }
        if kind == "flat":
            records["band"] = [{"band": band}]
            records["physical_filter"] = [{"instrument": self.name, "physical_filter": physical_filter, "band": band}]
        if is_master_calibration(header):
            names = [h.name.upper() for h in hdul]
            var = next((np.asarray(hdul[nm].data, dtype=np.float32) for nm in _VAR_NAMES if nm in names), None)
            image = np.where(np.isfinite(data), data, 0.0).astype(np.float32)
            mask = np.zeros(image.shape, dtype=np.uint32)
            mask[~np.isfinite(data)] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
            exptime = header_float(header, "EXPTIME", "EXPOSURE", "DARKTIME")
            vi = VisitInfo(exposure_time=exptime, band=band, physical_filter=physical_filter, instrument=self.name)
            exp = Exposure(
                image,
                var,
                mask,
                visit_info=vi,
                detector=det,
                metadata={"imagetyp": kind, "master": True, "source_file": str(path.resolve())},
            )
            return IngestItem(kind, data_id, exp, records)
        visit = _stable_visit(header, path)
        exp = calib_frame_exposure(
            data,
            header,
            instrument=self.name,
            detector=det,
            visit=visit,
            band=band,
            physical_filter=physical_filter,
            source=path,
        )
        data_id["visit"] = visit
        records.update(calib_frame_records(self.name, kind, visit, exp, physical_filter, band))
        return IngestItem(CALIB_FRAME_DATASET_TYPES[kind], data_id, exp, records)

    def _procsky_calib_item(self, exp, header, path, kind) -> IngestItem:
        """A procsky-format calibration exposure: a master unless it still has its overscan."""
        band, physical_filter = self._calib_filter(header, kind)
        detector = int(exp.detector.get("id", 0)) if exp.detector else 0
        data_id = {"instrument": self.name, "detector": detector}
        if kind == "flat":
            data_id.update(band=band, physical_filter=physical_filter)
        records: dict[str, list[dict]] = {
            "instrument": [{"instrument": self.name}],
            "detector": [
                {"instrument": self.name, "detector": detector, "name": str(exp.detector.get("name", detector))}
            ],
        }
        has_overscan = "biassec" in (exp.detector or {}) or "biassec" in (exp.metadata or {})
        if is_master_calibration(header) or not has_overscan:
            return IngestItem(kind, data_id, exp, records)
        visit = (
            exp.visit_info.visit if exp.visit_info and exp.visit_info.visit is not None else _stable_visit(header, path)
        )
        data_id["visit"] = int(visit)
        records.update(calib_frame_records(self.name, kind, int(visit), exp, physical_filter, band))
        return IngestItem(CALIB_FRAME_DATASET_TYPES[kind], data_id, exp, records)

    def _variance(self, hdul, header, image):
        names = [h.name.upper() for h in hdul]
        for nm in _VAR_NAMES:
            if nm in names:
                return np.asarray(hdul[nm].data, dtype=np.float32)
        for nm in _WEIGHT_NAMES:
            if nm in names:
                w = np.asarray(hdul[nm].data, dtype=np.float64)
                with np.errstate(divide="ignore"):
                    return np.where(w > 0, 1.0 / w, np.nan).astype(np.float32)
        sigma = robust_sigma(image)
        var = np.full(image.shape, sigma**2, dtype=np.float64)
        gain = header_float(header, "GAIN", "EGAIN")
        if np.isfinite(gain) and gain > 0:
            med = np.nanmedian(image)
            var += np.clip(image - med, 0, None) / gain
        return var.astype(np.float32)

    def _item(self, path, header, image, variance, mask, detector) -> IngestItem:
        physical_filter = str(header.get("FILTER", header.get("BAND", "unknown"))).strip() or "unknown"
        try:
            band = str(header.get("BAND", "")).strip() or self.band_of(physical_filter)
        except ProcskyValueError:
            band = "unknown"
        visit = _stable_visit(header, path)
        vi = visit_info_from_header(
            header, instrument=self.name, band=band, physical_filter=physical_filter, visit=visit
        )
        gain = header_float(header, "GAIN", default=1.0)
        det = {
            "id": int(detector),
            "name": str(header.get("EXTNAME", header.get("CCDNAME", detector))),
            "gain": gain,
            "read_noise": header_float(header, "RDNOISE", default=0.0),
            "saturation": header_float(header, "SATURATE"),
        }
        exp = Exposure(
            image,
            variance,
            mask,
            wcs_cards=wcs_cards(header),
            visit_info=vi,
            detector={k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in det.items()},
            metadata={"source_file": str(path.resolve())},
        )
        return self._item_from_exposure(
            exp, header, path, detector, band=band, physical_filter=physical_filter, visit=visit
        )

    def _item_from_exposure(self, exp, header, path, detector, *, band=None, physical_filter=None, visit=None):
        vi = exp.visit_info
        band = band or (vi.band if vi and vi.band else "unknown")
        physical_filter = physical_filter or (vi.physical_filter if vi and vi.physical_filter else band)
        visit = (
            visit if visit is not None else (vi.visit if vi and vi.visit is not None else _stable_visit(header, path))
        )
        detector = int(exp.detector.get("id", detector)) if exp.detector else int(detector)
        data_id = {
            "instrument": self.name,
            "visit": int(visit),
            "detector": detector,
            "band": band,
            "physical_filter": physical_filter,
        }
        return IngestItem(INGESTED_DATASET_TYPE, data_id, exp, _records(self.name, exp, data_id))


def _records(instrument: str, exp: Exposure, data_id: dict) -> dict[str, list[dict]]:
    vi = exp.visit_info
    visit = {
        "instrument": instrument,
        "visit": data_id["visit"],
        "band": data_id["band"],
        "physical_filter": data_id["physical_filter"],
    }
    if vi is not None:
        for k in ("mjd", "exposure_time", "airmass", "boresight_ra", "boresight_dec", "rotation_angle"):
            v = getattr(vi, k)
            visit[k] = None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)
    # Detector records hold only what never changes between exposures; per-exposure values
    # (gain from the header, cut-out size) stay in the exposure's ``detector`` dict.
    det = {
        "instrument": instrument,
        "detector": data_id["detector"],
        "name": str(exp.detector.get("name", data_id["detector"])),
    }
    return {
        "instrument": [{"instrument": instrument}],
        "band": [{"band": data_id["band"]}],
        "physical_filter": [
            {"instrument": instrument, "physical_filter": data_id["physical_filter"], "band": data_id["band"]}
        ],
        "visit": [visit],
        "detector": [det],
    }
