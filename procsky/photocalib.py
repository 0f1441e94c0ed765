"""Photometric calibration: counts to nJy (AB).

``flux_nJy = counts * calibration`` where ``calibration`` is nJy per count, the LSST
``PhotoCalib.calibrationMean`` convention. The AB zero point ``zp`` (magnitude of one count)
relates by ``calibration = 10**(-0.4 * (zp - 31.4))`` because ``m_AB = 31.4 - 2.5 log10(f/nJy)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from procsky.errors import ProcskyValueError

__all__ = ["PhotoCalib", "AB_NJY_ZP", "njy_to_mag", "mag_to_njy"]

#: AB magnitude of 1 nJy.
AB_NJY_ZP = 31.4


def njy_to_mag(flux):
    """AB magnitude of a flux in nJy (NaN for non-positive fluxes)."""
    flux = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, AB_NJY_ZP - 2.5 * np.log10(flux), np.nan)


def mag_to_njy(mag):
    """Flux in nJy of an AB magnitude."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_NJY_ZP))


@dataclass(frozen=True)
class PhotoCalib:
    """Counts to nJy.

    Parameters
    ----------
    calibration : float, nJy per count
        Multiply counts (in the image's unit) by this to get nJy.
    calibration_err : float, nJy per count
        Its 1-sigma uncertainty.
    """

    calibration: float
    calibration_err: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.calibration) and self.calibration > 0):
            raise ProcskyValueError(
                f"PhotoCalib calibration must be a positive finite nJy/count, got {self.calibration}"
            )
        if not self.calibration_err >= 0:
            raise ProcskyValueError("PhotoCalib calibration_err must be >= 0")

    @classmethod
    def from_zero_point(cls, zero_point: float, zero_point_err: float = 0.0) -> PhotoCalib:
        """From an AB zero point (mag of one count) and its error (mag)."""
        cal = 10.0 ** (-0.4 * (zero_point - AB_NJY_ZP))
        return cls(cal, cal * 0.4 * math.log(10.0) * zero_point_err)

    @property
    def zero_point(self) -> float:
        """AB magnitude of one count."""
        return AB_NJY_ZP - 2.5 * math.log10(self.calibration)

    @property
    def zero_point_err(self) -> float:
        return 2.5 / math.log(10.0) * self.calibration_err / self.calibration

    def counts_to_njy(self, counts, counts_err=None):
        """Calibrate a flux (and optionally its error) from counts to nJy.

        The calibration uncertainty is not folded into the per-source error (it is common
        to all sources of a detector), as in LSST catalogues.
        """
        flux = np.asarray(counts) * self.calibration
        if counts_err is None:
            return flux
        return flux, np.asarray(counts_err) * self.calibration

    def counts_to_mag(self, counts):
        return njy_to_mag(self.counts_to_njy(counts))

    def to_dict(self) -> dict:
        return {"calibration": self.calibration, "calibration_err": self.calibration_err}

    @classmethod
    def from_dict(cls, d: dict | None) -> PhotoCalib | None:
        return None if d is None else cls(float(d["calibration"]), float(d.get("calibration_err", 0.0)))
