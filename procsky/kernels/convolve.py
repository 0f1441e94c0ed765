"""Convolution kernels for difference imaging, on numpy blocks.

Everything here is a *true* convolution, ``out(p) = sum_q K(q) in(p - q)``, with kernel
images of odd size ``2 h + 1`` whose central pixel is the offset ``q = 0``. Blocks are
given with a margin of ``h`` pixels on every side (the margin :func:`procsky._dask.map_with_margin_at`
adds) and the functions return the *valid* interior, so chunked results are bit-for-bit
the same as a whole-image convolution away from the image border.

* :func:`convolve_valid` / :func:`convolve_valid_direct`: FFT (``scipy.fft``) and direct
  numba versions of a single-kernel convolution (the direct one is the reference).
* :func:`convolve_separable_valid`: separable kernel ``fy[:, None] * fx[None, :]``;
  used on the stamps of the kernel fit, where each Gaussian-times-polynomial basis
  function of Alard & Lupton (1998) factorises in x and y.
* :func:`spatial_convolve`: spatially varying kernel ``K(x, y; q) = sum_l P_l(x, y) K_l(q)``
  with ``P_l`` polynomials of the detector position. By linearity
  ``conv(I, K)(p) = sum_l P_l(p) conv(I, K_l)(p)``, which is exact and needs one FFT of the
  block and one inverse FFT per spatial term (Alard 2000, section 2).
* :func:`spatial_convolve_variance`: the variance of the convolved image,
  ``conv(V, K(p)^2)``, expanded exactly as ``sum_{l <= m} P_l P_m conv(V, c_lm K_l K_m)``.
* :func:`dilate_mask_box`: OR of mask bits over a square footprint (mask propagation).
* :func:`poly_terms_2d`: the spatial polynomial terms, ordered by total degree
  (1, u, v, u^2, u v, v^2, ...), like :class:`procsky.psf.PolynomialImagePsf`.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft

__all__ = [
    "poly_exponents",
    "poly_terms_2d",
    "normalized_coords",
    "convolve_valid",
    "convolve_valid_direct",
    "convolve_separable_valid",
    "spatial_convolve",
    "spatial_convolve_variance",
    "dilate_mask_box",
    "kernel_support_radius",
]


# ------------------------------------------------------------------------ polynomials
def poly_exponents(order: int) -> np.ndarray:
    """Exponents ``(i, j)`` of ``u**i * v**j`` ordered by total degree (1, u, v, u^2, uv, v^2 ...).

    Parameters
    ----------
    order : int
        Maximum total degree (>= 0).

    Returns
    -------
    ndarray (n_terms, 2) int64
        ``n_terms = (order + 1) (order + 2) / 2``.
    """
    if order < 0:
        raise ValueError(f"polynomial order must be >= 0, got {order}")
    return np.array([(d - j, j) for d in range(order + 1) for j in range(d + 1)], dtype=np.int64).reshape(-1, 2)


def normalized_coords(x, y, shape):
    """Detector pixel positions mapped to ``[-1, 1]`` over a detector of ``shape`` (ny, nx).

    Parameters
    ----------
    x, y : array_like, pixels
        0-based detector pixel positions.
    shape : (int, int)
        Detector shape (ny, nx) defining the normalisation.

    Returns
    -------
    u, v : ndarray float64
    """
    ny, nx = shape
    u = 2.0 * np.asarray(x, dtype=np.float64) / max(nx - 1, 1) - 1.0
    v = 2.0 * np.asarray(y, dtype=np.float64) / max(ny - 1, 1) - 1.0
    return u, v


def poly_terms_2d(u, v, order: int) -> np.ndarray:
    """Polynomial terms at normalised positions.

    Parameters
    ----------
    u, v : array_like
        Normalised coordinates (see :func:`normalized_coords`), any matching shape.
    order : int

    Returns
    -------
    ndarray (n_terms, *u.shape) float64
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    exps = poly_exponents(order)
    return np.stack([u**i * v**j for i, j in exps]) if len(exps) else np.zeros((0,) + u.shape)


# ------------------------------------------------------------------- single kernels
def _check_kernel(kernel):
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        raise ValueError(f"convolution kernels must be odd square images, got shape {k.shape}")
    return k


