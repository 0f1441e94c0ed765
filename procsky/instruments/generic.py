"""``generic``: any FITS image with a celestial WCS, and calibration frames.

Each 2-d image HDU with a celestial WCS becomes one detector. What is read from which
keyword, the filter -> band table and the options are documented in ``docs/ingest.md``;
in short:

* **Variance** from a companion file (``weight_pattern`` with ``weight_kind`` ``invvar`` /
  ``variance`` / ``rms``), else a ``VARIANCE`` HDU, else ``1/w`` of a ``WEIGHT``/``IVAR``
  HDU, else the clipped background noise plus the Poisson term of the sources when the
  header gives a ``GAIN``.
* **Mask**: NaN pixels are NO_DATA, pixels at or above ``SATURATE`` are SAT, and the values
  of a companion mask file (``mask_pattern``) or of a ``MASK``/``DQ``/``BPM``/``FLAGS`` HDU
  map to mask planes (``mask_planes`` bit -> plane; any other nonzero value -> BAD).
* **Band** from ``FILTER`` through the user's ``band_map``, the ``BAND`` keyword, then the
  default table (:func:`filter_to_band`); ``physical_filter`` keeps the raw ``FILTER``.
* **PhotoCalib** from the first zero-point keyword found (:data:`ZERO_POINT_KEYWORDS`).
* **Visit** from ``visit_key`` when given, else ``VISIT``/``EXPNUM``/``EXPID``/``FRAMENUM``,
  the digits of ``OBSID``, or a hash of ``DATE-OBS`` + ``MJD-OBS``.

Options are the fields of :class:`GenericIngestConfig`, passed as keywords:
``ingest_files(repo, files, "generic", band_map={"Halpha": "N656"}, visit_key="EXPID")``.

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
from typing import Literal

import numpy as np
import pydantic

from procsky.errors import ProcskyFileError, ProcskyValueError
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
from procsky.photocalib import PhotoCalib
from procsky.wcs import has_celestial_wcs, wcs_cards

__all__ = [
    "GenericInstrument",
    "GenericIngestConfig",
    "ZERO_POINT_KEYWORDS",
    "filter_to_band",
    "zero_point_from_header",
    "companion_path",
    "mask_from_values",
    "variance_from_weight",
    "header_float",
    "visit_info_from_header",
    "robust_sigma",
]

_VAR_NAMES = {"VARIANCE", "VAR"}
_WEIGHT_NAMES = {"WEIGHT", "WHT", "IVAR", "INVVAR", "WEIGHTS"}
_MASK_NAMES = {"MASK", "DQ", "BPM", "FLAGS"}


# -- options ---------------------------------------------------------------------------
class GenericIngestConfig(pydantic.BaseModel):
    """Options of the ``generic`` instrument (``docs/ingest.md``); all optional."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    band_map: dict[str, str] = {}
    """Physical filter (the ``FILTER`` value) -> band, tried before the ``BAND`` keyword and the
    default table: exact value, then case/space-insensitive, then the longest key that starts it."""
    unmatched_filter: Literal["error", "unknown", "keep"] = "error"
    """A ``FILTER`` that neither ``band_map``, ``BAND`` nor the default table maps: stop with an error
    naming it (default), use band ``unknown``, or keep the filter value itself as the band."""
    filter_key: str | None = None
    """Header keyword of the filter; default the first of ``FILTER``, ``FILTNAME``, ``FILTER01``."""
    zero_point_key: str | None = None
    """Header keyword of the zero point, tried before :data:`ZERO_POINT_KEYWORDS`."""
    zero_point_unit: Literal["auto", "image", "per-second"] = "auto"
    """``image``: the zero point is the AB magnitude of one count of the image as stored; ``per-second``:
    of one count per second, so ``+2.5 log10(EXPTIME)`` is added for an image in counts; ``auto``: image
    units unless the keyword is one known to be per second (``IMAGEZPT``) or its comment says so."""
    mask_pattern: str | None = None
    """Companion mask file, relative to the image's folder: a ``str.format`` pattern with ``{stem}`` (file name
    without ``.fits[.gz|.fz]``) and ``{name}`` (``"{stem}_mask.fits"``), or ``s/REGEX/REPLACEMENT/`` applied to
    the file name (``"s/sciimg/mskimg/"``); see :func:`companion_path`."""
    mask_planes: dict[int, str] = {}
    """Mask bit (0-31) -> procsky plane (``BAD``, ``SAT``, ``CR`` ...) for the mask file or HDU; plane ``none``
    ignores the bit (a bit that marks sources, not defects)."""
    mask_default_plane: str | None = "BAD"
    """Plane of the nonzero mask values no ``mask_planes`` bit covers; ``None`` ignores them."""
    mask_good_nonzero: bool = False
    """The mask marks good pixels (nonzero = good, e.g. a coverage map): zeros get ``mask_default_plane``."""
    weight_pattern: str | None = None
    """Companion weight file, a pattern as ``mask_pattern``: ``"{stem}.weight.fits"``."""
    weight_kind: Literal["invvar", "variance", "rms"] = "invvar"
    """What the weight file holds: inverse variance, variance, or noise sigma (image units)."""
    visit_key: str | None = None
    """Header keyword whose value is the exposure (visit) id: an integer, or any string (hashed)."""

    @pydantic.field_validator("band_map")
    @classmethod
    def _check_bands(cls, v: dict[str, str]) -> dict[str, str]:
        for f, b in v.items():
            if not str(f).strip() or not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(b)):
                raise ValueError(f"band_map entry {f!r} -> {b!r}: a filter and a band name (letters, digits, _.+-)")
        return v

    @pydantic.field_validator("mask_planes")
    @classmethod
    def _check_planes(cls, v: dict[int, str]) -> dict[int, str]:
        for b, plane in v.items():
            if not 0 <= int(b) < 32:
                raise ValueError(f"mask bit {b} is not 0-31")
            if plane.lower() != "none":
                DEFAULT_PLANES[plane]  # raises with the known planes
        return v

    @pydantic.field_validator("mask_default_plane")
    @classmethod
    def _check_default(cls, v: str | None) -> str | None:
        if v is None or v.lower() == "none":
            return None
        DEFAULT_PLANES[v]
        return v


