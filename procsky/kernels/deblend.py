"""Multiband deblending of one blend: an SED x morphology model fitted by proximal gradients.

The model follows scarlet (Melchior et al. 2018, Astronomy & Computing 24, 129, sections
2-3) and the way scarlet_lite documents its fit: the blend's pixels in band ``b`` are

    M_b = K_b * sum_k A[k, b] S[k]

with ``A[k]`` the SED of source ``k`` (one non-negative amplitude per band) and ``S[k]``
its morphology (a non-negative image, monotonically non-increasing outward from the
source's peak, optionally symmetric about it). Morphologies live in a *model frame* with
its own narrow PSF (chosen by the stage); ``K_b`` is the difference kernel from that PSF
to band ``b``'s (skipped for a band whose PSF is the model frame's). The loss is the
inverse-variance weighted least squares
``L = 1/2 sum_b sum_pix W_b (M_b - Y_b)^2``.

The fit alternates two blocks, every SED and then every morphology, each a proximal
gradient step (Combettes & Wajs 2005) with the step ``1 / Lipschitz constant`` of its
block's gradient, accelerated as in FISTA (Beck & Teboulle 2009) with a momentum reset
whenever the loss rises (O'Donoghue & Candes 2015, adaptive restart). The Lipschitz
constants are bounded from above (Gershgorin bound of the Gram matrices, ``max W``, the
kernel's ``(sum |K|)^2``), so the steps adapt to the current amplitudes: a bright source
takes small morphology steps and large SED steps.

The proximal operators (of the indicator functions of the constraint sets, as in scarlet):

* SED: clip at zero;
* morphology: an L1 shrink (scarlet's sparsity penalty; its strength ``sparsity`` is in
  units of the per-pixel noise of the morphology's gradient, ``sqrt(sum_b A_kb^2 w_b)``,
  so pixels the data do not support go to zero instead of forming low plateaus that take
  a neighbour's light), clip at zero, zero outside the parent footprint, optionally symmetrise
  about the peak (the smaller of each pair of mirrored pixels, a projection onto
  symmetric images that never adds flux), then monotonicity: pixels taken in order of
  increasing distance from the peak, each is capped by the weighted mean of its
  8-connected neighbours that are closer to the peak, weighted by how well the step to that
  neighbour points at the peak (the "weighted" monotonicity of Melchior et al. 2018,
  sec. 3.2, written here from the paper's description).

Initialisation (:func:`init_compact`, the default of the stage): every source a point
source of the model frame at its peak, SEDs by a joint non-negative least-squares fit;
or (:func:`init_blend`) the monotonic part of the detection image about each peak.

Flux re-distribution (scarlet's "flux conservation"): after the fit each child's pixels
are ``Y_b * model_k,b / sum_j model_j,b``; pixels of the footprint where every model is zero
go to the nearest peak, so the children sum exactly to the parent's pixels.

Everything here works on numpy arrays of one blend (bbox-sized); the stage
(:mod:`procsky.objects.deblend`) cuts the blends, times them and builds the catalogue.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "blend_loss",
    "convolve_same",
    "correlate_same",
    "fit_blend",
    "init_blend",
    "init_compact",
    "monotonic_order",
    "prox_monotonic",
    "redistribute_flux",
    "separable_factors",
    "source_boxes",
]


# ----------------------------------------------------------------------------- convolution
@numba.njit(nogil=True, cache=True)
def convolve_same(img, kern, out):
    """``out = kern * img`` (convolution, same size, zero outside ``img``); odd square kernel."""
    ny, nx = img.shape
    m = kern.shape[0]
    r = m // 2
    for y in range(ny):
        # kernel rows i with 0 <= y - (i - r) < ny, columns j with 0 <= x - (j - r) < nx
        i0 = max(0, y + r - ny + 1)
        i1 = min(m, y + r + 1)
        for x in range(nx):
            j0 = max(0, x + r - nx + 1)
            j1 = min(m, x + r + 1)
            s = 0.0
            for i in range(i0, i1):
                yy = y + r - i
                for j in range(j0, j1):
                    s += kern[i, j] * img[yy, x + r - j]
            out[y, x] = s


@numba.njit(nogil=True, cache=True)
def correlate_same(img, kern, out):
    """The adjoint of :func:`convolve_same`: ``out[y, x] = sum K[i, j] img[y + i - r, x + j - r]``."""
    ny, nx = img.shape
    m = kern.shape[0]
    r = m // 2
    for y in range(ny):
        i0 = max(0, r - y)
        i1 = min(m, ny - y + r)
        for x in range(nx):
            j0 = max(0, r - x)
            j1 = min(m, nx - x + r)
            s = 0.0
            for i in range(i0, i1):
                yy = y + i - r
                for j in range(j0, j1):
                    s += kern[i, j] * img[yy, x + j - r]
            out[y, x] = s


def separable_factors(kernels, tol=1e-3):
    """Low-rank separable factors of square kernels: ``K_b ~= sum_t u[b, t] v[b, t]^T``.

    From the SVD of each kernel, keeping the fewest terms whose left-out singular values
    hold less than ``tol`` of the kernel's Frobenius norm (a round PSF difference kernel
    needs 2-4 terms), so a convolution costs ``2 m`` instead of ``m^2`` operations per
    pixel and term. Returns ``(u (B, R, m), v (B, R, m), rank (B,) int64)``, zero-padded.
    """
    B, m = kernels.shape[0], kernels.shape[1]
    us, vs, ranks = [], [], np.zeros(B, np.int64)
    for b in range(B):
        U, sv, Vt = np.linalg.svd(kernels[b])
        tail = np.sqrt(np.cumsum((sv**2)[::-1])[::-1])  # tail[t] = norm of terms t, t+1, ...
        r = int(np.searchsorted(-np.append(tail, 0.0), -tol * tail[0]))
        r = max(1, min(r, m))
        us.append(U[:, :r] * sv[:r])
        vs.append(Vt[:r])
        ranks[b] = r
    R = int(ranks.max())
    u = np.zeros((B, R, m))
    v = np.zeros((B, R, m))
    for b in range(B):
        u[b, : ranks[b]] = us[b].T
        v[b, : ranks[b]] = vs[b]
    return u, v, ranks


@numba.njit(nogil=True, cache=True)
def _convolve_sep(img, u, v, rank, out, tmp, mask, adjoint):
    """Convolution (``adjoint``: correlation) with ``sum_t u_t v_t^T`` evaluated only where
    ``mask`` (zero elsewhere); ``tmp`` a work array of ``img``'s shape."""
    ny, nx = img.shape
    m = u.shape[1]
    r = m // 2
    sgn = 1 if adjoint else -1
    out[:, :] = 0.0
    # the x pass is needed only within r rows of a wanted output in the same column
    lo = np.full(nx, ny, np.int64)
    hi = np.full(nx, -1, np.int64)
    for y in range(ny):
        for x in range(nx):
            if mask[y, x]:
                lo[x] = min(lo[x], y)
                hi[x] = max(hi[x], y)
    for t in range(rank):
        # along x: tmp[y, x] = sum_j v[j] img[y, x + sgn (j - r)]
        for y in range(ny):
            for x in range(nx):
                if y < lo[x] - r or y > hi[x] + r:
                    continue
                acc = 0.0
                for j in range(m):
                    xx = x + sgn * (j - r)
                    if 0 <= xx < nx:
                        acc += v[t, j] * img[y, xx]
                tmp[y, x] = acc
        # along y, only where the output is wanted
        for y in range(ny):
            for x in range(nx):
                if not mask[y, x]:
                    continue
                acc = 0.0
                for i in range(m):
                    yy = y + sgn * (i - r)
                    if 0 <= yy < ny:
                        acc += u[t, i] * tmp[yy, x]
                out[y, x] += acc


