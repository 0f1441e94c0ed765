"""Measurement of the deblended children of a patch, one band at a time (issue 21, item 3),
and forced measurement at the reference band's positions and shapes (item 4, coadds).

Every child is measured on its own deblended pixels (``Deblended.child_images``: the other
children's light removed, zero outside its footprint) with the coadd's variance and mask
planes; pixels outside the child's footprint take no part in the fits. Fluxes are in the
coadd's unit (nJy). Nothing raises for one bad child: each algorithm has a ``flag_*``
column and its failed quantities are NaN.

* **Centroid**: Gaussian-windowed centroid (SExtractor's XWIN; window = PSF sigma) from the
  deblender's peak; the peak itself (``flag_centroid``) when it fails.
* **Adaptive moments** ``ixx, iyy, ixy`` (px^2; Bernstein & Jarvis 2002).
* **PSF-corrected shapes**: GalSim's HSM re-Gaussianization (Hirata & Seljak 2003; Mandelbaum
  et al. 2005) with the PSF model's kernel at the child; ``hsm_e1, hsm_e2`` are its corrected
  *distortions* ``(a^2 - b^2) / (a^2 + b^2)`` (for a sheared round source ``e = 2 g / (1 + g^2)``),
  x along array columns; ``hsm_sigma`` (px) and ``hsm_resolution`` as GalSim reports them.
* **PSF flux**: linear fit of the PSF kernel shifted to the centroid, inverse-variance weighted
  (:func:`procsky.kernels.measure.psf_flux`); the kernel is normalised within its stamp.
* **Aperture fluxes** in circles of ``aperture_radii`` arcsec (exact pixel overlap), columns
  ``ap_flux_<r>`` with ``<r>`` the radius with ``p`` for the decimal point (``ap_flux_1p0``).
* **Kron**: ``kron_radius`` is the first radial moment within ``kron_window`` adaptive sigmas
  (Kron 1980), at least the PSF's; ``kron_flux`` in a circle of ``kron_factor`` Kron radii.
* **CModel** (Abazajian et al. 2004; Bosch et al. 2018): PSF-convolved exponential and de
  Vaucouleurs fits (:mod:`procsky.kernels.galaxy`), then their best non-negative combination;
  ``cmodel_flux`` is its total flux, ``cmodel_frac_dev`` the de Vaucouleurs fraction,
  ``exp_flux`` / ``dev_flux`` the single-profile total fluxes. Children of blends the deblender
  skipped (``deblend_flag_skipped/too_big/timeout``: their pixels hold their siblings) are not
  fitted (``flag_cmodel``, unless ``cmodel_undeblended``). The fitted shapes are columns
  (``exp_radius``, ``exp_g1``, ``exp_g2``, ``dev_radius``, ``dev_g1``, ``dev_g2``: half-light
  radius in px as GalSim's ``half_light_radius`` before ``.shear(g1, g2)``).
* **Extendedness**: 1 when ``psf_flux / cmodel_flux < extendedness_ratio`` (0.985, LSST's
  ``classificationExtendedness`` default; Bosch et al. 2018, sec. 4.9) *and* the CModel fits the
  child's pixels significantly better than the PSF: ``extendedness_dchi2`` = chi^2(PSF) - chi^2(CModel)
  on the fit pixels (the likelihood-ratio statistic, a zero-radius profile being the PSF) above
  ``extendedness_min_dchi2`` (25: 5 sigma); else 0; NaN when a flux or the statistic is missing.
  The ratio alone calls 15-40 % of the stars of S/N 50-100 extended: the galaxy models' free radius
  can only add flux to a point source's noise, and 1.5 % is 1-2 sigma there (the reason SDSS's
  star/galaxy cut of psf - model mag > 0.145 is used at bright magnitudes only). Stars of a blend
  keep the deblender's residuals and can still be called extended.
* **Blendedness** (Bosch et al. 2018, sec. 4.9): ``1 - sum(P child) / sum(P parent)`` with P the
  PSF kernel at the centroid, over the child's footprint; the parent is the coadd itself.
* **Local background**: for a child alone in its parent, the 3-sigma-clipped median of the coadd in
  an annulus of ``local_background_annulus`` PSF FWHMs (moved out beyond the footprint when the
  footprint covers it), outside the footprint and DETECTED/SAT/bad pixels (LSST's LocalBackground);
  0 for a child of a blend (its deblended pixels are a share of the model, with no sky of their own).
* **Flags**: ``flag_edge`` (the footprint touches the coadd's edge or no-data pixels near the
  centre), ``flag_saturated`` / ``flag_saturated_center``, ``flag_bad`` / ``flag_bad_center``
  (BAD/NO_DATA in the footprint / within ``core_radius`` px of the centre), and per algorithm
  ``flag_centroid``, ``flag_moments``, ``flag_psf_flux``, ``flag_ap``, ``flag_kron``,
  ``flag_exp``, ``flag_dev``, ``flag_cmodel``, ``flag_hsm``, ``flag_blendedness``.

**Forced mode** (``reference`` given, rows aligned with ``children``): the position is the
reference's ``x, y`` (no centroiding), the exponential and de Vaucouleurs models are the
reference's (``exp_radius, exp_g1, exp_g2, dev_radius, dev_g1, dev_g2``) and ``cmodel_frac_dev``
is the reference's, so only amplitudes are fitted (linear): ``exp_flux``, ``dev_flux``, and
``cmodel_flux`` of the fixed combination, the same model in every band (LSST's forced CModel).
``kron_radius`` is the reference's when it has that column. The reference is the output of
:func:`measure_band` on the reference band. Adaptive moments are still measured per band; HSM
shapes only with ``forced_hsm``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pydantic

from procsky.kernels import galaxy as gk
from procsky.kernels.measure import adaptive_moments, aperture_flux, psf_flux, windowed_centroid
from procsky.notes import note_degraded
from procsky.psf import SIGMA_TO_FWHM, array_psf, shift_image

__all__ = ["MeasureConfig", "measure_band", "REFERENCE_COLUMNS", "aperture_column"]

#: columns of ``reference`` that forced mode reads (``kron_radius`` is optional)
REFERENCE_COLUMNS = ("x", "y", "exp_radius", "exp_g1", "exp_g2", "dev_radius", "dev_g1", "dev_g2", "cmodel_frac_dev")

#: deblender flags of children whose pixels are their whole parent's
_UNDEBLENDED_FLAGS = ("deblend_flag_skipped", "deblend_flag_too_big", "deblend_flag_timeout")

_FLAGS = (
    "flag_edge",
    "flag_saturated",
    "flag_saturated_center",
    "flag_bad",
    "flag_bad_center",
    "flag_centroid",
    "flag_moments",
    "flag_psf_flux",
    "flag_ap",
    "flag_kron",
    "flag_exp",
    "flag_dev",
    "flag_cmodel",
    "flag_hsm",
    "flag_blendedness",
)


class MeasureConfig(pydantic.BaseModel):
    """How the children of a patch are measured in one band.

    Attributes
    ----------
    aperture_radii : tuple of float, arcsec
        Circular aperture radii (columns ``ap_flux_<r>``).
    kron_factor : float
        Kron aperture radius in Kron radii (2.5: Kron 1980, SExtractor).
    kron_window : float
        First-moment window, in adaptive-moment sigmas (SExtractor and Kron use ~6).
    extendedness_ratio : float
        ``psf_flux / cmodel_flux`` below which a child is extended (LSST's 0.985).
    extendedness_min_dchi2 : float
        And the chi^2 gain of the CModel over the PSF on the fit pixels above which it is extended.
    cmodel : bool
        Fit the exponential / de Vaucouleurs models (the cost of measurement).
    cmodel_max_iter : int
        Levenberg-Marquardt iterations per profile.
    cmodel_max_size : int, px
        Fit window side at most (larger footprints are fitted within this box at the centre; 64 px
        holds ~6 half-light radii of a 2" galaxy at 0.2"/px, and bounds the cost of the children of
        blends left undeblended, whose pixels are their whole parent's).
    cmodel_undeblended : bool
        Fit CModel to the children of blends the deblender skipped (too big, timed out): their pixels
        are the whole parent's, siblings included, so by default they get ``flag_cmodel`` and NaN
        (and the fit's cost, ~3x a deblended child's, is saved).
    hsm : bool
        GalSim HSM re-Gaussianization shapes (GalSim needed; else flagged).
    forced_hsm : bool
        HSM shapes in forced mode too (off: forced photometry measures fluxes; ``hsm_*`` NaN, flagged).
    centroid_max_iter, moments_max_iter : int
    moments_tol : float
    core_radius : float, px
        Radius of the "center" flags.
    local_background_annulus : (float, float), PSF FWHM
        Inner and outer radius of the local-background annulus.
    max_psf_lost : float
        ``flag_psf_flux`` when bad pixels carry more than this fraction of the PSF's weight.
    bad_mask_planes : tuple of str
        Pixels left out of every measurement.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    aperture_radii: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    kron_factor: float = 2.5
    kron_window: float = 6.0
    extendedness_ratio: float = 0.985
    extendedness_min_dchi2: float = 25.0
    cmodel: bool = True
    cmodel_max_iter: int = 12
    cmodel_max_size: int = 64
    cmodel_undeblended: bool = False
    hsm: bool = True
    forced_hsm: bool = False
    centroid_max_iter: int = 30
    moments_max_iter: int = 60
    moments_tol: float = 1e-4
    core_radius: float = 2.0
    local_background_annulus: tuple[float, float] = (2.0, 4.0)
    max_psf_lost: float = 0.1
    bad_mask_planes: tuple[str, ...] = ("BAD", "NO_DATA")

    @pydantic.field_validator("aperture_radii")
    @classmethod
    def _positive(cls, v):
        if any(not (r > 0) for r in v):
            raise ValueError(f"aperture_radii must be positive arcsec, got {v}")
        return v


def aperture_column(radius: float) -> str:
    """Column name of an aperture flux: ``ap_flux_1p0`` for 1.0 arcsec."""
    return "ap_flux_" + f"{radius:.1f}".replace(".", "p")


def _columns(config: MeasureConfig) -> list[str]:
    cols = ["id", "x", "y", "x_err", "y_err", "psf_flux", "psf_flux_err", "psf_flux_chi2"]
    for r in config.aperture_radii:
        cols += [aperture_column(r), aperture_column(r) + "_err"]
    cols += ["kron_radius", "kron_flux", "kron_flux_err"]
    cols += ["cmodel_flux", "cmodel_flux_err", "cmodel_frac_dev", "exp_flux", "exp_flux_err", "dev_flux"]
    cols += ["dev_flux_err", "exp_radius", "exp_g1", "exp_g2", "dev_radius", "dev_g1", "dev_g2"]
    cols += ["exp_chi2", "dev_chi2", "n_fit_pixels"]
    cols += ["ixx", "iyy", "ixy", "hsm_e1", "hsm_e2", "hsm_sigma", "hsm_resolution"]
    cols += ["extendedness", "extendedness_dchi2", "blendedness", "local_background"]
    return cols + list(_FLAGS)


def _moments_sigma(ixx: float, iyy: float, ixy: float) -> float:
    det = ixx * iyy - ixy * ixy
    return det**0.25 if det > 0 else math.nan


def _clipped_median(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    for _ in range(5):
        if v.size < 3:
            break
        med = float(np.median(v))
        s = 1.4826 * float(np.median(np.abs(v - med)))
        keep = np.abs(v - med) <= 3.0 * s if s > 0 else np.ones(v.size, bool)
        if keep.all():
            break
        v = v[keep]
    return float(np.median(v)) if v.size else math.nan


class _Hsm:
    """GalSim's HSM, imported on first use; ``None`` results when GalSim is missing."""

    def __init__(self, enabled: bool):
        self.galsim: Any = None
        self.missing = False
        if enabled:
            try:
                import galsim

                self.galsim = galsim
            except ImportError:
                self.missing = True

    def __call__(self, image, weight, kernel, x, y):
        gs = self.galsim
        if gs is None:
            return None
        try:
            res = gs.hsm.EstimateShear(
                gs.Image(np.ascontiguousarray(image, np.float64), scale=1.0),
                gs.Image(np.ascontiguousarray(kernel, np.float64), scale=1.0),
                weight=gs.Image(np.ascontiguousarray(weight, np.float64), scale=1.0),
                shear_est="REGAUSS",
                guess_centroid=gs.PositionD(x + 1.0, y + 1.0),
                strict=False,
            )
        except Exception:  # noqa: BLE001 -- any HSM failure is one child's flag
            return None
        if res.error_message or res.correction_status != 0:
            return None
        return float(res.corrected_e1), float(res.corrected_e2), float(res.moments_sigma), float(res.resolution_factor)


def _reference_arrays(reference: pd.DataFrame | None, n: int) -> dict | None:
    if reference is None:
        return None
    missing = [c for c in REFERENCE_COLUMNS if c not in reference.columns]
    if missing:
        from procsky.errors import ProcskyValueError

        raise ProcskyValueError(
            f"forced measurement: reference lacks columns {missing}; pass the measure_band table of the "
            f"reference band (it has {list(REFERENCE_COLUMNS)})"
        )
    if len(reference) != n:
        from procsky.errors import ProcskyValueError

        raise ProcskyValueError(
            f"forced measurement: reference has {len(reference)} rows but there are {n} children; its rows "
            "must be aligned with deblended.children"
        )
    cols = list(REFERENCE_COLUMNS) + (["kron_radius"] if "kron_radius" in reference.columns else [])
    return {c: reference[c].to_numpy(np.float64) for c in cols}


def measure_band(
    deblended: Any,
    coadd: Any,
    band: str,
    config: MeasureConfig | None = None,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Measure every deblended child in one band (see the module docstring).

    Parameters
    ----------
    deblended : Deblended
        ``bands``, ``children`` (``id, x, y, x0, y0, x1, y1``; ``is_isolated`` optional) and
        ``child_images(id) -> ((x0, y0, x1, y1), images (B, h, w), model (B, h, w))``.
    coadd : Exposure
        The band's coadd on the children's pixel grid (nJy per pixel, PSF attached, WCS).
    band : str
    config : MeasureConfig
    reference : DataFrame, optional
        Forced mode: the reference band's :func:`measure_band` table, rows aligned with
        ``deblended.children`` (columns :data:`REFERENCE_COLUMNS`).

    Returns
    -------
    DataFrame
        One row per child, in ``children`` order; columns without band prefix, fluxes in the
        coadd's unit (nJy), positions in array px.
    """
    from procsky.errors import ProcskyValueError
    from procsky.wcs import pixel_scale

    config = config or MeasureConfig()
    bands = list(deblended.bands)
    if band not in bands:
        raise ProcskyValueError(f"band {band!r} is not one of the deblended bands {bands}")
    bi = bands.index(band)
    if coadd.psf is None:
        raise ProcskyValueError(f"the {band} coadd has no PSF model: attach one before measuring")
    if coadd.wcs is None:
        raise ProcskyValueError(f"the {band} coadd has no WCS: aperture radii are in arcsec")
    children = deblended.children
    n = len(children)
    ref = _reference_arrays(reference, n)
    ny, nx = coadd.shape
    scale = pixel_scale(coadd.wcs, 0.5 * (nx - 1), 0.5 * (ny - 1))
    image = np.asarray(coadd.image, np.float32)
    variance = np.asarray(coadd.variance, np.float32)
    mask = np.asarray(coadd.mask, np.uint32)
    # PSF models are addressed in the coadd's tract pixels; this stage works in array pixels.
    ctx = _Context(config, array_psf(coadd.psf, coadd.xy0), image, variance, mask, scale, coadd.mask_bits)
    hsm = _Hsm(config.hsm)
    if hsm.missing:
        note_degraded("measure_no_galsim", "GalSim is not installed: HSM shapes are NaN and flagged", band=band)

    cols = _columns(config)
    out: dict[str, list] = {c: [] for c in cols}
    isolated = children["is_isolated"].to_numpy(bool) if "is_isolated" in children.columns else np.ones(n, bool)
    # children of blends the deblender gave up on hold their siblings' light: no galaxy models there
    undeblended = np.zeros(n, bool)
    for c in _UNDEBLENDED_FLAGS:
        if c in children.columns:
            undeblended |= children[c].to_numpy(bool)
    fit_cmodel = config.cmodel & (~undeblended | config.cmodel_undeblended)
    ids = children["id"].to_numpy()
    xs = children["x"].to_numpy(np.float64)
    ys = children["y"].to_numpy(np.float64)
    for k in range(n):
        bbox, images, model = deblended.child_images(ids[k])
        fixed = None if ref is None else {c: v[k] for c, v in ref.items()}
        rec = _measure_child(
            ctx, hsm, bbox, np.asarray(images), np.asarray(model), bi, xs[k], ys[k], isolated[k], fit_cmodel[k], fixed
        )
        rec["id"] = ids[k]
        for c in cols:
            out[c].append(rec.get(c, False if c.startswith("flag_") else math.nan))
    df = pd.DataFrame(out, columns=cols)
    for c in _FLAGS:
        df[c] = df[c].astype(bool)
    n_fit = int(fit_cmodel.sum())
    n_bad = int((df["flag_cmodel"].to_numpy() & fit_cmodel).sum())
    if n_fit and n_bad > 0.2 * n_fit:
        note_degraded(
            "measure_cmodel_failures",
            f"CModel failed for {n_bad} of {n_fit} children fitted in {band}",
            band=band,
            n_failed=n_bad,
            n_children=n_fit,
        )
    return df


class _Context:
    """Per-band constants of :func:`measure_band`."""

    def __init__(self, config, psf, image, variance, mask, scale, mask_bits):
        self.config = config
        self.psf = psf
        self.image = image
        self.variance = variance
        self.mask = mask
        self.scale = scale
        self.bad_bits = int(mask_bits(*config.bad_mask_planes))
        self.sat_bit = int(mask_bits("SAT"))
        self.nodata_bits = int(mask_bits("NO_DATA", "EDGE"))
        self.nodata_bit = int(mask_bits("NO_DATA"))
        planes = ("DETECTED", "SAT", *config.bad_mask_planes)
        self.sky_bad = int(mask_bits(*planes))
        self.radii_px = [r / scale for r in config.aperture_radii]
        self.tables = {p: gk.profile_table(p) for p in gk.PROFILES} if config.cmodel else {}


def _psf_shape(kern: np.ndarray) -> tuple[float, float, float, float]:
    """Adaptive moments (ixx, iyy, ixy) and sigma of a PSF kernel, px."""
    c = kern.shape[0] // 2
    m = np.zeros(kern.shape, np.uint32)
    ixx, iyy, ixy, _, _, _, ok = adaptive_moments(kern.astype(np.float64), m, float(c), float(c), 2.0, 100, 1e-6, 0)
    if not ok:
        ixx = iyy = 4.0
        ixy = 0.0
    return ixx, iyy, ixy, _moments_sigma(ixx, iyy, ixy)


def _measure_child(
    ctx: _Context, hsm: _Hsm, bbox, images, model, bi, x_peak, y_peak, isolated, fit_cmodel, fixed
) -> dict:
    cfg = ctx.config
    rec: dict[str, Any] = {}
    x0, y0, x1, y1 = (int(v) for v in bbox)
    ny, nx = ctx.image.shape
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0 or images.ndim != 3 or images.shape[1:] != (h, w):
        for f in _FLAGS[5:]:
            rec[f] = True
        return rec
    img = images[bi].astype(np.float64)
    fp = np.any(images != 0, axis=0)
    if model.shape == images.shape:
        fp |= np.any(model > 0, axis=0)
    msk_full = ctx.mask[y0:y1, x0:x1]
    var_full = ctx.variance[y0:y1, x0:x1].astype(np.float64)
    # the child's pixels: its footprint; elsewhere no light, no noise, no flags
    var = np.where(fp, var_full, 0.0)
    msk = np.where(fp, msk_full, 0).astype(np.uint32)
    bad = ctx.bad_bits
    # non-finite pixels carry no data, whatever their mask says
    nonfinite = ~np.isfinite(img) | ~np.isfinite(var_full)
    if nonfinite.any():
        img[nonfinite] = 0.0
        var[nonfinite] = 0.0
        msk[nonfinite & fp] |= np.uint32(ctx.nodata_bit)
    # pad so that apertures and PSF stamps stay on the array; beyond the coadd: NO_DATA
    # the PSF at the deblender's peak (or the reference position): one kernel per child (a coadd PSF's
    # kernel is a weighted sum over its inputs; the centroid is within a pixel of the peak)
    ref_ok = fixed is not None and math.isfinite(fixed["x"]) and math.isfinite(fixed["y"])
    px0, py0 = (float(fixed["x"]), float(fixed["y"])) if ref_ok else (float(x_peak), float(y_peak))
    kern = np.asarray(ctx.psf.kernel(min(max(px0, 0.0), nx - 1.0), min(max(py0, 0.0), ny - 1.0)), np.float64)
    kern = kern / kern.sum()
    s = kern.shape[0]
    pad = int(math.ceil(max(ctx.radii_px + [s / 2.0]))) + 2
    pimg = np.zeros((h + 2 * pad, w + 2 * pad))
    pvar = np.zeros_like(pimg)
    pmsk = np.zeros(pimg.shape, np.uint32)
    pimg[pad:-pad, pad:-pad] = img
    pvar[pad:-pad, pad:-pad] = var
    pmsk[pad:-pad, pad:-pad] = msk
    gy0, gx0 = y0 - pad, x0 - pad
    yy, xx = np.mgrid[gy0 : gy0 + pimg.shape[0], gx0 : gx0 + pimg.shape[1]]
    off = (yy < 0) | (yy >= ny) | (xx < 0) | (xx >= nx)
    pmsk[off] |= np.uint32(ctx.nodata_bit)

    # ---- position
    # forced: the reference's position (the deblender's peak, flagged, when the reference has none)
    xc, yc = px0, py0
    if fixed is not None:
        rec["x_err"] = rec["y_err"] = math.nan
        rec["flag_centroid"] = not ref_ok
    pxx, pyy, pxy, psig = _psf_shape(kern)
    lx, ly = xc - gx0, yc - gy0
    if fixed is None:
        cx, cy, ex, ey, _exy, ok = windowed_centroid(pimg, pvar, pmsk, lx, ly, psig, cfg.centroid_max_iter, bad)
        rec["flag_centroid"] = not ok
        if ok:
            lx, ly = cx, cy
            rec["x_err"], rec["y_err"] = ex, ey
        else:
            rec["x_err"] = rec["y_err"] = math.nan
    rec["x"], rec["y"] = lx + gx0, ly + gy0

    # ---- pixel flags
    d2 = (xx - rec["x"]) ** 2 + (yy - rec["y"]) ** 2
    core = d2 <= cfg.core_radius**2
    pfp = np.zeros(pimg.shape, bool)
    pfp[pad:-pad, pad:-pad] = fp
    raw = np.zeros(pimg.shape, np.uint32)
    raw[pad:-pad, pad:-pad] = msk_full | np.where(nonfinite, np.uint32(ctx.nodata_bit), np.uint32(0))
    rec["flag_saturated"] = bool(np.any(raw[pfp] & ctx.sat_bit))
    rec["flag_saturated_center"] = bool(np.any(raw[core] & ctx.sat_bit))
    rec["flag_bad"] = bool(np.any(raw[pfp] & bad))
    rec["flag_bad_center"] = bool(np.any(raw[core & ~off] & bad)) or bool(np.any(core & off))
    near = d2 <= (s / 2.0) ** 2
    touches = (
        (x0 <= 0 and fp[:, 0].any())
        or (y0 <= 0 and fp[0].any())
        or (x1 >= nx and fp[:, -1].any())
        or (y1 >= ny and fp[-1].any())
    )
    rec["flag_edge"] = bool(touches) or bool(np.any(near & off))
    rec["flag_edge"] |= bool(np.any(raw[near & pfp] & ctx.nodata_bits))

    # ---- adaptive moments
    ixx, iyy, ixy, _mx, _my, _amp, ok = adaptive_moments(
        pimg, pmsk, lx, ly, psig, cfg.moments_max_iter, cfg.moments_tol, bad
    )
    rec["flag_moments"] = not ok
    rec["ixx"], rec["iyy"], rec["ixy"] = (ixx, iyy, ixy) if ok else (math.nan, math.nan, math.nan)

    # ---- PSF flux
    ix, iy = int(math.floor(lx + 0.5)), int(math.floor(ly + 0.5))
    stamp = shift_image(kern, lx - ix, ly - iy)
    stamp /= stamp.sum()
    f, fe, chi2, _lost = psf_flux(pimg, pvar, pmsk, ix, iy, stamp, True, bad)
    # weight lost to bad pixels of the footprint (pixels off the footprint are simply not the child's)
    hs = s // 2
    sl = (slice(iy - hs, iy + hs + 1), slice(ix - hs, ix + hs + 1))
    w2 = stamp * stamp
    lost_bad = float((w2 * ((pmsk[sl] & bad) != 0)).sum() / w2.sum()) if pmsk[sl].shape == w2.shape else 1.0
    rec["psf_flux"], rec["psf_flux_err"], rec["psf_flux_chi2"] = f, fe, chi2
    rec["flag_psf_flux"] = not math.isfinite(f) or lost_bad > cfg.max_psf_lost

    # ---- apertures
    flag_ap = False
    for r, rp in zip(cfg.aperture_radii, ctx.radii_px, strict=True):
        a, ae, _area, fl = aperture_flux(pimg, pvar, pmsk, lx, ly, rp, bad)
        rec[aperture_column(r)], rec[aperture_column(r) + "_err"] = a, ae
        flag_ap |= bool(fl)
    rec["flag_ap"] = flag_ap

    # ---- Kron
    kr_min = psig * math.sqrt(math.pi / 2.0)  # r1 of a Gaussian PSF
    if fixed is not None and "kron_radius" in fixed and math.isfinite(fixed["kron_radius"]):
        r1 = float(fixed["kron_radius"])
    else:
        sig = _moments_sigma(ixx, iyy, ixy) if ok else psig
        r1 = gk.kron_radius(pimg, pmsk, lx, ly, cfg.kron_window * max(sig, psig), bad)
        r1 = max(r1, kr_min) if math.isfinite(r1) else math.nan
    rec["kron_radius"] = r1
    if math.isfinite(r1):
        a, ae, _area, fl = aperture_flux(pimg, pvar, pmsk, lx, ly, cfg.kron_factor * r1, bad)
        # running off the padded stamp is no flag (the child has no light there), bad pixels are
        rad = cfg.kron_factor * r1
        on = (
            lx - rad >= -0.5
            and ly - rad >= -0.5
            and lx + rad <= pimg.shape[1] - 0.5
            and ly + rad <= pimg.shape[0] - 0.5
        )
        rec["kron_flux"], rec["kron_flux_err"] = a, ae
        rec["flag_kron"] = bool(fl and on) or not math.isfinite(a)
    else:
        rec["flag_kron"] = True

    # ---- CModel
    if fit_cmodel:
        _cmodel(ctx, rec, img, var, msk, fp, kern, xc=rec["x"] - x0, yc=rec["y"] - y0, psf_t=pxx + pyy, fixed=fixed)
    else:
        for fl in ("flag_exp", "flag_dev", "flag_cmodel"):
            rec[fl] = True
    pf, cf = rec["psf_flux"], rec.get("cmodel_flux", math.nan)
    dchi2 = rec.get("extendedness_dchi2", math.nan)
    if math.isfinite(pf) and math.isfinite(cf) and cf > 0 and math.isfinite(dchi2):
        # extended: the model flux exceeds the PSF flux by the ratio (LSST) AND the galaxy model fits
        # significantly better than the point source (the ratio alone calls noisy stars extended)
        rec["extendedness"] = float(pf / cf < cfg.extendedness_ratio and dchi2 > cfg.extendedness_min_dchi2)

    # ---- HSM shapes
    res = (
        None
        if fixed is not None and not cfg.forced_hsm
        else hsm(
            img,
            np.where(fp & ((msk & bad) == 0), 1.0 / np.where(var > 0, var, 1.0), 0.0),
            kern,
            rec["x"] - x0,
            rec["y"] - y0,
        )
    )
    if res is None:
        rec["flag_hsm"] = True
    else:
        rec["hsm_e1"], rec["hsm_e2"], rec["hsm_sigma"], rec["hsm_resolution"] = res
        rec["flag_hsm"] = False

    # ---- blendedness: the child's PSF-weighted flux over its footprint against the coadd's
    parent = np.zeros_like(pimg)
    parent[pad:-pad, pad:-pad] = np.where(fp & ~nonfinite, ctx.image[y0:y1, x0:x1], 0.0)
    parent[~np.isfinite(parent)] = 0.0
    if pimg[sl].shape == stamp.shape:
        wgt = stamp * ((pmsk[sl] & bad) == 0)
        pc, pp = float((wgt * pimg[sl]).sum()), float((wgt * parent[sl]).sum())
    else:
        pc = pp = math.nan
    if math.isfinite(pc) and pp > 0:
        rec["blendedness"] = 1.0 - pc / pp
        rec["flag_blendedness"] = False
    else:
        rec["flag_blendedness"] = True

    # ---- local background
    rec["local_background"] = _local_background(ctx, rec["x"], rec["y"], psig, fp, x0, y0) if isolated else 0.0
    return rec


def _local_background(ctx: _Context, x: float, y: float, psig: float, fp: np.ndarray, x0: int, y0: int) -> float:
    """3-sigma-clipped median of the coadd in an annulus around (x, y), outside the child's footprint
    and detected or bad pixels (LSST's LocalBackground: an annulus of the image, sources masked); the
    annulus moves out beyond the footprint when too few pixels are left (a bright source's footprint)."""
    cfg = ctx.config
    fwhm = SIGMA_TO_FWHM * psig
    rin, rout = (a * fwhm for a in cfg.local_background_annulus)
    fy, fx = np.nonzero(fp)
    rfp = float(np.sqrt(((fx + x0 - x) ** 2 + (fy + y0 - y) ** 2).max())) if fy.size else 0.0
    for r_in, r_out in ((rin, rout), (max(rin, rfp + 1.0), max(rin, rfp + 1.0) + rout - rin)):
        vals = gk.annulus_values(ctx.image, ctx.mask, x, y, r_in, r_out, ctx.sky_bad, fp, x0, y0)
        if vals.size >= 20:
            return _clipped_median(vals)
    return math.nan


def _cmodel(ctx, rec, img, var, msk, fp, kern, *, xc, yc, psf_t, fixed) -> None:
    """Exponential, de Vaucouleurs and CModel fluxes into ``rec`` (free or forced)."""
    cfg = ctx.config
    h, w = img.shape
    m = cfg.cmodel_max_size
    # fit window: the footprint's box, at most m x m around the centre
    bx0 = 0 if w <= m else int(min(max(round(xc) - m // 2, 0), w - m))
    by0 = 0 if h <= m else int(min(max(round(yc) - m // 2, 0), h - m))
    win = (slice(by0, by0 + min(h, m)), slice(bx0, bx0 + min(w, m)))
    d = img[win]
    v = var[win]
    good = fp[win] & ((msk[win] & ctx.bad_bits) == 0) & (v > 0)
    pix = np.flatnonzero(good)
    rec["n_fit_pixels"] = int(pix.size)
    if pix.size < 5 or not (math.isfinite(xc) and math.isfinite(yc)):
        for fl in ("flag_exp", "flag_dev", "flag_cmodel"):
            rec[fl] = True
        return
    data = d.reshape(-1)[pix]
    weight = 1.0 / v.reshape(-1)[pix]
    grids = {prof: gk.fit_grid(kern, d.shape, xc - bx0, yc - by0, wide=prof == "dev") for prof in gk.PROFILES}
    models: dict[str, Any] = {}
    if fixed is None:
        ixx, iyy, ixy = rec["ixx"], rec["iyy"], rec["ixy"]
        if math.isfinite(ixx):
            # starting shape: adaptive moments less the PSF's (size) and their distortion
            t = ixx + iyy - psf_t
            tt = ixx + iyy
            e1, e2 = (ixx - iyy) / tt, 2.0 * ixy / tt
            e = math.hypot(e1, e2)
            gfac = 1.0 / (1.0 + math.sqrt(max(1.0 - min(e, 0.9) ** 2, 0.0)))
            g1, g2 = e1 * gfac, e2 * gfac
            re0 = max(1.4 * math.sqrt(max(t, 0.05) / 2.0), 0.3)
        else:
            g1 = g2 = 0.0
            re0 = 1.0
        re_max = float(max(d.shape))
        for prof, start in (("exp", (re0, g1, g2)), ("dev", None)):
            if start is None:
                st = models["exp"][1]
                start = (st[0] * 1.3, st[1], st[2])
            re, q1, q2, flux, err, chi2, _it, ok = gk.fit_profile(
                data,
                weight,
                pix,
                grids[prof],
                ctx.tables[prof],
                *start,
                re_max=re_max,
                max_iter=cfg.cmodel_max_iter,
            )
            rec[f"{prof}_radius"], rec[f"{prof}_g1"], rec[f"{prof}_g2"] = re, q1, q2
            rec[f"{prof}_flux"], rec[f"{prof}_flux_err"], rec[f"{prof}_chi2"] = flux, err, chi2
            rec[f"flag_{prof}"] = not ok
            mod = gk.render_models(grids[prof], ctx.tables[prof], np.array([[re, q1, q2]]))[0].reshape(-1)[pix]
            models[prof] = (mod.astype(np.float64), (re, q1, q2))
        flux, err, frac, chi2_c = gk.cmodel_combine(data, weight, models["exp"][0], models["dev"][0])
        rec["cmodel_flux"], rec["cmodel_flux_err"], rec["cmodel_frac_dev"] = flux, err, frac
        rec["flag_cmodel"] = bool(rec["flag_exp"] and rec["flag_dev"]) or not math.isfinite(flux)
        # the point-source model on the same pixels: a profile of zero radius is the PSF itself (its
        # transform is 1), so chi2_psf - chi2_cmodel is the likelihood-ratio statistic of "extended"
        psf_mod = gk.render_models(grids["exp"], ctx.tables["exp"], np.array([[0.0, 0.0, 0.0]]))[0]
        _f, _e, chi2_p = gk.linear_amplitude(data, weight, psf_mod.reshape(-1)[pix].astype(np.float64))
        if math.isfinite(chi2_p) and math.isfinite(chi2_c):
            rec["extendedness_dchi2"] = max(chi2_p - chi2_c, 0.0)
        return
    # forced: the reference's shapes and frac_dev, amplitudes only
    for prof in gk.PROFILES:
        p = (fixed[f"{prof}_radius"], fixed[f"{prof}_g1"], fixed[f"{prof}_g2"])
        rec[f"{prof}_radius"], rec[f"{prof}_g1"], rec[f"{prof}_g2"] = p
        if not all(math.isfinite(q) for q in p) or p[0] <= 0 or math.hypot(p[1], p[2]) >= 1.0:
            rec[f"flag_{prof}"] = True
            continue
        mod = gk.render_models(grids[prof], ctx.tables[prof], np.array([p]))[0].reshape(-1)[pix].astype(np.float64)
        models[prof] = mod
        flux, err, chi2 = gk.linear_amplitude(data, weight, mod)
        rec[f"{prof}_flux"], rec[f"{prof}_flux_err"], rec[f"{prof}_chi2"] = flux, err, chi2
        rec[f"flag_{prof}"] = not math.isfinite(flux)
    frac = fixed["cmodel_frac_dev"]
    rec["cmodel_frac_dev"] = frac
    if len(models) == 2 and math.isfinite(frac):
        flux, err, _chi2 = gk.linear_amplitude(data, weight, (1.0 - frac) * models["exp"] + frac * models["dev"])
        rec["cmodel_flux"], rec["cmodel_flux_err"] = flux, err
        rec["flag_cmodel"] = not math.isfinite(flux)
        psf_mod = gk.render_models(grids["exp"], ctx.tables["exp"], np.array([[0.0, 0.0, 0.0]]))[0]
        _f, _e, chi2_p = gk.linear_amplitude(data, weight, psf_mod.reshape(-1)[pix].astype(np.float64))
        _f, _e, chi2_c = gk.linear_amplitude(data, weight, (1.0 - frac) * models["exp"] + frac * models["dev"])
        if math.isfinite(chi2_p) and math.isfinite(chi2_c):
            rec["extendedness_dchi2"] = max(chi2_p - chi2_c, 0.0)
    else:
        rec["flag_cmodel"] = True