def convolve_valid(block, kernel):
    """Convolve a padded block with a kernel by FFT and return the valid interior.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
        Image block with an ``h``-pixel margin on every side; must be finite.
    kernel : ndarray (2h + 1, 2h + 1) float

    Returns
    -------
    ndarray (ny, nx) float64
    """
    k = _check_kernel(kernel)
    h = k.shape[0] // 2
    b = np.asarray(block, dtype=np.float64)
    ny, nx = b.shape[0] - 2 * h, b.shape[1] - 2 * h
    if ny <= 0 or nx <= 0:
        raise ValueError(f"block {b.shape} is smaller than the kernel margin 2*{h}")
    shape = (scipy.fft.next_fast_len(b.shape[0], real=True), scipy.fft.next_fast_len(b.shape[1], real=True))
    fb = scipy.fft.rfft2(b, s=shape, workers=1)
    fk = scipy.fft.rfft2(k, s=shape, workers=1)
    # Circular convolution: output pixels [2h, N) equal the linear valid convolution.
    out = scipy.fft.irfft2(fb * fk, s=shape, workers=1)
    return out[2 * h : 2 * h + ny, 2 * h : 2 * h + nx]


@numba.njit(nogil=True, cache=True)
def convolve_valid_direct(block, kernel):
    """Direct (slow, obvious) valid convolution; the reference for the FFT versions.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
    kernel : ndarray (2h + 1, 2h + 1) float64

    Returns
    -------
    ndarray (ny, nx) float64
    """
    k = kernel.shape[0]
    h = k // 2
    ny = block.shape[0] - 2 * h
    nx = block.shape[1] - 2 * h
    out = np.zeros((ny, nx))
    for y in range(ny):
        for x in range(nx):
            s = 0.0
            for j in range(k):
                for i in range(k):
                    s += kernel[j, i] * block[y + 2 * h - j, x + 2 * h - i]
            out[y, x] = s
    return out


@numba.njit(nogil=True, cache=True)
def convolve_separable_valid(block, fy, fx):
    """Valid convolution with the separable kernel ``fy[:, None] * fx[None, :]``.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
    fy, fx : ndarray (2h + 1,) float64

    Returns
    -------
    ndarray (ny, nx) float64
    """
    k = fx.shape[0]
    h = k // 2
    NY = block.shape[0]
    ny = NY - 2 * h
    nx = block.shape[1] - 2 * h
    tmp = np.zeros((NY, nx))
    for y in range(NY):
        for x in range(nx):
            s = 0.0
            for i in range(k):
                s += fx[i] * block[y, x + 2 * h - i]
            tmp[y, x] = s
    out = np.zeros((ny, nx))
    for y in range(ny):
        for j in range(k):
            w = fy[j]
            if w == 0.0:
                continue
            row = tmp[y + 2 * h - j]
            for x in range(nx):
                out[y, x] += w * row[x]
    return out


# -------------------------------------------------------------- spatially varying
@numba.njit(nogil=True, cache=True)
def _accumulate_weighted(out, conv, exps_i, exps_j, u, v, coef):
    """``out += coef * u**i * v**j * conv`` on a grid of (v rows, u columns)."""
    ny, nx = out.shape
    for y in range(ny):
        vy = v[y] ** exps_j
        for x in range(nx):
            out[y, x] += coef * (u[x] ** exps_i) * vy * conv[y, x]