# ------------------------------------------------------------------------------- proximal ops
@numba.njit(nogil=True, cache=True)
def monotonic_order(shape_y, shape_x, py, px):
    """Flat pixel indices of a ``(shape_y, shape_x)`` box sorted by distance from ``(py, px)``."""
    n = shape_y * shape_x
    d = np.empty(n)
    for y in range(shape_y):
        for x in range(shape_x):
            d[y * shape_x + x] = (y - py) ** 2 + (x - px) ** 2
    return np.argsort(d, kind="mergesort").astype(np.int64)


@numba.njit(nogil=True, cache=True)
def prox_monotonic(s, order, py, px):
    """Make ``s`` non-increasing outward from ``(py, px)``, in place.

    Pixels in ``order`` (increasing distance from the peak); each pixel is capped by the
    weighted mean of its 8-neighbours strictly closer to the peak, weights the cosine
    between the step to the neighbour and the direction to the peak (Melchior et al. 2018,
    sec. 3.2). The peak pixel itself is unconstrained."""
    ny, nx = s.shape
    for n in range(1, order.size):
        p = order[n]
        y = p // nx
        x = p - y * nx
        dy0 = py - y
        dx0 = px - x
        d0 = math.sqrt(dy0 * dy0 + dx0 * dx0)
        r2 = dy0 * dy0 + dx0 * dx0
        num = 0.0
        den = 0.0
        for oy in range(-1, 2):
            for ox in range(-1, 2):
                if oy == 0 and ox == 0:
                    continue
                yy = y + oy
                xx = x + ox
                if yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                    continue
                if (yy - py) ** 2 + (xx - px) ** 2 >= r2:
                    continue
                c = (oy * dy0 + ox * dx0) / (d0 * math.sqrt(oy * oy + ox * ox))
                if c <= 0.0:
                    continue
                num += c * s[yy, xx]
                den += c
        if den > 0.0:
            ref = num / den
            if s[y, x] > ref:
                s[y, x] = ref


