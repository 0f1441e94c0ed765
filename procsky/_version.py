"""The version of procsky, with the git commit when it runs from a git checkout.

A release says "0.1.0" whatever was changed since; provenance needs the code itself. When
the ``procsky`` package sits in a git checkout (an editable install, ``PYTHONPATH``), the
commit is read from ``.git`` directly (``HEAD``, the branch ref or ``packed-refs``): no
subprocess at import, and nothing happens when git or ``.git`` are absent (an installed
wheel). Whether the working tree has uncommitted changes needs ``git status``; that runs
once, on the first call of :func:`version_info` or :func:`code_version`, never at import.

``__version__`` is ``"0.1.0+g061f983"`` in a checkout (PEP 440 local version) and
``"0.1.0"`` otherwise; :func:`code_version` adds ``.dirty`` when the tree has uncommitted
changes to tracked files, which is what provenance records.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VersionInfo", "__version__", "code_version", "git_commit", "release", "version_info"]

#: The folder holding the ``procsky`` package: the checkout root in a development install.
_ROOT = Path(__file__).resolve().parent.parent
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


@dataclass(frozen=True)
class VersionInfo:
    """What code is running.

    Parameters
    ----------
    version : str
        The release (package metadata), e.g. ``"0.1.0"``.
    commit : str or None
        Full git commit hash of the checkout; None when not running from one.
    dirty : bool or None
        Tracked files differ from ``commit``; None when unknown (no checkout, no git).
    """

    version: str
    commit: str | None = None
    dirty: bool | None = None

    def __str__(self) -> str:
        if self.commit is None:
            return self.version
        sep = "." if "+" in self.version else "+"
        return f"{self.version}{sep}g{self.commit[:7]}" + (".dirty" if self.dirty else "")


def release() -> str:
    """The release version from the package metadata (``"0.0.0+unknown"`` if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("procsky")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _git_dir(root: Path) -> Path | None:
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = dot.read_text().strip()
        if text.startswith("gitdir:"):
            path = Path(text[len("gitdir:") :].strip())
            return path if path.is_absolute() else (root / path).resolve()
    return None


def _resolve_ref(git_dir: Path, ref: str) -> str | None:
    common = git_dir
    if (git_dir / "commondir").is_file():  # worktrees keep branches in the main .git
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for base in (git_dir, common):
        path = base / ref
        if path.is_file():
            sha = path.read_text().strip()
            return sha if _SHA.fullmatch(sha) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.fullmatch(parts[0]):
                return parts[0]
    return None


@functools.lru_cache(maxsize=1)
def git_commit(root: Path = _ROOT) -> str | None:
    """The commit checked out at ``root`` (read from ``.git``), or None."""
    try:
        git_dir = _git_dir(root)
        if git_dir is None:
            return None
        head = (git_dir / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            return _resolve_ref(git_dir, head[len("ref:") :].strip())
        return head if _SHA.fullmatch(head) else None  # detached HEAD
    except (OSError, UnicodeDecodeError):
        return None


def _git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from HEAD (``git status``); None when git cannot tell."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never take index.lock from a reader
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return bool(res.stdout.strip())


@functools.lru_cache(maxsize=1)
def version_info() -> VersionInfo:
    """Release, commit and dirty flag of the running procsky (computed once per process)."""
    commit = git_commit()
    return VersionInfo(release(), commit, _git_dirty(_ROOT) if commit is not None else None)


def code_version() -> str:
    """The version string for provenance: ``"0.1.0+g061f983"``, ``".dirty"`` appended when
    the checkout has uncommitted changes, plain ``"0.1.0"`` outside a checkout."""
    return str(version_info())


#: ``"0.1.0+g<commit>"`` in a git checkout, else the release (no subprocess at import).
__version__ = str(VersionInfo(release(), git_commit()))
