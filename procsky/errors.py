"""Exceptions raised by procsky, and when to raise which.

Policy (after GalSim's ``errors.py``):

* ``ProcskyError`` is the base of everything procsky raises on purpose. Catch it to catch
  any procsky failure.
* Domain errors subclass both ``ProcskyError`` and the matching builtin, so callers may
  catch either ``ProcskyValueError`` or plain ``ValueError``:

  - ``ProcskyValueError``: a value is out of range or malformed (a bad config value, a
    malformed ``--where`` expression, a chunk-misaligned write).
  - ``ProcskyTypeError``: an argument of the wrong kind.
  - ``ProcskyFileError`` (an ``OSError``): a file is missing, truncated, or not the format
    expected. I/O failures of this kind are *transient* for the executor only when they
    come from the storage layer (see ``TransientError``).
  - ``ProcskyKeyError``: a named thing (dataset, instrument, mask plane, task) does not exist.
  - ``RepoError``: the repository is inconsistent or a registry operation failed.
  - ``ConflictError``: a dataset with the same type, data ID and run is already registered.
  - ``AlgorithmError``: an algorithm could not produce a result from valid inputs (too few
    stars to fit a PSF). The executor marks that quantum ``failed`` and blocks only its
    descendants.
  - ``NoWorkError``: a quantum has nothing to do (no overlap, no usable pixels); the
    executor marks it ``no_work`` with the message as reason.
  - ``TransientError``: worth retrying (lost worker, flaky I/O).

* Messages say what was wrong, show the value, state the rule and suggest the fix.
* All exceptions pickle (they cross dask workers): keep ``__init__`` signatures
  compatible with ``Exception(message)``.
"""

from __future__ import annotations

__all__ = [
    "ProcskyError",
    "ProcskyValueError",
    "ProcskyTypeError",
    "ProcskyFileError",
    "ProcskyKeyError",
    "RepoError",
    "ConflictError",
    "QuerySyntaxError",
    "AlgorithmError",
    "NoWorkError",
    "TransientError",
]


class ProcskyError(Exception):
    """Base class of every exception procsky raises on purpose."""


class ProcskyValueError(ProcskyError, ValueError):
    """A value is out of range or malformed."""


class ProcskyTypeError(ProcskyError, TypeError):
    """An argument is of the wrong kind."""


class ProcskyFileError(ProcskyError, OSError):
    """A file is missing, truncated or not in the expected format."""


class ProcskyKeyError(ProcskyError, KeyError):
    """A named thing (dataset, instrument, mask plane, task) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class RepoError(ProcskyError):
    """The repository or its registry failed or is inconsistent."""


class ConflictError(RepoError, ValueError):
    """A dataset with the same dataset type, data ID and run is already registered."""


class QuerySyntaxError(ProcskyValueError):
    """A data-ID expression could not be parsed.

    ``position`` is the 0-based character offset of the offending token and ``expression``
    the text; ``str()`` shows both with a caret under the token.
    """

    def __init__(self, message: str, expression: str = "", position: int = -1):
        super().__init__(message, expression, position)
        self.message = message
        self.expression = expression
        self.position = position

    def __str__(self) -> str:
        if self.position < 0 or not self.expression:
            return self.message
        return f"{self.message}\n  {self.expression}\n  {' ' * self.position}^"


class AlgorithmError(ProcskyError):
    """An algorithm could not produce a result from valid inputs."""


class NoWorkError(ProcskyError):
    """A quantum has nothing to do; the message is the reason."""


class TransientError(ProcskyError):
    """A failure worth retrying (lost worker, flaky I/O)."""
