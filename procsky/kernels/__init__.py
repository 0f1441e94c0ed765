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

The names below are re-exported lazily (PEP 562 module ``__getattr__``): importing one
kernel module (``from procsky.kernels import warp``) does not import the others, so a
coadd worker does not load the cosmic-ray, detection or PSF-fitting code (nor scipy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .astrometry import fit_tan_sip, match_sources, photometric_zero_point, tan_deproject, tan_project
    from .background import Background, estimate_background
    from .cosmicray import CosmicRayResult, find_cosmic_rays
    from .detection import DetectionResult, detect_sources, label_chunked, label_components
    from .measure import FLAG_NAMES, measure_psf_fluxes, measure_sources
    from .psfmodel import PsfModelArrays, fit_psf_model, render_psf, render_stamps, select_psf_stars

# re-exported name -> the submodule that defines it
_EXPORTS = {
    "Background": "background",
    "estimate_background": "background",
    "CosmicRayResult": "cosmicray",
    "find_cosmic_rays": "cosmicray",
    "DetectionResult": "detection",
    "detect_sources": "detection",
    "label_components": "detection",
    "label_chunked": "detection",
    "FLAG_NAMES": "measure",
    "measure_sources": "measure",
    "measure_psf_fluxes": "measure",
    "PsfModelArrays": "psfmodel",
    "select_psf_stars": "psfmodel",
    "fit_psf_model": "psfmodel",
    "render_psf": "psfmodel",
    "render_stamps": "psfmodel",
    "match_sources": "astrometry",
    "fit_tan_sip": "astrometry",
    "tan_project": "astrometry",
    "tan_deproject": "astrometry",
    "photometric_zero_point": "astrometry",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