@numba.njit(nogil=True, cache=True)
def _prox_symmetric(s, py, px):
    """Each pair of pixels mirrored through the peak takes the smaller of the two (in place);
    pixels whose mirror falls outside the box are left alone."""
    ny, nx = s.shape
    for y in range(ny):
        for x in range(nx):
            my = 2 * py - y
            mx = 2 * px - x
            if my < 0 or my >= ny or mx < 0 or mx >= nx:
                continue
            if my * nx + mx <= y * nx + x:
                continue
            v = min(s[y, x], s[my, mx])
            s[y, x] = v
            s[my, mx] = v


@numba.njit(nogil=True, cache=True)
def _prox_morph(s, footprint, order, py, px, monotonic, symmetric):
    ny, nx = s.shape
    for y in range(ny):
        for x in range(nx):
            if not footprint[y, x] or s[y, x] < 0.0:
                s[y, x] = 0.0
    if symmetric:
        _prox_symmetric(s, py, px)
    if monotonic:
        prox_monotonic(s, order, py, px)


# ------------------------------------------------------------------------------- the model
@numba.njit(nogil=True, cache=True)
def _render(A, S, boxes, kernels, convolve, footprint, model, tmp):
    """``model[b] = K_b * sum_k A[k, b] S[k]`` (full kernels; used outside the fit loop)."""
    ny, nx = tmp.shape
    B = A.shape[1]
    u = np.zeros((B, 1, kernels.shape[1]))
    v = np.zeros((B, 1, kernels.shape[1]))
    rank = np.zeros(B, np.int64)
    _render_sep(A, S, boxes, kernels, u, v, rank, convolve, footprint, model, tmp, np.empty((ny, nx)), False)


