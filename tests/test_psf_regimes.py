"""One PSF FWHM everywhere (issue 19 item 3): the half maximum of the model's effective PSF.

Unit tests of :func:`procsky.psf.half_max_fwhm` on Gaussian, Moffat and space-like (obscured
aperture with struts, GalSim's OpticalPSF as the simulator draws it) images, and of ``fwhm``
and ``moment_fwhm`` of the PSF classes, a super-sampled one included. The summary's
``psf_fwhm_px`` against the simulator's truth (half maximum of the pixel-convolved PSF) is
tested on ``tiny``/``small`` in tests/test_calibrate.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from procsky.psf import GaussianPsf, ImagePsf, PolynomialImagePsf, half_max_fwhm, psf_from_dict

galsim = pytest.importorskip("galsim")

from procsky.sim.psf import half_max_fwhm as sim_half_max_fwhm  # noqa: E402


def _pixel_gaussian(sigma: float, n: int = 41, step: float = 1.0, dx: float = 0.0) -> np.ndarray:
    """A round Gaussian integrated over 1 px pixels, sampled every ``step`` px (the effective PSF)."""
    c = (np.arange(n) - (n - 1) / 2) * step
    r2 = math.sqrt(2.0) * sigma

    def box(t, d):
        return 0.5 * (erf((t - d + 0.5) / r2) - erf((t - d - 0.5) / r2))

    return np.outer(box(c, 0.0), box(c, dx))


def _moffat(alpha: float, beta: float, n: int = 61, e: float = 0.0) -> np.ndarray:
    y, x = (np.mgrid[0:n, 0:n] - (n - 1) / 2).astype(float)
    q = (x / (1 + e)) ** 2 + (y / (1 - e)) ** 2
    return (1 + q / alpha**2) ** (-beta)


@pytest.mark.parametrize("sigma", [1.3, 2.0, 3.5])
def test_half_max_fwhm_of_well_sampled_gaussian(sigma):
    # the effective PSF of a Gaussian, sampled at the pixels: its half maximum from a finely sampled copy
    truth = sim_half_max_fwhm(_pixel_gaussian(sigma, n=801, step=0.05), 0.05)
    for dx in (0.0, 0.5):
        assert half_max_fwhm(_pixel_gaussian(sigma, dx=dx)) == pytest.approx(truth, rel=0.005)


def test_half_max_fwhm_of_elliptical_moffat_and_super_sampled_grid():
    alpha, beta, e = 2.2, 2.5, 0.2
    exact = 2 * alpha * math.sqrt(2 ** (1 / beta) - 1) * math.sqrt((1 + e) * (1 - e))
    assert half_max_fwhm(_moffat(alpha, beta, e=e)) == pytest.approx(exact, rel=0.005)
    # an undersampled effective PSF (1.6 px) on a grid 3x finer than the pixels, as a super-sampled model holds it
    truth = sim_half_max_fwhm(_pixel_gaussian(0.6, n=801, step=0.02), 0.02)
    assert half_max_fwhm(_pixel_gaussian(0.6, n=61, step=1 / 3), step=1 / 3) == pytest.approx(truth, rel=0.005)


def test_half_max_fwhm_ignores_spikes_and_negative_lobes():
    # an obscured aperture with 4 struts (space-like: sharp core, Airy rings, diffraction spikes)
    optical = galsim.OpticalPSF(
        lam_over_diam=2.0, obscuration=0.33, nstruts=4, strut_thick=0.03, strut_angle=45 * galsim.degrees
    )
    img = optical.drawImage(nx=65, ny=65, scale=1.0).array
    eff = galsim.Convolve(optical, galsim.Pixel(1.0))
    truth = sim_half_max_fwhm(eff.drawImage(nx=651, ny=651, scale=0.1, method="no_pixel").array, 0.1)
    got = half_max_fwhm(img)
    assert got == pytest.approx(truth, rel=0.02)
    # the unweighted moments are dominated by the wings and spikes
    psf = ImagePsf(img)
    assert psf.fwhm(0, 0) == pytest.approx(got)
    assert psf.moment_fwhm(0, 0) > 1.5 * got
    # a negative lobe (an over-subtracted ring) or a bright spike below half maximum changes nothing
    y, x = np.mgrid[0:65, 0:65] - 32.0
    lobe = img - 0.2 * img.max() * np.exp(-0.5 * ((np.hypot(x, y) - 8.0) / 1.0) ** 2)
    assert half_max_fwhm(lobe) == pytest.approx(got, rel=0.01)
    spike = img.copy()
    spike[32, 40:] += 0.4 * img.max()
    assert half_max_fwhm(spike) == pytest.approx(got, rel=0.01)


def test_fwhm_of_psf_classes():
    g = GaussianPsf(1.5, e1=0.1)
    assert g.fwhm() == pytest.approx(2.3548200450309493 * 1.5)  # exact (area-equivalent for an ellipse)
    assert g.moment_fwhm() == pytest.approx(g.fwhm())
    # an image PSF: half maximum of its kernel, the moment size separately
    k = _moffat(2.0, 2.5, n=41)
    p = ImagePsf(k)
    assert p.fwhm(3, 4) == pytest.approx(2 * 2.0 * math.sqrt(2 ** (1 / 2.5) - 1), rel=0.01)
    assert p.moment_fwhm(3, 4) > 1.2 * p.fwhm(3, 4)
    # a super-sampled polynomial model: FWHM from its fine grid; kernels drawn at the pixels
    os_ = 3
    fine = _pixel_gaussian(0.6, n=15 * os_, step=1 / os_)
    c = np.stack([fine / fine.sum() * os_**2, 0.0 * fine, 0.0 * fine])
    sp = PolynomialImagePsf(c, 1, 50.0, 50.0, 50.0, 50.0, oversample=os_, stamp_size=15)
    truth = sim_half_max_fwhm(_pixel_gaussian(0.6, n=801, step=0.02), 0.02)
    assert sp.fwhm(20.0, 70.0) == pytest.approx(truth, rel=0.005)
    kern = sp.kernel(20.0, 70.0)
    assert kern.shape == (15, 15) and kern.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(kern, _pixel_gaussian(0.6, n=15), atol=3e-3)
    # shifted by half a pixel: the light moves, the sum stays
    sh = sp.render(20.0, 70.0, offset=(0.5, 0.0))
    assert sh.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(sh, _pixel_gaussian(0.6, n=15, dx=0.5), atol=3e-3)
    # serialisation keeps the sampling
    back = psf_from_dict(sp.to_dict())
    assert isinstance(back, PolynomialImagePsf) and back.oversample == os_ and back.size == 15
    assert back == sp
