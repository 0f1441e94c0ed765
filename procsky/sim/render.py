"""Drawing one detector of one visit: the scene, noise, artefacts and instrument signature.

Noise and signature model (the same for both output modes, so the ``raw`` and
``calibrated`` twins of one recipe and seed share one noise realisation):

* ``E`` — expected photo-electrons per pixel in the flat-fielded frame: sky (with a mild
  linear gradient across the focal plane) + objects (GalSim, photon-free, drawn in
  bounded stamps through the local affine approximation of the WCS) + satellite trail.
* ``P = Poisson(E)``; the detector response ``flat`` scales it: ``Q = P * flat + CR +
  Poisson(D t)`` with cosmic-ray deposits ``CR`` and dark current ``D`` (hot pixels are
  dark-current outliers). Charge above the full well bleeds along the column.
* read noise ``R ~ N(0, rn)`` and bad-column charge ``K`` are added at readout.
* raw (ADU): ``(Q + R + K) / gain + bias(x, y) + overscan level``, rounded, with
  ``overscan_columns`` of overscan (level + read noise) to the right of the data.
* calibrated (ADU): exactly the instrument-signature removal of that raw image,
  ``(Q + R + K - D t) / (gain * flat)``, i.e. ``P / gain`` plus cosmic rays, dark shot
  noise and read noise scaled by ``1 / (gain * flat)``.
  Variance: ``E / gain^2 + (rn^2 + D t) / (gain * flat)^2``. Mask: BAD on bad columns
  and hot pixels, SAT where the full well was reached; cosmic rays are *not* masked.

So ``(raw - overscan - bias - dark * EXPTIME) / flat`` reproduces the calibrated image up
to ADC rounding (1/sqrt(12) ADU) and the noise of the master bias.

Raw mode also writes the individual calibration exposures a master is made from
(:func:`write_calib_frames`): bias, dark and lamp-flat frames with the same bias pattern,
dark map, defects and detector response as the masters and the science raws, and their
own read, Poisson and cosmic-ray noise (:func:`draw_calib_frame`). (Strictly, the
detected electrons of a pixel with response ``flat`` would be ``Poisson(E * flat)``; we
scale one realisation by ``flat`` instead, which differs by < 1% in variance for flats
within a few % of 1.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from procsky.instruments.simcam import BAND_DATA, SimcamGeometry, detector_wcs, focal_plane_position
from procsky.sim.psf import psf_params_from_dict, psf_summary
from procsky.sim.scene import rng_for

__all__ = [
    "DetectorImage",
    "render_detector",
    "detector_defects",
    "flat_field",
    "bias_pattern",
    "dark_map",
    "bleed_columns",
    "write_detector",
    "write_calibs",
    "image_filename",
    "CALIB_EXPOSURE_BASE",
    "calib_exposure_id",
    "calib_frame_filename",
    "draw_calib_frame",
    "write_calib_frames",
    "lanczos3_weights",
    "resample_noise",
]

BAD, SAT = 1 << 0, 1 << 1


@dataclass
class DetectorImage:
    """Everything drawn for one (visit, detector)."""

    visit: int
    detector: int
    wcs: object
    calibrated: np.ndarray  # ADU, float32
    variance: np.ndarray  # ADU^2
    mask: np.ndarray  # uint32
    raw: np.ndarray | None  # ADU incl. overscan, or None
    expected: np.ndarray | None  # E (electrons), only when asked for
    truth: pd.DataFrame = field(default_factory=pd.DataFrame)
    cosmic_rays: pd.DataFrame = field(default_factory=pd.DataFrame)
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- defects
def detector_defects(recipe, geometry: SimcamGeometry, detector: int) -> pd.DataFrame:
    """Bad columns and hot pixels of one detector (fixed for a recipe and seed).

    Columns: ``detector, kind ('bad_column'|'hot_pixel'), x, y0, y1`` (0-based, inclusive),
    ``value`` (extra charge for bad columns, e-; dark current for hot pixels, e-/s).
    """
    rng = rng_for(recipe.seed, "defects", detector)
    nx, ny = geometry.nx, geometry.ny
    a = recipe.artifacts
    rows = []
    for _ in range(a.bad_columns_per_detector):
        x = int(rng.integers(8, nx - 8))
        y0 = 0 if rng.uniform() < 0.5 else int(rng.integers(0, ny // 2))
        rows.append(("bad_column", x, y0, ny - 1, float(rng.uniform(300.0, 3000.0))))
    n_hot = rng.poisson(a.hot_pixels_per_mpix * nx * ny / 1e6)
    for _ in range(n_hot):
        x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        rows.append(("hot_pixel", x, y, y, float(rng.uniform(*recipe.raw.hot_pixel_dark))))
    df = pd.DataFrame(rows, columns=["kind", "x", "y0", "y1", "value"])
    df = df.astype({"x": np.int64, "y0": np.int64, "y1": np.int64, "value": np.float64})  # also when empty
    df.insert(0, "detector", detector)
    return df


def dark_map(recipe, geometry, detector: int, defects: pd.DataFrame | None = None) -> np.ndarray:
    """Dark current (e-/s) per pixel: uniform level plus hot pixels."""
    if defects is None:
        defects = detector_defects(recipe, geometry, detector)
    d = np.full((geometry.ny, geometry.nx), recipe.raw.dark_current, dtype=np.float64)
    hot = defects[defects["kind"] == "hot_pixel"]
    d[hot["y0"].to_numpy(), hot["x"].to_numpy()] += hot["value"].to_numpy()
    return d


def flat_field(recipe, geometry, detector: int, band: str) -> np.ndarray:
    """Detector response (dimensionless, ~1): vignetting across the focal plane times PRNU.

    Vignetting ``1 - v (r / r_corner)^2`` (stronger in the blue), pixel response
    non-uniformity Gaussian with rms ``prnu`` (fixed per detector), and a weak band
    dependence of the PRNU amplitude.
    """
    ny, nx = geometry.ny, geometry.nx
    fx, fy = focal_plane_position(geometry, detector, np.arange(nx)[None, :], np.arange(ny)[:, None])
    r2 = (fx * fx + fy * fy) / geometry.corner_radius**2
    lam = BAND_DATA[band]["wavelength"]
    vig = recipe.raw.vignetting * (622.0 / lam) ** 0.5
    prnu = rng_for(recipe.seed, "flat", detector).standard_normal((ny, nx), dtype=np.float32)
    prnu *= recipe.raw.prnu * (622.0 / lam) ** 0.3
    prnu += 1.0
    return (1.0 - vig * r2) * prnu


def bias_pattern(recipe, geometry, detector: int) -> np.ndarray:
    """Overscan-subtracted bias structure (ADU): a gentle slope, a row ripple and column offsets."""
    rng = rng_for(recipe.seed, "signature", detector)
    ny, nx = geometry.ny, geometry.nx
    s = recipe.raw.bias_structure
    x = np.arange(nx) / nx - 0.5
    y = np.arange(ny) / ny
    cols = rng.normal(0.0, 0.3 * s, nx)
    phase = rng.uniform(0, 2 * np.pi)
    return (s * x[None, :] + 0.5 * s * np.sin(4 * np.pi * y + phase)[:, None] + cols[None, :]).astype(np.float64)


# -------------------------------------------------------------------------- bleeding
def bleed_columns(q: np.ndarray, full_well: float) -> np.ndarray:
    """Move charge above ``full_well`` up and down the column (in place); return SAT mask.

    Each run of over-full pixels is clipped to the full well and its excess charge shared
    equally between the two directions, filling neighbouring pixels to the full well one
    by one (the classic blooming picture); charge reaching the detector edge is lost.
    """
    ny = q.shape[0]
    cols = np.flatnonzero((q > full_well).any(axis=0))
    for c in cols:
        col = q[:, c]
        idx = np.flatnonzero(col > full_well)
        runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
        for run in runs:
            excess = float((col[run] - full_well).sum())
            col[run] = full_well
            for step, start in ((1, run[-1] + 1), (-1, run[0] - 1)):
                share = 0.5 * excess
                j = start
                while share > 0 and 0 <= j < ny:
                    room = full_well - col[j]
                    if room > 0:
                        take = min(room, share)
                        col[j] += take
                        share -= take
                    j += step
    return q >= full_well


def _saturated_at(full: np.ndarray, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Which objects saturate: the brightest object whose 3x3 box (around its 0-based pixel
    position) touches each connected region of over-full pixels ``full`` (so a faint
    neighbour of a saturated star is not counted)."""
    ny, nx = full.shape
    out = np.zeros(len(x), dtype=bool)
    if len(x) == 0 or not full.any():
        return out
    from scipy.ndimage import label

    lab, _ = label(full)
    xi, yi = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    owner: dict[int, int] = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            xx, yy = xi + dx, yi + dy
            ok = np.flatnonzero((xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny))
            for i, region in zip(ok, lab[yy[ok], xx[ok]]):
                if region and (region not in owner or counts[i] > counts[owner[region]]):
                    owner[int(region)] = int(i)
    out[list(owner.values())] = True
    return out