@numba.njit(nogil=True, cache=True)
def _render_sep(A, S, boxes, kernels, u, v, rank, convolve, footprint, model, tmp, tmp2, separable):
    """``model[b] = K_b * sum_k A[k, b] S[k]`` on the footprint (zero elsewhere); each
    ``S[k]`` is non-zero only inside ``boxes[k]`` = (y0, y1, x0, x1); ``tmp`` a (h, w) work array."""
    K, B = A.shape
    for b in range(B):
        tmp[:, :] = 0.0
        for k in range(K):
            a = A[k, b]
            if a == 0.0:
                continue
            for y in range(boxes[k, 0], boxes[k, 1]):
                for x in range(boxes[k, 2], boxes[k, 3]):
                    tmp[y, x] += a * S[k, y, x]
        if convolve[b] and separable:
            _convolve_sep(tmp, u[b], v[b], rank[b], model[b], tmp2, footprint, False)
        elif convolve[b]:
            for y in range(tmp.shape[0]):
                for x in range(tmp.shape[1]):
                    model[b, y, x] = 0.0
            convolve_same(tmp, kernels[b], tmp2)
            for y in range(tmp.shape[0]):
                for x in range(tmp.shape[1]):
                    if footprint[y, x]:
                        model[b, y, x] = tmp2[y, x]
        else:
            model[b, :, :] = tmp


@numba.njit(nogil=True, cache=True)
def _residual_backproject(model, Y, W, u, v, rank, convolve, footprint, grad, tmp, tmp2, backproject):
    """``grad[b] = K_b^T (W_b (M_b - Y_b))``; returns the loss ``1/2 sum W (M - Y)^2``."""
    B, ny, nx = Y.shape
    loss = 0.0
    for b in range(B):
        for y in range(ny):
            for x in range(nx):
                r = model[b, y, x] - Y[b, y, x]
                wr = W[b, y, x] * r
                loss += 0.5 * wr * r
                tmp[y, x] = wr
        if not backproject:
            continue
        if convolve[b]:
            _convolve_sep(tmp, u[b], v[b], rank[b], grad[b], tmp2, footprint, True)
        else:
            grad[b, :, :] = tmp
    return loss


@numba.njit(nogil=True, cache=True)
def blend_loss(A, S, boxes, Y, W, kernels, convolve, footprint):
    """The loss ``1/2 sum_b sum_pix W_b (M_b - Y_b)^2`` of a model."""
    B, ny, nx = Y.shape
    model = np.empty((B, ny, nx))
    tmp = np.empty((ny, nx))
    grad = np.empty((B, ny, nx))
    _render(A, S, boxes, kernels, convolve, footprint, model, tmp)
    return _residual_backproject(
        model, Y, W, grad, grad, np.zeros(B, np.int64), convolve, footprint, grad, tmp, tmp, False
    )


@numba.njit(nogil=True, cache=True)
def _gershgorin(G):
    """Upper bound of the spectral norm of a symmetric matrix (largest absolute row sum)."""
    m = 0.0
    for i in range(G.shape[0]):
        s = 0.0
        for j in range(G.shape[1]):
            s += abs(G[i, j])
        m = max(m, s)
    return m


