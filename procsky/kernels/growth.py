"""Curve of growth beyond an aperture: the aperture-to-total flux correction.

PSF fluxes are aperture-corrected to a finite radius (``apcorr_radius``, 17 px by default).
A Moffat-like PSF keeps light outside that radius: for beta = 3.4 and FWHM 5.5 px about
0.4 % (4 mmag), which a zero point fitted against total reference magnitudes absorbs,
biasing it by the same amount. This module measures that light on the bright stars of the
detector and returns ``total / aperture``.

The method follows the growth-curve idea of Stetson (1990, PASP 102, 932, "DAOGROW"):
the flux in rings around many stars is normalised by each star's aperture flux and
averaged, with a local sky from an outer annulus. Per star and ring the surface brightness
is a clipped mean (pixels of other detected sources and masked pixels left out, the rest
clipped at ``nsigma`` of their own noise about the ring median), so faint neighbours and
cosmic-ray remnants do not bias it. The light beyond the last ring comes from a power law
``S(r) = A r^-gamma`` fitted to the stacked ring profile (Moffat wings fall as r^-2 beta,
Kolmogorov wings as r^-11/3), integrated to infinity.

A sparse frame cannot measure it: a space detector's 3-5 stars of S/N 20-50 give 1.07 +- 0.05 at 12 px where
a diffraction PSF's true correction is 1.10. There the instrument's encircled-energy curve (an optical
model of the telescope, as WebbPSF or TinyTim give, or the instrument team's tables: Sirianni et al. 2005,
PASP 117, 1049 for HST/ACS) gives it as ``1 / EE(radius)`` (:func:`encircled_energy`,
:func:`encircled_energy_at`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from .background import _median_inplace

__all__ = [
    "GrowthCorrection",
    "aperture_to_total",
    "encircled_energy",
    "encircled_energy_at",
    "ring_profiles",
    "weighted_clipped_mean",
]


@numba.njit(nogil=True, cache=True)
def _clipped_ring_mean(vals, sig, n, nsigma):
    """Mean of ``vals[:n]`` after clipping at ``nsigma * sig`` about their median.

    Returns (mean, variance of the mean)."""
    if n < 3:
        return np.nan, np.nan
    tmp = vals[:n].copy()
    med = _median_inplace(tmp, n)
    s = 0.0
    v = 0.0
    k = 0
    for i in range(n):
        if abs(vals[i] - med) <= nsigma * sig[i]:
            s += vals[i]
            v += sig[i] * sig[i]
            k += 1
    if k < 3:
        return np.nan, np.nan
    return s / k, v / (k * k)


@numba.njit(nogil=True, cache=True)
def _ring_profiles_kernel(
    image, variance, mask, children, own, xs, ys, edges, sky_in, sky_out, bad_bits, nsigma, mean, var, sky, sky_var
):
    ny, nx = image.shape
    nr = edges.size - 1
    rmax = sky_out
    cap = int(4.0 * rmax * rmax + 8.0 * rmax + 16.0)
    vals = np.empty(cap, np.float64)
    sig = np.empty(cap, np.float64)
    for k in range(xs.size):
        x = xs[k]
        y = ys[k]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        x0 = max(0, int(math.floor(x - rmax)))
        x1 = min(nx, int(math.ceil(x + rmax)) + 1)
        y0 = max(0, int(math.floor(y - rmax)))
        y1 = min(ny, int(math.ceil(y + rmax)) + 1)
        # rings (and the sky annulus as ring nr), one pass each: the box is small
        for j in range(nr + 1):
            if j < nr:
                r_in = edges[j]
                r_out = edges[j + 1]
            else:
                r_in = sky_in
                r_out = sky_out
            n = 0
            for py in range(y0, y1):
                dy2 = (py - y) ** 2
                for px in range(x0, x1):
                    d2 = (px - x) ** 2 + dy2
                    if d2 < r_in * r_in or d2 >= r_out * r_out:
                        continue
                    if mask[py, px] & bad_bits:
                        continue
                    c = children[py, px]
                    if c != 0 and c != own[k]:
                        continue
                    vv = np.float64(variance[py, px])
                    val = np.float64(image[py, px])
                    if not (vv > 0.0) or not np.isfinite(val):
                        continue
                    vals[n] = val
                    sig[n] = math.sqrt(vv)
                    n += 1
            # a ring needs half its area on good pixels
            area = math.pi * (r_out * r_out - r_in * r_in)
            if n < 0.5 * area:
                m, mv = np.nan, np.nan
            else:
                m, mv = _clipped_ring_mean(vals, sig, n, nsigma)
            if j < nr:
                mean[k, j] = m
                var[k, j] = mv
            else:
                sky[k] = m
                sky_var[k] = mv


def ring_profiles(image, variance, mask, children, own, x, y, edges, sky_annulus, bad_bits, nsigma=3.0):
    """Clipped mean surface brightness in rings around each position, and a local sky.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image and its variance.
    mask : ndarray (ny, nx) uint32
    children : ndarray (ny, nx) int32
        Source label of every pixel (0 = none); pixels of other sources are left out.
    own : ndarray (n,) int
        The label of each star itself (its own pixels are kept).
    x, y : ndarray (n,), pixels
    edges : sequence of float, pixels
        Ring edges, increasing.
    sky_annulus : (float, float), pixels
        Inner and outer radius of the local sky annulus (beyond the last ring).
    bad_bits : int
        Mask bits of pixels left out.
    nsigma : float
        Clip at this many times a pixel's noise about the ring median.

    Returns
    -------
    mean, var : ndarray (n, n_rings)
        Mean surface brightness per pixel and the variance of that mean (NaN where fewer
        than half of a ring's pixels are usable).
    sky, sky_var : ndarray (n,)
        Local sky per pixel and its variance.
    """
    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be at least two increasing radii")
    s_in, s_out = (float(v) for v in sky_annulus)
    if not (s_out > s_in >= edges[-1]):
        raise ValueError(f"sky_annulus {sky_annulus} must lie beyond the last ring edge {edges[-1]}")
    x = np.ascontiguousarray(x, np.float64)
    y = np.ascontiguousarray(y, np.float64)
    n, nr = x.size, edges.size - 1
    mean = np.full((n, nr), np.nan)
    var = np.full((n, nr), np.nan)
    sky = np.full(n, np.nan)
    sky_var = np.full(n, np.nan)
    _ring_profiles_kernel(
        np.asarray(image),
        np.asarray(variance),
        mask,
        children,
        np.ascontiguousarray(own, np.int64),
        x,
        y,
        edges,
        s_in,
        s_out,
        np.uint32(bad_bits),
        float(nsigma),
        mean,
        var,
        sky,
        sky_var,
    )
    return mean, var, sky, sky_var


@dataclass
class GrowthCorrection:
    """Result of :func:`aperture_to_total`.

    Attributes
    ----------
    correction : float
        ``total flux / aperture flux`` (1 when it could not be measured).
    error : float
        Its standard error.
    n_stars : int
        Stars that entered the mean.
    ring_fraction : float
        Flux between the aperture and the last ring edge, over the aperture flux.
    tail_fraction : float
        Extrapolated flux beyond the last ring edge, over the aperture flux.
    gamma : float
        Fitted power-law slope of the stacked profile (NaN without a fit).
    status : str
        ``"measured"`` or why the correction is 1.
    profile : dict
        Stacked normalised ring profile: ``r`` (ring radii), ``sb`` (surface brightness per
        pixel over aperture flux) and ``sb_err``.
    """

    correction: float = 1.0
    error: float = float("nan")
    n_stars: int = 0
    ring_fraction: float = 0.0
    tail_fraction: float = 0.0
    gamma: float = float("nan")
    status: str = "not measured"
    profile: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "correction": float(self.correction),
            "error": float(self.error),
            "n_stars": int(self.n_stars),
            "ring_fraction": float(self.ring_fraction),
            "tail_fraction": float(self.tail_fraction),
            "gamma": float(self.gamma),
            "status": self.status,
            "profile": {k: [float(v) for v in vals] for k, vals in self.profile.items()},
        }


def weighted_clipped_mean(values, errors, nsigma=3.0, max_iter=5):
    """Inverse-variance weighted mean with clipping of points beyond ``nsigma`` of their error
    (scaled by sqrt of the reduced chi^2 when the scatter exceeds the errors).

    Non-finite values or errors and non-positive errors never enter. Returns ``(mean, error,
    kept mask)``; NaN mean and error when nothing is usable. Used for the growth-curve
    fractions here and for calibrate's aperture correction.
    """
    v = np.asarray(values, float)
    e = np.asarray(errors, float)
    usable = np.isfinite(v) & np.isfinite(e) & (e > 0)
    keep = usable.copy()
    mean = err = float("nan")
    for _ in range(max_iter):
        if keep.sum() == 0:
            return float("nan"), float("nan"), keep
        w = 1.0 / e[keep] ** 2
        mean = float(np.sum(w * v[keep]) / np.sum(w))
        chi2 = float(np.sum(w * (v[keep] - mean) ** 2) / max(keep.sum() - 1, 1))
        scale = math.sqrt(max(chi2, 1.0))
        err = scale / math.sqrt(float(np.sum(w)))
        with np.errstate(invalid="ignore"):
            new = usable & (np.abs(v - mean) <= nsigma * e * scale)
        if new.sum() == 0 or (new == keep).all():
            break
        keep = new
    return mean, err, keep


def _power_law_tail(r, sb, sb_err, r_last, gamma_range=(3.0, 10.0)):
    """Fit ``sb = A r^-gamma`` (weighted, A linear for each gamma on a grid) and return the
    integral of ``2 pi r sb`` from ``r_last`` to infinity and gamma."""
    ok = np.isfinite(sb) & np.isfinite(sb_err) & (sb_err > 0)
    if ok.sum() < 2:
        return 0.0, float("nan")
    r, sb, w = r[ok], sb[ok], 1.0 / sb_err[ok] ** 2
    best = (np.inf, float("nan"), 0.0)
    for g in np.arange(gamma_range[0], gamma_range[1] + 1e-9, 0.05):
        b = r**-g
        a = float(np.sum(w * b * sb) / np.sum(w * b * b))
        chi2 = float(np.sum(w * (sb - a * b) ** 2))
        if chi2 < best[0]:
            best = (chi2, g, a)
    _, g, a = best
    if not (a > 0):
        return 0.0, g
    return 2.0 * math.pi * a * r_last ** (2.0 - g) / (g - 2.0), g


def aperture_to_total(
    image,
    variance,
    mask,
    children,
    own,
    x,
    y,
    ap_flux,
    ap_flux_err,
    radius,
    *,
    inner_fluxes=None,
    edges=None,
    sky_annulus=None,
    bad_bits=0,
    nsigma=3.0,
    min_stars=3,
    max_correction=0.1,
):
    """Measure ``total / aperture`` flux from the growth curve of bright stars.

    Parameters
    ----------
    image, variance, mask, children :
        See :func:`ring_profiles` (``image`` background subtracted).
    own : ndarray (n,) int
        Each star's own label in ``children``.
    x, y : ndarray (n,), pixels
    ap_flux, ap_flux_err : ndarray (n,), counts
        The stars' fluxes in the aperture of ``radius`` (on the same image).
    radius : float, pixels
        The aperture radius (the first ring edge).
    inner_fluxes : dict {float: (ndarray, ndarray)}, optional
        Aperture fluxes (and errors) of the stars at smaller radii: their rings join the
        stacked profile the tail is fitted to (where the wing is brightest).
    edges : sequence of float, optional
        Ring edges from ``radius`` out; default ``radius * (1, 1.25, 1.55, 1.9, 2.35)``.
    sky_annulus : (float, float), optional
        Local sky annulus; default ``radius * (2.8, 3.8)``.
    bad_bits : int
    nsigma : float
    min_stars : int
        Fewer usable stars give ``correction = 1`` and say so in ``status``.
    max_correction : float
        A measured ``|correction - 1|`` above this is not trusted (``correction = 1``).

    Returns
    -------
    GrowthCorrection
    """
    radius = float(radius)
    edges = np.asarray(edges if edges is not None else radius * np.array([1.0, 1.25, 1.55, 1.9, 2.35]), float)
    if abs(edges[0] - radius) > 1e-9:
        edges = np.concatenate([[radius], edges[edges > radius]])
    sky_annulus = tuple(sky_annulus) if sky_annulus is not None else (2.8 * radius, 3.8 * radius)
    ap = np.asarray(ap_flux, float)
    ap_err = np.asarray(ap_flux_err, float)
    ok = np.isfinite(ap) & (ap > 0) & np.isfinite(ap_err) & (ap_err > 0)
    if ok.sum() < min_stars:
        return GrowthCorrection(status=f"only {int(ok.sum())} stars with an aperture flux (< {min_stars})")
    idx = np.flatnonzero(ok)
    mean, var, sky, sky_var = ring_profiles(
        image,
        variance,
        mask,
        children,
        np.asarray(own)[idx],
        np.asarray(x, float)[idx],
        np.asarray(y, float)[idx],
        edges,
        sky_annulus,
        bad_bits,
        nsigma,
    )
    ap, ap_err = ap[idx], ap_err[idx]
    area = math.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
    r_last = float(edges[-1])
    good = np.isfinite(mean).all(axis=1) & np.isfinite(sky) & np.isfinite(sky_var)
    if good.sum() < min_stars:
        return GrowthCorrection(
            status=f"only {int(good.sum())} stars with clean rings out to {sky_annulus[1]:.0f} px (< {min_stars})"
        )
    # flux between the aperture and r_last relative to the local sky; the aperture flux
    # itself is re-referenced to the local sky as well (its own sky offset)
    ring_flux = (mean - sky[:, None]) * area[None, :]
    excess = ring_flux.sum(axis=1) - sky * math.pi * radius**2
    excess_var = (var * area[None, :] ** 2).sum(axis=1) + sky_var * (math.pi * r_last**2) ** 2
    total_ap = ap - sky * math.pi * radius**2
    frac = excess / total_ap
    frac_err = np.sqrt(excess_var / total_ap**2 + (excess * ap_err / total_ap**2) ** 2)
    frac[~good] = np.nan
    f_mean, f_err, keep = weighted_clipped_mean(frac, frac_err, nsigma=nsigma)
    if keep.sum() < min_stars or not np.isfinite(f_mean):
        return GrowthCorrection(status=f"only {int(keep.sum())} stars survive clipping (< {min_stars})")
    # stacked profile (surface brightness over aperture flux) for the tail
    w = keep[:, None] / np.where(np.isfinite(var), var + sky_var[:, None], np.inf) * total_ap[:, None] ** 2
    sbn = (mean - sky[:, None]) / total_ap[:, None]
    wsum = w.sum(axis=0)
    sb = np.where(wsum > 0, np.nansum(np.where(w > 0, w * sbn, 0.0), axis=0) / np.where(wsum > 0, wsum, 1), np.nan)
    sb_err = np.where(wsum > 0, 1.0 / np.sqrt(np.where(wsum > 0, wsum, 1)), np.nan)
    r_ring = np.sqrt(0.5 * (edges[1:] ** 2 + edges[:-1] ** 2))
    prof_r, prof_sb, prof_err = [r_ring], [sb], [sb_err]
    if inner_fluxes:
        radii = sorted(float(k) for k in inner_fluxes if float(k) < radius)
        outer = {radius: (ap, ap_err)}
        outer.update(
            {float(k): (np.asarray(v[0], float)[idx], np.asarray(v[1], float)[idx]) for k, v in inner_fluxes.items()}
        )
        for r0, r1 in zip(radii, radii[1:] + [radius]):
            if r0 < 0.5 * radius:  # the core is not a wing: keep to the outer half
                continue
            f1, e1 = outer[r1]
            f0, e0 = outer[r0]
            a = math.pi * (r1**2 - r0**2)
            s = ((f1 - f0) / a - sky) / total_ap
            e = np.sqrt(np.abs(e1**2 - e0**2) / a**2 + sky_var) / total_ap
            sel = keep & np.isfinite(s) & np.isfinite(e) & (e > 0)
            if sel.sum() >= min_stars:
                ww = 1.0 / e[sel] ** 2
                prof_r.append(np.array([math.sqrt(0.5 * (r0**2 + r1**2))]))
                prof_sb.append(np.array([np.sum(ww * s[sel]) / np.sum(ww)]))
                prof_err.append(np.array([1.0 / math.sqrt(np.sum(ww))]))
    pr, psb, perr = (np.concatenate(v) for v in (prof_r, prof_sb, prof_err))
    order = np.argsort(pr)
    pr, psb, perr = pr[order], psb[order], perr[order]
    tail, gamma = _power_law_tail(pr, psb, perr, r_last)
    corr = 1.0 + f_mean + tail
    prof = {"r": pr.tolist(), "sb": psb.tolist(), "sb_err": perr.tolist()}
    if not np.isfinite(corr) or abs(corr - 1.0) > max_correction:
        return GrowthCorrection(
            status=f"measured correction {corr:.4f} is beyond 1 +- {max_correction}: not applied",
            n_stars=int(keep.sum()),
            ring_fraction=float(f_mean),
            tail_fraction=float(tail),
            gamma=gamma,
            profile=prof,
        )
    return GrowthCorrection(
        correction=float(corr),
        error=float(f_err),
        n_stars=int(keep.sum()),
        ring_fraction=float(f_mean),
        tail_fraction=float(tail),
        gamma=float(gamma),
        status="measured",
        profile=prof,
    )


def encircled_energy(psf_image, radii, total=None, sub=5):
    """Fraction of a PSF image's light inside circles of ``radii`` pixels about its centre pixel.

    Parameters
    ----------
    psf_image : ndarray (n, n)
        The PSF on the detector's pixels (pixel-convolved), centred on the centre pixel (odd ``n``).
    radii : sequence of float, pixels
    total : float, optional
        The PSF's total flux (1 for a profile normalised to unit flux whose far wings run off the
        image, as an optical model drawn on a finite grid); default the image's sum.
    sub : int
        Each pixel is split ``sub`` x ``sub`` for the fraction of it inside a circle.

    Returns
    -------
    ndarray (len(radii),)
    """
    k = np.asarray(psf_image, float)
    n = k.shape[0]
    if k.ndim != 2 or k.shape[1] != n or n % 2 == 0:
        raise ValueError(f"the PSF image must be square with an odd side, not {k.shape}")
    tot = float(k.sum()) if total is None else float(total)
    if not (np.isfinite(tot) and tot > 0):
        raise ValueError("the PSF image has no positive total flux")
    off = (np.arange(sub) + 0.5) / sub - 0.5
    c = np.arange(n) - n // 2
    # the distance of every sub-pixel from the centre: rows (n, 1, sub, 1), columns (1, n, 1, sub)
    rr = np.sqrt(
        (c[:, None, None, None] + off[None, None, :, None]) ** 2
        + (c[None, :, None, None] + off[None, None, None, :]) ** 2
    )
    return np.array([float((k * (rr <= float(r)).mean(axis=(2, 3))).sum() / tot) for r in radii])


def encircled_energy_at(table, radius):
    """The encircled energy at ``radius`` (pixels) from a curve ``((r, EE), ...)`` (radii increasing),
    interpolated linearly in ``1 - EE`` against ``1 / r`` (exact for an Airy wing, whose light beyond r
    falls as 1/r); NaN outside the table's radii."""
    t = np.asarray(table, float)
    if t.ndim != 2 or t.shape[1] != 2 or len(t) < 2:
        raise ValueError("an encircled-energy curve is a sequence of at least 2 (radius, EE) pairs")
    r, ee = t[:, 0], t[:, 1]
    if not (np.all(np.diff(r) > 0) and np.all(r > 0) and np.all((ee > 0) & (ee <= 1))):
        raise ValueError("an encircled-energy curve has increasing positive radii and 0 < EE <= 1")
    radius = float(radius)
    if not (r[0] <= radius <= r[-1]):
        return float("nan")
    return float(1.0 - np.interp(-1.0 / radius, -1.0 / r, 1.0 - ee))
