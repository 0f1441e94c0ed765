"""PSF step: star selection on the size-flux locus and the PSF model of the detector.

A pixelised polynomial PSF (PSFEx-like) with held-back stars when there are enough stars per
polynomial term, else the constant pixel model with a size-and-shear warp of order 1 across the
detector (``kernels.psfmodel.warp_images``: 3 numbers per star instead of an image per term);
lower orders when the stars are fewer, then an elliptical Moffat fitted to all the stars at once (4
shape numbers; ``kernels.psfmodel.fit_moffat_psf``), then a Gaussian of the stars' mean moments (recorded
in the metadata). PSF candidates may carry repaired cosmic-ray pixels away from their centre (weighted 0
in the fit); the brightest tenth of them is never held back.
"""

from __future__ import annotations

import math

import numpy as np

from procsky import masks as _masks
from procsky.calibrate.config import PsfConfig
from procsky.calibrate.detection import ap_name
from procsky.calibrate.state import CalibrateState
from procsky.errors import AlgorithmError, NoWorkError
from procsky.kernels.psfmodel import (
    PsfModelArrays,
    fit_moffat_psf,
    fit_psf_model,
    fit_supersampled_psf,
    pixel_gaussian_widths,
    render_stamps,
    select_psf_stars,
)
from procsky.notes import note_degraded
from procsky.psf import SIGMA_TO_FWHM, GaussianPsf, PolynomialImagePsf, matching_fwhm

__all__ = ["fit_detector_psf", "model_psf", "psf_from_arrays", "select_stars"]

# repaired pixels weigh 0 in the PSF fit
_ZERO_BITS = int(_masks.bit("CR") | _masks.bit("INTRP"))


def fit_detector_psf(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray, config: PsfConfig
) -> tuple:
    """The PSF model of one detector from its PSF stars, as calibrate fits it.

    Pixel polynomial orders from ``config.order`` down to 0, the first the stars allow
    (``pixel_stars_per_term`` stars per term with the warp on, else ``min_stars_per_term``;
    5 for a constant model), with the size-and-shear warp of order ``warp_order`` on top
    where that is higher than the pixel order.

    Returns
    -------
    (PsfModelArrays, used, reserved, pixel order), or ``(None, None, None, reason)`` when no
    order has enough usable stars.
    """
    warp = int(config.warp_order)
    per_term = config.pixel_stars_per_term if warp >= 0 else config.min_stars_per_term
    stamp = int(config.stamp_size) | 1
    reason = "no usable star"
    for order in range(int(config.order), -1, -1):
        nc = (order + 1) * (order + 2) // 2
        try:
            arrays, used, reserved = fit_psf_model(
                image,
                variance,
                mask,
                x,
                y,
                stamp_size=stamp,
                order=order,
                reserve_fraction=config.reserve_fraction,
                min_stars=5 if order == 0 else max(int(per_term * nc) + 3, 5),
                zero_bits=_ZERO_BITS,
                warp_order=warp if warp > order else -1,
                warp_prior=config.warp_prior,
                # each star's own sky: a crowded field's unresolved stars over the mode background made a
                # pedestal of 1.8 % of the model's light (crowded regime)
                local_sky=True,
            )
        except ValueError as exc:
            reason = str(exc)
            continue
        return arrays, used, reserved, order
    return None, None, None, reason


