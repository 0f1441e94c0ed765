"""Measurement steps: windowed centroids, adaptive moments, aperture, Kron and PSF fluxes, flags; the
aperture correction and the aperture-to-total correction of the PSF fluxes and their errors.

**Aperture correction** = clipped weighted mean of ``ap_flux(apcorr_radius) / psf_flux`` over the PSF
stars with no other detection inside the aperture, applied to ``psf_flux``; its radius holds >= 98 % of
the PSF model's light (a space PSF: more than 4 FWHM) and is lowered, not below that, in a crowded field
(:func:`apcorr_radius`). **Aperture to total**: the light outside ``apcorr_radius`` from the
growth curve of the bright stars (clipped ring means out to 40 px against a local sky, power-law tail;
``kernels.growth``; with fewer than 3 stars of ``growth_min_snr``, fainter ones when the light they
find beyond the aperture is significant), also applied to ``psf_flux``, so that the zero point is that of the total flux
(``visit_photometry`` uses the visit's mean of it, the per-detector value being noisier).
``psf_flux_err`` is the photon noise of the PSF fit plus, in quadrature, the PSF model's fractional
flux error ``flux_sys`` times the flux: the excess scatter, beyond their noise, of the PSF stars'
aperture/PSF flux ratios when each is measured with a model fitted without it (cross-validation,
``kernels.psfmodel.cross_validated_flux_scatter``), plus, with a warp, the warp's own fitting noise at
each source (``kernels.psfmodel.model_flux_error``, largest where the model extrapolates).
"""

from __future__ import annotations

import numpy as np

from procsky import masks as _masks
from procsky.calibrate.config import MeasurementConfig, PsfConfig
from procsky.calibrate.detection import ap_name
from procsky.calibrate.state import CalibrateState
from procsky.kernels.growth import GrowthCorrection, aperture_to_total, encircled_energy_at, weighted_clipped_mean
from procsky.kernels.measure import isolated_apertures, measure_sources
from procsky.kernels.psfmodel import model_flux_error
from procsky.notes import note_degraded

__all__ = ["aperture_corrections", "measure", "measure_with_psf", "on_plane", "psf_flux_errors"]

# aperture S/N thresholds of the growth-curve stars tried, in turn, below ``growth_min_snr``
_GROWTH_FALLBACK_SNR = (50.0, 30.0, 20.0)
_GROWTH_BAD = int(_masks.bits("BAD", "SAT", "NO_DATA", "EDGE", "STREAK", "SUSPECT"))


def on_plane(mask: np.ndarray, x: np.ndarray, y: np.ndarray, bit_value: int) -> np.ndarray:
    """Whether any of the 3 x 3 pixels around each centroid has ``bit_value`` set."""
    ny, nx = mask.shape
    ok = np.isfinite(x) & np.isfinite(y)
    ix = np.round(np.where(ok, x, 0.0)).astype(np.int64)
    iy = np.round(np.where(ok, y, 0.0)).astype(np.int64)
    out = np.zeros(len(ix), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= (mask[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)] & np.uint32(bit_value)) != 0
    return out & ok


def measure(state: CalibrateState, config: MeasurementConfig) -> None:
    """First measurement of the detections, without a PSF model (Gaussian of ``state.sigma``)."""
    det = state.det
    state.meas = measure_sources(
        state.sub,
        state.var_det,
        state.mask,
        det.x,
        det.y,
        psf_sigma=state.sigma,
        children=det.children,
        child_ids=state.child_ids,
        blended=det.blended,
        aperture_radii=config.aperture_radii,
    )
    state.meas["flag_streak"] = on_plane(state.mask, state.meas["x"], state.meas["y"], state.bit["STREAK"])


