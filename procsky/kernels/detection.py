"""Source detection: PSF-matched significance image, threshold, footprints, peaks, deblending.

* **Significance image** (matched filter; LSST ``SourceDetectionTask``, sep's matched
  filter): ``nu = conv(I, g) / sqrt(conv(V, g^2))`` with ``g`` the PSF (approximated by a
  Gaussian of the PSF width, separable) or any small kernel. ``nu`` is in units of the
  local noise of the smoothed image, so ``nu > 5`` is a 5-sigma detection whatever the
  variance plane looks like.
* **Footprints**: connected components (8-connectivity, two-pass union-find) of
  ``nu > nsigma``, with a minimum area, then grown by a few pixels (LSST grows by
  ``2.4 sigma_psf``) and relabelled so that footprints whose grown regions touch merge.
* **Chunks**: :func:`face_pairs`, :func:`merge_label_pairs` and :func:`relabel` label each
  chunk on its own and then join labels that touch across chunk faces (the scheme of
  dask-image's ``ndmeasure.label``); :func:`label_chunked` chains them.
* **Peaks and deblending**: a watershed by flooding of the significance image inside each
  footprint, pixels taken in decreasing order. Each local maximum starts a basin; when
  basins meet at a saddle, the lower one survives as a separate child only if its peak
  rises ``contrast`` sigma above the saddle (a topological-persistence rule, which keeps
  noise bumps on a bright star from splitting it). Surviving basins are the children,
  each with its peak; a footprint with more than one child is *blended*. The watershed
  runs on a significance image smoothed with half the PSF sigma: the full matched filter
  turns a faint companion within ~2 FWHM of a bright star into a shoulder without a peak.
  Measured on crowded synthetic fields (FWHM 4 px, ~2700 stars per Mpx up to 2e6 counts):
  completeness at S/N >= 10 of 94-96 % (> 98 % for stars without a neighbour within
  8 px), spurious detections ~0.2 %.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numba
import numpy as np

from ._bits import BAD, NO_DATA, SAT, bit

__all__ = [
    "any_bits",
    "dilate_square",
    "DetectionResult",
    "detect_sources",
    "gaussian_kernel_1d",
    "convolve_separable",
    "convolve_2d",
    "significance_image",
    "label_components",
    "grow_mask",
    "deblend_footprints",
    "face_pairs",
    "merge_label_pairs",
    "relabel",
    "label_chunked",
    "footprint_bboxes",
    "merge_saturated_children",
]


# ----------------------------------------------------------------------------- smoothing
def gaussian_kernel_1d(sigma, truncate=4.0):
    """Normalised 1-D Gaussian kernel.

    Parameters
    ----------
    sigma : float, pixels
    truncate : float
        Half-width in units of sigma.

    Returns
    -------
    ndarray (2 h + 1,) float64, sum 1
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma!r}; give the PSF sigma (FWHM / 2.3548)")
    h = max(1, int(np.ceil(truncate * sigma)))
    x = np.arange(-h, h + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@numba.njit(nogil=True, cache=True)
def convolve_separable(image, ky, kx):
    """Convolve with the separable kernel ``ky[:, None] * kx[None, :]``, zeros outside.

    Both passes are written as vectorisable ``axpy`` loops over a zero-padded row.

    Parameters
    ----------
    image : ndarray (ny, nx) float
    ky, kx : ndarray (odd,) float
        Kernels along y and x, centred.

    Returns
    -------
    ndarray (ny, nx) float32
    """
    ny, nx = image.shape
    hy = ky.size // 2
    hx = kx.size // 2
    kx32 = kx.astype(np.float32)
    ky32 = ky.astype(np.float32)
    tmp = np.empty((ny, nx), dtype=np.float32)
    pad = np.zeros(nx + 2 * hx, dtype=np.float32)
    acc = np.empty(nx, dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            pad[x + hx] = image[y, x]
        acc[:] = 0.0
        for k in range(kx32.size):
            w = kx32[k]
            for x in range(nx):
                acc[x] += w * pad[x + k]
        tmp[y, :] = acc
    out = np.empty((ny, nx), dtype=np.float32)
    for y in range(ny):
        acc[:] = 0.0
        for k in range(max(0, y - hy) - y, min(ny - 1, y + hy) - y + 1):
            w = ky32[k + hy]
            row = tmp[y + k]
            for x in range(nx):
                acc[x] += w * row[x]
        out[y, :] = acc
    return out


@numba.njit(nogil=True, cache=True)
def _prepare(image, variance, bad, use_bad):
    ny, nx = image.shape
    img = np.empty((ny, nx), dtype=np.float32)
    var = np.empty((ny, nx), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            i = image[y, x]
            v = variance[y, x]
            if (use_bad and bad[y, x]) or not np.isfinite(i) or not np.isfinite(v):
                img[y, x] = 0.0
                var[y, x] = 0.0
            else:
                img[y, x] = i
                var[y, x] = v
    return img, var


@numba.njit(nogil=True, cache=True)
def _ratio_sqrt(num, den):
    ny, nx = num.shape
    out = np.zeros((ny, nx), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            d = den[y, x]
            if d > 0:
                out[y, x] = num[y, x] / np.sqrt(d)
    return out


@numba.njit(nogil=True, cache=True)
def convolve_2d(image, kernel):
    """Direct 2-D correlation with a small odd-sized kernel, zeros outside.

    Parameters
    ----------
    image : ndarray (ny, nx) float
    kernel : ndarray (ky, kx) float64, odd sizes

    Returns
    -------
    ndarray (ny, nx) float32
    """
    ny, nx = image.shape
    ky, kx = kernel.shape
    hy = ky // 2
    hx = kx // 2
    out = np.zeros((ny, nx), dtype=np.float32)
    for y in range(ny):
        for x in range(nx):
            s = 0.0
            for j in range(max(0, y - hy) - y, min(ny - 1, y + hy) - y + 1):
                for i in range(max(0, x - hx) - x, min(nx - 1, x + hx) - x + 1):
                    s += kernel[j + hy, i + hx] * image[y + j, x + i]
            out[y, x] = s
    return out


@numba.njit(nogil=True, cache=True)
def _clean_row(image, variance, bad, use_bad, y, prow, vrow, hx):
    """Row ``y`` of the planes :func:`_prepare` makes (bad and non-finite pixels 0), float32, into
    zero-padded buffers (``hx`` zeros each side)."""
    nx = image.shape[1]
    for x in range(nx):
        i = image[y, x]
        v = variance[y, x]
        if (use_bad and bad[y, x]) or not np.isfinite(i) or not np.isfinite(v):
            prow[x + hx] = 0.0
            vrow[x + hx] = 0.0
        else:
            prow[x + hx] = i
            vrow[x + hx] = v


@numba.njit(nogil=True, cache=True)
def _significance_rows(image, variance, bad, use_bad, g, g2):
    """``_ratio_sqrt(convolve_separable(img, g, g), convolve_separable(var, g2, g2))`` of the planes
    :func:`_prepare` makes, in one sweep: the same float32 sums in the same order, the x pass of
    each row computed once into a ring of ``2 h + 1`` rows, so that no whole-frame temporary is
    made (prepared planes, the two x-pass planes, numerator and denominator)."""
    ny, nx = image.shape
    h = g.size // 2
    n = 2 * h + 1
    k32 = g.astype(np.float32)
    k232 = g2.astype(np.float32)
    ring_i = np.empty((n, nx), dtype=np.float32)
    ring_v = np.empty((n, nx), dtype=np.float32)
    prow = np.zeros(nx + 2 * h, dtype=np.float32)
    vrow = np.zeros(nx + 2 * h, dtype=np.float32)
    acc_i = np.empty(nx, dtype=np.float32)
    acc_v = np.empty(nx, dtype=np.float32)
    out = np.zeros((ny, nx), dtype=np.float32)
    done = 0  # x-pass rows computed: 0 .. done - 1
    for y in range(ny):
        top = min(ny - 1, y + h)
        while done <= top:
            _clean_row(image, variance, bad, use_bad, done, prow, vrow, h)
            r = done % n
            acc_i[:] = 0.0
            for k in range(k32.size):
                w = k32[k]
                for x in range(nx):
                    acc_i[x] += w * prow[x + k]
            ring_i[r, :] = acc_i
            acc_v[:] = 0.0
            for k in range(k232.size):
                w = k232[k]
                for x in range(nx):
                    acc_v[x] += w * vrow[x + k]
            ring_v[r, :] = acc_v
            done += 1
        acc_i[:] = 0.0
        for k in range(max(0, y - h) - y, top - y + 1):
            w = k32[k + h]
            row = ring_i[(y + k) % n]
            for x in range(nx):
                acc_i[x] += w * row[x]
        acc_v[:] = 0.0
        for k in range(max(0, y - h) - y, top - y + 1):
            w = k232[k + h]
            row = ring_v[(y + k) % n]
            for x in range(nx):
                acc_v[x] += w * row[x]
        for x in range(nx):
            d = acc_v[x]
            if d > 0:
                out[y, x] = acc_i[x] / np.sqrt(d)
    return out


def _significance_gaussian(image, variance, bad, sigma):
    """:func:`significance_image` with a Gaussian of ``sigma`` and no extra variance, without
    whole-frame temporaries (:func:`_significance_rows`); the same float32 values."""
    image = np.asarray(image)
    variance = np.broadcast_to(np.asarray(variance, dtype=np.float32), image.shape)
    use_bad = bad is not None
    badm = np.asarray(bad, dtype=bool) if use_bad else np.zeros((1, 1), dtype=bool)
    g = gaussian_kernel_1d(float(sigma))
    return _significance_rows(image, variance, badm, use_bad, g, g * g)


def significance_image(image, variance, *, sigma=None, kernel=None, bad=None, extra_variance=None):
    """Matched-filter significance ``conv(I, g) / sqrt(conv(V, g^2) + E)``.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Background-subtracted image, counts.
    variance : ndarray (ny, nx) float or float
        Variance, counts^2 (an array or a constant).
    sigma : float, pixels, optional
        Gaussian (PSF) sigma; separable smoothing.
    kernel : ndarray (ky, kx), optional
        Any small kernel instead of the Gaussian (e.g. SExtractor's 3 x 3 pyramid).
    bad : ndarray (ny, nx) bool, optional
        Pixels set to zero signal and zero variance before smoothing (NO_DATA ...).
    extra_variance : ndarray (ny, nx), optional
        ``E``: variance of the filtered image not carried by the pixel variance (e.g. the
        registration noise of a difference image at static stars), in the filtered image's
        units squared.

    Returns
    -------
    ndarray (ny, nx) float32
        Significance, units of the smoothed noise (0 where the variance is 0).
    """
    img, var = _prepared_planes(image, variance, bad)
    return _significance_prepared(img, var, sigma, kernel, extra_variance)


def _prepared_planes(image, variance, bad):
    """float32 image and variance with the ``bad`` and non-finite pixels zeroed (the inputs of
    :func:`_significance_prepared`; one preparation serves several filters)."""
    image = np.asarray(image)
    variance = np.broadcast_to(np.asarray(variance, dtype=np.float32), image.shape)
    use_bad = bad is not None
    badm = np.asarray(bad, dtype=bool) if use_bad else np.zeros((1, 1), dtype=bool)
    return _prepare(image, variance, badm, use_bad)


def _significance_prepared(img, var, sigma, kernel, extra_variance):
    """:func:`significance_image` of planes from :func:`_prepared_planes`."""
    if kernel is not None:
        k = np.asarray(kernel, dtype=np.float64)
        num = convolve_2d(img, k)
        den = convolve_2d(var, k * k)
    elif sigma is not None:
        g = gaussian_kernel_1d(float(sigma))
        num = convolve_separable(img, g, g)
        den = convolve_separable(var, g * g, g * g)
    else:
        raise ValueError("give sigma (PSF sigma, pixels) or kernel (2-D array) for the detection filter")
    if extra_variance is not None:
        den = np.where(den > 0, den + np.asarray(extra_variance, dtype=den.dtype), den)
    return _ratio_sqrt(num, den)


# ----------------------------------------------------------------------------- labelling
@numba.njit(nogil=True, cache=True)
def _find(parent, i):
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@numba.njit(nogil=True, cache=True)
def _union(parent, a, b):
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra == rb:
        return
    if ra < rb:
        parent[rb] = ra
    else:
        parent[ra] = rb


@numba.njit(nogil=True, cache=True)
def label_components(mask):
    """Label 8-connected components of a boolean image (two-pass union-find).

    Labels are numbered 1..n in raster order of their first pixel, as
    ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))``.

    Parameters
    ----------
    mask : ndarray (ny, nx) bool

    Returns
    -------
    labels : ndarray (ny, nx) int32
        0 = background.
    n : int
        Number of components.
    """
    ny, nx = mask.shape
    labels = np.zeros((ny, nx), dtype=np.int32)
    parent = np.zeros(16, dtype=np.int32)
    nprov = 0
    for y in range(ny):
        for x in range(nx):
            if not mask[y, x]:
                continue
            # already-visited neighbours W, NW, N, NE; a decision tree (Wu, Otoo & Suzuki 2005):
            # N is joined to NW and NE when they were visited, and W to NW and N, so only the
            # pairs not yet joined are merged (the same components; labels are numbered below)
            best = 0
            n_ = labels[y - 1, x] if y > 0 else 0
            if n_ != 0:
                best = n_
            else:
                w_ = labels[y, x - 1] if x > 0 else 0
                ne = labels[y - 1, x + 1] if y > 0 and x + 1 < nx else 0
                if w_ != 0:
                    best = w_
                    if ne != 0 and ne != best:
                        _union(parent, best, ne)
                else:
                    nw = labels[y - 1, x - 1] if y > 0 and x > 0 else 0
                    if nw != 0:
                        best = nw
                        if ne != 0 and ne != best:
                            _union(parent, best, ne)
                    elif ne != 0:
                        best = ne
            if best == 0:
                nprov += 1
                if nprov >= parent.size:
                    newp = np.zeros(parent.size * 2, dtype=np.int32)
                    newp[: parent.size] = parent
                    parent = newp
                parent[nprov] = nprov
                best = nprov
            labels[y, x] = best
    # final sequential labels in raster order of first appearance
    final = np.zeros(nprov + 1, dtype=np.int32)
    n = 0
    for y in range(ny):
        for x in range(nx):
            lab = labels[y, x]
            if lab == 0:
                continue
            r = _find(parent, lab)
            if final[r] == 0:
                n += 1
                final[r] = n
            labels[y, x] = final[r]
    return labels, n


@numba.njit(nogil=True, cache=True)
def _dilate_rows(m, r, out):
    """``out[y, x] |= any(m[y, x - r : x + r + 1])`` (two running passes per row)."""
    ny, nx = m.shape
    for y in range(ny):
        last = -(10**9)
        for x in range(nx):
            if m[y, x]:
                last = x
            if x - last <= r:
                out[y, x] = True
        last = 10**9
        for x in range(nx - 1, -1, -1):
            if m[y, x]:
                last = x
            if last - x <= r:
                out[y, x] = True


@numba.njit(nogil=True, cache=True)
def _dilate_cols(m, r, out):
    """``out[y, x] |= any(m[y - r : y + r + 1, x])``: the running passes of :func:`_dilate_rows` down and
    up the columns, swept in row order (one last-seen row per column) so that memory is read contiguously."""
    ny, nx = m.shape
    last = np.full(nx, -(10**9), np.int64)
    for y in range(ny):
        for x in range(nx):
            if m[y, x]:
                last[x] = y
            if y - last[x] <= r:
                out[y, x] = True
    last[:] = 10**9
    for y in range(ny - 1, -1, -1):
        for x in range(nx):
            if m[y, x]:
                last[x] = y
            if last[x] - y <= r:
                out[y, x] = True


@numba.njit(nogil=True, cache=True)
def dilate_square(mask, r):
    """Dilate a boolean mask by a square of half-width ``r`` pixels (separable, O(pixels))."""
    ny, nx = mask.shape
    out = np.zeros((ny, nx), np.bool_)
    if r <= 0:
        out[:, :] = mask
        return out
    tmp = np.zeros((ny, nx), np.bool_)
    _dilate_rows(mask, r, tmp)
    _dilate_cols(tmp, r, out)
    return out


@numba.njit(nogil=True, cache=True)
def grow_mask(mask, radius):
    """Dilate a boolean mask by a disc of ``radius`` pixels.

    Only the boundary pixels of the mask stamp the disc, so the cost scales with the
    perimeter of the footprints, not their area.

    Parameters
    ----------
    mask : ndarray (ny, nx) bool
    radius : float, pixels

    Returns
    -------
    ndarray (ny, nx) bool
    """
    ny, nx = mask.shape
    out = mask.copy()
    r = int(np.floor(radius))
    if r <= 0:
        return out
    r2 = radius * radius
    # half-width of the disc's row at each offset dy: the largest dx with dy^2 + dx^2 <= r2
    half = np.full(2 * r + 1, -1, np.int64)
    for dy in range(-r, r + 1):
        for dx in range(r + 1):
            if dy * dy + dx * dx <= r2:
                half[dy + r] = dx
    for y in range(ny):
        for x in range(nx):
            if not mask[y, x]:
                continue
            edge = False
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy = y + dy
                    xx = x + dx
                    if yy < 0 or yy >= ny or xx < 0 or xx >= nx or not mask[yy, xx]:
                        edge = True
            if not edge:
                continue
            for yy in range(max(0, y - r), min(ny, y + r + 1)):
                w = half[yy - y + r]
                for xx in range(max(0, x - w), min(nx, x + w + 1)):
                    out[yy, xx] = True
    return out


@numba.njit(nogil=True, cache=True)
def _component_areas(labels, n):
    area = np.zeros(n + 1, dtype=np.int64)
    ny, nx = labels.shape
    for y in range(ny):
        for x in range(nx):
            area[labels[y, x]] += 1
    return area


@numba.njit(nogil=True, cache=True)
def footprint_bboxes(labels, n):
    """Bounding boxes of labels 1..n.

    Returns
    -------
    ndarray (n + 1, 4) int64
        Rows ``[y0, y1, x0, x1]`` (half-open); row 0 unused. Empty labels have y0 > y1.
    """
    ny, nx = labels.shape
    bb = np.empty((n + 1, 4), dtype=np.int64)
    bb[:, 0] = ny
    bb[:, 1] = 0
    bb[:, 2] = nx
    bb[:, 3] = 0
    for y in range(ny):
        for x in range(nx):
            lab = labels[y, x]
            if lab == 0:
                continue
            if y < bb[lab, 0]:
                bb[lab, 0] = y
            if y + 1 > bb[lab, 1]:
                bb[lab, 1] = y + 1
            if x < bb[lab, 2]:
                bb[lab, 2] = x
            if x + 1 > bb[lab, 3]:
                bb[lab, 3] = x + 1
    return bb


# ------------------------------------------------------------------ chunked labelling
@numba.njit(nogil=True, cache=True)
def face_pairs(face):
    """Pairs of labels that touch across a chunk face (8-connectivity).

    Parameters
    ----------
    face : ndarray (2, n) int
        Row 0: the last row (or column) of one chunk; row 1: the first row (column) of the
        neighbouring chunk, along the whole face, labels already globally unique.

    Returns
    -------
    ndarray (m, 2) int64
        Distinct touching pairs ``(a, b)`` with ``a`` from row 0.
    """
    n = face.shape[1]
    out = np.empty((3 * n, 2), dtype=np.int64)
    m = 0
    for i in range(n):
        a = face[0, i]
        if a == 0:
            continue
        for j in range(max(0, i - 1), min(n, i + 2)):
            b = face[1, j]
            if b == 0:
                continue
            if m > 0 and out[m - 1, 0] == a and out[m - 1, 1] == b:
                continue
            out[m, 0] = a
            out[m, 1] = b
            m += 1
    return out[:m]


@numba.njit(nogil=True, cache=True)
def merge_label_pairs(pairs, n_labels):
    """Union-find over touching label pairs; sequential new labels.

    Parameters
    ----------
    pairs : ndarray (m, 2) int
        Labels to join (from :func:`face_pairs` over all faces).
    n_labels : int
        Largest label in use.

    Returns
    -------
    mapping : ndarray (n_labels + 1,) int32
        New label of each old label (0 -> 0), numbered 1..k in order of the smallest old
        label of each group.
    k : int
        Number of merged labels.
    """
    parent = np.arange(n_labels + 1).astype(np.int32)
    for i in range(pairs.shape[0]):
        _union(parent, pairs[i, 0], pairs[i, 1])
    mapping = np.zeros(n_labels + 1, dtype=np.int32)
    k = 0
    for lab in range(1, n_labels + 1):
        r = _find(parent, lab)
        if mapping[r] == 0:
            k += 1
            mapping[r] = k
        mapping[lab] = mapping[r]
    return mapping, k


@numba.njit(nogil=True, cache=True)
def relabel(labels, mapping):
    """Apply a label mapping (``mapping[labels]``) without a temporary int64 array."""
    ny, nx = labels.shape
    out = np.empty((ny, nx), dtype=np.int32)
    for y in range(ny):
        for x in range(nx):
            out[y, x] = mapping[labels[y, x]]
    return out


def label_chunked(mask, chunks):
    """Label a boolean image chunk by chunk, then merge labels across chunk faces.

    This is the reference chain a dask graph follows (label each block with
    :func:`label_components`, offset the labels by the running total, collect
    :func:`face_pairs` along every internal face, :func:`merge_label_pairs`, :func:`relabel`).
    The labels equal those of a whole-image labelling up to a permutation.

    Parameters
    ----------
    mask : ndarray (ny, nx) bool
    chunks : (int, int)
        Chunk shape (cy, cx), pixels.

    Returns
    -------
    labels : ndarray (ny, nx) int32
    n : int
    """
    mask = np.asarray(mask, dtype=bool)
    ny, nx = mask.shape
    cy, cx = int(chunks[0]), int(chunks[1])
    labels = np.zeros((ny, nx), dtype=np.int32)
    total = 0
    for y0 in range(0, ny, cy):
        for x0 in range(0, nx, cx):
            lab, n = label_components(mask[y0 : y0 + cy, x0 : x0 + cx])
            lab[lab > 0] += total
            labels[y0 : y0 + cy, x0 : x0 + cx] = lab
            total += n
    pairs = [np.empty((0, 2), dtype=np.int64)]
    for y in range(cy, ny, cy):
        pairs.append(face_pairs(np.ascontiguousarray(labels[y - 1 : y + 1, :])))
    for x in range(cx, nx, cx):
        pairs.append(face_pairs(np.ascontiguousarray(labels[:, x - 1 : x + 1].T)))
    mapping, k = merge_label_pairs(np.concatenate(pairs), total)
    return relabel(labels, mapping), int(k)


# ----------------------------------------------------------------------------- deblending
@numba.njit(nogil=True, cache=True)
def _normal_isf(p):
    """z with P(Z > z) = p for a unit normal (bisection on erfc; 0 < p < 0.5)."""
    lo = 0.0
    hi = 40.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(mid / math.sqrt(2.0)) > p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@numba.njit(nogil=True, cache=True)
def deblend_footprints(
    nu, labels, n, contrast, min_contrast_frac, max_children, false_peak_rate=0.0, coherence_area=1.0
):
    """Split footprints into children by persistence-limited watershed flooding of ``nu``.

    Parameters
    ----------
    nu : ndarray (ny, nx) float32
        Significance (smoothed) image.
    labels : ndarray (ny, nx) int32
        Footprint labels 1..n.
    n : int
        Number of footprints.
    contrast : float, sigma
        A basin survives a merge only if its peak exceeds the saddle by this much ...
    min_contrast_frac : float
        ... and by this fraction of the higher basin's peak (0 disables).
    max_children : int
        At most this many children per footprint (the highest-peak ones survive); 0 or
        less: no limit.
    false_peak_rate : float
        Look-elsewhere correction (0 disables): a footprint of ``A`` pixels holds about
        ``A / coherence_area`` independent noise elements, each of which may rise above a
        saddle; the contrast is raised to ``sqrt(2) z`` with ``P(Z > z) = false_peak_rate *
        coherence_area / A`` (the difference of two unit-noise values has sigma sqrt(2)),
        so a large footprint - a satellite trail, a bright galaxy - is not shredded into
        its noise bumps more often than a small one.
    coherence_area : float, pixels
        Area per independent noise element of ``nu``.

    Returns
    -------
    children : ndarray (ny, nx) int32
        Child id (1..m) of every footprint pixel, 0 outside footprints.
    peaks : ndarray (m, 5) float64
        Per child: ``[x_peak, y_peak, nu_peak, parent_label, n_children_of_parent]``.
    """
    ny, nx = nu.shape
    bb = footprint_bboxes(labels, n)
    children = np.zeros((ny, nx), dtype=np.int32)
    cap = max(16, n * 2)
    peaks = np.zeros((cap, 5))
    m = 0
    for lab in range(1, n + 1):
        y0 = bb[lab, 0]
        y1 = bb[lab, 1]
        x0 = bb[lab, 2]
        x1 = bb[lab, 3]
        if y0 >= y1:
            continue
        h = y1 - y0
        w = x1 - x0
        # pixels of this footprint, sorted by decreasing nu
        npx = 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                if labels[y, x] == lab:
                    npx += 1
        vals = np.empty(npx)
        idx = np.empty(npx, dtype=np.int64)
        k = 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                if labels[y, x] == lab:
                    vals[k] = -nu[y, x]
                    idx[k] = (y - y0) * w + (x - x0)
                    k += 1
        order = np.argsort(vals, kind="mergesort")
        cfoot = contrast
        if false_peak_rate > 0.0:
            pk = false_peak_rate * coherence_area / npx
            if pk < 0.5:
                cfoot = max(contrast, math.sqrt(2.0) * _normal_isf(pk))
        basin = np.full(h * w, -1, dtype=np.int64)
        parent = np.empty(npx, dtype=np.int64)
        peakv = np.empty(npx)
        peakpos = np.empty(npx, dtype=np.int64)
        alive = np.zeros(npx, dtype=np.bool_)  # basin kept as a separate child
        nb = 0
        roots = np.empty(8, dtype=np.int64)
        for t in range(npx):
            p = idx[order[t]]
            v = -vals[order[t]]
            py = p // w
            px = p % w
            nr = 0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dy == 0 and dx == 0:
                        continue
                    yy = py + dy
                    xx = px + dx
                    if yy < 0 or yy >= h or xx < 0 or xx >= w:
                        continue
                    b = basin[yy * w + xx]
                    if b < 0:
                        continue
                    r = b
                    while parent[r] != r:
                        r = parent[r]
                    dup = False
                    for q in range(nr):
                        if roots[q] == r:
                            dup = True
                    if not dup:
                        roots[nr] = r
                        nr += 1
            if nr == 0:
                parent[nb] = nb
                peakv[nb] = v
                peakpos[nb] = p
                alive[nb] = True
                basin[p] = nb
                nb += 1
                continue
            # winner: highest peak among touching basins
            win = roots[0]
            for q in range(1, nr):
                if peakv[roots[q]] > peakv[win]:
                    win = roots[q]
            for q in range(nr):
                r = roots[q]
                if r == win:
                    continue
                rise = peakv[r] - v
                if rise < cfoot or rise < min_contrast_frac * peakv[win]:
                    parent[r] = win
                    alive[r] = False
            basin[p] = win
        # surviving basins = those still their own root
        nkeep = 0
        for b in range(nb):
            if parent[b] == b:
                nkeep += 1
        # cap the number of children: merge the lowest peaks into their nearest kept peak
        keep_ids = np.empty(nkeep, dtype=np.int64)
        q = 0
        for b in range(nb):
            if parent[b] == b:
                keep_ids[q] = b
                q += 1
        if max_children > 0 and nkeep > max_children:
            ordk = np.argsort(-peakv[keep_ids])
            top = keep_ids[ordk[:max_children]]
            for qq in range(max_children, nkeep):
                b = keep_ids[ordk[qq]]
                by = peakpos[b] // w
                bx = peakpos[b] % w
                best = top[0]
                bd = 1e300
                for tt in range(max_children):
                    c = top[tt]
                    d = (peakpos[c] // w - by) ** 2 + (peakpos[c] % w - bx) ** 2
                    if d < bd:
                        bd = d
                        best = c
                parent[b] = best
            keep_ids = top
            nkeep = max_children
        childid = np.zeros(nb, dtype=np.int64)
        if m + nkeep > peaks.shape[0]:
            newp = np.zeros((2 * (m + nkeep), 5))
            newp[:m] = peaks[:m]
            peaks = newp
        for q in range(nkeep):
            b = keep_ids[q]
            m += 1
            childid[b] = m
            peaks[m - 1, 0] = x0 + peakpos[b] % w
            peaks[m - 1, 1] = y0 + peakpos[b] // w
            peaks[m - 1, 2] = peakv[b]
            peaks[m - 1, 3] = lab
            peaks[m - 1, 4] = nkeep
        for y in range(y0, y1):
            for x in range(x0, x1):
                if labels[y, x] != lab:
                    continue
                b = basin[(y - y0) * w + (x - x0)]
                while parent[b] != b:
                    b = parent[b]
                children[y, x] = childid[b]
    return children, peaks[:m]


@numba.njit(nogil=True, cache=True)
def _footprint_peaks(nu, labels, n):
    """Highest pixel of every footprint, in the layout of :func:`deblend_footprints`."""
    ny, nx = nu.shape
    peaks = np.zeros((n, 5))
    best = np.full(n + 1, -np.inf)
    for y in range(ny):
        for x in range(nx):
            lab = labels[y, x]
            if lab > 0 and nu[y, x] > best[lab]:
                best[lab] = nu[y, x]
                peaks[lab - 1, 0] = x
                peaks[lab - 1, 1] = y
                peaks[lab - 1, 2] = nu[y, x]
                peaks[lab - 1, 3] = lab
                peaks[lab - 1, 4] = 1
    return peaks


@numba.njit(nogil=True, cache=True)
def merge_saturated_children(children, peaks, sat_labels, sat, in_place=False):
    """One child per saturated star: merge the children of a footprint whose peaks fall in
    the same saturated region.

    The flat, clipped core of a saturated star (and its bleed trail) has no single maximum:
    the watershed finds peaks at the ends of the plateau and splits the star. LSST's
    detection merges the peaks of a saturated footprint in the same way. The surviving
    child (the highest peak) moves to the mean position of the region's saturated pixels.

    Parameters
    ----------
    children : ndarray (ny, nx) int32
        Child map of :func:`deblend_footprints` (not modified: a copy is returned, unless
        ``in_place``).
    peaks : ndarray (m, 5) float64
        Peaks of :func:`deblend_footprints`.
    sat_labels : ndarray (ny, nx) int32
        Labels of the (slightly grown) saturated regions, 0 elsewhere.
    sat : ndarray (ny, nx) bool
        Saturated pixels (for the merged position).
    in_place : bool
        Renumber ``children`` itself and return it (a whole-frame int32 plane less).

    Returns
    -------
    children : ndarray (ny, nx) int32
    peaks : ndarray (m', 5) float64
        Renumbered 1..m' in the order of the input, column 4 (children of the parent)
        recomputed.
    """
    m = peaks.shape[0]
    ny, nx = children.shape
    nsat = 0
    for y in range(ny):
        for x in range(nx):
            if sat_labels[y, x] > nsat:
                nsat = sat_labels[y, x]
    if m == 0 or nsat == 0:
        return (children if in_place else children.copy()), peaks.copy()
    # representative child of each (saturated region); children of other parents stay apart
    rep_of = np.zeros(m, dtype=np.int64)
    owner = np.full(nsat + 1, -1, dtype=np.int64)
    merged_any = False
    for k in range(m):
        rep_of[k] = k
        px = int(peaks[k, 0])
        py = int(peaks[k, 1])
        s = sat_labels[py, px]
        if s == 0:
            continue
        o = owner[s]
        if o < 0:
            owner[s] = k
        elif peaks[o, 3] == peaks[k, 3]:
            if peaks[k, 2] > peaks[o, 2]:
                rep_of[o] = k
                owner[s] = k
            else:
                rep_of[k] = o
            merged_any = True
    if not merged_any:
        return (children if in_place else children.copy()), peaks.copy()
    for k in range(m):  # resolve chains
        r = k
        while rep_of[r] != r:
            r = rep_of[r]
        rep_of[k] = r
    newid = np.zeros(m, dtype=np.int64)
    m2 = 0
    for k in range(m):
        if rep_of[k] == k:
            m2 += 1
            newid[k] = m2
    out = np.empty((m2, 5))
    for k in range(m):
        if rep_of[k] == k:
            out[newid[k] - 1, :] = peaks[k, :]
    # merged representatives: position = mean of the saturated pixels of their region
    sx = np.zeros(nsat + 1)
    sy = np.zeros(nsat + 1)
    sn = np.zeros(nsat + 1)
    for y in range(ny):
        for x in range(nx):
            if sat[y, x] and sat_labels[y, x] > 0:
                s = sat_labels[y, x]
                sx[s] += x
                sy[s] += y
                sn[s] += 1.0
    for k in range(m):
        if rep_of[k] != k:
            r = rep_of[k]
            s = sat_labels[int(peaks[r, 1]), int(peaks[r, 0])]
            if s > 0 and sn[s] > 0:
                out[newid[r] - 1, 0] = np.floor(sx[s] / sn[s] + 0.5)
                out[newid[r] - 1, 1] = np.floor(sy[s] / sn[s] + 0.5)
    # each pixel is read before it is written: renumbering in place gives the same plane
    ch = children if in_place else np.empty((ny, nx), dtype=np.int32)
    for y in range(ny):
        for x in range(nx):
            c = children[y, x]
            ch[y, x] = 0 if c == 0 else newid[rep_of[c - 1]]
    # children per parent
    maxp = 0
    for k in range(m2):
        if int(out[k, 3]) > maxp:
            maxp = int(out[k, 3])
    cnt = np.zeros(maxp + 1)
    for k in range(m2):
        cnt[int(out[k, 3])] += 1.0
    for k in range(m2):
        out[k, 4] = cnt[int(out[k, 3])]
    return ch, out


# ----------------------------------------------------------------------------- driver
class DetectionResult(NamedTuple):
    """Output of :func:`detect_sources`.

    Attributes
    ----------
    footprints : ndarray (ny, nx) int32
        Grown footprint label of every pixel (0 = none), 1..n_footprints.
    children : ndarray (ny, nx) int32
        Deblended child id of every pixel (0 = none), 1..n_sources (one child per
        footprint when deblending is off).
    x, y : ndarray (n_sources,) float64, pixels
        Peak position of each child (integer pixel of the significance maximum).
    peak_significance : ndarray (n_sources,) float64, sigma
    parent : ndarray (n_sources,) int32
        Footprint label of each child.
    blended : ndarray (n_sources,) bool
        The footprint holds more than one child.
    significance : ndarray (ny, nx) float32
    detected : ndarray (ny, nx) bool
        Grown detection mask (for the DETECTED plane and the next background pass).
    n_footprints : int
    threshold : float
        Threshold applied to ``significance``.
    nu_offset, nu_scale : float
        Median and standard deviation of ``significance`` away from sources that set it
        (``threshold="empirical"``; 0 and 1 otherwise).
    """

    footprints: np.ndarray
    children: np.ndarray
    x: np.ndarray
    y: np.ndarray
    peak_significance: np.ndarray
    parent: np.ndarray
    blended: np.ndarray
    significance: np.ndarray
    detected: np.ndarray
    n_footprints: int
    threshold: float = float("nan")
    nu_offset: float = 0.0
    nu_scale: float = 1.0


@numba.njit(nogil=True, cache=True)
def _any_bits_kernel(mask, bits, out):
    ny, nx = mask.shape
    for y in range(ny):
        for x in range(nx):
            out[y, x] = (mask[y, x] & bits) != 0


def any_bits(mask, bits: int) -> np.ndarray:
    """``(mask & bits) != 0`` (bool plane) without the whole-frame integer temporary of the numpy
    expression (a uint32 mask, four times the bool plane)."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.uint32:
        return (m & np.uint32(bits)) != 0
    out = np.empty(m.shape, dtype=np.bool_)
    _any_bits_kernel(m, np.uint32(bits), out)
    return out


def detect_sources(
    image,
    variance,
    mask=None,
    *,
    psf_sigma=None,
    kernel=None,
    nsigma=5.0,
    polarity=1,
    min_area=1,
    grow=None,
    deblend=True,
    deblend_contrast=4.0,
    deblend_min_contrast_frac=0.0,
    max_children=0,
    deblend_sigma_factor=0.5,
    deblend_false_peak_rate=0.03,
    bad_bits=bit(NO_DATA) | bit(BAD),
    saturated_bits=bit(SAT),
    saturated_grow=2.0,
    threshold="variance",
    extra_variance=None,
    timer=None,
    keep_significance=True,
    keep_footprints=True,
):
    """Detect sources on a background-subtracted image.

    Parameters
    ----------
    image : ndarray (ny, nx) float
        Background-subtracted image, counts.
    variance : ndarray (ny, nx) float or float
        Variance, counts^2.
    mask : ndarray (ny, nx) uint32, optional
        Pixels with ``bad_bits`` carry no signal (NO_DATA, BAD by default; SAT pixels are
        kept so saturated stars are detected).
    psf_sigma : float, pixels
        Gaussian sigma of the PSF for the matched filter (or give ``kernel``).
    kernel : ndarray, optional
        Detection filter instead of the Gaussian.
    nsigma : float
        Threshold in units of the smoothed noise.
    polarity : {1, -1}
        1 detects positive sources, -1 negative ones (difference images).
    min_area : int, pixels
        Minimum number of pixels above threshold.
    grow : float, pixels, optional
        Footprint growth radius (default ``2.4 psf_sigma``, LSST's ``nSigmaToGrow``; 0 with
        only ``kernel``).
    deblend : bool
        Split footprints into children at significant peaks.
    deblend_contrast : float, sigma
        Minimum rise of a child's peak above the saddle to its brighter neighbour.
    deblend_min_contrast_frac : float
        Minimum rise as a fraction of the brighter peak (SExtractor-like DEBLEND_MINCONT).
    max_children : int
        Maximum children per footprint (0 = no limit, as LSST's ``maxNumberOfPeaks = 0``).
    deblend_sigma_factor : float
        The watershed runs on the significance image smoothed with ``deblend_sigma_factor
        * psf_sigma`` (< 1 resolves companions that the full matched filter turns into
        shoulders of a bright neighbour, at the price of more noise peaks).
    deblend_false_peak_rate : float
        Look-elsewhere correction of ``deblend_contrast`` (see :func:`deblend_footprints`),
        with the coherence area ``4 pi s^2`` of the deblending image smoothed by ``s``;
        0.03 leaves the contrast of a faint star's ~100-pixel footprint at ~4 sigma and
        raises it to ~6 sigma along a satellite trail crossing the detector. 0 disables.
    bad_bits : int
        Mask bits of pixels without signal.
    saturated_bits : int
        Mask bits of saturated pixels: the children of one footprint whose peaks lie in the
        same saturated region (grown by ``saturated_grow`` pixels) are merged into one
        (:func:`merge_saturated_children`); 0 disables.
    saturated_grow : float, pixels
    threshold : {"variance", "empirical"}
        ``"variance"``: ``nu > nsigma`` with ``nu`` in units of the noise the variance plane
        predicts. ``"empirical"``: ``nu > median + nsigma * std``, the median and (MAD) standard
        deviation of ``nu`` away from sources (pixels beyond the grown footprints of a first
        ``nu > nsigma`` pass), as LSST's ``thresholdType="pixel_stdev"`` with a temporary local
        background: the light of sources below the threshold raises and widens the
        distribution of ``nu``, and a threshold that ignores it lets several
        noise-and-confusion bumps per detector through.
    extra_variance : ndarray (ny, nx), optional
        Variance of the filtered image beyond the pixel variance (see
        :func:`significance_image`); used by the detection threshold, not by deblending.
    keep_significance : bool
        Return the significance image; False returns an empty (0 x 0) array in its place and
        frees the plane once thresholded (a whole-frame float32 less at the peak).
    keep_footprints : bool
        Return the footprint labels; False returns an empty (0 x 0) array in their place, freed
        once deblended (every footprint pixel belongs to one child: ``peaks`` give each child's
        parent). Only with ``deblend``.
    timer : callable, optional
        ``timer(name)`` returns a context manager timing a phase: the deblending runs inside
        ``timer("deblending")`` (a profile of the caller's steps).

    Returns
    -------
    DetectionResult
        With ``threshold`` in ``nu`` units, and ``nu_offset`` / ``nu_scale`` (0 / 1 with
        ``threshold="variance"``).
    """
    if polarity not in (1, -1):
        raise ValueError(f"polarity must be 1 or -1, got {polarity!r}")
    img = np.asarray(image, dtype=np.float32)
    bad = None
    if mask is not None and bad_bits:
        bad = any_bits(mask, bad_bits)
    signed = img if polarity == 1 else -img
    if kernel is None and psf_sigma is not None and extra_variance is None:
        # the Gaussian filter in one sweep, without whole-frame temporaries (same values)
        img_p = var_p = None
        nu = _significance_gaussian(signed, variance, bad, psf_sigma)
    else:
        img_p, var_p = _prepared_planes(signed, variance, bad)
        nu = _significance_prepared(img_p, var_p, psf_sigma, kernel, extra_variance)
    if grow is None:
        grow = 2.4 * psf_sigma if psf_sigma is not None else 0.0
    if threshold not in ("variance", "empirical"):
        raise ValueError(f"threshold must be 'variance' or 'empirical', got {threshold!r}")
    nu_offset, nu_scale = 0.0, 1.0
    if threshold == "empirical":
        nu_offset, nu_scale = _empirical_nu_stats(nu, bad, nsigma, float(grow))
    thr = nu_offset + nsigma * nu_scale
    above = nu > thr
    own_db_sigma = psf_sigma is not None and kernel is None and deblend_sigma_factor != 1.0
    if not keep_significance and deblend and own_db_sigma:
        # deblending works on its own significance image: this one is not needed any more
        nu = np.zeros((0, 0), np.float32)
    if min_area > 1:
        labels, n = label_components(above)
        if n > 0:
            area = _component_areas(labels, n)
            keep = area >= min_area
            keep[0] = False
            above = keep[labels]
        del labels
    detected = grow_mask(above, float(grow)) if grow > 0 else above
    del above  # a whole-frame plane not needed any more
    footprints, nfp = label_components(detected)
    if deblend:
        with contextlib.nullcontext() if timer is None else timer("deblending"):
            nu_db = nu
            s_db = psf_sigma if psf_sigma is not None else 1.0
            if psf_sigma is not None and kernel is None and deblend_sigma_factor != 1.0:
                s_db = max(0.3, deblend_sigma_factor * psf_sigma)
                if img_p is None:
                    nu_db = _significance_gaussian(signed, variance, bad, s_db)
                else:
                    nu_db = _significance_prepared(img_p, var_p, s_db, None, None)
            children, peaks = deblend_footprints(
                nu_db,
                footprints,
                nfp,
                float(deblend_contrast),
                float(deblend_min_contrast_frac),
                int(max_children),
                float(deblend_false_peak_rate),
                float(max(1.0, 4.0 * np.pi * s_db * s_db)),
            )
            del nu_db
            if not keep_footprints:
                footprints = np.zeros((0, 0), np.int32)
            if mask is not None and saturated_bits:
                sat = any_bits(mask, saturated_bits)
                if sat.any():
                    sat_labels, _ = label_components(grow_mask(sat, float(saturated_grow)))
                    children, peaks = merge_saturated_children(children, peaks, sat_labels, sat, True)
    else:
        children = footprints
        peaks = _footprint_peaks(nu, footprints, nfp)
    return DetectionResult(
        footprints=footprints,
        children=children,
        x=peaks[:, 0].copy(),
        y=peaks[:, 1].copy(),
        peak_significance=peaks[:, 2].copy(),
        parent=peaks[:, 3].astype(np.int32),
        blended=peaks[:, 4] > 1,
        significance=nu if keep_significance else np.zeros((0, 0), np.float32),
        detected=detected,
        n_footprints=int(nfp),
        threshold=float(thr),
        nu_offset=float(nu_offset),
        nu_scale=float(nu_scale),
    )


def _empirical_nu_stats(nu, bad, nsigma, grow, step=3, min_pixels=1000):
    """Median and 1.4826 MAD of the significance image away from sources (every ``step``-th
    pixel in each axis, beyond the grown ``nu > nsigma`` footprints). Falls back to (0, 1)
    when fewer than ``min_pixels`` such pixels remain (a crowded or tiny image)."""
    src = nu > nsigma
    if grow > 0:
        src = grow_mask(src, grow)
    # only every step-th pixel is sampled: the tests on that grid alone (the same pixels, in order)
    sub = nu[::step, ::step]
    free = ~src[::step, ::step] & np.isfinite(sub)
    if bad is not None:
        free &= ~bad[::step, ::step]
    v = sub[free]
    if v.size < min_pixels:
        return 0.0, 1.0
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    if not (np.isfinite(mad) and mad > 0):
        return 0.0, 1.0
    return med, mad
