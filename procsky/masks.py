"""Mask planes.

Mask pixels are ``uint32`` bit fields. The first nine planes use the LSST names and bit
order so that users of either system read the other's masks the same way; further planes
(CLIPPED, STREAK, ...) are added by name and their bits recorded with the data, so a mask
is always interpreted with the plane map stored beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from procsky.errors import ProcskyKeyError, ProcskyValueError

__all__ = ["STANDARD_PLANES", "MaskPlanes", "DEFAULT_PLANES", "bit", "bits", "plane_counts"]

#: LSST plane names in LSST bit order (lsst.afw.image.Mask defaults), then ours.
STANDARD_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "CLIPPED": 9,
    "STREAK": 10,
    "SENSOR_EDGE": 11,
    "INEXACT_PSF": 12,
    "REJECTED": 13,
    "UNMASKEDNAN": 14,
    "CROSSTALK": 15,
    "NOT_DEBLENDED": 16,
}

_DESCRIPTIONS = {
    "BAD": "bad pixel (defect, bad column, hot pixel)",
    "SAT": "saturated",
    "INTRP": "interpolated over",
    "CR": "cosmic ray",
    "EDGE": "too close to the edge to be measured",
    "DETECTED": "inside a detection footprint (positive)",
    "DETECTED_NEGATIVE": "inside a detection footprint (negative)",
    "SUSPECT": "near or above the linearity limit",
    "NO_DATA": "no data (outside the input, or zero weight)",
    "CLIPPED": "rejected as an artifact while coadding",
    "STREAK": "satellite or meteor trail",
    "SENSOR_EDGE": "within a few pixels of a sensor edge",
    "INEXACT_PSF": "coadd PSF is inexact here (inputs rejected)",
    "REJECTED": "some inputs rejected while coadding",
    "UNMASKEDNAN": "NaN that was not otherwise masked",
    "CROSSTALK": "crosstalk corrected",
    "NOT_DEBLENDED": "footprint too large to deblend",
}


class MaskPlanes(Mapping):
    """An immutable map from plane name to bit number.

    Parameters
    ----------
    planes : mapping of str to int, optional
        Plane names and bits; the standard planes are used when omitted.

    Examples
    --------
    >>> planes = MaskPlanes()
    >>> planes["SAT"]
    1
    >>> planes.with_plane("GHOST")["GHOST"]
    17
    """

    __slots__ = ("_planes",)

    def __init__(self, planes: Mapping[str, int] | None = None):
        planes = dict(STANDARD_PLANES if planes is None else planes)
        seen: dict[int, str] = {}
        for name, b in planes.items():
            if not isinstance(b, (int, np.integer)) or not 0 <= int(b) < 32:
                raise ProcskyValueError(f"mask plane {name!r} has bit {b!r}; bits must be integers 0-31")
            if int(b) in seen:
                raise ProcskyValueError(
                    f"mask planes {seen[int(b)]!r} and {name!r} both use bit {b}; each plane needs its own bit"
                )
            seen[int(b)] = name
        self._planes = {str(k): int(v) for k, v in planes.items()}

    def __getitem__(self, name: str) -> int:
        try:
            return self._planes[name]
        except KeyError:
            raise ProcskyKeyError(
                f"unknown mask plane {name!r}; known planes: {', '.join(self._planes)}. "
                "Add a new plane with MaskPlanes.with_plane(name)."
            ) from None

    def __iter__(self):
        return iter(self._planes)

    def __len__(self) -> int:
        return len(self._planes)

    def __repr__(self) -> str:
        return f"MaskPlanes({self._planes!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._planes.items())))

    def __reduce__(self):
        return (MaskPlanes, (self._planes,))

    def with_plane(self, name: str) -> MaskPlanes:
        """Return planes with ``name`` added at the first free bit (unchanged if present)."""
        if name in self._planes:
            return self
        used = set(self._planes.values())
        free = [b for b in range(32) if b not in used]
        if not free:
            raise ProcskyValueError("all 32 mask bits are in use; cannot add plane " + repr(name))
        return MaskPlanes({**self._planes, name: free[0]})

    def bitmask(self, names: str | Iterable[str]) -> int:
        """OR of the bits of ``names`` (a name or an iterable of names)."""
        if isinstance(names, str):
            names = [names]
        value = 0
        for n in names:
            value |= 1 << self[n]
        return value

    def describe(self, name: str) -> str:
        """One-line description of a plane."""
        return _DESCRIPTIONS.get(name, "")

    def to_dict(self) -> dict[str, int]:
        return dict(self._planes)

    def remap(self, mask: np.ndarray, target: MaskPlanes) -> np.ndarray:
        """Translate a mask written with these planes to the bits of ``target``.

        Planes missing from ``target`` are added there first by the caller; a plane absent
        from ``target`` raises.
        """
        if self == target or all(target.get(k) == v for k, v in self.items()):
            return mask
        out = np.zeros_like(mask)
        for name, b in self.items():
            out |= ((mask >> np.uint32(b)) & np.uint32(1)).astype(mask.dtype) << mask.dtype.type(target[name])
        return out


DEFAULT_PLANES = MaskPlanes()


def bit(name: str, planes: MaskPlanes = DEFAULT_PLANES) -> int:
    """The value (1 << bit) of one plane, e.g. ``mask & bit("SAT")``."""
    return 1 << planes[name]


def bits(*names: str, planes: MaskPlanes = DEFAULT_PLANES) -> int:
    """The OR of several planes' values."""
    return planes.bitmask(names)


def plane_counts(mask, planes: MaskPlanes = DEFAULT_PLANES) -> dict[str, int]:
    """Number of pixels with each plane set (computes a dask mask)."""
    mask = np.asarray(mask)
    return {name: int(np.count_nonzero(mask & np.uint32(1 << b))) for name, b in planes.items()}
