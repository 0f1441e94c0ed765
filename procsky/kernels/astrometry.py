"""Astrometric matching and TAN-SIP fitting; photometric zero point.

* **Gnomonic projection** (:func:`tan_project`, :func:`tan_deproject`): sky <-> intermediate
  world coordinates (xi, eta) about a tangent point (Calabretta & Greisen 2002).
* **Matching** (:func:`match_sources`): detected sources against reference stars already
  projected to pixels by an approximate WCS that may be off by a few hundred pixels and
  rotated by up to a degree or two. The offset is found by 2-D histogram voting of all
  source-reference pair offsets (the pattern-free "offset voting" used by e.g.
  astrometry pipelines before triangle matching; robust when the rotation is small), on a
  grid of trial rotations fine enough that a rotation error moves no star by more than
  half a vote bin. The winner seeds an iterative mutual-nearest-neighbour match with an
  affine transform refitted at each step and a shrinking radius.
* **TAN-SIP fit** (:func:`fit_tan_sip`): linear least squares of (xi, eta) as polynomials
  in pixel offsets from CRPIX; the constant terms move the tangent point (CRVAL), the linear
  ones are the CD matrix and the higher ones become the SIP A/B coefficients
  (``(xi, eta) = CD (u + f(u, v), v + g(u, v))``; Shupe et al. 2005). Outliers are clipped
  and the inverse AP/BP polynomials are fitted on a grid.
* **Zero point** (:func:`photometric_zero_point`): clipped median of ``m_ref - m_inst``.

These work on catalogues (small arrays): plain numpy/scipy, plus one numba kernel for the
O(N_src x N_ref) vote.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

__all__ = [
    "tan_project",
    "tan_deproject",
    "MatchResult",
    "match_sources",
    "TanSipSolution",
    "fit_tan_sip",
    "tan_sip_position_error",
    "sip_pixel_to_sky",
    "sip_sky_to_pixel",
    "photometric_zero_point",
]


# ----------------------------------------------------------------------- projection
def tan_project(ra, dec, ra0, dec0):
    """Gnomonic projection of (ra, dec) about the tangent point (ra0, dec0).

    Parameters
    ----------
    ra, dec : array, degrees
    ra0, dec0 : float, degrees

    Returns
    -------
    xi, eta : ndarray, degrees
        Standard coordinates (xi towards +RA/east, eta towards +Dec/north).
    """
    ra = np.radians(np.asarray(ra, float))
    dec = np.radians(np.asarray(dec, float))
    a0 = np.radians(ra0)
    d0 = np.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def tan_deproject(xi, eta, ra0, dec0):
    """Inverse of :func:`tan_project`.

    Parameters
    ----------
    xi, eta : array, degrees
    ra0, dec0 : float, degrees

    Returns
    -------
    ra, dec : ndarray, degrees (ra in [0, 360))
    """
    x = np.radians(np.asarray(xi, float))
    y = np.radians(np.asarray(eta, float))
    a0 = np.radians(ra0)
    d0 = np.radians(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    rho_safe = np.where(rho > 0, rho, 1.0)
    dec = np.arcsin(np.clip(np.cos(c) * np.sin(d0) + y * np.sin(c) * np.cos(d0) / rho_safe, -1.0, 1.0))
    ra = a0 + np.arctan2(x * np.sin(c), rho * np.cos(d0) * np.cos(c) - y * np.sin(d0) * np.sin(c))
    return np.degrees(ra) % 360.0, np.degrees(dec)


# ----------------------------------------------------------------------- matching
class MatchResult(NamedTuple):
    """Output of :func:`match_sources`.

    Attributes
    ----------
    src_index, ref_index : ndarray (m,) int64
        Matched pairs (indices into the input lists).
    separation : ndarray (m,) float64, pixels
        Distance after the final affine transform.
    affine : ndarray (2, 3) float64
        Maps reference pixel positions onto source positions:
        ``[x_s, y_s] = affine[:, :2] @ [x_r, y_r] + affine[:, 2]``.
    rotation : float, degrees
        Rotation found by the vote.
    offset : (float, float), pixels
        Offset found by the vote (source - rotated reference).
    n_votes : int
        Votes of the winning offset bin (a confidence measure).
    ok : bool
        False when the vote was not significant or too few pairs matched; ``message`` says why.
    message : str
    """

    src_index: np.ndarray
    ref_index: np.ndarray
    separation: np.ndarray
    affine: np.ndarray
    rotation: float
    offset: tuple
    n_votes: int
    ok: bool
    message: str


@numba.njit(nogil=True, cache=True)
def _vote(sx, sy, rx, ry, max_offset, bin_size):
    nb = int(np.ceil(2.0 * max_offset / bin_size)) + 1
    hist = np.zeros((nb, nb), dtype=np.int32)
    for i in range(sx.size):
        for j in range(rx.size):
            dx = sx[i] - rx[j] + max_offset
            dy = sy[i] - ry[j] + max_offset
            if dx < 0 or dy < 0:
                continue
            bx = int(dx / bin_size)
            by = int(dy / bin_size)
            if bx >= nb or by >= nb:
                continue
            hist[by, bx] += 1
    # best 2x2 block (a true offset may straddle bin edges)
    best = -1
    bby = 0
    bbx = 0
    for by in range(nb - 1):
        for bx in range(nb - 1):
            c = hist[by, bx] + hist[by + 1, bx] + hist[by, bx + 1] + hist[by + 1, bx + 1]
            if c > best:
                best = c
                bby = by
                bbx = bx
    # centroid of the votes in the 2x2 block
    s = 0.0
    cx = 0.0
    cy = 0.0
    for by in range(bby, bby + 2):
        for bx in range(bbx, bbx + 2):
            h = hist[by, bx]
            s += h
            cx += h * ((bx + 0.5) * bin_size - max_offset)
            cy += h * ((by + 0.5) * bin_size - max_offset)
    if s > 0:
        cx /= s
        cy /= s
    return best, cx, cy


def _fit_affine(xr, yr, xs, ys):
    a = np.column_stack([xr, yr, np.ones_like(xr)])
    cx, *_ = np.linalg.lstsq(a, xs, rcond=None)
    cy, *_ = np.linalg.lstsq(a, ys, rcond=None)
    return np.vstack([cx, cy])


def _apply_affine(aff, x, y):
    return aff[0, 0] * x + aff[0, 1] * y + aff[0, 2], aff[1, 0] * x + aff[1, 1] * y + aff[1, 2]


def _mutual_nn(sx, sy, tx, ty, radius):
    from scipy.spatial import cKDTree

    ts = cKDTree(np.column_stack([sx, sy]))
    tr = cKDTree(np.column_stack([tx, ty]))
    d1, i1 = ts.query(np.column_stack([tx, ty]), distance_upper_bound=radius)  # ref -> src
    d2, i2 = tr.query(np.column_stack([sx, sy]), distance_upper_bound=radius)  # src -> ref
    refs = np.flatnonzero(np.isfinite(d1))
    srcs = i1[refs]
    mutual = i2[srcs] == refs
    return srcs[mutual], refs[mutual], d1[refs][mutual]


def match_sources(
    src_x,
    src_y,
    ref_x,
    ref_y,
    *,
    src_flux=None,
    ref_mag=None,
    max_offset=250.0,
    max_rotation=1.5,
    bin_size=3.0,
    n_bright=250,
    match_radius=1.5,
    min_matches=6,
    center=None,
    poly_order=3,
):
    """Match sources to reference stars under an unknown offset and small rotation.

    Parameters
    ----------
    src_x, src_y : array, pixels
        Detected sources.
    ref_x, ref_y : array, pixels
        Reference stars projected with the approximate WCS.
    src_flux : array, counts, optional
        Used to vote with the ``n_bright`` brightest sources.
    ref_mag : array, mag, optional
        Used to vote with the ``n_bright`` brightest reference stars.
    max_offset : float, pixels
        Largest offset searched (|dx|, |dy|).
    max_rotation : float, degrees
        Largest rotation searched (both signs).
    bin_size : float, pixels
        Vote bin size; also sets the rotation step.
    n_bright : int
    match_radius : float, pixels
        Final matching radius.
    min_matches : int
        Fewer matched pairs make ``ok`` False.
    center : (float, float), pixels, optional
        Rotation centre (default: centre of the reference positions' bounding box).
    poly_order : int
        After the affine match, the pairs are refined with a polynomial map of this order
        (optical distortion; < 2 disables). ``separation`` is then measured after that map.

    Returns
    -------
    MatchResult
    """
    sx = np.asarray(src_x, float)
    sy = np.asarray(src_y, float)
    rx = np.asarray(ref_x, float)
    ry = np.asarray(ref_y, float)
    empty = np.zeros(0, np.int64)
    if sx.size < min_matches or rx.size < min_matches:
        return MatchResult(
            empty,
            empty,
            np.zeros(0),
            np.eye(2, 3),
            0.0,
            (0.0, 0.0),
            0,
            False,
            f"too few stars to match: {sx.size} sources, {rx.size} reference stars (need >= {min_matches} of each)",
        )
    isrc = np.arange(sx.size) if src_flux is None else np.argsort(-np.asarray(src_flux, float))
    iref = np.arange(rx.size) if ref_mag is None else np.argsort(np.asarray(ref_mag, float))
    isrc = isrc[:n_bright]
    iref = iref[:n_bright]
    if center is None:
        center = (0.5 * (rx.min() + rx.max()), 0.5 * (ry.min() + ry.max()))
    cx, cy = center
    rmax = max(np.hypot(rx[iref] - cx, ry[iref] - cy).max(), 1.0)
    step = np.degrees(0.5 * bin_size / rmax)
    nrot = int(np.ceil(max_rotation / step)) if max_rotation > 0 else 0
    best = (-1, 0.0, 0.0, 0.0)
    bsx = np.ascontiguousarray(sx[isrc])
    bsy = np.ascontiguousarray(sy[isrc])
    for k in range(-nrot, nrot + 1):
        th = np.radians(k * step)
        c, s = np.cos(th), np.sin(th)
        x0 = rx[iref] - cx
        y0 = ry[iref] - cy
        trx = np.ascontiguousarray(c * x0 - s * y0 + cx)
        tr_y = np.ascontiguousarray(s * x0 + c * y0 + cy)
        votes, dx, dy = _vote(bsx, bsy, trx, tr_y, float(max_offset), float(bin_size))
        if votes > best[0]:
            best = (int(votes), k * step, dx, dy)
    votes, rot, dx, dy = best
    th = np.radians(rot)
    c, s = np.cos(th), np.sin(th)
    aff = np.array([[c, -s, cx - c * cx + s * cy + dx], [s, c, cy - s * cx - c * cy + dy]])
    radius = max(2.0 * bin_size, match_radius)
    si = ri = empty
    d = np.zeros(0)
    for _it in range(8):
        tx, ty = _apply_affine(aff, rx, ry)
        si, ri, d = _mutual_nn(sx, sy, tx, ty, radius)
        if si.size < 3:
            break
        aff = _fit_affine(rx[ri], ry[ri], sx[si], sy[si])
        radius = max(match_radius, 0.6 * radius)
    tx, ty = _apply_affine(aff, rx, ry)
    si, ri, d = _mutual_nn(sx, sy, tx, ty, match_radius)
    # optical distortion is not affine: refine with a polynomial map once enough pairs exist
    for _ in range(3):
        nt = (poly_order + 1) * (poly_order + 2) // 2
        if poly_order < 2 or si.size < 3 * nt:
            break
        sc = max(rmax, 1.0)
        des, _t = _poly_design((rx[ri] - cx) / sc, (ry[ri] - cy) / sc, poly_order)
        px_, *_ = np.linalg.lstsq(des, sx[si], rcond=None)
        py_, *_ = np.linalg.lstsq(des, sy[si], rcond=None)
        full, _t = _poly_design((rx - cx) / sc, (ry - cy) / sc, poly_order)
        si, ri, d = _mutual_nn(sx, sy, full @ px_, full @ py_, match_radius)
    ok = si.size >= min_matches and votes >= 4
    msg = (
        ""
        if ok
        else (
            f"match failed: {si.size} pairs within {match_radius} px (need {min_matches}), best vote {votes}; "
            "increase max_offset/max_rotation or check the approximate WCS and reference catalogue"
        )
    )
    return MatchResult(
        si.astype(np.int64), ri.astype(np.int64), d, aff, float(rot), (float(dx), float(dy)), int(votes), bool(ok), msg
    )


# ----------------------------------------------------------------------- TAN-SIP
class TanSipSolution(NamedTuple):
    """A fitted TAN-SIP WCS as plain arrays.

    Attributes
    ----------
    crval : ndarray (2,), degrees
    crpix : ndarray (2,), pixels, 0-based (FITS CRPIX = crpix + 1)
    cd : ndarray (2, 2), degrees / pixel
    a, b : ndarray (order + 1, order + 1)
        SIP forward coefficients, ``a[p, q]`` multiplies ``u^p v^q`` (FITS ``A_p_q``);
        only terms with ``2 <= p + q <= order`` are non-zero.
    ap, bp : ndarray (inv_order + 1, inv_order + 1)
        SIP inverse coefficients (FITS ``AP_p_q``, ``BP_p_q``).
    order, inv_order : int
    rms : float, arcsec
        RMS of the residuals of the stars used (both axes together, per axis
        ``rms / sqrt(2)``).
    rms_x, rms_y : float, arcsec
        Robust (MAD) scatter of the residuals along xi and eta.
    n_used : int
    used : ndarray (n,) bool
    residual_xi, residual_eta : ndarray (n,), arcsec
        Reference minus fit for every input star.
    fit_scale : float, pixels
        Normalisation of the pixel offsets in the design of the fit (``fit_tan_sip(scale=)``).
    cov_xi, cov_eta : ndarray (nterm, nterm), arcsec^2, or None
        Covariance of the xi and eta polynomial coefficients (in the normalised design basis),
        for :func:`tan_sip_position_error`.
    """

    crval: np.ndarray
    crpix: np.ndarray
    cd: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ap: np.ndarray
    bp: np.ndarray
    order: int
    inv_order: int
    rms: float
    rms_x: float
    rms_y: float
    n_used: int
    used: np.ndarray
    residual_xi: np.ndarray
    residual_eta: np.ndarray
    fit_scale: float = 1000.0
    cov_xi: np.ndarray | None = None
    cov_eta: np.ndarray | None = None

    def to_fits_cards(self):
        """FITS WCS keywords (dict) for ``astropy.wcs.WCS(header)`` / ``procsky.wcs``."""
        h = {
            "WCSAXES": 2,
            "CTYPE1": "RA---TAN-SIP",
            "CTYPE2": "DEC--TAN-SIP",
            "CUNIT1": "deg",
            "CUNIT2": "deg",
            "CRVAL1": float(self.crval[0]),
            "CRVAL2": float(self.crval[1]),
            "CRPIX1": float(self.crpix[0] + 1.0),
            "CRPIX2": float(self.crpix[1] + 1.0),
            "CD1_1": float(self.cd[0, 0]),
            "CD1_2": float(self.cd[0, 1]),
            "CD2_1": float(self.cd[1, 0]),
            "CD2_2": float(self.cd[1, 1]),
            "A_ORDER": int(self.order),
            "B_ORDER": int(self.order),
            "AP_ORDER": int(self.inv_order),
            "BP_ORDER": int(self.inv_order),
        }
        for name, arr, order, lo in (
            ("A", self.a, self.order, 2),
            ("B", self.b, self.order, 2),
            ("AP", self.ap, self.inv_order, 0),
            ("BP", self.bp, self.inv_order, 0),
        ):
            for p in range(order + 1):
                for q in range(order + 1 - p):
                    if p + q >= lo and arr[p, q] != 0.0:
                        h[f"{name}_{p}_{q}"] = float(arr[p, q])
        return h


def _poly_design(u, v, order, min_degree=0):
    cols = []
    terms = []
    for d in range(min_degree, order + 1):
        for q in range(d + 1):
            p = d - q
            cols.append(u**p * v**q)
            terms.append((p, q))
    return np.column_stack(cols), terms


def _eval_sip(coef, u, v):
    out = np.zeros_like(u, dtype=float)
    n = coef.shape[0]
    for p in range(n):
        for q in range(n - p):
            if coef[p, q] != 0.0:
                out += coef[p, q] * u**p * v**q
    return out


def sip_pixel_to_sky(sol, x, y):
    """Pixel (0-based) to (ra, dec) degrees with a :class:`TanSipSolution`."""
    u = np.asarray(x, float) - sol.crpix[0]
    v = np.asarray(y, float) - sol.crpix[1]
    uu = u + _eval_sip(sol.a, u, v)
    vv = v + _eval_sip(sol.b, u, v)
    xi = sol.cd[0, 0] * uu + sol.cd[0, 1] * vv
    eta = sol.cd[1, 0] * uu + sol.cd[1, 1] * vv
    return tan_deproject(xi, eta, sol.crval[0], sol.crval[1])


def sip_sky_to_pixel(sol, ra, dec, n_iter=20):
    """(ra, dec) degrees to 0-based pixels: AP/BP start, then Newton on the forward model."""
    xi, eta = tan_project(ra, dec, sol.crval[0], sol.crval[1])
    cdi = np.linalg.inv(sol.cd)
    uu = cdi[0, 0] * xi + cdi[0, 1] * eta
    vv = cdi[1, 0] * xi + cdi[1, 1] * eta
    u = uu + _eval_sip(sol.ap, uu, vv)
    v = vv + _eval_sip(sol.bp, uu, vv)
    n = sol.a.shape[0]
    for _ in range(n_iter):
        fu = u + _eval_sip(sol.a, u, v) - uu
        fv = v + _eval_sip(sol.b, u, v) - vv
        # Jacobian of (u + f, v + g)
        j11 = np.ones_like(u)
        j12 = np.zeros_like(u)
        j21 = np.zeros_like(u)
        j22 = np.ones_like(u)
        for p in range(n):
            for q in range(n - p):
                if sol.a[p, q] != 0.0:
                    if p > 0:
                        j11 = j11 + sol.a[p, q] * p * u ** (p - 1) * v**q
                    if q > 0:
                        j12 = j12 + sol.a[p, q] * q * u**p * v ** (q - 1)
                if sol.b[p, q] != 0.0:
                    if p > 0:
                        j21 = j21 + sol.b[p, q] * p * u ** (p - 1) * v**q
                    if q > 0:
                        j22 = j22 + sol.b[p, q] * q * u**p * v ** (q - 1)
        det = j11 * j22 - j12 * j21
        du = (j22 * fu - j12 * fv) / det
        dv = (-j21 * fu + j11 * fv) / det
        u = u - du
        v = v - dv
        if np.nanmax(np.abs(du) + np.abs(dv), initial=0.0) < 1e-10:
            break
    return u + sol.crpix[0], v + sol.crpix[1]


def fit_tan_sip(
    x,
    y,
    ra,
    dec,
    *,
    crpix,
    crval,
    order=3,
    inv_order=None,
    n_iter=5,
    clip=3.0,
    weights=None,
    shape=None,
    scale=1000.0,
):
    """Fit a TAN-SIP WCS to matched pixel and reference positions.

    Parameters
    ----------
    x, y : array (n,), pixels, 0-based
        Measured positions of the matched sources.
    ra, dec : array (n,), degrees
        Reference positions (at the epoch of the observation).
    crpix : (float, float), pixels, 0-based
        Reference pixel (kept fixed; the detector centre is a good choice).
    crval : (float, float), degrees
        First guess of the sky position of ``crpix`` (refined).
    order : int
        SIP order (1 = pure linear TAN; 2-3 typical; 4-5 for strongly distorted cameras).
    inv_order : int, optional
        Order of the inverse AP/BP polynomials (default ``order + 1``).
    n_iter : int
        Refit iterations (tangent-point update and sigma clipping).
    clip : float
        Residuals beyond ``clip`` robust sigmas are rejected (0 disables).
    weights : array (n,), optional
        Statistical weights (1 / sigma^2 of the positions).
    shape : (int, int), optional
        Detector shape (ny, nx) for the inverse fit grid (default the span of the data).
    scale : float, pixels
        Normalisation of the pixel offsets in the design matrix (conditioning only).

    Returns
    -------
    TanSipSolution

    Raises
    ------
    ValueError
        Fewer stars than free parameters (the caller turns this into ``AlgorithmError``).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    n = x.size
    nterm = (order + 1) * (order + 2) // 2
    if n < nterm + 2:
        raise ValueError(
            f"{n} matched stars cannot constrain a TAN-SIP fit of order {order} ({nterm} terms per axis); "
            "lower the order or match more reference stars"
        )
    w = np.ones(n) if weights is None else np.asarray(weights, float)
    crpix = np.asarray(crpix, float)
    crval = np.array(crval, float)
    u = (x - crpix[0]) / scale
    v = (y - crpix[1]) / scale
    used = np.ones(n, bool)
    design, terms = _poly_design(u, v, order)

    def solve(sel, xi, eta):  # weighted least squares of both axes on the stars ``sel``
        sw = np.sqrt(w[sel])
        dw = design[sel] * sw[:, None]
        return (np.linalg.lstsq(dw, xi[sel] * sw, rcond=None)[0], np.linalg.lstsq(dw, eta[sel] * sw, rcond=None)[0])

    for _it in range(max(2, n_iter)):
        xi, eta = tan_project(ra, dec, crval[0], crval[1])
        cxi, ceta = solve(used, xi, eta)
        # move the tangent point so that crpix maps to (0, 0) and refit
        crval = np.array(tan_deproject(cxi[0], ceta[0], crval[0], crval[1]), float).ravel()
        xi, eta = tan_project(ra, dec, crval[0], crval[1])
        cxi, ceta = solve(used, xi, eta)
        fit_used = used.copy()
        rxi = (xi - design @ cxi) * 3600.0
        reta = (eta - design @ ceta) * 3600.0
        if clip and clip > 0:
            # per-axis robust sigma (MAD) of the stars in use; MAD-based clipping is stable
            # under iteration (it does not shrink a Gaussian core step after step)
            sx = 1.4826 * np.median(np.abs(rxi[used] - np.median(rxi[used])))
            sy = 1.4826 * np.median(np.abs(reta[used] - np.median(reta[used])))
            new = (np.abs(rxi) < clip * max(sx, 1e-4)) & (np.abs(reta) < clip * max(sy, 1e-4))
            if (new == used).all():
                break
            if new.sum() >= nterm + 2:
                used = new
    if not np.array_equal(fit_used, used):
        # the last pass changed the stars in use: the coefficients, residuals and covariance
        # below must all come from one set
        cxi, ceta = solve(used, xi, eta)
    # final coefficients in pixel units; constant terms are now ~0 (absorbed in crval)
    cxi_pix = np.array([c / scale ** (p + q) for c, (p, q) in zip(cxi, terms)])
    ceta_pix = np.array([c / scale ** (p + q) for c, (p, q) in zip(ceta, terms)])
    idx = {t: i for i, t in enumerate(terms)}
    cd = np.array([[cxi_pix[idx[(1, 0)]], cxi_pix[idx[(0, 1)]]], [ceta_pix[idx[(1, 0)]], ceta_pix[idx[(0, 1)]]]])
    cdi = np.linalg.inv(cd)
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for (p, q), i in idx.items():
        if p + q >= 2:
            a[p, q] = cdi[0, 0] * cxi_pix[i] + cdi[0, 1] * ceta_pix[i]
            b[p, q] = cdi[1, 0] * cxi_pix[i] + cdi[1, 1] * ceta_pix[i]
    # residual constant offset (tiny after the crval update) folded into crval once more
    crval = np.array(tan_deproject(cxi_pix[idx[(0, 0)]], ceta_pix[idx[(0, 0)]], crval[0], crval[1]), float).ravel()
    # inverse polynomials on a grid covering the detector
    inv_order = order + 1 if inv_order is None else int(inv_order)
    if shape is not None:
        gx = np.linspace(0, shape[1] - 1, 40)
        gy = np.linspace(0, shape[0] - 1, 40)
    else:
        gx = np.linspace(x.min(), x.max(), 40)
        gy = np.linspace(y.min(), y.max(), 40)
    gxx, gyy = np.meshgrid(gx, gy)
    gu = gxx.ravel() - crpix[0]
    gv = gyy.ravel() - crpix[1]
    uu = gu + _eval_sip(a, gu, gv)
    vv = gv + _eval_sip(b, gu, gv)
    dinv, iterms = _poly_design(uu / scale, vv / scale, inv_order)
    cap, *_ = np.linalg.lstsq(dinv, gu - uu, rcond=None)
    cbp, *_ = np.linalg.lstsq(dinv, gv - vv, rcond=None)
    ap = np.zeros((inv_order + 1, inv_order + 1))
    bp = np.zeros((inv_order + 1, inv_order + 1))
    for c1, c2, (p, q) in zip(cap, cbp, iterms):
        ap[p, q] = c1 / scale ** (p + q)
        bp[p, q] = c2 / scale ** (p + q)
    sol = TanSipSolution(
        crval=crval,
        crpix=crpix,
        cd=cd,
        a=a,
        b=b,
        ap=ap,
        bp=bp,
        order=int(order),
        inv_order=inv_order,
        rms=np.nan,
        rms_x=np.nan,
        rms_y=np.nan,
        n_used=int(used.sum()),
        used=used,
        residual_xi=np.zeros(n),
        residual_eta=np.zeros(n),
    )
    fra, fdec = sip_pixel_to_sky(sol, x, y)
    rxi = ((ra - fra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec)) * 3600.0
    reta = (dec - fdec) * 3600.0
    rms = float(np.sqrt(np.mean(rxi[used] ** 2 + reta[used] ** 2)))
    mad = lambda r: float(1.4826 * np.median(np.abs(r - np.median(r))))  # noqa: E731
    d = design[used] * np.sqrt(w[used])[:, None]
    return sol._replace(
        rms=rms,
        rms_x=mad(rxi[used]),
        rms_y=mad(reta[used]),
        residual_xi=rxi,
        residual_eta=reta,
        fit_scale=float(scale),
        cov_xi=_sandwich_cov(d, rxi[used] * np.sqrt(w[used])),
        cov_eta=_sandwich_cov(d, reta[used] * np.sqrt(w[used])),
    )


def _sandwich_cov(d, r):
    """Heteroscedasticity-consistent covariance of least-squares coefficients (HC1; White 1980,
    Econometrica 48, 817; MacKinnon & White 1985): ``n/(n-p) B D^T diag(r^2) D B`` with
    ``B = (D^T D)^-1``, from the design ``d`` (n, p) and residuals ``r`` of the stars used.

    Each star's residual estimates its own noise (centroid and reference position), so faint
    and bright stars in one unweighted fit are handled without an error model."""
    n, p = d.shape
    if n <= p:
        return None
    b = np.linalg.pinv(d.T @ d)
    meat = (d * (r * r)[:, None]).T @ d
    return (n / (n - p)) * (b @ meat @ b)


def tan_sip_position_error(sol: TanSipSolution, x, y):
    """The fitted WCS's own 1-sigma error at pixel positions, from the fit's covariance.

    Parameters
    ----------
    sol : TanSipSolution
        From :func:`fit_tan_sip` (``cov_xi``/``cov_eta`` set).
    x, y : array, pixels, 0-based
        Positions in the frame the solution was fitted in.

    Returns
    -------
    err_xi, err_eta : ndarray, arcsec
        Along the tangent-plane axes (xi along RA cos(dec), eta along Dec); NaN when the fit
        had no covariance (as many stars as terms).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if sol.cov_xi is None or sol.cov_eta is None:
        nan = np.full(x.shape, np.nan)
        return nan, nan.copy()
    d, _ = _poly_design(
        (x.ravel() - sol.crpix[0]) / sol.fit_scale, (y.ravel() - sol.crpix[1]) / sol.fit_scale, sol.order
    )
    exi = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, sol.cov_xi, d), 0.0)).reshape(x.shape)
    eeta = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, sol.cov_eta, d), 0.0)).reshape(x.shape)
    return exi, eeta


# ----------------------------------------------------------------------- zero point
def photometric_zero_point(ref_mag, inst_mag, *, ref_err=None, inst_err=None, nsigma=3.0, max_iter=10):
    """Clipped-median photometric zero point ``ZP = median(m_ref - m_inst)``.

    Parameters
    ----------
    ref_mag : array (n,), mag (AB)
    inst_mag : array (n,), mag
        ``-2.5 log10(flux / counts)``.
    ref_err, inst_err : array (n,), mag, optional
        Errors; stars with non-finite errors are dropped (not used as weights: the median is
        robust, and catalogue errors are often underestimated).
    nsigma : float
        Clip half-width in MAD sigmas.
    max_iter : int

    Returns
    -------
    zp : float, mag
    zp_err : float, mag
        ``1.2533 sigma / sqrt(n)`` (error of a median), sigma the clipped MAD scatter.
    n_used : int
    used : ndarray (n,) bool

    Raises
    ------
    ValueError
        No usable star (the caller turns this into ``AlgorithmError``).
    """
    d = np.asarray(ref_mag, float) - np.asarray(inst_mag, float)
    used = np.isfinite(d)
    for e in (ref_err, inst_err):
        if e is not None:
            used &= np.isfinite(np.asarray(e, float))
    if not used.any():
        raise ValueError("no star has finite reference and instrumental magnitudes; cannot fit a zero point")
    zp = float(np.median(d[used]))
    sig = 0.0
    for _ in range(max_iter):
        sig = 1.4826 * float(np.median(np.abs(d[used] - zp)))
        if sig <= 0:
            break
        new = np.isfinite(d) & (np.abs(d - zp) <= nsigma * sig)
        for e in (ref_err, inst_err):
            if e is not None:
                new &= np.isfinite(np.asarray(e, float))
        if new.sum() == 0 or (new == used).all():
            break
        used = new
        zp = float(np.median(d[used]))
    n = int(used.sum())
    err = 1.2533 * sig / np.sqrt(n) if n > 1 else np.nan
    return zp, float(err), n, used
