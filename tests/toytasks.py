"""Small tasks for testing and benchmarking the pipeline machinery (not part of procsky).

``tests/conftest.py`` imports this module (``tests/`` is on ``sys.path`` under pytest, and on
``PYTHONPATH`` for the worker processes and subprocesses the tests start), which registers
the tasks below; ``benchmarks/bench_scheduler.py`` imports it from ``tests/``. Pipelines
name the tasks by class path (``toytasks:ToyMeasureTask``) so any process can import them.

* ``toy_measure`` (per {instrument, visit, detector}): reads a ``toy_raw`` table of pixel
  values, subtracts a clipped background and measures per-row statistics with a dask
  array reduction inside the quantum (``parallel = True``), writes ``toy_stats``.
* ``toy_gather`` (per {instrument, visit}): gathers every ``toy_stats`` of the visit into
  one ``toy_visit`` summary.
* ``toy_noop`` (per {index}): no inputs or outputs; makes ``n`` quanta (scheduler
  benchmarks).

:func:`make_toy_inputs` fills a repository with deterministic ``toy_raw`` tables.
"""

from __future__ import annotations

import time

import numpy as np
import pydantic

from procsky.errors import AlgorithmError, NoWorkError
from procsky.tasks.base import Input, Output, QuantumSpec, Task, TaskConfig, register_task

__all__ = [
    "ToyMeasureTask",
    "ToyGatherTask",
    "ToyGatherTolerantTask",
    "ToyNoopTask",
    "ToyNestedTask",
    "make_toy_inputs",
    "TOY_PIPELINE_YAML",
]

_VD = ("instrument", "visit", "detector")


class ToyMeasureConfig(TaskConfig):
    """Configuration of :class:`ToyMeasureTask`."""

    clip_sigma: float = 3.0
    """Clipping threshold of the background estimate (standard deviations)."""
    chunk_rows: int = 16
    """Rows per dask chunk of the in-quantum reduction."""
    min_rows: int = 1
    """Fewer rows than this: the quantum has no work."""
    sleep: float = 0.0
    """Seconds to wait before returning (lets tests interrupt a run), s."""


@register_task("toy_measure")
class ToyMeasureTask(Task):
    """Background-subtracted row statistics of a ``toy_raw`` table."""

    dimensions = _VD
    inputs = {"raw": Input("toy_raw", _VD)}
    outputs = {"stats": Output("toy_stats", _VD)}
    Config = ToyMeasureConfig
    parallel = True

    def run(self, raw):
        import dask.array as da
        import pandas as pd

        if len(raw) < self.config.min_rows:
            raise NoWorkError(f"only {len(raw)} rows (< min_rows={self.config.min_rows})")
        pix = np.stack([raw[c].to_numpy(np.float64) for c in raw.columns if c.startswith("p")], axis=1)
        if not np.all(np.isfinite(pix)):
            raise AlgorithmError("non-finite pixel values; mask them before measuring")
        # Sigma-clipped background (3 iterations), then per-row sums as a dask graph.
        data = pix.ravel()
        keep = np.ones(data.size, bool)
        for _ in range(3):
            mu, sd = data[keep].mean(), data[keep].std()
            keep = np.abs(data - mu) < self.config.clip_sigma * sd
        background = float(np.median(data[keep]))
        arr = da.from_array(pix - background, chunks=(self.config.chunk_rows, -1))
        row_sum, row_max = da.compute(arr.sum(axis=1), arr.max(axis=1))
        if self.config.sleep:
            time.sleep(self.config.sleep)
        out = pd.DataFrame({"row": np.arange(len(row_sum)), "flux": row_sum, "peak": row_max})
        out.attrs["background"] = background
        return {"stats": out}


class ToyGatherConfig(TaskConfig):
    """Configuration of :class:`ToyGatherTask`."""

    threshold: float = 0.0
    """Rows with flux above this count as detections (counts)."""


@register_task("toy_gather")
class ToyGatherTask(Task):
    """Per-visit summary of every detector's ``toy_stats``."""

    dimensions = ("instrument", "visit")
    inputs = {"stats": Input("toy_stats", _VD, multiple=True)}
    outputs = {"summary": Output("toy_visit", ("instrument", "visit"))}
    Config = ToyGatherConfig

    def run(self, stats, data_ids):
        fluxes = np.concatenate([s["flux"].to_numpy() for s in stats])
        return {
            "summary": {
                "detectors": [d["detector"] for d in data_ids["stats"]],
                "n_rows": int(fluxes.size),
                "total_flux": float(fluxes.sum()),
                "n_detections": int((fluxes > self.config.threshold).sum()),
            }
        }


@register_task("toy_gather_tolerant")
class ToyGatherTolerantTask(ToyGatherTask):
    """:class:`ToyGatherTask` that summarises the detectors that did succeed."""

    inputs = {"stats": Input("toy_stats", _VD, multiple=True, tolerate_missing=True)}


class ToyNoopConfig(TaskConfig):
    """Configuration of :class:`ToyNoopTask`."""

    n: int = 100
    """Number of quanta."""


@register_task("toy_noop")
class ToyNoopTask(Task):
    """Does nothing, ``n`` times (per-quantum overhead of the executor)."""

    dimensions = ("index",)
    inputs = {}
    outputs = {}
    Config = ToyNoopConfig

    def quanta(self, repo, inputs, where):
        return [QuantumSpec({"index": i}, {}) for i in range(self.config.n)]

    def run(self):
        return {}


class ToyLeafConfig(pydantic.BaseModel):
    """Innermost level of :class:`ToyNestedConfig` (a library-style configuration)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    budget: float = 64.0
    """A budget, MiB."""
    order: int = 2
    """An order."""


class ToyInnerConfig(pydantic.BaseModel):
    """Middle level of :class:`ToyNestedConfig`."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str = "a"
    """A name."""
    leaf: ToyLeafConfig = ToyLeafConfig()
    """Nested library configuration."""
    weights: dict[str, float] = {"g": 1.0}
    """A plain dict field (merged key by key by overrides)."""


class ToyNestedConfig(TaskConfig):
    """Configuration of :class:`ToyNestedTask`: a task config holding library configs."""

    n: int = 2
    """Number of quanta."""
    inner: ToyInnerConfig = ToyInnerConfig()
    """Nested configuration."""


@register_task("toy_nested")
class ToyNestedTask(ToyNoopTask):
    """:class:`ToyNoopTask` with a nested configuration (config override tests)."""

    Config = ToyNestedConfig


def make_toy_inputs(
    repo,
    run: str = "raw",
    *,
    visits=(1, 2),
    detectors=(0, 1, 2),
    rows: int = 40,
    cols: int = 8,
    seed: int = 42,
    instrument: str = "toycam",
):
    """Put deterministic ``toy_raw`` tables (Gaussian noise + a few bright rows) in ``repo``.

    Returns
    -------
    list of DatasetRef
    """
    import pandas as pd

    refs = []
    for v in visits:
        for d in detectors:
            rng = np.random.default_rng([seed, v, d])
            pix = rng.normal(100.0, 5.0, size=(rows, cols))
            pix[rng.integers(0, rows, 3)] += 200.0
            df = pd.DataFrame({f"p{i}": pix[:, i] for i in range(cols)})
            refs.append(repo.put(df, "toy_raw", {"instrument": instrument, "visit": v, "detector": d}, run))
    return refs


TOY_PIPELINE_YAML = """\
description: toy two-stage pipeline (tests)
tasks:
  - label: measure
    task: toytasks:ToyMeasureTask
  - label: gather
    task: toytasks:ToyGatherTask
"""
