"""Numba kernels of single-frame processing, on plain numpy blocks.

No dask, no I/O, no astropy objects and no imports from the rest of procsky: the tasks
(``procsky.tasks``) call these on in-memory arrays. Kernels are
``@numba.njit(nogil=True, cache=True)`` (never ``parallel=True``: parallelism comes from
dask). Modules:

``background``   mesh clipped statistics + bicubic spline (SExtractor-like)
``cosmicray``    L.A.Cosmic detection and repair
``detection``    matched-filter significance, footprints, chunked labelling, deblending
``measure``      centroids, adaptive moments, aperture/Kron/PSF fluxes, flags
``psfmodel``     PSF star selection, pixelised polynomial PSF model, rendering
``astrometry``   matching to a reference catalogue, TAN-SIP fit, photometric zero point
``testing``      synthetic star fields with known truth
"""

from .astrometry import fit_tan_sip, match_sources, photometric_zero_point, tan_deproject, tan_project
from .background import Background, estimate_background
from .cosmicray import CosmicRayResult, find_cosmic_rays
from .detection import DetectionResult, detect_sources, label_chunked, label_components
from .measure import FLAG_NAMES, measure_psf_fluxes, measure_sources
from .psfmodel import PsfModelArrays, fit_psf_model, render_psf, render_stamps, select_psf_stars

__all__ = [
    "Background",
    "estimate_background",
    "CosmicRayResult",
    "find_cosmic_rays",
    "DetectionResult",
    "detect_sources",
    "label_components",
    "label_chunked",
    "FLAG_NAMES",
    "measure_sources",
    "measure_psf_fluxes",
    "PsfModelArrays",
    "select_psf_stars",
    "fit_psf_model",
    "render_psf",
    "render_stamps",
    "match_sources",
    "fit_tan_sip",
    "tan_project",
    "tan_deproject",
    "photometric_zero_point",
]