def _note_cr_on_bright_stars(meas: dict[str, np.ndarray], snr_min: float = 100.0) -> None:
    """Note when most bright unsaturated sources have a cosmic-ray pixel at their centre
    (the cosmic-ray steps eating stars rather than hits)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = meas["psf_flux"] / meas["psf_flux_err"]
    bright = np.isfinite(snr) & (snr > snr_min) & ~meas["flag_saturated"]
    n, n_cr = int(bright.sum()), int((bright & meas["flag_cr_center"]).sum())
    if n >= 5 and n_cr > 0.5 * n:
        note_degraded(
            "cr_on_bright_stars",
            f"{n_cr} of {n} sources of S/N > {snr_min:g} have a cosmic-ray pixel at their centre",
            n_bright=n,
            n_cr_center=n_cr,
        )


def measure_with_psf(state: CalibrateState, config: MeasurementConfig) -> None:
    """Remeasure with the PSF model: centroids from the first pass, PSF stamps there; PSF fluxes with
    the neighbours' fitted models subtracted (``psf_neighbour_iterations``)."""
    det = state.det
    meas = measure_sources(
        state.sub,
        state.var_det,
        state.mask,
        state.meas["x"],
        state.meas["y"],
        psf_sigma=state.sigma_psf,
        children=det.children,
        child_ids=state.child_ids,
        blended=det.blended,
        aperture_radii=config.aperture_radii,
        psf_stamps=state.stamps,
        neighbour_iterations=config.psf_neighbour_iterations,
    )
    meas["flag_streak"] = on_plane(state.mask, meas["x"], meas["y"], state.bit["STREAK"])
    state.meas = meas
    _note_cr_on_bright_stars(meas)


# the aperture correction's radius holds at least this fraction of the PSF model's light (its stamp)
_APCORR_ENCIRCLED = 0.98
# and at least this fraction of the aperture-correction stars have no other detection inside it
_APCORR_CLEAN_FRACTION = 0.5


def model_encircled_energy(state: CalibrateState, radii: tuple[float, ...], sub: int = 5) -> np.ndarray:
    """Fraction of the PSF model's light (its stamp at the detector centre, normalised to 1) inside
    each circular aperture of ``radii`` pixels, the pixels split ``sub`` x ``sub``; NaN without a model."""
    psf = state.psf
    if psf is None:
        return np.full(len(radii), np.nan)
    ny, nx = state.shape
    try:
        k = np.asarray(psf.kernel(state.xy0[0] + 0.5 * (nx - 1), state.xy0[1] + 0.5 * (ny - 1)), float)
    except Exception:  # noqa: BLE001 - a model that cannot render has no curve of growth
        return np.full(len(radii), np.nan)
    tot = k.sum()
    if not (np.isfinite(tot) and tot > 0):
        return np.full(len(radii), np.nan)
    n = k.shape[0]
    off = (np.arange(sub) + 0.5) / sub - 0.5
    c = np.arange(n) - n // 2
    fx = (c[None, :, None, None] + off[None, None, None, :]) ** 2
    fy = (c[:, None, None, None] + off[None, None, :, None]) ** 2
    rr = np.sqrt(fx + fy)  # (n, n, sub, sub)
    return np.array([float((k * (rr <= r).mean(axis=(2, 3))).sum() / tot) for r in radii])


def _clean(state: CalibrateState, radius: float) -> np.ndarray:
    """Sources with no other detection within ``radius`` + 2 pixels (their aperture holds no neighbour's core)."""
    from scipy.spatial import cKDTree

    x, y = state.meas["x"], state.meas["y"]
    ok = np.isfinite(x) & np.isfinite(y)
    xy = np.column_stack([np.where(ok, x, -1e9), np.where(ok, y, -1e9)])
    counts = np.array([len(v) for v in cKDTree(xy).query_ball_point(xy, radius + 2.0)])
    return ok & (counts <= 1)


