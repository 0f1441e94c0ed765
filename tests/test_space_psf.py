"""Space-like PSFs (issue 19): the aperture-to-total correction from the instrument's encircled energy, and
aperture corrections that say when they are not known.

A diffraction PSF (obscured pupil with struts, 0.025"/px) holds 9-10 % of its light beyond the 12 px aperture
of the correction, and a space frame's 3-5 stars of S/N 20-50 cannot measure it (the stars' growth curve is
then 1, PSF fluxes 9 % low). Unit tests of ``kernels.growth.encircled_energy`` / ``encircled_energy_at``, then
one simulated space frame (seed 27 of the ``space`` recipe: a Moffat PSF of 6 stars, each with a repaired
cosmic ray in its aperture) calibrated with and without the instrument's curve, against the truth, and an
almost empty one (seed 21: 4 sources) whose aperture correction is flagged.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from procsky.calibrate import CalibrationConfig
from procsky.calibrate.driver import calibrate_exposure
from procsky.calibrate.measurement import _instrument_growth
from procsky.exposure import Exposure
from procsky.kernels.growth import GrowthCorrection, encircled_energy, encircled_energy_at
from procsky.notes import collect_notes
from procsky.refcat import read_refcat_file
from procsky.sim import simulate
from procsky.sim.psf import truth_psf_image
from procsky.sim.truth import SimTruth


def test_encircled_energy_of_a_gaussian():
    sigma, n = 3.0, 61
    c = np.arange(n) - n // 2
    # pixel-integrated Gaussian: the product of the 1-d integrals over each pixel
    edges = np.append(c - 0.5, c[-1] + 0.5)
    cdf = 0.5 * (1 + np.array([math.erf(e / (sigma * math.sqrt(2))) for e in edges]))
    img = np.outer(np.diff(cdf), np.diff(cdf))
    radii = (4.5, 6.0, 9.0)
    ee = encircled_energy(img, radii, sub=9)
    # a pixel-integrated Gaussian: near a Gaussian of variance sigma^2 + 1 / 12 per axis at these radii
    s2 = sigma**2 + 1.0 / 12.0
    assert ee == pytest.approx([1 - math.exp(-(r**2) / (2 * s2)) for r in radii], abs=5e-3)
    # an even image: the circle's area over the image's
    flat = np.ones((41, 41))
    assert encircled_energy(flat, (5.0, 10.0), sub=25) == pytest.approx(
        [math.pi * r**2 / 41**2 for r in (5, 10)], rel=2e-3
    )
    # the total given (a profile of flux 1 running off the image), not the image's sum
    cut = img[20:41, 20:41]
    assert encircled_energy(cut, (9.0,), total=1.0, sub=9)[0] == pytest.approx(ee[2], abs=1e-9)
    assert encircled_energy(cut, (9.0,))[0] > ee[2]
    with pytest.raises(ValueError):
        encircled_energy(np.ones((4, 4)), (1.0,))


def test_encircled_energy_at_follows_an_airy_wing():
    # an Airy wing's light beyond r falls as 1/r: interpolated exactly between the table's radii
    table = tuple((r, 1.0 - 1.2 / r) for r in (6.0, 12.0, 24.0))
    assert encircled_energy_at(table, 9.0) == pytest.approx(1.0 - 1.2 / 9.0, abs=1e-12)
    assert encircled_energy_at(table, 12.0) == pytest.approx(0.9, abs=1e-12)
    assert math.isnan(encircled_energy_at(table, 40.0))
    with pytest.raises(ValueError):
        encircled_energy_at(((12.0, 0.9), (6.0, 0.8)), 9.0)
    # the configuration refuses such a curve before any frame is calibrated
    with pytest.raises(ValueError, match="increasing"):
        CalibrationConfig(measurement={"encircled_energy": [[12.0, 0.9], [6.0, 0.8]]})
    assert CalibrationConfig(measurement={"encircled_energy": [[6, 0.85], [12, 0.9]]}).measurement.encircled_energy


def test_instrument_growth_replaces_and_checks_the_stars_curve():
    table = ((6.0, 0.85), (12.0, 0.90), (17.0, 0.93))
    stars = GrowthCorrection(correction=1.02, error=0.01, n_stars=4, status="measured")
    with collect_notes() as notes:
        g = _instrument_growth(stars, table, 12.0)
    assert g.status == "instrument encircled energy" and g.correction == pytest.approx(1 / 0.9)
    assert g.profile["stars_correction"] == [1.02, 0.01]
    assert [n["code"] for n in notes] == ["aperture_to_total_instrument_differs"]
    with collect_notes() as notes:
        g = _instrument_growth(stars, table, 40.0)
    assert g is stars and [n["code"] for n in notes] == ["encircled_energy_out_of_range"]


def _design_encircled_energy(truth: SimTruth) -> tuple:
    """The simulated telescope's design optics (no aberrations of the visit), flux 1, as an instrument model."""
    p = truth.psf_params(1)
    design = dataclasses.replace(p, defocus=0.0, astig1=0.0, astig2=0.0, coma1=0.0, coma2=0.0)
    radii = (3.0, 4.5, 6.0, 9.0, 12.0, 17.0, 25.0)
    ee = encircled_energy(truth_psf_image(design, 0.0, 0.0, size=301), radii, total=1.0)
    return tuple((r, float(e)) for r, e in zip(radii, ee))


