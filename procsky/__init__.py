"""procsky: reprocessing of wide-field imaging surveys on dask, zarr and numba."""

from __future__ import annotations

# "0.1.0+g<commit>" in a git checkout (read from .git, no subprocess), else the release;
# version_info() adds whether the checkout has uncommitted changes.
from procsky._version import __version__, version_info
from procsky.errors import ProcskyError
from procsky.exposure import Exposure, VisitInfo


def __getattr__(name):
    # Heavier subsystems load on first use so `import procsky` stays fast.
    if name == "Repo":
        from procsky.repo import Repo

        return Repo
    if name == "open_cluster":
        from procsky.pipeline import open_cluster

        return open_cluster
    raise AttributeError(f"module 'procsky' has no attribute {name!r}")


__all__ = ["Exposure", "VisitInfo", "Repo", "open_cluster", "ProcskyError", "__version__", "version_info"]
