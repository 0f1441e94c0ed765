"""procsky._dask: the one owner of dask for pixel work."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from procsky import _dask
from procsky.exposure import Exposure


class _Target:
    """A zarr-like target that records every write."""

    def __init__(self, shape, chunks, dtype):
        self.shape, self.chunks, self.dtype = shape, chunks, np.dtype(dtype)
        self.data = np.zeros(shape, dtype)
        self.writes: list = []

    def __setitem__(self, key, value):
        self.writes.append(key)
        self.data[key] = value


def _aligned(key, chunks, shape):
    return all(s.start % c == 0 and (s.stop % c == 0 or s.stop == n) for s, c, n in zip(key, chunks, shape))


@pytest.mark.parametrize("dask_chunks", [(10, 10), (20, 30), (10, 30)])
def test_store_planes_writes_whole_chunks_in_batches(monkeypatch, dask_chunks):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(45, 62)).astype(np.float32)
    b = rng.integers(0, 9, size=(45, 62)).astype(np.int32)
    planes = {"a": da.from_array(a, chunks=dask_chunks), "b": da.from_array(b, chunks=dask_chunks)}
    targets = {"a": _Target(a.shape, (10, 10), np.float32), "b": _Target(b.shape, (10, 10), np.int32)}
    calls = []
    real = _dask.evaluate

    def counting(*args, **kw):
        calls.append(len(args))
        return real(*args, **kw)

    monkeypatch.setattr(_dask, "evaluate", counting)
    _dask.store_planes(planes, targets, batch=4)
    np.testing.assert_array_equal(targets["a"].data, a)
    np.testing.assert_array_equal(targets["b"].data, b)
    for t in targets.values():
        assert all(_aligned(k, t.chunks, t.shape) for k in t.writes)
    # One region per dask chunk (they are whole storage chunks), at most 4 per compute call.
    n_regions = len(planes["a"].chunks[0]) * len(planes["a"].chunks[1])
    assert len(targets["a"].writes) == n_regions
    assert calls == [min(4, n_regions - k) for k in range(0, n_regions, 4)]


def test_store_planes_uses_storage_chunks_when_dask_chunks_straddle_them():
    a = np.arange(30 * 30, dtype=np.float32).reshape(30, 30)
    t = _Target(a.shape, (10, 10), np.float32)
    _dask.store_planes({"a": da.from_array(a, chunks=(15, 15))}, {"a": t}, batch=2)
    np.testing.assert_array_equal(t.data, a)
    assert len(t.writes) == 9 and all(_aligned(k, t.chunks, t.shape) for k in t.writes)


def test_store_planes_computes_with_first_in_the_first_batch(monkeypatch):
    a = da.from_array(np.ones((20, 20), np.float32), chunks=10)
    stat = dask.delayed(lambda x: float(x.sum()))(a)
    calls = []
    real = _dask.evaluate
    monkeypatch.setattr(_dask, "evaluate", lambda *args, **kw: calls.append(len(args)) or real(*args, **kw))
    t = _Target((20, 20), (10, 10), np.float32)
    (value,) = _dask.store_planes({"a": a}, {"a": t}, batch=16, with_first=[stat])
    assert value == 400.0
    assert calls == [5]  # the 4 regions and the statistic, in one call: the graph is computed once


def test_map_with_margin_depth_and_edges():
    x = np.arange(37 * 41, dtype=np.float64).reshape(37, 41)
    seen = []

    def f(block):
        seen.append(block.shape)
        return block * 2

    out = _dask.map_with_margin(f, da.from_array(x, chunks=16), depth=3, dtype=np.float64).compute()
    np.testing.assert_array_equal(out, 2 * x)
    # interior blocks get the margin on both sides; edge blocks none beyond the image
    assert (16 + 6, 16 + 6) in seen and (16 + 3, 16 + 3) in seen


def test_map_with_margin_at_gives_interior_origin():
    x = np.zeros((50, 70), np.float32)

    def f(block, y0, x0):
        h = 4
        ny, nx = block.shape[0] - 2 * h, block.shape[1] - 2 * h
        yy, xx = np.mgrid[y0 : y0 + ny, x0 : x0 + nx]
        return (yy * 1000 + xx).astype(np.float32)

    out = _dask.map_with_margin_at(f, [x], depth=4, dtype=np.float32, chunk=20).compute()
    yy, xx = np.mgrid[0:50, 0:70]
    np.testing.assert_array_equal(out, (yy * 1000 + xx).astype(np.float32))
    assert min(_dask.axis_chunks(50, 20, 12)) >= 12 and sum(_dask.axis_chunks(50, 20, 12)) == 50


def test_from_chunk_tasks_assembles_planes():
    full = np.arange(30 * 25, dtype=np.float32).reshape(30, 25)

    @dask.delayed(nout=2)
    def chunk(y0, y1, x0, x1):
        return full[y0:y1, x0:x1], (full[y0:y1, x0:x1] > 100).astype(np.uint32)

    ys, xs = [(0, 16), (16, 30)], [(0, 10), (10, 20), (20, 25)]
    tasks = [[dask.delayed(lambda *a: a)(*chunk(*y, *x)) for x in xs] for y in ys]
    shapes = [[(y[1] - y[0], x[1] - x[0]) for x in xs] for y in ys]
    img, msk = _dask.from_chunk_tasks(tasks, shapes, (np.float32, np.uint32), ("img", "msk"))
    assert img.chunks == ((16, 14), (10, 10, 5)) and msk.dtype == np.uint32
    np.testing.assert_array_equal(img.compute(), full)
    np.testing.assert_array_equal(msk.compute(), (full > 100).astype(np.uint32))


def test_task_scheduler_outside_a_worker():
    assert not _dask.on_dask_worker()
    with _dask.task_scheduler(False):
        assert dask.config.get("scheduler") == "synchronous"
    before = dask.config.get("scheduler", None)
    with _dask.task_scheduler(True):
        assert dask.config.get("scheduler", None) == before


def test_exposure_extra_planes_and_delayed_metadata(tmp_path):
    rng = np.random.default_rng(3)
    img = da.from_array(rng.normal(size=(40, 30)).astype(np.float32), chunks=(20, 10))
    n = da.from_array(rng.integers(0, 5, size=(40, 30)).astype(np.int32), chunks=(20, 10))
    noise = dask.delayed(lambda a: float(np.std(a)))(img)
    exp = Exposure(img, extra_planes={"n_inputs": n}, metadata={"noise": noise, "x": 1})
    exp.write(tmp_path / "e.zarr", batch=2)
    back = Exposure.read(tmp_path / "e.zarr")
    np.testing.assert_array_equal(back.image.compute(), img.compute())
    np.testing.assert_array_equal(back.extra_planes["n_inputs"].compute(), n.compute())
    assert back.extra_planes["n_inputs"].dtype == np.int32
    assert back.metadata["noise"] == pytest.approx(float(np.std(img.compute())))
    assert back.metadata["x"] == 1
    cut = back[5:15, 2:9]
    assert cut.extra_planes["n_inputs"].shape == (10, 7)
    done = exp.compute()
    assert isinstance(done.metadata["noise"], float) and isinstance(done.extra_planes["n_inputs"], np.ndarray)
    with pytest.raises(Exception, match="shape"):
        Exposure(np.zeros((4, 4), np.float32), extra_planes={"n": np.zeros((3, 4))})


def test_single_owner_of_dask():
    """``procsky._dask`` is the only module that calls map_overlap, from_delayed, da.store
    or dask.compute (the executor only chooses the scheduler through it)."""
    import re
    from pathlib import Path

    import procsky

    root = Path(procsky.__file__).parent
    pattern = re.compile(r"map_overlap|from_delayed|da\.store|dask\.compute")
    allowed = {root / "_dask.py", root / "pipeline" / "executor.py"}
    hits = [
        f"{p.relative_to(root)}:{i}: {line.strip()}"
        for p in sorted(root.rglob("*.py"))
        if p not in allowed
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "dask called outside procsky._dask:\n" + "\n".join(hits)