@numba.njit(nogil=True, cache=True)
def fit_blend(
    Y,
    W,
    u,
    v,
    rank,
    convolve,
    footprint,
    peaks,
    orders,
    boxes,
    A,
    S,
    state,
    n_iter,
    rel_tol,
    loss_scale,
    monotonic,
    symmetric,
    sparsity=0.0,
):
    """Run up to ``n_iter`` alternating SED / morphology proximal gradient steps, in place.

    Parameters
    ----------
    Y, W : (B, h, w) float64
        Pixels (nJy) and inverse-variance weights (0 for masked pixels and outside the
        footprint).
    u, v, rank : (B, R, m), (B, R, m), (B,)
        Separable factors of the difference kernels from the model frame to each band
        (:func:`separable_factors`; used where ``convolve[b]``).
    convolve : (B,) bool
    footprint : (h, w) bool
    peaks : (K, 2) int64
        Peak (row, column) of each source in the box.
    orders : (K, n) int64
        :func:`monotonic_order` of each peak in its box (the first ``box h * box w`` entries).
    boxes : (K, 4) int64
        (y0, y1, x0, x1) of each source's box (half-open, in the blend's box): its
        morphology is zero outside it.
    A : (K, B) float64
        SEDs, updated in place.
    S : (K, h, w) float64
        Morphologies, updated in place.
    state : (K * B + K * h * w + 4,) float64
        The FISTA memory carried between calls (previous iterates, momentum ``t`` of both
        blocks, last loss, done iterations); zeros on the first call.
    n_iter : int
    rel_tol : float
        Convergence when the loss changes by less than ``rel_tol * max(loss, loss_scale)``.
    loss_scale : float
        The loss expected from noise alone (half the number of weighted pixel values), so a
        noiseless blend converges too.
    monotonic, symmetric : bool
    sparsity : float
        L1 penalty of the morphologies in units of their gradient's per-pixel noise.

    Returns
    -------
    (loss, iterations done in this call, converged)
    """
    K, B = A.shape
    ny, nx = S.shape[1], S.shape[2]
    nA = K * B
    nS = K * ny * nx
    A_prev = state[:nA].reshape((K, B))
    S_prev = state[nA : nA + nS].reshape((K, ny, nx))
    meta = state[nA + nS :]
    if meta[0] == 0.0:
        # first call: no momentum yet
        A_prev[:, :] = A
        S_prev[:, :, :] = S
        meta[0] = 1.0  # t of the SED block
        meta[1] = 1.0  # t of the morphology block
        meta[2] = np.inf  # last loss
    model = np.empty((B, ny, nx))
    grad = np.empty((B, ny, nx))
    tmp = np.empty((ny, nx))
    tmp2 = np.empty((ny, nx))
    Ay = np.empty((K, B))
    Sy = np.zeros((K, ny, nx))
    G = np.empty((K, K))
    wmax = np.zeros(B)
    wmed = np.zeros(B)
    knorm = np.ones(B)
    for b in range(B):
        wmax[b] = W[b].max()
        # typical weight: the mean over weighted pixels
        sw = 0.0
        nw = 0
        for y in range(ny):
            for x in range(nx):
                if W[b, y, x] > 0.0:
                    sw += W[b, y, x]
                    nw += 1
        wmed[b] = sw / max(nw, 1)
        if convolve[b]:
            a = 0.0
            for i in range(u.shape[2]):
                for j in range(u.shape[2]):
                    kij = 0.0
                    for t in range(rank[b]):
                        kij += u[b, t, i] * v[b, t, j]
                    a += abs(kij)
            knorm[b] = a * a
    loss = meta[2]
    done = 0
    converged = False
    for _ in range(n_iter):
        # ---- SED block: extrapolate, gradient <K_b S_k, W_b (M_b - Y_b)> = <S_k, K_b^T R_b>
        t = meta[0]
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        for k in range(K):
            for b in range(B):
                Ay[k, b] = max(A[k, b] + beta * (A[k, b] - A_prev[k, b]), 0.0)
        _render_sep(Ay, S, boxes, u, u, v, rank, convolve, footprint, model, tmp, tmp2, True)
        _residual_backproject(model, Y, W, u, v, rank, convolve, footprint, grad, tmp, tmp2, True)
        for i in range(K):
            for j in range(i, K):
                # overlap of the two boxes only (disjoint sources do not couple)
                g = 0.0
                for y in range(max(boxes[i, 0], boxes[j, 0]), min(boxes[i, 1], boxes[j, 1])):
                    for x in range(max(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])):
                        g += S[i, y, x] * S[j, y, x]
                G[i, j] = g
                G[j, i] = g
        lip_s = _gershgorin(G)
        A_prev[:, :] = A
        for b in range(B):
            lip = wmax[b] * knorm[b] * lip_s
            if lip <= 0.0:
                continue
            for k in range(K):
                g = 0.0
                for y in range(boxes[k, 0], boxes[k, 1]):
                    for x in range(boxes[k, 2], boxes[k, 3]):
                        g += S[k, y, x] * grad[b, y, x]
                A[k, b] = max(Ay[k, b] - g / lip, 0.0)
        meta[0] = t_next
        # ---- morphology block: gradient sum_b A_kb K_b^T R_b
        t = meta[1]
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        for k in range(K):
            for y in range(boxes[k, 0], boxes[k, 1]):
                for x in range(boxes[k, 2], boxes[k, 3]):
                    Sy[k, y, x] = max(S[k, y, x] + beta * (S[k, y, x] - S_prev[k, y, x]), 0.0)
        _render_sep(A, Sy, boxes, u, u, v, rank, convolve, footprint, model, tmp, tmp2, True)
        _residual_backproject(model, Y, W, u, v, rank, convolve, footprint, grad, tmp, tmp2, True)
        for i in range(K):
            for j in range(K):
                g = 0.0
                if (
                    boxes[i, 0] < boxes[j, 1]
                    and boxes[j, 0] < boxes[i, 1]
                    and boxes[i, 2] < boxes[j, 3]
                    and boxes[j, 2] < boxes[i, 3]
                ):
                    for b in range(B):
                        g += A[i, b] * A[j, b] * wmax[b] * knorm[b]
                G[i, j] = g
        lip = _gershgorin(G)
        S_prev[:, :, :] = S
        if lip > 0.0:
            for k in range(K):
                # L1 sparsity (scarlet's sparse morphologies): a shrink by sparsity x the noise of
                # the morphology's gradient, sqrt(sum_b A_kb^2 w_b), so unsupported pixels go to 0
                lam = 0.0
                for b in range(B):
                    lam += A[k, b] * A[k, b] * wmed[b]
                shrink = sparsity * math.sqrt(lam) / lip
                y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        g = 0.0
                        for b in range(B):
                            g += A[k, b] * grad[b, y, x]
                        S[k, y, x] = Sy[k, y, x] - g / lip - shrink
                _prox_morph(
                    S[k, y0:y1, x0:x1],
                    footprint[y0:y1, x0:x1],
                    orders[k, : (y1 - y0) * (x1 - x0)],
                    peaks[k, 0] - y0,
                    peaks[k, 1] - x0,
                    monotonic,
                    symmetric,
                )
        meta[1] = t_next
        # ---- loss at the new point, restart the momentum if it rose
        _render_sep(A, S, boxes, u, u, v, rank, convolve, footprint, model, tmp, tmp2, True)
        new_loss = _residual_backproject(model, Y, W, u, v, rank, convolve, footprint, grad, tmp, tmp2, False)
        done += 1
        meta[3] += 1.0
        if new_loss > loss:
            meta[0] = 1.0
            meta[1] = 1.0
        elif abs(loss - new_loss) <= rel_tol * max(new_loss, loss_scale):
            loss = new_loss
            converged = True
            break
        loss = new_loss
    meta[2] = loss
    return loss, done, converged