def _bright_star_ratios(out, calexp, src) -> np.ndarray:
    """PSF flux / truth (counts) of the matched unsaturated stars of S/N > 100."""
    truth = SimTruth(out)
    ex = truth.exposures
    kind = truth.objects.set_index("object_id").kind.reindex(ex.object_id).to_numpy()
    d, j = cKDTree(src[["x", "y"]].to_numpy()).query(ex[["x", "y"]].to_numpy())
    s = src.iloc[j].reset_index(drop=True)
    ok = (d < 1) & (kind == "star") & ~ex.saturated.to_numpy() & ~s.flag_saturated.to_numpy()
    ok &= (s.psf_flux / s.psf_flux_err).to_numpy() > 100
    return s.psf_flux.to_numpy()[ok] / calexp.photocalib.calibration / ex.counts.to_numpy()[ok]


@pytest.fixture(scope="module")
def sparse_space(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "seed27"
    simulate("space", out, seed=27, visits=[1], detectors=[0], scheduler="sync", progress=False)
    return out


def test_sparse_space_frame_with_the_instrument_encircled_energy(sparse_space):
    """Seed 27: 6 PSF stars, a Moffat model; every one has a repaired cosmic ray in its 12 px aperture (the
    aperture correction took none: 1, PSF fluxes 12-15 % low) and the growth curve cannot be measured. With the
    stars whose core is clean and the instrument's encircled energy the bright stars' PSF fluxes are within
    2 % of the truth."""
    exp = Exposure.read(sparse_space / "images/calexp-v000001-d000.fits")
    refcat = read_refcat_file(sparse_space / "refcat/refcat.parquet")
    truth = SimTruth(sparse_space)
    table = _design_encircled_energy(truth)
    with collect_notes() as notes:
        calexp, src, summary = calibrate_exposure(
            exp, refcat, CalibrationConfig(measurement={"encircled_energy": table})
        )
    codes = {n["code"] for n in notes}
    assert {"few_psf_stars", "apcorr_interpolated_stars"} <= codes
    assert "apcorr_unreliable" not in codes and summary["apcorr_n_stars"] >= 3
    growth = calexp.metadata["calibrate"]["growth"]
    assert growth["status"] == "instrument encircled energy"
    r_ac = float(calexp.metadata["calibrate"]["apcorr_radius"])
    assert summary["aperture_to_total"] == pytest.approx(1.0 / encircled_energy_at(table, r_ac))
    ratio = _bright_star_ratios(sparse_space, calexp, src)
    assert ratio.size >= 5
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)


def test_empty_space_frame_flags_its_psf_fluxes(tmp_path):
    """Seed 21: 4 sources, a Gaussian PSF of their moments and an aperture correction from 1 of them (15x):
    every psf_flux is flagged and the zero point is not fitted to them."""
    out = tmp_path / "seed21"
    simulate("space", out, seed=21, visits=[1], detectors=[0], scheduler="sync", progress=False)
    exp = Exposure.read(out / "images/calexp-v000001-d000.fits")
    with collect_notes() as notes:
        calexp, src, summary = calibrate_exposure(exp, read_refcat_file(out / "refcat/refcat.parquet"))
    assert "apcorr_unreliable" in {n["code"] for n in notes}
    assert summary["psf_model"].startswith("GaussianPsf") and summary["apcorr_n_stars"] < 3
    assert len(src) and src.psf_flux_flag.all()
    assert summary["photometry_status"].startswith("header zero point")
