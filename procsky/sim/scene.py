"""The simulated sky and survey: objects, visits, light curves and the reference catalogue.

Everything here is a deterministic function of the recipe (and its seed), so workers
drawing different detectors never need to share state. Sizes, counts and colours follow
simple empirical laws:

* stars: ``dN/dm ∝ 10^(slope m)`` in r, colours along a one-parameter stellar locus
  (approximating Covey et al. 2007, AJ 134, 2398);
* galaxies: ``dN/dm ∝ 10^(0.33 m)``, bulge (de Vaucouleurs) + disk (exponential) with a
  red bulge and a blue disk, half-light radii shrinking with magnitude (log-normal,
  0.15 dex scatter) and Rayleigh-distributed intrinsic shears;
* variables: sinusoidal light curves ``F (1 + A sin(2 pi (t - t0) / P))`` (mean flux F);
* transients: Gaussian rise and exponential decline about ``t_peak``, near a host galaxy
  or hostless;
* an optional NFW halo shears and magnifies the galaxies (GalSim ``NFWHalo``,
  Wright & Brainerd 2000), redshifts from a crude magnitude-redshift relation.

Sky positions use a tangent plane at the field centre: ``xi`` (east) and ``eta``
(north), in arcsec. Galaxy shapes and shears are given in that (east, north) frame.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from procsky.instruments.simcam import BAND_DATA, SimcamGeometry, detector_wcs
from procsky.sim.psf import SimPsfParams, SpacePsfParams, draw_psf_params, draw_space_psf_params

if TYPE_CHECKING:
    from procsky.sim.recipe import Recipe

__all__ = ["Scene", "build_scene", "tangent_to_sky", "sky_to_tangent", "epoch_flux", "rng_for", "STREAMS"]

#: Stream numbers for seeding independent random sequences.
STREAMS = {
    "stars": 1,
    "galaxies": 2,
    "variables": 3,
    "transients": 4,
    "visits": 5,
    "refcat": 6,
    "noise": 10,
    "cosmic": 11,
    "defects": 12,
    "signature": 13,
    "flat": 14,
    "overscan": 15,
    "calib_frame": 16,
    "resample": 17,
}

# Colours relative to r (u-r, g-r, i-r, z-r, y-r offsets are built from these).
_BULGE_COLOURS = {"u": 2.4, "g": 0.8, "r": 0.0, "i": -0.4, "z": -0.7, "y": -0.85}
_DISK_COLOURS = {"u": 1.25, "g": 0.35, "r": 0.0, "i": -0.2, "z": -0.3, "y": -0.35}
_TRANSIENT_COLOURS = {"u": -0.3, "g": -0.15, "r": 0.0, "i": 0.1, "z": 0.2, "y": 0.25}


def rng_for(seed: int, stream: str, *ids: int) -> np.random.Generator:
    """A numpy Generator for one purpose, independent of scheduling order."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], *[int(i) for i in ids]]))


def njy(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - 31.4))


def tangent_to_sky(xi, eta, ra0, dec0):
    """Gnomonic deprojection: tangent-plane (xi east, eta north; arcsec) -> (ra, dec) deg."""
    x = np.radians(np.asarray(xi, float) / 3600.0)
    y = np.radians(np.asarray(eta, float) / 3600.0)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    denom = math.cos(d0) - y * math.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def sky_to_tangent(ra, dec, ra0, dec0):
    """Gnomonic projection: (ra, dec) deg -> tangent plane (xi east, eta north) arcsec."""
    a = np.radians(np.asarray(ra, float))
    d = np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi) * 3600.0, np.degrees(eta) * 3600.0


def _power_law_mags(rng, n, m_min, m_max, slope):
    u = rng.uniform(0.0, 1.0, n)
    if abs(slope) < 1e-9:
        return m_min + u * (m_max - m_min)
    lo, hi = 10.0 ** (slope * m_min), 10.0 ** (slope * m_max)
    return np.log10(lo + u * (hi - lo)) / slope


def _stellar_colours(t):
    """Colours (band - r) along a one-parameter stellar locus, t in [0, 1] (blue -> red)."""
    gr = 0.25 + 1.2 * t
    return {
        "u": gr + 0.85 + 1.6 * t,
        "g": gr,
        "r": 0.0 * t,
        "i": -(0.05 + 0.35 * t + 1.0 * t**3),
        "z": -(0.07 + 0.5 * t + 1.5 * t**3),
        "y": -(0.08 + 0.55 * t + 1.8 * t**3),
    }