# ----------------------------------------------------------------------------- init & split
def source_boxes(snr, footprint, peaks, level=1.0, margin=2, min_radius=4):
    """Each source's box: where its morphology may be non-zero (scarlet's per-source boxes).

    The box is a square about the peak holding the monotonic part of the detection image
    ``snr`` (unit noise) about that peak above ``level``, plus ``margin`` px, at least
    ``min_radius`` px, cut to the blend's box. Light of a neighbour is excluded by the
    monotonic projection (it can rise no higher than the saddle), so a faint source next to
    a bright one gets a small box. Boxes keep the cost of a fit near the sum of the sources'
    areas instead of sources x blend area, and sources whose boxes do not overlap do not
    couple in the step sizes.

    Returns (K, 4) int64 ``(y0, y1, x0, x1)``, half-open.
    """
    K = peaks.shape[0]
    ny, nx = footprint.shape
    det = np.where(footprint, np.maximum(snr, 0.0), 0.0).astype(np.float64)
    yy, xx = np.mgrid[:ny, :nx]
    boxes = np.empty((K, 4), np.int64)
    for k in range(K):
        py, px = int(peaks[k, 0]), int(peaks[k, 1])
        m = det.copy()
        prox_monotonic(m, monotonic_order(ny, nx, py, px), py, px)
        sup = m > level
        ext = int(max(np.abs(yy[sup] - py).max(), np.abs(xx[sup] - px).max())) if sup.any() else 0
        r = max(min_radius, ext + margin)
        boxes[k] = (max(0, py - r), min(ny, py + r + 1), max(0, px - r), min(nx, px + r + 1))
    return boxes


