"""Image subtraction: PSF matching, convolution per chunk, decorrelation, DIA measurement.

The layer between the numba/numpy kernels (:mod:`procsky.kernels.psfmatch`,
:mod:`procsky.kernels.convolve`, :mod:`procsky.kernels.dipole`, :mod:`procsky.kernels.detection`)
and the thin pipeline tasks (:mod:`procsky.tasks.diffim`, :mod:`procsky.tasks.dia`). Its
dask work goes through :mod:`procsky._dask`: the matching-kernel convolution, the variance
and mask propagation and the decorrelation run per chunk with an overlap of the kernel
half-width.

A difference is lazy, like a coadd: :func:`subtract_images` and :func:`difference_image`
build a graph and compute nothing. The kernel fit needs the pixels of the star stamps and
the noise measurements (variance rescaling, registration noise, noise correlation) those of
the whole difference, and their results shape the difference's PSF and summary as well as
its planes: they run in one task of the graph (:func:`deferred`, whose inputs are the
pixel planes of the calexp and templates) that the planes, the PSF and the metadata share,
so that writing the difference (or ``Exposure.compute``) computes it once, on any scheduler.

Public functions
----------------
subtract_images(science, template, config)
    Fit an Alard-Lupton kernel; the difference :class:`~procsky.exposure.Exposure`, the
    kernel and a summary dict.
difference_image(calexp, templates, config)
    One detector's difference as the ``subtract`` task stores it (template warp,
    subtraction, DIA detections in the mask).
detect_dia_sources(diff, config)
    Detection in both polarities and measurement -> ``dia_source`` DataFrame;
    :func:`diffim_summary` the per-detector summary.
forced_dia_photometry(diff, ra, dec, ids)
    PSF fluxes at fixed positions -> ``dia_forced_source`` rows.
simulate_pair(...)
    A synthetic science/template pair with known stars and transients (tests, benchmarks).

Submodules: :mod:`.subtract` (PSF matching and subtraction), :mod:`.dia` (DIA sources),
:mod:`.detector` (one detector's difference and summary, as the tasks use them),
:mod:`.lazy` (the deferred computation) and :mod:`.simulate` (synthetic pairs).
"""

from __future__ import annotations

from .detector import (
    DIFFERENCE_METADATA,
    difference_image,
    diffim_summary,
    note_subtraction,
    warp_template_to_science,
    with_recorded_summary,
)
from .dia import (
    DiaConfig,
    detect_dia_sources,
    dia_detection_mask,
    forced_dia_photometry,
)
from .dia import (
    _dipole_fit as _dipole_fit,  # benchmarks, tests
)
from .dia import (
    _fft_friendly_half as _fft_friendly_half,  # benchmarks, tests
)
from .dia import (
    _oversampled_psf as _oversampled_psf,  # benchmarks, tests
)
from .lazy import LazyPsf, deferred, deferred_exposure, deferred_part
from .simulate import _render_star as _render_star  # tests, benchmarks
from .simulate import simulate_pair
from .subtract import (
    SubtractionConfig,
    convolve_exposure_arrays,
    corrected_score_variance,
    psf_sigma_at,
    registration_noise,
    subtract_images,
)

__all__ = [
    "SubtractionConfig",
    "DiaConfig",
    "subtract_images",
    "convolve_exposure_arrays",
    "detect_dia_sources",
    "forced_dia_photometry",
    "simulate_pair",
    "psf_sigma_at",
    "registration_noise",
    "corrected_score_variance",
    "dia_detection_mask",
    "warp_template_to_science",
    "difference_image",
    "diffim_summary",
    "with_recorded_summary",
    "note_subtraction",
    "LazyPsf",
    "deferred",
    "deferred_exposure",
    "deferred_part",
    "DIFFERENCE_METADATA",
]