def fit_supersampled(state: CalibrateState, config: PsfConfig, fwhm: float) -> tuple | None:
    """The super-sampled PSF model of an undersampled detector (see ``PsfConfig.undersampled_fwhm``).

    PSF stars are selected again to a lower S/N and a smaller isolation radius around the locus of
    the first candidates, and the model is fitted with ``kernels.psfmodel.fit_supersampled_psf``
    at a spatial order of at most 1 (30 stars per term: each term is a whole fine image) or 0
    (``supersampled_min_stars``), from centres fitted with a pixel-integrated Gaussian (a
    windowed centroid is biased towards the pixel centre when undersampled).

    Returns ``(arrays, candidates (n_det,) bool, used, reserved, order)``, or None (and a note) when
    it cannot be fitted."""
    meas, cand = state.meas, state.cand
    apn = ap_name(meas, 6.0)
    # the stellar locus in a size that does not depend on the pixel phase: the width of a
    # pixel-integrated Gaussian (adaptive moments of undersampled stars shrink, or fail, when a star is
    # centred on a pixel, so a locus in them keeps mostly stars near pixel corners and the model has
    # no centred star to learn from); a star whose adaptive moments failed is not excluded
    # deblended children only where select_stars had to take them (a crowded field)
    bad = _psf_star_bad(meas, moments=False, blended=not bool((meas["flag_blended"] & cand).any()))
    snr = meas[apn] / meas[apn + "_err"]
    pre = ~bad & np.isfinite(snr) & (snr > min(config.undersampled_min_snr, config.min_snr))
    sig = np.full(state.n_det, np.nan)
    sig[pre] = pixel_gaussian_widths(
        state.sub, state.var_det, state.mask, meas["x"][pre], meas["y"][pre], fwhm / SIGMA_TO_FWHM, zero_bits=_ZERO_BITS
    )
    t_pix = 2.0 * sig**2
    ref = cand & np.isfinite(t_pix)
    if ref.sum() < 2:
        ref = pre & np.isfinite(t_pix) & (snr > config.min_snr)
    t_locus = float(np.median(t_pix[ref])) if ref.sum() >= 2 else None
    cand2 = select_psf_stars(
        meas["x"],
        meas["y"],
        0.5 * t_pix,
        0.5 * t_pix,
        meas[apn],
        meas[apn + "_err"],
        bad | ~np.isfinite(t_pix),
        min_snr=min(config.undersampled_min_snr, config.min_snr),
        isolation_radius=min(config.undersampled_isolation, config.isolation_radius),
        max_stars=int(config.undersampled_max_stars),
        locus_T=t_locus,
        max_excess=config.locus_max_excess,
    )
    idx = np.flatnonzero(cand2)
    os_ = max(int(config.oversample), 2)
    size = int(config.supersampled_fit_size) | 1
    reason = "no usable star"
    for order in range(min(int(config.order), 1), -1, -1):
        nc = (order + 1) * (order + 2) // 2
        try:
            arrays, used, reserved, _, _ = fit_supersampled_psf(
                state.sub,
                state.var_det,
                state.mask,
                meas["x"][idx],
                meas["y"][idx],
                oversample=os_,
                fit_size=size,
                stamp_size=int(config.stamp_size) | 1,
                order=order,
                # held-back stars as for the pixel-level model (their moments validate it, and with the
                # fitted stars' cross-validation give psf_flux_sys), never below the minimum fitted
                reserve_fraction=config.reserve_fraction,
                zero_bits=_ZERO_BITS,
                min_stars=max(30 * nc + 3 if order > 0 else 0, int(config.supersampled_min_stars)),
                centroid_sigma=fwhm / SIGMA_TO_FWHM,
                ridge=float(config.supersampled_ridge),
            )
        except ValueError as exc:
            reason = str(exc)
            continue
        return arrays, cand2, idx[used], idx[reserved], order
    note_degraded(
        "psf_not_supersampled",
        f"undersampled PSF (FWHM {fwhm:.2f} px < psf.undersampled_fwhm={config.undersampled_fwhm:g}) but no "
        f"super-sampled model ({reason}): the pixel-level model's PSF fluxes depend on the pixel phase",
        fwhm=fwhm,
        n_candidates=int(cand2.sum()),
    )
    return None


def fit_moffat(state: CalibrateState, config: PsfConfig, idx: np.ndarray) -> tuple | None:
    """The parametric PSF of a detector with too few stars for a pixel model: one elliptical Moffat
    (pixel-integrated) fitted to the PSF candidates ``idx`` at once (``kernels.psfmodel.fit_moffat_psf``),
    super-sampled when the stars' size is undersampled. Returns ``(arrays, used (len(idx),), params)``, or
    None when there is no candidate or the fit fails (the Gaussian fallback then)."""
    if idx.size == 0:
        return None
    meas = state.meas
    t = meas["ixx"][idx] + meas["iyy"][idx]
    t = t[np.isfinite(t) & (t > 0)]
    sigma = float(np.sqrt(0.5 * np.median(t))) if t.size else float(state.sigma)
    undersampled = config.undersampled_fwhm > 0 and SIGMA_TO_FWHM * sigma < config.undersampled_fwhm
    try:
        model, used, params = fit_moffat_psf(
            state.sub,
            state.var_det,
            state.mask,
            meas["x"][idx],
            meas["y"][idx],
            stamp_size=int(config.stamp_size) | 1,
            oversample=max(int(config.oversample), 2) if undersampled else 1,
            sigma_guess=sigma,
            zero_bits=_ZERO_BITS,
        )
    except ValueError:
        return None
    if not np.isfinite(model.fwhm):
        return None
    return model, used, params


