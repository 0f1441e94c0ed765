"""Simulation recipes: validated YAML descriptions of a simulated survey.

A recipe names the focal plane (``instrument``), the field centre, the dither pattern,
the bands with their exposure times, visit counts and depths, the populations drawn
(stars, galaxies, variables, transients, an optional NFW lensing halo), the artefacts
(cosmic rays, defects, satellite trails), the instrument signature used in raw mode, and
the random ``seed``. Every model forbids unknown keys so that a typo fails loudly with
the key's name.

Recipes are found by name in ``procsky/sim/recipes/`` (packaged) and ``datasets/`` (the
project's copy), or given as a path to a YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyValueError

__all__ = [
    "Recipe",
    "InstrumentConfig",
    "FieldConfig",
    "DitherConfig",
    "BandConfig",
    "SeeingConfig",
    "PsfConfig",
    "NoiseConfig",
    "StarConfig",
    "GalaxyConfig",
    "VariableConfig",
    "TransientConfig",
    "ShearConfig",
    "ArtifactConfig",
    "RawConfig",
    "RefcatConfig",
    "load_recipe",
    "recipe_names",
    "recipe_path",
    "KNOWN_BANDS",
]

#: Bands simcam has filters for.
KNOWN_BANDS = ("u", "g", "r", "i", "z", "y")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstrumentConfig(_Model):
    """The simcam focal plane: ``n_detectors_x`` x ``n_detectors_y`` identical CCDs."""

    n_detectors_x: int = Field(2, ge=1, le=20, description="detectors along x")
    n_detectors_y: int = Field(2, ge=1, le=20, description="detectors along y")
    detector_nx: int = Field(512, ge=64, le=8192, description="science pixels along x")
    detector_ny: int = Field(512, ge=64, le=8192, description="science pixels along y")
    gap_px: int = Field(40, ge=0, description="gap between detectors, pixels")
    pixel_scale: float = Field(0.2, gt=0, description="arcsec per pixel")
    gain: float = Field(1.5, gt=0, description="e-/ADU")
    read_noise: float = Field(5.0, ge=0, description="e- rms")
    full_well: float = Field(90000.0, gt=0, description="saturation, e-")
    distortion_px: float = Field(3.0, ge=0, description="radial distortion at the focal-plane corner, pixels")
    placement_rms_px: float = Field(0.5, ge=0, description="rms detector placement error, pixels")
    placement_rotation_rms_deg: float = Field(0.01, ge=0, description="rms detector rotation, deg")


class FieldConfig(_Model):
    ra: float = Field(150.0, ge=0, lt=360, description="field centre RA, deg")
    dec: float = Field(2.0, ge=-89, le=89, description="field centre Dec, deg")


class DitherConfig(_Model):
    """Boresight offsets (arcsec, in the tangent plane at the field centre) and rotations.

    ``pattern: random`` draws offsets uniformly in a disc of ``max_offset_arcsec``;
    ``pattern: list`` cycles through ``offsets_arcsec``. Rotations (sky position angle,
    deg) cycle through ``rotations_deg`` in both cases.
    """

    pattern: Literal["random", "list"] = "random"
    max_offset_arcsec: float = Field(30.0, ge=0)
    offsets_arcsec: list[tuple[float, float]] = Field(default_factory=lambda: [(0.0, 0.0)])
    rotations_deg: list[float] = Field(default_factory=lambda: [0.0])

    @field_validator("offsets_arcsec", "rotations_deg")
    @classmethod
    def _non_empty(cls, v, info):
        if len(v) == 0:
            raise ValueError(f"{info.field_name} must list at least one value")
        return v


class BandConfig(_Model):
    """One band: its name, exposure time, number of visits and single-visit depth."""

    name: Literal["u", "g", "r", "i", "z", "y"]
    exposure_time: float = Field(..., description="seconds")
    n_visits: int = Field(..., ge=1)
    depth: float = Field(..., gt=10, lt=35, description="5 sigma point-source AB depth of one visit at median seeing")

    @field_validator("exposure_time")
    @classmethod
    def _positive(cls, v):
        if not v > 0:
            raise ValueError(f"exposure_time must be > 0 seconds, got {v}")
        return v


class SeeingConfig(_Model):
    median_fwhm: float = Field(0.8, gt=0.2, lt=5, description="atmospheric FWHM at zenith, arcsec")
    min_fwhm: float = Field(0.55, gt=0.1)
    max_fwhm: float = Field(1.3, gt=0.2)
    optics_fwhm: float = Field(0.35, ge=0, description="Gaussian optics+jitter FWHM, arcsec")
    beta_range: tuple[float, float] = Field((3.0, 4.5), description="Moffat beta range (>=2.5)")
    ellipticity_rms: float = Field(0.02, ge=0, le=0.2, description="rms of the constant PSF shear per component")
    variation: float = Field(1.0, ge=0, le=5, description="scale of spatial variation (0 = constant PSF)")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_fwhm <= self.median_fwhm <= self.max_fwhm:
            raise ValueError("need min_fwhm <= median_fwhm <= max_fwhm")
        if self.beta_range[0] < 2.5 or self.beta_range[1] < self.beta_range[0]:
            raise ValueError("beta_range must be (low, high) with 2.5 <= low <= high")
        return self


class PsfConfig(_Model):
    """The PSF family (see :mod:`procsky.sim.psf`).

    ``atmospheric`` (default) uses the ``seeing`` section: Moffat (x) Gaussian, varying
    across the focal plane; with coarse pixels (``instrument.pixel_scale: 1.0``) it gives
    undersampled ground data. ``space`` ignores ``seeing`` and draws a diffraction-limited
    PSF (GalSim ``OpticalPSF``: obscured pupil with struts, so Airy wings and diffraction
    spikes, per-visit Zernike aberrations) convolved with a Gaussian pointing jitter.
    """

    family: Literal["atmospheric", "space"] = "atmospheric"
    diameter_m: float = Field(2.4, gt=0.1, le=40, description="space: primary mirror diameter, m")
    obscuration: float = Field(0.33, ge=0, lt=0.9, description="space: linear central obscuration")
    nstruts: int = Field(4, ge=0, le=12, description="space: spider struts (each gives a diffraction spike pair)")
    strut_thick: float = Field(0.03, ge=0, lt=0.3, description="space: strut width, fraction of the diameter")
    strut_angle_deg: float = Field(45.0, description="space: angle of the first strut from +y, counter-clockwise, deg")
    aberration_rms: float = Field(
        0.03, ge=0, le=0.3, description="space: rms of each Zernike term (defocus, astig, coma) per visit, waves"
    )
    jitter_fwhm: float = Field(0.01, ge=0, description="space: Gaussian pointing jitter FWHM, arcsec")


class NoiseConfig(_Model):
    """Pixel noise correlation.

    ``correlation: lanczos3`` resamples the noise field (Poisson, dark and read noise; not
    the signal, cosmic rays or defects) with a separable Lanczos-3 sub-pixel shift, as a
    warp to another pixel grid does: the noise in neighbouring pixels becomes correlated and
    its per-pixel variance drops by ``sum(w_x^2) sum(w_y^2)`` while the variance plane stays
    the pre-resampling one (as in LSST's warps, which carry a noise-correlation factor).
    ``shift_px`` fixes the shift ``(dx, dy)``; ``null`` draws it per visit and detector,
    uniform in [-0.5, 0.5). The shift and the resulting variance factor and neighbour
    correlations are in ``truth/detectors.parquet`` (``noise_*``).
    """

    correlation: Literal["none", "lanczos3"] = "none"
    shift_px: tuple[float, float] | None = Field(None, description="sub-pixel shift (dx, dy), |d| <= 0.5")

    @field_validator("shift_px")
    @classmethod
    def _sub_pixel(cls, v):
        if v is not None and not all(abs(d) <= 0.5 for d in v):
            raise ValueError(f"shift_px components must be within [-0.5, 0.5], got {v}")
        return v


class StarConfig(_Model):
    density: float = Field(5000.0, ge=0, description="stars per deg^2 between mag_min and mag_max (r band)")
    mag_min: float = 16.0
    mag_max: float = 25.0
    slope: float = Field(0.12, description="dlog10 N / dm")


class GalaxyConfig(_Model):
    density: float = Field(20.0, ge=0, description="galaxies per arcmin^2 between mag_min and mag_max (r band)")
    mag_min: float = 18.0
    mag_max: float = 25.0
    slope: float = Field(0.33, description="dlog10 N / dm")
    max_bulge_fraction: float = Field(0.8, ge=0, le=1)
    ellipticity_rms: float = Field(0.25, ge=0, le=0.6, description="rms intrinsic |g| (Rayleigh sigma)")


class VariableConfig(_Model):
    number: int = Field(5, ge=0, description="number of periodic variable stars")
    mag_min: float = 17.0
    mag_max: float = 22.0
    period_days: tuple[float, float] = (0.3, 20.0)
    amplitude: tuple[float, float] = Field((0.1, 0.5), description="fractional flux semi-amplitude range")


class TransientConfig(_Model):
    number: int = Field(3, ge=0)
    peak_mag: tuple[float, float] = (19.5, 22.5)
    rise_days: tuple[float, float] = (2.0, 8.0)
    decay_days: tuple[float, float] = (8.0, 30.0)
    host_fraction: float = Field(0.7, ge=0, le=1)


class ShearConfig(_Model):
    """An NFW halo lensing the galaxies (GalSim ``NFWHalo``)."""

    enabled: bool = False
    mass_msun: float = Field(5e14, gt=0, description="M_vir in solar masses / h")
    concentration: float = Field(4.0, gt=0)
    redshift: float = Field(0.3, gt=0)
    offset_arcsec: tuple[float, float] = Field((0.0, 0.0), description="halo centre relative to the field centre")
    max_shear: float = Field(0.5, gt=0, lt=1)


class ArtifactConfig(_Model):
    cosmic_ray_rate: float = Field(1.0, ge=0, description="cosmic rays per megapixel per second")
    bad_columns_per_detector: int = Field(2, ge=0)
    hot_pixels_per_mpix: float = Field(40.0, ge=0)
    satellite_probability: float = Field(0.2, ge=0, le=1, description="chance a visit has a satellite trail")


class RawConfig(_Model):
    """Instrument signature added in raw mode (removed exactly by bias, dark and flat)."""

    overscan_columns: int = Field(32, ge=4)
    bias_level: float = Field(1000.0, ge=0, description="ADU")
    bias_structure: float = Field(3.0, ge=0, description="amplitude of the 2-d bias pattern, ADU")
    dark_current: float = Field(0.002, ge=0, description="e-/s/pixel")
    hot_pixel_dark: tuple[float, float] = Field((2.0, 30.0), description="hot pixel dark current range, e-/s")
    vignetting: float = Field(0.08, ge=0, lt=0.5, description="flat-field drop at the focal-plane corner")
    prnu: float = Field(0.008, ge=0, lt=0.1, description="pixel response non-uniformity rms")
    n_bias_frames: int = Field(5, ge=0, le=100, description="individual bias exposures written per detector")
    n_flat_frames: int = Field(5, ge=0, le=100, description="individual flat exposures per detector and band")
    n_dark_frames: int = Field(5, ge=0, le=100, description="individual dark exposures written per detector")
    dark_exposure_time: float = Field(120.0, gt=0, description="dark exposure time, s")
    flat_level: float = Field(30000.0, gt=0, description="mean flat-lamp illumination, e-/pixel")
    flat_exposure_time: float = Field(5.0, ge=0, description="flat exposure time, s (dark current accrues)")


class RefcatConfig(_Model):
    mag_limit: float = Field(20.5, description="Gaia-like depth (r band)")
    epoch_mjd: float = Field(57388.0, description="catalogue epoch (Gaia DR3: J2016.0)")


class Recipe(_Model):
    """A simulated survey (see the module docstring and ``datasets/README.md``)."""

    name: str = "custom"
    seed: int = Field(0, ge=0, lt=2**32)
    description: str = ""
    instrument: InstrumentConfig = Field(default_factory=InstrumentConfig)
    field: FieldConfig = Field(default_factory=FieldConfig)
    dither: DitherConfig = Field(default_factory=DitherConfig)
    bands: list[BandConfig]
    mjd_start: float = 60310.0
    cadence_days: float = Field(2.0, gt=0)
    seeing: SeeingConfig = Field(default_factory=SeeingConfig)
    psf: PsfConfig = Field(default_factory=PsfConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    stars: StarConfig = Field(default_factory=StarConfig)
    galaxies: GalaxyConfig = Field(default_factory=GalaxyConfig)
    variables: VariableConfig = Field(default_factory=VariableConfig)
    transients: TransientConfig = Field(default_factory=TransientConfig)
    shear: ShearConfig = Field(default_factory=ShearConfig)
    artifacts: ArtifactConfig = Field(default_factory=ArtifactConfig)
    raw: RawConfig = Field(default_factory=RawConfig)
    refcat: RefcatConfig = Field(default_factory=RefcatConfig)

    @field_validator("bands")
    @classmethod
    def _bands(cls, v):
        if len(v) == 0:
            raise ValueError(
                "bands must list at least one band, e.g. [{name: r, exposure_time: 30, n_visits: 5, depth: 24}]"
            )
        names = [b.name for b in v]
        if len(set(names)) != len(names):
            raise ValueError(f"bands are repeated: {names}")
        return v

    @model_validator(mode="after")
    def _flat_level_unsaturated(self):
        # the PRNU tail reaches a few % above 1: keep flat frames below the full well and the ADC
        if self.raw.n_flat_frames > 0:
            peak = 1.1 * self.raw.flat_level
            if peak > self.instrument.full_well or peak / self.instrument.gain + self.raw.bias_level > 65000:
                raise ValueError(
                    f"raw.flat_level {self.raw.flat_level} e- saturates the flat frames (full well "
                    f"{self.instrument.full_well} e-, gain {self.instrument.gain}); lower it"
                )
        return self

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    @property
    def n_visits(self) -> int:
        return sum(b.n_visits for b in self.bands)

    @property
    def n_detectors(self) -> int:
        return self.instrument.n_detectors_x * self.instrument.n_detectors_y

    def with_seed(self, seed: int | None) -> Recipe:
        """A copy with another seed (``None`` keeps this one)."""
        if seed is None:
            return self
        return Recipe.model_validate({**self.model_dump(mode="json"), "seed": int(seed)})

    def to_yaml(self) -> str:
        """The full recipe (defaults included) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------- loading
def _search_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    dirs = [here / "recipes"]
    project = here.parent.parent / "datasets"
    if project.is_dir():
        dirs.append(project)
    return dirs


def recipe_names() -> list[str]:
    """Names of the recipes that can be loaded by name."""
    names: set[str] = set()
    for d in _search_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def recipe_path(name: str) -> Path:
    """The YAML file of a named recipe (packaged copy first)."""
    for d in _search_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    raise ProcskyKeyError(
        f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())} (or give a path to a YAML file)"
    )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid simulation recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see datasets/README.md for the keys)")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_recipe(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a recipe mapping, raising :class:`ProcskyValueError` naming each bad key."""
    if not isinstance(data, dict):
        raise ProcskyValueError(f"simulation recipe {source} must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ProcskyValueError(_format_validation_error(e, source)) from None


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """Load a recipe by name (``tiny``, ``small``, ``medium``), YAML path, mapping or Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return validate_recipe(recipe)
    text = str(recipe)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = recipe_path(text)
    if not path.is_file():
        raise ProcskyFileError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProcskyValueError(f"recipe {path} is not valid YAML: {e}") from e
    return validate_recipe(data, str(path))