def apcorr_radius(state: CalibrateState, config: MeasurementConfig) -> tuple[float, tuple[float, ...]]:
    """The aperture-correction radius and the growth curve's ring edges from it.

    The smallest of ``aperture_radii`` at least ``config.apcorr_fwhm`` half-maximum FWHM wide, raised to
    the smallest one holding ``_APCORR_ENCIRCLED`` of the PSF model's light (a space PSF's sharp core
    and wide wings: 4 FWHM hold 95 % of it), ``apcorr_radius`` at most; then lowered, not below the
    encircled-energy radius, while fewer than ``_APCORR_CLEAN_FRACTION`` of the PSF stars have no other
    detection inside it (a crowded field, where a wide aperture holds neighbours' light)."""
    radius = float(config.apcorr_radius)
    fwhm = 2.3548200450309493 * float(state.sigma_psf)
    if config.apcorr_fwhm is None or not (np.isfinite(fwhm) and fwhm > 0):
        return radius, tuple(config.growth_edges)
    radii = sorted(float(r) for r in config.aperture_radii if r <= radius)
    ee = model_encircled_energy(state, tuple(radii))
    r_ee = next((r for r, e in zip(radii, ee) if e >= _APCORR_ENCIRCLED), radii[0] if radii else radius)
    wide = [r for r in radii if r >= max(config.apcorr_fwhm * fwhm, r_ee)]
    r = wide[0] if wide else radius
    stars = state.used
    if stars is not None and stars.any():
        for lower in sorted((a for a in radii if r_ee <= a <= r), reverse=True):
            r = lower
            if _clean(state, lower)[stars].mean() >= _APCORR_CLEAN_FRACTION:
                break
    state.psf_info["apcorr_model_encircled"] = {f"{a:g}": float(e) for a, e in zip(radii, ee)}
    if r >= radius:
        return radius, tuple(config.growth_edges)
    edges = (r, *(a for a in sorted(config.aperture_radii) if a > r), *(e for e in config.growth_edges if e > radius))
    return r, tuple(float(e) for e in edges)


_APCORR_BAD = int(_masks.bits("BAD", "SAT", "NO_DATA", "EDGE"))
# an aperture-to-total correction not measured where the faint stars' curve allows more than this is a warning
_GROWTH_HINT = 0.01
# a fallback PSF model missing more than this fraction of the light needs 3 aperture-correction stars
_APCORR_FALLBACK_MISS = 0.05
# the core of an aperture-correction star, where its residual is summed rather than taken at clipped ring means:
# this many FWHM, at least _APCORR_CORE_MIN pixels
_APCORR_CORE_FWHM = 1.5
_APCORR_CORE_MIN = 3.0


