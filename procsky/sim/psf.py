"""The simulated PSF: atmosphere (Moffat) convolved with optics (Gaussian), varying
smoothly across the focal plane.

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

import numpy as np

__all__ = ["SimPsfParams", "draw_psf_params", "psf_summary", "truth_psf_image"]


@dataclass(frozen=True)
class SimPsfParams:
    """PSF of one visit as a function of focal-plane position.

    Focal-plane positions are normalised ``rho = f / fp_radius`` with ``f`` in pixels from
    the optical axis. All sizes are arcsec; shears are reduced shears ``g1, g2`` in the
    detector pixel frame.
    """

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


def truth_psf_image(params: SimPsfParams, fx: float, fy: float, size: int = 41, offset=(0.0, 0.0)):
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


def psf_summary(params: SimPsfParams, fx: float, fy: float) -> dict:
    """Measured summary of the PSF at a focal-plane position.

    Returns FWHM (arcsec and pixels; of the optical profile, without the pixel), the
    adaptive-moment ellipticity ``e1, e2`` (distortion, ``(Ixx-Iyy)/(Ixx+Iyy)``) and size
    ``sigma`` (pixels) of the pixel-convolved PSF, and the model shear ``g1, g2``.
    """
    import galsim

    psf = params.at_focal_plane(fx, fy)
    # FWHM from the area above half maximum on a fine grid (2 sqrt(A / pi)): smooth in the
    # parameters, unlike a radius read off pixel centres, and defined for elliptical PSFs.
    step = 0.1
    fine = psf.drawImage(nx=301, ny=301, scale=step, method="no_pixel").array
    area = float(np.count_nonzero(fine > 0.5 * fine.max())) * step * step
    fwhm_px = 2.0 * math.sqrt(area / math.pi)
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
    }