@dataclass
class Scene:
    """The sky and the survey of one recipe.

    Attributes
    ----------
    recipe : Recipe
    geometry : SimcamGeometry
    objects : pandas.DataFrame
        One row per object (see ``datasets/README.md`` for the columns).
    visits : pandas.DataFrame
        One row per visit: pointing, conditions, zero point, sky, PSF parameters,
        satellite trail.
    half_size : float, arcsec
        Half side of the square of sky populated with objects.
    """

    recipe: Recipe
    geometry: SimcamGeometry
    objects: pd.DataFrame
    visits: pd.DataFrame
    half_size: float

    def lightcurves(self) -> pd.DataFrame:
        """Flux of every variable and transient at every visit (nJy)."""
        obj = self.objects[self.objects["kind"].isin(["variable", "transient"])]
        rows = []
        for v in self.visits.itertuples():
            f = epoch_flux(obj, v.band, v.mjd)
            rows.append(
                pd.DataFrame(
                    {
                        "object_id": obj["object_id"].to_numpy(),
                        "visit": v.visit,
                        "mjd": v.mjd,
                        "band": v.band,
                        "flux": f,
                    }
                )
            )
        if not rows:
            return pd.DataFrame(columns=["object_id", "visit", "mjd", "band", "flux"])
        out = pd.concat(rows, ignore_index=True)
        return out.sort_values(["object_id", "visit"], kind="stable").reset_index(drop=True)

    def refcat(self) -> pd.DataFrame:
        """A Gaia-like reference catalogue of the stars, with realistic errors.

        Position errors grow from ~0.05 mas at r = 15 to ~1 mas at r = 21 (Gaia DR3-like,
        Lindegren et al. 2021); magnitude errors ``0.0005 + 0.01 * 10^(0.4 (m - 20))``.
        Catalogue values are the truth scattered by those errors.
        """
        r = self.recipe
        rng = rng_for(r.seed, "refcat")
        obj = self.objects[self.objects["kind"].isin(["star", "variable"])]
        ref_mag = -2.5 * np.log10(obj["flux_ref"].to_numpy()) + 31.4
        sel = ref_mag < r.refcat.mag_limit
        obj = obj[sel]
        m = ref_mag[sel]
        n = len(obj)
        pos_err_mas = 0.02 + 1.0 * 10.0 ** (0.2 * (m - 21.0))
        err_deg = pos_err_mas / 3.6e6
        dec = obj["dec"].to_numpy() + rng.normal(0.0, 1.0, n) * err_deg
        ra = obj["ra"].to_numpy() + rng.normal(0.0, 1.0, n) * err_deg / np.cos(np.radians(obj["dec"].to_numpy()))
        out = {
            "ref_id": np.arange(1, n + 1, dtype=np.int64),
            "object_id": obj["object_id"].to_numpy(),
            "ra": ra % 360.0,
            "dec": dec,
            "ra_err": err_deg,
            "dec_err": err_deg,
            "epoch_mjd": np.full(n, r.refcat.epoch_mjd),
        }
        for b in r.band_names:
            mb = -2.5 * np.log10(obj[f"flux_{b}"].to_numpy()) + 31.4
            sig = 0.0005 + 0.01 * 10.0 ** (0.4 * (mb - 20.0))
            out[f"mag_{b}"] = mb + rng.normal(0.0, 1.0, n) * sig
            out[f"mag_{b}_err"] = sig
        return pd.DataFrame(out)


def epoch_flux(objects: pd.DataFrame, band: str, mjd: float) -> np.ndarray:
    """Flux (nJy) of each object in ``band`` at time ``mjd`` (variables and transients vary)."""
    f = objects[f"flux_{band}"].to_numpy(dtype=float).copy()
    kind = objects["kind"].to_numpy()
    var = kind == "variable"
    if var.any():
        p = objects["period"].to_numpy()[var]
        a = objects["amplitude"].to_numpy()[var]
        t0 = objects["t0"].to_numpy()[var]
        f[var] *= 1.0 + a * np.sin(2.0 * np.pi * (mjd - t0) / p)
    tr = kind == "transient"
    if tr.any():
        tp = objects["t0"].to_numpy()[tr]
        rise = objects["rise"].to_numpy()[tr]
        decay = objects["decay"].to_numpy()[tr]
        dt = mjd - tp
        shape = np.where(dt < 0, np.exp(-0.5 * (dt / rise) ** 2), np.exp(-np.maximum(dt, 0) / decay))
        shape = np.where(dt < -3.0 * rise, 0.0, shape)  # not yet exploded
        f[tr] *= shape
    return f


