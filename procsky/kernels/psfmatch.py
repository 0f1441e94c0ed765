"""PSF matching after Alard & Lupton (1998) and Alard (2000), on numpy arrays.

The matching kernel is a linear combination of basis functions,
``K(q; x, y) = sum_k a_k(x, y) B_k(q)``, with

* **basis** ``B_k``: Gaussians of a few widths times polynomials in the kernel
  coordinates, ``exp(-(u^2 + v^2) / 2 s_n^2) (u/s_n)^i (v/s_n)^j`` with ``i + j <= d_n``
  (Alard & Lupton 1998, eq. 2; HOTPANTS defaults: 3 Gaussians, degrees 6/4/2). The widths
  scale with the width of the matching kernel ``sqrt(s_broad^2 - s_sharp^2)``.
  **Normalisation** (LSST ``ip_diffim`` "renormalize"): ``B_0`` has unit sum and every other
  basis has its sum removed, ``B_k -> B_k - sum(B_k) B_0``, so only ``a_0`` carries flux and
  the photometric ratio is one coefficient.
* **spatial variation** ``a_k(x, y) = sum_l c_kl P_l(u, v)`` with ``P_l`` polynomials of
  the normalised detector position (Alard 2000), and a **differential background**
  ``b(x, y) = sum_m d_m Q_m(u, v)`` fitted simultaneously.
* **fit** on stamps around bright stars spread over the detector: per stamp, the
  convolutions ``C_k = conv(T, B_k)`` (separable, so 2 1-D passes per basis) and the
  normal-equation blocks ``[C; Q] W [C; Q]^T``; each stamp is first fitted alone (constant
  kernel) and outliers in chi^2 and kernel sum rejected; the global spatial system is then
  assembled exactly from the per-stamp blocks (``P_l`` is constant over a stamp, so the
  global matrix is a sum of Kronecker products) and solved; stamps whose residual under the
  global solution is an outlier are rejected and the system re-solved.
* **noise decorrelation** (Kaiser 2004; Reiss & Lupton 2016; LSST
  ``DecorrelateALKernelTask``): the difference ``S - K (x) T`` has noise power
  ``s2 + t2 |K(f)|^2``; convolving it with ``phi(f) = sqrt((s2 + t2) / (s2 + t2 |K(f)|^2))``
  makes the noise white again. A resampled template's noise is itself correlated
  (Lanczos): its power spectrum ``R_T(f)``, measured from the image on source-free pixels
  (:func:`source_free_mask`, :func:`noise_statistics`, which also measures the noise against
  the variance plane and says whether the correlation is significant), enters as
  ``t2 |K(f)|^2 R_T(f)`` and the whitened level is ``s2 + t2 sum(rho_T)``.

Conventions: kernels are true convolution kernels (see :mod:`procsky.kernels.convolve`),
odd size ``2 h + 1``; positions are detector pixels; spatial polynomials use
:func:`procsky.kernels.convolve.normalized_coords` over the detector shape.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from .convolve import normalized_coords, poly_exponents, poly_terms_2d

__all__ = [
    "KernelBasis",
    "make_basis",
    "basis_for_psfs",
    "basis_stamp_convolutions",
    "MatchingKernel",
    "StampData",
    "build_stamps",
    "fit_matching_kernel",
    "select_kernel_stars",
    "decorrelation_kernel",
    "noise_correlation",
    "noise_statistics",
    "source_free_mask",
    "required_stamps",
    "n_free_parameters",
    "reduced_bases",
    "MIN_KERNEL_STAMPS",
]


# ------------------------------------------------------------------------------ basis
@dataclass(frozen=True)
class KernelBasis:
    """Gaussian-times-polynomial basis of a matching kernel.

    Attributes
    ----------
    half_width : int, pixels
        Kernel images are ``2 h + 1`` square.
    sigmas : tuple of float, pixels
        Gaussian widths.
    degrees : tuple of int
        Polynomial degree of each Gaussian.
    fx, fy : ndarray (n_basis, 2h + 1)
        1-D factors: raw basis ``k`` is ``fy[k][:, None] * fx[k][None, :]``, scaled to unit
        L2 norm.
    sums : ndarray (n_basis,)
        Sums of the raw (scaled) bases; the normalised basis is
        ``B'_0 = B_0 / sums[0]``, ``B'_k = B_k - sums[k] B'_0``.
    """

    half_width: int
    sigmas: tuple
    degrees: tuple
    fx: np.ndarray = field(repr=False)
    fy: np.ndarray = field(repr=False)
    sums: np.ndarray = field(repr=False)

    @property
    def n_basis(self) -> int:
        return self.fx.shape[0]

    @property
    def size(self) -> int:
        return 2 * self.half_width + 1

    @functools.cached_property
    def separable_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(unique x factors, fy, index of each basis's x factor)``: the bases of one
        Gaussian with the same x power share their x factor (one x pass each in
        :func:`basis_stamp_convolutions`); computed once per basis."""
        ux, xidx = np.unique(np.round(self.fx, 12), axis=0, return_inverse=True)
        return np.ascontiguousarray(ux), np.ascontiguousarray(self.fy), xidx.astype(np.int64).ravel()

    def images(self) -> np.ndarray:
        """Normalised basis images ``(n_basis, 2h + 1, 2h + 1)`` (only the first has non-zero sum)."""
        raw = self.fy[:, :, None] * self.fx[:, None, :]
        out = np.empty_like(raw)
        out[0] = raw[0] / self.sums[0]
        for k in range(1, self.n_basis):
            out[k] = raw[k] - self.sums[k] * out[0]
        return out

    def to_dict(self) -> dict:
        return {"half_width": self.half_width, "sigmas": list(self.sigmas), "degrees": list(self.degrees)}

    @classmethod
    def from_dict(cls, d) -> KernelBasis:
        return make_basis(d["sigmas"], d["degrees"], d["half_width"])


def make_basis(sigmas, degrees, half_width: int) -> KernelBasis:
    """Build the Alard-Lupton basis.

    Parameters
    ----------
    sigmas : sequence of float, pixels
        Widths of the Gaussians (first = narrowest carries the flux term).
    degrees : sequence of int
        Polynomial degree for each Gaussian.
    half_width : int, pixels
        Kernel half-width ``h``.

    Returns
    -------
    KernelBasis
    """
    sigmas = tuple(float(s) for s in sigmas)
    degrees = tuple(int(d) for d in degrees)
    if len(sigmas) != len(degrees) or not sigmas:
        raise ValueError(f"need one degree per Gaussian sigma, got sigmas={sigmas} degrees={degrees}")
    if any(s <= 0 for s in sigmas) or any(d < 0 for d in degrees):
        raise ValueError(f"basis sigmas must be > 0 pixels and degrees >= 0, got {sigmas}, {degrees}")
    h = int(half_width)
    if h < 1:
        raise ValueError(f"kernel half-width must be >= 1 pixel, got {half_width}")
    q = np.arange(-h, h + 1, dtype=np.float64)
    fx_rows: list[np.ndarray] = []
    fy_rows: list[np.ndarray] = []
    for s, d in zip(sigmas, degrees):
        g = np.exp(-0.5 * (q / s) ** 2)
        for i, j in poly_exponents(d):
            ax = g * (q / s) ** i
            ay = g * (q / s) ** j
            norm = math.sqrt(np.sum(ax**2) * np.sum(ay**2))
            fx_rows.append(ax / math.sqrt(norm))
            fy_rows.append(ay / math.sqrt(norm))
    fx = np.array(fx_rows)
    fy = np.array(fy_rows)
    sums = fx.sum(axis=1) * fy.sum(axis=1)
    if not sums[0] > 0:
        raise ValueError("the first basis function must have a positive sum (degree-0 Gaussian first)")
    return KernelBasis(h, sigmas, degrees, fx, fy, sums)


def basis_for_psfs(
    sigma_sharp,
    sigma_broad,
    *,
    degrees=(6, 4, 2),
    scales=(0.5, 1.0, 2.0),
    min_sigma=0.5,
    half_width=None,
    half_width_range=(4, 30),
) -> KernelBasis:
    """Basis scaled to the PSF widths of the two images.

    Parameters
    ----------
    sigma_sharp, sigma_broad : float, pixels
        Gaussian-equivalent PSF sigma of the image to convolve and of the target.
    degrees : sequence of int
        Polynomial degree of each Gaussian.
    scales : sequence of float
        Gaussian widths in units of the matching sigma ``sqrt(broad^2 - sharp^2)``.
    min_sigma : float, pixels
        Floor of the matching sigma (nearly equal PSFs still need a finite basis).
    half_width : int, optional
        Kernel half-width; default ``ceil(3 * largest basis sigma)`` within ``half_width_range``.

    Returns
    -------
    KernelBasis
    """
    s2 = max(sigma_broad**2 - sigma_sharp**2, 0.0)
    sm = max(math.sqrt(s2), min_sigma)
    sigmas = [max(sm * f, 0.3) for f in scales]
    if half_width is None:
        lo, hi = half_width_range
        # Degree-d polynomials push the basis out to ~sqrt(d) sigma; 3 sigma of the widest
        # Gaussian plus one PSF sigma keeps the wings of the matched PSF.
        half_width = int(min(max(math.ceil(3.0 * max(sigmas) + 0.5 * sigma_broad), lo), hi))
    return make_basis(sigmas, degrees, half_width)


