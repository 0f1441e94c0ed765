"""The ``procsky`` command.

Each family of subcommands lives in its own module and registers itself on ``main``;
this module only builds the group, imports them, and turns user errors into a one-line
message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import sys

import click

from procsky.errors import ProcskyError

__all__ = ["main", "run_main"]


class _Group(click.Group):
    """A click group that turns procsky errors into ``Error: ...`` and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except ProcskyError as exc:
            raise click.ClickException(_one_line(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else exc.__class__.__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="procsky")
def main():
    """procsky: reprocess wide-field imaging surveys on dask, zarr and numba.

    \b
    Typical session:
      procsky repo create REPO
      procsky ingest REPO images/*.fits --instrument decam-cp
      procsky query REPO calexp --where "band IN ('g','r')"
      procsky run drp --repo REPO --where "tract=0" --output run1
      procsky report REPO --run run1 --html report.html
    """


# Subcommand modules register themselves on ``main`` when imported. Each is owned by one
# part of the package; a missing optional dependency only disables that family.
from procsky.cli import repo_cmds  # noqa: E402,F401
from procsky.cli import sim_cmds  # noqa: E402,F401
from procsky.cli import pipeline_cmds  # noqa: E402,F401
from procsky.cli import ingest_cmds  # noqa: E402,F401


def run_main() -> None:  # pragma: no cover - console entry
    main()