def psf_from_arrays(model: PsfModelArrays, xy0: tuple[int, int]) -> PolynomialImagePsf:
    """procsky PSF model from the kernel's PsfModelArrays (super-sampled or not), in parent pixels."""
    return PolynomialImagePsf(
        model.coeffs,
        model.order,
        model.x_center + xy0[0],
        model.y_center + xy0[1],
        model.x_scale,
        model.y_scale,
        oversample=int(model.oversample),
        stamp_size=int(model.stamp_size),
    )


def _safe(fn, x: float, y: float) -> float:
    """``fn(x, y)`` or NaN when the model has no such size there (e.g. moments not positive definite)."""
    try:
        return float(fn(x, y))
    except (ValueError, ArithmeticError):
        return float("nan")


def _psf_star_bad(meas: dict[str, np.ndarray], moments: bool = True, blended: bool = True) -> np.ndarray:
    """Sources that cannot be PSF stars. A cosmic ray (repaired, zero weight in the fit) or a bad
    pixel away from the centre does not exclude a star: the stamp fit drops stars with bad pixels
    in their cutout and weights repaired pixels 0, and CR hits in the footprints of the few bright
    stars of a detector would otherwise leave too few candidates. ``blended=False``: nor does being a
    deblended child (``flag_blended``; see ``select_stars``). ``moments=False``: a failed adaptive-moment
    shape does not exclude a star (undersampled stars centred on a pixel, see ``fit_supersampled``)."""
    bad = (
        meas["flag_saturated"]
        | meas["flag_edge"]
        | (meas["flag_blended"] if blended else False)
        | meas["flag_interpolated_center"]
        | meas["flag_cr_center"]
        | meas["flag_bad_center"]
        | meas["centroid_flag"]
        | meas["flag_streak"]
    )
    return bad | meas["shape_flag"] if moments else bad


def select_stars(state: CalibrateState, config: PsfConfig) -> np.ndarray:
    """PSF star candidates (``state.cand``) on the size-flux locus of ``state.meas``.

    Deblended children are left out, unless that leaves fewer than 5 candidates: in a crowded field
    the grown footprints of stars tens of pixels apart merge and every source is a child (the
    ``crowded`` regime: all 339 sources of S/N > 50, 264 of them without a neighbour within 10 px,
    and a Gaussian PSF of 1 star); the isolation radius is then the only test of neighbours
    (noted ``psf_blended_candidates``)."""
    meas = state.meas
    bad = _psf_star_bad(meas)
    cand = _select(meas, bad, config)
    if cand.sum() < 5:
        bad_b = _psf_star_bad(meas, blended=False)
        cand_b = _select(meas, bad_b, config)
        if cand_b.sum() > cand.sum():
            note_degraded(
                "psf_blended_candidates",
                f"{int(cand.sum())} PSF star candidates that are not deblended children: {int(cand_b.sum())} "
                f"children without a neighbour within psf.isolation_radius={config.isolation_radius:g} px taken "
                "(a crowded field)",
                severity="info",
                n_candidates=int(cand_b.sum()),
            )
            cand, bad = cand_b, bad_b
    state.cand = cand
    return bad


def _select(meas: dict[str, np.ndarray], bad: np.ndarray, config: PsfConfig) -> np.ndarray:
    """Candidates at ``psf.min_snr``, or at S/N 20 about the bright stars' locus when fewer than 5."""
    apn = ap_name(meas, 6.0)
    cand = select_psf_stars(
        meas["x"],
        meas["y"],
        meas["ixx"],
        meas["iyy"],
        meas[apn],
        meas[apn + "_err"],
        bad,
        min_snr=config.min_snr,
        isolation_radius=config.isolation_radius,
    )
    if cand.sum() < 5:  # few bright stars (shallow or small image): relax the S/N cut
        # keep the locus the bright stars show: among fainter sources galaxies may outnumber
        # the stars and form the densest size window
        t_bright = float(np.median(meas["ixx"][cand] + meas["iyy"][cand])) if cand.sum() >= 2 else None
        cand = select_psf_stars(
            meas["x"],
            meas["y"],
            meas["ixx"],
            meas["iyy"],
            meas[apn],
            meas[apn + "_err"],
            bad,
            min_snr=min(20.0, config.min_snr),
            isolation_radius=config.isolation_radius,
            locus_T=t_bright,
            max_excess=config.locus_max_excess,
        )
    return cand


