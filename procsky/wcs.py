"""World coordinate systems.

procsky uses astropy's :class:`~astropy.wcs.WCS` everywhere, but stores a WCS as the FITS
cards it came from so that nothing is lost on a round trip: astropy's ``to_header()`` drops
TPV ``PV`` distortion cards in some configurations and renames SIP projections, so the
original cards are kept verbatim beside the exposure and the WCS is rebuilt from them.

astropy WCS objects are not thread-safe (wcslib keeps internal state): call
:func:`copy_wcs` once per block or per thread before transforming.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import overload

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from procsky.errors import ProcskyValueError

__all__ = [
    "WCS_KEY_PATTERN",
    "wcs_cards",
    "wcs_from_cards",
    "copy_wcs",
    "shift_wcs",
    "has_celestial_wcs",
    "pixel_scale",
]

#: Header keywords that belong to a WCS (including SIP and TPV/PV distortion terms).
WCS_KEY_PATTERN = re.compile(
    r"^(WCSAXES|CTYPE\d|CUNIT\d|CRVAL\d|CRPIX\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJD-OBS|DATE-OBS|"
    r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|A_DMAX|B_DMAX|WCSNAME)$"
)
_KEEP_AS_CONTEXT = {"MJD-OBS", "DATE-OBS", "EPOCH"}


def _quiet_wcs(header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def wcs_cards(source) -> list[tuple[str, object, str]]:
    """The WCS cards of a header or WCS as ``[(keyword, value, comment), ...]``.

    Parameters
    ----------
    source : astropy.io.fits.Header or astropy.wcs.WCS
        A header keeps its original cards (TPV ``PV`` terms and SIP kept whole); a WCS is
        serialised with ``to_header(relax=True)`` (SIP included).
    """
    if isinstance(source, WCS):
        header = source.to_header(relax=True)
        if source.sip is not None:
            # to_header writes SIP projections as RA---TAN-SIP; keep it explicit.
            for key in ("CTYPE1", "CTYPE2"):
                if key in header and not header[key].endswith("-SIP"):
                    header[key] = header[key] + "-SIP"
    elif isinstance(source, fits.Header):
        header = source
    else:
        raise ProcskyValueError(f"cannot take WCS cards from a {type(source).__name__}; give a Header or a WCS")
    cards = []
    for card in header.cards:
        if WCS_KEY_PATTERN.match(card.keyword):
            value = card.value
            if isinstance(value, (np.floating, np.integer)):
                value = value.item()
            cards.append((card.keyword, value, card.comment))
    return cards


def wcs_from_cards(cards, shape: tuple[int, int] | None = None) -> WCS | None:
    """Rebuild an astropy WCS from stored cards (``None`` when there are none)."""
    if not cards:
        return None
    header = fits.Header()
    for keyword, value, *rest in cards:
        header[keyword] = (value, rest[0] if rest else "")
    if shape is not None:
        header["NAXIS"] = 2
        header["NAXIS1"] = int(shape[1])
        header["NAXIS2"] = int(shape[0])
    wcs = _quiet_wcs(header)
    if shape is not None:
        wcs.pixel_shape = (int(shape[1]), int(shape[0]))
    return wcs


@overload
def copy_wcs(wcs: None) -> None: ...


@overload
def copy_wcs(wcs: WCS) -> WCS: ...


def copy_wcs(wcs: WCS | None) -> WCS | None:
    """A deep copy, safe to use from one thread or dask block."""
    return None if wcs is None else copy.deepcopy(wcs)


def shift_wcs(wcs: WCS | None, dx: float, dy: float, cards=None):
    """WCS and cards for a sub-image whose pixel (0, 0) is pixel (dx, dy) of the parent.

    Only CRPIX changes, so SIP and TPV terms stay exact (SIP is relative to CRPIX).
    Returns ``(wcs, cards)``.
    """
    if wcs is None:
        return None, cards
    if cards is None:
        cards = wcs_cards(wcs)
    new_cards = []
    for keyword, value, *rest in cards:
        if keyword == "CRPIX1":
            value = float(value) - dx
        elif keyword == "CRPIX2":
            value = float(value) - dy
        new_cards.append((keyword, value, rest[0] if rest else ""))
    return wcs_from_cards(new_cards), new_cards


def has_celestial_wcs(header_or_wcs) -> bool:
    """True when a header or WCS defines celestial axes."""
    wcs = header_or_wcs if isinstance(header_or_wcs, WCS) else _quiet_wcs(header_or_wcs)
    return bool(wcs.has_celestial) and wcs.naxis >= 2


def pixel_scale(wcs: WCS, x: float | None = None, y: float | None = None) -> float:
    """Local pixel scale in arcsec per pixel (square root of the Jacobian determinant).

    Evaluated at (x, y) (0-based), or at CRPIX when omitted, with finite differences so
    distortions are included.
    """
    if x is None or y is None:
        x, y = wcs.wcs.crpix[0] - 1.0, wcs.wcs.crpix[1] - 1.0
    pts = np.array([[x, y], [x + 1.0, y], [x, y + 1.0]])
    sky = wcs.pixel_to_world_values(pts[:, 0], pts[:, 1])
    ra, dec = np.deg2rad(sky[0]), np.deg2rad(sky[1])
    cosd = np.cos(dec[0])
    dxa = ((ra[1] - ra[0] + np.pi) % (2 * np.pi) - np.pi) * cosd, dec[1] - dec[0]
    dya = ((ra[2] - ra[0] + np.pi) % (2 * np.pi) - np.pi) * cosd, dec[2] - dec[0]
    det = abs(dxa[0] * dya[1] - dxa[1] * dya[0])
    return float(np.degrees(np.sqrt(det)) * 3600.0)
