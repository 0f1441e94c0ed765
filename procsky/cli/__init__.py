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


# Subcommand modules (``procsky/cli/*_cmds.py``) register themselves on ``main`` when
# imported; each family is owned by one part of the package.
def _load_subcommands() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmds"):
            importlib.import_module(f"procsky.cli.{info.name}")


_load_subcommands()


def run_main() -> None:  # pragma: no cover - console entry
    main()
