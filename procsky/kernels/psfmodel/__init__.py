"""Pixelised PSF model with polynomial spatial variation (PSFEx-like; Bertin 2011).

* **Star selection** (:func:`select_psf_stars`): bright (S/N above a limit), unflagged
  (saturated, edge, blended, interpolated, bad shape), isolated sources whose adaptive size
  ``T = ixx + iyy`` sits in the stellar locus, found as the densest narrow bin of log T
  among the bright sources (stars are the compact, tight cluster; galaxies are larger and
  spread out) and then sigma-clipped with the MAD.
* **Model** (:func:`fit_psf_model`): every star is resampled with a Lanczos-3 kernel onto
  the model grid centred on its sub-pixel centroid (optionally oversampled) and divided by
  its flux; each model pixel is a polynomial of order 0-3 in the normalised detector
  position, fitted by weighted linear least squares over the stars. The fit is iterated:
  star fluxes are re-measured with the current model (PSF fit) and outlier stars (large
  chi^2) are rejected.
* **Validation**: a fraction of the selected stars is held back; the adaptive moments of
  the model rendered at their positions are compared with theirs.
* **Result**: :class:`PsfModelArrays`, plain arrays (coefficient cube, order, centre and
  scale of the polynomial variables, oversampling, stamp size) for ``procsky.psf`` to wrap;
  :func:`render_psf` / :func:`render_stamps` draw the normalised PSF at any (x, y) with
  its sub-pixel shift.

Modules, each importing only those above it:

* :mod:`.model`: :class:`PsfModelArrays`, :func:`poly_terms`, :func:`evaluate_model`,
  :func:`model_flux_error`;
* :mod:`.sampling`: :func:`lanczos_sample`, :func:`fourier_shift`;
* :mod:`.render`: :func:`render_psf`, :func:`render_stamps`, :func:`stamp_moments`;
* :mod:`.selection`: :func:`select_psf_stars`;
* :mod:`.stamps`: star stamps on the model grid and their weights;
* :mod:`.warp`: the size-and-shear warp of the pixel model (:func:`warp_images`);
* :mod:`.solve`: one least-squares solve of the model, star fluxes;
* :mod:`.validate`: :func:`cross_validated_flux_scatter`;
* :mod:`.fit`: :func:`fit_psf_model`, which runs them all;
* :mod:`.superres`: :func:`fit_supersampled_psf`, the super-sampled model of undersampled
  stars (PSFEx's super-resolution: the fine grid solved over all stars' pixels at once);
* :mod:`.parametric`: :func:`fit_moffat_psf`, a pixel-integrated elliptical Moffat of all stars at
  once, for detectors with too few stars for a pixel model.
"""

from __future__ import annotations

from .fit import fit_psf_model
from .model import PsfModelArrays, evaluate_model, model_flux_error, poly_terms
from .parametric import fit_moffat_psf, moffat_effective_psf
from .render import render_grid, render_psf, render_stamps, stamp_moments
from .sampling import fourier_shift, lanczos_sample
from .selection import select_psf_stars
from .stamps import _extract_stamps_fourier as _extract_stamps_fourier  # the tests exercise it directly
from .superres import fit_supersampled_psf, pixel_gaussian_widths
from .validate import _fit_leverage as _fit_leverage  # the tests exercise it directly
from .validate import cross_validated_flux_scatter
from .warp import warp_images

__all__ = [
    "PsfModelArrays",
    "select_psf_stars",
    "fit_psf_model",
    "fit_supersampled_psf",
    "fit_moffat_psf",
    "moffat_effective_psf",
    "pixel_gaussian_widths",
    "evaluate_model",
    "render_psf",
    "render_stamps",
    "render_grid",
    "stamp_moments",
    "lanczos_sample",
    "fourier_shift",
    "cross_validated_flux_scatter",
    "model_flux_error",
    "warp_images",
    "poly_terms",
]
