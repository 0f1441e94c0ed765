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
@click.option(
    "--band-map",
    multiple=True,
    metavar="FILTER=BAND",
    help="generic: map a FILTER header value to a band (repeatable), before the BAND keyword and the "
    "default table (docs/ingest.md).",
)
@click.option(
    "--unmatched-filter",
    type=click.Choice(["error", "unknown", "keep"]),
    default=None,
    help="generic: a FILTER nothing maps: stop (default), band 'unknown', or keep its name as the band.",
)
@click.option("--filter-key", default=None, metavar="KEY", help="generic: header keyword of the filter.")
@click.option(
    "--zero-point-key", default=None, metavar="KEY", help="generic: zero-point keyword, tried before MAGZP, PHOTZP ..."
)
@click.option(
    "--zero-point-unit",
    type=click.Choice(["auto", "image", "per-second"]),
    default=None,
    help="generic: the zero point is for one count of the image (image) or one count per second "
    "(per-second: + 2.5 log10 EXPTIME); auto (default) follows the keyword and its comment.",
)
@click.option(
    "--mask-pattern",
    default=None,
    metavar="PATTERN",
    help="generic: companion mask file, e.g. '{stem}_mask.fits' ({stem}: file name without .fits).",
)
@click.option(
    "--mask-bit",
    multiple=True,
    metavar="BIT=PLANE",
    help="generic: mask bit to procsky plane (repeatable), e.g. 1=SAT; other nonzero values -> BAD.",
)
@click.option(
    "--mask-default-plane",
    default=None,
    metavar="PLANE",
    help="generic: plane of the nonzero mask values no --mask-bit covers (default BAD; 'none' ignores them).",
)
@click.option(
    "--mask-good-nonzero", is_flag=True, default=None, help="generic: the mask marks good pixels (zeros are bad)."
)
@click.option(
    "--weight-pattern",
    default=None,
    metavar="PATTERN",
    help="generic: companion weight file, e.g. '{stem}.weight.fits'; it becomes the variance plane.",
)
@click.option(
    "--weight-kind",
    type=click.Choice(["invvar", "variance", "rms"]),
    default=None,
    help="generic: what the weight file holds (default invvar).",
)
@click.option(
    "--visit-key",
    default=None,
    metavar="KEY",
    help="generic: header keyword of the exposure id (e.g. EXPID) when frames share DATE-OBS.",
)
def ingest(
    repo,
    files,
    instrument,
    run,
    progress,
    replace_records,
    band_map,
    unmatched_filter,
    filter_key,
    zero_point_key,
    zero_point_unit,
    mask_pattern,
    mask_bit,
    mask_default_plane,
    mask_good_nonzero,
    weight_pattern,
    weight_kind,
    visit_key,
):
    """Ingest FILES into the repository REPO.

    Every file is read and checked before anything is written, so a bad file stops the
    ingest without changing the repository. Data already ingested in the run are skipped.

    \b
    Examples:
      procsky ingest repo images/*_ooi_*.fits --instrument decam-cp
      procsky ingest repo sim/images/*.fits --instrument simcam
      procsky ingest repo ztf/*_sciimg.fits -i generic --mask-pattern '{stem}_mask.fits' \\
          --visit-key EXPID --band-map 'Halpha=N656'
    """
    from procsky.instruments import ingest_files
    from procsky.repo import Repo
    from procsky.repo.registry import RecordConflictError

    options = {
        "band_map": _pairs(band_map, "--band-map", "FILTER=BAND") or None,
        "unmatched_filter": unmatched_filter,
        "filter_key": filter_key,
        "zero_point_key": zero_point_key,
        "zero_point_unit": zero_point_unit,
        "mask_pattern": mask_pattern,
        "mask_planes": {_int(k, "--mask-bit"): v for k, v in _pairs(mask_bit, "--mask-bit", "BIT=PLANE").items()}
        or None,
        "mask_default_plane": mask_default_plane,
        "mask_good_nonzero": mask_good_nonzero,
        "weight_pattern": weight_pattern,
        "weight_kind": weight_kind,
        "visit_key": visit_key,
    }
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    r = Repo(repo)
    try:
        report = ingest_files(
            r, files, instrument, run=run, progress=progress, replace_records=replace_records, **options
        )
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


def _pairs(values, option: str, form: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.rpartition("=")
        if not sep or not key.strip() or not val.strip():
            raise click.BadParameter(f"{v!r}: expected {form}", param_hint=option)
        out[key.strip()] = val.strip()
    return out


def _int(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a bit number", param_hint=option) from None
