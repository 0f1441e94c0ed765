"""PSF star selection from the size/flux locus (:func:`select_psf_stars`)."""

from __future__ import annotations

import math

import numpy as np

from .model import _basis

__all__ = ["select_psf_stars"]


def select_psf_stars(
    x,
    y,
    ixx,
    iyy,
    flux,
    flux_err,
    bad=None,
    *,
    min_snr=50.0,
    isolation_radius=10.0,
    all_x=None,
    all_y=None,
    size_nsigma=3.0,
    max_stars=500,
    locus_T=None,
    locus_width=0.02,
    max_excess=None,
):
    """Select PSF stars from the size/flux locus.

    Parameters
    ----------
    x, y : array (n,), pixels
    ixx, iyy : array (n,), pixels^2
        Adaptive moments.
    flux, flux_err : array (n,), counts
    bad : array (n,) bool, optional
        Sources to exclude (saturated, edge, blended, interpolated, failed shape ...).
    min_snr : float
        Minimum ``flux / flux_err``.
    isolation_radius : float, pixels
        No other source (from ``all_x, all_y``, default the same list) within this radius.
    size_nsigma : float
        Clip half-width around the stellar locus, in MAD sigmas.
    max_stars : int
        Keep at most this many (highest S/N).
    locus_T : float, optional
        The stellar ``T = ixx + iyy`` is known (e.g. from the brighter stars: at low S/N,
        galaxies can outnumber stars and form the densest window, and an iterated locus
        drifts onto them): keep the sources within ``size_nsigma`` of it, with the width
        ``hypot(locus_width, noise)``, in one pass.
    locus_width : float, dex
        Intrinsic width of a given locus (the PSF size changes across a detector).
    max_excess : float, dex, optional
        With ``locus_T``: also at most this far above it, whatever the noise. Below S/N ~50
        galaxies outnumber stars several times and a compact one is only 0.1-0.15 dex larger
        than the PSF, while a star's own noise is ``1.23 / SNR`` dex (0.05 at S/N 25): the
        symmetric ``size_nsigma`` clip lets them in. A cap of about one star-noise sigma at
        S/N 25 (0.05 dex) loses some stars but keeps out most compact galaxies.

    Returns
    -------
    ndarray (n,) bool
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    T = np.asarray(ixx, float) + np.asarray(iyy, float)
    snr = np.asarray(flux, float) / np.asarray(flux_err, float)
    ok = np.isfinite(T) & (T > 0) & np.isfinite(snr) & (snr > min_snr)
    if bad is not None:
        ok &= ~np.asarray(bad, bool)
    ax = x if all_x is None else np.asarray(all_x, float)
    ay = y if all_y is None else np.asarray(all_y, float)
    if isolation_radius > 0 and ok.any():
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([ax, ay]))
        cnt = np.array([len(v) for v in tree.query_ball_point(np.column_stack([x[ok], y[ok]]), isolation_radius)])
        idx = np.flatnonzero(ok)
        ok[idx[cnt > 1]] = False
    if ok.sum() < 3:
        return ok
    lt = np.log10(T[ok])
    if locus_T is not None and np.isfinite(locus_T) and locus_T > 0:
        width = np.hypot(locus_width, 1.23 / snr[ok])
        sel = ok.copy()
        r = lt - math.log10(float(locus_T))
        sel[ok] = np.abs(r) < size_nsigma * width
        if max_excess is not None:
            sel[ok] &= r < float(max_excess)
        return _keep_brightest(sel, snr, max_stars)
    # densest 0.05-dex window = stellar locus
    srt = np.sort(lt)
    win = 0.05
    j = np.searchsorted(srt, srt + win, side="right")
    counts = j - np.arange(srt.size)
    i0 = int(np.argmax(counts))
    centre = np.median(srt[i0 : j[i0]])
    sel = ok.copy()
    sel[ok] = np.abs(lt - centre) < 0.1
    logT = np.log10(np.where(T > 0, T, 1e-30))
    # the PSF size varies across the detector (focus, field curvature): the locus is a
    # surface log T(x, y), fitted to the selected stars (a plane; quadratic with >= 15),
    # so that its width is the stars' scatter about it and not the spread of the PSF
    # size, which would let compact bright galaxies (T only ~10 % above the PSF's) in
    xn = (x - np.nanmean(x[ok])) / max(float(np.nanstd(x[ok])), 1.0)
    yn = (y - np.nanmean(y[ok])) / max(float(np.nanstd(y[ok])), 1.0)
    for _ in range(10):
        if sel.sum() < 3:
            break
        B = _basis(xn, yn, 2 if sel.sum() >= 15 else (1 if sel.sum() >= 6 else 0))
        coef = np.linalg.lstsq(B[sel], logT[sel], rcond=None)[0]
        locus = B @ coef
        resid = logT - locus
        mad = 1.4826 * np.median(np.abs(resid[sel] - np.median(resid[sel])))
        mad = max(mad, 1e-4)
        # the locus width is the intrinsic scatter (MAD over the selected stars, which the
        # bright stars dominate) and each star's own measurement noise in log T:
        # sigma(T) / T ~ 2 sqrt(2) / SNR for adaptive moments, 0.434 * 2.83 = 1.23 in dex
        width = np.hypot(mad, 1.23 / np.where(snr > 0, snr, np.inf))
        new = ok & (np.abs(resid) < size_nsigma * width)
        if (new == sel).all():
            break
        sel = new
    return _keep_brightest(sel, snr, max_stars)


def _keep_brightest(sel, snr, max_stars):
    """At most ``max_stars`` of ``sel``, the highest S/N."""
    if sel.sum() > max_stars:
        idx = np.flatnonzero(sel)
        keep = idx[np.argsort(-snr[idx])[:max_stars]]
        sel = np.zeros_like(sel)
        sel[keep] = True
    return sel