def _box_orders(peaks, boxes):
    """Monotonic orders of each peak within its box, (K, max box pixels), zero-padded."""
    K = peaks.shape[0]
    sizes = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    orders = np.zeros((K, int(sizes.max())), np.int64)
    for k in range(K):
        y0, y1, x0, x1 = (int(v) for v in boxes[k])
        orders[k, : sizes[k]] = monotonic_order(y1 - y0, x1 - x0, int(peaks[k, 0]) - y0, int(peaks[k, 1]) - x0)
    return orders


def init_blend(detection, footprint, peaks, Y, W, boxes):
    """Initial SEDs and morphologies from the detection image (scarlet's initialisation).

    Each morphology starts as the monotonic part of the (non-negative) detection image about
    its peak, inside its box; where morphologies overlap, the detection image is shared
    between them in proportion, each is scaled to a peak of 1, and the SED is the weighted
    mean of the pixels over that shared morphology (a per-source linear fit, clipped at zero).

    Returns ``(A (K, B), S (K, h, w), orders)`` (orders as :func:`fit_blend` takes them).
    """
    K = peaks.shape[0]
    B, ny, nx = Y.shape
    det = np.where(footprint, np.maximum(detection, 0.0), 0.0).astype(np.float64)
    orders = _box_orders(peaks, boxes)
    mono = np.zeros((K, ny, nx))
    for k in range(K):
        y0, y1, x0, x1 = (int(v) for v in boxes[k])
        sub = det[y0:y1, x0:x1].copy()
        prox_monotonic(sub, orders[k, : sub.size], int(peaks[k, 0]) - y0, int(peaks[k, 1]) - x0)
        mono[k, y0:y1, x0:x1] = sub
    tot = mono.sum(axis=0)
    share = np.divide(mono, tot, out=np.zeros_like(mono), where=tot > 0)
    S = share * det
    A = np.zeros((K, B))
    for k in range(K):
        pk = S[k, int(peaks[k, 0]), int(peaks[k, 1])]
        if pk <= 0:
            pk = max(S[k].max(), 1e-30)
            S[k, int(peaks[k, 0]), int(peaks[k, 1])] = pk
        S[k] /= pk
        for b in range(B):
            w = W[b] * S[k]
            den = float((w * S[k]).sum())
            # share of each pixel that belongs to k, so overlapping sources do not all claim it
            num = float((w * share[k] * Y[b]).sum())
            A[k, b] = max(num / den, 0.0) if den > 0 else 0.0
    return A, S, orders


