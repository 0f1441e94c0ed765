"""Configurations of the calibrate steps: one frozen model per step, gathered by :class:`CalibrationConfig`.

The task configuration (:class:`procsky.tasks.calibrate.CalibrateConfig`) is a
:class:`CalibrationConfig` plus the task's own fields, so that pipeline overrides address a
step's field with a dotted path: ``-c calibrate.psf.order=1``.
"""

from __future__ import annotations

from typing import Literal

import pydantic

__all__ = [
    "AstrometryConfig",
    "BackgroundConfig",
    "CalibrationConfig",
    "CosmicRayConfig",
    "DetectionConfig",
    "MeasurementConfig",
    "PhotometryConfig",
    "PsfConfig",
]

_FROZEN = pydantic.ConfigDict(frozen=True, extra="forbid")


class BackgroundConfig(pydantic.BaseModel):
    """Sky background: clipped mode on a mesh, bicubic spline (:func:`procsky.kernels.background`)."""

    model_config = _FROZEN

    box_size: int = 128
    """Background mesh box size, pixels (LSST default 128)."""
    filter_size: int = 3
    """Median filter over the background mesh, boxes."""


class CosmicRayConfig(pydantic.BaseModel):
    """Cosmic rays: L.A.Cosmic before detection, then the detections sharper than the PSF model."""

    model_config = _FROZEN

    enabled: bool = True
    """Find and repair cosmic rays (L.A.Cosmic and the tests against the PSF model)."""
    sigclip: float = 4.5
    """L.A.Cosmic detection limit (Laplacian / noise)."""
    objlim: float = 5.0
    """L.A.Cosmic contrast limit against fine structure (raise to protect undersampled stars)."""
    grow_sigma: float = 3.5
    """After L.A.Cosmic, CR regions grow along the faint parts of their tracks: a neighbour whose excess over
    the median of its good 5 x 5 surroundings is above this many sigma and 2.5 times its fine structure joins;
    0 switches it off. The bright core of a track passes L.A.Cosmic's test, its faint wings do not, and left
    unflagged they are detected as sources."""
    psf_test: bool = True
    """After the PSF model: test every detection against it and treat those sharper than the
    PSF as cosmic rays (``kernels.cosmicray.find_sharp_sources``)."""
    psf_z: float = 2.0
    """PSF-fit chi^2 excess, in sigma of the chi^2 distribution, above which a detection is cleaned."""
    psf_excess: float = 0.5
    """... and above which fraction of the detection's PSF significance squared."""
    psf_pixel_sigma: float = 3.0
    """Residual (and contrast against opposite neighbours) of a pixel flagged sharper than the PSF, sigma."""
    psf_star_sigma: float = 5.0
    """The same for a cosmic ray on a star (L.A.Cosmic's fine-structure test protects star cores), against
    the noise plus ``psf_model_error`` of the star's model; 0 leaves stars alone. The hit is repaired
    with the clean PSF fit: an unflagged hit biases the star's flux by many sigma."""
    psf_model_error: float = 0.05
    """Fractional PSF-model error allowed for on a star's pixels (value and curvature) in that test."""
    track_test: bool = True
    """Then test the detections below ``track_nu_max`` for faint cosmic-ray tracks, lines sharper than the
    PSF (``kernels.cosmicray.find_cr_tracks``); a detection a track explains, with no PSF-shaped signal left
    beside it, is removed and its track masked CR."""
    track_nu_max: float = 30.0
    """PSF significance above which a detection is not tested for a track."""
    track_rho_max: float = 4.0
    """Largest distance of a tested line from the detection's centroid, pixels. 4 rather than 2: once the
    growth flags a track's bright pixels before detection, what is left to detect is a noise peak lifted by
    the track's faint pixels 3-4 px beside it."""
    track_min_gain: float = 12.0
    """Chi^2 by which the best sharp line must beat the PSF and the best PSF-wide line, each ..."""
    track_min_total: float = 28.0
    """... and both summed."""
    track_star_gain: float = 25.0
    """On a detection above ``track_nu_max``: chi^2 by which a sharp line must improve the PSF fit, and
    beat a PSF-wide line, for a track across the star (flagged CR and repaired, the star kept); 0 leaves
    bright detections alone. A faint track across a bright star otherwise biases its flux by several sigma."""
    track_model_error: float = 0.02
    """Fractional PSF-model error allowed for on a bright detection's pixels in that test."""
    undersampled_fwhm: float = 2.5
    """Below this PSF FWHM (pixels) the frame is undersampled and the cosmic-ray steps hold every flag to the
    PSF (LSST's ``findCosmicRays`` criterion, ``kernels.cosmicray.psfsharp``): an L.A.Cosmic candidate must be
    sharper along its row, column or a diagonal than the sharpest star the frame holds allows, and L.A.Cosmic's
    growth stops at pixels that provably peak like the PSF (a star core beside a hit). The FWHM is the smaller
    of the seeing guess and the locus of the bright peaks of the frame (S/N > 30, or > 15 on a sparse frame;
    before the PSF model), then also of the PSF model. Noted ``cr_undersampled``; 0 switches these L.A.Cosmic
    steps off. The later PSF-model tests hold their flags to the same criterion on every frame, undersampled
    or not (in a crowded field the residual of a PSF fit holds its blended neighbours, exactly as sharp as the
    PSF): a pixel of a detection they keep is flagged only when it is sharper than the PSF allows."""
    undersampled_margin: float = 0.7
    """Fraction of the PSF's centred-peak neighbour ratio a cosmic-ray pixel must be below (LSST's
    ``cond3_fac2``), for the error of the PSF estimate."""
    undersampled_sigma: float = 3.0
    """Significance of that contrast (LSST's ``cond3_fac``)."""