def spatial_convolve(block, kernels, order, x0, y0, shape, *, cache=None, single=False):
    """Convolve a padded block with a spatially varying kernel.

    The kernel at detector pixel (x, y) is ``sum_l P_l(u, v) kernels[l]`` with ``P_l`` the
    terms of :func:`poly_terms_2d` at ``normalized_coords(x, y, shape)``.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
        Image block with an ``h``-pixel margin; finite values.
    kernels : ndarray (n_terms, 2h + 1, 2h + 1) float
        Kernel images of each spatial term.
    order : int
        Spatial polynomial order (``n_terms = (order + 1)(order + 2) / 2``).
    x0, y0 : int, pixels
        Detector position of the first *output* (valid) pixel.
    shape : (int, int)
        Detector shape used to normalise positions.
    cache : dict, optional
        Kernel transforms keyed by FFT shape, filled and reused across calls (blocks of a
        dask array mostly share one shape; the transforms are then computed once).
    single : bool
        Transform in single precision (twice as fast; relative error ~1e-6 of the block's
        largest value, far below the noise of astronomical images).

    Returns
    -------
    ndarray (ny, nx) float64
    """
    ks = np.asarray(kernels, dtype=np.float64)
    exps = poly_exponents(order)
    if ks.ndim != 3 or ks.shape[0] != len(exps):
        raise ValueError(f"need {len(exps)} kernel images for spatial order {order}, got {ks.shape}")
    h = ks.shape[1] // 2
    dt = np.float32 if single else np.float64
    b = np.asarray(block, dtype=dt)
    ny, nx = b.shape[0] - 2 * h, b.shape[1] - 2 * h
    fshape = (scipy.fft.next_fast_len(b.shape[0], real=True), scipy.fft.next_fast_len(b.shape[1], real=True))
    fb = scipy.fft.rfft2(b, s=fshape, workers=1)
    key = (fshape, single)
    fks = None if cache is None else cache.get(key)
    if fks is None:
        fks = [
            scipy.fft.rfft2(ks[l].astype(dt), s=fshape, workers=1) if np.any(ks[l]) else None for l in range(len(exps))
        ]
        if cache is not None:
            cache[key] = fks
    u, _ = normalized_coords(np.arange(x0, x0 + nx), np.zeros(nx), shape)
    _, v = normalized_coords(np.zeros(ny), np.arange(y0, y0 + ny), shape)
    out = np.zeros((ny, nx))
    for l, (ei, ej) in enumerate(exps):
        if fks[l] is None:
            continue
        conv = scipy.fft.irfft2(fb * fks[l], s=fshape, workers=1)[2 * h : 2 * h + ny, 2 * h : 2 * h + nx]
        _accumulate_weighted(out, np.ascontiguousarray(conv, dtype=np.float64), int(ei), int(ej), u, v, 1.0)
    return out


def spatial_convolve_variance(block, kernels, order, x0, y0, shape, *, cache=None, single=False):
    """Variance of a spatially convolved image: ``conv(V, K(p)^2)`` evaluated exactly.

    ``K(p)^2 = sum_l sum_m P_l P_m K_l K_m``; each product of terms is again a monomial, so
    the sum is regrouped by monomial of total order ``2 * order`` and convolved once per
    monomial.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
        Variance block with an ``h``-pixel margin.
    kernels, order, x0, y0, shape, cache, single
        As in :func:`spatial_convolve` (use a separate cache from the image's).

    Returns
    -------
    ndarray (ny, nx) float64
    """
    ks = np.asarray(kernels, dtype=np.float64)
    exps = poly_exponents(order)
    exps2 = poly_exponents(2 * order)
    index = {(int(i), int(j)): n for n, (i, j) in enumerate(exps2)}
    sq = np.zeros((len(exps2),) + ks.shape[1:])
    for l, (il, jl) in enumerate(exps):
        for m, (im, jm) in enumerate(exps):
            sq[index[(int(il + im), int(jl + jm))]] += ks[l] * ks[m]
    return spatial_convolve(block, sq, 2 * order, x0, y0, shape, cache=cache, single=single)


def kernel_support_radius(kernel, frac=1e-3) -> int:
    """Half-width (pixels) of the box holding every kernel pixel above ``frac * max|K|``."""
    k = np.abs(_check_kernel(kernel))
    h = k.shape[0] // 2
    if not np.any(k):
        return 0
    yy, xx = np.nonzero(k >= frac * k.max())
    return int(max(np.abs(yy - h).max(), np.abs(xx - h).max()))


@numba.njit(nogil=True, cache=True)
def dilate_mask_box(block, r, bits):
    """OR the selected mask bits over a ``(2r + 1)^2`` box; return the valid interior.

    Parameters
    ----------
    block : ndarray (ny + 2H, nx + 2H) uint32
        Mask block with a margin ``H >= r``; the output drops ``H = (block - out) / 2``
        pixels on each side, where ``H`` is inferred as ``r`` (call with the same margin).
    r : int, pixels
        Box half-width.
    bits : int
        Bits spread over the box; other bits are copied from the centre pixel only.

    Returns
    -------
    ndarray (ny, nx) uint32
    """
    NY, NX = block.shape
    ny = NY - 2 * r
    nx = NX - 2 * r
    b = np.uint32(bits)
    tmp = np.zeros((NY, nx), dtype=np.uint32)
    for y in range(NY):
        for x in range(nx):
            acc = np.uint32(0)
            for i in range(2 * r + 1):
                acc |= block[y, x + i] & b
            tmp[y, x] = acc
    out = np.zeros((ny, nx), dtype=np.uint32)
    for y in range(ny):
        for x in range(nx):
            acc = block[y + r, x + r] & ~b
            for j in range(2 * r + 1):
                acc |= tmp[y + j, x]
            out[y, x] = acc
    return out
