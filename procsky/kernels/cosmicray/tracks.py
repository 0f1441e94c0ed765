"""Faint cosmic-ray tracks: detections explained by a line sharper than the PSF (:func:`find_cr_tracks`).

A grazing cosmic ray too faint per pixel for L.A.Cosmic (:mod:`.lacosmic`) and for the
pixel-sharpness test of :mod:`.sharp` is recognised by its shape as a whole: within each
detection's window a bank of line-segment templates is fitted against the PSF.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from .._bits import BAD, NO_DATA, SAT, bit
from ..measure import psf_fit_arrays
from .window import _window

__all__ = ["TrackResult", "find_cr_tracks"]


class TrackResult(NamedTuple):
    """Output of :func:`find_cr_tracks`.

    Attributes
    ----------
    is_cr : ndarray (n,) bool
        The detection is a cosmic-ray track: a line sharper than the PSF explains it and no
        significant PSF-shaped signal is left beside it.
    on_star : ndarray (n,) bool
        A track crosses this bright detection (which keeps its row).
    cr_pixels : ndarray (ny, nx) bool
        The track pixels of those detections (within 0.8 px of the fitted line segment).
    gain_line, gain_psf, gain_broad : ndarray (n,) float
        Chi^2 drop over a plane of the best sharp line segment, of the PSF and of the best
        line segment as wide as the PSF (NaN where not tested; on a bright detection the
        lines' drops are over the PSF + plane fit, -1 where not computed).
    nu_psf : ndarray (n,) float
        PSF significance left in the joint fit PSF + line + plane.
    theta : ndarray (n,) float
        Position angle of the best line, radians from +x.
    repair : ndarray (ny, nx) float32
        On ``cr_pixels``: the plane and PSF parts of the joint fit there.
    """

    is_cr: np.ndarray
    on_star: np.ndarray
    cr_pixels: np.ndarray
    gain_line: np.ndarray
    gain_psf: np.ndarray
    gain_broad: np.ndarray
    nu_psf: np.ndarray
    theta: np.ndarray
    repair: np.ndarray


@numba.njit(nogil=True, cache=True)
def _plane_projection(d, w, use, h):
    """Weighted plane fit ``b0 + b1 dx + b2 dy``: inverse normal matrix and residuals."""
    G = np.zeros((3, 3))
    r = np.zeros(3)
    s = 2 * h + 1
    for j in range(s):
        for i in range(s):
            if use[j, i]:
                f0, f1, f2 = 1.0, i - h, j - h
                ww = w[j, i]
                G[0, 0] += ww
                G[0, 1] += ww * f1
                G[0, 2] += ww * f2
                G[1, 1] += ww * f1 * f1
                G[1, 2] += ww * f1 * f2
                G[2, 2] += ww * f2 * f2
                r[0] += ww * d[j, i] * f0
                r[1] += ww * d[j, i] * f1
                r[2] += ww * d[j, i] * f2
    G[1, 0] = G[0, 1]
    G[2, 0] = G[0, 2]
    G[2, 1] = G[1, 2]
    Gi = np.linalg.inv(G)
    b = Gi @ r
    return Gi, b


@numba.njit(nogil=True, cache=True)
def _quad(a, Gi, b):
    """``a^T Gi b`` for 3-vectors (plane projections)."""
    return (
        a[0] * (Gi[0, 0] * b[0] + Gi[0, 1] * b[1] + Gi[0, 2] * b[2])
        + a[1] * (Gi[1, 0] * b[0] + Gi[1, 1] * b[1] + Gi[1, 2] * b[2])
        + a[2] * (Gi[2, 0] * b[0] + Gi[2, 1] * b[1] + Gi[2, 2] * b[2])
    )


@numba.njit(nogil=True, cache=True)
def _projected_gain(m, dres, w, use, h, Gi):
    """For a template ``m``: (sum w m dres, sum w m_perp^2, plane coefficients of m), where
    ``m_perp`` is ``m`` minus its weighted plane fit and ``dres`` the data minus theirs."""
    s = 2 * h + 1
    md = 0.0
    mm = 0.0
    q = np.zeros(3)
    for j in range(s):
        for i in range(s):
            if use[j, i] and m[j, i] != 0.0:
                ww = w[j, i] * m[j, i]
                md += ww * dres[j, i]
                mm += ww * m[j, i]
                q[0] += ww
                q[1] += ww * (i - h)
                q[2] += ww * (j - h)
    return md, mm - _quad(q, Gi, q), q


@numba.njit(nogil=True, cache=True)
def _bank_nonzeros(bank):
    """The non-zero pixels of each template of a bank, in row order: template ``t`` has rows
    ``jj[start[t]:start[t + 1]]``, columns ``ii[...]`` and values ``val[...]`` (a sharp line
    segment covers ~10 % of the window)."""
    n, s, _ = bank.shape
    start = np.zeros(n + 1, dtype=np.int64)
    for t in range(n):
        c = 0
        for j in range(s):
            for i in range(s):
                if bank[t, j, i] != 0.0:
                    c += 1
        start[t + 1] = start[t] + c
    jj = np.empty(start[n], dtype=np.int64)
    ii = np.empty(start[n], dtype=np.int64)
    val = np.empty(start[n])
    for t in range(n):
        c = start[t]
        for j in range(s):
            for i in range(s):
                if bank[t, j, i] != 0.0:
                    jj[c] = j
                    ii[c] = i
                    val[c] = bank[t, j, i]
                    c += 1
    return start, jj, ii, val


@numba.njit(nogil=True, cache=True)
def _projected_gain_sparse(start, jj, ii, val, t, dres, w, use, h, Gi):
    """``(md, mm)`` of :func:`_projected_gain` for template ``t`` of a bank given by its non-zero
    pixels (:func:`_bank_nonzeros`): the same sums over the same pixels in the same order."""
    md = 0.0
    mm = 0.0
    q0 = 0.0
    q1 = 0.0
    q2 = 0.0
    for c in range(start[t], start[t + 1]):
        j = jj[c]
        i = ii[c]
        if use[j, i]:
            mv = val[c]
            ww = w[j, i] * mv
            md += ww * dres[j, i]
            mm += ww * mv
            q0 += ww
            q1 += ww * (i - h)
            q2 += ww * (j - h)
    quad = (
        q0 * (Gi[0, 0] * q0 + Gi[0, 1] * q1 + Gi[0, 2] * q2)
        + q1 * (Gi[1, 0] * q0 + Gi[1, 1] * q1 + Gi[1, 2] * q2)
        + q2 * (Gi[2, 0] * q0 + Gi[2, 1] * q1 + Gi[2, 2] * q2)
    )
    return md, mm - quad


@numba.njit(nogil=True, cache=True)
def _line_template(m, h, c, sn, rho, t0, t1, width):
    """A line segment through the window: cross-track profile (``width`` <= 0: a triangle of
    one pixel, a rasterised track; else a Gaussian of that sigma, integral 1 across), along
    the track (coordinate ``t`` from the window centre) 1 for ``t0 <= t <= t1``, tapering
    to 0 over one more pixel."""
    s = 2 * h + 1
    for j in range(s):
        for i in range(s):
            x = i - h
            y = j - h
            t = x * c + y * sn
            dp = -x * sn + y * c - rho
            out = t0 - t if t < t0 else (t - t1 if t > t1 else 0.0)
            along = max(0.0, 1.0 - out)
            if along == 0.0:
                m[j, i] = 0.0
                continue
            if width <= 0.0:
                m[j, i] = along * max(0.0, 1.0 - abs(dp))
            else:
                m[j, i] = along * math.exp(-0.5 * (dp / width) ** 2) / (math.sqrt(2.0 * math.pi) * width)


@numba.njit(nogil=True, cache=True)
def _line_bank(h, psf_sigma, n_theta, rho_max, half_lengths):
    """The line segments every detection is tested with (they depend on the window only):
    sharp and PSF-wide templates and their (angle, offset, half-length)."""
    n_rho = int(2 * rho_max / 0.5) + 1
    n = n_theta * n_rho * half_lengths.size
    s = 2 * h + 1
    sharp = np.empty((n, s, s))
    broad = np.empty((n, s, s))
    par = np.empty((n, 3))
    t = 0
    for it in range(n_theta):
        th = math.pi * it / n_theta
        c = math.cos(th)
        sn = math.sin(th)
        for ir in range(n_rho):
            rho = -rho_max + 0.5 * ir
            for il in range(half_lengths.size):
                L = half_lengths[il]
                _line_template(sharp[t], h, c, sn, rho, -L, L, 0.0)
                _line_template(broad[t], h, c, sn, rho, -L, L, psf_sigma)
                par[t, 0] = th
                par[t, 1] = rho
                par[t, 2] = L
                t += 1
    return sharp, broad, par


@numba.njit(nogil=True, cache=True)
def _star_gain(m, dres, dres2, w, use, h, Gi, p_perp, pp):
    """For a template ``m`` beside a star: its chi^2 numerator against the residual of the
    PSF + plane fit (``dres2``), its norm with the plane and the PSF projected out, and the
    plane-only projections the joint fit needs: (md2, mm2, md, mm, q, mp)."""
    s = 2 * h + 1
    md2 = 0.0
    md = 0.0
    mm = 0.0
    mp = 0.0
    q = np.zeros(3)
    for j in range(s):
        for i in range(s):
            if use[j, i] and m[j, i] != 0.0:
                ww = w[j, i] * m[j, i]
                md2 += ww * dres2[j, i]
                md += ww * dres[j, i]
                mm += ww * m[j, i]
                mp += ww * p_perp[j, i]
                q[0] += ww
                q[1] += ww * (i - h)
                q[2] += ww * (j - h)
    mm -= _quad(q, Gi, q)
    return md2, mm - mp * mp / pp, md, mm, q, mp


@numba.njit(nogil=True, cache=True)
def _star_gain_sparse(start, jj, ii, val, t, dres2, w, use, h, Gi, p_perp, pp):
    """``(md2, mm2)`` of :func:`_star_gain` for template ``t`` of a bank given by its non-zero
    pixels (:func:`_bank_nonzeros`): the same sums over the same pixels in the same order."""
    md2 = 0.0
    mm = 0.0
    mp = 0.0
    q0 = 0.0
    q1 = 0.0
    q2 = 0.0
    for c in range(start[t], start[t + 1]):
        j = jj[c]
        i = ii[c]
        if use[j, i]:
            mv = val[c]
            ww = w[j, i] * mv
            md2 += ww * dres2[j, i]
            mm += ww * mv
            mp += ww * p_perp[j, i]
            q0 += ww
            q1 += ww * (i - h)
            q2 += ww * (j - h)
    mm -= (
        q0 * (Gi[0, 0] * q0 + Gi[0, 1] * q1 + Gi[0, 2] * q2)
        + q1 * (Gi[1, 0] * q0 + Gi[1, 1] * q1 + Gi[1, 2] * q2)
        + q2 * (Gi[2, 0] * q0 + Gi[2, 1] * q1 + Gi[2, 2] * q2)
    )
    return md2, mm - mp * mp / pp


@numba.njit(nogil=True, cache=True)
def _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi):
    """Joint fit ``a P + c L + plane`` from the plane-projected sums of the PSF ``P`` and a
    line ``L`` (``*d``: against the data, ``pp, ll, pl``: norms and cross term, ``q*``: their
    plane sums; ``b``: the plane fitted to the data alone). Returns (ok, a, c, sigma_a,
    plane coefficients of the joint fit)."""
    det = pp * ll - pl * pl
    e = np.zeros(3)
    if not det > 0.0:
        return False, 0.0, 0.0, 0.0, e
    a = (ll * pd - pl * ld) / det
    c = (pp * ld - pl * pd) / det
    for r in range(3):
        e[r] = b[r] - (
            Gi[r, 0] * (a * qp[0] + c * ql[0]) + Gi[r, 1] * (a * qp[1] + c * ql[1]) + Gi[r, 2] * (a * qp[2] + c * ql[2])
        )
    return True, a, c, math.sqrt(ll / det), e


@numba.njit(nogil=True, cache=True)
def _track_on_star(d, w0, p, use, h, a0, model_error, sharp_nz, broad_nz, par, star_gain, best, flag, rep):
    """A track across a bright star: the sharp line fitted to the residual of the star's PSF
    + plane fit, against noise plus ``model_error`` of the model (value), and compared with a
    PSF-wide line (a model error is as wide as the PSF). Fills ``flag`` and ``rep`` (the
    joint fit's PSF + plane) and returns (gain_sharp, gain_broad) or gains < 0 when untested."""
    s = 2 * h + 1
    w = np.zeros((s, s))
    for j in range(s):
        for i in range(s):
            flag[j, i] = False
            if use[j, i]:
                w[j, i] = 1.0 / (1.0 / w0[j, i] + (model_error * a0 * p[j, i]) ** 2)
    dres = np.empty((s, s))
    Gi, b, pd, pp, qp = _plane_psf_sums(d, w, use, p, h, dres)
    if not (pp > 0.0 and pd > 0.0):
        return -1.0, -1.0
    a = pd / pp
    cp = Gi @ qp
    p_perp = np.empty((s, s))
    dres2 = np.empty((s, s))
    for j in range(s):
        for i in range(s):
            p_perp[j, i] = p[j, i] - cp[0] - cp[1] * (i - h) - cp[2] * (j - h)
            dres2[j, i] = dres[j, i] - a * p_perp[j, i]
    m = np.empty((s, s))
    g_sharp = 0.0
    g_broad = 0.0
    th_b = 0.0
    rho_b = 0.0
    l_b = 0.0
    for kind in range(2):
        start, jj, ii, val = sharp_nz if kind == 0 else broad_nz
        for t in range(par.shape[0]):
            md2, mm2 = _star_gain_sparse(start, jj, ii, val, t, dres2, w, use, h, Gi, p_perp, pp)
            if not (mm2 > 0.0 and md2 > 0.0):
                continue
            g = md2 * md2 / mm2
            if kind == 0 and g > g_sharp:
                g_sharp = g
                th_b = par[t, 0]
                rho_b = par[t, 1]
                l_b = par[t, 2]
            elif kind == 1 and g > g_broad:
                g_broad = g
        if kind == 0 and g_sharp < star_gain:
            return g_sharp, -1.0
    if not (g_sharp - g_broad >= star_gain):
        return g_sharp, g_broad
    # the extent of the track along the best line, then the joint fit a P + c L + plane
    t0b, t1b, g_ext = -l_b, l_b, 0.0
    for t0 in range(-h, 1):
        for t1 in range(h + 1):
            _line_template(m, h, math.cos(th_b), math.sin(th_b), rho_b, float(t0), float(t1), 0.0)
            md2, mm2, _, _, _, _ = _star_gain(m, dres, dres2, w, use, h, Gi, p_perp, pp)
            if mm2 > 0.0 and md2 > 0.0 and md2 * md2 / mm2 > g_ext:
                g_ext = md2 * md2 / mm2
                t0b, t1b = float(t0), float(t1)
    _line_template(best, h, math.cos(th_b), math.sin(th_b), rho_b, t0b, t1b, 0.0)
    md2, mm2, ld, ll, ql, pl = _star_gain(best, dres, dres2, w, use, h, Gi, p_perp, pp)
    ok, aj, _, _, e = _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi)
    if not ok:
        return g_sharp, g_broad
    for j in range(s):
        for i in range(s):
            if use[j, i] and best[j, i] >= 0.2:
                flag[j, i] = True
                rep[j, i] = aj * p[j, i] + e[0] + e[1] * (i - h) + e[2] * (j - h)
    return g_sharp, g_broad


@numba.njit(nogil=True, cache=True)
def _plane_psf_sums(d, w, use, p, h, dres):
    """Weighted plane of a window (``Gi``, ``b``), the plane-subtracted data ``dres`` (filled)
    and the PSF's projected sums ``pd, pp, qp`` (:func:`_projected_gain`)."""
    s = 2 * h + 1
    Gi, b = _plane_projection(d, w, use, h)
    for j in range(s):
        for i in range(s):
            dres[j, i] = d[j, i] - b[0] - b[1] * (i - h) - b[2] * (j - h)
    pd, pp, qp = _projected_gain(p, dres, w, use, h, Gi)
    return Gi, b, pd, pp, qp


@numba.njit(nogil=True, cache=True)
def _window_psf_gain(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, use, w, dres):
    """Gather a detection's window (:func:`_window`), its weights ``w``, the weighted plane
    ``b`` (with ``Gi``) and the plane-subtracted data ``dres``; return those with the PSF's
    projected sums ``pd, pp, qp`` (:func:`_projected_gain`) and the number of usable pixels.
    With fewer than half the window usable nothing is fitted and ``pp = 0``."""
    s = 2 * h + 1
    npix = _window(image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, use)
    for j in range(s):
        for i in range(s):
            w[j, i] = 1.0 / v[j, i] if use[j, i] else 0.0
    if npix < s * s // 2:
        return npix, np.zeros((3, 3)), np.zeros(3), 0.0, 0.0, np.zeros(3)
    Gi, b, pd, pp, qp = _plane_psf_sums(d, w, use, p, h, dres)
    return npix, Gi, b, pd, pp, qp


@numba.njit(nogil=True, cache=True)
def _track_kernel(
    image,
    variance,
    mask,
    xs,
    ys,
    stamps,
    skip,
    h,
    bad_bits,
    sharp_bank,
    broad_bank,
    par,
    nu_max,
    min_gain,
    min_total,
    nu_keep,
    star_gain,
    model_error,
    crpix,
    repair,
    out,
    raw,
    raw_bits,
):
    ny, nx = image.shape
    s = 2 * h + 1
    d = np.empty((s, s))
    v = np.empty((s, s))
    w = np.empty((s, s))
    p = np.empty((s, s))
    use = np.zeros((s, s), dtype=np.bool_)
    dres = np.empty((s, s))
    m = np.empty((s, s))
    best = np.empty((s, s))
    flag = np.zeros((s, s), dtype=np.bool_)
    rep = np.zeros((s, s))
    wr = np.empty((s, s))
    user = np.zeros((s, s), dtype=np.bool_)
    dresr = np.empty((s, s))
    sharp_nz = _bank_nonzeros(sharp_bank)
    broad_nz = _bank_nonzeros(broad_bank)
    for k in range(xs.size):
        if skip[k] or not (np.isfinite(xs[k]) and np.isfinite(ys[k])):
            continue
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        npix, Gi, b, pd, pp, qp = _window_psf_gain(
            image, variance, mask, stamps, k, ix, iy, h, bad_bits, d, v, p, use, w, dres
        )
        if not pp > 0.0:
            continue
        gain_psf = pd * pd / pp if pd > 0 else 0.0
        if pd / math.sqrt(pp) > nu_max:
            # a star cut by the image edge has a sharp residual along it: not tested
            if not star_gain > 0.0 or iy - h < 0 or iy + h >= ny or ix - h < 0 or ix + h >= nx:
                continue
            gs, gb = _track_on_star(
                d, w, p, use, h, pd / pp, model_error, sharp_nz, broad_nz, par, star_gain, best, flag, rep
            )
            out[k, 0] = gs
            out[k, 1] = gain_psf
            out[k, 2] = gb
            for j in range(s):
                for i in range(s):
                    if flag[j, i]:
                        crpix[iy + j - h, ix + i - h] = True
                        repair[iy + j - h, ix + i - h] = rep[j, i]
                        out[k, 5] = 2.0
            continue
        # the line search (lw, luse, ldres, lGi); the joint fit below (is a PSF-shaped source
        # left?) keeps the pixels not flagged yet (w, use, dres, Gi, b, pd, pp, qp)
        lw, luse, ldres, lGi = w, use, dres, Gi
        if raw_bits != 0:
            # pixels flagged earlier (raw_bits) take their values before the repair, so that a
            # track partly flagged by L.A.Cosmic is found whole
            _, lGi, _, lpd, lpp, _ = _window_psf_gain(
                raw, variance, mask, stamps, k, ix, iy, h, bad_bits & ~raw_bits, d, v, p, user, wr, dresr
            )
            if not lpp > 0.0:
                continue
            lw, luse, ldres = wr, user, dresr
            gain_psf = lpd * lpd / lpp if lpd > 0 else 0.0
        # best sharp line segment; only if it beats the PSF, the best PSF-wide one
        g_best = 0.0
        th_best = 0.0
        rho_best = 0.0
        l_best = 0.0
        for kind in range(2):
            g_kind = 0.0
            start, jj, ii, val = sharp_nz if kind == 0 else broad_nz
            for t in range(par.shape[0]):
                md, mp = _projected_gain_sparse(start, jj, ii, val, t, ldres, lw, luse, h, lGi)
                if not (mp > 0.0 and md > 0.0):
                    continue
                g = md * md / mp
                if g > g_kind:
                    g_kind = g
                    if kind == 0:
                        th_best = par[t, 0]
                        rho_best = par[t, 1]
                        l_best = par[t, 2]
            if kind == 0:
                g_best = g_kind
                out[k, 0] = g_best
                out[k, 1] = gain_psf
                out[k, 4] = th_best
                if g_best - gain_psf < min_gain:
                    break
            else:
                out[k, 2] = g_kind
        if not (
            g_best - gain_psf >= min_gain
            and g_best - out[k, 2] >= min_gain
            and 2.0 * g_best - gain_psf - out[k, 2] >= min_total
        ):
            continue
        # the extent of the track along the best line
        t0b, t1b, g_ext = -l_best, l_best, 0.0
        for t0 in range(-h, 1):
            for t1 in range(h + 1):
                _line_template(m, h, math.cos(th_best), math.sin(th_best), rho_best, float(t0), float(t1), 0.0)
                md, mp, _ = _projected_gain(m, ldres, lw, luse, h, lGi)
                if mp > 0.0 and md > 0.0 and md * md / mp > g_ext:
                    g_ext = md * md / mp
                    t0b, t1b = float(t0), float(t1)
        # joint fit a P + c L + plane on the pixels not flagged before: is a PSF-shaped
        # source left beside the line? (a bright hit that L.A.Cosmic flagged would leave a
        # misfit of the rasterised line that drags the PSF amplitude of a galaxy beside it)
        _line_template(best, h, math.cos(th_best), math.sin(th_best), rho_best, t0b, t1b, 0.0)
        ld, ll, ql = _projected_gain(best, dres, w, use, h, Gi)
        if raw_bits != 0 and ll > 0.0:
            # found with the flagged pixels' raw values, the line must also explain the pixels
            # not flagged about as well as the PSF does: a faint source beside a flagged hit
            # (the hit alone makes a strong line) is left to the PSF there
            g_line_x = ld * ld / ll if ld > 0.0 else 0.0
            g_psf_x = pd * pd / pp if pd > 0.0 else 0.0
            if g_line_x < g_psf_x - min_gain:
                continue
        pl = 0.0
        for j in range(s):
            for i in range(s):
                if use[j, i]:
                    pl += w[j, i] * p[j, i] * best[j, i]
        pl -= _quad(ql, Gi, qp)
        ok, a, _, sa, e = _joint_fit(pd, pp, qp, ld, ll, ql, pl, b, Gi)
        if not ok:
            continue
        nu_a = a / sa
        out[k, 3] = nu_a
        if nu_a >= nu_keep:
            continue
        out[k, 5] = 1.0
        # plane + PSF part of the joint fit, for the repair (usable pixels are inside the image)
        for j in range(s):
            for i in range(s):
                if best[j, i] >= 0.2 and use[j, i]:
                    crpix[iy + j - h, ix + i - h] = True
                    repair[iy + j - h, ix + i - h] = max(a, 0.0) * p[j, i] + e[0] + e[1] * (i - h) + e[2] * (j - h)


def find_cr_tracks(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    psf_stamps: np.ndarray,
    psf_sigma: float,
    *,
    skip: np.ndarray | None = None,
    half_width: int = 7,
    bad_bits: int = bit(BAD) | bit(SAT) | bit(NO_DATA),
    n_theta: int = 36,
    rho_max: float = 2.0,
    half_lengths: tuple[float, ...] = (2.0, 4.0, 7.0),
    nu_max: float = 30.0,
    min_gain: float = 12.0,
    min_total: float = 28.0,
    nu_keep: float = 5.0,
    star_gain: float = 25.0,
    model_error: float = 0.02,
    raw: np.ndarray | None = None,
    raw_bits: int = 0,
) -> TrackResult:
    """Find detections that are faint cosmic-ray tracks: lines sharper than the PSF.

    A grazing cosmic ray deposits a few hundred electrons along a rasterised line of 5-30
    pixels, 1-4 sigma per pixel: too faint per pixel for L.A.Cosmic and, once the PSF-fit
    test of :func:`find_sharp_sources` asks for single pixels sharper than the PSF, too faint
    for that too, while the detection's matched filter adds the whole track into a 5-10 sigma
    "source". Such a track is recognised by its shape as a whole (the idea of the streak
    finders, e.g. Hough-transform trail detection, applied within one detection's window).
    Over a ``(2 h + 1)^2`` window around each detection, with a weighted plane for the local
    background and neighbours' wings:

    1. the chi^2 drop of the PSF (``gain_psf``) is compared with that of the best line
       segment one pixel wide (``gain_line``; ``n_theta`` angles, offsets up to ``rho_max``
       from the centroid in 0.5-pixel steps, the half-lengths given), and with the best line
       segment whose cross-section is the PSF's Gaussian (``gain_broad``, e.g. an edge-on
       galaxy or a trail);
    2. the detection is a track when the sharp line beats both by ``min_gain`` and by
       ``min_total`` summed (chi^2 units). For a point source the best line gains about a
       third of the PSF's chi^2 drop plus the best of the trials on noise, and a real
       elongated source is as wide as the PSF across, so real objects stay near or below
       the default margins while tracks without a source under them exceed them by far;
    3. a joint fit ``a PSF + c line + plane`` leaves ``a / sigma_a < nu_keep`` (the detection
       threshold): nothing PSF-shaped is under the track.

    On a detection brighter than ``nu_max`` (PSF significance: a star, which keeps its row)
    the lines are fitted to the residual of its PSF + plane fit, with the noise plus
    ``model_error`` times the model, and a sharp line that gains ``star_gain`` over the
    residual and over the best PSF-wide line (a model error is as wide as the PSF) is a
    track across the star: ``on_star``, its pixels flagged and repaired with the joint
    PSF + line + plane fit (``star_gain=0`` leaves bright detections alone). The default
    ``star_gain`` sits above what the model error of a bright star without a hit reaches
    over the residual and over the wide line, and below what a track of a few thousand
    counts across it gives. A star cut by the image edge is not tested (the cut is a sharp
    edge). Pixels already flagged should be in ``bad_bits`` (their repaired values are not data). With ``raw``
    the faint-branch test sees the pixels of ``raw_bits`` (the earlier CR flags) with their
    values before the repair: a track that L.A.Cosmic flagged in part (its bright pixels)
    is found whole, where its unflagged faint pixels alone, plus the noise, can pass for a
    faint source. The joint fit (step 3) still uses only the pixels not flagged before:
    with a bright flagged hit in it, the rasterised line's misfit drags the PSF amplitude
    of a galaxy next to the hit below ``nu_keep``. And on those pixels the line must
    explain the data within ``min_gain`` of the PSF: a short flagged hit a few pixels from
    a real faint star makes a strong line in the raw values, and without this condition
    the star could be dropped. Pixels flagged before are not returned in ``cr_pixels``.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float
        Background-subtracted image and variance, counts and counts^2.
    mask : ndarray (ny, nx) uint32 or None
    x, y : array (n,)
        Centroids of the detections, pixels.
    psf_stamps : ndarray (n, S, S)
        PSF model at each centroid (sum 1).
    psf_sigma : float
        Gaussian sigma of the PSF, pixels (the width of the broad line).
    skip : array (n,) bool, optional
        Detections not to test.
    half_width : int
        Window half width, pixels.
    n_theta, rho_max, half_lengths, nu_max, min_gain, min_total, nu_keep, star_gain, model_error
        See above.
    raw : ndarray (ny, nx) float, optional
        The image before the earlier CR repairs (same background), used with ``raw_bits``.
    raw_bits : int
        Mask bits (in ``bad_bits``) whose pixels the faint-branch test takes from ``raw``.

    Returns
    -------
    TrackResult
    """
    img, var, msk, xs, ys, st = psf_fit_arrays(image, variance, mask, x, y, psf_stamps, "psf_stamps")
    h = int(half_width)
    if h < 3:
        raise ValueError(f"half_width must be >= 3 pixels, got {h}")
    if not psf_sigma > 0:
        raise ValueError(f"psf_sigma must be > 0 pixels, got {psf_sigma}")
    sk = np.zeros(xs.size, bool) if skip is None else np.asarray(skip, bool)
    crpix = np.zeros(img.shape, dtype=np.bool_)
    # float32 like the image the values go into (the same values once stored there), half the memory
    repair = np.full(img.shape, np.nan, dtype=np.float32)
    out = np.full((xs.size, 6), np.nan)
    out[:, 5] = 0.0
    sharp_bank, broad_bank, par = _line_bank(
        h, float(psf_sigma), int(n_theta), float(rho_max), np.asarray(half_lengths, dtype=np.float64)
    )
    if raw is None or not raw_bits:
        rw, rb = img, 0
    else:
        rw = np.asarray(raw, dtype=img.dtype)
        if rw.shape != img.shape:
            raise ValueError(f"raw shape {rw.shape} differs from image shape {img.shape}")
        rb = int(raw_bits)
    _track_kernel(
        img,
        var,
        msk,
        xs,
        ys,
        st,
        sk,
        h,
        np.uint32(bad_bits),
        sharp_bank,
        broad_bank,
        par,
        float(nu_max),
        float(min_gain),
        float(min_total),
        float(nu_keep),
        float(star_gain),
        float(model_error),
        crpix,
        repair,
        out,
        rw,
        np.uint32(rb),
    )
    return TrackResult(
        is_cr=out[:, 5] == 1.0,
        on_star=out[:, 5] == 2.0,
        cr_pixels=crpix,
        gain_line=out[:, 0],
        gain_psf=out[:, 1],
        gain_broad=out[:, 2],
        nu_psf=out[:, 3],
        theta=out[:, 4],
        repair=repair,
    )