class DetectionConfig(pydantic.BaseModel):
    """Detection: PSF-matched filter, threshold, footprints, deblending; satellite trails."""

    model_config = _FROZEN

    nsigma: float = 5.0
    """Detection threshold in units of the smoothed noise."""
    threshold: str = "empirical"
    """``"empirical"``: the threshold is ``nsigma`` times the measured spread of the smoothed
    significance away from sources, above its median (LSST's ``pixel_stdev`` with a temporary local
    background); ``"variance"``: in units of the noise the variance plane predicts. The light of
    sources below the threshold shifts and widens the smoothed significance by a few per cent, which a
    variance-plane threshold turns into spurious noise bumps."""
    initial_fwhm_arcsec: float = 1.0
    """First guess of the seeing FWHM when the input has no PSF, arcsec."""
    streaks: bool = True
    """Find satellite trails (:func:`procsky.kernels.streak.find_streaks`): STREAK plane set, the fitted trail
    subtracted from the calexp, sources detected again, and those on the trail flagged ``flag_streak`` and kept
    out of the PSF, astrometric and photometric fits."""
    streak_mask_fraction: float = 0.5
    """The STREAK plane covers the pixels where the fitted trail exceeds this fraction of the pixel noise."""


class MeasurementConfig(pydantic.BaseModel):
    """Source measurement: apertures, the aperture correction and the aperture-to-total correction."""

    model_config = _FROZEN

    aperture_radii: tuple[float, ...] = (3.0, 4.5, 6.0, 9.0, 12.0, 17.0)
    """Circular aperture radii, pixels."""
    apcorr_radius: float = 17.0
    """Aperture (one of ``aperture_radii``) the PSF fluxes are corrected to, pixels: the largest one used."""
    apcorr_fwhm: float | None = 4.0
    """The aperture correction uses the smallest of ``aperture_radii`` at least this many PSF FWHM wide,
    ``apcorr_radius`` at most (None: always ``apcorr_radius``). A radius far beyond the PSF only adds
    the light of neighbours and the error of the sky: on a crowded 1"/px frame (FWHM 1.7 px) the 17 px
    aperture held 6 % more than the star and the growth curve beyond it 3 % more, so PSF fluxes came
    out 5 % high and calibrated aperture fluxes 5 % low; at 9 px both are within 0.1 % of the truth.
    Well-sampled frames (FWHM >= 3.4 px) keep 17 px. The growth curve then starts at that radius,
    through the larger ``aperture_radii`` to the ``growth_edges``."""
    total_flux_correction: bool = True
    """Also correct PSF fluxes from the ``apcorr_radius`` aperture to the total flux, measured on the
    growth curve of the bright stars out to ``growth_edges`` with a local sky in ``growth_sky_annulus``
    (``kernels.growth.aperture_to_total``). Without it the zero point, fitted against total reference
    magnitudes, absorbs the light outside the aperture (a few mmag for a Moffat PSF)."""
    growth_edges: tuple[float, ...] = (17.0, 21.0, 26.0, 32.0, 40.0)
    """Ring edges of the growth curve, pixels (the first is ``apcorr_radius``)."""
    growth_sky_annulus: tuple[float, float] = (48.0, 64.0)
    """Local sky annulus of the growth curve, pixels."""
    growth_min_snr: float = 100.0
    """Minimum aperture S/N of the stars whose growth curve is measured."""
    encircled_energy: tuple[tuple[float, float], ...] | None = None
    """The instrument's encircled-energy curve ``((radius px, fraction of the total flux), ...)``, radii
    increasing: an optical model of the telescope (WebbPSF, TinyTim) or the instrument team's tables, as
    HST and JWST photometry corrects apertures to infinity (``kernels.growth.encircled_energy`` makes one
    from a PSF image). When set, the aperture-to-total correction is ``1 / EE(apcorr radius)`` instead of the
    growth curve of the frame's stars, which a sparse frame cannot measure (the ``space`` regime: 3-5 stars
    of S/N 20-50 give 1.07 +- 0.05 where a diffraction PSF's wings hold 10 % beyond 12 px); the stars'
    curve, where measured, is compared with it (noted ``aperture_to_total_instrument_differs``)."""
    psf_neighbour_iterations: int = 2
    """Sweeps of neighbour-subtracted PSF fits after the individual ones (DAOPHOT ALLSTAR's neighbour
    subtraction, ``kernels.measure.neighbour_subtracted_psf_fluxes``): each source is refitted with every
    other source's fitted PSF model subtracted. 0: individual fits, which hold faint neighbours' light
    (+1.4 % on the crowded regime's stars)."""

    @pydantic.field_validator("encircled_energy")
    @classmethod
    def _check_encircled_energy(cls, v):
        if v is not None:
            r = [p[0] for p in v]
            if len(v) < 2 or any(b <= a for a, b in zip(r, r[1:])) or r[0] <= 0:
                raise ValueError("encircled_energy: at least 2 (radius, EE) pairs with increasing positive radii")
            if not all(0 < p[1] <= 1 for p in v):
                raise ValueError("encircled_energy: every EE in (0, 1]")
        return v


