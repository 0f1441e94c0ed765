"""Reading a simulation's truth back: tables, per-detector WCS, PSF and sky models.

These helpers let the tests of every later stage (calibrate, coadd, diffim) compare
their results with what was drawn without re-running the simulator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from procsky.errors import ProcskyFileError, ProcskyKeyError

__all__ = ["SimTruth"]


class SimTruth:
    """The truth of one ``procsky sim`` output directory.

    Parameters
    ----------
    out : str or Path
        The directory given to ``procsky sim --out``.

    Examples
    --------
    >>> truth = SimTruth("sim/tiny")                              # doctest: +SKIP
    >>> truth.objects.query("kind == 'star'").head()              # doctest: +SKIP
    >>> kernel = truth.psf_image(visit=1, detector=0, x=100, y=200)  # doctest: +SKIP
    """

    _TABLES = {
        "objects": "truth/objects.parquet",
        "exposures": "truth/exposures.parquet",
        "lightcurves": "truth/lightcurves.parquet",
        "visits": "truth/visits.parquet",
        "detectors": "truth/detectors.parquet",
        "cosmic_rays": "truth/cosmic_rays.parquet",
        "defects": "truth/defects.parquet",
        "refcat": "refcat/refcat.parquet",
    }

    def __init__(self, out):
        self.out = Path(out)
        if not (self.out / "recipe.yaml").is_file():
            raise ProcskyFileError(f"{self.out} is not a procsky sim output (no recipe.yaml); run `procsky sim` first")
        self._cache: dict[str, pd.DataFrame] = {}

    def __getattr__(self, name):
        if name in SimTruth._TABLES:
            if name not in self._cache:
                path = self.out / SimTruth._TABLES[name]
                if not path.exists():
                    raise ProcskyFileError(f"missing truth table {path}")
                self._cache[name] = pd.read_parquet(path)
            return self._cache[name]
        raise AttributeError(name)

    @property
    def recipe(self):
        from procsky.sim.recipe import load_recipe

        return load_recipe(self.out / "recipe.yaml")

    def _row(self, table: str, **keys) -> pd.Series:
        df = getattr(self, table)
        sel = np.ones(len(df), bool)
        for k, v in keys.items():
            sel &= df[k].to_numpy() == v
        if not sel.any():
            raise ProcskyKeyError(f"no {table} truth for {keys}")
        return df[sel].iloc[0]

    def wcs(self, visit: int, detector: int):
        """The true (distorted, TAN-SIP) astropy WCS of one visit and detector."""
        from astropy.io import fits
        from astropy.wcs import WCS

        row = self._row("detectors", visit=visit, detector=detector)
        return WCS(fits.Header.fromstring(row["wcs_header"], sep="\n"))

    def psf_params(self, visit: int):
        """The PSF model of one visit (:class:`~procsky.sim.psf.SimPsfParams` or ``SpacePsfParams``)."""
        from procsky.sim.psf import psf_params_from_dict

        return psf_params_from_dict(self._row("visits", visit=visit).to_dict())

    def psf_image(self, visit: int, detector: int, x: float, y: float, size: int = 41) -> np.ndarray:
        """The true pixel-convolved PSF (sum 1) at detector pixel (x, y), centred on the stamp."""
        from procsky.instruments.simcam import SimcamGeometry, focal_plane_position
        from procsky.sim.psf import truth_psf_image

        r = self.recipe
        geometry = SimcamGeometry(r.instrument, r.seed)
        fx, fy = focal_plane_position(geometry, detector, x, y)
        return truth_psf_image(self.psf_params(visit), float(fx), float(fy), size=size)

    def sky(self, visit: int, detector: int, x, y):
        """True sky background (ADU) at detector pixels (x, y)."""
        row = self._row("detectors", visit=visit, detector=detector)
        r = self.recipe
        xc = 0.5 * (r.instrument.detector_nx - 1)
        yc = 0.5 * (r.instrument.detector_ny - 1)
        return row["sky_level"] + row["sky_grad_x"] * (np.asarray(x) - xc) + row["sky_grad_y"] * (np.asarray(y) - yc)

    def satellite_line(self, visit: int, detector: int):
        """The satellite trail of a visit in this detector's pixels, or None.

        Returns ``(x0, y0, angle, sigma, peak)``: a point on the line (0-based pixels),
        its direction (rad from +x), the Gaussian width (pixels) and the peak surface
        brightness (ADU per pixel).
        """
        v = self._row("visits", visit=visit)
        if not bool(v["satellite"]):
            return None
        return _line_in_pixels(self.recipe, v, detector)


def _line_in_pixels(recipe, v, detector: int):
    """(x0, y0, angle, sigma, peak ADU) of a visit's satellite line in detector pixels."""
    import math

    from procsky.instruments.simcam import SimcamGeometry

    g = SimcamGeometry(recipe.instrument, recipe.seed)
    d = g.detectors[detector]
    px0, py0 = g.origin_pixel(detector)
    c, s = math.cos(d.rotation), math.sin(d.rotation)
    fx, fy = float(v["sat_x0"]), float(v["sat_y0"])
    # f = R_d (p - p0)  =>  p = p0 + R_d^T f
    x0 = px0 + c * fx + s * fy
    y0 = py0 - s * fx + c * fy
    return (
        x0,
        y0,
        float(v["sat_angle"]) - d.rotation,
        float(v["sat_sigma_px"]),
        float(v["sat_peak_e"]) / recipe.instrument.gain,
    )
