"""Satellite and meteor trails: find long straight streaks, fit their profile, mask them.

The method follows the idea of LSST's ``maskStreaks`` (``lsst.pipe.tasks.maskStreaks``: a
Hough transform of the detection mask, then a fitted line profile; Fernandes & Oliveira
2008, *Pattern Recognition* 41, 299) but votes with the *signal* rather than with edges, so
that trails fainter than the detection threshold are found too (a Radon transform of a
binned S/N image, as in e.g. Nir, Zackay & Ofek 2018, AJ 156, 229, "Optimal and efficient
streak detection"). Our own implementation:

1. **Pixel selection.** Pixels with any of ``bad_bits`` (BAD, SAT, NO_DATA, CR, EDGE) are
   ignored, and SAT/BAD pixels are grown by ``bad_grow`` pixels so that saturation bleed
   columns and bad columns leave no wings. Detection footprints (``DETECTED``) are
   labelled; *compact* footprints (stars, galaxies, blends: major-axis length below
   ``min_footprint_length`` or axis ratio below ``min_elongation``) are ignored, long thin
   ones (pieces of a bright trail) are kept. Footprints holding saturated pixels whose
   major axis is within 10 degrees of the columns (bleed trails) are ignored.
2. **Binned S/N image.** ``s = image / sqrt(variance)`` clipped to ``[-clip, clip]`` is
   summed in ``bin_size`` x ``bin_size`` blocks and divided by ``sqrt(n_good)``: unit
   variance on noise.
3. **Hough (Radon) transform** of the binned image, lines ``x cos(theta) + y sin(theta) =
   rho``, one rho bin per binned pixel and ``dtheta = 1 / max(nbx, nby)``. The line
   statistic is a band of two rho bins minus the mean of flanking bands (gap 2, width 4 on
   each side), divided by its noise: large-scale background residuals do not make lines.
4. **Refinement at full resolution.** Pixels within a band around the candidate line are
   collapsed into a profile across the line (inverse-variance weighted, 0.5 px bins), per
   segment of ``segment_length`` pixels along it. A Gaussian plus constant is fitted to
   the whole profile (offset, width, amplitude) and the offsets fitted per segment give the
   angle by a weighted straight-line fit; three iterations.
5. **Verification.** With the line fixed, the amplitude of each segment is fitted
   (linear, so unbiased on noise). The streak is the longest run of segments with
   amplitude S/N above ``segment_nsigma`` (one-segment gaps allowed, e.g. under a masked
   star); it is accepted if the run is at least ``min_length`` pixels long, at least 60 %
   of its segments are "on", the median segment amplitude is at least half the mean
   (the signal is spread along the line, not one bright blob) and the combined amplitude
   S/N reaches ``nsigma``. The end points are then refined with quarter-length segments.
6. **Mask and model.** The fitted profile ``A exp(-d^2 / 2 sigma^2)`` between the end points
   is the model image; the mask is where the model exceeds ``mask_fraction`` times the
   pixel's noise ``sqrt(variance)`` (so its width follows the trail's brightness). Found
   streaks are removed from the binned image and the transform is repeated for further
   streaks.

Accuracy (``tests/test_kernels_streak.py``, against the truth). On synthetic star fields,
trails of peak 0.7-7 sigma per pixel are found to < 1.5e-3 rad and < 0.3 px, with width and
amplitude to a few per cent; the faintest (S/N ~40) are the least certain, since width and
amplitude are anticorrelated in the fit and stars merged with a faint trail's footprints bias
its flux upward. At least 95 % of the pixels where the trail exceeds 1 sigma are masked.
Nothing is found on fields with bleed columns, bad columns, cosmic rays and edge-on galaxies,
nor on the trail-free detectors of the simulated survey; its satellite trail is recovered to
3 % in width and amplitude. Cost: a fraction of a CPU second per 2048^2 image (bin 16).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numba
import numpy as np

from ._bits import BAD, CR, DETECTED, EDGE, NO_DATA, SAT, bit
from .detection import any_bits, dilate_square, label_components

#: Pixels more than _KCLIP sigma below or _KCLIP_HI sigma above the current profile model
#: are left out of the fits (sources on the line, cosmic rays).
_KCLIP = 4.0
_KCLIP_HI = 2.5

__all__ = ["STREAK", "STREAK_DTYPE", "StreakResult", "find_streaks", "streak_model"]

_IGNORE_BITS = bit(BAD) | bit(SAT) | bit(NO_DATA) | bit(CR) | bit(EDGE)
_GROW_BITS = bit(BAD) | bit(SAT)
_DETECTED_BITS = bit(DETECTED)
_SAT_BITS = bit(SAT)

#: Mask bit number of the STREAK plane (``procsky.masks.STANDARD_PLANES["STREAK"]``;
#: repeated here because kernels may not import ``procsky.masks``). The caller sets it.
STREAK = 10

#: Fields of :attr:`StreakResult.streaks`.
STREAK_DTYPE = np.dtype(
    [
        ("theta", "f8"),  # normal angle of the line, radians in [0, pi)
        ("rho", "f8"),  # x cos(theta) + y sin(theta) = rho, pixels (0-based pixel centres)
        ("x0", "f8"),
        ("y0", "f8"),
        ("x1", "f8"),
        ("y1", "f8"),  # end points (pixels)
        ("length", "f8"),  # pixels
        ("width", "f8"),  # Gaussian sigma of the profile across the line, pixels
        ("amplitude", "f8"),  # peak of the profile, counts per pixel
        ("amplitude_err", "f8"),
        ("peak_snr", "f8"),  # amplitude / median pixel noise along the line
        ("snr", "f8"),  # amplitude / amplitude_err: significance of the whole streak
        ("mask_halfwidth", "f8"),  # half-width masked at the median noise, pixels
    ]
)


class StreakResult(NamedTuple):
    """Streaks found on one image.

    Attributes
    ----------
    mask : ndarray (ny, nx) bool
        Streak pixels (where the fitted profile exceeds ``mask_fraction`` sigma).
    model : ndarray (ny, nx) float32
        Fitted trail(s), counts; subtract it to measure sources under a trail.
    streaks : ndarray, dtype :data:`STREAK_DTYPE`
        One row per streak.
    n_candidates : int
        Hough peaks examined (accepted or not).
    """

    mask: np.ndarray
    model: np.ndarray
    streaks: np.ndarray
    n_candidates: int


# ----------------------------------------------------------------------------- pixel selection
@numba.njit(nogil=True, cache=True)
def _footprint_shapes(labels, n, sat):
    """Per-label major/minor axis sigmas, major-axis angle and whether it holds SAT pixels."""
    s0 = np.zeros(n + 1)
    sx = np.zeros(n + 1)
    sy = np.zeros(n + 1)
    sxx = np.zeros(n + 1)
    syy = np.zeros(n + 1)
    sxy = np.zeros(n + 1)
    has_sat = np.zeros(n + 1, np.bool_)
    ny, nx = labels.shape
    for y in range(ny):
        for x in range(nx):
            k = labels[y, x]
            if k == 0:
                continue
            s0[k] += 1.0
            sx[k] += x
            sy[k] += y
            sxx[k] += x * x
            syy[k] += y * y
            sxy[k] += x * y
            if sat[y, x]:
                has_sat[k] = True
    a = np.zeros(n + 1)
    b = np.zeros(n + 1)
    ang = np.zeros(n + 1)
    for k in range(1, n + 1):
        mx = sx[k] / s0[k]
        my = sy[k] / s0[k]
        cxx = sxx[k] / s0[k] - mx * mx + 1.0 / 12.0
        cyy = syy[k] / s0[k] - my * my + 1.0 / 12.0
        cxy = sxy[k] / s0[k] - mx * my
        tr = 0.5 * (cxx + cyy)
        det = math.sqrt(max(0.25 * (cxx - cyy) ** 2 + cxy * cxy, 0.0))
        a[k] = math.sqrt(max(tr + det, 0.0))
        b[k] = math.sqrt(max(tr - det, 1e-12))
        ang[k] = 0.5 * math.atan2(2.0 * cxy, cxx - cyy)  # major axis angle from +x
    return a, b, ang, has_sat


@numba.njit(nogil=True, cache=True)
def _weight_and_binned_snr(image, variance, ignore, labels, drop, b, clip):
    """Per-pixel inverse variance ``w`` (0 where ignored or in a dropped footprint) and the binned
    S/N (sum of the pixels' S/N ``f / sqrt(v)`` (float32), clipped, over sqrt(n good)); bins with
    < half good pixels invalid. One sweep: the S/N plane is never stored."""
    ny, nx = image.shape
    w = np.zeros((ny, nx), np.float32)
    nby = (ny + b - 1) // b
    nbx = (nx + b - 1) // b
    s = np.zeros((nby, nbx))
    n = np.zeros((nby, nbx))
    for y in range(ny):
        for x in range(nx):
            if ignore[y, x]:
                continue
            k = labels[y, x]
            if k > 0 and drop[k]:
                continue
            v = variance[y, x]
            f = image[y, x]
            if not (v > 0.0) or not math.isfinite(v) or not math.isfinite(f):
                continue
            w[y, x] = 1.0 / v
            if w[y, x] > 0.0:
                snr = np.float64(np.float32(f / math.sqrt(v)))
                if snr > clip:
                    snr = clip
                elif snr < -clip:
                    snr = -clip
                s[y // b, x // b] += snr
                n[y // b, x // b] += 1.0
    out = np.zeros((nby, nbx))
    valid = np.zeros((nby, nbx), np.bool_)
    for j in range(nby):
        for i in range(nbx):
            if n[j, i] >= 0.5 * b * b:
                out[j, i] = s[j, i] / math.sqrt(n[j, i])
                valid[j, i] = True
    return w, out, valid


# ----------------------------------------------------------------------------- Hough transform
@numba.njit(nogil=True, cache=True)
def _hough(img, valid, cos_t, sin_t, rho_min, nrho):
    """Accumulate sum and count of ``img`` along lines; rho in binned pixels, bin width 1."""
    nt = cos_t.size
    acc = np.zeros((nt, nrho))
    cnt = np.zeros((nt, nrho))
    nby, nbx = img.shape
    off = 0.5 - rho_min  # > 0: truncation is floor
    for t in range(nt):
        c = cos_t[t]
        s = sin_t[t]
        for j in range(nby):
            base = j * s + off
            for i in range(nbx):
                if valid[j, i]:
                    r = int(i * c + base)
                    acc[t, r] += img[j, i]
                    cnt[t, r] += 1.0
    return acc, cnt


@numba.njit(nogil=True, cache=True)
def _hough_remove(acc, cnt, img, js, iis, cos_t, sin_t, rho_min):
    """Take the votes of binned pixels ``(js, iis)`` out of the accumulators."""
    off = 0.5 - rho_min
    for t in range(cos_t.size):
        c = cos_t[t]
        s = sin_t[t]
        for q in range(js.size):
            r = int(iis[q] * c + js[q] * s + off)
            acc[t, r] -= img[js[q], iis[q]]
            cnt[t, r] -= 1.0


@numba.njit(nogil=True, cache=True)
def _line_statistic(acc, cnt, band, gap, flank, min_count):
    """Band-minus-flanks S/N of every (theta, rho); the best one and its value."""
    nt, nr = acc.shape
    best = -1e30
    bt = -1
    br = -1
    for t in range(nt):
        for r in range(flank + gap, nr - band - gap - flank + 1):
            sb = 0.0
            nb = 0.0
            for q in range(r, r + band):
                sb += acc[t, q]
                nb += cnt[t, q]
            if nb < min_count:
                continue
            sf = 0.0
            nf = 0.0
            for q in range(r - gap - flank, r - gap):
                sf += acc[t, q]
                nf += cnt[t, q]
            for q in range(r + band + gap, r + band + gap + flank):
                sf += acc[t, q]
                nf += cnt[t, q]
            if nf < min_count:
                continue
            # flanks: mean per bin scaled to the band's count
            val = (sb - sf * nb / nf) / math.sqrt(nb + nb * nb / nf)
            if val > best:
                best = val
                bt = t
                br = r
    return best, bt, br


@numba.njit(nogil=True, cache=True)
def _zero_line(valid, b, cth, sth, rho, t0, t1, halfwidth):
    """Invalidate binned pixels whose centre lies within ``halfwidth`` of a segment of line.

    Returns the (j, i) indices of the pixels newly invalidated.
    """
    nby, nbx = valid.shape
    js = []
    iis = []
    for j in range(nby):
        yc = (j + 0.5) * b - 0.5
        for i in range(nbx):
            if not valid[j, i]:
                continue
            xc = (i + 0.5) * b - 0.5
            d = xc * cth + yc * sth - rho
            t = -xc * sth + yc * cth
            if abs(d) <= halfwidth and t >= t0 - b and t <= t1 + b:
                valid[j, i] = False
                js.append(j)
                iis.append(i)
    return np.array(js, np.int64), np.array(iis, np.int64)


# ----------------------------------------------------------------------------- line geometry
def _line_extent(cth, sth, rho, nx, ny):
    """Along-line coordinates ``t`` where the line is inside the image; (nan, nan) if outside."""
    # point on the line P(t) = rho * n + t * e, n = (c, s), e = (-s, c)
    px, py = rho * cth, rho * sth
    ex, ey = -sth, cth
    lo, hi = -np.inf, np.inf
    for p, e, vmax in ((px, ex, nx - 0.5), (py, ey, ny - 0.5)):
        if abs(e) < 1e-12:
            if p < -0.5 or p > vmax:
                return math.nan, math.nan
            continue
        a, c = (-0.5 - p) / e, (vmax - p) / e
        lo, hi = max(lo, min(a, c)), min(hi, max(a, c))
    if not hi > lo:
        return math.nan, math.nan
    return lo, hi


@numba.njit(nogil=True, cache=True)
def _band_pixels(ny, nx, cth, sth, rho, dmax):
    """Pixels within ``dmax`` (plus rounding) of the line ``x cos + y sin = rho``.

    The line is scanned along the axis it is closer to (rows when it runs nearer the
    columns), so each scan line holds a short run of pixels. Returns ``(ys, xs)`` in scan
    order.
    """
    rows = abs(cth) >= abs(sth)
    nouter = ny if rows else nx
    ninner = nx if rows else ny
    cu = sth if rows else cth  # coefficient of the outer coordinate in d
    cv = cth if rows else sth  # coefficient of the inner coordinate (|cv| >= 1/sqrt(2))
    cap = nouter * (int(2.0 * dmax * 1.4143) + 3)
    ys = np.empty(cap, np.int64)
    xs = np.empty(cap, np.int64)
    n = 0
    for u in range(nouter):
        lo = (rho - u * cu - dmax) / cv
        hi = (rho - u * cu + dmax) / cv
        if lo > hi:
            lo, hi = hi, lo
        v0 = max(0, int(math.floor(lo)))
        v1 = min(ninner - 1, int(math.ceil(hi)))
        for v in range(v0, v1 + 1):
            if rows:
                ys[n] = u
                xs[n] = v
            else:
                xs[n] = u
                ys[n] = v
            n += 1
    return ys[:n], xs[:n]


@numba.njit(nogil=True, cache=True)
def _collapse(image, w, cth, sth, rho, dmax, dstep, t0, seglen, nseg, amp=0.0, cst=0.0, d0=0.0, sig=1.0, kclip=0.0):
    """Inverse-variance weighted profile across the line, per segment along it.

    Returns ``S1[nseg, nd]`` (sum w f) and ``S0[nseg, nd]`` (sum w) in bins of ``dstep``
    of the distance ``d`` in ``[-dmax, dmax)``. With ``kclip > 0``, pixels more than
    ``kclip`` sigma below or ``_KCLIP_HI`` sigma above the profile ``amp exp(-(d - d0)^2 /
    2 sig^2) + cst`` (sources on the line) are left out.
    """
    ny, nx = image.shape
    nd = int(round(2.0 * dmax / dstep))
    s1 = np.zeros((nseg, nd))
    s0 = np.zeros((nseg, nd))
    ys, xs = _band_pixels(ny, nx, cth, sth, rho, dmax)
    for i in range(ys.size):
        y = ys[i]
        x = xs[i]
        ww = w[y, x]
        if ww <= 0.0:
            continue
        d = x * cth + y * sth - rho
        k = int(math.floor((d + dmax) / dstep))
        if k < 0 or k >= nd:
            continue
        if kclip > 0.0:
            # asymmetric: sources on the line only add flux, so the upper clip is tight
            # (2.5 sigma); the truncation lowers the noise mean by a constant that the
            # fitted constant absorbs
            r = (image[y, x] - amp * math.exp(-0.5 * ((d - d0) / sig) ** 2) - cst) * math.sqrt(ww)
            if r > _KCLIP_HI or r < -kclip:
                continue
        t = -x * sth + y * cth
        s = int(math.floor((t - t0) / seglen))
        if s < 0 or s >= nseg:
            continue
        s1[s, k] += ww * image[y, x]
        s0[s, k] += ww
    return s1, s0


@numba.njit(nogil=True, cache=True)
def _readmit(image, variance, w, labels, drop, cth, sth, rho, dmax, amp, cst, sig, nsig_max):
    """Give back the pixels of dropped (compact) footprints that are only noise on the trail.

    A faint trail is partly detected as small footprints, which the pixel selection drops
    as compact sources; leaving them out would bias the fit low. Within ``dmax`` of the line,
    the part of each dropped footprint whose residual from the trail profile sums to less
    than ``nsig_max`` sigma is used again. Returns a copy of ``w``.
    """
    ny, nx = image.shape
    nl = drop.size
    sres = np.zeros(nl)
    svar = np.zeros(nl)
    w2 = w.copy()
    ys, xs = _band_pixels(ny, nx, cth, sth, rho, dmax)
    for p in range(2):
        for i in range(ys.size):
            y = ys[i]
            x = xs[i]
            k = labels[y, x]
            if k == 0 or not drop[k]:
                continue
            var = variance[y, x]
            if not (var > 0.0) or not math.isfinite(var) or not math.isfinite(image[y, x]):
                continue
            if p == 0:
                d = x * cth + y * sth - rho
                sres[k] += image[y, x] - amp * math.exp(-0.5 * (d / sig) ** 2) - cst
                svar[k] += var
            elif svar[k] > 0.0 and sres[k] < nsig_max * math.sqrt(svar[k]):
                w2[y, x] = 1.0 / var
    return w2


@numba.njit(nogil=True, cache=True)
def _lin_fit(s1, s0, dc, d0, sig):
    """Weighted LS of ``A g + c`` on a collapsed profile; returns A, var(A), c, chi2."""
    a11 = 0.0
    a12 = 0.0
    a22 = 0.0
    b1 = 0.0
    b2 = 0.0
    smm = 0.0
    for k in range(s1.size):
        if s0[k] <= 0.0:
            continue
        m = s1[k] / s0[k]
        smm += s0[k] * m * m
        u = (dc[k] - d0) / sig
        if u * u > 100.0:
            g = 0.0
        else:
            g = math.exp(-0.5 * u * u)
        a11 += s0[k] * g * g
        a12 += s0[k] * g
        a22 += s0[k]
        b1 += s0[k] * g * m
        b2 += s0[k] * m
    det = a11 * a22 - a12 * a12
    if not det > 0.0:
        return 0.0, math.inf, 0.0, math.inf
    amp = (a22 * b1 - a12 * b2) / det
    c = (a11 * b2 - a12 * b1) / det
    # chi^2 = sum w m^2 - (A b1 + c b2) at the least-squares solution
    return amp, a22 / det, c, smm - amp * b1 - c * b2


@numba.njit(nogil=True, cache=True)
def _grid_fit(s1, s0, dc, d0_lo, d0_hi, nd0, sig_lo, sig_hi, nsig):
    """Best (d0, sigma) on a grid (sigma log-spaced) by chi^2 with positive amplitude."""
    best = math.inf
    bd = 0.5 * (d0_lo + d0_hi)
    bs = math.sqrt(sig_lo * sig_hi)
    for i in range(nd0):
        d0 = d0_lo + (d0_hi - d0_lo) * i / max(nd0 - 1, 1)
        for j in range(nsig):
            sig = sig_lo * (sig_hi / sig_lo) ** (j / max(nsig - 1, 1))
            amp, _, _, chi2 = _lin_fit(s1, s0, dc, d0, sig)
            if amp > 0.0 and chi2 < best:
                best = chi2
                bd = d0
                bs = sig
    return bd, bs, best


def _fit_profile(s1, s0, dc, sig_bounds, d0_range):
    """Offset and width of a collapsed profile: coarse then fine grid."""
    d0, sig, _ = _grid_fit(s1, s0, dc, -d0_range, d0_range, int(2 * d0_range) + 1, sig_bounds[0], sig_bounds[1], 20)
    step_s = (sig_bounds[1] / sig_bounds[0]) ** (1 / 19)
    d0, sig, _ = _grid_fit(
        s1, s0, dc, d0 - 0.3, d0 + 0.3, 7, max(sig / step_s, sig_bounds[0]), min(sig * step_s, sig_bounds[1]), 7
    )
    step_s = step_s ** (1 / 6)
    d0, sig, _ = _grid_fit(s1, s0, dc, d0 - 0.1, d0 + 0.1, 9, sig / step_s, sig * step_s, 7)
    amp, va, c, _ = _lin_fit(s1, s0, dc, d0, sig)
    return d0, sig, amp, va, c


def _new_line(cth, sth, rho, ta, da, tb, db):
    """The line through the points at (t, d) = (ta, da) and (tb, db) of the current frame."""
    pa = np.array([rho * cth, rho * sth]) + ta * np.array([-sth, cth]) + da * np.array([cth, sth])
    pb = np.array([rho * cth, rho * sth]) + tb * np.array([-sth, cth]) + db * np.array([cth, sth])
    u = (pb - pa) / np.hypot(*(pb - pa))
    n = np.array([u[1], -u[0]])
    th = math.atan2(n[1], n[0])
    r = float(pa @ n)
    if th < 0:
        th += math.pi
        r = -r
    if th >= math.pi:
        th -= math.pi
        r = -r
    return th, r


@numba.njit(nogil=True, cache=True)
def _paint(model, mask, variance, cth, sth, rho, t0, t1, amp, sig, frac, dmax):
    """Add the profile between ``t0`` and ``t1`` to ``model``; mask where > frac sigma."""
    ny, nx = model.shape
    ys, xs = _band_pixels(ny, nx, cth, sth, rho, dmax)
    for i in range(ys.size):
        y = ys[i]
        x = xs[i]
        t = -x * sth + y * cth
        if t < t0 or t > t1:
            continue
        d = x * cth + y * sth - rho
        m = amp * math.exp(-0.5 * (d / sig) ** 2)
        model[y, x] += m
        var = variance[y, x]
        if var > 0.0 and math.isfinite(var):
            if m > frac * math.sqrt(var):
                mask[y, x] = True
        elif abs(d) <= 2.0 * sig:
            mask[y, x] = True


def streak_model(shape, streaks, variance=None, mask_fraction=0.5):
    """Render streaks (rows of :data:`STREAK_DTYPE`) as a model image and a mask.

    Parameters
    ----------
    shape : (int, int)
    streaks : ndarray, dtype STREAK_DTYPE
    variance : ndarray (ny, nx), optional
        Pixel variance for the mask threshold; without it the mask is ``|d| <=
        mask_halfwidth``.
    mask_fraction : float

    Returns
    -------
    model : ndarray float32
    mask : ndarray bool
    """
    model = np.zeros(shape, np.float64)
    mask = np.zeros(shape, np.bool_)
    for s in np.atleast_1d(streaks):
        cth, sth = math.cos(s["theta"]), math.sin(s["theta"])
        t0 = -s["x0"] * sth + s["y0"] * cth
        t1 = -s["x1"] * sth + s["y1"] * cth
        if t0 > t1:
            t0, t1 = t1, t0
        if variance is None:
            noise = s["amplitude"] / max(s["peak_snr"], 1e-30)
            var = np.full(shape, noise**2, np.float32)
        else:
            var = np.asarray(variance, np.float32)
        dmax = max(6.0 * s["width"], s["mask_halfwidth"] + 1.0)
        _paint(
            model,
            mask,
            var,
            cth,
            sth,
            float(s["rho"]),
            t0,
            t1,
            float(s["amplitude"]),
            float(s["width"]),
            float(mask_fraction),
            float(dmax),
        )
    return model.astype(np.float32), mask


# ----------------------------------------------------------------------------- the finder
def find_streaks(
    image,
    variance,
    mask=None,
    *,
    psf_sigma,
    nsigma=10.0,
    hough_nsigma=6.0,
    segment_nsigma=3.0,
    min_length=300.0,
    min_length_bright=100.0,
    bright_nsigma=50.0,
    segment_length=128.0,
    bin_size=None,
    clip=5.0,
    mask_fraction=0.5,
    max_streaks=5,
    max_candidates=10,
    min_elongation=4.0,
    min_footprint_length=None,
    bad_grow=None,
    max_width=None,
    bad_bits=_IGNORE_BITS,
    grow_bits=_GROW_BITS,
    detected_bits=_DETECTED_BITS,
    saturated_bits=_SAT_BITS,
):
    """Find, fit and mask satellite trails on a background-subtracted image.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image, counts.
    variance : ndarray (ny, nx)
        Variance, counts^2.
    mask : ndarray (ny, nx) uint32, optional
        Mask bits (:mod:`procsky.kernels._bits`), with DETECTED set on the detection
        footprints (call after detection).
    psf_sigma : float, pixels
        PSF Gaussian sigma; sets the default ``bad_grow`` and footprint-size limits.
    nsigma : float
        Significance of a streak's amplitude (combined over its length) to accept it.
    hough_nsigma : float
        Hough-peak significance to examine a candidate line.
    segment_nsigma : float
        Amplitude S/N for a segment to count as "on".
    min_length : float, pixels
        Shortest streak (run of "on" segments).
    min_length_bright, bright_nsigma : float
        Streaks with a combined S/N of at least ``bright_nsigma`` may be as short as
        ``min_length_bright`` (a bright trail cutting a corner of the detector).
    segment_length : float, pixels
        Segment length for the verification and the angle fit.
    bin_size : int, optional
        Binning of the S/N image for the Hough transform (default 8 for 2048 pixels, in
        proportion to the larger side, so the transform costs the same on larger images).
    clip : float
        Per-pixel S/N clip before binning (limits sources not masked).
    mask_fraction : float
        Mask where the fitted profile exceeds this many sigma of the pixel noise.
    max_streaks, max_candidates : int
        Stop after this many streaks found / Hough peaks examined.
    min_elongation : float
        Axis ratio of a detection footprint above which it is kept as a possible trail piece.
    min_footprint_length : float, pixels, optional
        Detection footprints shorter than this (major-axis sigma x sqrt(12)) are compact
        sources and ignored (default ``max(30, 10 psf_sigma)``).
    bad_grow : int, pixels, optional
        Growth of ``grow_bits`` pixels (default ``ceil(2 psf_sigma)``).
    max_width : float, pixels, optional
        Largest profile sigma fitted (default ``max(10, 5 psf_sigma)``).
    bad_bits, grow_bits, detected_bits, saturated_bits : int
        Mask bit values (not numbers): ignored pixels, those grown, detection footprints,
        saturation.

    Returns
    -------
    StreakResult
    """
    image = np.asarray(image, np.float32)
    variance = np.asarray(variance, np.float32)
    if image.ndim != 2 or image.shape != variance.shape:
        raise ValueError(f"image and variance must be 2-D of the same shape, got {image.shape} and {variance.shape}")
    if not (psf_sigma is not None and psf_sigma > 0):
        raise ValueError(f"psf_sigma must be > 0 pixels, got {psf_sigma!r}")
    ny, nx = image.shape
    if mask is None:
        mask = np.zeros(image.shape, np.uint32)
    mask = np.asarray(mask)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape}")
    mask = mask.astype(np.uint32, copy=False)
    bad_grow = math.ceil(2.0 * psf_sigma) if bad_grow is None else int(bad_grow)
    min_footprint_length = max(30.0, 10.0 * psf_sigma) if min_footprint_length is None else float(min_footprint_length)
    max_width = max(10.0, 5.0 * psf_sigma) if max_width is None else float(max_width)
    b = int(bin_size) if bin_size is not None else max(4, round(8 * max(ny, nx) / 2048))

    # 1. pixel selection
    ignore = any_bits(mask, bad_bits)
    grown = any_bits(mask, grow_bits)
    if bad_grow > 0 and grown.any():
        ignore |= dilate_square(grown, bad_grow)
    del grown
    labels, n_lab = label_components(any_bits(mask, detected_bits))
    sat = any_bits(mask, saturated_bits)
    if n_lab:
        a, bb, ang, has_sat = _footprint_shapes(labels, n_lab, sat)
        length = a * math.sqrt(12.0)
        compact = (length < min_footprint_length) | (a < min_elongation * bb)
        vertical = np.abs(np.abs(ang) - 0.5 * math.pi) < math.radians(10.0)
        drop = compact | (has_sat & vertical)
        drop[0] = False
    else:
        drop = np.zeros(1, np.bool_)
    del sat
    # 2. binned S/N (the per-pixel S/N is summed as it is computed)
    w, binned, valid = _weight_and_binned_snr(image, variance, ignore, labels, drop, b, float(clip))
    excluded = ignore  # pixels no fit may use: bad pixels, then also the streaks found
    valid0 = w > 0

    @functools.cache
    def noise_med():
        """Median pixel noise of the usable pixels (only a fallback: a full-image median)."""
        return float(np.median(np.sqrt(variance[valid0]))) if valid0.any() else 1.0

    # 3. Hough transform
    nby, nbx = binned.shape
    ntheta = math.ceil(math.pi * max(nbx, nby))
    thetas = np.arange(ntheta) * (math.pi / ntheta)
    cos_t, sin_t = np.cos(thetas), np.sin(thetas)
    rmax = math.hypot(nbx, nby) + 2
    rho_min = -rmax
    nrho = int(2 * rmax) + 2
    band, gap, flank = 2, 2, 4
    min_count = max(4.0, 0.5 * min(min_length, min_length_bright) / b)

    out: list[dict] = []
    model = np.zeros(image.shape, np.float64)
    smask = np.zeros(image.shape, np.bool_)
    n_cand = 0
    dstep = 0.5
    acc, cnt = _hough(binned, valid, cos_t, sin_t, rho_min, nrho)
    while len(out) < max_streaks and n_cand < max_candidates:
        best, it, ir = _line_statistic(acc, cnt, band, gap, flank, min_count)
        if it < 0 or best < hough_nsigma:
            break
        n_cand += 1
        th = thetas[it]
        rho_b = ir + rho_min + 0.5 * (band - 1)  # binned-pixel units, bin centres at i
        # binned pixel i covers full-res [i b - 0.5, (i + 1) b - 0.5): centre (i + 0.5) b - 0.5
        cth, sth = math.cos(th), math.sin(th)
        rho = rho_b * b + (0.5 * b - 0.5) * (cth + sth)
        res = _refine_and_verify(
            image,
            w,
            variance,
            cth,
            sth,
            rho,
            nx,
            ny,
            b,
            max_width,
            dstep,
            segment_length,
            segment_nsigma,
            (min_length, min_length_bright, bright_nsigma),
            nsigma,
            noise_med,
            (labels, drop, excluded),
        )
        if res is None:
            # not a streak: remove this line from the transform and look further
            ta, tb = _line_extent(cth, sth, rho, nx, ny)
            if math.isfinite(ta):
                js, iis = _zero_line(valid, b, cth, sth, rho, ta, tb, 1.5 * b)
                _hough_remove(acc, cnt, binned, js, iis, cos_t, sin_t, rho_min)
            else:
                break
            continue
        row = res
        if any(
            abs(row["theta"] - o["theta"]) < 0.02 and abs(row["rho"] - o["rho"]) < 3.0 * o["width"] + 2.0 for o in out
        ):
            # refined onto a streak already found (should not happen once its pixels are out)
            ta, tb = _line_extent(cth, sth, rho, nx, ny)
            js, iis = _zero_line(valid, b, cth, sth, rho, ta, tb, 1.5 * b)
            _hough_remove(acc, cnt, binned, js, iis, cos_t, sin_t, rho_min)
            continue
        out.append(row)
        cth, sth = math.cos(row["theta"]), math.sin(row["theta"])
        t0 = -row["x0"] * sth + row["y0"] * cth
        t1 = -row["x1"] * sth + row["y1"] * cth
        js, iis = _zero_line(
            valid,
            b,
            cth,
            sth,
            row["rho"],
            min(t0, t1),
            max(t0, t1),
            max(row["mask_halfwidth"], 3.0 * row["width"]) + 1.5 * b,
        )
        _hough_remove(acc, cnt, binned, js, iis, cos_t, sin_t, rho_min)
        dmax = max(6.0 * row["width"], row["mask_halfwidth"] + 1.0)
        _paint(
            model,
            smask,
            variance,
            cth,
            sth,
            row["rho"],
            min(t0, t1),
            max(t0, t1),
            row["amplitude"],
            row["width"],
            float(mask_fraction),
            float(dmax),
        )
        # later candidates must not be refined onto this streak: its pixels leave the fits, with
        # the footprints it runs through (sources merged with a bright trail's footprint)
        gone = model > 0.1 * np.sqrt(np.maximum(variance, 0.0))
        if n_lab:
            hit = np.zeros(n_lab + 1, np.bool_)
            hit[labels[smask]] = True
            hit[0] = False
            gone |= hit[labels]
        w[gone] = 0.0
        excluded |= gone
    streaks = np.zeros(len(out), STREAK_DTYPE)
    for i, r in enumerate(out):
        for k in STREAK_DTYPE.names:  # type: ignore[union-attr]  # a structured dtype has names
            streaks[k][i] = r[k]
    # without a streak the model is zero: a fresh zeroed plane, whose pages stay unmapped until written
    model32 = model.astype(np.float32) if out else np.zeros(image.shape, np.float32)
    return StreakResult(mask=smask, model=model32, streaks=streaks, n_candidates=n_cand)


def _segments(ta, tb, seglen):
    """Number and length of segments along ``[ta, tb]``: about ``seglen`` long, but at least
    four (each >= 32 px) on short lines so that the angle can be fitted."""
    n = round((tb - ta) / seglen)
    nseg = max(1, n, min(4, int((tb - ta) / 32.0)))
    return nseg, (tb - ta) / nseg


def _refine_and_verify(
    image,
    w,
    variance,
    cth,
    sth,
    rho,
    nx,
    ny,
    b,
    max_width,
    dstep,
    seglen,
    seg_nsigma,
    lengths,
    nsigma,
    noise_med,
    footprints,
):
    """Refine a Hough candidate at full resolution and decide whether it is a streak.

    ``lengths`` is ``(min_length, min_length_bright, bright_nsigma)``; ``footprints`` is
    ``(labels, drop, ignore)`` of the pixel selection.
    """
    min_length, min_short, bright_nsigma = lengths
    min_any = min(min_length, min_short)
    dmax = 3.0 * b + 3.0 * max_width
    sig_bounds = (0.5, max_width)
    th = math.atan2(sth, cth)
    prev = None
    for it in range(3):
        ta, tb = _line_extent(cth, sth, rho, nx, ny)
        if not (math.isfinite(ta) and tb - ta >= min_any):
            return None
        nseg, sl = _segments(ta, tb, seglen)
        s1, s0, dc, (d0, sig, amp, va, c) = _collapse_fit(
            image, w, cth, sth, rho, dmax, dstep, ta, sl, nseg, sig_bounds, min(dmax - 2 * max_width, 2.0 * b), prev
        )
        if not amp > 0 or amp < 0.5 * nsigma * math.sqrt(va):
            return None
        # per-segment offsets -> angle
        tt, dd, ww = [], [], []
        for k in range(nseg):
            hw = 3.0 if it == 0 else 1.5
            d0k, _, _ = _grid_fit(s1[k], s0[k], dc, d0 - hw, d0 + hw, int(hw / 0.1) * 2 + 1, sig, sig, 1)
            ak, vk, _, _ = _lin_fit(s1[k], s0[k], dc, d0k, sig)
            z = ak / math.sqrt(vk) if vk > 0 else 0.0
            if z > seg_nsigma:
                tt.append(ta + (k + 0.5) * sl)
                dd.append(d0k)
                ww.append((z / sig) ** 2)
        if len(tt) >= 2:
            t_arr, d_arr, w_arr = np.array(tt), np.array(dd), np.array(ww)
            A = np.vstack([np.ones_like(t_arr), t_arr - t_arr.mean()]).T * np.sqrt(w_arr)[:, None]
            coef = np.linalg.lstsq(A, d_arr * np.sqrt(w_arr), rcond=None)[0]
            da = coef[0] + coef[1] * (ta - t_arr.mean())
            db = coef[0] + coef[1] * (tb - t_arr.mean())
        else:
            da = db = d0
        th, rho = _new_line(cth, sth, rho, ta, da, tb, db)
        cth, sth = math.cos(th), math.sin(th)
        dmax = max(6.0 * sig + 2.0, 15.0)
        prev = (amp, c, 0.0, sig)
    # noise fragments of a faint trail, dropped as compact footprints, are used again
    labels, drop, ignore = footprints
    if drop.any():
        w = _readmit(image, variance, w, labels, drop, cth, sth, rho, max(6.0 * sig + 4.0, 15.0), amp, c, sig, 3.0)
        w[ignore] = 0.0
    # final fit with the line fixed
    ta, tb = _line_extent(cth, sth, rho, nx, ny)
    if not (math.isfinite(ta) and tb - ta >= min_any):
        return None
    dmax = max(6.0 * sig + 4.0, 15.0)
    nseg, sl = _segments(ta, tb, seglen)
    s1, s0, dc, (d0, sig, amp, va, c) = _collapse_fit(
        image, w, cth, sth, rho, dmax, dstep, ta, sl, nseg, sig_bounds, 1.0, prev
    )
    prev = (amp, c, 0.0, sig)
    if abs(d0) > 1e-9:
        th, rho = _new_line(cth, sth, rho, ta, d0, tb, d0)
        cth, sth = math.cos(th), math.sin(th)
        ta, tb = _line_extent(cth, sth, rho, nx, ny)
        nseg, sl = _segments(ta, tb, seglen)
    s1, s0 = _collapse(image, w, cth, sth, rho, dmax, dstep, ta, sl, nseg, *prev, _KCLIP)
    amps, errs, keep = _segment_amplitudes(s1, s0, dc, 0.0, sig)
    on = (amps > seg_nsigma * errs) & keep
    run = _longest_run(on, np.isfinite(errs))
    if run is None:
        return None
    k0, k1 = run
    sel = slice(k0, k1 + 1)
    good = keep[sel]
    if good.sum() == 0:
        return None
    n_on = int(on[sel].sum())
    wts = 1.0 / errs[sel][good] ** 2
    a_mean = float(np.sum(amps[sel][good] * wts) / np.sum(wts))
    a_err = float(1.0 / math.sqrt(np.sum(wts)))
    a_med = float(np.median(amps[sel][good]))
    t_start = ta + k0 * sl
    t_end = ta + (k1 + 1) * sl
    long_enough = t_end - t_start >= min_length or (t_end - t_start >= min_short and a_mean >= bright_nsigma * a_err)
    if not long_enough or n_on < 0.6 * good.sum() or a_mean <= 0 or a_med < 0.5 * a_mean or a_mean < nsigma * a_err:
        return None
    # refine the ends with quarter segments (only where the run stops inside the image)
    t_start, t_end = _refine_ends(
        image,
        w,
        cth,
        sth,
        rho,
        dmax,
        dstep,
        dc,
        sig,
        ta,
        tb,
        t_start,
        t_end,
        sl,
        k0 == 0,
        k1 == nseg - 1,
        seg_nsigma,
        prev,
    )
    # final amplitude over the run, with the width free
    nseg2, sl2 = _segments(t_start, t_end, seglen)
    s1, s0, dc, (d0f, sigf, ampf, vaf, _) = _collapse_fit(
        image, w, cth, sth, rho, dmax, dstep, t_start, sl2, nseg2, sig_bounds, 0.5, prev
    )
    if abs(d0f) > 1e-9:
        th, rho = _new_line(cth, sth, rho, t_start, d0f, t_end, d0f)
        cth, sth = math.cos(th), math.sin(th)
    noise_line = _median_noise(variance, w, cth, sth, rho, t_start, t_end)
    if not np.isfinite(noise_line):
        noise_line = noise_med()
    x0, y0 = rho * cth - t_start * sth, rho * sth + t_start * cth
    x1, y1 = rho * cth - t_end * sth, rho * sth + t_end * cth
    peak_snr = ampf / noise_line
    half = sigf * math.sqrt(2.0 * math.log(peak_snr / 0.5)) if peak_snr > 0.5 else 0.0
    return {
        "theta": th % math.pi if th >= 0 else th + math.pi,
        "rho": rho,
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "length": t_end - t_start,
        "width": sigf,
        "amplitude": ampf,
        "amplitude_err": math.sqrt(vaf),
        "peak_snr": peak_snr,
        "snr": ampf / math.sqrt(vaf),
        "mask_halfwidth": half,
    }


def _segment_amplitudes(s1, s0, dc, d0, sig):
    """Per-segment amplitude and error at a fixed profile, and which segments agree.

    Segments whose amplitude is more than 5 sigma (error and 20 % of the median added in
    quadrature) from the median of the significant ones are outliers: an unmasked star or
    galaxy on the line.
    """
    nseg = s1.shape[0]
    amps = np.zeros(nseg)
    errs = np.full(nseg, np.inf)
    for k in range(nseg):
        ak, vk, _, _ = _lin_fit(s1[k], s0[k], dc, d0, sig)
        if np.isfinite(vk) and vk > 0:
            amps[k], errs[k] = ak, math.sqrt(vk)
    fin = np.isfinite(errs)
    keep = fin.copy()
    sig = fin & (amps > 3.0 * errs)
    if sig.sum() >= 3:
        med = float(np.median(amps[sig]))
        # only too-bright segments are outliers: a trail may end (amplitude 0) in the image
        keep = fin & (amps - med < 5.0 * np.sqrt(errs**2 + (0.2 * med) ** 2))
    return amps, errs, keep


def _fit_robust(s1, s0, dc, sig_bounds, d0_range):
    """Profile fit on the sum over segments, refitted without outlier segments."""
    fit = _fit_profile(s1.sum(0), s0.sum(0), dc, sig_bounds, d0_range)
    if s1.shape[0] >= 3:
        _, _, keep = _segment_amplitudes(s1, s0, dc, fit[0], fit[1])
        if keep.any() and not keep.all():
            fit = _fit_profile(s1[keep].sum(0), s0[keep].sum(0), dc, sig_bounds, d0_range)
    return fit


def _collapse_fit(image, w, cth, sth, rho, dmax, dstep, t0, sl, nseg, sig_bounds, d0_range, prev):
    """Collapse and fit; then again without the pixels far from the fitted (or ``prev``) model.

    ``prev`` is ``(amp, c, d0, sig)`` in this line's frame, or None.
    """
    if prev is None:
        s1, s0 = _collapse(image, w, cth, sth, rho, dmax, dstep, t0, sl, nseg)
        nd = s1.shape[1]
        dc = -dmax + (np.arange(nd) + 0.5) * dstep
        d0, sig, amp, _, c = _fit_robust(s1, s0, dc, sig_bounds, d0_range)
        prev = (max(amp, 0.0), c, d0, sig)
    s1, s0 = _collapse(image, w, cth, sth, rho, dmax, dstep, t0, sl, nseg, prev[0], prev[1], prev[2], prev[3], _KCLIP)
    nd = s1.shape[1]
    dc = -dmax + (np.arange(nd) + 0.5) * dstep
    return s1, s0, dc, _fit_robust(s1, s0, dc, sig_bounds, d0_range)


def _longest_run(on, finite):
    """Longest run of True in ``on`` allowing single False gaps; (k0, k1) or None."""
    best = None
    n = on.size
    k = 0
    while k < n:
        if not on[k]:
            k += 1
            continue
        j = k
        while True:
            if j + 1 < n and on[j + 1]:
                j += 1
            elif j + 2 < n and on[j + 2]:
                j += 2
            else:
                break
        if best is None or (j - k) > (best[1] - best[0]):
            best = (k, j)
        k = j + 1
    return best


def _refine_ends(
    image, w, cth, sth, rho, dmax, dstep, dc, sig, ta, tb, t_start, t_end, sl, at_start, at_end, seg_nsigma, prev
):
    """Move the end points of a run to the last quarter segment with signal."""
    q = sl / 4.0
    if at_start:
        t_start = ta
    else:
        lo = max(ta, t_start - sl)
        n = max(1, round((t_start + sl - lo) / q))
        s1, s0 = _collapse(image, w, cth, sth, rho, dmax, dstep, lo, (t_start + sl - lo) / n, n, *prev, _KCLIP)  # type: ignore[call-arg]
        for k in range(n):
            ak, vk, _, _ = _lin_fit(s1[k], s0[k], dc, 0.0, sig)
            if vk > 0 and np.isfinite(vk) and ak > 0.5 * seg_nsigma * math.sqrt(vk):
                t_start = lo + k * (t_start + sl - lo) / n
                break
    if at_end:
        t_end = tb
    else:
        hi = min(tb, t_end + sl)
        lo = t_end - sl
        n = max(1, round((hi - lo) / q))
        s1, s0 = _collapse(image, w, cth, sth, rho, dmax, dstep, lo, (hi - lo) / n, n, *prev, _KCLIP)  # type: ignore[call-arg]
        for k in range(n - 1, -1, -1):
            ak, vk, _, _ = _lin_fit(s1[k], s0[k], dc, 0.0, sig)
            if vk > 0 and np.isfinite(vk) and ak > 0.5 * seg_nsigma * math.sqrt(vk):
                t_end = lo + (k + 1) * (hi - lo) / n
                break
    return t_start, t_end


@numba.njit(nogil=True, cache=True)
def _median_noise_kernel(variance, w, cth, sth, rho, t0, t1, out):
    ny, nx = variance.shape
    n = 0
    rows = abs(cth) >= abs(sth)
    nouter = ny if rows else nx
    cu = sth if rows else cth
    cv = cth if rows else sth
    ninner = nx if rows else ny
    for u in range(nouter):
        v = int(round((rho - u * cu) / cv))
        if v < 0 or v >= ninner:
            continue
        if rows:
            y = u
            x = v
        else:
            x = u
            y = v
        t = -x * sth + y * cth
        if t < t0 or t > t1 or w[y, x] <= 0.0:
            continue
        out[n] = variance[y, x]
        n += 1
    return n


def _median_noise(variance, w, cth, sth, rho, t0, t1):
    out = np.empty(max(variance.shape) + 1, np.float64)
    n = _median_noise_kernel(variance, w, cth, sth, rho, t0, t1, out)
    if n == 0:
        return math.nan
    return float(math.sqrt(np.median(out[:n])))