class PsfConfig(pydantic.BaseModel):
    """PSF: star selection on the size-flux locus, pixelised polynomial model with a size-and-shear warp."""

    model_config = _FROZEN

    min_snr: float = 50.0
    """Minimum S/N of PSF star candidates."""
    isolation_radius: float = 10.0
    """No other detection within this radius of a PSF star, pixels."""
    locus_max_excess: float = 0.05
    """With fewer than 5 candidates above ``min_snr`` the S/N cut drops to 20 around the bright stars'
    locus (when at least 2 bright candidates give it); those fainter candidates must also lie less than this
    (dex in ``T = ixx + iyy``) above it, since compact galaxies outnumber stars there
    (``kernels.psfmodel.select_psf_stars``, ``max_excess``) and would widen the model."""
    order: int = 2
    """Polynomial order of the PSF spatial variation (lowered automatically with few stars)."""
    stamp_size: int = 25
    """PSF model stamp size, pixels (odd)."""
    min_stars_per_term: float = 3.0
    """A PSF model with n > 1 polynomial terms needs ``min_stars_per_term * n + 3`` stars, a constant
    one 5: every pixel of the model is a polynomial fit, and with 2 stars per term a detector with ~15
    stars gets models that extrapolate PSF fluxes wrong by per cents into its corners."""
    warp_order: int = 1
    """Order of the size-and-shear warp of the PSF model (``kernels.psfmodel.warp_images``)
    that follows the PSF's spatial variation when the stars are too few for a pixel
    polynomial of that order (-1: pixel polynomials only). Each star constrains three
    numbers (size, two shears) rather than a whole image per term, so the warp follows the
    variation with far fewer stars (``benchmarks/eval_psf_model_small.py``)."""
    warp_prior: float = 0.01
    """Gaussian prior width of the warp's non-constant terms (fractional size or shear change
    at the detector edge): with few, faint stars a compact galaxy or noise otherwise makes a
    gradient of several per cent."""
    pixel_stars_per_term: float = 10.0
    """With the warp on, a pixel polynomial of order > 0 needs this many stars per term (plus
    3): it replaces the warp only where there are enough stars to fit whole images per term."""
    flux_sys_error: bool = True
    """Add the PSF model's cross-validated fractional flux error (``summary["psf_flux_sys"]``,
    estimated from this detector's PSF stars) in quadrature to ``psf_flux_err``."""
    reserve_fraction: float = 0.2
    """Fraction of PSF stars held back for validation."""
    fallback_moffat: bool = True
    """With too few stars for a pixel model, fit an elliptical Moffat (4 shape numbers) to all of them at once
    (``kernels.psfmodel.fit_moffat_psf``; noted ``few_psf_stars``). On the ``stamp256`` regime (5 stars on
    256 x 256 px) the Gaussian of their moments was 9 % wider than the truth at half maximum."""
    fallback_gaussian: bool = True
    """With too few stars for a pixel model, use a Gaussian of the stars' moments (else AlgorithmError)."""
    min_pixels_for_failure: int = 512 * 512
    """Images smaller than this without any usable star end NoWorkError (a cut-out), larger
    ones AlgorithmError (a real failure)."""
    undersampled_fwhm: float = 2.5
    """Below this FWHM (pixels, half maximum of the pixel-level model) the PSF is undersampled: the
    model is fitted again super-sampled (``oversample`` samples per pixel, PSFEx's approach, Bertin 2011;
    ``kernels.psfmodel.fit_supersampled_psf``) to many more stars (``undersampled_min_snr``,
    ``undersampled_isolation``, ``undersampled_max_stars``), with centres fitted with the model.
    A pixel-level model of an undersampled PSF cannot be shifted to a star's sub-pixel centre (its
    samples alias): its PSF fluxes depend on the pixel phase by several per cent. 0 switches it off."""
    oversample: int = 2
    """Samples per pixel of the super-sampled model (>= 2). 2 as PSFEx's usual sampling; 3 leaves more of
    the fine grid to noise with tens of stars (PSF fluxes on the ``undersampled`` regime: centre - corner
    -7 % at 3, < 1 % at 2)."""
    supersampled_fit_size: int = 13
    """Side of the pixel cut-out of each star fitted by the super-sampled model, and of that model
    (odd, pixels); the light beyond is the aperture corrections'."""
    undersampled_min_snr: float = 20.0
    """Minimum S/N of the PSF stars of a super-sampled model (each star constrains only a few samples
    of the fine grid: the model wants many stars at many pixel phases)."""
    undersampled_isolation: float = 7.0
    """No other detection within this radius of a PSF star of a super-sampled model, pixels (the fit's
    chi^2 clipping rejects the stars a faint neighbour spoils)."""
    undersampled_max_stars: int = 3000
    """At most this many PSF stars (the highest S/N) for a super-sampled model."""
    supersampled_min_stars: int = 25
    """Fewest PSF stars a super-sampled model of order 0 is fitted to (30 per polynomial term above); with
    fewer the pixel-level model stays, noted ``psf_not_supersampled``."""
    supersampled_ridge: float = 0.03
    """Weight of the pull of every sample of the super-sampled model towards the effective PSF of the
    stars' Gaussian (``kernels.psfmodel.fit_supersampled_psf``, ``ridge``). With a few tens of stars, a few
    of them bright, the fine grid's sub-pixel structure is noise: on the ``undersampled`` regime's best-seeing
    visit (FWHM 1.6 px, 30 stars) PSF fluxes of stars centred on a pixel differ from those on a corner by
    -7 % at 0.001, -2 % at 0.03 (FWHM +5 %), -0.3 % at 0.1 (FWHM +5 %); with 50-60 stars it does not matter
    (< 0.3 %, FWHM +0.5 % at 0.03)."""


