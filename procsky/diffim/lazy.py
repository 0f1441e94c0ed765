"""Deferred whole-image computations shared by the planes, PSF and metadata of a lazy exposure.

A difference image's kernel fit and noise measurements need whole-image pixels, and their
results shape the PSF and metadata as well as the planes: :class:`Deferred` runs such a
computation once, for whichever of them is computed first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from procsky import _dask
from procsky.errors import ProcskyValueError
from procsky.psf import PsfModel

__all__ = ["Deferred", "DeferredPsf", "deferred_exposure"]


class Deferred:
    """A whole-image computation run at most once, by the first graph task or attribute
    that needs its result.

    The kernel fit needs the pixels of the star stamps and of the whole image (noise
    correlation, variance rescaling, registration noise), and its results shape the
    difference's PSF and summary as well as its planes. Wrapping it here lets a difference
    be built without computing anything, and computed once whichever of planes, PSF or
    metadata is asked for first (the planes and the metadata when the difference is
    written). Thread-safe; a failure is kept and raised again to every caller.
    """

    def __init__(self, func: Callable, *args: Any) -> None:
        import threading
        import uuid

        self._func: Callable | None = func
        self._args: tuple = args
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self.name = f"{getattr(func, '__name__', 'deferred').strip('_')}-{uuid.uuid4().hex}"

    @property
    def done(self) -> bool:
        """True once the computation ran (successfully or not)."""
        return self._done

    def get(self) -> Any:
        """The result, computed on the first call."""
        with self._lock:
            if not self._done:
                assert self._func is not None, "the function is dropped only once the computation is done"
                try:
                    self._value = self._func(*self._args)
                except BaseException as e:  # kept for every later caller
                    self._error = e
                self._done = True
                self._func, self._args = None, ()
        if self._error is not None:
            raise self._error
        return self._value

    def delayed(self, part: Callable[[Any], Any], what: str):
        """A :class:`dask.delayed.Delayed` of ``part(result)``."""
        import dask

        return dask.delayed(_deferred_part, pure=False)(self, part, dask_key_name=f"{what}-{self.name}")


def _deferred_part(deferred: Deferred, part: Callable[[Any], Any]) -> Any:
    return part(deferred.get())


class DeferredPsf(PsfModel):
    """The PSF of a deferred difference image: resolved (the difference computed) on first use."""

    def __init__(self, deferred: Deferred, part: Callable[[Any], PsfModel]) -> None:
        self._deferred = deferred
        self._part = part

    def resolve(self) -> PsfModel:
        """The PSF model itself."""
        psf = self._part(self._deferred.get())
        if psf is None:
            raise ProcskyValueError("the deferred difference image has no PSF")
        return psf

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

    def to_dict(self) -> dict:
        return self.resolve().to_dict()


def deferred_exposure(
    deferred: Deferred, like, *, part: Callable[[Any], Any], metadata_keys=("diffim",), chunk: int | None = None
):
    """A lazy :class:`~procsky.exposure.Exposure` whose planes, PSF and ``metadata_keys``
    are those of the exposure ``part(deferred.get())``; everything else is ``like``'s.

    The planes are dask arrays in chunks of ``chunk`` pixels (default: the storage chunk of
    :meth:`Exposure.write`), the metadata values :class:`dask.delayed.Delayed` objects;
    they share the one deferred computation.
    """
    from procsky.exposure import DEFAULT_CHUNK

    ny, nx = like.shape
    planes = deferred.delayed(lambda r: _planes_of(part(r)), "planes")
    image, variance, mask = _dask.from_chunk_tasks(
        [[planes]], [[(ny, nx)]], [np.float32, np.float32, np.uint32], ["diff-image", "diff-variance", "diff-mask"]
    )
    c = int(chunk or DEFAULT_CHUNK)
    meta = dict(like.metadata)

    def metadata_part(k: str) -> Callable[[Any], Any]:
        return lambda r: part(r).metadata[k]

    for k in metadata_keys:
        meta[k] = deferred.delayed(metadata_part(k), f"metadata-{k}")
    return like._replace(
        image=image.rechunk(c),
        variance=variance.rechunk(c),
        mask=mask.rechunk(c),
        psf=DeferredPsf(deferred, lambda r: part(r).psf),
        metadata=meta,
    )


def _computed(exp):
    """``exp.compute()`` with a deferred PSF resolved (the dipole fit takes a fast path for
    the PSF classes it knows)."""
    out = exp.compute()
    if isinstance(out.psf, DeferredPsf):
        out = out._replace(psf=out.psf.resolve())
    return out


def _planes_of(exp) -> tuple:
    return (
        np.asarray(exp.image, dtype=np.float32),
        np.asarray(exp.variance, dtype=np.float32),
        np.asarray(exp.mask, dtype=np.uint32),
    )