# -- filter -> band --------------------------------------------------------------------
# Rules on the lower-cased filter name (or its first word, for DECam-style
# "r DECam SDSS c0002 6430.0 1500.0"): first match wins.
_BAND_RULES: tuple[tuple[str, str], ...] = (
    (r"(?:ztf|ptf)[ _-]?([gri])", r"\1"),  # ZTF_g, ZTF_r, ZTF_i
    (r"z([gri])", r"\1"),  # ZTF short codes zg, zr, zi
    (r"hsc[ _-]?([grizy])2?", r"\1"),  # HSC-G, HSC-R2, HSC-I2, HSC-Z, HSC-Y
    (r"sdss[ _-]?([ugriz])['′]?", r"\1"),  # SDSS g, sdss_r'
    (r"([ugriz])(?:'|′|p|prime|[ _-]?sdss)", r"\1"),  # g', rp, iprime, r_sdss
    (r"([grizyw])\.0+", r"\1"),  # Pan-STARRS g.00000
    (r"(?:johnson|cousins|bessell?)[ _-]?([ubvri])c?", "JC"),  # Johnson V, Cousins R, Bessell-I
    (r"(?:clear|open|none|empty)", "clear"),
)
#: Single names kept as they are, case-sensitive: SDSS/LSST/DECam ugrizy (Y -> y), Johnson-Cousins
#: UBVRI (Rc, Ic -> R, I), near-IR JHK (Ks), DECam VR, Pan-STARRS w, ATLAS o and c, GOTO L.
_BAND_NAMES = {
    **{b: b for b in "ugrizy"},
    "Y": "y",
    **{b: b for b in "UBVRI"},
    "Rc": "R",
    "Ic": "I",
    **{b: b for b in ("J", "H", "K", "Ks")},
    "VR": "VR",
    "w": "w",
    "o": "o",
    "c": "c",
    "L": "L",
}


def _default_band(name: str) -> str | None:
    for cand in dict.fromkeys([name.strip(), name.strip().split()[0] if name.strip() else ""]):
        if not cand:
            continue
        if cand in _BAND_NAMES:
            return _BAND_NAMES[cand]
        low = cand.lower()
        for pattern, repl in _BAND_RULES:
            m = re.fullmatch(pattern, low)
            if m:
                return m.group(1).upper() if repl == "JC" else m.expand(repl)
    return None


def _norm(s: str) -> str:
    return " ".join(str(s).lower().split())


