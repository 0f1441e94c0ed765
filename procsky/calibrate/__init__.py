"""Single-frame calibration: an ``isr_exposure`` (the ISR output, or an ingested
instrument-calibrated frame) becomes ``calexp``, ``src`` and ``calibrate_summary``.

The chain (LSST ``CalibrateTask`` / ``CharacterizeImageTask`` in one pass, DESIGN.md 7.2) is a
sequence of named steps, each a module with its own configuration, passing a
:class:`CalibrateState`:

1. :mod:`.background`: 128-px mesh, clipped mode, bicubic spline, subtracted; re-estimated once
   with the detection footprints left out.
2. :mod:`.cosmicrays` (L.A.Cosmic, then grown along the faint parts of the tracks): CR and INTRP
   planes set, pixels repaired.
3. :mod:`.detection`: PSF-matched filter, threshold from the measured spread of the smoothed
   significance, footprints grown, deblended peaks; satellite trails masked STREAK, subtracted,
   and the detection repeated (sources on a trail carry ``flag_streak`` and stay out of the fits).
4. :mod:`.measurement`: windowed centroids, adaptive moments, aperture, Kron and (later) PSF
   fluxes, flags.
5. :mod:`.psf`: star selection on the size-flux locus, pixelised polynomial PSF with a
   size-and-shear warp, Gaussian fallback. Then every detection is tested against the PSF model
   (:func:`.cosmicrays.remove_sharp_sources`): faint cosmic-ray tracks are masked and dropped.
6. :mod:`.measurement` again with the PSF model: PSF fluxes, aperture correction, aperture to total,
   PSF-flux errors including the model's own.
7. :mod:`.astrometry`: reference stars matched by offset voting, TAN-SIP fit, its error at every source.
8. :mod:`.photometry`: the detector's zero point.
9. :mod:`.catalogue`: ``src``, the calexp and the summary.

:func:`calibrate_exposure` runs them on an Exposure, :func:`process_arrays` the pixel steps (1-6)
on bare arrays. The task (:class:`procsky.tasks.calibrate.CalibrateTask`) reads the inputs and
calls :func:`calibrate_exposure`.
"""

from procsky.calibrate.catalogue import SRC_UNITS
from procsky.calibrate.config import (
    AstrometryConfig,
    BackgroundConfig,
    CalibrationConfig,
    CosmicRayConfig,
    DetectionConfig,
    MeasurementConfig,
    PhotometryConfig,
    PsfConfig,
)
from procsky.calibrate.driver import (
    calibrate_exposure,
    make_state,
    process_arrays,
    run_detection_steps,
    run_pixel_steps,
    state_from_exposure,
)
from procsky.calibrate.psf import fit_detector_psf
from procsky.calibrate.state import CalibrateState

__all__ = [
    "SRC_UNITS",
    "AstrometryConfig",
    "BackgroundConfig",
    "CalibrateState",
    "CalibrationConfig",
    "CosmicRayConfig",
    "DetectionConfig",
    "MeasurementConfig",
    "PhotometryConfig",
    "PsfConfig",
    "calibrate_exposure",
    "fit_detector_psf",
    "make_state",
    "process_arrays",
    "run_detection_steps",
    "run_pixel_steps",
    "state_from_exposure",
]
