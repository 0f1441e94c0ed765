"""NOIRLab Community Pipeline (CP) InstCal products: DECam, 90prime (Bok), Mosaic3 (Mayall).

A CP exposure comes as three files with the same name but for the product code:
``*_ooi_*`` (image, in the CP's flux unit), ``*_oow_*`` (inverse variance) and ``*_ood_*``
(data quality). Each image HDU is one CCD with its own TPV WCS; the primary header holds
the exposure keywords. We ingest the image as an ``isr_exposure`` (instrument signature removed; what the
``isr`` task writes for raw frames), ready for ``calibrate``:

* variance = 1 / ivar; pixels with zero (or negative) weight get NO_DATA and NaN variance;
* data-quality *codes* (CP >= 3.5 writes integers, not bits; legacypipe's
  ``remap_dq_cp_codes`` documents them) map to mask planes by :data:`CP_DQ_CODES`.

Band names and visit numbers differ between the cameras: DECam and Mosaic3 give
``EXPNUM``; 90prime gives none, so its visit is the digits of ``OBSID``
(``ksb160203115029`` -> 160203115029), which is unique per exposure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np

from procsky.errors import ProcskyFileError, ProcskyValueError
from procsky.exposure import Exposure
from procsky.instruments.base import (
    INGESTED_DATASET_TYPE,
    DetectorSpec,
    IngestItem,
    Instrument,
    header_float,
    open_fits,
    register_instrument,
)
from procsky.instruments.generic import _records, visit_info_from_header
from procsky.masks import DEFAULT_PLANES
from procsky.wcs import wcs_cards

__all__ = ["CP_DQ_CODES", "CommunityPipelineInstrument", "DecamCP", "NinetyPrimeCP", "Mosaic3CP", "AnyCP"]

#: CP integer data-quality code -> procsky mask planes (names; added to the plane map when
#: not standard). 1 bad, 2 no value, 3 saturated, 4 bleed trail, 5 cosmic ray,
#: 6 low weight, 7 multi-exposure difference detection, 8 long streak.
CP_DQ_CODES: dict[int, tuple[str, ...]] = {
    1: ("BAD",),
    2: ("NO_DATA",),
    3: ("SAT",),
    4: ("SAT", "SUSPECT"),
    5: ("CR",),
    6: ("SUSPECT",),
    7: ("SUSPECT",),
    8: ("STREAK",),
}

_PRODUCT = re.compile(r"_oo([iwd])_")


class CommunityPipelineInstrument(Instrument):
    """Shared reader of CP InstCal triplets; subclasses fix the camera."""

    camera: ClassVar[str] = ""  # INSTRUME value, case-insensitive; "" = any CP camera
    pixel_scale: ClassVar[float] = 0.0  # arcsec/pixel (nominal)
    detector_shape: ClassVar[tuple[int, int]] = (0, 0)  # (ny, nx) of a full CCD

    def detector_spec(self, header) -> DetectorSpec:
        ccdnum = header.get("CCDNUM")
        name = str(header.get("DETPOS", header.get("CCDNAME", header.get("EXTNAME", ccdnum)))).strip()
        if ccdnum is None:
            digits = re.sub(r"\D", "", name)
            if not digits:
                raise ProcskyValueError(f"cannot tell the CCD number of HDU {header.get('EXTNAME')!r}")
            ccdnum = int(digits)
        gains = [header_float(header, k) for k in ("GAINA", "GAINB", "GAIN")]
        gains = [g for g in gains if np.isfinite(g)]
        sats = [header_float(header, k) for k in ("SATURATA", "SATURATB", "SATURATE")]
        sats = [s for s in sats if np.isfinite(s)]
        rns = [header_float(header, k) for k in ("RDNOISEA", "RDNOISEB", "RDNOISE")]
        rns = [r for r in rns if np.isfinite(r)]
        return DetectorSpec(
            id=int(ccdnum),
            name=name,
            nx=self.detector_shape[1],
            ny=self.detector_shape[0],
            gain=float(np.mean(gains)) if gains else 1.0,
            read_noise=float(np.mean(rns)) if rns else 0.0,
            saturation=float(min(sats)) if sats else float("inf"),
        )

    def visit_of(self, header) -> int:
        expnum = header.get("EXPNUM")
        if expnum not in (None, "", 0):
            return int(expnum)
        digits = re.sub(r"\D", "", str(header.get("OBSID", "")))
        if not digits:
            raise ProcskyValueError("CP header has neither EXPNUM nor OBSID; cannot number the visit")
        return int(digits)

    def check_camera(self, header, path) -> str:
        cam = str(header.get("INSTRUME", "")).strip()
        if str(header.get("PROCTYPE", "")).strip().lower() != "instcal":
            raise ProcskyValueError(
                f"{path} is not a CP InstCal product (PROCTYPE={header.get('PROCTYPE')!r}); "
                "use --instrument generic for other FITS images"
            )
        if self.camera and cam.lower() != self.camera.lower():
            hint = {"decam": "decam-cp", "90prime": "90prime-cp", "mosaic3": "mosaic3-cp"}.get(
                cam.lower(), "noirlab-cp"
            )
            raise ProcskyValueError(f"{path} was taken with {cam!r}, not {self.camera}; use --instrument {hint}")
        return cam

    def ingest_file(self, path) -> list[IngestItem]:
        path = Path(path)
        m = _PRODUCT.search(path.name)
        if not m:
            raise ProcskyValueError(
                f"{path.name} is not named like a CP product (expected '_ooi_' in the name, e.g. "
                "c4d_150412_073257_ooi_z_ls9.fits)"
            )
        if m.group(1) != "i":
            raise ProcskyValueError(
                f"{path.name} is a CP {'weight' if m.group(1) == 'w' else 'data-quality'} file; give the "
                "'_ooi_' image file: its '_oow_' and '_ood_' companions are found next to it"
            )
        wpath = path.with_name(_PRODUCT.sub("_oow_", path.name, count=1))
        dpath = path.with_name(_PRODUCT.sub("_ood_", path.name, count=1))
        for p, what in ((wpath, "inverse-variance (oow)"), (dpath, "data-quality (ood)")):
            if not p.exists():
                raise ProcskyFileError(f"the {what} companion of {path.name} is missing: expected {p}")
        img_hdul, w_hdul, d_hdul = open_fits(path), open_fits(wpath), open_fits(dpath)
        with img_hdul, w_hdul, d_hdul:
            primary = img_hdul[0].header
            camera = self.check_camera(primary, path)
            items = []
            for hdu in img_hdul[1:]:
                if hdu.data is None or hdu.data.ndim != 2:
                    continue
                ext = hdu.name
                if ext not in w_hdul or ext not in d_hdul:
                    raise ProcskyFileError(f"HDU {ext!r} of {path.name} has no match in its oow/ood companions")
                items.append(self._read_ccd(path, primary, hdu, w_hdul[ext].data, d_hdul[ext].data, camera))
            if not items:
                raise ProcskyValueError(f"{path} has no CCD image HDUs")
            return items

    def _read_ccd(self, path, primary, hdu, ivar, dq, camera) -> IngestItem:
        header = hdu.header
        image = np.asarray(hdu.data, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float64)
        dq = np.asarray(dq).astype(np.int64)
        if ivar.shape != image.shape or dq.shape != image.shape:
            raise ProcskyFileError(f"{path.name} HDU {hdu.name}: image, weight and DQ shapes differ")
        planes = DEFAULT_PLANES
        mask = np.zeros(image.shape, dtype=np.uint32)
        for code, names in CP_DQ_CODES.items():
            sel = dq == code
            if sel.any():
                mask[sel] |= np.uint32(planes.bitmask(names))
        unknown = np.setdiff1d(np.unique(dq), [0, *CP_DQ_CODES])
        if unknown.size:
            mask[np.isin(dq, unknown)] |= np.uint32(planes.bitmask("BAD"))
        bad_weight = ~(ivar > 0) | ~np.isfinite(ivar) | ~np.isfinite(image)
        mask[bad_weight] |= np.uint32(planes.bitmask("NO_DATA"))
        with np.errstate(divide="ignore"):
            variance = np.where(bad_weight, np.nan, 1.0 / np.where(bad_weight, 1.0, ivar)).astype(np.float32)
        image = np.where(np.isfinite(image), image, 0).astype(np.float32)

        spec = self.detector_spec(header)
        physical_filter = str(primary.get("FILTER", "")).strip()
        band = str(primary.get("BAND", "")).strip() or self.band_of(physical_filter)
        visit = self.visit_of(primary)
        inst_name = self.data_id_instrument(camera)
        vi = visit_info_from_header(
            primary, instrument=inst_name, band=band, physical_filter=physical_filter, visit=visit
        )
        metadata = {
            "source_file": str(path.resolve()),
            "cp_extname": hdu.name,
            "cp_fwhm_pix": header_float(header, "FWHM"),
            "cp_avsky": header_float(header, "AVSKY"),
            "flux_unit": str(header.get("BUNIT", "")).strip(),
        }
        metadata = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metadata.items()}
        detector = spec.to_record(inst_name)
        detector["id"] = detector.pop("detector")
        exp = Exposure(
            image,
            variance,
            mask,
            wcs_cards=wcs_cards(header),
            visit_info=vi,
            detector=detector,
            metadata=metadata,
            mask_planes=planes,
        )
        data_id = {
            "instrument": inst_name,
            "visit": visit,
            "detector": spec.id,
            "band": band,
            "physical_filter": physical_filter,
        }
        records = _records(inst_name, exp, data_id)
        records["detector"][0].update({"nx": spec.nx, "ny": spec.ny})
        return IngestItem(INGESTED_DATASET_TYPE, data_id, exp, records)

    def data_id_instrument(self, camera: str) -> str:
        return {"decam": "DECam", "90prime": "90prime", "mosaic3": "Mosaic3"}.get(camera.lower(), camera)


@register_instrument
class DecamCP(CommunityPipelineInstrument):
    name = "decam-cp"
    description = "DECam (CTIO 4 m) NOIRLab Community Pipeline InstCal ooi/oow/ood triplets"
    camera = "DECam"
    pixel_scale = 0.262
    detector_shape = (4094, 2046)
    bands = {
        "u DECam": "u",
        "g DECam": "g",
        "r DECam": "r",
        "i DECam": "i",
        "z DECam": "z",
        "Y DECam": "y",
        "VR DECam": "VR",
    }


@register_instrument
class NinetyPrimeCP(CommunityPipelineInstrument):
    name = "90prime-cp"
    description = "90prime (Bok 2.3 m) Community Pipeline InstCal triplets"
    camera = "90prime"
    pixel_scale = 0.454
    detector_shape = (4032, 4096)
    bands = {"bokr": "r", "g": "g", "r": "r"}


@register_instrument
class Mosaic3CP(CommunityPipelineInstrument):
    name = "mosaic3-cp"
    description = "Mosaic3 (Mayall 4 m) Community Pipeline InstCal triplets"
    camera = "Mosaic3"
    pixel_scale = 0.26
    detector_shape = (4096, 4096)
    bands = {"zd": "z", "z": "z"}


@register_instrument
class AnyCP(CommunityPipelineInstrument):
    name = "noirlab-cp"
    description = "any Community Pipeline InstCal triplet (camera taken from INSTRUME)"
    camera = ""
    bands = {**DecamCP.bands, **NinetyPrimeCP.bands, **Mosaic3CP.bands}