def init_compact(footprint, peaks, subpixel, sigma, Y, W, kernels, convolve, boxes):
    """Compact initialisation: every source a point source of the model frame.

    Each morphology starts as the model frame's PSF (a circular Gaussian of ``sigma`` px)
    at the source's (sub-pixel) position, cut to the footprint, to its box and to its
    monotonic part; the SEDs are then the non-negative least-squares amplitudes of these
    models, convolved to each band, fitted to the band's pixels with the inverse-variance
    weights (solved jointly, so overlapping sources share the light from the start).
    scarlet_lite offers this point-source start next to the detection-image one; it keeps
    the fit away from the wide, overlapping starting shapes from which close pairs settle
    in a wrong split.

    Parameters
    ----------
    footprint : (h, w) bool
    peaks : (K, 2) int64, peak pixel (row, column)
    subpixel : (K, 2) float, position (row, column) in the box
    sigma : float, px
    Y, W : (B, h, w)
    kernels, convolve : difference kernels as in :func:`fit_blend`
    boxes : (K, 4) int64, as :func:`source_boxes` gives them

    Returns ``(A (K, B), S (K, h, w), orders)`` (orders as :func:`fit_blend` takes them).
    """
    from scipy.linalg import solve_triangular
    from scipy.optimize import nnls

    K = peaks.shape[0]
    B, ny, nx = Y.shape
    orders = _box_orders(peaks, boxes)
    S = np.zeros((K, ny, nx))
    for k in range(K):
        py, px = int(peaks[k, 0]), int(peaks[k, 1])
        y0, y1, x0, x1 = (int(v) for v in boxes[k])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        sub = np.exp(-0.5 * ((yy - subpixel[k, 0]) ** 2 + (xx - subpixel[k, 1]) ** 2) / sigma**2)
        sub = np.where(footprint[y0:y1, x0:x1], sub, 0.0)
        sub /= max(sub[py - y0, px - x0], 1e-300)
        prox_monotonic(sub, orders[k, : sub.size], py - y0, px - x0)
        S[k, y0:y1, x0:x1] = sub
    A = np.zeros((K, B))
    conv = np.zeros((ny, nx))
    use = footprint.ravel()
    h = kernels.shape[1] // 2
    su, sv, srank = separable_factors(kernels, 1e-3)
    for b in range(B):
        w = np.sqrt(W[b]).ravel()[use]
        cols = np.empty((int(use.sum()), K))
        for k in range(K):
            if convolve[b]:
                # convolve the source's box grown by the kernel's radius only
                y0, y1 = max(0, int(boxes[k, 0]) - h), min(ny, int(boxes[k, 1]) + h)
                x0, x1 = max(0, int(boxes[k, 2]) - h), min(nx, int(boxes[k, 3]) + h)
                conv[:, :] = 0.0
                sub = np.empty((y1 - y0, x1 - x0))
                _convolve_sep(
                    np.ascontiguousarray(S[k, y0:y1, x0:x1]),
                    su[b],
                    sv[b],
                    srank[b],
                    sub,
                    np.empty_like(sub),
                    np.ones(sub.shape, np.bool_),
                    False,
                )
                conv[y0:y1, x0:x1] = sub
                cols[:, k] = conv.ravel()[use]
            else:
                cols[:, k] = S[k].ravel()[use]
        # NNLS through the K x K normal equations (G = M^T M = L L^T, so ||M a - y||^2 =
        # ||L^T a - L^-1 M^T y||^2 + const): the same solution at a cost independent of the area
        M = cols * w[:, None]
        G = M.T @ M
        G[np.diag_indices(K)] += 1e-10 * max(float(np.trace(G)) / K, 1e-300)
        L = np.linalg.cholesky(G)
        rhs = solve_triangular(L, M.T @ (Y[b].ravel()[use] * w), lower=True)
        A[:, b] = nnls(L.T, rhs, maxiter=50 * K)[0]
    return A, S, orders


@numba.njit(nogil=True, cache=True)
def redistribute_flux(Y, models, footprint, peaks):
    """Children's pixels: ``Y_b * model_k,b / sum_j model_j,b`` (scarlet's flux conservation).

    Footprint pixels where every model is zero go whole to the nearest peak, so that the
    children sum exactly to ``Y`` inside the footprint (zero outside).

    Parameters
    ----------
    Y : (B, h, w) float64
    models : (K, B, h, w) float64, non-negative
    footprint : (h, w) bool
    peaks : (K, 2) int64

    Returns
    -------
    (K, B, h, w) float64
    """
    K, B, ny, nx = models.shape
    out = np.zeros((K, B, ny, nx))
    for y in range(ny):
        for x in range(nx):
            if not footprint[y, x]:
                continue
            for b in range(B):
                tot = 0.0
                for k in range(K):
                    tot += models[k, b, y, x]
                if tot > 0.0:
                    for k in range(K):
                        out[k, b, y, x] = Y[b, y, x] * (models[k, b, y, x] / tot)
                else:
                    best = 0
                    bd = np.inf
                    for k in range(K):
                        d = (y - peaks[k, 0]) ** 2 + (x - peaks[k, 1]) ** 2
                        if d < bd:
                            bd = d
                            best = k
                    out[best, b, y, x] = Y[b, y, x]
    return out