def _zero_point(band_cfg, inst, seeing, fwhm_arcsec: float | None = None) -> float:
    """AB magnitude giving 1 e- in one exposure so that a point source at ``depth`` has S/N 5.

    S/N = F / sqrt(F + N_eff (B + RN^2)) with N_eff = 2.266 FWHM^2 pixels (a Gaussian PSF),
    B = sky electrons per pixel; solving for the throughput x = 10^(0.4 ZP) gives a
    quadratic. ``fwhm_arcsec`` (space PSFs) replaces the median seeing (+) optics.
    """
    if fwhm_arcsec is None:
        fwhm_arcsec = math.hypot(seeing.median_fwhm, seeing.optics_fwhm)
    fwhm_px = fwhm_arcsec / inst.pixel_scale
    n_eff = 2.266 * fwhm_px**2
    f_d = 10.0 ** (-0.4 * band_cfg.depth)
    b = 10.0 ** (-0.4 * BAND_DATA[band_cfg.name]["sky_mag"]) * inst.pixel_scale**2
    rn2 = inst.read_noise**2
    s = f_d + n_eff * b
    x = (25.0 * s + math.sqrt(625.0 * s * s + 100.0 * f_d * f_d * n_eff * rn2)) / (2.0 * f_d * f_d)
    return 2.5 * math.log10(x)


def _space_fwhm(psf_cfg, wavelength_nm: float) -> float:
    """Approximate FWHM (arcsec) of a space PSF: Airy core 1.03 lambda/D (+) jitter."""
    lod = wavelength_nm * 1e-9 / psf_cfg.diameter_m * 206264.806
    return math.hypot(1.03 * lod, psf_cfg.jitter_fwhm)


def _build_visits(recipe, geometry: SimcamGeometry) -> pd.DataFrame:
    r = recipe
    rng = rng_for(r.seed, "visits")
    inst = r.instrument
    rows = []
    visit = 0
    max_n = max(b.n_visits for b in r.bands)
    k_dither = 0
    for epoch in range(max_n):
        night_start = r.mjd_start + epoch * r.cadence_days + rng.uniform(0.0, 0.2)
        t = night_start
        for band_cfg in r.bands:
            if epoch >= band_cfg.n_visits:
                continue
            visit += 1
            d = r.dither
            if d.pattern == "random":
                rad = d.max_offset_arcsec * math.sqrt(rng.uniform())
                ang = rng.uniform(0.0, 2.0 * math.pi)
                off = (rad * math.cos(ang), rad * math.sin(ang))
            else:
                off = tuple(d.offsets_arcsec[k_dither % len(d.offsets_arcsec)])
            rot = float(d.rotations_deg[k_dither % len(d.rotations_deg)])
            k_dither += 1
            ra, dec = tangent_to_sky(off[0], off[1], r.field.ra, r.field.dec)
            airmass = float(rng.uniform(1.0, 1.5))
            bd = BAND_DATA[band_cfg.name]
            space = r.psf.family == "space"
            zp_nominal = _zero_point(
                band_cfg,
                inst,
                r.seeing,
                _space_fwhm(r.psf, bd["wavelength"]) if space else None,
            )
            clouds = float(rng.exponential(0.02))
            zp_e = zp_nominal - bd["extinction"] * (airmass - 1.0) - clouds
            sky_mag = bd["sky_mag"] - float(rng.uniform(0.0, 0.4))
            sky_e = 10.0 ** (0.4 * (zp_nominal - sky_mag)) * inst.pixel_scale**2
            psf: SimPsfParams | SpacePsfParams
            if space:
                psf = draw_space_psf_params(rng, r.psf, geometry.corner_radius, inst.pixel_scale, bd["wavelength"])
                psf_width = psf.local(0.0, 0.0)[0]
            else:
                psf = draw_psf_params(
                    rng, r.seeing, airmass, geometry.corner_radius, inst.pixel_scale, bd["wavelength"]
                )
                psf_width = psf.fwhm_atm
            sat = bool(rng.uniform() < r.artifacts.satellite_probability)
            sat_row = {
                "satellite": sat,
                "sat_x0": float(rng.uniform(-0.4, 0.4) * geometry.width),
                "sat_y0": float(rng.uniform(-0.4, 0.4) * geometry.height),
                "sat_angle": float(rng.uniform(0.0, math.pi)),
                "sat_sigma_px": float(1.5 * psf_width / inst.pixel_scale / 2.355),
                "sat_peak_e": float(rng.uniform(3.0, 20.0) * math.sqrt(sky_e + inst.read_noise**2)),
            }
            mid = t + 0.5 * band_cfg.exposure_time / 86400.0
            rows.append(
                {
                    "visit": visit,
                    "band": band_cfg.name,
                    "physical_filter": f"simcam-{band_cfg.name}",
                    "mjd": mid,
                    "exposure_time": float(band_cfg.exposure_time),
                    "airmass": airmass,
                    "boresight_ra": float(ra),
                    "boresight_dec": float(dec),
                    "rotation_angle": rot,
                    "offset_xi": float(off[0]),
                    "offset_eta": float(off[1]),
                    "zp_electrons": zp_e,
                    "magzero": zp_e - 2.5 * math.log10(inst.gain),
                    "extinction": bd["extinction"] * (airmass - 1.0) + clouds,
                    "sky_mag": sky_mag,
                    "sky_electrons": sky_e,
                    "sky_grad_x": float(rng.normal(0.0, 0.02)),
                    "sky_grad_y": float(rng.normal(0.0, 0.02)),
                    **psf.to_dict(),
                    **sat_row,
                }
            )
            t += (band_cfg.exposure_time + 30.0) / 86400.0
    return pd.DataFrame(rows)


