"""Cosmic-ray detection and repair, one module per algorithm.

* :mod:`.lacosmic`: L.A.Cosmic (van Dokkum 2001), pixel by pixel on the Laplacian of the
  image: :func:`find_cosmic_rays`, :func:`laplacian_plus`, :func:`repair_pixels`;
* :mod:`.sharp`: detections sharper than the PSF model, by a PSF + plane fit that removes
  the sharp pixels: :func:`find_sharp_sources`;
* :mod:`.tracks`: faint tracks across a detection, by line-segment templates fitted
  against the PSF: :func:`find_cr_tracks`.

``calibrate`` runs them in that order: each catches what the previous one, working on a
single pixel or a PSF-shaped excess, cannot see. :mod:`.window` holds the detection window
that the two PSF-fit tests share.
"""

from __future__ import annotations

from .lacosmic import CosmicRayResult, find_cosmic_rays, laplacian_plus, repair_pixels
from .sharp import SharpSourceResult, find_sharp_sources
from .tracks import TrackResult, find_cr_tracks

__all__ = [
    "CosmicRayResult",
    "SharpSourceResult",
    "TrackResult",
    "find_cosmic_rays",
    "find_cr_tracks",
    "find_sharp_sources",
    "laplacian_plus",
    "repair_pixels",
]
