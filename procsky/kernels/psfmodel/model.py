"""The PSF model as plain arrays and its evaluation at a detector position.

:class:`PsfModelArrays` holds a cube of polynomial coefficients, one image per term of the
spatial variation (:func:`poly_terms`); :func:`evaluate_model` sums them at (x, y) and
:func:`model_flux_error` gives the model's own PSF-flux error there.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from .._bits import BAD, NO_DATA, SAT, bit

__all__ = ["PsfModelArrays", "poly_terms", "evaluate_model", "model_flux_error"]

_BAD = bit(BAD) | bit(NO_DATA) | bit(SAT)


class PsfModelArrays(NamedTuple):
    """A fitted PSF model as plain arrays.

    Attributes
    ----------
    coeffs : ndarray (n_coeff, M, M) float64
        Polynomial coefficients of each model pixel; term ``c`` multiplies
        ``u**px[c] * v**py[c]`` with ``u = (x - x_center) / x_scale`` and
        ``v = (y - y_center) / y_scale`` (see :func:`poly_terms`).
    order : int
        Polynomial order of the spatial variation.
    x_center, y_center, x_scale, y_scale : float, pixels
    oversample : int
        Model samples per image pixel.
    stamp_size : int
        Size (odd) of the rendered image stamps, pixels.
    fwhm : float, pixels
        Gaussian-equivalent FWHM at (x_center, y_center).
    n_stars, n_reserved : int
        Stars used in the fit and held back.
    reserved_dT_median, reserved_dT_std : float
        Median and scatter of ``(T_star - T_model) / T_star`` on the held-back stars
        (``T = ixx + iyy``), NaN when none were held back.
    reserved_dT : tuple of float
        ``(T_star - T_model) / T_star`` of each held-back star (to pool validation over
        several detectors when each holds only a few stars).
    flux_sys : float
        Fractional PSF-flux error of the model at a position it was not fitted to,
        estimated by cross-validation (:func:`cross_validated_flux_scatter`); NaN when
        too few stars.
    cv_flux_ratio : tuple of float
        The cross-validated ratios behind ``flux_sys`` (one per star, see there).
    warp_order : int
        Order of the size/shear warp part of the model (-1: none; see :func:`fit_psf_model`).
    warp_flux_cov : tuple of float
        Covariance (flattened ``J x J``, ``J`` terms of order ``warp_order``) of the
        polynomial coefficients of the fractional PSF-flux error that the warp's fitting
        noise makes (:func:`model_flux_error`).
    """

    coeffs: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float
    oversample: int
    stamp_size: int
    fwhm: float
    n_stars: int
    n_reserved: int
    reserved_dT_median: float
    reserved_dT_std: float
    reserved_dT: tuple = ()
    flux_sys: float = float("nan")
    cv_flux_ratio: tuple = ()
    warp_order: int = -1
    warp_flux_cov: tuple = ()

    def to_dict(self):
        """JSON-able dict (coefficients as nested lists)."""
        d = self._asdict()
        d["coeffs"] = self.coeffs.tolist()
        d["reserved_dT"] = [float(v) for v in self.reserved_dT]
        d["cv_flux_ratio"] = [float(v) for v in self.cv_flux_ratio]
        d["warp_flux_cov"] = [float(v) for v in self.warp_flux_cov]
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["coeffs"] = np.asarray(d["coeffs"], dtype=np.float64)
        d["reserved_dT"] = tuple(float(v) for v in d.get("reserved_dT", ()))
        d["cv_flux_ratio"] = tuple(float(v) for v in d.get("cv_flux_ratio", ()))
        d["warp_flux_cov"] = tuple(float(v) for v in d.get("warp_flux_cov", ()))
        return cls(**d)


def poly_terms(order):
    """Exponents ``(px, py)`` of the polynomial terms of total degree <= order.

    Returns
    -------
    px, py : ndarray (n_coeff,) int64
        Ordered by degree, then by decreasing power of u: 1, u, v, u^2, uv, v^2, ...
    """
    px, py = [], []
    for d in range(order + 1):
        for j in range(d + 1):
            px.append(d - j)
            py.append(j)
    return np.array(px, dtype=np.int64), np.array(py, dtype=np.int64)


def _basis(u, v, order):
    px, py = poly_terms(order)
    if u.size == 0:
        return np.zeros((0, px.size))
    return np.ascontiguousarray(np.column_stack([u**a * v**b for a, b in zip(px, py)]), dtype=np.float64)


@numba.njit(nogil=True, cache=True)
def _eval_grid(coeffs, px, py, u, v):
    nc, m, _ = coeffs.shape
    out = np.zeros((m, m))
    for c in range(nc):
        t = (u ** px[c]) * (v ** py[c])
        for j in range(m):
            for i in range(m):
                out[j, i] += t * coeffs[c, j, i]
    return out


def evaluate_model(model, x, y):
    """Model grid (M x M, oversampled, un-normalised) at detector position (x, y)."""
    px, py = poly_terms(model.order)
    u = (float(x) - model.x_center) / model.x_scale
    v = (float(y) - model.y_center) / model.y_scale
    return _eval_grid(model.coeffs, px, py, u, v)


def _warp_flux_var(cov, basis_w):
    """Variance of the warp's fractional PSF-flux error at each row of ``basis_w`` (without the
    constant term: a uniform error is the aperture correction's, fitted on the same stars)."""
    b = np.array(basis_w, dtype=np.float64, copy=True)
    b[:, 0] = 0.0
    return np.maximum(np.einsum("ij,jk,ik->i", b, cov, b), 0.0)


def model_flux_error(model, x, y):
    """Fractional PSF-flux error that the fitting noise of the model's warp makes at (x, y).

    ``sqrt(b^T C b)`` with ``b`` the warp's polynomial terms at the position without the
    constant (a uniform flux-scale error is the aperture correction's, measured on the same
    stars) and ``C`` = :attr:`PsfModelArrays.warp_flux_cov`. Zero for a model without warp.

    Parameters
    ----------
    model : PsfModelArrays
    x, y : array_like, pixels

    Returns
    -------
    ndarray, like ``x``
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    if model.warp_order < 0 or not len(model.warp_flux_cov):
        return np.zeros(x.shape)
    j_n = poly_terms(model.warp_order)[0].size
    cov = np.asarray(model.warp_flux_cov, np.float64).reshape(j_n, j_n)
    b = _basis(
        ((x - model.x_center) / model.x_scale).ravel(), ((y - model.y_center) / model.y_scale).ravel(), model.warp_order
    )
    return np.sqrt(_warp_flux_var(cov, b)).reshape(x.shape)
