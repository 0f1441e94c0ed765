"""The simulated PSF, in two families (recipe ``psf.family``):

* ``atmospheric`` (default): atmosphere (Moffat) convolved with optics (Gaussian), varying
  smoothly across the focal plane (:class:`SimPsfParams`). At coarse pixels (e.g. 1"/px
  with 1.5-2" seeing) the same family gives undersampled ground data.
* ``space``: a diffraction-limited telescope, GalSim ``OpticalPSF`` (annular pupil with
  a central obscuration and struts, small per-visit Zernike aberrations) convolved with a
  Gaussian pointing jitter (:class:`SpacePsfParams`): a sharp core, wide Airy wings
  (surface brightness ~ r^-3) and diffraction spikes.

A Moffat is used for the atmosphere rather than a Kolmogorov profile because its wings
fall as r^(-2 beta) (beta >= 2.5 here): bounded drawing stamps then hold all but ~1e-4 of
the flux, so truth fluxes equal what is in the pixels. The FWHM follows a linear gradient
plus a radial term; the shear follows a constant (wind shake), a linear gradient
(tracking/defocus tilt) and an astigmatism-like pattern ``(rho_x^2 - rho_y^2, 2 rho_x
rho_y)`` that grows towards the field edge (e.g. Jarvis et al. 2016 for DES PSF patterns).

All parameters of one visit are in :class:`SimPsfParams`, stored as columns of
``truth/visits.parquet`` so a later stage can rebuild the exact PSF at any pixel with
:meth:`SimPsfParams.at_focal_plane` or :func:`truth_psf_image`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

__all__ = [
    "SimPsfParams",
    "SpacePsfParams",
    "PSF_FAMILIES",
    "draw_psf_params",
    "draw_space_psf_params",
    "psf_params_from_dict",
    "psf_summary",
    "truth_psf_image",
    "half_max_fwhm",
    "moment_fwhm",
]

#: PSF families a recipe can ask for (``psf.family``).
PSF_FAMILIES = ("atmospheric", "space")


@dataclass(frozen=True)
class SimPsfParams:
    """PSF of one visit as a function of focal-plane position.

    Focal-plane positions are normalised ``rho = f / fp_radius`` with ``f`` in pixels from
    the optical axis. All sizes are arcsec; shears are reduced shears ``g1, g2`` in the
    detector pixel frame.
    """

    family = "atmospheric"

    fwhm_atm: float
    beta: float
    fwhm_optics: float
    g1: float
    g2: float
    g1_x: float
    g1_y: float
    g2_x: float
    g2_y: float
    astig: float
    fwhm_grad_x: float
    fwhm_grad_y: float
    fwhm_r2: float
    fp_radius: float
    pixel_scale: float

    def to_dict(self, prefix: str = "psf_") -> dict:
        return {prefix + k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d, prefix: str = "psf_") -> SimPsfParams:
        return cls(**{f.name: float(d[prefix + f.name]) for f in fields(cls)})

    def local(self, fx: float, fy: float) -> tuple[float, float, float]:
        """(atmospheric FWHM arcsec, g1, g2) at focal-plane position (fx, fy) pixels."""
        rx, ry = fx / self.fp_radius, fy / self.fp_radius
        fwhm = self.fwhm_atm * (
            1.0 + self.fwhm_grad_x * rx + self.fwhm_grad_y * ry + self.fwhm_r2 * (rx * rx + ry * ry)
        )
        g1 = self.g1 + self.g1_x * rx + self.g1_y * ry + self.astig * (rx * rx - ry * ry)
        g2 = self.g2 + self.g2_x * rx + self.g2_y * ry + self.astig * 2.0 * rx * ry
        return fwhm, g1, g2

    def at_focal_plane(self, fx: float, fy: float, gsparams=None):
        """The GalSim PSF in pixel units (flux 1) at focal-plane position (fx, fy) pixels."""
        import galsim

        fwhm, g1, g2 = self.local(fx, fy)
        atm = galsim.Moffat(beta=self.beta, fwhm=fwhm / self.pixel_scale, gsparams=gsparams)
        parts = [atm]
        if self.fwhm_optics > 0:
            parts.append(galsim.Gaussian(fwhm=self.fwhm_optics / self.pixel_scale, gsparams=gsparams))
        psf = galsim.Convolve(parts, gsparams=gsparams) if len(parts) > 1 else atm
        return psf.shear(g1=g1, g2=g2)


@dataclass(frozen=True)
class SpacePsfParams:
    """A space telescope PSF of one visit: GalSim ``OpticalPSF`` (x) Gaussian jitter.

    The diffraction pattern of an annular pupil of diameter ``D`` with central obscuration
    ``obscuration`` (linear fraction) and ``nstruts`` struts of width ``strut_thick``
    (fraction of ``D``) at ``strut_angle`` (deg), at the band's effective wavelength
    (``lam_over_diam`` in arcsec), with Zernike aberrations in waves (Noll: defocus,
    astigmatism, coma; drawn per visit, e.g. telescope breathing), convolved with a round
    Gaussian pointing jitter of FWHM ``jitter_fwhm`` arcsec. Constant across the focal plane
    (a space camera's field is small; the aberrations of a visit dominate): ``fx, fy``
    are accepted for the interface of :class:`SimPsfParams` and ignored.
    """

    lam_over_diam: float
    obscuration: float
    nstruts: float
    strut_thick: float
    strut_angle: float
    defocus: float
    astig1: float
    astig2: float
    coma1: float
    coma2: float
    jitter_fwhm: float
    fp_radius: float
    pixel_scale: float

    family = "space"

    def to_dict(self, prefix: str = "psf_") -> dict:
        d: dict = {prefix + k: float(v) for k, v in asdict(self).items()}
        d[prefix + "family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d, prefix: str = "psf_") -> SpacePsfParams:
        return cls(**{f.name: float(d[prefix + f.name]) for f in fields(cls)})

    def local(self, fx: float, fy: float) -> tuple[float, float, float]:
        """(approximate core FWHM arcsec, g1, g2): Airy core ``1.03 lambda/D`` (+) jitter."""
        return math.hypot(1.03 * self.lam_over_diam, self.jitter_fwhm), 0.0, 0.0

    def at_focal_plane(self, fx: float, fy: float, gsparams=None):
        """The GalSim PSF in pixel units (flux 1); the same object for every position (cached)."""
        return _space_psf(self, gsparams)


@lru_cache(maxsize=16)
def _space_psf(p: SpacePsfParams, gsparams):
    # OpticalPSF computes its image lazily on the first draw (~50 ms); caching the object
    # per visit lets every star and galaxy of a detector reuse it.
    import galsim

    opt = galsim.OpticalPSF(
        lam_over_diam=p.lam_over_diam / p.pixel_scale,
        obscuration=p.obscuration,
        nstruts=int(round(p.nstruts)),
        strut_thick=p.strut_thick,
        strut_angle=p.strut_angle * galsim.degrees,
        defocus=p.defocus,
        astig1=p.astig1,
        astig2=p.astig2,
        coma1=p.coma1,
        coma2=p.coma2,
        pad_factor=2.0,
        gsparams=gsparams,
    )
    if p.jitter_fwhm <= 0:
        return opt
    jitter = galsim.Gaussian(fwhm=p.jitter_fwhm / p.pixel_scale, gsparams=gsparams)
    return galsim.Convolve([opt, jitter], gsparams=gsparams)


def psf_params_from_dict(d, prefix: str = "psf_") -> SimPsfParams | SpacePsfParams:
    """The PSF parameters of one visit (a ``truth/visits.parquet`` row), of either family.

    Rows without a ``psf_family`` column (older outputs) are atmospheric.
    """
    fam = d.get(prefix + "family", "atmospheric") if hasattr(d, "get") else "atmospheric"
    if isinstance(fam, str) and fam == "space":
        return SpacePsfParams.from_dict(d, prefix)
    return SimPsfParams.from_dict(d, prefix)


def draw_psf_params(
    rng: np.random.Generator, seeing, airmass: float, fp_radius: float, pixel_scale: float, wavelength_nm: float
) -> SimPsfParams:
    """Draw one visit's PSF parameters.

    The zenith FWHM is log-normal about ``seeing.median_fwhm`` (sigma 0.2 in ln) clipped to
    ``[min_fwhm, max_fwhm]``, scaled by airmass^0.6 and wavelength^-0.2 relative to r band
    (Kolmogorov scalings; Roddier 1981).
    """
    zen = float(np.clip(seeing.median_fwhm * np.exp(rng.normal(0.0, 0.2)), seeing.min_fwhm, seeing.max_fwhm))
    fwhm = zen * airmass**0.6 * (wavelength_nm / 622.0) ** -0.2
    v = seeing.variation
    return SimPsfParams(
        fwhm_atm=fwhm,
        beta=float(rng.uniform(*seeing.beta_range)),
        fwhm_optics=seeing.optics_fwhm,
        g1=float(rng.normal(0.0, seeing.ellipticity_rms)),
        g2=float(rng.normal(0.0, seeing.ellipticity_rms)),
        g1_x=float(rng.normal(0.0, 0.01 * v)),
        g1_y=float(rng.normal(0.0, 0.01 * v)),
        g2_x=float(rng.normal(0.0, 0.01 * v)),
        g2_y=float(rng.normal(0.0, 0.01 * v)),
        astig=float(rng.uniform(0.01, 0.03) * v),
        fwhm_grad_x=float(rng.normal(0.0, 0.02 * v)),
        fwhm_grad_y=float(rng.normal(0.0, 0.02 * v)),
        fwhm_r2=float(rng.uniform(0.0, 0.06) * v),
        fp_radius=float(fp_radius),
        pixel_scale=float(pixel_scale),
    )


def draw_space_psf_params(
    rng: np.random.Generator, psf_cfg, fp_radius: float, pixel_scale: float, wavelength_nm: float
) -> SpacePsfParams:
    """Draw one visit's space PSF: each aberration ~ N(0, ``psf_cfg.aberration_rms``) waves."""
    lod = wavelength_nm * 1e-9 / psf_cfg.diameter_m * 206264.806
    a = psf_cfg.aberration_rms
    return SpacePsfParams(
        lam_over_diam=float(lod),
        obscuration=float(psf_cfg.obscuration),
        nstruts=float(psf_cfg.nstruts),
        strut_thick=float(psf_cfg.strut_thick),
        strut_angle=float(psf_cfg.strut_angle_deg),
        defocus=float(rng.normal(0.0, a)),
        astig1=float(rng.normal(0.0, a)),
        astig2=float(rng.normal(0.0, a)),
        coma1=float(rng.normal(0.0, a)),
        coma2=float(rng.normal(0.0, a)),
        jitter_fwhm=float(psf_cfg.jitter_fwhm),
        fp_radius=float(fp_radius),
        pixel_scale=float(pixel_scale),
    )


def truth_psf_image(params: SimPsfParams | SpacePsfParams, fx: float, fy: float, size: int = 41, offset=(0.0, 0.0)):
    """The pixel-convolved PSF image (sum 1) at a focal-plane position, as a numpy array.

    Parameters
    ----------
    params : SimPsfParams
    fx, fy : float, pixels
        Focal-plane position (see :func:`procsky.instruments.simcam.focal_plane_position`).
    size : int
        Odd stamp size, pixels; the PSF centre is on the centre pixel plus ``offset``.
    """
    psf = params.at_focal_plane(fx, fy)
    img = psf.drawImage(nx=size, ny=size, scale=1.0, offset=offset, method="auto")
    return img.array.astype(np.float64)


def half_max_fwhm(fine: np.ndarray, step: float) -> float:
    """FWHM (in the units of ``step``) of a finely sampled profile: ``2 sqrt(A / pi)``.

    ``A`` is the area above half the maximum. Smooth in the profile's parameters, unlike a
    radius read off pixel centres, and defined for elliptical or spiky PSFs (for which it is
    the diameter of the disc of the same area).
    """
    area = float(np.count_nonzero(fine > 0.5 * fine.max())) * step * step
    return 2.0 * math.sqrt(area / math.pi)


def moment_fwhm(img: np.ndarray) -> float:
    """Gaussian-equivalent FWHM ``2.3548 sqrt((Ixx + Iyy) / 2)`` from unweighted moments.

    The moments are taken over the whole stamp about its centroid, so for PSFs with wide
    wings (Airy ~ r^-3) they depend on the stamp size and far exceed the half-maximum
    width; that is the point of reporting both.
    """
    a = np.asarray(img, dtype=np.float64)
    y, x = np.indices(a.shape)
    s = a.sum()
    xc, yc = (a * x).sum() / s, (a * y).sum() / s
    ixx = (a * (x - xc) ** 2).sum() / s
    iyy = (a * (y - yc) ** 2).sum() / s
    return 2.3548200450309493 * math.sqrt(max(0.5 * (ixx + iyy), 0.0))


def psf_summary(params: SimPsfParams | SpacePsfParams, fx: float, fy: float) -> dict:
    """Measured summary of the PSF at a focal-plane position.

    Returns, for every family:

    * ``psf_fwhm``, ``psf_fwhm_px``: the half-maximum FWHM (arcsec, pixels;
      :func:`half_max_fwhm`) of the optical profile, without the pixel;
    * ``psf_fwhm_pixel_px``: the half-maximum FWHM of the pixel-convolved PSF (the
      "effective PSF" a super-sampled PSF model such as PSFEx's represents); the pixel box
      adds ~1/12 px^2 to the variance, which matters when undersampled (+10-17% at 1.4-1.8 px);
    * ``psf_fwhm_moment_px``: Gaussian-equivalent FWHM from the *unweighted* second moments
      of the pixel-convolved PSF in a 63 x 63 px stamp (:func:`moment_fwhm`); equal to the
      half-maximum FWHM within a few % for a Gaussian, several times it for a space PSF;
    * ``psf_e1, psf_e2, psf_sigma_px``: adaptive (Gaussian-weighted, HSM) moments of the
      pixel-convolved PSF (distortion ``(Ixx-Iyy)/(Ixx+Iyy)`` and size sigma);
    * ``psf_g1, psf_g2``: the model shear (0 for the space family).
    """
    import galsim

    psf = params.at_focal_plane(fx, fy)
    step = 0.1
    fine = psf.drawImage(nx=301, ny=301, scale=step, method="no_pixel").array
    fwhm_px = half_max_fwhm(fine, step)
    fine_pix = galsim.Convolve(psf, galsim.Pixel(1.0)).drawImage(nx=301, ny=301, scale=step, method="no_pixel").array
    img = psf.drawImage(nx=63, ny=63, scale=1.0, method="auto")
    mom = galsim.hsm.FindAdaptiveMom(img, strict=False)
    if mom.moments_status == 0:
        e1, e2 = float(mom.observed_shape.e1), float(mom.observed_shape.e2)
        sigma = float(mom.moments_sigma)
    else:  # pragma: no cover - only for pathological parameters
        e1 = e2 = sigma = float("nan")
    _, g1, g2 = params.local(fx, fy)
    return {
        "psf_fwhm_px": fwhm_px,
        "psf_fwhm": fwhm_px * params.pixel_scale,
        "psf_e1": e1,
        "psf_e2": e2,
        "psf_g1": float(g1),
        "psf_g2": float(g2),
        "psf_sigma_px": sigma,
        "psf_fwhm_pixel_px": half_max_fwhm(fine_pix, step),
        "psf_fwhm_moment_px": moment_fwhm(img.array),
        "psf_family": getattr(params, "family", "atmospheric"),
    }