def reduced_bases(degrees, scales) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """The configured basis and ever smaller ones, for kernel fits on few stamps.

    ``[(degrees, scales), ...]`` with strictly fewer basis functions at each step: the
    configured basis; its degrees capped at 4/2/2 (27 functions for HOTPANTS's three
    Gaussians); the two Gaussians closest to the matching width at degree 2 (12); the one
    closest at degree 2 (6); and at degree 0 (1 function: a Gaussian broadening and the
    flux ratio). Dropping the widest Gaussian also shrinks the default kernel half-width,
    so stars nearer the edges of a small frame become usable.
    """
    degrees = tuple(int(d) for d in degrees)
    scales = tuple(float(x) for x in scales)
    by_width = sorted(range(len(scales)), key=lambda i: (abs(math.log(scales[i])), scales[i]))
    two = tuple(sorted(scales[i] for i in by_width[:2]))
    one = (scales[by_width[0]],)
    cands = [
        (degrees, scales),
        (tuple(min(d, c) for d, c in zip(degrees, (4, 2, 2) + (2,) * len(degrees))), scales),
        ((2,) * len(two), two),
        ((2,), one),
        ((0,), one),
    ]
    out: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
    last = None
    for d, sc in cands:
        nb = sum((k + 1) * (k + 2) // 2 for k in d)
        if last is None or nb < last:
            out.append((d, sc))
            last = nb
    return out


def basis_stamp_convolutions(block, basis: KernelBasis) -> np.ndarray:
    """Convolutions of a padded block with every normalised basis function.

    Parameters
    ----------
    block : ndarray (ny + 2h, nx + 2h) float
    basis : KernelBasis

    Returns
    -------
    ndarray (n_basis, ny, nx) float64
    """
    b = np.ascontiguousarray(block, dtype=np.float64)
    ux, fy, xidx = basis.separable_factors
    raw = _separable_bank(b, ux, fy, xidx)
    out = np.empty_like(raw)
    out[0] = raw[0] / basis.sums[0]
    for k in range(1, basis.n_basis):
        out[k] = raw[k] - basis.sums[k] * out[0]
    return out


@numba.njit(nogil=True, cache=True)
def _separable_bank(block, fxu, fy, xidx):
    """Valid convolutions with ``fy[k] x fxu[xidx[k]]`` for every k (x passes shared)."""
    nu, k = fxu.shape
    nb = fy.shape[0]
    h = k // 2
    NY = block.shape[0]
    ny = NY - 2 * h
    nx = block.shape[1] - 2 * h
    tmp = np.zeros((nu, NY, nx))
    # taps outermost, pixels innermost (SIMD over x); each output still sums its taps in
    # order i = 0 .. k-1 from 0, as a per-pixel loop would
    for q in range(nu):
        for y in range(NY):
            row = tmp[q, y]
            src = block[y]
            for i in range(k):
                w = fxu[q, i]
                seg = src[2 * h - i : 2 * h - i + nx]
                for x in range(nx):
                    row[x] += w * seg[x]
    out = np.zeros((nb, ny, nx))
    for b in range(nb):
        t = tmp[xidx[b]]
        for y in range(ny):
            orow = out[b, y]
            for j in range(k):
                w = fy[b, j]
                if w == 0.0:
                    continue
                trow = t[y + 2 * h - j]
                for x in range(nx):
                    orow[x] += w * trow[x]
    return out


# ---------------------------------------------------------------------- solution
@dataclass
class MatchingKernel:
    """A fitted spatially varying matching kernel and differential background.

    Attributes
    ----------
    basis : KernelBasis
    coeffs : ndarray (n_basis, n_spatial)
        ``c_kl``; kernel coefficient ``a_k(x, y) = sum_l c_kl P_l(u, v)``.
    spatial_order : int
    background : ndarray (n_bg,)
        Differential background polynomial coefficients (counts of the target image).
    background_order : int
    shape : (int, int)
        Detector shape (ny, nx) normalising positions.
    stats : dict
        Fit statistics (stamps used/rejected, residual chi^2 ...).
    """

    basis: KernelBasis
    coeffs: np.ndarray
    spatial_order: int
    background: np.ndarray
    background_order: int
    shape: tuple
    stats: dict = field(default_factory=dict)

    @property
    def half_width(self) -> int:
        return self.basis.half_width

    def spatial_kernels(self) -> np.ndarray:
        """Kernel image of each spatial term ``(n_spatial, 2h + 1, 2h + 1)``."""
        return np.tensordot(self.coeffs.T, self.basis.images(), axes=1)

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The kernel image at detector pixel (x, y)."""
        u, v = normalized_coords(x, y, self.shape)
        p = poly_terms_2d(u, v, self.spatial_order)
        return np.tensordot(self.coeffs @ p, self.basis.images(), axes=1)

    def kernel_sum(self, x, y):
        """Photometric scaling (kernel sum) at detector positions (x, y)."""
        u, v = normalized_coords(x, y, self.shape)
        p = poly_terms_2d(u, v, self.spatial_order)
        return np.tensordot(self.coeffs[0], p, axes=1)

    def background_at(self, x, y):
        """Differential background at detector positions (x, y), counts."""
        u, v = normalized_coords(x, y, self.shape)
        return np.tensordot(self.background, poly_terms_2d(u, v, self.background_order), axes=1)

    def to_dict(self) -> dict:
        return {
            "basis": self.basis.to_dict(),
            "coeffs": self.coeffs.tolist(),
            "spatial_order": self.spatial_order,
            "background": self.background.tolist(),
            "background_order": self.background_order,
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, d) -> MatchingKernel:
        return cls(
            KernelBasis.from_dict(d["basis"]),
            np.array(d["coeffs"], float),
            int(d["spatial_order"]),
            np.array(d["background"], float),
            int(d["background_order"]),
            tuple(d["shape"]),
        )


@dataclass
class StampData:
    """Per-stamp normal-equation blocks of the kernel fit.

    Attributes
    ----------
    x, y : ndarray (n,), pixels
        Stamp centres (detector pixels).
    M : ndarray (n, nb + nbg, nb + nbg)
        ``D W D^T`` with ``D = [C_0 .. C_{nb-1}, Q_0 .. Q_{nbg-1}]`` over the stamp pixels.
    b : ndarray (n, nb + nbg)
        ``D W S``.
    ss : ndarray (n,)
        ``sum W S^2``.
    npix : ndarray (n,)
        Number of pixels with weight.
    """

    x: np.ndarray
    y: np.ndarray
    M: np.ndarray
    b: np.ndarray
    ss: np.ndarray
    npix: np.ndarray


def build_stamps(
    to_convolve,
    target,
    variance,
    bad,
    xs,
    ys,
    basis: KernelBasis,
    stamp_half: int,
    background_order: int,
    shape=None,
    xy0=(0, 0),
    min_good_fraction=0.5,
    soft=None,
    soft_radius=0,
) -> StampData:
    """Normal-equation blocks for stamps centred on (xs, ys).

    Parameters
    ----------
    to_convolve : ndarray (ny, nx)
        The image convolved by the kernel (template, or science when convolving it).
    target : ndarray (ny, nx)
        The image it is matched to.
    variance : ndarray (ny, nx)
        Per-pixel variance of the fit residual (counts^2 of ``target``).
    bad : ndarray (ny, nx) bool
        Unusable pixels (of either image). A stamp pixel is left out of the fit (zero
        weight) when a bad pixel lies within the kernel footprint of it (its convolution
        would use it) or on it; bad pixels of the block are zeroed. Masking pixels rather
        than refusing every stamp that touches one keeps the bright stars, whose large
        stamps and kernel margins nearly always hold a repaired cosmic ray of one of the
        images (a coadd template holds the repairs of all its inputs).
    xs, ys : array_like, pixels (array coordinates)
        Stamp centres.
    basis : KernelBasis
    stamp_half : int, pixels
        Stamps are ``2 stamp_half + 1`` square.
    background_order : int
    shape : (int, int), optional
        Detector shape for the polynomial normalisation (default the array shape).
    xy0 : (int, int)
        Detector position of array pixel (0, 0).
    min_good_fraction : float
        Stamps with a smaller fraction of usable pixels are skipped.
    soft : ndarray (ny, nx) bool, optional
        Repaired pixels (interpolated cosmic rays ...): their values are kept, but stamp
        pixels within ``soft_radius`` of one (where the kernel core would carry its error)
        are left out of the fit.
    soft_radius : int, pixels

    Returns
    -------
    StampData
        Stamps too close to an edge or with too few usable pixels are skipped;
        ``npix`` counts the usable pixels.
    """
    from scipy import ndimage

    ny, nx = target.shape
    shape = tuple(shape) if shape is not None else (ny, nx)
    h = basis.half_width
    r = stamp_half + h
    nb = basis.n_basis
    bexp = poly_exponents(background_order)
    out: dict[str, list[Any]] = {k: [] for k in ("x", "y", "M", "b", "ss", "npix")}
    for x, y in zip(np.asarray(xs), np.asarray(ys)):
        ix, iy = int(round(x)), int(round(y))
        if ix - r < 0 or iy - r < 0 or ix + r >= nx or iy + r >= ny:
            continue
        blk = np.array(to_convolve[iy - r : iy + r + 1, ix - r : ix + r + 1], dtype=np.float64)
        tgt = target[iy - stamp_half : iy + stamp_half + 1, ix - stamp_half : ix + stamp_half + 1].astype(np.float64)
        var = variance[iy - stamp_half : iy + stamp_half + 1, ix - stamp_half : ix + stamp_half + 1].astype(np.float64)
        bblk = np.asarray(bad[iy - r : iy + r + 1, ix - r : ix + r + 1], bool) | ~np.isfinite(blk)
        if bblk.any():
            # stamp pixels whose kernel footprint (box of half-width h) holds a bad pixel
            near = ndimage.maximum_filter(bblk.astype(np.uint8), size=2 * h + 1, mode="constant")[h:-h, h:-h] > 0
            blk[bblk] = 0.0
        else:
            near = np.zeros(tgt.shape, bool)
        if soft is not None:
            sblk = np.asarray(soft[iy - r : iy + r + 1, ix - r : ix + r + 1], bool)
            if sblk.any():
                rs = min(int(soft_radius), h)
                sn = ndimage.maximum_filter(sblk.astype(np.uint8), size=2 * rs + 1, mode="constant")
                near |= sn[h:-h, h:-h] > 0
        use = ~near & np.isfinite(tgt) & np.isfinite(var) & (var > 0)
        if use.mean() < min_good_fraction:
            continue
        tgt = np.where(use, tgt, 0.0)
        C = basis_stamp_convolutions(blk, basis).reshape(nb, -1)
        gy, gx = np.mgrid[iy - stamp_half : iy + stamp_half + 1, ix - stamp_half : ix + stamp_half + 1]
        u, v = normalized_coords(gx.ravel() + xy0[0], gy.ravel() + xy0[1], shape)
        Q = np.stack([u**i * v**j for i, j in bexp])
        D = np.vstack([C, Q])
        w = np.where(use, 1.0 / np.where(use, var, 1.0), 0.0).ravel()
        s = tgt.ravel()
        M, bb, ss = _normal_blocks(np.ascontiguousarray(D), w, s)
        out["x"].append(ix + xy0[0])
        out["y"].append(iy + xy0[1])
        out["M"].append(M)
        out["b"].append(bb)
        out["ss"].append(ss)
        out["npix"].append(int(use.sum()))
    nt = nb + len(bexp)
    if not out["x"]:
        return StampData(np.zeros(0), np.zeros(0), np.zeros((0, nt, nt)), np.zeros((0, nt)), np.zeros(0), np.zeros(0))
    return StampData(*(np.array(out[k], dtype=np.float64) for k in ("x", "y", "M", "b", "ss", "npix")))


@numba.njit(nogil=True, cache=True)
def _normal_blocks(D, w, s):
    """``D W D^T``, ``D W s`` and ``s W s`` (numba: no BLAS threads inside dask workers)."""
    nt, npix = D.shape
    M = np.zeros((nt, nt))
    b = np.zeros(nt)
    ss = 0.0
    # pixels outermost, the upper triangle's columns innermost (SIMD); every element still
    # sums its products ``(D_a w) D_c`` over the pixels in order from 0
    DT = np.ascontiguousarray(D.T)
    for p in range(npix):
        d = DT[p]
        wp = w[p]
        sp = s[p]
        for a in range(nt):
            dwa = d[a] * wp
            row = M[a, a:]
            dd = d[a:]
            for c in range(nt - a):
                row[c] += dwa * dd[c]
            b[a] += dwa * sp
        ss += wp * sp * sp
    for a in range(nt):
        for c in range(a + 1, nt):
            M[c, a] = M[a, c]
    return M, b, ss


def _solve(A, b, ridge=1e-9):
    """Solve ``A x = b`` after scaling ``A`` to unit diagonal; ``ridge`` (a scalar or one
    value per parameter) is added to the scaled diagonal (Tikhonov regularisation relative
    to each parameter's own information)."""
    d = np.diag(A).copy()
    scale = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0)
    As = A * scale[:, None] * scale[None, :]
    As[np.diag_indices_from(As)] += ridge
    try:
        z = np.linalg.solve(As, b * scale)
    except np.linalg.LinAlgError:
        z = np.linalg.lstsq(As, b * scale, rcond=None)[0]
    return z * scale


def _robust_outliers(values, nsigma):
    v = np.asarray(values, float)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    if not mad > 0:
        return np.zeros(v.size, bool)
    return np.abs(v - med) > nsigma * mad


def _min_stamps(order):
    # Enough stamps that every spatial term is constrained a few times over.
    return {0: 1, 1: 8, 2: 20, 3: 35}.get(order, 5 * (order + 1) * (order + 2) // 2)


#: Fewest kernel stamps any fit accepts: the stamp rejection is median based (chi^2 and
#: kernel sum against the other stamps), which cannot single out a variable star, a stamp
#: with a cosmic ray or a mismatched star with fewer than 3 stamps.
MIN_KERNEL_STAMPS = 3


def required_stamps(n_free, params_per_stamp=10.0, min_stamps=MIN_KERNEL_STAMPS) -> int:
    """Fewest kernel stamps for a fit with ``n_free`` free parameters.

    A stamp constrains the kernel only through its star's few resolution elements at
    useful S/N: we ask for one stamp per ``params_per_stamp`` free parameters (kernel
    coefficients times spatial terms, plus the background terms), and never fewer than
    ``min_stamps``. The full HOTPANTS basis (49 functions) with a linear background at
    spatial order 0 (52 parameters) needs 6 stamps; at spatial order 1 (150), 15.
    """
    return int(max(int(min_stamps), math.ceil(float(n_free) / float(params_per_stamp))))


def n_free_parameters(n_basis, spatial_order, background_order, constant_sum=False) -> int:
    """Free parameters of :func:`fit_matching_kernel` for a basis of ``n_basis`` functions."""
    nsp = len(poly_exponents(spatial_order))
    n = n_basis * nsp + len(poly_exponents(background_order))
    if constant_sum:
        n -= nsp - 1
    return int(n)


def _ridge_vector(nb, nsp, nbg, free, ridge, shape_ridge):
    """Per-parameter ridge of the global system: ``shape_ridge`` on the shape coefficients
    (basis functions 1.., whose sums are zero, so that the damping does not bias the kernel
    sum), ``ridge`` (conditioning) on the flux term and the background."""
    r = np.full((nb, nsp), float(ridge))
    r[1:, :] += float(shape_ridge)
    return np.concatenate([r[free], np.full(nbg, float(ridge))])


def _free(nb, nsp, constant_sum):
    free = np.ones((nb, nsp), bool)
    if constant_sum:
        free[0, 1:] = False
    return free


@numba.njit(nogil=True, cache=True)
def _spatial_normal_equations(M, b, P, kept, nb):
    """The global normal equations ``sum_s [kron(M_kk, P P^T), kron(M_kb, P); ., M_bb]`` and
    ``sum_s [kron(b_k, P), b_b]`` over the stamps ``kept`` (``P`` constant over a stamp).

    Every element receives the same products, added in the same stamp order, as the
    Kronecker-product sums of numpy would give (bit for bit); only the upper triangle of
    blocks is accumulated (``M`` is exactly symmetric) and mirrored."""
    nsp = P.shape[1]
    nt = M.shape[1]
    nbg = nt - nb
    nk = nb * nsp
    A = np.zeros((nk + nbg, nk + nbg))
    bvec = np.zeros(nk + nbg)
    pp = np.empty((nsp, nsp))
    for s in kept:
        Ms = M[s]
        Ps = P[s]
        for l in range(nsp):
            for m in range(nsp):
                pp[l, m] = Ps[l] * Ps[m]
        for i in range(nb):
            for j in range(i, nb):
                mij = Ms[i, j]
                for l in range(nsp):
                    row = A[i * nsp + l]
                    for m in range(nsp):
                        row[j * nsp + m] += mij * pp[l, m]
            for l in range(nsp):
                for g in range(nbg):
                    A[i * nsp + l, nk + g] += Ms[i, nb + g] * Ps[l]
                bvec[i * nsp + l] += b[s, i] * Ps[l]
        for g in range(nbg):
            for g2 in range(nbg):
                A[nk + g, nk + g2] += Ms[nb + g, nb + g2]
            bvec[nk + g] += b[s, nb + g]
    # mirror: the lower blocks of the kernel part and the background-kernel cross terms
    for i in range(nb):
        for j in range(i + 1, nb):
            for l in range(nsp):
                for m in range(nsp):
                    A[j * nsp + m, i * nsp + l] = A[i * nsp + l, j * nsp + m]
    for a in range(nk):
        for g in range(nbg):
            A[nk + g, a] = A[a, nk + g]
    return A, bvec


def _solve_spatial(stamps, keep, P, nb, nbg, free, ridge, shape_ridge=0.0):
    """Assemble and solve the global system from the kept stamps' blocks (Kronecker sums)."""
    nsp = P.shape[1]
    A, bvec = _spatial_normal_equations(
        stamps.M, stamps.b, np.ascontiguousarray(P, dtype=np.float64), np.nonzero(keep)[0].astype(np.int64), nb
    )
    use = np.concatenate([free.ravel(), np.ones(nbg, bool)])
    theta = np.zeros(A.shape[0])
    rv = _ridge_vector(nb, nsp, nbg, free, ridge, shape_ridge) if shape_ridge > 0 else ridge
    theta[use] = _solve(A[np.ix_(use, use)], bvec[use], rv)
    return theta[: nb * nsp].reshape(nb, nsp), theta[nb * nsp :]


def _stamp_chi2(stamps, coeffs, bg, P):
    """Residual chi^2 per pixel of every stamp under a global solution."""
    n = len(stamps.x)
    chi = np.empty(n)
    for s in range(n):
        th = np.concatenate([coeffs @ P[s], bg])
        chi[s] = (th @ stamps.M[s] @ th - 2 * th @ stamps.b[s] + stamps.ss[s]) / max(stamps.npix[s], 1)
    return chi


def fit_matching_kernel(
    stamps: StampData,
    basis: KernelBasis,
    *,
    spatial_order=2,
    background_order=1,
    shape,
    clip_sigma=3.0,
    max_iter=3,
    constant_sum=False,
    ridge=1e-9,
    cross_validate=True,
    n_folds=4,
    shape_ridge=0.0,
    params_per_stamp=None,
    min_stamps=MIN_KERNEL_STAMPS,
) -> MatchingKernel:
    """Fit the spatially varying kernel and background to per-stamp normal equations.

    Parameters
    ----------
    stamps : StampData
        From :func:`build_stamps` (same basis and background order).
    basis : KernelBasis
    spatial_order : int
        Maximum order of the kernel-coefficient polynomials; lowered when there are too
        few stamps, and chosen by cross-validation (recorded in
        ``stats['spatial_order_used']`` and ``stats['cv_chi2']``).
    background_order : int
    shape : (int, int)
        Detector shape.
    clip_sigma : float
        Outlier threshold (robust sigmas) on per-stamp chi^2 and kernel sum.
    max_iter : int
        Global reject-and-refit iterations.
    constant_sum : bool
        Hold the kernel sum (photometric ratio) constant over the detector.
    ridge : float
        Tikhonov term on the scaled normal matrix (conditioning only).
    shape_ridge : float
        Extra Tikhonov damping of the kernel-shape coefficients (basis functions 1..,
        zero-sum, so the kernel sum is not biased), relative to each coefficient's own
        information on the unit-diagonal scaled normal matrix: directions of the fit that
        the stamps constrain less than ``shape_ridge`` times are damped towards zero. For
        fits on few stamps (Tikhonov regularisation of the kernel solution as in Becker et
        al. 2012, MNRAS 425, 1341, who regularise a delta-function basis).
    params_per_stamp : float, optional
        When given, a spatial order also needs ``required_stamps(n_free, params_per_stamp)``
        kept stamps (:func:`required_stamps`); default only the per-order minimum.
    min_stamps : int
        Fewest usable stamps (>= 3: the stamp rejection is median based).
    cross_validate : bool
        Choose the spatial order (0 .. ``spatial_order``) with the lowest median held-out
        stamp chi^2 in ``n_folds``-fold cross-validation (the simplest order within 1% of
        the best wins).
    n_folds : int

    Returns
    -------
    MatchingKernel

    Raises
    ------
    ValueError
        Fewer than ``min_stamps`` usable stamps (the caller turns this into an AlgorithmError).
    """
    nb = basis.n_basis
    nbg = len(poly_exponents(background_order))
    n = len(stamps.x)
    min_stamps = max(int(min_stamps), MIN_KERNEL_STAMPS)
    if n < min_stamps:
        raise ValueError(
            f"only {n} usable kernel stamps (need >= {min_stamps}); lower the star S/N threshold or the stamp "
            "size, or check the template overlaps the science image"
        )
    # 1. Each stamp alone: constant kernel + constant background.
    idx = list(range(nb)) + [nb]
    chi_single = np.empty(n)
    ksum_single = np.empty(n)
    for s in range(n):
        A = stamps.M[s][np.ix_(idx, idx)]
        bb = stamps.b[s][idx]
        th = _solve(
            A, bb, _ridge_vector(nb, 1, 1, np.ones((nb, 1), bool), ridge, shape_ridge) if shape_ridge > 0 else ridge
        )
        chi_single[s] = (th @ A @ th - 2 * th @ bb + stamps.ss[s]) / max(stamps.npix[s] - len(idx), 1)
        ksum_single[s] = th[0]
    keep = ~(_robust_outliers(np.log(np.maximum(chi_single, 1e-30)), clip_sigma) & (chi_single > np.median(chi_single)))
    keep &= ~_robust_outliers(ksum_single, clip_sigma)
    if keep.sum() < 3:
        keep[:] = True
    order = int(spatial_order)

    def need(o):
        m = _min_stamps(o)
        if params_per_stamp is not None:
            nf = n_free_parameters(nb, o, background_order, constant_sum)
            m = max(m, required_stamps(nf, params_per_stamp, min_stamps))
        return m

    while order > 0 and keep.sum() < need(order):
        order -= 1
    us, vs = normalized_coords(stamps.x, stamps.y, shape)
    cv = {}
    if order > 0 and cross_validate:
        # Choose the spatial order by k-fold cross-validation on the kept stamps: a
        # polynomial constrained by few stamps extrapolates wildly between them, which the
        # stamps' own residuals cannot reveal but held-out stamps do.
        kept = np.nonzero(keep)[0]
        folds = np.arange(kept.size) % n_folds
        for o in range(order + 1):
            if kept.size < need(o) + kept.size // n_folds:
                continue
            Po = poly_terms_2d(us, vs, o).T
            held = []
            for f in range(n_folds):
                train = np.zeros(n, bool)
                train[kept[folds != f]] = True
                c, b = _solve_spatial(
                    stamps, train, Po, nb, nbg, _free(nb, Po.shape[1], constant_sum), ridge, shape_ridge
                )
                held.extend(_stamp_chi2(stamps, c, b, Po)[kept[folds == f]].tolist())
            cv[o] = float(np.median(held))
        if cv:
            best = min(cv, key=lambda o: (cv[o], o))
            # prefer the simpler model unless the richer one is clearly better (1%)
            order = min(o for o in cv if cv[o] <= cv[best] * 1.01)
    P = poly_terms_2d(us, vs, order).T  # (n, nsp)
    free = _free(nb, P.shape[1], constant_sum)
    history = []
    for it in range(max_iter + 1):
        coeffs, bg = _solve_spatial(stamps, keep, P, nb, nbg, free, ridge, shape_ridge)
        # Residual chi^2 of every stamp (kept or not) under the global solution.
        chi = _stamp_chi2(stamps, coeffs, bg, P)
        history.append(float(np.mean(chi[keep])))
        if it == max_iter:
            break
        out = _robust_outliers(np.log(np.maximum(chi, 1e-30)), clip_sigma) & (chi > np.median(chi[keep]))
        new_keep = keep & ~out
        if new_keep.sum() < max(min_stamps, need(order)) or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    # The kernel sum's empirical error: the scatter of the kept stamps' single-stamp sums
    # over sqrt(n) (their star-to-star spread from noise, shape mismatch and cosmic rays).
    ks = ksum_single[keep]
    ksum_err = float(np.std(ks, ddof=1) / math.sqrt(ks.size)) if ks.size > 1 else float("nan")
    stats = {
        "n_stamps": int(n),
        "n_stamps_used": int(keep.sum()),
        "kernel_sum_stamps_err": ksum_err,
        "spatial_order_used": int(order),
        "stamp_chi2_mean": float(np.mean(chi[keep])),
        "stamp_chi2_median": float(np.median(chi[keep])),
        "chi2_history": history,
        "cv_chi2": {str(k): v for k, v in cv.items()},
        "used": keep.tolist(),
    }
    return MatchingKernel(basis, coeffs, order, bg, int(background_order), tuple(shape), stats)


# --------------------------------------------------------------------- star selection
def select_kernel_stars(
    image,
    variance,
    bad,
    *,
    psf_sigma,
    stamp_radius,
    n_cells=4,
    per_cell=8,
    min_snr=20.0,
    max_snr=np.inf,
    other=None,
    other_bad=None,
    other_variance=None,
    core_radius=None,
    max_bad_fraction=0.5,
    soft_bad=None,
    soft_core_radius=0,
):
    """Bright, unsaturated stars spread over the detector for the kernel fit.

    The Alard-Lupton model holds for any pixels, so neighbours inside a stamp do no harm;
    what matters is that stamps avoid bad pixels, do not overlap much (candidates are
    taken brightest first at a minimum spacing) and cover the detector (a grid of cells).

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image where stars are found (normally the sharper one).
    bad : ndarray (ny, nx) bool
        Unusable pixels (saturated, bad, no data); stamps touching them are refused.
    psf_sigma : float, pixels
        Detection filter width.
    stamp_radius : int, pixels
        Half-size of the stamp plus the kernel margin (candidates are that far from the
        border, and about that far apart).
    core_radius : int, pixels, optional
        A candidate needs no bad pixel within this box half-width (the star's core plus
        the kernel margin); default ``stamp_radius`` (no bad pixel in the whole box).
    max_bad_fraction : float
        ... and at most this fraction of bad pixels in its ``stamp_radius`` box (the fit
        masks them, :func:`build_stamps`).
    soft_bad : ndarray (ny, nx) bool, optional
        Repaired pixels (of either image): none may lie within ``soft_core_radius``.
    soft_core_radius : int, pixels
    n_cells : int
        The detector is cut in ``n_cells x n_cells`` cells ...
    per_cell : int
        ... and the brightest ``per_cell`` candidates of each are kept.
    min_snr, max_snr : float
        Peak significance range of candidates (matched-filter sigma).
    other, other_variance, other_bad : ndarray, optional
        The second image: candidates must have significance above ``min_snr / 3`` there
        and no bad pixel either.

    Returns
    -------
    x, y : ndarray (array pixels)
        Candidate centres, brightest first within each cell.
    """
    from scipy.spatial import cKDTree

    from .detection import detect_sources, significance_image

    img = np.where(bad | ~np.isfinite(image), 0.0, image).astype(np.float32)
    var = np.where(bad | ~np.isfinite(variance) | (variance <= 0), 0.0, variance).astype(np.float32)
    det = detect_sources(img, var, psf_sigma=psf_sigma, nsigma=5.0, deblend=False, grow=0.0)
    x, y, sig = det.x, det.y, det.peak_significance
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    ny, nx = image.shape
    r = int(stamp_radius)
    # Stamps need no isolation (the Alard-Lupton model holds for any pixels), but stamps
    # should not overlap much: candidates are taken brightest first with a minimum spacing.
    ok = (sig >= min_snr) & (sig <= max_snr)
    ok &= (x >= r) & (y >= r) & (x < nx - r) & (y < ny - r)
    if other is not None:
        sig2 = significance_image(
            np.where(other_bad | ~np.isfinite(other), 0.0, other).astype(np.float32),
            np.where(other_bad | ~np.isfinite(other_variance), 0.0, other_variance).astype(np.float32),
            sigma=psf_sigma,
        )
    cand = np.nonzero(ok)[0]
    rc = r if core_radius is None else min(int(core_radius), r)
    good_list: list[np.integer] = []
    for i in cand:
        ix, iy = int(x[i]), int(y[i])
        box = bad[iy - r : iy + r + 1, ix - r : ix + r + 1]
        if box[r - rc : r + rc + 1, r - rc : r + rc + 1].any() or box.mean() > max_bad_fraction:
            continue
        if soft_bad is not None and soft_core_radius > 0:
            q = int(soft_core_radius)
            if soft_bad[max(iy - q, 0) : iy + q + 1, max(ix - q, 0) : ix + q + 1].any():
                continue
        if other is not None:
            if other_bad is not None:
                obox = other_bad[iy - r : iy + r + 1, ix - r : ix + r + 1]
                if obox[r - rc : r + rc + 1, r - rc : r + rc + 1].any() or obox.mean() > max_bad_fraction:
                    continue
            if sig2[iy, ix] < min_snr / 3.0:
                continue
        good_list.append(i)
    good = np.array(good_list, dtype=np.int64)
    if good.size == 0:
        return np.zeros(0), np.zeros(0)
    good = good[np.argsort(-sig[good], kind="stable")]
    tree = cKDTree(np.column_stack([x[good], y[good]]))
    taken = np.zeros(good.size, bool)
    blocked = np.zeros(good.size, bool)
    spacing = max(r - int(math.ceil(2 * psf_sigma)), 1)
    for n in range(good.size):
        if blocked[n]:
            continue
        taken[n] = True
        blocked[tree.query_ball_point([x[good[n]], y[good[n]]], r=float(spacing))] = True
    good = good[taken]
    cx = np.minimum((x[good] * n_cells / nx).astype(int), n_cells - 1)
    cy = np.minimum((y[good] * n_cells / ny).astype(int), n_cells - 1)
    cell = cy * n_cells + cx
    chosen_list: list[int] = []
    for c in np.unique(cell):
        members = good[cell == c]
        members = members[np.argsort(-sig[members], kind="stable")]
        chosen_list.extend(members[:per_cell].tolist())
    chosen = np.array(chosen_list, dtype=np.int64)
    return x[chosen].astype(float), y[chosen].astype(float)


# ------------------------------------------------------------------- decorrelation
def noise_correlation(image, variance, bad, *, radius=4, clip=4.0, grow=3, max_size=1024, pedestal_rings=(6, 8)):
    """Normalised noise autocorrelation of an image, from its source-free pixels.

    A resampled image (a warped template, a coadd of warps) has noise correlated between
    neighbouring pixels: its variance plane is right pixel by pixel, but the noise of a sum
    or a convolution over several pixels is larger (the "noise correlation factor" of
    SWarp and LSST coadds). The matching-kernel convolution and the decorrelation
    afterburner need the correlation itself; it is measured here from the image, which
    works for any chain of resamplings.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
    bad : ndarray (ny, nx) bool
        Pixels to ignore (masked, detected sources); the usable area is eroded by ``grow``.
    radius : int, pixels
        Half-size of the returned correlation (lags ``-radius .. radius`` in x and y).
    clip : float
        Pixels with ``|image| / sqrt(variance)`` above this are ignored (faint sources).
    grow : int, pixels
        Erosion of the usable area (source wings).
    max_size : int, pixels
        The central ``max_size`` square is used (enough pixels, bounded time).
    pedestal_rings : (int, int)
        A constant pedestal (large-scale fluctuations: background residuals, unresolved
        sources), the mean correlation at lags between these, is subtracted.

    Returns
    -------
    ndarray (2 radius + 1, 2 radius + 1) float64
        ``rho[dy + radius, dx + radius]``; ``rho`` at lag 0 is 1 and it is symmetric; an
        image with white noise gives ~delta. Delta when too few pixels are usable.
    """
    from scipy import fft as sfft
    from scipy import ndimage

    R = int(radius)
    Ro = max(int(pedestal_rings[1]), R)
    delta = np.zeros((2 * R + 1, 2 * R + 1))
    delta[R, R] = 1.0
    ny, nx = image.shape
    m = int(max_size)
    y0, x0 = max((ny - m) // 2, 0), max((nx - m) // 2, 0)
    sl = (slice(y0, y0 + min(m, ny)), slice(x0, x0 + min(m, nx)))
    img = np.asarray(image[sl], dtype=np.float64)
    var = np.asarray(variance[sl], dtype=np.float64)
    good = ~np.asarray(bad[sl], bool) & np.isfinite(img) & np.isfinite(var) & (var > 0)
    n = np.zeros_like(img)
    n[good] = img[good] / np.sqrt(var[good])
    good &= np.abs(n) < clip
    if grow > 0:
        good = ndimage.binary_erosion(good, iterations=int(grow))
    if good.sum() < 1000:
        return delta
    n = np.where(good, n, 0.0)
    shape = (sfft.next_fast_len(n.shape[0] + Ro), sfft.next_fast_len(n.shape[1] + Ro))
    num = sfft.irfft2(np.abs(sfft.rfft2(n, shape, workers=1)) ** 2, shape, workers=1)
    den = sfft.irfft2(np.abs(sfft.rfft2(good.astype(np.float64), shape, workers=1)) ** 2, shape, workers=1)
    lags = np.r_[-Ro : Ro + 1]
    c = num[np.ix_(lags, lags)] / np.maximum(den[np.ix_(lags, lags)], 1.0)
    if not c[Ro, Ro] > 0:
        return delta
    c = c / c[Ro, Ro]
    yy, xx = np.mgrid[-Ro : Ro + 1, -Ro : Ro + 1]
    ring = np.maximum(np.abs(yy), np.abs(xx))
    sel = (ring >= pedestal_rings[0]) & (ring <= pedestal_rings[1])
    ped = float(np.mean(c[sel])) if sel.any() else 0.0
    rho = c[Ro - R : Ro + R + 1, Ro - R : Ro + R + 1] - ped
    rho[R, R] = 1.0
    return 0.5 * (rho + rho[::-1, ::-1])


def _gaussian_half_weights(sigma, truncate=4.0):
    """The weights of ``scipy.ndimage.gaussian_filter1d`` (order 0, radius ``int(truncate
    sigma + 0.5)``), centre first: ``w[j]`` at offsets ``+-j``."""
    sd = float(sigma)
    radius = int(truncate * sd + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sd * sd) * x**2)
    phi = phi / phi.sum()
    return np.ascontiguousarray(phi[::-1][radius:])


@numba.njit(nogil=True, cache=True)
def _symmetric_filter_columns(x, w):
    """Correlation along axis 0 with the symmetric weights ``w`` (centre first), zeros
    outside: ``x[y] w0 + sum_j (x[y - j] + x[y + j]) w_j``, the outer taps first, which is
    the order of ``scipy.ndimage.correlate1d`` for symmetric weights (so its values)."""
    ny, nx = x.shape
    r = w.shape[0] - 1
    out = np.empty((ny, nx))
    for y in range(ny):
        o = out[y]
        c = x[y]
        w0 = w[0]
        for i in range(nx):
            o[i] = c[i] * w0
        for j in range(r, 0, -1):
            wj = w[j]
            if y - j >= 0 and y + j < ny:
                a = x[y - j]
                b = x[y + j]
                for i in range(nx):
                    o[i] += (a[i] + b[i]) * wj
            elif y - j >= 0:
                a = x[y - j]
                for i in range(nx):
                    o[i] += (a[i] + 0.0) * wj
            elif y + j < ny:
                b = x[y + j]
                for i in range(nx):
                    o[i] += (0.0 + b[i]) * wj
            else:
                for i in range(nx):
                    o[i] += 0.0 * wj
    return out


@numba.njit(nogil=True, cache=True)
def _symmetric_filter_rows_inplace(x, w):
    """:func:`_symmetric_filter_columns` along axis 1, in place."""
    ny, nx = x.shape
    r = w.shape[0] - 1
    line = np.zeros(nx + 2 * r)
    for y in range(ny):
        o = x[y]
        line[r : r + nx] = o
        c = line[r : r + nx]
        w0 = w[0]
        for i in range(nx):
            o[i] = c[i] * w0
        for j in range(r, 0, -1):
            a = line[r - j : r - j + nx]
            b = line[r + j : r + j + nx]
            wj = w[j]
            for i in range(nx):
                o[i] += (a[i] + b[i]) * wj


@numba.njit(nogil=True, cache=True)
def _smoothed_significance(img, var, bad, w_num, w_den, den_norm):
    """Usable pixels ``ok`` and the significance ``|conv(I, G)| / sqrt(conv(V, G^2))`` of
    :func:`source_free_mask`: ``scipy.ndimage.gaussian_filter`` (mode constant, axis 0 then
    1) of the usable image and variance, in float64, as numpy and scipy compute them."""
    ny, nx = img.shape
    ok = np.empty((ny, nx), np.bool_)
    a = np.empty((ny, nx))
    b = np.empty((ny, nx))
    for y in range(ny):
        for x in range(nx):
            vi = np.float64(img[y, x])
            vv = np.float64(var[y, x])
            g = (not bad[y, x]) and np.isfinite(vi) and np.isfinite(vv) and vv > 0
            ok[y, x] = g
            a[y, x] = vi if g else 0.0
            b[y, x] = vv if g else 0.0
    num = _symmetric_filter_columns(a, w_num)
    _symmetric_filter_rows_inplace(num, w_num)
    den = _symmetric_filter_columns(b, w_den)
    _symmetric_filter_rows_inplace(den, w_den)
    for y in range(ny):
        for x in range(nx):
            d = den[y, x] / den_norm
            num[y, x] = abs(num[y, x]) / np.sqrt(max(d, 1e-30)) if d > 0 else 0.0
    return ok, num


def source_free_mask(image, variance, bad, psf_sigma, *, threshold=5.0, footprint_threshold=2.0, grow=None):
    """Pixels that are usable and away from every source: where pixel noise can be measured.

    Sources are found in the PSF-smoothed significance map ``|conv(I, G)| / sqrt(conv(V, G^2))``
    (``G`` a Gaussian of the PSF sigma; both signs, so a difference image's negative sources
    are found too): a source is a connected region above ``footprint_threshold`` that holds a
    pixel above ``threshold`` (SExtractor's detection/analysis thresholds, Bertin & Arnouts
    1996), grown by ``grow`` pixels (default ``ceil(3 psf_sigma)``, the PSF wings). Pure noise
    peaks above ``footprint_threshold`` are *not* masked: excluding them would bias the noise
    measured on what is left (its spread and its correlation) low.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
    bad : ndarray (ny, nx) bool
        Unusable pixels (masked, no data); never source-free.
    psf_sigma : float, pixels
    threshold, footprint_threshold : float
        Detection and footprint thresholds of the smoothed significance.
    grow : int, optional, pixels

    Returns
    -------
    ndarray (ny, nx) bool
        True where the pixel is usable and outside every grown source footprint.
    """
    from scipy import ndimage

    img = np.ascontiguousarray(image)
    var = np.ascontiguousarray(variance)
    if img.dtype not in (np.float32, np.float64):
        img = img.astype(np.float64)
    if var.dtype not in (np.float32, np.float64):
        var = var.astype(np.float64)
    s = max(float(psf_sigma), 0.5)
    # conv(V, G^2) = conv(V, G_{s/sqrt2}) / (4 pi s^2) for a unit-sum Gaussian G of sigma s
    ok, sn = _smoothed_significance(
        img,
        var,
        np.ascontiguousarray(bad, dtype=bool),
        _gaussian_half_weights(s),
        _gaussian_half_weights(s / math.sqrt(2.0)),
        4 * math.pi * s * s,
    )
    foot = sn > footprint_threshold
    lab, n = ndimage.label(foot)
    src = np.zeros(img.shape, bool)
    if n:
        # the footprints holding a pixel above threshold (their peak is above it)
        keep = np.zeros(n + 1, bool)
        keep[lab[sn > threshold]] = True
        keep[0] = False
        src = keep[lab]
    g = int(math.ceil(3 * s)) if grow is None else int(grow)
    if g > 0 and src.any():
        # g dilations by a 3x3 square = one by a (2g + 1) square, done separably
        src = _dilate_square(src, g)
    return ok & ~src


@numba.njit(nogil=True, cache=True)
def _dilate_square(m, g):
    """Boolean dilation by a ``(2 g + 1)`` square (``scipy.ndimage.maximum_filter``, mode
    constant 0): running counts of set pixels in the window, rows then columns."""
    ny, nx = m.shape
    rows = np.empty((ny, nx), np.bool_)
    for y in range(ny):
        r = m[y]
        o = rows[y]
        cnt = 0
        for x in range(min(g, nx - 1) + 1):
            cnt += r[x]
        for x in range(nx):
            o[x] = cnt > 0
            if x + g + 1 < nx:
                cnt += r[x + g + 1]
            if x - g >= 0:
                cnt -= r[x - g]
    out = np.empty((ny, nx), np.bool_)
    cnt_col = np.zeros(nx, np.int64)
    for y in range(min(g, ny - 1) + 1):
        cnt_col += rows[y]
    for y in range(ny):
        o = out[y]
        for x in range(nx):
            o[x] = cnt_col[x] > 0
        if y + g + 1 < ny:
            add = rows[y + g + 1]
            for x in range(nx):
                cnt_col[x] += add[x]
        if y - g >= 0:
            sub = rows[y - g]
            for x in range(nx):
                cnt_col[x] -= sub[x]
    return out


@numba.njit(nogil=True, cache=True, inline="always")
def _value_bin(x, work, i, level, center, absdev, lo, scale, nbins):
    """Value ``i`` of :func:`_ranks_pair`'s current level (from ``x`` at level 0, else
    ``work``) and its histogram bin (clipped to the last)."""
    if level == 0:
        v = abs(x[i] - center) if absdev else x[i]
    else:
        v = work[i]
    b = int((v - lo) * scale)
    if b >= nbins:
        b = nbins - 1
    return v, b


@numba.njit(nogil=True, cache=True)
def _ranks_pair(x, n, k1, k2, work, lo, hi, center, absdev):
    """The ``k1``-th and ``k2``-th smallest (0-based, ``k2`` in ``{k1, k1 + 1}``) of the values
    ``v = x[:n]`` (or ``v = |x[:n] - center|`` with ``absdev``), exactly, by histogram
    selection: the values are binned between bounds ``lo <= v <= hi`` (the bin index is
    monotone in the value), only the bin(s) holding the two ranks are kept, and so on until
    few values are left, which are sorted. ``x`` is not modified; ``work`` (length >= n) is
    scratch. About two passes over the values where ``np.median`` partitions a copy."""
    nbins = 4096
    counts = np.empty(nbins, np.int64)
    level = 0
    while True:
        if not hi > lo:
            return lo, lo
        scale = nbins / (hi - lo)
        if n <= 256 or not np.isfinite(scale):
            if level == 0:
                for i in range(n):
                    work[i] = abs(x[i] - center) if absdev else x[i]
            srt = np.sort(work[:n])
            return srt[k1], srt[k2]
        counts[:] = 0
        for i in range(n):
            _, b = _value_bin(x, work, i, level, center, absdev, lo, scale, nbins)
            counts[b] += 1
        cum = 0
        b1 = -1
        b2 = -1
        base = 0
        for b in range(nbins):
            c = counts[b]
            if b1 < 0 and k1 < cum + c:
                b1 = b
                base = cum
            if k2 < cum + c:
                b2 = b
                break
            cum += c
        # keep the values of bins b1 and b2 (the bins between them are empty); in place
        # after the first level (a value is moved only to an index already read)
        m = 0
        nlo = np.inf
        nhi = -np.inf
        for i in range(n):
            v, b = _value_bin(x, work, i, level, center, absdev, lo, scale, nbins)
            if b == b1 or b == b2:
                work[m] = v
                m += 1
                if v < nlo:
                    nlo = v
                if v > nhi:
                    nhi = v
        n = m
        k1 -= base
        k2 -= base
        lo = nlo
        hi = nhi
        level += 1


@numba.njit(nogil=True, cache=True)
def _median_exact(x, n, work, lo, hi, center, absdev):
    """``np.median`` of the values of :func:`_ranks_pair` exactly (the middle value, or the
    mean of the two middle ones)."""
    if n % 2 == 1:
        a, _ = _ranks_pair(x, n, n // 2, n // 2, work, lo, hi, center, absdev)
        return a
    a, b = _ranks_pair(x, n, n // 2 - 1, n // 2, work, lo, hi, center, absdev)
    return (a + b) / 2.0


@numba.njit(nogil=True, cache=True)
def _mad_median(x, n, work, lo, hi):
    """``median(|x - median(x)|)`` of ``x[:n]``, whose values lie in ``[lo, hi]`` (their
    minimum and maximum); exact (``np.median``'s values)."""
    med = _median_exact(x, n, work, lo, hi, 0.0, False)
    return _median_exact(x, n, work, 0.0, max(med - lo, hi - med), med, True)


def _lag_mads(nimg, good, dy, dx, buffers=None):
    """For the lag ``(dy, dx)`` (``dy >= 0``): the number of pixel pairs both good, and the
    MAD medians of ``n + n_d`` and of ``n - n_d`` over them (:func:`_mad_median`).
    ``buffers``: three float64 arrays of ``nimg.size + 1`` values, reused between lags."""
    if buffers is None:
        buffers = tuple(np.empty(nimg.size + 1) for _ in range(3))
    return _lag_mads_into(nimg, good, int(dy), int(dx), *buffers)


@numba.njit(nogil=True, cache=True)
def _lag_mads_into(nimg, good, dy, dx, sp, sm, work):
    """:func:`_lag_mads` with its buffers."""
    h, w = nimg.shape
    xa = max(0, -dx)
    xb = w - max(0, dx)
    k = 0
    plo = np.inf
    phi = -np.inf
    mlo = np.inf
    mhi = -np.inf
    for y in range(h - dy):
        ga = good[y]
        gb = good[y + dy]
        na = nimg[y]
        nb = nimg[y + dy]
        for x in range(xa, xb):
            # branch-free: every pair is written, the index advances only for good ones
            ok = ga[x] & gb[x + dx]
            a = na[x]
            b = nb[x + dx]
            p = a + b
            q = a - b
            sp[k] = p
            sm[k] = q
            k += 1 if ok else 0
            if ok:
                plo = min(plo, p)
                phi = max(phi, p)
                mlo = min(mlo, q)
                mhi = max(mhi, q)
    if k == 0:
        return 0, 0.0, 0.0
    return k, _mad_median(sp, k, work, plo, phi), _mad_median(sm, k, work, mlo, mhi)


def _mad_var(a):
    """Robust variance ``(1.4826 MAD)^2`` of a 1-D array (its medians exact, as ``np.median``'s)."""
    x = np.ascontiguousarray(a, dtype=np.float64).ravel()
    lo, hi = (float(x.min()), float(x.max())) if x.size else (math.nan, math.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # empty, or non-finite values: numpy's answer
        med = np.median(x)
        return float((1.4826 * np.median(np.abs(x - med))) ** 2)
    return float((1.4826 * _mad_median(x, x.size, np.empty(x.size), lo, hi)) ** 2)


def noise_statistics(image, variance, free, *, radius=3, max_size=768, nsigma=5.0, min_excess=0.05):
    """Measured noise of an image against its variance plane, and whether it is correlated.

    On source-free pixels (:func:`source_free_mask`) of the central ``max_size`` square, with
    ``n = I / sqrt(V)``:

    * ``variance_ratio``: the robust variance of ``n`` (``(1.4826 MAD)^2``), the factor by
      which the pixel noise exceeds the variance plane (1 when the plane is right; the
      per-pixel variance drop of a resampling whose plane was not propagated, otherwise);
    * ``rho``: the normalised noise autocorrelation, each lag ``d`` by the robust
      (Gnanadesikan & Kettenring 1972) estimator
      ``(s2(n + n_d) - s2(n - n_d)) / (s2(n + n_d) + s2(n - n_d))`` with ``s2`` the robust
      variance, which faint sources and cosmic rays left in the pixels barely move (the
      plain product-moment correlation of :func:`noise_correlation` picks up their wings
      at every lag);
    * ``correlated``: whether the correlation is real. Resampling correlates neighbours
      (Lanczos3: up to 0.26 per axis at half-pixel shifts), so the decision is made on the
      sum of the 8 lags of the first ring, which must exceed both ``min_excess`` and
      ``nsigma`` times its statistical error. When not, ``rho`` is a delta: the noise is
      treated as white. When it is, lags beyond the first ring within 3 sigma of zero are
      set to 0 (their sum would otherwise add noise to ``sum(rho)``).

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
    free : ndarray (ny, nx) bool
        Source-free, usable pixels.
    radius : int
        Half-size of ``rho``.
    max_size : int, pixels
        Side of the central square measured (bounded time).
    nsigma, min_excess : float
        Decision thresholds on the first-ring correlation sum.

    Returns
    -------
    dict
        ``rho`` (ndarray (2 radius + 1,) * 2), ``variance_ratio``, ``variance_ratio_err``,
        ``neighbour_correlation`` (first-ring sum), ``neighbour_correlation_err``,
        ``correlated`` (bool), ``n_pixels``. With fewer than 1000 usable pixels:
        ``variance_ratio`` nan, ``rho`` a delta, ``correlated`` False.
    """
    R = int(radius)
    delta = np.zeros((2 * R + 1, 2 * R + 1))
    delta[R, R] = 1.0
    ny, nx = image.shape
    m = int(max_size)
    y0, x0 = max((ny - m) // 2, 0), max((nx - m) // 2, 0)
    sl = (slice(y0, y0 + min(m, ny)), slice(x0, x0 + min(m, nx)))
    img = np.asarray(image[sl], dtype=np.float64)
    var = np.asarray(variance[sl], dtype=np.float64)
    good = np.asarray(free[sl], bool) & np.isfinite(img) & np.isfinite(var) & (var > 0)
    npix = int(good.sum())
    out: dict[str, Any] = {
        "rho": delta,
        "variance_ratio": float("nan"),
        "variance_ratio_err": float("nan"),
        "neighbour_correlation": 0.0,
        "neighbour_correlation_err": float("nan"),
        "correlated": False,
        "n_pixels": npix,
    }
    if npix < 1000:
        return out
    n = np.zeros_like(img)
    n[good] = img[good] / np.sqrt(var[good])
    ratio = _mad_var(n[good])
    # The MAD's efficiency is 37% of the standard deviation's: var(s2) = 2 s2^2 / (0.37 N).
    out["variance_ratio"] = ratio
    out["variance_ratio_err"] = float(ratio * math.sqrt(2.0 / (0.37 * npix)))
    rho = delta.copy()
    err = np.zeros_like(rho)
    h, w = n.shape
    ring = np.maximum(*np.abs(np.mgrid[-R : R + 1, -R : R + 1]))
    first = ring == 1

    def measure_lags(rings):
        # one of each pair of lags (d, -d): the estimator is symmetric
        for dy in range(0, R + 1):
            for dx in range(-R, R + 1):
                if (dy == 0 and dx <= 0) or ring[R + dy, R + dx] not in rings:
                    continue
                k, mp, mm = _lag_mads(n, good, dy, dx, buffers)
                if k < 500:
                    continue
                sp, sm = float((1.4826 * mp) ** 2), float((1.4826 * mm) ** 2)
                c = (sp - sm) / (sp + sm) if sp + sm > 0 else 0.0
                rho[R + dy, R + dx] = rho[R - dy, R - dx] = c
                err[R + dy, R + dx] = err[R - dy, R - dx] = 1.0 / math.sqrt(0.37 * k)

    # The decision needs the first ring only; the outer lags are measured only for noise that
    # is correlated (white noise keeps the delta): 4 lags instead of 24 on unresampled images.
    buffers = tuple(np.empty(n.size + 1) for _ in range(3))
    measure_lags({1})
    s1 = float(rho[first].sum())
    # each lag appears twice (d and -d): the 4 independent estimates, counted twice
    s1_err = float(2.0 * math.sqrt(np.sum(err[first] ** 2) / 2.0))
    out["neighbour_correlation"] = s1
    out["neighbour_correlation_err"] = s1_err
    if s1 > max(float(min_excess), float(nsigma) * s1_err):
        measure_lags(set(range(2, R + 1)))
        rho = np.where((ring > 1) & (np.abs(rho) < 3.0 * err), 0.0, rho)
        out["rho"] = rho
        out["correlated"] = True
    return out


def _correlation_power(rho, n):
    """Noise power spectrum (n x n grid, unit mean) of a correlation ``rho`` centred at lag 0."""
    if rho is None:
        return 1.0
    r = np.asarray(rho, dtype=np.float64)
    h = r.shape[0] // 2
    pad = np.zeros((n, n))
    pad[: r.shape[0], : r.shape[1]] = r
    pad = np.roll(pad, (-h, -h), axis=(0, 1))
    p = np.real(np.fft.fft2(pad))
    # A measured correlation may give a slightly negative power at some frequencies.
    return np.maximum(p, 0.05 * max(float(p[0, 0]), 1e-12))


def decorrelation_kernel(
    kernel,
    var_convolved,
    var_unconvolved,
    *,
    corr_convolved=None,
    corr_unconvolved=None,
    half_width=None,
    fft_size=None,
):
    """Real-space noise decorrelation kernel (Kaiser 2004; Reiss & Lupton 2016).

    For a difference ``D = A - kappa (x) B`` where ``B`` (mean variance ``var_convolved``,
    in the units of ``A`` after scaling by the kernel sum) is convolved by the normalised
    kernel ``kappa`` and ``A`` (mean variance ``var_unconvolved``) is not, the noise power is
    ``P(f) = var_unconvolved R_A(f) + var_convolved |kappa(f)|^2 R_B(f)``, where ``R`` is the
    power spectrum of each image's noise correlation (1 for white noise). The kernel
    returned here, ``phi(f) = sqrt(P(0) / P(f))``, whitens it to the level ``P(0)`` per
    pixel (``var_unconvolved sum(rho_A) + var_convolved sum(rho_B)``) and has unit sum, so
    fluxes are unchanged. With white inputs this is LSST's
    ``sqrt((var_unconvolved + var_convolved) / (var_unconvolved + var_convolved |kappa(f)|^2))``.

    Parameters
    ----------
    kernel : ndarray (2h + 1, 2h + 1)
        Matching kernel (any normalisation; it is normalised to unit sum here).
    var_convolved, var_unconvolved : float, counts^2
        Mean per-pixel variances, both in the units of the difference image.
    corr_convolved, corr_unconvolved : ndarray (2r + 1, 2r + 1), optional
        Noise correlation of each image (:func:`noise_correlation`); white when omitted.
    half_width : int, optional
        Half-width of the returned kernel (default twice the matching-kernel half-width:
        when the convolved image dominates the noise, ``phi`` has wide negative wings and
        cropping it at the kernel size loses ~10% of the noise power).
    fft_size : int, optional
        Size of the Fourier grid (default a power of two >= 4 times the kernel size).

    Returns
    -------
    ndarray (2 hw + 1, 2 hw + 1) float64, sum 1
    """
    k = np.asarray(kernel, dtype=np.float64)
    s = k.sum()
    if not (np.isfinite(s) and s != 0):
        raise ValueError("matching kernel has zero or non-finite sum; cannot decorrelate")
    kappa = k / s
    h = k.shape[0] // 2
    hw = 2 * h if half_width is None else int(half_width)
    n = fft_size or int(2 ** math.ceil(math.log2(max(4 * k.shape[0], 4 * (2 * hw + 1)))))
    pad = np.zeros((n, n))
    pad[: k.shape[0], : k.shape[1]] = kappa
    pad = np.roll(pad, (-h, -h), axis=(0, 1))  # kernel centre at the origin
    kf2 = np.abs(np.fft.fft2(pad)) ** 2
    a = float(var_unconvolved)
    c = float(var_convolved)
    if not (a >= 0 and c >= 0 and a + c > 0):
        raise ValueError(f"variances must be >= 0 and not both zero, got {var_unconvolved}, {var_convolved}")
    pa = a * _correlation_power(corr_unconvolved, n)
    pc = c * kf2 * _correlation_power(corr_convolved, n)
    power = pa + pc  # (n, n) noise power of the difference before decorrelation
    phif = np.sqrt(power[0, 0] / power)
    phi = np.real(np.fft.ifft2(phif))
    phi = np.roll(phi, (hw, hw), axis=(0, 1))[: 2 * hw + 1, : 2 * hw + 1]
    return phi / phi.sum()


# ------------------------------------------------------------- Fourier matching to a model
# Matching a PSF *model* to a target model (no stars fitted): used by coaddition to bring
# every warp to one round Gaussian before its artifact search (CompareWarp).
def fourier_matching_kernel(psf_img: np.ndarray, target_img: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Kernel ``K`` with ``K * psf ~= target``, by Wiener-regularised Fourier division.

    Both images are centred, odd-sized kernels; the result has the larger of their sizes
    (made odd) and unit sum. ``eps`` regularises the division where the PSF's transform is
    small (relative to its peak power), which keeps the kernel from amplifying noise at
    frequencies the PSF has suppressed.
    """
    n = max(psf_img.shape[0], target_img.shape[0])
    n = n | 1
    p = pad_kernel(psf_img, n)
    t = pad_kernel(target_img, n)
    P = np.fft.rfft2(np.fft.ifftshift(p))
    T = np.fft.rfft2(np.fft.ifftshift(t))
    K = T * np.conj(P) / (np.abs(P) ** 2 + eps * np.abs(P).max() ** 2)
    k = np.fft.fftshift(np.fft.irfft2(K, s=(n, n)))
    return k / k.sum()


def pad_kernel(k: np.ndarray, n: int) -> np.ndarray:
    """A centred square kernel zero-padded (or centrally cropped) to side ``n``."""
    m = k.shape[0]
    if m == n:
        return k
    if m > n:
        c = (m - n) // 2
        return k[c : c + n, c : c + n]
    out = np.zeros((n, n))
    c = (n - m) // 2
    out[c : c + m, c : c + m] = k
    return out


def convolve_planes(
    img: np.ndarray,
    var: np.ndarray,
    msk: np.ndarray,
    kernel: np.ndarray,
    corr: float = 1.0,
    min_cover: float = 0.3,
    *,
    no_data_bit: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF-match a block: convolve the image with ``K`` and the variance with ``K^2``.

    Normalised convolution over the valid pixels (Knutsson & Westin 1993), so that data
    next to a ``no_data_bit`` region or the block edge is still matched; pixels whose
    kernel covers less than ``min_cover`` of valid weight get ``no_data_bit`` (and NaN).
    ``corr`` multiplies the variance: ``Var(sum K x) = sum K^2 V`` only holds for
    independent pixels, and warped pixels are correlated by their resampling kernel.
    Returns float32 image and variance and the uint32 mask.
    """
    from scipy.signal import fftconvolve

    bad = ~(np.isfinite(img) & np.isfinite(var)) | ((msk & no_data_bit) != 0)
    valid = (~bad).astype(np.float64)
    i = np.where(bad, 0.0, img)
    v = np.where(bad, 0.0, var)
    cover = fftconvolve(valid, kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = fftconvolve(i, kernel, mode="same") / cover
        cv = fftconvolve(v, kernel * kernel, mode="same") * corr / (cover * cover)
    cm = msk.copy()
    lost = ~(cover >= min_cover) | bad
    ci[lost] = np.nan
    cv[lost] = np.nan
    cm[lost] |= no_data_bit
    return ci.astype(np.float32), cv.astype(np.float32), cm
