"""The one owner of dask for pixel work.

Every stage builds and runs its dask graphs through these functions; nothing else in
``procsky`` calls ``map_overlap``, ``from_delayed``, ``store`` or ``dask.compute`` (the
executor's scheduler choice lives here too). Kernels (:mod:`procsky.kernels`) are numba or
numpy functions of one chunk and know nothing of dask; the stage modules
(:mod:`procsky.coadd`, :mod:`procsky.diffim` ...) describe *what* to compute per chunk and
with how much overlap; this module decides *how*.

Three shapes of pixel work cover the pipeline:

* :func:`map_with_margin` / :func:`map_with_margin_at`: a kernel applied per chunk with a
  margin of ``depth`` pixels taken from the neighbours (convolution, PSF matching,
  difference imaging), the depth coming from the kernel's radius;
* :func:`from_chunk_tasks`: arrays assembled from one delayed task per output chunk that
  returns several planes at once (warping, coaddition);
* :func:`store_planes`: lazy planes written to a Zarr group in batches of whole, aligned
  storage chunks, so that memory is bounded by the batch, not by the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = [
    "is_dask",
    "as_dask",
    "axis_chunks",
    "map_with_margin",
    "map_with_margin_at",
    "from_chunk_tasks",
    "evaluate",
    "persist",
    "store_planes",
    "chunk_slices",
    "on_dask_worker",
    "task_scheduler",
    "dataframe_from_parquet",
]


def is_dask(a: Any) -> bool:
    """True for a dask collection (anything with a graph)."""
    return hasattr(a, "dask") and hasattr(a, "chunks")


def as_dask(a: Any, chunks: int | tuple | None = None):
    """``a`` as a dask array: rechunked to ``chunks`` if it already is one (and ``chunks``
    is given), else wrapped with ``chunks`` (default 1024)."""
    import dask.array as da

    if is_dask(a):
        return a if chunks is None else a.rechunk(chunks)
    return da.from_array(np.asarray(a), chunks=chunks or 1024)


def axis_chunks(n: int, chunk: int, depth: int) -> tuple[int, ...]:
    """Chunk sizes along one axis of length ``n``, every chunk at least ``depth`` long
    (``map_overlap`` needs each chunk to hold its neighbour's margin)."""
    c = max(int(chunk), int(depth), 1)
    sizes = [c] * (n // c) + ([n % c] if n % c else [])
    if len(sizes) > 1 and sizes[-1] < depth:
        sizes[-2] += sizes.pop()
    return tuple(sizes)


def map_with_margin(func: Callable, *arrays, depth: int, dtype, boundary: Any = "none", trim: bool = True, **kwargs):
    """Apply ``func`` to every chunk of ``arrays`` extended by ``depth`` pixels on each side.

    A thin, explicit wrapper of :func:`dask.array.map_overlap`: ``depth`` is the kernel's
    radius, ``boundary="none"`` gives edge chunks no padding (the kernel sees the true
    image edge), ``trim=True`` cuts the margin off the result again. Extra keyword
    arguments go to ``func``. Returns a lazy array of ``dtype``.
    """
    import dask.array as da

    return da.map_overlap(
        func,
        *arrays,
        depth=depth,
        boundary=boundary,
        trim=trim,
        dtype=dtype,
        meta=np.empty((0,) * arrays[0].ndim, dtype),
        **kwargs,
    )


def map_with_margin_at(func: Callable, arrays: Sequence, *, depth: int, dtype, chunk: int):
    """Run ``func(*padded_blocks, y0=, x0=)`` per chunk with ``depth`` pixels of overlap.

    The arrays are rechunked so that every chunk is at least ``depth`` wide; the edges are
    padded with zeros; ``func`` gets the origin ``(y0, x0)`` of its chunk's interior in the
    full array (for spatially varying kernels) and returns the interior itself, without
    the margin.
    """
    import dask.array as da

    darrs = [a if is_dask(a) else da.from_array(np.asarray(a), chunks=chunk) for a in arrays]
    chunks = tuple(axis_chunks(n, chunk, depth) for n in darrs[0].shape)
    darrs = [a.rechunk(chunks) for a in darrs]
    chunks = darrs[0].chunks
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in chunks]

    def wrapped(*blocks, block_info=None):
        iy, ix = block_info[0]["chunk-location"]
        return func(*blocks, y0=int(starts[0][iy]), x0=int(starts[1][ix])).astype(dtype)

    return da.map_overlap(
        wrapped,
        *darrs,
        depth=depth,
        boundary=0,
        trim=False,
        dtype=dtype,
        chunks=chunks,
        meta=np.zeros((0, 0), dtype=dtype),
        align_arrays=False,
    )


def from_chunk_tasks(
    chunk_tasks: Sequence[Sequence[Any]],
    shapes: Sequence[Sequence[tuple[int, int]]],
    dtypes: Sequence,
    names: Sequence[str],
) -> list:
    """Assemble dask arrays (one per plane) from a grid of delayed per-chunk tuples.

    ``chunk_tasks[row][col]`` is a :class:`dask.delayed.Delayed` returning a tuple of
    planes for the chunk of shape ``shapes[row][col]``; plane ``k`` has dtype
    ``dtypes[k]`` and a graph name prefixed by ``names[k]``.
    """
    import dask.array as da

    planes = []
    for k, (dt, name) in enumerate(zip(dtypes, names)):
        rows = []
        for row_t, row_s in zip(chunk_tasks, shapes):
            rows.append(
                [
                    da.from_delayed(t[k], shape=s, dtype=dt, meta=np.empty((0, 0), dt), name=f"{name}-{t.key}-{k}")
                    for t, s in zip(row_t, row_s)
                ]
            )
        planes.append(da.block(rows))
    return planes


def evaluate(*args, **kwargs):
    """:func:`dask.compute` (the one call site for the library)."""
    import dask

    return dask.compute(*args, **kwargs)


def persist(*args, **kwargs):
    """:func:`dask.persist`."""
    import dask

    return dask.persist(*args, **kwargs)


def chunk_slices(shape: tuple[int, int], chunks: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """Row-major slices of the storage chunks of an array of ``shape``."""
    ny, nx = shape
    cy, cx = chunks
    for y in range(0, ny, cy):
        for x in range(0, nx, cx):
            yield slice(y, min(y + cy, ny)), slice(x, min(x + cx, nx))


def _regions(planes: Mapping[str, Any], shape: tuple[int, int], chunks: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Write regions: the dask chunks of the planes when they all share one grid made of
    whole storage chunks (each region then is one task's output), else the storage chunks."""
    grids = {tuple(a.chunks) for a in planes.values() if is_dask(a)}
    if len(grids) == 1:
        grid = grids.pop()
        bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in grid]
        if all(all(int(b) % c == 0 or int(b) == n for b in bs) for bs, c, n in zip(bounds, chunks, shape)):
            return [
                (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
                for y0, y1 in zip(bounds[0][:-1], bounds[0][1:])
                for x0, x1 in zip(bounds[1][:-1], bounds[1][1:])
            ]
    return list(chunk_slices(shape, chunks))


def store_planes(
    planes: Mapping[str, Any], targets: Mapping[str, Any], *, batch: int = 16, with_first: Sequence[Any] = ()
) -> tuple:
    """Compute lazy ``planes`` and write them into the matching zarr ``targets``, ``batch``
    regions at a time.

    Every write covers whole storage chunks of the target (zarr v3 takes no locks, so two
    writers of one chunk would lose data); a region is one dask chunk of the planes when
    their chunks are made of whole storage chunks, else one storage chunk. Peak memory is
    one batch of regions of every plane, whatever the size of the image and the depth of
    the graph behind it; when every region fits one batch, the graph is computed once.

    ``with_first``: further dask objects (e.g. ``dask.delayed`` statistics of the planes)
    computed in the same call as the first batch, so work they share with the planes is
    done once. Returns their computed values, in order.
    """
    names = list(planes)
    extra = list(with_first)
    if not names:
        return tuple(evaluate(*extra)) if extra else ()
    shape = tuple(targets[names[0]].shape)
    chunks = tuple(targets[names[0]].chunks)
    for n in names:
        if tuple(targets[n].shape) != shape or tuple(targets[n].chunks) != chunks:
            raise ValueError(
                f"target {n!r} has shape/chunks {targets[n].shape}/{targets[n].chunks}, "
                f"not {shape}/{chunks} like {names[0]!r}"
            )
    slices = _regions(planes, shape, chunks)
    values: tuple = ()
    for k in range(0, len(slices), max(int(batch), 1)):
        part = slices[k : k + max(int(batch), 1)]
        first = extra if k == 0 else []
        out = evaluate(*[tuple(planes[n][s] for n in names) for s in part], *first)
        blocks, got = out[: len(part)], out[len(part) :]
        if k == 0:
            values = tuple(got)
        for s, vals in zip(part, blocks):
            for n, v in zip(names, vals):
                targets[n][s] = np.asarray(v, dtype=targets[n].dtype)
    return values


def on_dask_worker() -> bool:
    """True when called from a task running on a ``distributed`` worker."""
    try:
        from distributed import get_worker
    except ImportError:
        return False
    try:
        get_worker()
    except ValueError:  # not inside a worker task
        return False
    return True


@contextmanager
def task_scheduler(parallel: bool):
    """The scheduler a pipeline task's lazy arrays run on.

    ``parallel``: a task that spreads its chunks over the cluster (its graph is submitted
    from the worker through ``worker_client``, which frees the worker's slot meanwhile);
    outside a worker, the caller's scheduler. Otherwise the chunks run in the calling
    thread: the cluster already runs one quantum per worker thread.
    """
    if parallel and on_dask_worker():
        from distributed import worker_client

        with worker_client():
            yield
    elif parallel:
        yield
    else:
        import dask

        with dask.config.set(scheduler="synchronous"):
            yield


def dataframe_from_parquet(paths: Sequence[str], *, columns: list[str] | None = None):
    """Parquet tables (one per patch, say) as one lazy ``dask.dataframe``, a partition per file."""
    import dask.dataframe as dd

    if not paths:
        raise ValueError("no Parquet files to read")
    # The repository's paths hold "key=value" folders (tract=0/...): no hive partitioning, the
    # files carry those columns themselves.
    return dd.read_parquet(list(paths), columns=columns, dataset={"partitioning": None})
