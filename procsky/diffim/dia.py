"""DIA sources: detection in both polarities, measurement, dipole fits, forced photometry."""

from __future__ import annotations

import math

import numpy as np
import pydantic

from procsky import masks as _masks
from procsky.errors import ProcskyValueError

from .lazy import _computed
from .subtract import _FIT_EXCLUDE, _MASKED, _SPREAD_CORE, _psf_sigma_checked, corrected_score_variance, psf_sigma_at

__all__ = ["DiaConfig", "detect_dia_sources", "dia_detection_mask", "forced_dia_photometry"]


class DiaConfig(pydantic.BaseModel):
    """Options of :func:`detect_dia_sources`.

    Attributes
    ----------
    nsigma : float
        Detection threshold in units of the local (matched-filter) noise.
    dipole_radius : float, PSF FWHM
        Positive and negative detections closer than this merge into one dipole source.
    edge_margin : int, pixels
        Sources closer than this to NO_DATA/the border are flagged ``flag_edge``.
    max_masked_fraction : float
        Sources with more of their PSF weight on masked pixels (no usable value: BAD, SAT,
        NO_DATA, EDGE, SUSPECT) are flagged.
    min_area : int, pixels
        Fewer pixels above the threshold are not a detection.
    registration_noise : bool
        Detect on the corrected score of Zackay, Ofek & Gal-Yam (2016): the variance of the
        filtered difference includes the registration and flux-mismatch noise at static
        sources (:func:`corrected_score_variance`), so that the residuals of bright static
        stars are not detections. Needs the static image (``detect_dia_sources(static=)``).
    registration_sigma : float, pixels, optional
        Registration noise per axis; default: measured by :func:`subtract_images`
        (``metadata["diffim"]["registration_sigma_px"]``).
    flux_mismatch : float, optional
        Fractional flux-matching noise; default: measured likewise (``flux_mismatch_rms``).
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    nsigma: float = pydantic.Field(5.0, gt=0)
    dipole_radius: float = pydantic.Field(1.5, gt=0)
    edge_margin: int = 3
    max_masked_fraction: float = 0.2
    min_area: int = 3
    registration_noise: bool = True
    registration_sigma: float | None = None
    flux_mismatch: float | None = None


def _stamp_bad_fraction(mask, bits, ix, iy, psf_stamp):
    ny, nx = mask.shape
    s = psf_stamp.shape[0]
    hh = s // 2
    y0, y1 = iy - hh, iy + hh + 1
    x0, x1 = ix - hh, ix + hh + 1
    w = psf_stamp**2
    tot = w.sum()
    m = np.ones((s, s), bool)
    yy0, yy1, xx0, xx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
    if yy1 > yy0 and xx1 > xx0:
        m[yy0 - y0 : yy1 - y0, xx0 - x0 : xx1 - x0] = (mask[yy0:yy1, xx0:xx1] & np.uint32(bits)) != 0
    return float((w * m).sum() / tot) if tot > 0 else 1.0


def _psf_fit(image, variance, mask, bits, psf, x, y, xy0):
    """Linear PSF flux at (x, y) (array pixels); returns flux, err, chi2_dof, lost fraction."""
    from procsky.kernels.measure import psf_flux

    ix, iy = int(round(x)), int(round(y))
    stamp = psf.render(x + xy0[0], y + xy0[1], offset=(x - ix, y - iy))
    return psf_flux(image, variance, mask, ix, iy, np.ascontiguousarray(stamp, dtype=np.float64), True, int(bits))


_DIPOLE_OVERSAMPLE = 4


def _oversampled_psf(psf, x, y, oversample=_DIPOLE_OVERSAMPLE, size=None):
    """The PSF at detector (x, y) tabulated ``oversample`` times finer than the pixels.

    ``oversample**2`` renderings at the sub-pixel offsets of an ``n x n`` grid, interleaved
    (:func:`procsky.kernels.dipole.interleave_offsets`): an oversampled effective PSF
    (Anderson & King 2000) that the dipole kernel interpolates, instead of re-rendering
    the PSF (an FFT shift) at every function evaluation. ``size`` (odd) crops the kernel
    to the part a fit needs (a difference image's PSF, convolved with the matching and
    decorrelation kernels, is ~85 px wide where a dipole box is ~30: the 16 FFT shifts then
    cost ~8x less); the crop keeps the normalisation of the full kernel (sum 1 over the
    model's own size, like ``_psf_fit``'s stamps), so fitted fluxes are total fluxes.

    Models rendered by :meth:`PsfModel.render` itself (kernel, crop, FFT shift,
    normalise) are evaluated once and shifted in one batch (one forward FFT, the same
    padding and phase ramps as :func:`procsky.psf.shift_image`): the result equals
    ``psf.render(x, y, size=s, offset=...)`` to rounding, without 15 more evaluations of
    the kernel (costly for a CoaddPsf of many inputs). Others (GaussianPsf draws its
    offsets analytically) are rendered 16 times.
    """
    from procsky.kernels.dipole import interleave_offsets, oversampled_offsets
    from procsky.psf import PsfModel, _resize

    n = int(oversample)
    offs = oversampled_offsets(n)
    if type(psf).render is PsfModel.render:
        kfull = np.asarray(psf.kernel(x, y), dtype=np.float64)
        tot = float(kfull.sum())
        s = kfull.shape[0] if size is None else min(int(size), kfull.shape[0])
        k = _resize(kfull, s) if s != kfull.shape[0] else kfull
        frac = float(k.sum()) / tot if tot != 0 else 1.0
        shifted = _shift_batch(k, np.array([o[2] for o in offs]), np.array([o[3] for o in offs]))
        stamps = np.empty((n, n, s, s))
        for m, (a, b, _, _) in enumerate(offs):
            stamps[b, a] = frac * shifted[m]
        return interleave_offsets(stamps)
    k0 = np.asarray(psf.render(x, y), dtype=np.float64)
    s = k0.shape[0]
    if size is not None and int(size) < s:
        c = (s - int(size)) // 2
        s = s - 2 * c
        k0 = k0[c : c + s, c : c + s]
    frac = float(k0.sum())
    stamps = np.empty((n, n, s, s))
    for a, b, dx, dy in offs:
        stamps[b, a] = k0 if (a == 0 and b == 0) else frac * psf.render(x, y, size=s, offset=(dx, dy))
    return interleave_offsets(stamps)


def _shift_batch(k, dxs, dys):
    """``shift_image(k, dx, dy) / sum`` for many offsets (as ``PsfModel.render`` normalises
    them) with one forward FFT: the same zero padding and Fourier phase ramps."""
    out = _shift_batch_raw(k, dxs, dys)
    sums = out.sum(axis=(1, 2))
    return out / np.where(sums != 0, sums, 1.0)[:, None, None]


def _shift_batch_raw(k, dxs, dys):
    """``shift_image(k, dx, dy)`` for many offsets, not normalised (``k`` itself at a zero
    offset, as ``PsfModel.render`` does not shift there)."""
    ny, nx = k.shape
    py, px = ny // 2 + 2, nx // 2 + 2
    padded = np.pad(k, ((py, py), (px, px)))
    f = np.fft.rfft2(padded)
    fy = np.fft.fftfreq(padded.shape[0])[None, :, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, None, :]
    # separable phase ramp: exp(-2 pi i (fx dx + fy dy)) = exp(-2 pi i fx dx) exp(-2 pi i fy dy)
    ramp = np.exp(-2j * np.pi * fx * np.asarray(dxs, float)[:, None, None]) * np.exp(
        -2j * np.pi * fy * np.asarray(dys, float)[:, None, None]
    )
    out = np.fft.irfft2(f[None] * ramp, s=padded.shape, axes=(-2, -1))[:, py : py + ny, px : px + nx]
    zero = (np.asarray(dxs) == 0) & (np.asarray(dys) == 0)
    out[zero] = k  # render does not shift at a zero offset
    return out


class _PsfTables:
    """Oversampled tables of a difference image's PSF, made once per image, from which every
    per-source PSF stamp is interpolated in numba (:func:`procsky.kernels.dipole.psf_stamp`)
    instead of an FFT shift of the model per source (and 16 per dipole).

    An :class:`~procsky.psf.ImagePsf` (constant) is tabulated once, ``oversample`` times
    finer than the pixels (:func:`_oversampled_psf`: the model rendered at the ``n x n``
    sub-pixel offsets). A pixel-grid :class:`~procsky.psf.PolynomialImagePsf` (the PSF
    :func:`subtract_images` gives a difference) is linear in its coefficient images and the
    FFT shift is linear, so each coefficient image is shifted once; the table at (x, y) is
    their combination with the polynomial terms there, each sub-pixel offset normalised as
    ``render`` normalises it: the table ``_oversampled_psf`` would build at (x, y), to
    rounding. Other models (``supported`` False) are measured as before, rendering per source.
    """

    def __init__(self, psf, oversample=_DIPOLE_OVERSAMPLE):
        from procsky.kernels.dipole import interleave_offsets, oversampled_offsets
        from procsky.psf import ImagePsf, PolynomialImagePsf

        self.psf = psf
        self.n = n = int(oversample)
        self._const = None
        self._terms = None
        try:
            if type(psf) is ImagePsf:
                self._const = _oversampled_psf(psf, 0.0, 0.0, n)
            elif type(psf) is PolynomialImagePsf and getattr(psf, "oversample", 1) == 1:
                offs = oversampled_offsets(n)
                dxs = np.array([o[2] for o in offs])
                dys = np.array([o[3] for o in offs])
                tabs = []
                for c in np.asarray(psf.coeffs, dtype=np.float64):
                    shifted = _shift_batch_raw(c, dxs, dys)
                    stamps = np.empty((n, n) + c.shape)
                    for m, (a, b, _, _) in enumerate(offs):
                        stamps[b, a] = shifted[m]
                    tabs.append(interleave_offsets(stamps))
                self._terms = np.array(tabs)
        except Exception:  # noqa: BLE001 - a model that cannot be tabulated is rendered per source
            self._const = self._terms = None

    @property
    def supported(self) -> bool:
        return self._const is not None or self._terms is not None

    def table(self, x, y) -> np.ndarray:
        """The oversampled PSF at detector (x, y) (:func:`procsky.kernels.dipole.interleave_offsets`)."""
        if self._const is not None:
            return self._const
        assert self._terms is not None, "table() needs a supported PSF"
        n = self.n
        comb = np.tensordot(self.psf.terms(x, y), self._terms, axes=1)
        s = comb.shape[0] // n
        sums = comb.reshape(s, n, s, n).sum(axis=(0, 2))  # [b, a]: one per sub-pixel offset
        sums = np.where(sums != 0, sums, 1.0)
        return np.ascontiguousarray((comb.reshape(s, n, s, n) / sums[None, :, None, :]).reshape(s * n, s * n))

    def stamps(self, x, y, ix, iy):
        """(fit stamp at the sub-pixel offset of (x, y) from pixel (ix, iy), the unshifted
        stamp) at detector (x, y): ``render(x, y, offset=(x - ix, y - iy))`` and
        ``render(x, y)``, interpolated from the table."""
        from procsky.kernels.dipole import psf_stamp

        tab = self.table(x, y)
        n = self.n
        size = tab.shape[0] // n
        return psf_stamp(tab, n, size, x - ix, y - iy), np.ascontiguousarray(tab[0::n, 0::n])


def _fft_friendly_half(h):
    """Smallest half-size >= h whose FFT shift is fast: ``shift_image`` pads a side of
    ``2 h + 1`` to ``4 h + 5``, and pocketfft is ~2x slower on sizes with large prime factors
    (73 = 4 * 17 + 5 is prime) than on 13-smooth ones (81, 105)."""
    h = int(h)
    while True:
        m = 4 * h + 5
        for p in (3, 5, 7, 11, 13):
            while m % p == 0:
                m //= p
        if m == 1:
            return h
        h += 1


def _dipole_fit(image, variance, mask, bits, psf, xp, yp, xn, yn, xy0, half, psf_os=None):
    """Two PSFs of opposite sign fitted by least squares; returns dict of dipole parameters.

    The PSF at the dipole centre is tabulated once, 4x oversampled, and the six parameters
    are fitted by Levenberg-Marquardt with analytic derivatives in numba
    (:func:`procsky.kernels.dipole.fit_dipole`) over the box of half-size ``half`` around
    the midpoint of the two detections, pixels with ``bits`` set left out. ``neg_flux`` is
    the (positive) flux of the negative lobe. None when the fit fails or does not converge.
    ``psf_os``: the table at the dipole centre when the caller has it (:class:`_PsfTables`).
    """
    from procsky.kernels.dipole import fit_dipole

    ny, nx = image.shape
    xc, yc = 0.5 * (xp + xn), 0.5 * (yp + yn)
    ix0, ix1 = max(int(xc) - half, 0), min(int(xc) + half + 1, nx)
    iy0, iy1 = max(int(yc) - half, 0), min(int(yc) + half + 1, ny)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    # PSF support needed: the box seen from either lobe, lobes within ~sep/2 of the centre
    if psf_os is None:
        reach = half + int(math.ceil(0.5 * math.hypot(xp - xn, yp - yn))) + 3
        psf_os = _oversampled_psf(psf, xy0[0] + xc, xy0[1] + yc, size=2 * _fft_friendly_half(reach) + 1)
    p0 = np.array([xp, yp, 1.0, xn, yn, 1.0], dtype=np.float64)
    params, _, chi2, npix, _, converged = fit_dipole(
        image, variance, mask, int(bits), ix0, iy0, ix1, iy1, psf_os, _DIPOLE_OVERSAMPLE, p0
    )
    if npix < 10 or not converged or not np.all(np.isfinite(params)) or not np.isfinite(chi2):
        return None
    return {
        "pos_x": float(params[0]),
        "pos_y": float(params[1]),
        "pos_flux": float(params[2]),
        "neg_x": float(params[3]),
        "neg_y": float(params[4]),
        "neg_flux": float(params[5]),
        "chi2": float(chi2),
    }


def _detect_both(exp, cfg: DiaConfig, static=None) -> tuple:
    """Detection in both polarities on a computed difference ``exp``.

    Returns ``(image, variance, mask, detections, psf_sigma)``: ``mask`` is a copy of the
    difference's with DETECTED / DETECTED_NEGATIVE set, ``detections`` a list of
    ``(x, y, polarity, peak_significance)`` (array pixels), positive ones first.
    """
    from procsky.kernels.detection import detect_sources

    img = np.asarray(exp.image, dtype=np.float32)
    var = np.asarray(exp.variance, dtype=np.float32)
    mask = np.asarray(exp.mask, dtype=np.uint32).copy()
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    psf = exp.psf
    if psf is None:
        raise ProcskyValueError("the difference image has no PSF; subtract_images sets one")
    cx, cy = x0 + nx / 2, y0 + ny / 2
    # A difference's PSF (the PSF convolved with the matching and decorrelation kernels)
    # may have no positive-definite moments: psf_sigma_at falls back to the half-maximum
    # size and notes it.
    sigma = psf_sigma_at(psf, cx, cy, what="difference-image PSF")
    nodata_bits = _masks.bits(*[n for n in ("NO_DATA", "BAD") if n in planes], planes=planes)
    extra = None
    if static is not None and np.shape(static) != img.shape:
        raise ProcskyValueError(
            f"static image shape {np.shape(static)} differs from the difference's {img.shape}; "
            "pass the science image on the difference's pixel grid"
        )
    if cfg.registration_noise and static is not None:
        meta = (exp.metadata or {}).get("diffim") or {}
        reg = cfg.registration_sigma if cfg.registration_sigma is not None else meta.get("registration_sigma_px")
        eps = cfg.flux_mismatch if cfg.flux_mismatch is not None else meta.get("flux_mismatch_rms")
        if reg is not None or eps is not None:
            extra = corrected_score_variance(
                static, sigma, np.nan if reg is None else reg, np.nan if eps is None else eps
            )
    dets = []
    for pol in (1, -1):
        res = detect_sources(
            img,
            var,
            mask,
            psf_sigma=sigma,
            nsigma=cfg.nsigma,
            polarity=pol,
            min_area=cfg.min_area,
            extra_variance=extra,
            deblend=True,
            bad_bits=nodata_bits,
        )
        plane = "DETECTED" if pol == 1 else "DETECTED_NEGATIVE"
        if plane in planes:
            mask[res.detected] |= np.uint32(1 << planes[plane])
        for i in range(len(res.x)):
            dets.append((float(res.x[i]), float(res.y[i]), pol, float(res.peak_significance[i])))
    return img, var, mask, dets, sigma


def dia_detection_mask(diff, config: DiaConfig | None = None, *, static=None) -> np.ndarray:
    """The mask of ``diff`` with the DETECTED / DETECTED_NEGATIVE planes of
    :func:`detect_dia_sources` (same arguments) set, without measuring the sources."""
    return _detect_both(_computed(diff), config or DiaConfig(), static)[2]


def detect_dia_sources(diff, config: DiaConfig | None = None, *, static=None):
    """Detect and measure sources on a difference image, both polarities.

    Parameters
    ----------
    diff : procsky.exposure.Exposure
        Difference image (decorrelated), with PSF, variance, mask and optionally WCS,
        PhotoCalib and VisitInfo.
    config : DiaConfig, optional
    static : ndarray (ny, nx), optional
        The static sky on the difference's grid and in its units (the science image), for
        the registration-noise term of the detection score (``config.registration_noise``).

    Returns
    -------
    pandas.DataFrame
        One row per DIA source: ``dia_source_id`` (per image, from 0), ``x``, ``y`` (detector
        pixels), ``ra``, ``dec`` (deg), ``psf_flux``, ``psf_flux_err`` (nJy when a PhotoCalib is
        present, else counts), ``psf_chi2``, ``snr``, ``is_negative``, ``is_dipole``, dipole
        fit columns, ``ixx``, ``iyy``, ``ixy`` (pixels^2), ``masked_fraction`` (PSF^2 weight on
        pixels without a usable value), ``repaired_fraction`` (on CR/INTRP pixels), flags
        ``flag_edge``, ``flag_masked``, ``flag_saturated_nearby``, ``flag_centroid``,
        ``flag_shape``, ``flag_psf_flux``, ``flag_psf`` (the PSF could not be rendered there, or
        its size came from the half-maximum fallback because its moments are not positive
        definite, :func:`psf_sigma_at`) and ``reliability`` in [0, 1].
    mask : ndarray uint32
        The mask with DETECTED / DETECTED_NEGATIVE set.

    Notes
    -----
    The per-source steps run in numba: windowed centroid, PSF fit on a stamp interpolated
    from the PSF tables made once per image (:class:`_PsfTables`; within ~1e-5 of the flux
    an FFT-shifted rendering gives), adaptive moments, and the dipole fit on the table at
    the dipole centre. ``benchmarks/bench_dia.py`` times it (0.6 CPU s per 100 sources on a
    2k x 2k difference with 30% dipoles, from 1.1 before the tables).
    """
    import pandas as pd

    from procsky.kernels.measure import adaptive_moments, psf_flux, windowed_centroid

    cfg = config or DiaConfig()
    exp = _computed(diff)
    img, var, mask, dets, sigma = _detect_both(exp, cfg, static)
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    psf = exp.psf
    # PSF stamps of every source interpolated from tables made once (numba), not rendered
    # per source; unsupported PSF models are rendered per source.
    tables = _PsfTables(psf) if dets else _PsfTables(None)
    fwhm = 2.3548 * sigma
    # PSF size from the half-maximum fallback (moments not positive definite): every
    # source's PSF-based measurements are flagged ``flag_psf``.
    psf_ok = _psf_sigma_checked(psf, x0 + nx / 2, y0 + ny / 2)[1]
    nodata_bits = _masks.bits(*[n for n in ("NO_DATA", "BAD") if n in planes], planes=planes)
    fit_bits = _masks.bits(*[n for n in _FIT_EXCLUDE if n in planes], planes=planes)
    masked_bits = _masks.bits(*[n for n in _MASKED if n in planes], planes=planes)
    repaired_bits = _masks.bits(*[n for n in _SPREAD_CORE if n in planes], planes=planes)
    sat_bits = _masks.bits(*[n for n in ("SAT",) if n in planes], planes=planes)
    # Pair positive and negative detections into dipoles (closest pairs first).
    pos = [d for d in dets if d[2] == 1]
    neg = [d for d in dets if d[2] == -1]
    pairs = []
    rmax = cfg.dipole_radius * fwhm
    for i, p in enumerate(pos):
        for j, q in enumerate(neg):
            dd = math.hypot(p[0] - q[0], p[1] - q[1])
            if dd <= rmax:
                pairs.append((dd, i, j))
    pairs.sort()
    used_p, used_n = set(), set()
    sources = []
    for _dd, i, j in pairs:
        if i in used_p or j in used_n:
            continue
        used_p.add(i)
        used_n.add(j)
        sources.append(("dipole", pos[i], neg[j]))
    sources += [("single", p, None) for i, p in enumerate(pos) if i not in used_p]
    sources += [("single", q, None) for j, q in enumerate(neg) if j not in used_n]
    sources.sort(key=lambda s: (s[1][1], s[1][0], s[1][2]))
    rows = []
    sgn_img = {1: img, -1: -img}
    for kind, a, b in sources:
        pol = a[2]
        work = sgn_img[pol]
        xc0, yc0 = a[0], a[1]
        if kind == "dipole":
            xc0, yc0 = 0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1])
        xw, yw, ex, ey, _, cok = windowed_centroid(work, var, mask, a[0], a[1], sigma, 20, fit_bits)
        if kind == "dipole":
            xw, yw, cok = xc0, yc0, True
        if not cok:
            xw, yw = a[0], a[1]
        ix, iy = int(round(xw)), int(round(yw))
        src_psf_ok = psf_ok
        try:
            if tables.supported:
                fit_stamp, stamp = tables.stamps(xw + x0, yw + y0, ix + x0, iy + y0)
                f, fe, chi2, _lost = psf_flux(img, var, mask, ix, iy, fit_stamp, True, int(fit_bits))
            else:
                f, fe, chi2, _lost = _psf_fit(img, var, mask, fit_bits, psf, xw, yw, (x0, y0))
                stamp = psf.render(xw + x0, yw + y0)
            mfrac = _stamp_bad_fraction(mask, masked_bits, ix, iy, stamp)
            rfrac = _stamp_bad_fraction(mask, repaired_bits, ix, iy, stamp)
        except Exception:  # noqa: BLE001 - a PSF that cannot be rendered here is a flag, not a crash
            f = fe = chi2 = np.nan
            src_psf_ok = False
            box = np.ones((2 * int(math.ceil(2 * fwhm)) + 1,) * 2)
            mfrac = _stamp_bad_fraction(mask, masked_bits, ix, iy, box)
            rfrac = _stamp_bad_fraction(mask, repaired_bits, ix, iy, box)
        mxx, myy, mxy, mok = _moments(work, mask, xw, yw, sigma, fit_bits, adaptive_moments)
        near_sat = _stamp_bad_fraction(mask, sat_bits, ix, iy, np.ones((2 * int(2 * fwhm) + 1,) * 2)) > 0
        edge = (
            xw < cfg.edge_margin
            or yw < cfg.edge_margin
            or xw > nx - 1 - cfg.edge_margin
            or yw > ny - 1 - cfg.edge_margin
            or _stamp_bad_fraction(mask, nodata_bits, ix, iy, np.ones((2 * cfg.edge_margin + 1,) * 2)) > 0
        )
        row = {
            "x": xw + x0,
            "y": yw + y0,
            "x_err": ex,
            "y_err": ey,
            "psf_flux": f,
            "psf_flux_err": fe,
            "psf_chi2": chi2,
            "snr": f / fe if fe and np.isfinite(fe) and fe > 0 else np.nan,
            "peak_significance": a[3] * pol,
            "is_negative": bool(pol == -1 and kind != "dipole"),
            "is_dipole": kind == "dipole",
            "ixx": mxx,
            "iyy": myy,
            "ixy": mxy,
            "masked_fraction": mfrac,
            "repaired_fraction": rfrac,
            "flag_edge": bool(edge),
            "flag_masked": bool(mfrac > cfg.max_masked_fraction),
            "flag_saturated_nearby": bool(near_sat),
            "flag_centroid": not bool(cok),
            "flag_shape": not bool(mok),
            "flag_psf_flux": not np.isfinite(f),
            "flag_psf": not bool(src_psf_ok),
        }
        dip = None
        if kind == "dipole":
            try:
                dip = _dipole_fit(
                    img,
                    var,
                    mask,
                    fit_bits,
                    psf,
                    a[0],
                    a[1],
                    b[0],
                    b[1],
                    (x0, y0),
                    int(math.ceil(2 * fwhm + 0.5 * math.hypot(a[0] - b[0], a[1] - b[1]))),
                    psf_os=(
                        tables.table(x0 + 0.5 * (a[0] + b[0]), y0 + 0.5 * (a[1] + b[1])) if tables.supported else None
                    ),
                )
            except Exception:  # noqa: BLE001 - a failed dipole fit is flag_dipole_fit
                dip = None
        row.update(
            {
                "dipole_pos_flux": dip["pos_flux"] if dip else np.nan,
                "dipole_neg_flux": dip["neg_flux"] if dip else np.nan,
                "dipole_separation": (
                    math.hypot(dip["pos_x"] - dip["neg_x"], dip["pos_y"] - dip["neg_y"]) if dip else np.nan
                ),
                "dipole_angle": (
                    math.degrees(math.atan2(dip["pos_y"] - dip["neg_y"], dip["pos_x"] - dip["neg_x"]))
                    if dip
                    else np.nan
                ),
                "dipole_chi2": dip["chi2"] if dip else np.nan,
                "flag_dipole_fit": bool(kind == "dipole" and dip is None),
            }
        )
        # Reliability: penalise masked PSF weight, a PSF fit worse than the noise and a
        # shape that adaptive moments cannot measure (cosmic rays, bad columns and other
        # sharp or linear artifacts; real point sources on a difference image converge).
        # Repaired pixels are in the fit: a bad repair shows in the chi^2.
        c = chi2 if np.isfinite(chi2) else 10.0
        rel = max(0.0, 1.0 - mfrac) / (1.0 + max(0.0, c - 1.0))
        if not mok and kind != "dipole":
            rel *= 0.25
        row["reliability"] = float(rel)
        rows.append(row)
    cols = [
        "x",
        "y",
        "x_err",
        "y_err",
        "psf_flux",
        "psf_flux_err",
        "psf_chi2",
        "snr",
        "peak_significance",
        "is_negative",
        "is_dipole",
        "ixx",
        "iyy",
        "ixy",
        "masked_fraction",
        "repaired_fraction",
        "flag_edge",
        "flag_masked",
        "flag_saturated_nearby",
        "flag_centroid",
        "flag_shape",
        "flag_psf_flux",
        "flag_psf",
        "dipole_pos_flux",
        "dipole_neg_flux",
        "dipole_separation",
        "dipole_angle",
        "dipole_chi2",
        "flag_dipole_fit",
        "reliability",
    ]
    df = pd.DataFrame(rows, columns=cols)
    for c in cols:
        if c.startswith("flag_") or c.startswith("is_"):
            df[c] = df[c].astype(bool)
        else:
            df[c] = df[c].astype(np.float64)
    df.insert(0, "dia_source_id", np.arange(len(df), dtype=np.int64))
    _calibrate_and_locate(df, exp, ["psf_flux", "dipole_pos_flux", "dipole_neg_flux"], "psf_flux_err")
    return df, mask


def _moments(work, mask, x, y, sigma, bits, fn):
    try:
        out = fn(work, mask, x, y, sigma, 50, 1e-4, bits)
    except Exception:  # noqa: BLE001 - per-source failures are flags
        return np.nan, np.nan, np.nan, False
    # adaptive_moments returns (ixx, iyy, ixy, ..., ok) - take the documented leading three and last flag.
    vals = tuple(out)
    return float(vals[0]), float(vals[1]), float(vals[2]), bool(vals[-1])


def _calibrate_and_locate(df, exp, flux_cols, err_col):
    x0, y0 = exp.xy0
    if exp.photocalib is not None and len(df):
        cal = exp.photocalib.calibration
        for c in flux_cols:
            df[c] = df[c] * cal
        df[err_col] = df[err_col] * cal
    unit = "nJy" if exp.photocalib is not None else "count"
    df.attrs["flux_unit"] = unit
    df.attrs["units"] = {
        **{c: unit for c in flux_cols + [err_col]},
        "x": "pixel",
        "y": "pixel",
        "ra": "deg",
        "dec": "deg",
        "mjd": "d",
    }
    if exp.wcs is not None and len(df):
        ra, dec = exp.pixel_to_sky(df["x"].to_numpy() - x0, df["y"].to_numpy() - y0)
        df["ra"] = np.asarray(ra, dtype=np.float64)
        df["dec"] = np.asarray(dec, dtype=np.float64)
    else:
        df["ra"] = np.full(len(df), np.nan)
        df["dec"] = np.full(len(df), np.nan)
    vi = exp.visit_info
    df["mjd"] = np.full(len(df), vi.mjd if vi is not None else np.nan, dtype=np.float64)
    df["band"] = vi.band if vi is not None else ""
    if vi is not None and vi.visit is not None:
        df["visit"] = np.full(len(df), int(vi.visit), dtype=np.int64)
    if exp.detector and "id" in exp.detector:
        df["detector"] = np.full(len(df), int(exp.detector["id"]), dtype=np.int64)


def forced_dia_photometry(diff, ra=None, dec=None, ids=None, *, x=None, y=None):
    """PSF photometry at fixed positions on a difference image (light-curve points).

    Parameters
    ----------
    diff : procsky.exposure.Exposure
    ra, dec : array_like, deg
        Positions (needs ``diff.wcs``); or give detector pixels ``x``, ``y``.
    ids : array_like of int
        DIA object ids, one per position.

    Returns
    -------
    pandas.DataFrame
        ``dia_object_id``, ``x``, ``y``, ``psf_flux``, ``psf_flux_err`` (nJy when calibrated),
        ``psf_chi2``, ``masked_fraction`` (PSF^2 weight on pixels without a usable value),
        ``flag_edge``, ``mjd``, ``band`` ...; positions
        off the image are skipped.
    """
    import pandas as pd

    from procsky.kernels.measure import psf_flux

    exp = _computed(diff)
    img = np.asarray(exp.image, dtype=np.float32)
    var = np.asarray(exp.variance, dtype=np.float32)
    mask = np.asarray(exp.mask, dtype=np.uint32)
    planes = exp.mask_planes
    ny, nx = img.shape
    x0, y0 = exp.xy0
    if x is None:
        if exp.wcs is None:
            raise ProcskyValueError("forced photometry by sky position needs a WCS on the difference image")
        px, py = exp.sky_to_pixel(np.asarray(ra, float), np.asarray(dec, float))
    else:
        px, py = np.asarray(x, float) - x0, np.asarray(y, float) - y0
    ids = np.arange(len(px)) if ids is None else np.asarray(ids)
    fit_bits = _masks.bits(*[n for n in _FIT_EXCLUDE if n in planes], planes=planes)
    masked_bits = _masks.bits(*[n for n in _MASKED if n in planes], planes=planes)
    nod = _masks.bits(*[n for n in ("NO_DATA",) if n in planes], planes=planes)
    rows = []
    tables = _PsfTables(exp.psf) if len(px) else _PsfTables(None)
    for oid, xx, yy in zip(ids, np.atleast_1d(px), np.atleast_1d(py)):
        if not (np.isfinite(xx) and np.isfinite(yy)) or xx < -0.5 or yy < -0.5 or xx > nx - 0.5 or yy > ny - 0.5:
            continue
        ix, iy = int(round(xx)), int(round(yy))
        if tables.supported:
            fit_stamp, stamp = tables.stamps(xx + x0, yy + y0, ix + x0, iy + y0)
            f, fe, chi2, _ = psf_flux(img, var, mask, ix, iy, fit_stamp, True, int(fit_bits))
        else:
            f, fe, chi2, _ = _psf_fit(img, var, mask, fit_bits, exp.psf, xx, yy, (x0, y0))
            stamp = exp.psf.render(xx + x0, yy + y0)
        mfrac = _stamp_bad_fraction(mask, masked_bits, ix, iy, stamp)
        edge = _stamp_bad_fraction(mask, nod, ix, iy, np.ones((7, 7))) > 0
        rows.append(
            {
                "dia_object_id": int(oid),
                "x": xx + x0,
                "y": yy + y0,
                "psf_flux": f,
                "psf_flux_err": fe,
                "psf_chi2": chi2,
                "masked_fraction": mfrac,
                "flag_edge": bool(edge),
                "flag_psf_flux": not np.isfinite(f),
            }
        )
    cols = [
        "dia_object_id",
        "x",
        "y",
        "psf_flux",
        "psf_flux_err",
        "psf_chi2",
        "masked_fraction",
        "flag_edge",
        "flag_psf_flux",
    ]
    df = pd.DataFrame(rows, columns=cols)
    df["dia_object_id"] = df["dia_object_id"].astype(np.int64)
    for c in ("x", "y", "psf_flux", "psf_flux_err", "psf_chi2", "masked_fraction"):
        df[c] = df[c].astype(np.float64)
    for c in ("flag_edge", "flag_psf_flux"):
        df[c] = df[c].astype(bool)
    _calibrate_and_locate(df, exp, ["psf_flux"], "psf_flux_err")
    return df
