"""PSF models.

A PSF model renders a normalised kernel image (sum 1) at any detector position and reports
its FWHM and second moments there. Spatial variation is part of the model. Models
serialise to plain JSON-able dicts (arrays as nested lists), so they travel to dask workers
and into Zarr attributes unchanged.

Models
------
GaussianPsf
    An elliptical Gaussian, constant over the detector; the analytic reference.
ImagePsf
    A pixelised kernel, constant over the detector.
PolynomialImagePsf
    A pixelised kernel whose every pixel is a polynomial in (x, y) over the detector, the
    model PSFEx fits (Bertin 2011, "Automated Morphometry with SExtractor and PSFEx").
GridImagePsf
    Pixelised kernels tabulated on a regular grid of positions and bilinearly interpolated
    between them (e.g. a calexp's PSF warped onto a patch).
CoaddPsf
    The PSF of a coadd: at any position, the weighted sum of the PSFs of the inputs whose
    footprint (a polygon) contains that position, with the coadd weights (LSST's
    ``CoaddPsf``; Jee & Tyson 2011 for the idea of stacking the input PSFs).

Conventions: positions are 0-based pixel centres of the parent detector; kernels have odd
size with the PSF centre on the central pixel unless a sub-pixel offset is asked for.

FWHM, one definition everywhere (issue 19): :meth:`PsfModel.fwhm` is the half-maximum FWHM
of the effective (pixel-convolved) PSF the model represents, ``2 sqrt(A / pi)`` with ``A`` the
area above half the peak (:func:`half_max_fwhm`; the diameter of the disc of that area, so
defined for elliptical and spiky PSFs and exact, ``2.3548 (Ixx Iyy - Ixy^2)^(1/4)``, for an
elliptical Gaussian). :meth:`PsfModel.moment_fwhm` is the Gaussian-equivalent size from the
unweighted second moments of the kernel stamp, ``2.3548 (Ixx Iyy - Ixy^2)^(1/4)`` (the former
definition), which wide wings and diffraction spikes inflate several times.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from procsky.errors import ProcskyTypeError, ProcskyValueError

__all__ = [
    "matching_fwhm",
    "PsfModel",
    "GaussianPsf",
    "ImagePsf",
    "PolynomialImagePsf",
    "GridImagePsf",
    "CoaddPsf",
    "array_psf",
    "points_in_polygon",
    "psf_from_dict",
    "image_moments",
    "shift_image",
    "half_max_fwhm",
    "SIGMA_TO_FWHM",
]

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def image_moments(kernel: np.ndarray) -> tuple[float, float, float, float, float]:
    """Flux-weighted centroid and second moments of a kernel image.

    Returns ``(xc, yc, ixx, iyy, ixy)`` with ``xc, yc`` relative to the kernel centre pixel,
    in pixels and pixels squared.
    """
    k = np.asarray(kernel, dtype=float)
    ny, nx = k.shape
    y, x = np.mgrid[0:ny, 0:nx]
    x = x - (nx - 1) / 2.0
    y = y - (ny - 1) / 2.0
    s = k.sum()
    if s == 0:
        raise ProcskyValueError("cannot take moments of an all-zero kernel")
    xc, yc = (k * x).sum() / s, (k * y).sum() / s
    ixx = (k * (x - xc) ** 2).sum() / s
    iyy = (k * (y - yc) ** 2).sum() / s
    ixy = (k * (x - xc) * (y - yc)).sum() / s
    return float(xc), float(yc), float(ixx), float(iyy), float(ixy)


def _fourier_upsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (sinc) interpolation of an odd-sized image by an odd ``factor``: sample
    ``out[j, i]`` is at ``(i / factor, j / factor)`` of the zero-padded input."""
    a = np.asarray(img, dtype=np.float64)
    n0, n1 = a.shape
    a = np.pad(a, ((n0 // 2 + 1, n0 // 2 + 1), (n1 // 2 + 1, n1 // 2 + 1)))
    ny, nx = a.shape
    spec = np.fft.fftshift(np.fft.fft2(a))
    my, mx = ny * factor, nx * factor
    big = np.zeros((my, mx), complex)
    oy, ox = (my - ny) // 2, (mx - nx) // 2
    big[oy : oy + ny, ox : ox + nx] = spec
    return np.fft.ifft2(np.fft.ifftshift(big)).real * factor * factor


#: A PSF whose moment size exceeds its half-maximum size by more than this factor is sized by
#: the latter in :func:`matching_fwhm`.
MOMENT_SIZE_CAP = 1.25


def matching_fwhm(psf, x: float, y: float) -> float:
    """The size (FWHM, pixels) that PSF matching and measurement windows work with.

    The unweighted-moment size (``moment_fwhm``), at most ``MOMENT_SIZE_CAP`` times the
    half-maximum size (``fwhm``, what is reported). A ground PSF's wings are part of what a
    matching kernel or a Gaussian target must cover (its moment FWHM is 5-10 % above its
    half maximum, and matching to the half maximum leaves its wings unmatched); a PSF whose
    moments its wings or spikes dominate (a space PSF) is sized by its core. The half
    maximum when the moments give no size.
    """
    half = float(psf.fwhm(x, y))
    try:
        ixx, iyy, ixy = (float(v) for v in psf.moments(x, y))
    except (ValueError, ArithmeticError):
        return half
    det = ixx * iyy - ixy * ixy
    if not (ixx > 0 and iyy > 0 and det > 0) or not (np.isfinite(half) and half > 0):
        return half
    return min(SIGMA_TO_FWHM * det**0.25, MOMENT_SIZE_CAP * half)


def half_max_fwhm(image: np.ndarray, step: float = 1.0, upsample: int | None = None) -> float:
    """Half-maximum FWHM of a sampled PSF image, ``2 sqrt(A / pi)`` in the units of ``step``.

    ``A`` is the area where the profile is above half its peak, measured on the image
    interpolated (band-limited, by an odd factor chosen so that the samples are <= 1/12 of
    the FWHM) and counted with sub-sample edges (each sample's covered fraction from its
    value and gradient), within the connected region of the peak only: diffraction spikes,
    secondary peaks and negative lobes (ringing, over-subtraction) do not count. This is the
    ``procsky.sim.psf.half_max_fwhm`` convention (the diameter of the disc of that area), and
    exact for an elliptical Gaussian (``2.3548 (Ixx Iyy - Ixy^2)^(1/4)``).

    Sampled at the pixel scale an effective PSF narrower than ~2 px is aliased and its
    half-maximum FWHM comes out up to ~6 % high (1.4 px); a model super-sampled by 2-3
    (PSFEx's, Bertin 2011) passes its finer grid with ``step = 1 / oversample``.

    Parameters
    ----------
    image : 2-d array
        The PSF (any normalisation, peak positive), odd-sized.
    step : float
        Sample spacing (pixels per sample).
    upsample : int, optional
        Interpolation factor (odd); default from a first estimate of the FWHM.
    """
    from scipy import ndimage

    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2 or not np.isfinite(a).all() or not a.max() > 0:
        raise ProcskyValueError("half_max_fwhm needs a finite 2-d image with a positive peak")
    if upsample is None:
        rough = 2.0 * math.sqrt(max(int(np.count_nonzero(a > 0.5 * a.max())), 1) / math.pi)  # in samples
        upsample = int(np.clip(math.ceil(12.0 / rough), 3, 15)) | 1
    fine = _fourier_upsample(a, int(upsample)) if upsample > 1 else a
    half = 0.5 * fine.max()
    gy, gx = np.gradient(fine)
    grad = np.hypot(gx, gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(0.5 + (fine - half) / grad, 0.0, 1.0)
    frac[~np.isfinite(frac)] = (fine > half)[~np.isfinite(frac)]
    lab, _ = ndimage.label(frac > 0)
    peak = lab[np.unravel_index(int(np.argmax(fine)), fine.shape)]
    area = float(frac[lab == peak].sum()) * (step / upsample) ** 2
    return 2.0 * math.sqrt(area / math.pi)


def shift_image(kernel: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift a kernel by (dx, dy) pixels with a Fourier phase ramp.

    A positive ``dx`` moves the light towards larger x. Exact for band-limited
    (well-sampled) kernels, unlike Lanczos interpolation, whose kernel does not preserve
    the first moment (a 0.3 px shift of a 4 px FWHM Gaussian lands 0.01 px short). The
    kernel is zero-padded to avoid wrap-around and cropped back; the sum is preserved.
    """
    k = np.asarray(kernel, dtype=float)
    if dx == 0 and dy == 0:
        return k.copy()
    ny, nx = k.shape
    py, px = ny // 2 + 2, nx // 2 + 2
    padded = np.pad(k, ((py, py), (px, px)))
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (fx * dx + fy * dy))
    out = np.fft.irfft2(np.fft.rfft2(padded) * ramp, s=padded.shape)[py : py + ny, px : px + nx]
    s_in, s_out = k.sum(), out.sum()
    if s_out != 0:
        out *= s_in / s_out
    return out


class PsfModel:
    """Base class: subclasses implement :meth:`kernel` and :meth:`to_dict`."""

    #: Side of rendered kernels in pixels (odd).
    size: int = 25

    def kernel(self, x: float, y: float) -> np.ndarray:
        """Normalised kernel centred on the central pixel, at detector position (x, y)."""
        raise NotImplementedError

    def render(
        self, x: float, y: float, *, size: int | None = None, offset: tuple[float, float] = (0.0, 0.0)
    ) -> np.ndarray:
        """Normalised kernel at (x, y), optionally of another odd ``size`` and shifted by a
        sub-pixel ``offset`` (dx, dy) in pixels, e.g. the fractional part of a centroid."""
        k = self.kernel(x, y)
        if size is not None and size != k.shape[0]:
            k = _resize(k, size)
        if offset != (0.0, 0.0):
            k = shift_image(k, float(offset[0]), float(offset[1]))
        s = k.sum()
        return k / s if s != 0 else k

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        """Second moments (ixx, iyy, ixy) in pixels^2 at (x, y)."""
        _, _, ixx, iyy, ixy = image_moments(self.kernel(x, y))
        return ixx, iyy, ixy

    def fine_image(self, x: float, y: float) -> tuple[np.ndarray, float]:
        """The model's finest image of the effective PSF at (x, y), centred, and its sample step
        (pixels): the pixel kernel, or a super-sampled model's own grid."""
        return self.kernel(x, y), 1.0

    def fwhm(self, x: float, y: float) -> float:
        """Half-maximum FWHM in pixels at (x, y) of the effective (pixel-convolved) PSF
        (:func:`half_max_fwhm` of :meth:`fine_image`)."""
        img, step = self.fine_image(x, y)
        return half_max_fwhm(img, step)

    def moment_fwhm(self, x: float, y: float) -> float:
        """Gaussian-equivalent FWHM in pixels at (x, y) from the unweighted second moments of
        the kernel stamp (determinant radius), ``2.3548 (Ixx Iyy - Ixy^2)^(1/4)``."""
        ixx, iyy, ixy = self.moments(x, y)
        det = ixx * iyy - ixy * ixy
        if det <= 0:
            raise ProcskyValueError("PSF second moments are not positive definite")
        return SIGMA_TO_FWHM * det**0.25

    def to_dict(self) -> dict:
        raise NotImplementedError

    def __reduce__(self):
        return (psf_from_dict, (self.to_dict(),))

    def __eq__(self, other) -> bool:
        return isinstance(other, PsfModel) and _canon(self.to_dict()) == _canon(other.to_dict())

    def __hash__(self):
        return hash(repr(_canon(self.to_dict())))


def _canon(d):
    if isinstance(d, dict):
        return {k: _canon(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_canon(v) for v in d]
    return d


def _resize(k: np.ndarray, size: int) -> np.ndarray:
    if size % 2 == 0:
        raise ProcskyValueError(f"kernel size must be odd, got {size}")
    n = k.shape[0]
    if size < n:
        c = (n - size) // 2
        return k[c : c + size, c : c + size].copy()
    out = np.zeros((size, size), dtype=k.dtype)
    c = (size - n) // 2
    out[c : c + n, c : c + n] = k
    return out


@dataclass(frozen=True, eq=False)
class GaussianPsf(PsfModel):
    """Elliptical Gaussian PSF, constant over the detector.

    Parameters
    ----------
    sigma : float, pixels
        Gaussian sigma along the major axis when ``e`` is zero (round PSF).
    e1, e2 : float
        Distortion ellipticity components ((Ixx-Iyy)/(Ixx+Iyy), 2Ixy/(Ixx+Iyy)).
    size : int
        Side of rendered kernels (odd); defaults to about 8 sigma.
    """

    sigma: float
    e1: float = 0.0
    e2: float = 0.0
    size: int = 0

    def __post_init__(self):
        if not self.sigma > 0:
            raise ProcskyValueError(f"GaussianPsf sigma must be > 0 pixels, got {self.sigma}")
        if self.e1**2 + self.e2**2 >= 1:
            raise ProcskyValueError(f"GaussianPsf ellipticity |e| must be < 1, got e1={self.e1}, e2={self.e2}")
        if self.size == 0:
            object.__setattr__(self, "size", 2 * int(math.ceil(4.5 * self.sigma)) + 1)
        if self.size % 2 == 0:
            raise ProcskyValueError(f"kernel size must be odd, got {self.size}")

    @classmethod
    def from_fwhm(cls, fwhm: float, e1: float = 0.0, e2: float = 0.0, size: int = 0) -> GaussianPsf:
        """Gaussian PSF of the given FWHM (pixels, determinant-radius convention)."""
        return cls(fwhm / SIGMA_TO_FWHM, e1, e2, size)

    def _cov(self):
        # Determinant radius sigma^4 = ixx*iyy - ixy^2 with T = ixx + iyy and e = (e1, e2).
        e2sum = self.e1**2 + self.e2**2
        t = 2.0 * self.sigma**2 / math.sqrt(1.0 - e2sum)
        ixx = 0.5 * t * (1 + self.e1)
        iyy = 0.5 * t * (1 - self.e1)
        ixy = 0.5 * t * self.e2
        return ixx, iyy, ixy

    def kernel(self, x: float = 0.0, y: float = 0.0) -> np.ndarray:
        return self._draw(self.size, 0.0, 0.0)

    def _draw(self, size, dx, dy, oversample: int = 5):
        ixx, iyy, ixy = self._cov()
        det = ixx * iyy - ixy * ixy
        # Integrate over pixels by oversampling, so small PSFs keep their moments.
        h = (size - 1) / 2.0
        o = oversample
        sub = (np.arange(size * o) + 0.5) / o - 0.5 - h
        yy, xx = np.meshgrid(sub - dy, sub - dx, indexing="ij")
        q = (iyy * xx * xx - 2 * ixy * xx * yy + ixx * yy * yy) / det
        img = np.exp(-0.5 * q).reshape(size, o, size, o).sum(axis=(1, 3))
        return img / img.sum()

    def render(self, x, y, *, size=None, offset=(0.0, 0.0)):
        return self._draw(size or self.size, float(offset[0]), float(offset[1]))

    def moments(self, x=0.0, y=0.0):
        return self._cov()

    def fwhm(self, x=0.0, y=0.0):
        """Exact half-maximum FWHM of the Gaussian (area-equivalent for an elliptical one)."""
        return SIGMA_TO_FWHM * self.sigma

    def moment_fwhm(self, x=0.0, y=0.0):
        return SIGMA_TO_FWHM * self.sigma

    def to_dict(self) -> dict:
        return {"type": "GaussianPsf", "sigma": self.sigma, "e1": self.e1, "e2": self.e2, "size": self.size}


class ImagePsf(PsfModel):
    """A pixelised PSF kernel, constant over the detector.

    Parameters
    ----------
    kernel : 2-d array
        Odd-sized square image with the PSF centred on the central pixel; normalised on
        construction.
    """

    def __init__(self, kernel):
        k = np.array(kernel, dtype=np.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
            raise ProcskyValueError(f"ImagePsf needs an odd square kernel, got shape {k.shape}")
        s = k.sum()
        if not np.isfinite(s) or s <= 0:
            raise ProcskyValueError("ImagePsf kernel must have a positive finite sum")
        self._kernel = k / s
        self.size = k.shape[0]

    def kernel(self, x: float = 0.0, y: float = 0.0) -> np.ndarray:
        return self._kernel.copy()

    def to_dict(self) -> dict:
        return {"type": "ImagePsf", "kernel": self._kernel.tolist()}


class PolynomialImagePsf(PsfModel):
    """A pixelised PSF whose pixels vary as a polynomial in detector position (PSFEx-like).

    The model image at (x, y) is ``sum_k coeffs[k] * u**i_k * v**j_k`` with
    ``u = (x - x0) / scale_x`` and ``v = (y - y0) / scale_y`` and terms ordered by total
    degree: 1, u, v, u^2, u v, v^2, ...

    With ``oversample`` > 1 the model images are super-sampled (``oversample`` samples per
    pixel, PSFEx's model of an undersampled PSF; Bertin 2011): they sample the effective
    (pixel-convolved) PSF on a grid of step ``1 / oversample`` px, and kernels of
    ``stamp_size`` pixels are drawn from them by Lanczos-3 interpolation at the pixel centres
    (``procsky.kernels.psfmodel.render_stamps``), with any sub-pixel offset applied there.

    Parameters
    ----------
    coeffs : array (nterms, n, n)
        Basis images; ``n`` odd.
    order : int
        Polynomial order; ``nterms == (order + 1) * (order + 2) / 2``.
    x0, y0, scale_x, scale_y : float, pixels
        Normalisation of detector positions.
    oversample : int
        Model samples per pixel (1: the basis images are pixel kernels).
    stamp_size : int, optional
        Side of rendered kernels, pixels (odd), with ``oversample`` > 1; default
        ``n // oversample`` made odd.
    """

    def __init__(
        self,
        coeffs,
        order: int,
        x0: float,
        y0: float,
        scale_x: float,
        scale_y: float,
        oversample: int = 1,
        stamp_size: int | None = None,
    ):
        c = np.array(coeffs, dtype=np.float64)
        nterms = (order + 1) * (order + 2) // 2
        if c.ndim != 3 or c.shape[0] != nterms or c.shape[1] != c.shape[2] or c.shape[1] % 2 == 0:
            raise ProcskyValueError(
                f"PolynomialImagePsf needs coeffs of shape ({nterms}, n, n) with n odd for order {order}, got {c.shape}"
            )
        if scale_x <= 0 or scale_y <= 0:
            raise ProcskyValueError("PolynomialImagePsf scales must be > 0")
        if int(oversample) < 1:
            raise ProcskyValueError(f"PolynomialImagePsf oversample must be >= 1, got {oversample}")
        self.coeffs = c
        self.order = int(order)
        self.x0, self.y0, self.scale_x, self.scale_y = float(x0), float(y0), float(scale_x), float(scale_y)
        self.oversample = int(oversample)
        if self.oversample == 1:
            self.size = c.shape[1]
        else:
            self.size = int(stamp_size) if stamp_size is not None else (c.shape[1] // self.oversample) | 1
            if self.size % 2 == 0:
                raise ProcskyValueError(f"kernel size must be odd, got {self.size}")

    def terms(self, x: float, y: float) -> np.ndarray:
        u = (x - self.x0) / self.scale_x
        v = (y - self.y0) / self.scale_y
        return np.array([u ** (d - j) * v**j for d in range(self.order + 1) for j in range(d + 1)])

    def kernel(self, x: float, y: float) -> np.ndarray:
        if self.oversample != 1:
            return self.render(x, y)
        k = np.tensordot(self.terms(x, y), self.coeffs, axes=1)
        s = k.sum()
        return k / s if s > 0 else k

    def render(self, x, y, *, size=None, offset=(0.0, 0.0)):
        if self.oversample == 1:
            return super().render(x, y, size=size, offset=offset)
        from procsky.kernels.psfmodel import render_grid

        grid = np.tensordot(self.terms(x, y), self.coeffs, axes=1)
        return render_grid(grid, self.oversample, size or self.size, float(offset[0]), float(offset[1]))

    def fine_image(self, x: float, y: float) -> tuple[np.ndarray, float]:
        if self.oversample == 1:
            return self.kernel(x, y), 1.0
        return np.tensordot(self.terms(x, y), self.coeffs, axes=1), 1.0 / self.oversample

    def to_dict(self) -> dict:
        d = {
            "type": "PolynomialImagePsf",
            "coeffs": self.coeffs.tolist(),
            "order": self.order,
            "x0": self.x0,
            "y0": self.y0,
            "scale_x": self.scale_x,
            "scale_y": self.scale_y,
        }
        if self.oversample != 1:
            d.update(oversample=self.oversample, stamp_size=self.size)
        return d


class GridImagePsf(PsfModel):
    """Pixelised PSF kernels on a regular grid of positions, bilinearly interpolated.

    The kernel at (x, y) interpolates the four surrounding nodes; positions beyond the
    grid use the nearest edge nodes. Nodes without data (``valid`` false, e.g. where no
    input of a coadd lands) hold the kernel of the nearest valid node, so evaluation never
    fails; :meth:`covers` tells whether the nearest node had data.

    Serialised with the kernels as base64 float32 (compact; a coadd PSF holds one grid
    per input).

    Parameters
    ----------
    kernels : array (ny_nodes, nx_nodes, n, n)
        Kernel of every node (``n`` odd); normalised on construction.
    xs, ys : sequence of float, pixels
        Strictly increasing node positions (parent-detector / tract pixel frame).
    valid : array (ny_nodes, nx_nodes) of bool, optional
        Nodes that carry data (default all).
    """

    def __init__(self, kernels, xs, ys, valid=None):
        k = np.array(kernels, dtype=np.float64)
        xs = np.array(xs, dtype=np.float64).ravel()
        ys = np.array(ys, dtype=np.float64).ravel()
        if k.ndim != 4 or k.shape[:2] != (ys.size, xs.size) or k.shape[2] != k.shape[3] or k.shape[2] % 2 == 0:
            raise ProcskyValueError(
                f"GridImagePsf needs kernels of shape (len(ys), len(xs), n, n) with n odd, got {k.shape} for "
                f"{ys.size} x {xs.size} nodes"
            )
        if np.any(np.diff(xs) <= 0) or np.any(np.diff(ys) <= 0):
            raise ProcskyValueError("GridImagePsf node positions must be strictly increasing")
        v = np.ones(k.shape[:2], bool) if valid is None else np.array(valid, dtype=bool)
        if v.shape != k.shape[:2]:
            raise ProcskyValueError(f"GridImagePsf valid must have shape {k.shape[:2]}, got {v.shape}")
        if not v.any():
            raise ProcskyValueError("GridImagePsf needs at least one valid node")
        sums = k.sum(axis=(2, 3))
        if not np.all(np.isfinite(sums[v])) or np.any(sums[v] <= 0):
            raise ProcskyValueError("GridImagePsf valid kernels must have positive finite sums")
        # Fill nodes without data from the nearest valid node.
        iy, ix = np.nonzero(v)
        for j, i in zip(*np.nonzero(~v)):
            n = int(np.argmin((iy - j) ** 2 + (ix - i) ** 2))
            k[j, i] = k[iy[n], ix[n]]
            sums[j, i] = sums[iy[n], ix[n]]
        self.kernels = k / sums[:, :, None, None]
        self.xs, self.ys, self.valid = xs, ys, v
        self.size = k.shape[2]

    @staticmethod
    def _bracket(nodes, t):
        if nodes.size == 1 or t <= nodes[0]:
            return 0, 0, 0.0
        if t >= nodes[-1]:
            return nodes.size - 1, nodes.size - 1, 0.0
        i = int(np.searchsorted(nodes, t, side="right")) - 1
        return i, i + 1, float((t - nodes[i]) / (nodes[i + 1] - nodes[i]))

    def kernel(self, x: float, y: float) -> np.ndarray:
        i0, i1, fx = self._bracket(self.xs, float(x))
        j0, j1, fy = self._bracket(self.ys, float(y))
        k = (1 - fy) * ((1 - fx) * self.kernels[j0, i0] + fx * self.kernels[j0, i1]) + fy * (
            (1 - fx) * self.kernels[j1, i0] + fx * self.kernels[j1, i1]
        )
        s = k.sum()
        return k / s if s > 0 else k

    def covers(self, x: float, y: float) -> bool:
        """Whether the node nearest (x, y) carries data."""
        i = int(np.argmin(np.abs(self.xs - float(x))))
        j = int(np.argmin(np.abs(self.ys - float(y))))
        return bool(self.valid[j, i])

    def to_dict(self) -> dict:
        return {
            "type": "GridImagePsf",
            # float32, base64 (little-endian): a coadd PSF holds one grid per input visit,
            # which as nested JSON lists would cost ~30 bytes per value instead of ~5.
            "kernels_b64": base64.b64encode(self.kernels.astype("<f4").tobytes()).decode("ascii"),
            "shape": list(self.kernels.shape),
            "xs": self.xs.tolist(),
            "ys": self.ys.tolist(),
            "valid": self.valid.tolist(),
        }


def points_in_polygon(x, y, polygon) -> np.ndarray:
    """Whether points (x, y) lie inside a closed polygon (even-odd ray casting).

    Parameters
    ----------
    x, y : float or array
    polygon : array (n, 2)
        Vertices in order (the last connects to the first).
    """
    x = np.atleast_1d(np.asarray(x, float))[:, None]
    y = np.atleast_1d(np.asarray(y, float))[:, None]
    p = np.asarray(polygon, float)
    x0, y0 = p[None, :, 0], p[None, :, 1]
    x1, y1 = np.roll(x0, -1, axis=1), np.roll(y0, -1, axis=1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (np.count_nonzero(crosses & (x < xint), axis=1) % 2) == 1


class CoaddPsf(PsfModel):
    """The PSF of a coadd: the weighted sum of its inputs' PSFs where they have data.

    At (x, y) the kernel is ``sum_k w_k K_k(x, y) / sum_k w_k`` over the components whose
    polygon contains (x, y) (a component without a polygon covers where its own model
    :meth:`covers`, or everywhere). Where no component covers, all of them contribute,
    so evaluation never fails. Models are in one pixel frame (the coadd's tract pixels).

    Parameters
    ----------
    psfs : list of PsfModel
        Per-input PSFs already in the coadd's pixel frame (e.g. :class:`GridImagePsf` of a
        warped calexp PSF, or a nested :class:`CoaddPsf` of a multi-detector warp).
    weights : list of float
        Coadd weight of each input (> 0).
    polygons : list of (array (n, 2) or None)
        Footprint of each input in the same pixel frame.
    """

    def __init__(self, psfs, weights, polygons=None):
        psfs = list(psfs)
        w = np.asarray(weights, float).ravel()
        polys = [None] * len(psfs) if polygons is None else list(polygons)
        if not psfs or len(w) != len(psfs) or len(polys) != len(psfs):
            raise ProcskyValueError(
                f"CoaddPsf needs as many weights and polygons as PSFs (got {len(psfs)}, {len(w)}, {len(polys)})"
            )
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ProcskyValueError("CoaddPsf weights must be finite and > 0")
        for p in psfs:
            if not isinstance(p, PsfModel):
                raise ProcskyTypeError(f"CoaddPsf components must be PSF models, not {type(p).__name__}")
        self.psfs = psfs
        self.weights = w
        self.polygons = [None if q is None else np.asarray(q, float).reshape(-1, 2) for q in polys]
        self.size = max(p.size for p in psfs)

    def _covering(self, x: float, y: float) -> np.ndarray:
        out = np.zeros(len(self.psfs), bool)
        for k, (p, q) in enumerate(zip(self.psfs, self.polygons)):
            if q is not None:
                out[k] = bool(points_in_polygon(x, y, q)[0])
            elif hasattr(p, "covers"):
                out[k] = bool(p.covers(x, y))
            else:
                out[k] = True
        return out

    def covers(self, x: float, y: float) -> bool:
        """Whether any input has data at (x, y)."""
        return bool(self._covering(x, y).any())

    def n_inputs(self, x: float, y: float) -> int:
        """Number of inputs whose footprint contains (x, y)."""
        return int(self._covering(x, y).sum())

    def kernel(self, x: float, y: float) -> np.ndarray:
        use = self._covering(x, y)
        if not use.any():
            use[:] = True
        acc = np.zeros((self.size, self.size))
        for k in np.flatnonzero(use):
            acc += self.weights[k] * _resize(self.psfs[k].kernel(x, y), self.size)
        s = acc.sum()
        return acc / s if s > 0 else acc

    def to_dict(self) -> dict:
        return {
            "type": "CoaddPsf",
            "psfs": [p.to_dict() for p in self.psfs],
            "weights": self.weights.tolist(),
            "polygons": [None if q is None else q.tolist() for q in self.polygons],
        }


_TYPES = {
    "GaussianPsf": GaussianPsf,
    "ImagePsf": ImagePsf,
    "PolynomialImagePsf": PolynomialImagePsf,
    "GridImagePsf": GridImagePsf,
    "CoaddPsf": CoaddPsf,
}


def psf_from_dict(d: dict | None) -> PsfModel | None:
    """Rebuild a PSF model from :meth:`PsfModel.to_dict` output."""
    if d is None:
        return None
    if not isinstance(d, dict) or "type" not in d:
        raise ProcskyTypeError(f"not a serialised PSF model: {type(d).__name__}")
    kind = d["type"]
    if kind not in _TYPES:
        raise ProcskyValueError(f"unknown PSF model type {kind!r}; known: {', '.join(_TYPES)}")
    args = {k: v for k, v in d.items() if k != "type"}
    if kind == "ImagePsf":
        return ImagePsf(args["kernel"])
    if kind == "GridImagePsf" and "kernels_b64" in args:
        k = np.frombuffer(base64.b64decode(args["kernels_b64"]), dtype="<f4").reshape(args["shape"])
        return GridImagePsf(k, args["xs"], args["ys"], args.get("valid"))
    if kind == "CoaddPsf":
        return CoaddPsf([psf_from_dict(p) for p in args["psfs"]], args["weights"], args.get("polygons"))
    return _TYPES[kind](**args)


class _OffsetPsf(PsfModel):
    """A PSF model addressed in array pixels of an exposure whose array [0, 0] is the
    model's pixel (dx, dy) (see :func:`array_psf`)."""

    def __init__(self, base: PsfModel, dx: float, dy: float):
        self.base, self.dx, self.dy = base, float(dx), float(dy)
        self.size = base.size

    def kernel(self, x: float, y: float) -> np.ndarray:
        return self.base.kernel(x + self.dx, y + self.dy)

    def render(self, x, y, *, size=None, offset=(0.0, 0.0)):
        return self.base.render(x + self.dx, y + self.dy, size=size, offset=offset)

    def fine_image(self, x: float, y: float) -> tuple[np.ndarray, float]:
        return self.base.fine_image(x + self.dx, y + self.dy)

    def to_dict(self) -> dict:
        return self.base.to_dict()


def array_psf(psf: PsfModel | None, xy0) -> PsfModel | None:
    """``psf`` addressed in array pixels of an exposure with origin ``xy0``.

    PSF models are addressed in the exposure's own pixel frame: detector pixels for a
    calexp, tract pixels for a coadd (a :class:`CoaddPsf` locates its inputs there). Code
    working on array indices of a patch (whose ``xy0`` is the patch's corner in the tract)
    evaluates the PSF through this wrapper; with ``xy0 == (0, 0)`` the model itself comes back.
    """
    if psf is None or (float(xy0[0]) == 0.0 and float(xy0[1]) == 0.0):
        return psf
    return _OffsetPsf(psf, xy0[0], xy0[1])