class AstrometryConfig(pydantic.BaseModel):
    """Astrometry: reference stars matched by offset voting, TAN-SIP fit."""

    model_config = _FROZEN

    match_max_offset: float = 100.0
    """Largest header-WCS error searched by the matcher, pixels."""
    match_max_rotation: float = 1.0
    """Largest header-WCS rotation error searched, degrees."""
    match_radius: float = 1.5
    """Final matching radius, pixels (also that of the zero-point stars)."""
    min_matches: int = 5
    """Fewer matches: keep the header WCS (or fail, see ``fallback``)."""
    max_rms_arcsec: float = 0.3
    """A fit with a larger rms is rejected (header WCS kept, or AlgorithmError), arcsec."""
    sip_order: int = 3
    """SIP order of a full TAN-SIP fit."""
    min_stars_per_sip_coefficient: float = 3.0
    """A full fit needs this many matches per coefficient; else linear on the header SIP."""
    fallback: Literal["header", "fail"] = "header"
    """What to do with too few reference matches: keep the header WCS, or AlgorithmError."""
    apply_proper_motion: bool = True
    """Move reference positions to the visit epoch when proper motions are given."""


class PhotometryConfig(pydantic.BaseModel):
    """Photometry: the detector's zero point against the reference magnitudes."""

    model_config = _FROZEN

    refcat_band_map: dict[str, str] = {}
    """Band -> reference magnitude column suffix (e.g. {"z": "RP"}); default ``mag_<band>``."""
    min_snr: float = 20.0
    """Minimum S/N of stars used for the zero point."""
    min_stars: int = 3
    """Fewer stars: keep the header zero point (or fail, see ``fallback``)."""
    fallback: Literal["header", "fail"] = "header"
    """What to do without a zero point from the reference catalogue."""


class CalibrationConfig(pydantic.BaseModel):
    """Configuration of :func:`procsky.calibrate.calibrate_exposure`: one nested model per step."""

    model_config = _FROZEN

    background: BackgroundConfig = BackgroundConfig()
    cosmic_rays: CosmicRayConfig = CosmicRayConfig()
    detection: DetectionConfig = DetectionConfig()
    measurement: MeasurementConfig = MeasurementConfig()
    psf: PsfConfig = PsfConfig()
    astrometry: AstrometryConfig = AstrometryConfig()
    photometry: PhotometryConfig = PhotometryConfig()
    min_usable_pixels: int = 10000
    """Fewer unmasked pixels than this: NoWorkError (tiny cut-outs)."""
    refcat_name: str | None = None
    """Reference catalogue to use (None: the only one attached; error if several)."""
