"""``procsky ingest-refcat``: store a reference catalogue in HEALPix shards."""

from __future__ import annotations

import click

from procsky.cli import main


@main.command("ingest-refcat")
@click.argument("repo", type=click.Path(file_okay=False))
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--name", "-n", required=True, help="Catalogue name used by the tasks (e.g. gaia_dr2, sim).")
@click.option(
    "--healpix-level",
    default=7,
    show_default=True,
    type=click.IntRange(0, 29),
    help="HEALPix level of the shards (7: ~27 arcmin pixels).",
)
@click.option("--run", default=None, help="Output run (default: refcats/NAME).")
def ingest_refcat_cmd(repo, files, name, healpix_level, run):
    """Ingest reference catalogue FILES (Parquet, FITS, CSV) into REPO as NAME.

    Sources are normalised (ra, dec, errors, proper motions, mag_<band>) and cut into
    HEALPix shards so that a detector loads only the shards it overlaps. Gaia-like files
    (source_id, ra_error, phot_g_mean_mag ...) get mag_G/BP/RP and approximate SDSS g, r, i.

    \b
    Examples:
      procsky ingest-refcat repo sim/refcat/refcat.parquet --name sim
      procsky ingest-refcat repo gaia/chunk-*.fits --name gaia_dr2
    """
    from procsky.refcat import ingest_refcat
    from procsky.repo import Repo

    refs = ingest_refcat(Repo(repo), list(files), name, healpix_level=healpix_level, run=run)
    runs = sorted({r.run for r in refs})
    click.echo(
        f"ingested refcat {name!r}: {len(refs)} shard(s) at HEALPix level {healpix_level} "
        f"from {len(files)} file(s) into run {', '.join(runs)}"
    )
