"""Whole-image computations shared by the planes, PSF and metadata of a lazy exposure.

A difference image's kernel fit and noise measurements need whole-image pixels, and their
results shape the PSF and metadata as well as the planes. :func:`deferred` makes such a
computation one task of a dask graph whose inputs are the pixel planes of the exposures it
reads (so the graph runs on any scheduler: threads, processes, a ``distributed`` cluster);
:func:`deferred_exposure` turns its result into a lazy :class:`~procsky.exposure.Exposure`
whose planes, PSF (:class:`LazyPsf`) and metadata values are parts of that one task.
:meth:`Exposure.compute` and :meth:`Exposure.write` compute the planes, the PSF and the
delayed metadata in one call, so the computation runs once; a part computed on its own
(the kernel, the summary) runs it again, as any dask collection computed separately does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from procsky import _dask
from procsky.errors import ProcskyValueError
from procsky.psf import PsfModel

__all__ = ["LazyPsf", "deferred", "deferred_exposure", "deferred_part"]

_EXPOSURE = "__procsky_exposure__"


def _pack(obj: Any) -> Any:
    """Exposures in ``obj`` (also inside lists and tuples) as tuples that dask traverses:
    their planes become dependencies of the task, computed (to numpy) before it runs."""
    from procsky.exposure import Exposure

    if isinstance(obj, Exposure):
        attrs = {
            "wcs": obj.wcs,
            "psf": obj.psf,
            "photocalib": obj.photocalib,
            "visit_info": obj.visit_info,
            "detector": obj.detector,
            "metadata": obj.metadata,
            "mask_planes": obj.mask_planes,
            "xy0": obj.xy0,
            "wcs_cards": obj.wcs_cards,
        }
        return (_EXPOSURE, attrs, obj.image, obj.variance, obj.mask, dict(obj.extra_planes))
    if isinstance(obj, list):
        return [_pack(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_pack(o) for o in obj)
    return obj


def _unpack(obj: Any) -> Any:
    from procsky.exposure import Exposure

    if isinstance(obj, tuple) and len(obj) == 6 and isinstance(obj[0], str) and obj[0] == _EXPOSURE:
        _, attrs, image, variance, mask, extra = obj
        return Exposure(image, variance, mask, extra_planes=extra, **attrs)
    if isinstance(obj, list):
        return [_unpack(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_unpack(o) for o in obj)
    return obj


def _call(func: Callable, *packed: Any) -> Any:
    return func(*[_unpack(p) for p in packed])


def deferred(func: Callable, *args: Any, name: str | None = None):
    """``func(*args)`` as one :class:`dask.delayed.Delayed` task; the pixel planes of the
    Exposures among ``args`` are its dependencies (read or computed by the graph, in
    parallel, before ``func`` runs on numpy planes). Builds without computing anything."""
    import dask

    key = f"{name or getattr(func, '__name__', 'deferred').strip('_')}-{uuid.uuid4().hex}"
    return dask.delayed(_call, pure=False)(func, *[_pack(a) for a in args], dask_key_name=key)


def _apply(result: Any, part: Callable[[Any], Any]) -> Any:
    return part(result)


def deferred_part(result, part: Callable[[Any], Any], what: str):
    """A :class:`dask.delayed.Delayed` of ``part(result)`` (``result`` from :func:`deferred`)."""
    import dask

    return dask.delayed(_apply, pure=False)(result, part, dask_key_name=f"{what}-{result.key}")


class LazyPsf(PsfModel):
    """The PSF of a lazy exposure: a delayed PSF model, computed on first use.

    :meth:`Exposure.compute` and :meth:`Exposure.write` compute :attr:`lazy_value` with the
    planes and keep the result here, so asking for the PSF afterwards computes nothing.
    """

    def __init__(self, lazy_value) -> None:
        self.lazy_value = lazy_value
        self._psf: PsfModel | None = None

    def set_value(self, psf: PsfModel | None) -> None:
        """Keep the computed model (done by :meth:`Exposure.compute` / :meth:`Exposure.write`)."""
        if psf is None:
            raise ProcskyValueError("the lazy exposure has no PSF")
        self._psf = psf

    def resolve(self) -> PsfModel:
        """The PSF model itself (computes :attr:`lazy_value` the first time)."""
        if self._psf is None:
            self.set_value(_dask.evaluate(self.lazy_value)[0])
        assert self._psf is not None
        return self._psf

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.resolve().size

    def kernel(self, x: float, y: float) -> np.ndarray:
        return self.resolve().kernel(x, y)

    def render(
        self, x: float, y: float, *, size: int | None = None, offset: tuple[float, float] = (0.0, 0.0)
    ) -> np.ndarray:
        return self.resolve().render(x, y, size=size, offset=offset)

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        return self.resolve().moments(x, y)

    def fwhm(self, x: float, y: float) -> float:
        return self.resolve().fwhm(x, y)

    def moment_fwhm(self, x: float, y: float) -> float:
        return self.resolve().moment_fwhm(x, y)

    def to_dict(self) -> dict:
        return self.resolve().to_dict()


def deferred_exposure(result, like, *, part: Callable[[Any], Any], metadata_keys=("diffim",), chunk: int | None = None):
    """A lazy :class:`~procsky.exposure.Exposure` whose planes, PSF and ``metadata_keys``
    are those of the exposure ``part(r)``, ``r`` the value of ``result`` (a
    :func:`deferred` task); everything else is ``like``'s.

    The planes are dask arrays in chunks of ``chunk`` pixels (default: the storage chunk of
    :meth:`Exposure.write`), the PSF a :class:`LazyPsf`, the metadata values
    :class:`dask.delayed.Delayed` objects; all are parts of the one task ``result``.
    """
    from procsky.exposure import DEFAULT_CHUNK

    ny, nx = like.shape
    planes = deferred_part(result, lambda r: _planes_of(part(r)), "planes")
    image, variance, mask = _dask.from_chunk_tasks(
        [[planes]], [[(ny, nx)]], [np.float32, np.float32, np.uint32], ["diff-image", "diff-variance", "diff-mask"]
    )
    c = int(chunk or DEFAULT_CHUNK)
    meta = dict(like.metadata)

    def metadata_part(k: str) -> Callable[[Any], Any]:
        return lambda r: part(r).metadata[k]

    for k in metadata_keys:
        meta[k] = deferred_part(result, metadata_part(k), f"metadata-{k}")
    return like._replace(
        image=image.rechunk(c),
        variance=variance.rechunk(c),
        mask=mask.rechunk(c),
        psf=LazyPsf(deferred_part(result, lambda r: part(r).psf, "psf")),
        metadata=meta,
    )


def _computed(exp):
    """``exp.compute()``: numpy planes, metadata values and a resolved PSF (the dipole fit
    takes a fast path for the PSF classes it knows)."""
    return exp.compute()


def _planes_of(exp) -> tuple:
    return (
        np.asarray(exp.image, dtype=np.float32),
        np.asarray(exp.variance, dtype=np.float32),
        np.asarray(exp.mask, dtype=np.uint32),
    )