def build_scene(recipe) -> Scene:
    """Draw the objects and the visits of a recipe (deterministic in ``recipe.seed``)."""
    r = recipe
    geometry = SimcamGeometry(r.instrument, r.seed)
    visits = _build_visits(r, geometry)
    inst = r.instrument
    fp_half = 0.5 * math.hypot(geometry.width, geometry.height) * inst.pixel_scale
    max_off = max(np.hypot(visits["offset_xi"], visits["offset_eta"]).max(), 0.0)
    half = fp_half + max_off + 20.0
    area_deg2 = (2.0 * half / 3600.0) ** 2
    bands = list(BAND_DATA)
    parts = []

    # ---- stars
    rng = rng_for(r.seed, "stars")
    n_star = rng.poisson(r.stars.density * area_deg2)
    m = _power_law_mags(rng, n_star, r.stars.mag_min, r.stars.mag_max, r.stars.slope)
    t = rng.beta(2.0, 3.0, n_star)
    col = _stellar_colours(t)
    stars = {
        "kind": np.full(n_star, "star", dtype=object),
        "xi": rng.uniform(-half, half, n_star),
        "eta": rng.uniform(-half, half, n_star),
    }
    for b in bands:
        stars[f"flux_{b}"] = njy(m + col[b])
    stars["flux_ref"] = njy(m)
    parts.append(pd.DataFrame(stars))

    # ---- variables (stars with periodic light curves)
    rng = rng_for(r.seed, "variables")
    vc = r.variables
    n = vc.number
    m = rng.uniform(vc.mag_min, vc.mag_max, n)
    t = rng.beta(2.0, 3.0, n)
    col = _stellar_colours(t)
    var = {
        "kind": np.full(n, "variable", dtype=object),
        "xi": rng.uniform(-0.8, 0.8, n) * (half - 20),
        "eta": rng.uniform(-0.8, 0.8, n) * (half - 20),
    }
    for b in bands:
        var[f"flux_{b}"] = njy(m + col[b])
    var["flux_ref"] = njy(m)
    var["period"] = np.exp(rng.uniform(math.log(vc.period_days[0]), math.log(vc.period_days[1]), n))
    var["amplitude"] = rng.uniform(vc.amplitude[0], vc.amplitude[1], n)
    var["t0"] = r.mjd_start + rng.uniform(0.0, 1.0, n) * var["period"]
    parts.append(pd.DataFrame(var))

    # ---- galaxies (bulge + disk)
    rng = rng_for(r.seed, "galaxies")
    gc = r.galaxies
    n_gal = rng.poisson(gc.density * area_deg2 * 3600.0)
    m = _power_law_mags(rng, n_gal, gc.mag_min, gc.mag_max, gc.slope)
    bt = gc.max_bulge_fraction * rng.uniform(0.0, 1.0, n_gal) ** 2
    hlr_disk = 10.0 ** (-0.25 - 0.07 * (m - 22.0) + rng.normal(0.0, 0.15, n_gal))
    hlr_bulge = hlr_disk * 10.0 ** (-0.3 + rng.normal(0.0, 0.1, n_gal))
    emag = np.minimum(np.abs(rng.rayleigh(gc.ellipticity_rms, n_gal)), 0.8)
    phi = rng.uniform(0.0, np.pi, n_gal)
    g1, g2 = emag * np.cos(2 * phi), emag * np.sin(2 * phi)
    dcol = {b: _DISK_COLOURS[b] + rng.normal(0.0, 0.05, n_gal) for b in bands}
    bcol = {b: _BULGE_COLOURS[b] + rng.normal(0.0, 0.05, n_gal) for b in bands}
    gal = {
        "kind": np.full(n_gal, "galaxy", dtype=object),
        "xi": rng.uniform(-half, half, n_gal),
        "eta": rng.uniform(-half, half, n_gal),
    }
    f_r = njy(m)
    for b in bands:
        fb = f_r * bt * 10.0 ** (-0.4 * bcol[b])
        fd = f_r * (1.0 - bt) * 10.0 ** (-0.4 * dcol[b])
        gal[f"flux_{b}"] = fb + fd
        gal[f"bulge_fraction_{b}"] = fb / (fb + fd)
    gal["flux_ref"] = f_r
    gal.update(hlr_disk=hlr_disk, hlr_bulge=hlr_bulge, g1=g1, g2=g2)
    gal["redshift"] = np.clip(0.15 * (m - 17.0) + rng.normal(0.0, 0.15, n_gal), 0.05, 3.0)
    galaxies = pd.DataFrame(gal)
    parts.append(galaxies)

    # ---- transients
    rng = rng_for(r.seed, "transients")
    tc = r.transients
    n = tc.number
    mjd_end = float(visits["mjd"].max())
    tr = {"kind": np.full(n, "transient", dtype=object)}
    host = np.full(n, -1, dtype=np.int64)
    xi = rng.uniform(-0.8, 0.8, n) * (half - 20)
    eta = rng.uniform(-0.8, 0.8, n) * (half - 20)
    for i in range(n):
        if n_gal > 0 and rng.uniform() < tc.host_fraction:
            # prefer a bright host near the centre of the field
            inner = np.flatnonzero((np.abs(galaxies["xi"]) < 0.8 * half) & (np.abs(galaxies["eta"]) < 0.8 * half))
            if len(inner):
                h = int(inner[rng.integers(len(inner))])
                host[i] = h
                xi[i] = galaxies["xi"].iat[h] + rng.normal(0.0, hlr_disk[h])
                eta[i] = galaxies["eta"].iat[h] + rng.normal(0.0, hlr_disk[h])
    tr["xi"], tr["eta"] = xi, eta
    m = rng.uniform(tc.peak_mag[0], tc.peak_mag[1], n)
    for b in bands:
        tr[f"flux_{b}"] = njy(m + _TRANSIENT_COLOURS[b])
    tr["flux_ref"] = njy(m)
    tr["t0"] = rng.uniform(r.mjd_start - 5.0, mjd_end + 2.0, n)
    tr["rise"] = rng.uniform(tc.rise_days[0], tc.rise_days[1], n)
    tr["decay"] = rng.uniform(tc.decay_days[0], tc.decay_days[1], n)
    tr["host_index"] = host
    parts.append(pd.DataFrame(tr))

    objects = pd.concat(parts, ignore_index=True)
    n_all = len(objects)
    objects.insert(0, "object_id", np.arange(1, n_all + 1, dtype=np.int64))
    # host ids (galaxies are in block 3; translate the index within galaxies to object_id)
    gal_first = n_star + r.variables.number + 1
    hi = objects.get("host_index")
    if hi is not None:
        hid = hi.to_numpy(dtype=float)
        objects["host_id"] = np.where(np.isfinite(hid) & (hid >= 0), np.nan_to_num(hid, nan=0) + gal_first, -1).astype(
            np.int64
        )
        objects = objects.drop(columns=["host_index"])
    ra, dec = tangent_to_sky(objects["xi"].to_numpy(), objects["eta"].to_numpy(), r.field.ra, r.field.dec)
    objects.insert(2, "ra", ra)
    objects.insert(3, "dec", dec)

    # ---- lensing by an NFW halo
    objects["shear_g1"] = 0.0
    objects["shear_g2"] = 0.0
    objects["magnification"] = 1.0
    if r.shear.enabled and n_gal > 0:
        _apply_lensing(r, objects)
    keep = []
    for c in objects.columns:
        for prefix in ("flux_", "bulge_fraction_"):
            if c.startswith(prefix) and c[len(prefix) :] not in r.band_names and c != "flux_ref":
                break
        else:
            keep.append(c)
    objects = objects[keep]
    return Scene(recipe=r, geometry=geometry, objects=objects.reset_index(drop=True), visits=visits, half_size=half)


