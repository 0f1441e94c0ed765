"""``procsky ingest``: register camera files in a repository."""

from __future__ import annotations

import click

from procsky.cli import main


@main.command("ingest")
@click.argument("repo", type=click.Path(file_okay=False))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--instrument",
    "-i",
    required=True,
    help="Camera definition: generic, decam-cp, 90prime-cp, mosaic3-cp, noirlab-cp, simcam.",
)
@click.option("--run", default=None, help="Output run (default: <instrument>/raw).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option(
    "--replace-records",
    is_flag=True,
    help="Overwrite visit/detector records that differ from the registered ones (e.g. after "
    "correcting headers) instead of stopping.",
)
def ingest(repo, files, instrument, run, progress, replace_records):
    """Ingest FILES into the repository REPO.

    Every file is read and checked before anything is written, so a bad file stops the
    ingest without changing the repository. Data already ingested in the run are skipped.

    \b
    Examples:
      procsky ingest repo images/*_ooi_*.fits --instrument decam-cp
      procsky ingest repo sim/images/*.fits --instrument simcam
    """
    from procsky.instruments import ingest_files
    from procsky.repo import Repo
    from procsky.repo.registry import RecordConflictError

    r = Repo(repo)
    try:
        report = ingest_files(r, files, instrument, run=run, progress=progress, replace_records=replace_records)
    except RecordConflictError as e:
        # The Python remedy (replace_records=True) means nothing here: name the flag.
        raise e.with_fix(
            f"the files describe {e.element} {e.key} differently from the repository; add "
            "--replace-records to overwrite the registered record"
        ) from e
    runs = sorted({ref.run for ref in report})
    click.echo(
        f"ingested {len(report)} dataset(s) from {len(files)} file(s)"
        + (f" into run {', '.join(runs)}" if runs else "")
        + (f"; {len(report.skipped)} already present, skipped" if report.skipped else "")
    )
