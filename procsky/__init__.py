"""procsky: reprocessing of wide-field imaging surveys on dask, zarr and numba."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("procsky")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from procsky.errors import ProcskyError  # noqa: E402
from procsky.exposure import Exposure, VisitInfo  # noqa: E402


def __getattr__(name):
    # Heavier subsystems load on first use so `import procsky` stays fast.
    if name == "Repo":
        from procsky.repo import Repo

        return Repo
    if name == "open_cluster":
        from procsky.pipeline import open_cluster

        return open_cluster
    raise AttributeError(f"module 'procsky' has no attribute {name!r}")


__all__ = ["Exposure", "VisitInfo", "Repo", "open_cluster", "ProcskyError", "__version__"]