def _apply_lensing(r, objects: pd.DataFrame) -> None:
    import galsim

    sc = r.shear
    halo = galsim.NFWHalo(
        mass=sc.mass_msun,
        conc=sc.concentration,
        redshift=sc.redshift,
        halo_pos=galsim.PositionD(*sc.offset_arcsec),
        omega_m=0.3,
        omega_lam=0.7,
    )
    gal = (objects["kind"] == "galaxy").to_numpy() & (objects["redshift"].to_numpy() > sc.redshift + 0.05)
    if not gal.any():
        return
    xi = objects["xi"].to_numpy()[gal]
    eta = objects["eta"].to_numpy()[gal]
    zs = objects["redshift"].to_numpy()[gal]
    g1 = np.zeros(gal.sum())
    g2 = np.zeros(gal.sum())
    mu = np.ones(gal.sum())
    with warnings.catch_warnings():
        # GalSim warns about the strong-lensing regime near the centre; those are clipped below.
        warnings.simplefilter("ignore")
        for z in np.unique(np.round(zs, 2)):
            s = np.round(zs, 2) == z
            pos = (list(xi[s]), list(eta[s]))
            a, b = halo.getShear(pos, float(z), units=galsim.arcsec, reduced=True)
            g1[s], g2[s] = a, b
            mu[s] = halo.getMagnification(pos, float(z), units=galsim.arcsec)
    gm = np.hypot(g1, g2)
    bad = ~np.isfinite(gm)
    g1[bad] = g2[bad] = 0.0
    gm = np.hypot(g1, g2)
    fac = np.where(gm > sc.max_shear, sc.max_shear / np.maximum(gm, 1e-12), 1.0)
    g1 *= fac
    g2 *= fac
    mu = np.clip(np.nan_to_num(mu, nan=1.0), 0.5, 5.0)
    idx = np.flatnonzero(gal)
    objects.loc[idx, "shear_g1"] = g1
    objects.loc[idx, "shear_g2"] = g2
    objects.loc[idx, "magnification"] = mu
    for c in [c for c in objects.columns if c.startswith("flux_")]:
        objects.loc[idx, c] = objects.loc[idx, c].to_numpy() * mu


def detector_footprints(scene: Scene, visit_row) -> list[tuple[float, float, float, float]]:
    """Tangent-plane bounding boxes (xi0, xi1, eta0, eta1; arcsec) of every detector in a visit."""
    r = scene.recipe
    g = scene.geometry
    out = []
    xs = np.array([-0.5, g.nx - 0.5, g.nx - 0.5, -0.5])
    ys = np.array([-0.5, -0.5, g.ny - 0.5, g.ny - 0.5])
    for det in range(g.n_detectors):
        w = detector_wcs(g, det, visit_row.boresight_ra, visit_row.boresight_dec, visit_row.rotation_angle)
        ra, dec = w.all_pix2world(xs, ys, 0)
        xi, eta = sky_to_tangent(ra, dec, r.field.ra, r.field.dec)
        out.append((xi.min(), xi.max(), eta.min(), eta.max()))
    return out