def _apcorr_ratios(
    state: CalibrateState, stars: np.ndarray, radius: float, apc_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """``ap_flux(radius) / psf_flux`` of every source and its error; for the PSF stars ``stars`` (with a PSF
    model), the aperture flux as if each were alone (:func:`kernels.measure.isolated_apertures`: its
    model plus the image less every fitted model, summed in the core and at clipped ring means beyond). In a
    crowded field the plain aperture also holds the stars hidden in a bright star's wings and the mean
    light of unresolved ones, which the PSF fit under a mode background mostly does not."""
    meas = state.meas
    ap, ap_err, psf, psf_err = meas[apc_name], meas[apc_name + "_err"], meas["psf_flux"], meas["psf_flux_err"]
    idx = np.flatnonzero(stars)
    stamps = getattr(state, "stamps", None)
    if idx.size and stamps is not None and state.psf_model is not None:
        fwhm = 2.3548200450309493 * float(state.sigma_psf)
        core = max(_APCORR_CORE_FWHM * fwhm, _APCORR_CORE_MIN) if np.isfinite(fwhm) else _APCORR_CORE_MIN
        if "moffat" in state.psf_info:
            # a parametric model (too few stars for a pixel model) is smooth in azimuth where the PSF may not
            # be (a space PSF's spikes): its residual is the star's own light, summed over the whole aperture
            # (neighbours still subtracted).
            core = radius
        iso = isolated_apertures(
            state.sub,
            state.var_det,
            state.mask,
            meas["x"],
            meas["y"],
            stamps,
            psf,
            idx,
            radius,
            core_radius=core,
            bad_bits=_APCORR_BAD,
        )
        ap, ap_err = ap.copy(), ap_err.copy()
        ap[idx], ap_err[idx] = iso["ap_flux"], iso["ap_flux_err"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ap / psf
        ratio_err = np.hypot(ap_err, ratio * psf_err) / psf
    return ratio, ratio_err


def aperture_corrections(state: CalibrateState, config: MeasurementConfig) -> None:
    """Aperture correction (``apcorr``) over the PSF stars and aperture-to-total (``growth``) over the
    bright stars."""
    meas, used, cand = state.meas, state.used, state.cand
    radius, edges = apcorr_radius(state, config)
    state.apcorr_radius = radius
    apc_name = ap_name(meas, radius)
    # only PSF stars whose aperture holds no other detection (as the LSST pipelines' aperture correction
    # keeps unblended stars): in a crowded field neighbours' light biases ap/psf high
    clean = _clean(state, radius)
    if (used & clean).sum() >= 3:
        used = used & clean
    else:
        note_degraded(
            "apcorr_blended_stars",
            f"fewer than 3 PSF stars with no other detection within {radius:g} + 2 px: the aperture correction "
            "uses them all (neighbours' light may bias it high)",
            severity="info",
            radius=radius,
        )
    ratio, ratio_err = _apcorr_ratios(state, used, radius, apc_name)
    usable = used & np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0) & ~meas["psf_flux_flag"]
    ac_stars = usable & ~meas["ap_flux_flag"] & ~meas["flag_interpolated"]
    if ac_stars.sum() < 3 and state.psf_model is not None:
        # a sparse frame hit by many cosmic rays (the space regime: 1 cosmic ray per 12 px aperture) has
        # hardly a PSF star without a repaired or bad pixel in its widest aperture: with an isolated
        # aperture (a star's residual at clipped ring levels beyond its core, bad pixels left out) only the
        # core must be clean
        relaxed = usable & ~meas["flag_interpolated_center"] & ~meas["flag_bad_center"] & ~meas["flag_cr_center"]
        if relaxed.sum() > ac_stars.sum():
            note_degraded(
                "apcorr_interpolated_stars",
                f"{int(ac_stars.sum())} PSF stars with no repaired or bad pixel in their apertures: the aperture "
                f"correction uses {int(relaxed.sum())} with such pixels away from the core",
                severity="info",
                n_stars=int(relaxed.sum()),
            )
            ac_stars = relaxed
    apcorr, apcorr_err, ac_kept = weighted_clipped_mean(ratio[ac_stars], ratio_err[ac_stars])
    n_ac = int(ac_kept.sum())
    if not (np.isfinite(apcorr) and apcorr > 0):
        note_degraded(
            "apcorr_default",
            f"no aperture correction from {int(ac_stars.sum())} PSF stars: 1 used",
            n_stars=int(ac_stars.sum()),
        )
        apcorr, apcorr_err, n_ac = 1.0, float("nan"), 0
    state.apcorr, state.apcorr_err, state.n_apcorr = apcorr, apcorr_err, n_ac
    # a parametric or Gaussian PSF (too few stars for a pixel model) that misses more than
    # _APCORR_FALLBACK_MISS of the light differs from the PSF in shape, and each star's aperture/PSF ratio
    # differs with its S/N (a space PSF's core and wings under a Moffat: 1.12-1.29 on one frame, 1.15-1.46
    # on another): fewer than 3 of them do not give the correction, nor does none (a ground PSF's Moffat
    # is within 2.5 % of 1 on the stamp256 regime, from 1 star as from 5)
    fallback_model = state.psf_model is None or "moffat" in state.psf_info
    # with a pixel model and no star the default 1 stands (apcorr_default says so), as before
    unreliable = fallback_model and (n_ac == 0 or (n_ac < 3 and abs(apcorr - 1.0) > _APCORR_FALLBACK_MISS))
    # from the aperture to the total flux: the growth curve of bright stars beyond it
    growth = GrowthCorrection(status="disabled (total_flux_correction=False)")
    hint = 1.0  # the upper 1-sigma limit of an aperture-to-total correction measured but not used
    if config.total_flux_correction:
        with np.errstate(divide="ignore", invalid="ignore"):
            ap_snr = meas[apc_name] / meas[apc_name + "_err"]
        gbase = (
            (used | cand)
            & ~meas["psf_flux_flag"]
            & ~meas["ap_flux_flag"]
            & ~meas["flag_saturated"]
            & ~meas["flag_blended"]
            & ~meas["flag_streak"]
        )
        gstars = gbase & ~meas["flag_interpolated"]
        # the growth curve wants the brightest stars; a small or sparse frame (a space detector: 2 stars of
        # S/N > 100 where 8 % of a diffraction PSF's light lies beyond 12 px) falls back to fainter ones
        tries = (float(config.growth_min_snr), *(s for s in _GROWTH_FALLBACK_SNR if s < config.growth_min_snr))
        if (gstars & (ap_snr > tries[-1])).sum() < 3:
            # as for the aperture correction: a sparse frame with many cosmic rays (the space regime's Moffat
            # frames: 0 stars without a repaired pixel) takes stars with repaired pixels away from the core (the
            # rings are clipped means; a repaired pixel holds the interpolated wing)
            relaxed = gbase & ~meas["flag_interpolated_center"] & ~meas["flag_cr_center"]
            if (relaxed & (ap_snr > tries[-1])).sum() > (gstars & (ap_snr > tries[-1])).sum():
                note_degraded(
                    "growth_interpolated_stars",
                    "fewer than 3 growth-curve stars with no repaired pixel: stars with repaired pixels away from "
                    "the core taken",
                    severity="info",
                )
                gstars = relaxed
        snr_min = next((s for s in tries if (gstars & (ap_snr > s)).sum() >= 3), tries[0])
        gstars &= ap_snr > snr_min
        gi = np.flatnonzero(gstars)
        inner = {
            r: (meas[ap_name(meas, r)][gi], meas[ap_name(meas, r) + "_err"][gi])
            for r in config.aperture_radii
            if 0.5 * radius <= r < radius
        }
        growth = aperture_to_total(
            state.sub,
            state.var_det,
            state.mask,
            state.det.children,
            state.child_ids[gi],
            meas["x"][gi],
            meas["y"][gi],
            meas[apc_name][gi],
            meas[apc_name + "_err"][gi],
            radius,
            inner_fluxes=inner,
            edges=edges,
            sky_annulus=config.growth_sky_annulus,
            bad_bits=_GROWTH_BAD,
        )
        if snr_min < config.growth_min_snr and growth.status == "measured":
            # fainter stars' growth curves are noise- and sky-dominated: used only when the light beyond the
            # aperture they measure is positive and significant (a diffraction PSF's 9 % at 7 sigma on the
            # space regime; -0.8 +- 0.8 % on the correlated-noise regime is left out)
            if growth.correction - 1.0 > 3.0 * growth.error:
                note_degraded(
                    "aperture_to_total_faint_stars",
                    f"fewer than 3 stars of aperture S/N > {config.growth_min_snr:g} for the growth curve: "
                    f"{growth.n_stars} of S/N > {snr_min:g} used (correction {growth.correction:.4f} "
                    f"+- {growth.error:.4f})",
                    severity="info",
                    snr_min=snr_min,
                    n_stars=growth.n_stars,
                )
            else:
                hint = growth.correction + growth.error
                growth = GrowthCorrection(
                    status=f"growth curve of {growth.n_stars} stars of S/N > {snr_min:g} not significantly above 1 "
                    f"({growth.correction:.4f} +- {growth.error:.4f})",
                    n_stars=growth.n_stars,
                )
        if growth.status.startswith("measured correction"):  # beyond the kernel's max_correction
            hint = 1.0 + growth.ring_fraction + growth.tail_fraction
    if config.total_flux_correction and config.encircled_energy is not None:
        growth = _instrument_growth(growth, config.encircled_energy, radius)
    if unreliable:
        # PSF fluxes whose aperture correction is not known are flagged (kept out of the zero point)
        meas["psf_flux_flag"] = np.ones(state.n_det, bool)
        note_degraded(
            "apcorr_unreliable",
            f"aperture correction {apcorr:.4f} from {n_ac} PSF stars with a "
            f"{'fallback' if fallback_model else 'pixel'} PSF model ({state.psf_info.get('model')}): every "
            "psf_flux is flagged (psf_flux_flag)",
            n_stars=n_ac,
            apcorr=float(apcorr),
        )
    if config.total_flux_correction and growth.status not in ("measured", _INSTRUMENT):
        # a warning where the faint stars' curve allows more than _GROWTH_HINT beyond the aperture (a space PSF's
        # 10 % wing measured 1.07 +- 0.05): PSF fluxes may be that much low; set measurement.encircled_energy
        wide = hint > 1.0 + _GROWTH_HINT
        note_degraded(
            "aperture_to_total_default",
            f"no aperture-to-total correction ({growth.status}): 1 used"
            + (
                f"; the stars allow {100 * (hint - 1):.0f} % of the light beyond {radius:g} px (a wide-winged PSF?): "
                "PSF fluxes may be low by that much (measurement.encircled_energy gives it from the instrument)"
                if wide
                else ""
            ),
            severity="warning" if wide else "info",
        )
    state.growth = growth


_INSTRUMENT = "instrument encircled energy"


def _instrument_growth(stars: GrowthCorrection, table: tuple, radius: float) -> GrowthCorrection:
    """The aperture-to-total correction ``1 / EE(radius)`` of the instrument's encircled-energy curve
    (``measurement.encircled_energy``), with the stars' own growth curve ``stars`` kept in its profile and
    compared; ``stars`` itself (noted) when the curve does not reach ``radius``."""
    ee = encircled_energy_at(table, radius)
    if not np.isfinite(ee):
        note_degraded(
            "encircled_energy_out_of_range",
            f"measurement.encircled_energy covers radii {table[0][0]:g}-{table[-1][0]:g} px, not the aperture "
            f"correction's {radius:g} px: the stars' growth curve used ({stars.status})",
            radius=radius,
        )
        return stars
    corr = 1.0 / ee
    prof = dict(stars.profile)
    if stars.status == "measured":
        prof["stars_correction"] = [float(stars.correction), float(stars.error)]
        if abs(stars.correction - corr) > 3.0 * stars.error + 0.01:
            note_degraded(
                "aperture_to_total_instrument_differs",
                f"the stars' growth curve gives an aperture-to-total correction of {stars.correction:.4f} +- "
                f"{stars.error:.4f} at {radius:g} px, the instrument's encircled energy {corr:.4f} (used)",
                severity="info",
                stars=float(stars.correction),
                instrument=corr,
            )
    return GrowthCorrection(
        correction=corr,
        error=0.0,
        n_stars=stars.n_stars,
        tail_fraction=corr - 1.0,
        status=_INSTRUMENT,
        profile=prof,
    )


def psf_flux_errors(state: CalibrateState, config: PsfConfig) -> None:
    """Corrected ``psf_flux`` and its error ``psf_flux_err``, with the PSF model's own error in quadrature."""
    meas = state.meas
    apcorr_total = state.apcorr * state.growth.correction
    psf_flux = meas["psf_flux"] * apcorr_total
    # PSF-model error where the model was not fitted (cross-validated on this detector's PSF
    # stars, see kernels.psfmodel.cross_validated_flux_scatter), added in quadrature
    flux_sys = float(state.psf_info.get("flux_sys", np.nan)) if config.flux_sys_error else float("nan")
    if not np.isfinite(flux_sys):
        flux_sys = 0.0
    state.psf_info["flux_sys_applied"] = flux_sys
    # the warp's own fitting noise at each position (largest where the model extrapolates)
    warp_err = (
        model_flux_error(state.psf_model, meas["x"], meas["y"])
        if state.psf_model is not None and config.flux_sys_error
        else np.zeros(state.n_det)
    )
    state.psf_flux = psf_flux
    state.psf_flux_err = np.sqrt((meas["psf_flux_err"] * apcorr_total) ** 2 + (flux_sys**2 + warp_err**2) * psf_flux**2)
    state.flux_sys = flux_sys