def model_psf(state: CalibrateState, config: PsfConfig) -> None:
    """Select the PSF stars and fit the model: ``psf`` (procsky PSF, parent pixels), ``psf_model``
    (kernel arrays, None for the Gaussian fallback), ``psf_info``, ``used``, ``reserved``, the
    PSF ``stamps`` at every source and ``sigma_psf``."""
    bad = select_stars(state, config)
    meas, cand, n_det = state.meas, state.cand, state.n_det
    ny, nx = state.shape
    psf_model = None
    kernel_fwhm = float("nan")
    psf: PolynomialImagePsf | GaussianPsf
    psf_info: dict = {"n_candidates": int(cand.sum())}
    used = np.zeros(n_det, bool)
    reserved = np.zeros(n_det, bool)
    stamp = int(config.stamp_size) | 1
    idx = np.flatnonzero(cand)
    fitted = fit_detector_psf(state.sub, state.var_det, state.mask, meas["x"][idx], meas["y"][idx], config)
    if fitted[0] is None:
        psf_info["last_error"] = fitted[3]
        moffat = fit_moffat(state, config, idx) if config.fallback_moffat else None
        if moffat is not None:
            psf_model, u_m, params = moffat
            used[idx[u_m]] = True
            kernel_fwhm = float(psf_model.fwhm)
            psf_info.update(
                model="PolynomialImagePsf (Moffat: too few stars for a pixel model)",
                oversample=int(psf_model.oversample),
                order=0,
                n_stars=int(psf_model.n_stars),
                moffat={k: v for k, v in params.items() if k != "fluxes"},
            )
            note_degraded(
                "few_psf_stars",
                f"too few PSF stars for a pixel model ({int(cand.sum())} candidates; {fitted[3]}): an elliptical "
                f"Moffat (FWHM {params['fwhm']:.2f} px, beta {params['beta']:.2f}) fitted to {int(psf_model.n_stars)} "
                "stars",
                n_candidates=int(cand.sum()),
                n_stars=int(psf_model.n_stars),
                model="moffat",
            )
    else:
        arrays, u, r, order = fitted
        psf_model = arrays
        if order < config.order:
            note_degraded(
                "psf_order_reduced",
                f"PSF pixel model of order {order} (< psf.order={config.order}): {int(arrays.n_stars)} PSF stars",
                severity="info",
                order=order,
                n_stars=int(arrays.n_stars),
            )
        used[idx[u]] = True
        reserved[idx[r]] = True
        fw_pix = _safe(psf_from_arrays(arrays, (0, 0)).fwhm, 0.5 * (nx - 1), 0.5 * (ny - 1))
        if config.undersampled_fwhm > 0 and fw_pix < config.undersampled_fwhm:
            sup = fit_supersampled(state, config, fw_pix)
            if sup is not None:
                arrays, cand, i_used, i_res, order = sup
                state.cand = cand
                psf_model = arrays
                used[:] = False
                reserved[:] = False
                used[i_used] = True
                reserved[i_res] = True
                psf_info.update(n_candidates=int(cand.sum()), pixel_model_fwhm_px=fw_pix)
                note_degraded(
                    "psf_supersampled",
                    f"undersampled PSF (pixel-level model FWHM {fw_pix:.2f} px < {config.undersampled_fwhm:g}): "
                    f"super-sampled model (oversample {arrays.oversample}, order {order}) of {int(arrays.n_stars)} "
                    "PSF stars",
                    severity="info",
                    fwhm=fw_pix,
                    oversample=int(arrays.oversample),
                    n_stars=int(arrays.n_stars),
                )
        kernel_fwhm = float(arrays.fwhm)
        psf_info.update(
            model="PolynomialImagePsf",
            oversample=int(arrays.oversample),
            order=int(arrays.order),
            pixel_order=order,
            warp_order=int(arrays.warp_order),
            n_stars=int(arrays.n_stars),
            n_reserved=int(arrays.n_reserved),
            reserved_dT_median=float(arrays.reserved_dT_median),
            reserved_dT_std=float(arrays.reserved_dT_std),
            reserved_dT=[float(v) for v in arrays.reserved_dT],
            flux_sys=float(arrays.flux_sys),
            cv_flux_ratio=[float(v) for v in arrays.cv_flux_ratio],
        )
    if psf_model is not None:
        psf = psf_from_arrays(psf_model, state.xy0)
        stamps = render_stamps(psf_model, meas["x"], meas["y"], stamp)
    else:
        stars = cand if cand.any() else (~bad & np.isfinite(meas["ixx"]))
        if not stars.any() and nx * ny < config.min_pixels_for_failure:
            raise NoWorkError(
                f"no star usable for a PSF in this {nx}x{ny} cut-out ({n_det} detections, all flagged or "
                f"without moments); too small to calibrate (< psf.min_pixels_for_failure="
                f"{config.min_pixels_for_failure} pixels)"
            )
        if not config.fallback_gaussian or not stars.any():
            raise AlgorithmError(
                f"too few PSF stars ({int(cand.sum())} candidates) to model the PSF of this {nx}x{ny} image "
                f"({psf_info.get('last_error', 'no usable star')}); lower psf.min_snr or psf.order"
            )
        ixx = float(np.nanmedian(meas["ixx"][stars]))
        iyy = float(np.nanmedian(meas["iyy"][stars]))
        ixy = float(np.nanmedian(meas["ixy"][stars]))
        t = ixx + iyy
        det_m = ixx * iyy - ixy * ixy
        if np.isfinite(det_m) and det_m > 0 and t > 0:
            s, e1, e2 = det_m**0.25, (ixx - iyy) / t, 2 * ixy / t
            emag = math.hypot(e1, e2)
            if emag > 0.5:  # a blend or a galaxy dominates: keep the size, drop the shape
                e1 = e2 = 0.0
        else:
            s, e1, e2 = state.sigma, 0.0, 0.0
        gauss = GaussianPsf(float(s), float(e1), float(e2), size=stamp)
        kernel_fwhm = float(gauss.fwhm())
        psf = gauss
        used[stars] = True
        psf_info.update(
            model="GaussianPsf (fallback: too few stars for a pixel model)",
            n_stars=int(stars.sum()),
        )
        note_degraded(
            "few_psf_stars",
            f"too few PSF stars for a pixel model ({int(cand.sum())} candidates; "
            f"{psf_info.get('last_error', 'no usable star')}): Gaussian PSF of {int(stars.sum())} sources' "
            "moments used",
            n_candidates=int(cand.sum()),
            n_stars=int(stars.sum()),
        )
        stamps = np.stack(
            [
                gauss.render(0, 0, offset=(float(x - np.floor(x + 0.5)), float(y - np.floor(y + 0.5))))
                for x, y in zip(meas["x"], meas["y"])
            ]
        )
    # one FWHM everywhere (issue 19): the half maximum of the model's effective PSF at the
    # detector centre, as psf.fwhm() gives it; the unweighted-moment size beside it
    xc, yc = state.xy0[0] + 0.5 * (nx - 1), state.xy0[1] + 0.5 * (ny - 1)
    psf_info["fwhm_px"] = _safe(psf.fwhm, xc, yc)
    psf_info["moment_fwhm_px"] = _safe(psf.moment_fwhm, xc, yc)
    state.psf, state.psf_model, state.psf_info = psf, psf_model, psf_info
    state.used, state.reserved, state.stamps = used, reserved, stamps
    # measurement windows, apertures and tests keep the size they were built on: the PSF
    # kernel's own (adaptive-moment) FWHM of a pixel-level model or the Gaussian fallback's;
    # for a super-sampled model the moment size capped at 1.25x the half maximum
    if not np.isfinite(kernel_fwhm):
        kernel_fwhm = _safe(lambda x, y: matching_fwhm(psf, x, y), xc, yc)
    state.sigma_psf = kernel_fwhm / SIGMA_TO_FWHM if np.isfinite(kernel_fwhm) else state.sigma