def filter_to_band(physical_filter: str, band_map: dict[str, str] | None = None) -> str | None:
    """The band of a physical filter name, or ``None`` when nothing maps it.

    ``band_map`` (user entries) is tried first: the exact name, then ignoring case and
    repeated spaces, then the longest key the name starts with. Then the default table:
    ZTF ``ZTF_r``/``zr`` -> r, DECam ``r DECam SDSS c0002 6430.0 1500.0`` -> r (first word),
    ``g'``/``gp``/``SDSS g`` -> g, HSC ``HSC-R2``/``HSC-I`` -> r/i, Pan-STARRS ``g.00000`` -> g,
    single ``u g r i z y`` (``Y`` -> y), Johnson-Cousins ``U B V R I`` (and ``Johnson V``,
    ``Rc``) keep their upper-case names (they are not SDSS bands: map them with ``band_map``
    to calibrate against an SDSS-system catalogue), ``J H K Ks``, DECam ``VR``, ATLAS ``o``/``c``,
    ``clear``/``open`` -> clear.
    """
    f = str(physical_filter or "").strip()
    if band_map:
        if f in band_map:
            return band_map[f]
        normed = {_norm(k): v for k, v in band_map.items()}
        if _norm(f) in normed:
            return normed[_norm(f)]
        for key in sorted(normed, key=len, reverse=True):
            if _norm(f).startswith(key):
                return normed[key]
    return _default_band(f) if f else None


# -- zero point ------------------------------------------------------------------------
#: Zero-point keywords in order of precedence, with whether each is per second of exposure
#: by definition (PTF's ``IMAGEZPT``; legacypipe adds ``2.5 log10(EXPTIME)`` to it). The others
#: are the AB magnitude of one count of the image as stored: ZTF/PTF ``MAGZP`` (IPAC), ESO
#: Phase 3 ``PHOTZP``, ``MAGZERO`` (procsky, SWarp/SCAMP users, DECam CP), then looser names.
#: ``FLUXMAG0`` (LSST/SDSS: counts of a 0 mag source) gives ``2.5 log10(FLUXMAG0)``.
ZERO_POINT_KEYWORDS: tuple[tuple[str, bool], ...] = (
    ("MAGZP", False),
    ("PHOTZP", False),
    ("MAGZERO", False),
    ("MAGZPT", False),
    ("MAG_ZP", False),
    ("MAGZEROP", False),
    ("ZPMAG", False),
    ("ZEROPT", False),
    ("ZEROPNT", False),
    ("ZPT", False),
    ("ZP", False),
    ("IMAGEZPT", True),
    ("FLUXMAG0", False),
)
_ZP_ERR_KEYS = ("{k}ERR", "{k}_ERR", "{k}UNC", "{k}ER")
_PER_SECOND = re.compile(
    r"per\s*s(ec(ond)?)?\b|/\s*s(ec)?\b|\b1\s*s(ec(ond)?)?\b|\bs\^?-1\b|counts?/s|\bcps\b", re.IGNORECASE
)


def _is_rate_unit(header) -> bool:
    return bool(_PER_SECOND.search(str(header.get("BUNIT", ""))))


def zero_point_from_header(header, config: GenericIngestConfig | None = None) -> tuple[PhotoCalib | None, dict]:
    """The PhotoCalib of the first usable zero-point keyword, and what was used.

    Returns ``(None, {})`` when no keyword holds a zero point. Values outside (0, 50) mag
    (pipelines write 0, -99 or 99 for "not calibrated") are skipped. A per-second zero point
    (see :class:`GenericIngestConfig.zero_point_unit`) of an image in counts (``BUNIT`` not a
    rate) becomes ``zp + 2.5 log10(EXPTIME)``: a source of magnitude m gives
    ``10**(-0.4 (m - zp_1s))`` counts per second, ``EXPTIME`` times as many in the image.
    The error comes from ``MAGZPUNC`` (ZTF) or ``<KEY>ERR``/``<KEY>_ERR``/``<KEY>UNC``.
    """
    config = config or GenericIngestConfig()
    keys = list(ZERO_POINT_KEYWORDS)
    if config.zero_point_key:
        keys.insert(0, (config.zero_point_key.upper(), False))
    skipped = []
    for key, per_second_by_def in keys:
        if key not in header:
            continue
        value = header_float(header, key)
        if key == "FLUXMAG0":
            zp = 2.5 * np.log10(value) if np.isfinite(value) and value > 0 else float("nan")
        else:
            zp = value
        if not (np.isfinite(zp) and 0 < zp < 50):
            skipped.append(f"{key}={header.get(key)!r}")
            continue
        if config.zero_point_unit == "auto":
            per_second = per_second_by_def or bool(_PER_SECOND.search(str(header.comments[key])))
        else:
            per_second = config.zero_point_unit == "per-second"
        info: dict = {"zero_point_keyword": key, "zero_point_header": float(value), "zero_point_per_second": per_second}
        if per_second and not _is_rate_unit(header):
            exptime = header_float(header, "EXPTIME", "EXPOSURE", "ITIME")
            if not (np.isfinite(exptime) and exptime > 0):
                raise ProcskyValueError(
                    f"zero point {key}={value} is per second but the header has no positive EXPTIME to scale it "
                    "to the image's counts; pass zero_point_unit='image' (--zero-point-unit image) if it is not"
                )
            zp += 2.5 * np.log10(exptime)
        err = header_float(header, "MAGZPUNC", *(f.format(k=key) for f in _ZP_ERR_KEYS), default=0.0)
        if key == "FLUXMAG0":
            e0 = header_float(header, "FLUXMAG0ERR", "FLUXMAG0_ERR", default=0.0)
            err = 2.5 / np.log(10.0) * e0 / value
        err = float(err) if np.isfinite(err) and err >= 0 else 0.0
        if skipped:
            info["zero_point_skipped"] = skipped
        return PhotoCalib.from_zero_point(float(zp), err), info
    return None, ({"zero_point_skipped": skipped} if skipped else {})