def _grow(m: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel (8-connected)."""
    if not m.any():
        return m
    from scipy.ndimage import binary_dilation

    return binary_dilation(m, structure=np.ones((3, 3), bool))


# ------------------------------------------------------------------------- drawing
def _local_jacobians(wcs, x, y, h=0.5):
    """d(xi, eta)/d(x, y) in arcsec/pixel at each position (xi east, eta north)."""
    xs = np.concatenate([x + h, x - h, x, x])
    ys = np.concatenate([y, y, y + h, y - h])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    n = len(x)
    ra = ra.reshape(4, n)
    dec = dec.reshape(4, n)
    cosd = np.cos(np.radians(dec.mean(axis=0)))

    def dxi(a, b):
        return (((ra[a] - ra[b] + 180.0) % 360.0) - 180.0) * cosd * 3600.0

    dudx = dxi(0, 1) / (2 * h)
    dvdx = (dec[0] - dec[1]) * 3600.0 / (2 * h)
    dudy = dxi(2, 3) / (2 * h)
    dvdy = (dec[2] - dec[3]) * 3600.0 / (2 * h)
    return dudx, dudy, dvdx, dvdy


def _galaxy_profile(galsim, hlr_disk, hlr_bulge, bulge_fraction, g1, g2, sg1, sg2, gsparams):
    """Bulge (de Vaucouleurs, truncated at 8 hlr) + exponential disk, flux 1, sky frame (arcsec)."""
    disk = galsim.Exponential(half_light_radius=hlr_disk, gsparams=gsparams).shear(g1=g1, g2=g2)
    if bulge_fraction > 0.01:
        bulge = galsim.DeVaucouleurs(half_light_radius=hlr_bulge, trunc=8.0 * hlr_bulge, gsparams=gsparams)
        bulge = bulge.shear(g1=0.5 * g1, g2=0.5 * g2)
        prof = galsim.Add([bulge.withFlux(bulge_fraction), disk.withFlux(1.0 - bulge_fraction)])
    else:
        prof = disk
    if sg1 != 0.0 or sg2 != 0.0:
        prof = prof.shear(g1=sg1, g2=sg2)
    return prof


def _draw_objects(
    galsim,
    image_e,
    objects,
    x,
    y,
    counts_e,
    wcs,
    geometry,
    detector,
    psf_params,
    gsparams,
    faint_gsparams=None,
    faint_limit=0.0,
    noise_e=None,
):
    """Add every object's pixel-convolved profile (electrons) to ``image_e`` in stamps.

    Objects with fewer than ``faint_limit`` electrons are drawn with ``faint_gsparams``
    (looser FFT folding/maxk thresholds: the lost accuracy is far below their noise).
    Space PSFs (wide Airy wings and spikes) get stamps reaching the radius beyond which the
    object's PSF stays below 0.2 ``noise_e`` (the per-pixel noise, e-), so bright stars show
    their spikes; the flux beyond is below the noise by construction.
    """
    ny, nx = image_e.shape
    if len(x) == 0:
        return
    dudx, dudy, dvdx, dvdy = _local_jacobians(wcs, x, y)
    fx, fy = focal_plane_position(geometry, detector, x, y)
    kind = objects["kind"].to_numpy()
    is_gal = kind == "galaxy"
    hlr_d = objects["hlr_disk"].to_numpy() if "hlr_disk" in objects else np.zeros(len(x))
    hlr_b = objects["hlr_bulge"].to_numpy() if "hlr_bulge" in objects else np.zeros(len(x))
    bfrac = objects["bulge_fraction"].to_numpy() if "bulge_fraction" in objects else np.zeros(len(x))
    g1 = objects["g1"].to_numpy() if "g1" in objects else np.zeros(len(x))
    g2 = objects["g2"].to_numpy() if "g2" in objects else np.zeros(len(x))
    sg1 = objects["shear_g1"].to_numpy() if "shear_g1" in objects else np.zeros(len(x))
    sg2 = objects["shear_g2"].to_numpy() if "shear_g2" in objects else np.zeros(len(x))
    scale = psf_params.pixel_scale
    full = galsim.BoundsI(0, nx - 1, 0, ny - 1)
    wing = None
    if getattr(psf_params, "family", "atmospheric") == "space":
        wing = _wing_profile(psf_params.at_focal_plane(0.0, 0.0, gsparams=gsparams))
        wing_floor = 0.2 * (noise_e if noise_e else 1.0)
    for i in range(len(x)):
        c = counts_e[i]
        if not c > 0:
            continue
        gsp = faint_gsparams if (faint_gsparams is not None and c < faint_limit) else gsparams
        fwhm_px = psf_params.local(fx[i], fy[i])[0] / scale
        boost = 1.0 + 0.6 * max(0.0, math.log10(c / 1e4))
        if is_gal[i]:
            size_px = max(3.0 * fwhm_px, 5.0 * max(hlr_d[i], hlr_b[i]) / scale)
        else:
            size_px = 3.0 * fwhm_px
        half = int(math.ceil(min(max(size_px * boost, 8.0), 400.0)))
        if wing is not None:
            beyond = np.flatnonzero(c * wing < wing_floor)
            half = max(half, int(beyond[0]) if len(beyond) else len(wing))
        xc, yc = int(round(x[i])), int(round(y[i]))
        b = galsim.BoundsI(xc - half, xc + half, yc - half, yc + half) & full
        if not b.isDefined():
            continue  # the stamp misses this detector
        psf = psf_params.at_focal_plane(fx[i], fy[i], gsparams=gsp)
        if is_gal[i]:
            jac = galsim.JacobianWCS(dudx[i], dudy[i], dvdx[i], dvdy[i])
            gal = _galaxy_profile(galsim, hlr_d[i], hlr_b[i], bfrac[i], g1[i], g2[i], sg1[i], sg2[i], gsp)
            prof = galsim.Convolve([jac.toImage(gal), psf], gsparams=gsp).withFlux(c)
        else:
            prof = psf.withFlux(c)
        stamp = galsim.ImageF(b, scale=1.0)
        prof.drawImage(image=stamp, center=galsim.PositionD(float(x[i]), float(y[i])), method="auto")
        image_e[b.ymin : b.ymax + 1, b.xmin : b.xmax + 1] += stamp.array


def _wing_profile(psf, size: int = 241) -> np.ndarray:
    """``w[r]``: the largest pixel value (flux 1) of the pixel-convolved PSF at radius >= r px."""
    img = psf.drawImage(nx=size, ny=size, scale=1.0, method="auto").array
    c = size // 2
    yy, xx = np.indices(img.shape)
    r = np.hypot(xx - c, yy - c).astype(int).ravel()
    peak = np.zeros(r.max() + 1)
    np.maximum.at(peak, r, img.ravel())
    return np.maximum.accumulate(peak[::-1])[::-1][: c + 1]


# ------------------------------------------------------------- correlated noise
def lanczos3_weights(shift: float) -> np.ndarray:
    """The 7 normalised Lanczos-3 weights ``w[j] = L(j - 3 - shift)`` (``|shift| <= 0.5``).

    ``sum_j w[j] f[i + j - 3]`` interpolates ``f`` at ``i + shift`` (Lanczos 1979; the
    kernel of most astronomical warpers, e.g. SWarp and LSST's ``lanczos3``).
    """
    t = np.arange(-3, 4) - shift
    w = np.sinc(t) * np.sinc(t / 3.0)
    w[np.abs(t) >= 3.0] = 0.0
    return w / w.sum()


def resample_noise(noise: np.ndarray, dx: float, dy: float) -> tuple[np.ndarray, dict]:
    """Resample a noise field by a sub-pixel shift (separable Lanczos-3); return it and its stats.

    The stats: ``noise_variance_factor`` (per-pixel variance after / before,
    ``sum(wx^2) sum(wy^2)`` for white input) and ``noise_corr_x, noise_corr_y`` (correlation
    coefficient of horizontally / vertically adjacent pixels, ``sum w_j w_j+1 / sum w^2``).
    """
    from scipy.ndimage import correlate1d

    wx, wy = lanczos3_weights(dx), lanczos3_weights(dy)
    out = correlate1d(noise, wx, axis=1, mode="mirror")
    out = correlate1d(out, wy, axis=0, mode="mirror")
    stats = {
        "noise_shift_x": float(dx),
        "noise_shift_y": float(dy),
        "noise_variance_factor": float((wx**2).sum() * (wy**2).sum()),
        "noise_corr_x": float((wx[:-1] * wx[1:]).sum() / (wx**2).sum()),
        "noise_corr_y": float((wy[:-1] * wy[1:]).sum() / (wy**2).sum()),
    }
    return out, stats


def _cosmic_rays(rng, recipe, shape, exptime):
    """Cosmic-ray tracks: deposit map (e-) and the list of hit pixels."""
    ny, nx = shape
    n = rng.poisson(recipe.artifacts.cosmic_ray_rate * nx * ny / 1e6 * exptime)
    dep = np.zeros(shape, dtype=np.float64)
    if n == 0:
        return dep, np.zeros((0, 3))
    x0 = rng.uniform(-0.5, nx - 0.5, n)
    y0 = rng.uniform(-0.5, ny - 0.5, n)
    length = rng.exponential(6.0, n)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    energy = np.exp(rng.normal(math.log(2500.0), 0.6, n))
    for i in range(n):
        steps = max(1, int(length[i] / 0.4))
        s = np.linspace(0.0, length[i], steps)
        xx = np.rint(x0[i] + s * math.cos(angle[i])).astype(int)
        yy = np.rint(y0[i] + s * math.sin(angle[i])).astype(int)
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        np.add.at(dep, (yy[ok], xx[ok]), energy[i] / steps)
    ys, xs = np.nonzero(dep)
    return dep, np.column_stack([xs, ys, dep[ys, xs]])


def _satellite(visit, geometry, detector, shape):
    """Satellite trail surface brightness (e-/pixel) on this detector, or None."""
    if not visit["satellite"]:
        return None
    ny, nx = shape
    fx, fy = focal_plane_position(geometry, detector, np.arange(nx)[None, :], np.arange(ny)[:, None])
    a = visit["sat_angle"]
    # distance to the line through (sat_x0, sat_y0) at angle a
    d = -(fx - visit["sat_x0"]) * math.sin(a) + (fy - visit["sat_y0"]) * math.cos(a)
    s = visit["sat_sigma_px"]
    if np.abs(d).min() > 6 * s:
        return None
    return visit["sat_peak_e"] * np.exp(-0.5 * (d / s) ** 2)


def render_detector(
    recipe, visit: dict, detector: int, objects: pd.DataFrame, *, raw: bool = False, keep_expected: bool = False
) -> DetectorImage:
    """Draw one detector of one visit.

    Parameters
    ----------
    recipe : Recipe
    visit : dict
        One row of ``Scene.visits``.
    detector : int
    objects : pandas.DataFrame
        Objects near this detector with columns ``object_id, kind, ra, dec, flux`` (nJy
        at this epoch in this band) and, for galaxies, ``hlr_disk, hlr_bulge`` (arcsec),
        ``bulge_fraction, g1, g2, shear_g1, shear_g2``.
    raw : bool
        Also build the raw image (with overscan and signature).
    keep_expected : bool
        Keep the noiseless expected image ``E`` (electrons) for tests.
    """
    import galsim

    geometry = SimcamGeometry(recipe.instrument, recipe.seed)
    inst = recipe.instrument
    ny, nx = geometry.ny, geometry.nx
    gain, rn, fw = inst.gain, inst.read_noise, inst.full_well
    band = visit["band"]
    t = float(visit["exposure_time"])
    vid = int(visit["visit"])
    wcs = detector_wcs(geometry, detector, visit["boresight_ra"], visit["boresight_dec"], visit["rotation_angle"])
    psf_params = psf_params_from_dict(visit)
    # GalSim pads every FFT to at least 128 x 128 by default; most of our objects need far
    # less, and 32 makes drawing ~3x faster with the same folding/maxk accuracy.
    gsparams = galsim.GSParams(minimum_fft_size=32, maximum_fft_size=8192)
    faint_gsparams = galsim.GSParams(
        minimum_fft_size=32, maximum_fft_size=8192, folding_threshold=2e-2, maxk_threshold=5e-3
    )

    # ---- positions, counts and the noiseless image
    ra = objects["ra"].to_numpy(dtype=float)
    dec = objects["dec"].to_numpy(dtype=float)
    if len(ra):
        x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50)
    else:
        x = y = np.zeros(0)
    flux = objects["flux"].to_numpy(dtype=float) if len(ra) else np.zeros(0)
    counts = flux * 10.0 ** (0.4 * (visit["magzero"] - 31.4))  # ADU
    margin = 200
    near = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
    fxx, fyy = focal_plane_position(geometry, detector, np.arange(nx)[None, :], np.arange(ny)[:, None])
    R = geometry.corner_radius
    sky = visit["sky_electrons"] * (1.0 + visit["sky_grad_x"] * fxx / R + visit["sky_grad_y"] * fyy / R)
    del fxx, fyy
    expected = sky
    del sky
    _draw_objects(
        galsim,
        expected,
        objects[near].reset_index(drop=True),
        x[near],
        y[near],
        counts[near] * gain,
        wcs,
        geometry,
        detector,
        psf_params,
        gsparams,
        faint_gsparams,
        faint_limit=300.0 * math.sqrt(visit["sky_electrons"] + rn**2),
        noise_e=math.sqrt(visit["sky_electrons"] + rn**2),
    )
    trail = _satellite(visit, geometry, detector, (ny, nx))
    if trail is not None:
        expected += trail
        del trail
        has_trail = True
    else:
        has_trail = False

    # ---- noise, artefacts, signature (in place: a 2048^2 detector holds few full arrays)
    rng = rng_for(recipe.seed, "noise", vid, detector)
    charge = rng.poisson(np.maximum(expected, 0.0)).astype(np.float64)  # P
    read = rng.normal(0.0, rn, (ny, nx))
    flat = flat_field(recipe, geometry, detector, band)
    defects = detector_defects(recipe, geometry, detector)
    dark_t = dark_map(recipe, geometry, detector, defects)
    dark_t *= t  # expected dark electrons
    charge *= flat
    charge += rng.poisson(dark_t)
    noise_stats = {
        "noise_shift_x": 0.0,
        "noise_shift_y": 0.0,
        "noise_variance_factor": 1.0,
        "noise_corr_x": 0.0,
        "noise_corr_y": 0.0,
    }
    if recipe.noise.correlation == "lanczos3":
        # Resample the noise (not the signal) as a warp would: Poisson, dark and read noise
        # of the pixel grid, shifted by a sub-pixel amount with a Lanczos-3 kernel.
        if recipe.noise.shift_px is None:
            dx, dy = rng_for(recipe.seed, "resample", vid, detector).uniform(-0.5, 0.5, 2)
        else:
            dx, dy = recipe.noise.shift_px
        mean = expected * flat + dark_t
        charge -= mean
        charge += read
        charge, noise_stats = resample_noise(charge, float(dx), float(dy))
        charge += mean
        del mean
        read[:] = 0.0
    pre_bleed_full = charge > fw
    cr_map, cr_list = _cosmic_rays(rng_for(recipe.seed, "cosmic", vid, detector), recipe, (ny, nx), t)
    charge += cr_map
    del cr_map
    # stars whose own charge overflows (cosmic rays landing on a bright pixel could add a
    # few; checked before they are added)
    sat_star = _saturated_at(pre_bleed_full, x, y, counts)
    del pre_bleed_full
    sat = bleed_columns(charge, fw)
    charge += read  # charge is now the signal as read out (e-)
    del read
    for d in defects[defects["kind"] == "bad_column"].itertuples():
        charge[d.y0 : d.y1 + 1, d.x] += d.value
    signal = charge
    calibrated = ((signal - dark_t) / (gain * flat)).astype(np.float32)
    variance = (expected / gain**2 + (rn**2 + dark_t) / (gain * flat) ** 2).astype(np.float32)
    mask = np.zeros((ny, nx), dtype=np.uint32)
    for d in defects.itertuples():
        mask[d.y0 : d.y1 + 1, d.x] |= BAD
    # Grow SAT by one pixel, as an ISR does (LSST ``growSaturationFootprintSize = 1``), so
    # the partially filled pixel at each end of a bleed trail is flagged too.
    mask[_grow(sat)] |= SAT

    raw_img = None
    if raw:
        o_rng = rng_for(recipe.seed, "overscan", vid, detector)
        level = recipe.raw.bias_level + o_rng.normal(0.0, 2.0)
        nos = recipe.raw.overscan_columns
        raw_img = np.empty((ny, nx + nos), dtype=np.float64)
        raw_img[:, :nx] = signal / gain + bias_pattern(recipe, geometry, detector) + level
        raw_img[:, nx:] = level + o_rng.normal(0.0, rn / gain, (ny, nos))
        raw_img = np.clip(np.rint(raw_img), 0, 65535).astype(np.float32)

    # ---- truth
    on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    truth = pd.DataFrame(
        {
            "object_id": objects["object_id"].to_numpy()[on].astype(np.int64),
            "visit": np.full(on.sum(), vid, dtype=np.int64),
            "detector": np.full(on.sum(), detector, dtype=np.int64),
            "band": band,
            "x": x[on],
            "y": y[on],
            "flux": flux[on],
            "counts": counts[on],
            "saturated": sat_star[on],
        }
    )
    if len(cr_list):
        cx, cy = cr_list[:, 0].astype(np.int64), cr_list[:, 1].astype(np.int64)
        crs = pd.DataFrame(
            {
                "visit": vid,
                "detector": detector,
                "x": cx,
                "y": cy,
                "electrons": cr_list[:, 2],
                "counts": cr_list[:, 2] / (gain * flat[cy, cx]),
            }
        )
    else:
        crs = pd.DataFrame(
            {
                "visit": pd.Series(dtype=np.int64),
                "detector": pd.Series(dtype=np.int64),
                "x": pd.Series(dtype=np.int64),
                "y": pd.Series(dtype=np.int64),
                "electrons": pd.Series(dtype=float),
                "counts": pd.Series(dtype=float),
            }
        )
    xc, yc = 0.5 * (nx - 1), 0.5 * (ny - 1)
    fxc, fyc = focal_plane_position(geometry, detector, xc, yc)
    summary = {
        "visit": vid,
        "detector": detector,
        "band": band,
        "mjd": float(visit["mjd"]),
        "exposure_time": t,
        "magzero": float(visit["magzero"]),
        "gain": gain,
        "read_noise": rn,
        "saturation": fw / gain,
        "sky_level": float(
            visit["sky_electrons"] * (1 + visit["sky_grad_x"] * fxc / R + visit["sky_grad_y"] * fyc / R) / gain
        ),
        **_sky_gradient(visit, geometry, detector, gain),
        "focal_plane_x": float(fxc),
        "focal_plane_y": float(fyc),
        **psf_summary(psf_params, float(fxc), float(fyc)),
        "n_cosmic_ray_pixels": int(len(cr_list)),
        "n_saturated": int(sat.sum()),
        "n_saturated_objects": int(sat_star[on].sum()),
        **noise_stats,
        "satellite": has_trail,
        "wcs_header": wcs.to_header(relax=True).tostring(sep="\n"),
    }
    return DetectorImage(
        vid,
        detector,
        wcs,
        calibrated,
        variance,
        mask,
        raw_img,
        expected if keep_expected else None,
        truth,
        crs,
        summary,
    )


def _sky_gradient(visit, geometry, detector, gain) -> dict:
    """Sky gradient in ADU per detector pixel along x and y."""
    d = geometry.detectors[detector]
    R = geometry.corner_radius
    gx = visit["sky_electrons"] * visit["sky_grad_x"] / R / gain
    gy = visit["sky_electrons"] * visit["sky_grad_y"] / R / gain
    c, s = math.cos(d.rotation), math.sin(d.rotation)
    # focal-plane gradient (gx, gy) -> pixel gradient through f = R_d (p - p0)
    return {"sky_grad_x": float(gx * c + gy * s), "sky_grad_y": float(-gx * s + gy * c)}


# -------------------------------------------------------------------------- writing
def image_filename(kind: str, visit: int, detector: int) -> str:
    """``<kind>-v<visit:06d>-d<detector:03d>.fits`` (kind is ``calexp`` or ``raw``)."""
    return f"{kind}-v{visit:06d}-d{detector:03d}.fits"


def _common_keys(recipe, geometry, detector, imagetyp):
    c = recipe.instrument
    d = geometry.detectors[detector]
    return {
        "IMAGETYP": (imagetyp, "calexp, raw, bias, dark or flat"),
        "INSTRUME": ("simcam", "procsky.sim simulated camera"),
        "DETECTOR": (detector, "detector number"),
        "DETNAME": (d.name, "detector name"),
        "DETNX": (geometry.nx, "science pixels along x"),
        "DETNY": (geometry.ny, "science pixels along y"),
        "GAIN": (c.gain, "e-/ADU"),
        "RDNOISE": (c.read_noise, "read noise, e-"),
        "SATURATE": (c.full_well / c.gain, "saturation (full well), ADU above bias"),
        "BUNIT": ("adu", "pixel unit"),
        "SIMSEED": (recipe.seed, "procsky.sim recipe seed"),
        "RECIPE": (recipe.name, "procsky.sim recipe name"),
    }


def write_detector(recipe, visit: dict, img: DetectorImage, path, mode: str) -> None:
    """Write one detector image as a procsky MEF FITS exposure (``calexp`` or ``raw``)."""
    from procsky.exposure import Exposure, VisitInfo
    from procsky.photocalib import PhotoCalib

    geometry = SimcamGeometry(recipe.instrument, recipe.seed)
    vi = VisitInfo(
        exposure_time=float(visit["exposure_time"]),
        mjd=float(visit["mjd"]),
        band=visit["band"],
        physical_filter=visit["physical_filter"],
        airmass=float(visit["airmass"]),
        boresight_ra=float(visit["boresight_ra"]),
        boresight_dec=float(visit["boresight_dec"]),
        rotation_angle=float(visit["rotation_angle"]),
        observatory="simulated",
        instrument="simcam",
        visit=int(visit["visit"]),
    )
    keys = _common_keys(recipe, geometry, img.detector, mode)
    meta = {"imagetyp": mode, "recipe": recipe.name, "seed": recipe.seed, "units": "adu"}
    if mode == "raw":
        nx, ny = geometry.nx, geometry.ny
        nos = recipe.raw.overscan_columns
        assert img.raw is not None  # render_detector(..., raw=True) in raw mode
        image = img.raw
        variance = (
            np.maximum(img.raw - recipe.raw.bias_level, 0.0) / recipe.instrument.gain
            + (recipe.instrument.read_noise / recipe.instrument.gain) ** 2
        ).astype(np.float32)
        mask = np.zeros(image.shape, dtype=np.uint32)
        keys["DATASEC"] = (f"[1:{nx},1:{ny}]", "science pixels (FITS 1-based)")
        keys["BIASSEC"] = (f"[{nx + 1}:{nx + nos},1:{ny}]", "serial overscan (FITS 1-based)")
        meta.update(datasec=[0, nx, 0, ny], biassec=[nx, nx + nos, 0, ny])
    else:
        image, variance, mask = img.calibrated, img.variance, img.mask
    keys["MAGZERO"] = (float(visit["magzero"]), "AB mag of 1 ADU in this exposure")
    keys["SKYLEVEL"] = (img.summary["sky_level"], "true sky at detector centre, ADU")
    keys["SEEING"] = (img.summary["psf_fwhm"], "true PSF FWHM at detector centre, arcsec")
    det = geometry.detector_dict(img.detector)
    if mode == "raw":
        det.update(datasec=meta["datasec"], biassec=meta["biassec"])
    exp = Exposure(
        image,
        variance,
        mask,
        wcs=img.wcs,
        visit_info=vi,
        photocalib=PhotoCalib.from_zero_point(float(visit["magzero"])),
        detector=det,
        metadata=meta,
    )
    exp.write(path, primary_header=keys)


def write_calibs(recipe, detector: int, bands: list[str], calib_dir) -> list[str]:
    """Write the bias, dark and per-band flat of one detector; return the file names.

    bias: overscan-subtracted master bias (ADU), the mean of 20 frames (so its noise is
    ``rn / gain / sqrt(20)``). dark: dark current in ADU per second. flat: response
    normalised as drawn (dimensionless). Every calib's mask has BAD on the defects.
    """
    from pathlib import Path

    from procsky.exposure import Exposure

    geometry = SimcamGeometry(recipe.instrument, recipe.seed)
    inst = recipe.instrument
    calib_dir = Path(calib_dir)
    defects = detector_defects(recipe, geometry, detector)
    mask = np.zeros((geometry.ny, geometry.nx), dtype=np.uint32)
    for d in defects.itertuples():
        mask[d.y0 : d.y1 + 1, d.x] |= BAD
    wcs = None
    names = []
    rng = rng_for(recipe.seed, "signature", detector, 1)
    nb = 20
    bias = bias_pattern(recipe, geometry, detector) + rng.normal(
        0.0, inst.read_noise / inst.gain / math.sqrt(nb), mask.shape
    )
    dark = dark_map(recipe, geometry, detector, defects) / inst.gain
    frames: list[tuple[str, str | None, np.ndarray, np.ndarray]] = [
        ("bias", None, bias, np.full(mask.shape, (inst.read_noise / inst.gain) ** 2 / nb)),
        ("dark", None, dark, np.zeros(mask.shape)),
    ]
    for b in bands:
        frames.append(("flat", b, flat_field(recipe, geometry, detector, b), np.zeros(mask.shape)))
    for kind, band, image, var in frames:
        name = f"{kind}-d{detector:03d}.fits" if band is None else f"{kind}-{band}-d{detector:03d}.fits"
        keys = _common_keys(recipe, geometry, detector, kind)
        keys["BUNIT"] = {
            "bias": ("adu", ""),
            "dark": ("adu/s", "dark current per second"),
            "flat": ("", "dimensionless response"),
        }[kind]
        meta = {"imagetyp": kind, "recipe": recipe.name, "seed": recipe.seed}
        if band is not None:
            keys["BAND"] = (band, "band of this flat")
            keys["FILTER"] = (f"simcam-{band}", "physical filter")
            meta["band"] = band
        exp = Exposure(
            image.astype(np.float32),
            var.astype(np.float32),
            mask.copy(),
            wcs=wcs,
            detector=geometry.detector_dict(detector),
            metadata=meta,
        )
        path = calib_dir / name
        exp.write(path, primary_header=keys)
        names.append(name)
    return names


# ------------------------------------------------------------- calibration exposures
#: Exposure ids of simulated calibration frames start here (far above any science visit).
CALIB_EXPOSURE_BASE = 900000


def calib_exposure_id(kind: str, index: int, band: str | None = None) -> int:
    """Exposure id of the ``index``-th (1-based) bias, dark or flat exposure of the focal plane.

    bias ``k`` -> ``900000 + k``; dark ``k`` -> ``900500 + k``; flat ``k`` of band ``b`` ->
    ``900000 + 1000 (j + 1) + k`` with ``j`` the index of ``b`` in ``u g r i z y``. One id
    covers every detector, as a real focal-plane exposure does.
    """
    from procsky.sim.recipe import KNOWN_BANDS

    if not 1 <= index < 500:
        raise ValueError(f"calibration frame index must be 1..499, got {index}")
    if kind == "bias":
        return CALIB_EXPOSURE_BASE + index
    if kind == "dark":
        return CALIB_EXPOSURE_BASE + 500 + index
    if kind == "flat":
        return CALIB_EXPOSURE_BASE + 1000 * (KNOWN_BANDS.index(band) + 1) + index
    raise ValueError(f"kind must be 'bias', 'dark' or 'flat', got {kind!r}")


def calib_frame_filename(kind: str, exposure: int, detector: int) -> str:
    """``<kind>-e<exposure:06d>-d<detector:03d>.fits``."""
    return f"{kind}-e{exposure:06d}-d{detector:03d}.fits"


def draw_calib_frame(
    recipe,
    geometry,
    detector: int,
    kind: str,
    exposure: int,
    band: str | None = None,
    *,
    bias: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    defects: pd.DataFrame | None = None,
) -> np.ndarray:
    """One raw bias, dark or flat exposure of one detector (ADU incl. overscan, uint16).

    The same signature as the science raws of :func:`render_detector`: the overscan level
    drawn per exposure, the 2-d ``bias_pattern``, read noise ``rn`` (e-), gain, and for
    flats the detector response ``flat_field`` of the band:

    * bias: ``R / gain + bias + level`` with ``R ~ N(0, rn)``.
    * dark: ``Q = Poisson(D t) + CR + K`` over ``t = dark_exposure_time`` (shutter closed),
      then ``(Q + R) / gain + bias + level``.
    * flat: ``Q = Poisson(L f) + Poisson(D t) + CR + K`` then ``(Q + R) / gain + bias + level``:
      lamp level ``L = flat_level (1 + 0.03 u)`` (``u ~ N(0, 1)``, the lamp drifts between
      exposures), response ``f``, dark current ``D`` over ``t = flat_exposure_time``, cosmic
      rays at the recipe's rate, bad-column charge ``K``. Unlike the science frames (see
      the module docstring) the photon noise is drawn from ``L f`` itself.

    Bad-column charge is modelled as accruing during an integration, so bias frames (zero
    exposure time) do not carry it; the master bias of :func:`write_calibs` has none either.
    """
    inst = recipe.instrument
    gain, rn = inst.gain, inst.read_noise
    ny, nx = geometry.ny, geometry.nx
    rng = rng_for(recipe.seed, "calib_frame", exposure, detector)
    level = recipe.raw.bias_level + rng.normal(0.0, 2.0)
    if bias is None:
        bias = bias_pattern(recipe, geometry, detector)
    if kind == "bias":
        charge = rng.normal(0.0, rn, (ny, nx))
    elif kind in ("flat", "dark"):
        if defects is None:
            defects = detector_defects(recipe, geometry, detector)
        if kind == "flat":
            if flat is None:
                assert band is not None, "a flat frame needs a band"
                flat = flat_field(recipe, geometry, detector, band)
            t = recipe.raw.flat_exposure_time
            lamp = recipe.raw.flat_level * (1.0 + 0.03 * rng.standard_normal())
            charge = rng.poisson(lamp * flat).astype(np.float64)
        else:
            t = recipe.raw.dark_exposure_time
            charge = np.zeros((ny, nx))
        charge += rng.poisson(dark_map(recipe, geometry, detector, defects) * t)
        cr_map, _ = _cosmic_rays(rng, recipe, (ny, nx), t)
        charge += cr_map
        del cr_map
        charge += rng.normal(0.0, rn, (ny, nx))
        for d in defects[defects["kind"] == "bad_column"].itertuples():
            charge[d.y0 : d.y1 + 1, d.x] += d.value
    else:
        raise ValueError(f"kind must be 'bias', 'dark' or 'flat', got {kind!r}")
    nos = recipe.raw.overscan_columns
    raw = np.empty((ny, nx + nos), dtype=np.float64)
    raw[:, :nx] = charge / gain + bias + level
    raw[:, nx:] = level + rng.normal(0.0, rn / gain, (ny, nos))
    return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)


def write_calib_frames(recipe, detector: int, bands: list[str], frame_dir) -> list[str]:
    """Write the individual bias, dark and flat exposures of one detector; return the file names.

    ``recipe.raw.n_bias_frames`` bias frames, ``n_dark_frames`` dark frames and
    ``n_flat_frames`` flat frames per band, as a camera writes them: one PRIMARY HDU of uint16 ADU (BZERO 32768) with
    overscan, and the keywords ``IMAGETYP`` (``bias``/``dark``/``flat``), ``EXPID`` (see
    :func:`calib_exposure_id`), ``EXPTIME``, ``MJD-OBS``, ``DETECTOR``, ``DETNAME``,
    ``GAIN``, ``RDNOISE``, ``SATURATE``, ``DATASEC``, ``BIASSEC`` and, for flats, ``FILTER``
    and ``BAND``. No mask, variance or WCS: ``procsky ingest`` builds those.
    """
    from pathlib import Path

    from astropy.io import fits

    geometry = SimcamGeometry(recipe.instrument, recipe.seed)
    frame_dir = Path(frame_dir)
    frame_dir.mkdir(parents=True, exist_ok=True)
    nx, ny, nos = geometry.nx, geometry.ny, recipe.raw.overscan_columns
    bias = bias_pattern(recipe, geometry, detector)
    defects = detector_defects(recipe, geometry, detector)
    jobs: list[tuple[str, int, str | None]] = [("bias", k, None) for k in range(1, recipe.raw.n_bias_frames + 1)]
    jobs += [("dark", k, None) for k in range(1, recipe.raw.n_dark_frames + 1)]
    for b in bands:
        jobs += [("flat", k, b) for k in range(1, recipe.raw.n_flat_frames + 1)]
    names = []
    flats: dict[str | None, np.ndarray] = {}
    for kind, k, band in jobs:
        expid = calib_exposure_id(kind, k, band)
        if band is not None and band not in flats:
            flats[band] = flat_field(recipe, geometry, detector, band)
        data = draw_calib_frame(
            recipe, geometry, detector, kind, expid, band, bias=bias, flat=flats.get(band), defects=defects
        )
        keys = _common_keys(recipe, geometry, detector, kind)
        t = {"bias": 0.0, "dark": recipe.raw.dark_exposure_time, "flat": recipe.raw.flat_exposure_time}[kind]
        keys.update(
            {
                "EXPID": (expid, "exposure id, shared by all detectors"),
                "EXPTIME": (t, "exposure time, s"),
                "MJD-OBS": (recipe.mjd_start - 1.0 + expid % 100000 / 1e5, "start of exposure (MJD)"),
                "DATASEC": (f"[1:{nx},1:{ny}]", "science pixels (FITS 1-based)"),
                "BIASSEC": (f"[{nx + 1}:{nx + nos},1:{ny}]", "serial overscan (FITS 1-based)"),
            }
        )
        if band is not None:
            keys["FILTER"] = (f"simcam-{band}", "physical filter")
            keys["BAND"] = (band, "band of this flat")
        hdu = fits.PrimaryHDU(data)
        for key, (value, comment) in keys.items():
            hdu.header[key] = (value, comment)
        name = calib_frame_filename(kind, expid, detector)
        tmp = frame_dir / (name + ".tmp")
        hdu.writeto(tmp, overwrite=True)
        tmp.replace(frame_dir / name)
        names.append(name)
    return names
