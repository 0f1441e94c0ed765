"""A small multiband coadd-like scene with truth, for the object catalogue's tests.

:func:`make_coadd_scene` draws stars, galaxies (exponential, de Vaucouleurs or bulge +
disk, sheared) and close pairs (separations of 1-3 PSF FWHM) with GalSim into one
background-subtracted image per band, in nJy per pixel, on a common TAN pixel grid, with
white Gaussian noise and a matching variance plane. It returns the images as
:class:`~procsky.exposure.Exposure` objects (PSF model attached) and a truth table, so a
test of detection, deblending or measurement can compare with what was drawn without
running a campaign. Positions are 0-based array coordinates (pixel centres at integers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["CoaddScene", "make_coadd_scene", "mag_to_njy"]


def mag_to_njy(mag):
    """AB magnitude -> nJy."""
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - 31.4))


@dataclass
class CoaddScene:
    """Exposures per band and the truth table of :func:`make_coadd_scene`.

    ``truth`` columns: ``id``, ``x``, ``y`` (array px), ``ra``, ``dec`` (deg), ``kind``
    (``"star"`` / ``"galaxy"``), ``pair`` (id of the partner in a close pair, -1 if none),
    ``profile`` (``"psf"``, ``"exp"``, ``"dev"``, ``"bulge+disk"``), ``hlr`` (arcsec,
    0 for stars), ``g1``, ``g2`` (intrinsic shear), ``<band>_flux`` (nJy, total).
    """

    exposures: dict
    truth: pd.DataFrame
    psf_fwhm: dict
    pixel_scale: float
    sky_sigma: dict


def _tan_cards(shape, pixel_scale, ra0, dec0):
    ny, nx = shape
    d = pixel_scale / 3600.0
    return [
        ("CTYPE1", "RA---TAN", ""),
        ("CTYPE2", "DEC--TAN", ""),
        ("CRPIX1", (nx + 1) / 2.0, ""),
        ("CRPIX2", (ny + 1) / 2.0, ""),
        ("CRVAL1", ra0, ""),
        ("CRVAL2", dec0, ""),
        ("CD1_1", -d, ""),
        ("CD1_2", 0.0, ""),
        ("CD2_1", 0.0, ""),
        ("CD2_2", d, ""),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
    ]


def make_coadd_scene(
    *,
    bands=("g", "r"),
    shape=(384, 384),
    pixel_scale=0.2,
    psf_fwhm=0.8,
    psf_profile="moffat",
    n_stars=40,
    n_galaxies=40,
    n_pairs=10,
    pair_separation=(1.0, 3.0),
    star_mag=(18.0, 24.0),
    galaxy_mag=(19.0, 23.5),
    sky_sigma=15.0,
    edge=24,
    seed=0,
    ra0=150.0,
    dec0=2.0,
    noise=True,
    wcs_cards=None,
    xy0=(0, 0),
) -> CoaddScene:
    """Draw a multiband scene (see the module docstring).

    Parameters
    ----------
    bands : sequence of str
    shape : (ny, nx)
    pixel_scale : float, arcsec/px
    psf_fwhm : float or dict, arcsec
        PSF FWHM, one for all bands or per band.
    psf_profile : {"moffat", "gaussian"}
        Moffat (beta 3.5) or Gaussian PSF.
    n_stars, n_galaxies : int
        Isolated-ish objects placed at random (they may still touch by chance).
    n_pairs : int
        Close pairs; each pair is a star or galaxy plus a star or galaxy at a separation
        drawn uniformly in ``pair_separation`` times the r-band (or first band's) FWHM.
    star_mag, galaxy_mag : (min, max)
        r-band (first-band when no r) AB magnitude range, drawn uniformly.
    sky_sigma : float or dict, nJy per pixel
        White-noise sigma (and sqrt of the variance plane).
    edge : int, px
        Margin kept free of object centres.
    seed : int
    noise : bool
        Add the white noise (the variance plane is set either way).
    wcs_cards : list of (key, value, comment), optional
        The pixel grid's WCS (e.g. a sky-map patch's ``wcs_cards``) instead of a TAN grid
        centred on (``ra0``, ``dec0``) with ``pixel_scale``.
    xy0 : (int, int)
        Tract pixel of array pixel (0, 0), set on the exposures.

    Returns
    -------
    CoaddScene
    """
    import galsim

    from procsky.exposure import Exposure
    from procsky.psf import GaussianPsf, ImagePsf, PsfModel
    from procsky.wcs import wcs_from_cards

    bands = list(bands)
    rng = np.random.default_rng(seed)
    fwhm = {b: float(psf_fwhm[b] if isinstance(psf_fwhm, dict) else psf_fwhm) for b in bands}
    sig = {b: float(sky_sigma[b] if isinstance(sky_sigma, dict) else sky_sigma) for b in bands}
    ref = "r" if "r" in bands else bands[0]
    ny, nx = shape

    def psf_obj(b):
        if psf_profile == "gaussian":
            return galsim.Gaussian(fwhm=fwhm[b])
        return galsim.Moffat(beta=3.5, fwhm=fwhm[b])

    rows: list[dict] = []

    def colour(kind):
        # g-r along a rough stellar locus for stars, bluer-to-redder galaxies.
        return rng.uniform(0.2, 1.4) if kind == "star" else rng.uniform(0.3, 1.0)

    def new_object(kind, x, y, pair=-1):
        lo, hi = star_mag if kind == "star" else galaxy_mag
        mag = rng.uniform(lo, hi)
        gr = colour(kind)
        row = {"id": len(rows) + 1, "x": x, "y": y, "kind": kind, "pair": pair}
        if kind == "star":
            row.update(profile="psf", hlr=0.0, g1=0.0, g2=0.0, bulge_frac=0.0)
        else:
            profile = rng.choice(["exp", "dev", "bulge+disk"], p=[0.45, 0.2, 0.35])
            hlr = float(np.exp(rng.uniform(np.log(0.3), np.log(1.0))))
            g = rng.uniform(0.0, 0.4)
            th = rng.uniform(0, math.pi)
            row.update(
                profile=str(profile),
                hlr=hlr,
                g1=g * math.cos(2 * th),
                g2=g * math.sin(2 * th),
                bulge_frac={"exp": 0.0, "dev": 1.0}.get(str(profile), 0.3),
            )
        for b in bands:
            # colour applied as g - r; other bands interpolate crudely (r - i = 0.4 (g - r)).
            off = {"g": gr, "r": 0.0, "i": -0.4 * gr, "z": -0.6 * gr, "u": 2.0 * gr, "y": -0.7 * gr}.get(b, 0.0)
            row[f"{b}_flux"] = float(mag_to_njy(mag + off))
        rows.append(row)
        return row

    def uniform_xy():
        return rng.uniform(edge, nx - 1 - edge), rng.uniform(edge, ny - 1 - edge)

    for _ in range(n_stars):
        new_object("star", *uniform_xy())
    for _ in range(n_galaxies):
        new_object("galaxy", *uniform_xy())
    ref_fwhm_px = fwhm[ref] / pixel_scale
    for _ in range(n_pairs):
        x, y = uniform_xy()
        sep = rng.uniform(*pair_separation) * ref_fwhm_px
        th = rng.uniform(0, 2 * math.pi)
        x2 = float(np.clip(x + sep * math.cos(th), edge, nx - 1 - edge))
        y2 = float(np.clip(y + sep * math.sin(th), edge, ny - 1 - edge))
        k1 = "star" if rng.uniform() < 0.5 else "galaxy"
        k2 = "star" if rng.uniform() < 0.5 else "galaxy"
        a = new_object(k1, x, y)
        b_ = new_object(k2, x2, y2, pair=a["id"])
        a["pair"] = b_["id"]

    truth = pd.DataFrame(rows)
    cards = list(wcs_cards) if wcs_cards is not None else _tan_cards(shape, pixel_scale, ra0, dec0)
    wcs = wcs_from_cards(cards, shape)
    assert wcs is not None
    ra, dec = wcs.pixel_to_world_values(truth["x"].to_numpy(), truth["y"].to_numpy())
    truth["ra"] = np.asarray(ra, float)
    truth["dec"] = np.asarray(dec, float)

    exposures = {}
    for b in bands:
        p = psf_obj(b)
        img = np.zeros(shape, np.float64)
        for r in rows:
            flux = r[f"{b}_flux"]
            if r["kind"] == "star":
                obj = p.withFlux(flux)
            else:
                if r["profile"] == "exp":
                    gal = galsim.Exponential(half_light_radius=r["hlr"])
                elif r["profile"] == "dev":
                    gal = galsim.DeVaucouleurs(half_light_radius=r["hlr"])
                else:
                    gal = 0.3 * galsim.DeVaucouleurs(half_light_radius=0.5 * r["hlr"]) + 0.7 * galsim.Exponential(
                        half_light_radius=r["hlr"]
                    )
                gal = gal.shear(g1=r["g1"], g2=r["g2"])
                obj = galsim.Convolve(gal, p).withFlux(flux)
            n = int(min(2 * (obj.getGoodImageSize(pixel_scale) // 2) + 1, 129))
            n = max(n, 2 * int(3 * fwhm[b] / pixel_scale) + 1)
            ix, iy = int(round(r["x"])), int(round(r["y"]))
            stamp = obj.drawImage(nx=n, ny=n, scale=pixel_scale, offset=(r["x"] - ix, r["y"] - iy)).array
            h = n // 2
            y0, x0 = iy - h, ix - h
            sy0, sx0 = max(0, -y0), max(0, -x0)
            y1, x1 = min(ny, y0 + n), min(nx, x0 + n)
            img[max(y0, 0) : y1, max(x0, 0) : x1] += stamp[sy0 : sy0 + y1 - max(y0, 0), sx0 : sx0 + x1 - max(x0, 0)]
        if noise:
            img += rng.normal(0.0, sig[b], size=shape)
        ks = 2 * int(math.ceil(3.0 * fwhm[b] / pixel_scale)) + 1
        psf_model: PsfModel
        if psf_profile == "gaussian":
            psf_model = GaussianPsf.from_fwhm(fwhm[b] / pixel_scale)
        else:
            psf_model = ImagePsf(p.drawImage(nx=ks, ny=ks, scale=pixel_scale).array)
        from procsky.exposure import VisitInfo

        exposures[b] = Exposure(
            img.astype(np.float32),
            np.full(shape, sig[b] ** 2, np.float32),
            np.zeros(shape, np.uint32),
            wcs_cards=cards,
            psf=psf_model,
            visit_info=VisitInfo(band=b),
            metadata={"flux_unit": "nJy", "band": b},
            xy0=tuple(xy0),
        )
    return CoaddScene(exposures=exposures, truth=truth, psf_fwhm=fwhm, pixel_scale=pixel_scale, sky_sigma=sig)