# -- companion files -------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".fz", ".gz", ".bz2"):
        name = name.removesuffix(suffix)
    for suffix in (".fits", ".fit", ".fts", ".FITS", ".FIT"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def companion_path(path: Path, pattern: str) -> Path:
    """The companion file of ``path`` named by ``pattern``, relative to the image's folder.

    Either a ``str.format`` pattern with ``{stem}`` (the name without ``.fits[.gz|.fz]``) and
    ``{name}`` (``"{stem}_mask.fits"``), or a substitution ``s/REGEX/REPLACEMENT/`` applied once to
    the file name (ZTF: ``s/sciimg/mskimg/``).
    """
    if pattern.startswith("s/"):
        parts = pattern.split("/")
        if len(parts) != 4 or parts[3] or not parts[1]:
            raise ProcskyValueError(f"file pattern {pattern!r}: a substitution is s/REGEX/REPLACEMENT/")
        try:
            name, n = re.subn(parts[1], parts[2], path.name, count=1)
        except re.error as e:
            raise ProcskyValueError(f"file pattern {pattern!r}: {e}") from e
        if not n:
            raise ProcskyValueError(f"file pattern {pattern!r} does not match the file name {path.name}")
    else:
        try:
            name = pattern.format(stem=_stem(path), name=path.name)
        except (KeyError, IndexError, ValueError) as e:
            raise ProcskyValueError(f"file pattern {pattern!r}: use only {{stem}} and {{name}} ({e})") from e
    out = Path(name)
    return out if out.is_absolute() else path.parent / out


def _companion_plane(path: Path, pattern: str, what: str, index: int, extname: str, shape) -> np.ndarray:
    comp = companion_path(path, pattern)
    if comp.resolve() == path.resolve():
        raise ProcskyValueError(f"{what} pattern {pattern!r} names the image {path.name} itself")
    if not comp.exists():
        raise ProcskyFileError(f"{path.name}: no {what} file {comp} (pattern {pattern!r})")
    with open_fits(comp) as hdul:
        planes = [i for i, h in enumerate(hdul) if h.data is not None and getattr(h.data, "ndim", 0) == 2]
        names = {hdul[i].name.upper(): i for i in planes}
        if extname and extname.upper() in names and extname.upper() != "PRIMARY":
            i = names[extname.upper()]
        elif index in planes:
            i = index
        elif len(planes) == 1:
            i = planes[0]
        else:
            raise ProcskyValueError(
                f"{comp}: cannot tell which of its {len(planes)} image HDUs is the {what} of {path.name} HDU {index}"
            )
        data = np.asarray(hdul[i].data)
    if data.shape != tuple(shape):
        raise ProcskyValueError(f"{what} file {comp} has shape {data.shape}, the image {path.name} {tuple(shape)}")
    return data


def variance_from_weight(weight: np.ndarray, kind: str) -> np.ndarray:
    """Variance from an inverse variance, variance or sigma map; NaN where it is not positive and finite."""
    w = np.asarray(weight, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        good = np.isfinite(w) & (w > 0)
        if kind == "invvar":
            v = 1.0 / w
        elif kind == "variance":
            v = w
        elif kind == "rms":
            v = w * w
        else:
            raise ProcskyValueError(f"weight_kind {kind!r}: use invvar, variance or rms")
    return np.where(good, v, np.nan).astype(np.float32)


def mask_from_values(values: np.ndarray, config: GenericIngestConfig | None = None) -> np.ndarray:
    """Procsky mask bits from a mask image's values.

    Each ``config.mask_planes`` bit sets its plane (``none``: nothing); any other nonzero value sets
    ``config.mask_default_plane`` (BAD). With ``mask_good_nonzero`` the zeros are the bad
    pixels. Non-finite values count as bad.
    """
    config = config or GenericIngestConfig()
    v = np.asarray(values)
    out = np.zeros(v.shape, dtype=np.uint32)
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v)
        iv = np.where(bad, 0, v).astype(np.int64)
    else:
        bad = np.zeros(v.shape, dtype=bool)
        iv = v.astype(np.int64)
    if config.mask_good_nonzero:
        bad |= iv == 0
        iv = np.zeros_like(iv)
    covered = 0
    for b, plane in config.mask_planes.items():
        covered |= 1 << int(b)
        if plane.lower() == "none":
            continue
        hit = (iv & (1 << int(b))) != 0
        out[hit] |= np.uint32(1 << DEFAULT_PLANES[plane])
    rest = bad | ((iv & ~np.int64(covered)) != 0)
    if config.mask_default_plane is not None:
        out[rest] |= np.uint32(1 << DEFAULT_PLANES[config.mask_default_plane])
    return out


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


def visit_from_header(header, path: Path, visit_key: str | None = None) -> tuple[int, str]:
    """The exposure (visit) id of a frame and the keyword it came from.

    ``visit_key`` first (an integer value as it is, any other value hashed with CRC-32;
    missing is an error), then ``VISIT``/``EXPNUM``/``EXPID``/``FRAMENUM`` (positive
    integers), the last 15 digits of ``OBSID``, else a CRC-32 hash of ``DATE-OBS`` +
    ``MJD-OBS`` (or of the file name): frames sharing DATE-OBS then share a visit.
    """
    if visit_key:
        key = visit_key.upper()
        if key not in header:
            raise ProcskyValueError(f"{path.name}: no {key} keyword in the header (visit_key={visit_key!r})")
        value = header[key]
        try:
            as_float = float(value)
            if as_float == int(as_float) and as_float >= 0:
                return int(as_float), key
        except (TypeError, ValueError, OverflowError):
            pass
        return zlib.crc32(str(value).strip().encode()) & 0x7FFFFFFF, key
    for key in ("VISIT", "EXPNUM", "EXPID", "FRAMENUM"):
        if key in header:
            try:
                value = int(header[key])
                if value > 0:
                    return value, key
            except (TypeError, ValueError):
                pass
    digits = re.sub(r"\D", "", str(header.get("OBSID", "")))
    if digits:
        return int(digits[-15:]), "OBSID"
    key = str(header.get("DATE-OBS", "")) + str(header.get("MJD-OBS", ""))
    if key:
        return zlib.crc32(key.encode()) & 0x7FFFFFFF, "DATE-OBS"
    return zlib.crc32(path.name.encode()) & 0x7FFFFFFF, "file name"


def _stable_visit(header, path: Path, visit_key: str | None = None) -> int:
    return visit_from_header(header, path, visit_key)[0]


@register_instrument
class GenericInstrument(Instrument):
    """Any FITS image with a celestial WCS."""

    name = "generic"
    description = "any FITS image with a celestial WCS (one detector per image HDU)"
    #: ``ingest_files`` may suggest ``visit_key`` when two frames get the same data ID.
    accepts_visit_key = True

    def __init__(self, config: GenericIngestConfig | None = None, **options):
        """Options: the fields of :class:`GenericIngestConfig` (or a ``config``)."""
        if config is not None and options:
            raise ProcskyValueError("pass either config or keyword options to the generic instrument, not both")
        if config is None:
            try:
                config = GenericIngestConfig(**options)
            except pydantic.ValidationError as e:
                fields = ", ".join(GenericIngestConfig.model_fields)
                raise ProcskyValueError(f"generic ingest options: {e}\nvalid options: {fields}") from None
        self.config = config

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
                extname = str(header.get("EXTNAME", "")) if i != 0 else ""
                variance = self._variance(hdul, header, image, path, i, extname)
                mask = self._mask(hdul, image, path, i, extname)
                mask[~np.isfinite(image)] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
                mask[~np.isfinite(variance)] |= np.uint32(1 << DEFAULT_PLANES["NO_DATA"])
                sat = header_float(header, "SATURATE", "SATURATA")
                if np.isfinite(sat):
                    with np.errstate(invalid="ignore"):
                        mask[image >= sat] |= np.uint32(1 << DEFAULT_PLANES["SAT"])
                image = np.where(np.isfinite(image), image, 0).astype(np.float32)
                det = int(header.get("CCDNUM", n)) if str(header.get("CCDNUM", n)).isdigit() else n
                items.append(self._item(path, header, image, variance, mask, det))
            return items

    # -- calibration frames ------------------------------------------------------------
    def _calib_filter(self, header, kind, path=None):
        if kind != "flat":
            return "", ""
        return self.band_and_filter(header, path)

    def band_and_filter(self, header, path=None) -> tuple[str, str]:
        """``(band, physical_filter)`` of a header: the raw filter value, and its band.

        The filter is ``filter_key`` or the first of ``FILTER``, ``FILTNAME``, ``FILTER01``
        (else ``BAND``; neither: ``unknown``/``unknown``). The band is ``band_map``'s, else the
        ``BAND`` keyword, else :func:`filter_to_band`'s default table, else what
        ``unmatched_filter`` says.
        """
        cfg = self.config
        keys = [cfg.filter_key.upper()] if cfg.filter_key else ["FILTER", "FILTNAME", "FILTER01"]
        raw = next((str(header[k]).strip() for k in keys if k in header and str(header[k]).strip()), "")
        header_band = str(header.get("BAND", "")).strip()
        physical_filter = raw or header_band or "unknown"
        if not raw and not header_band:
            return "unknown", "unknown"
        band = filter_to_band(raw, cfg.band_map) if cfg.band_map and raw else None
        band = band or header_band or filter_to_band(raw)
        if band:
            return band, physical_filter
        if cfg.unmatched_filter == "unknown":
            return "unknown", physical_filter
        if cfg.unmatched_filter == "keep":
            return re.sub(r"[^A-Za-z0-9_.+-]+", "_", raw).strip("_") or "unknown", physical_filter
        where = f"{Path(path).name}: " if path is not None else ""
        raise ProcskyValueError(
            f"{where}no band for filter {raw!r} ({'/'.join(keys)}): the default table does not know it. Map it "
            f"with --band-map '{raw}=BAND' (Python: band_map={{{raw!r}: 'BAND'}}), or pass --unmatched-filter "
            "unknown|keep to ingest it as band 'unknown' or under its own name (docs/ingest.md lists the table)"
        )

    def _calib_item(self, path, header, hdul, index, kind, detector) -> IngestItem:
        """One calibration HDU: a raw exposure (``<kind>_frame``) or a master (``<kind>``)."""
        band, physical_filter = self._calib_filter(header, kind, path)
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
        visit = _stable_visit(header, path, self.config.visit_key)
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
        band, physical_filter = self._calib_filter(header, kind, path)
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

    def _variance(self, hdul, header, image, path, index, extname):
        cfg = self.config
        if cfg.weight_pattern:
            w = _companion_plane(path, cfg.weight_pattern, "weight", index, extname, image.shape)
            return variance_from_weight(w, cfg.weight_kind)
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

    def _mask(self, hdul, image, path, index, extname):
        """Mask planes from the companion mask file, else a MASK/DQ/BPM/FLAGS HDU, else none."""
        cfg = self.config
        if cfg.mask_pattern:
            return mask_from_values(_companion_plane(path, cfg.mask_pattern, "mask", index, extname, image.shape), cfg)
        for h in hdul:
            if h.name.upper() in _MASK_NAMES and h.data is not None and np.shape(h.data) == image.shape:
                return mask_from_values(np.asarray(h.data), cfg)
        return np.zeros(image.shape, dtype=np.uint32)

    def _item(self, path, header, image, variance, mask, detector) -> IngestItem:
        band, physical_filter = self.band_and_filter(header, path)
        visit, visit_source = visit_from_header(header, path, self.config.visit_key)
        photocalib, zp_info = zero_point_from_header(header, self.config)
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
            photocalib=photocalib,
            metadata={"source_file": str(path.resolve()), "visit_source": visit_source, **zp_info},
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
