"""``procsky repo create|info``, ``procsky query``, ``procsky show``, ``procsky prune``."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from procsky.cli import main
from procsky.errors import ProcskyKeyError, ProcskyValueError

__all__ = ["repo_group", "query_cmd", "show_cmd", "prune_cmd"]


def _open(path: str):
    from procsky.repo import Repo

    return Repo(path)


def _runs(run: tuple[str, ...]):
    if not run:
        return None
    return list(run) if len(run) > 1 else run[0]


def _format_data_id(data_id: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in data_id.items()) or "(empty)"


@main.group("repo")
def repo_group():
    """Create and inspect data repositories."""


@repo_group.command("create")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option(
    "--registry",
    metavar="URL",
    default=None,
    help="Registry database URL, e.g. postgresql+psycopg://user@host:5432/db "
    "(default: SQLite file REPO/registry.sqlite3).",
)
@click.option("--exist-ok", is_flag=True, help="Succeed if REPO already is a repository.")
def repo_create(repo, registry, exist_ok):
    """Create an empty repository in the folder REPO (new or empty).

    \b
    Example:
      procsky repo create /data/hsc-repo
      procsky repo create /data/repo --registry postgresql+psycopg://me@dbhost/procsky
    """
    from pathlib import Path

    from procsky.errors import ProcskyFileError
    from procsky.repo import Repo
    from procsky.repo.butler import CONFIG_NAME

    root = Path(repo).expanduser().absolute()
    if not exist_ok and (root / CONFIG_NAME).exists():
        # Repo.create's message names its Python argument (exist_ok=True); name the flag.
        raise ProcskyFileError(
            f"{root} is already a procsky repository; use it as it is (procsky ingest/query/run "
            f"{repo} ...), or add --exist-ok to make `procsky repo create` succeed on it"
        )
    r = Repo.create(repo, registry=registry, exist_ok=exist_ok)
    click.echo(f"created repository {r.root} (registry: {r.registry.url.split('@')[-1]})")


@repo_group.command("info")
@click.argument("repo", type=click.Path())
def repo_info(repo):
    """Summarise REPO: registry, runs, chains and dataset counts."""
    r = _open(repo)
    click.echo(f"repository: {r.root}")
    click.echo(f"registry:   {r.registry!r}")
    counts = r.registry.count_datasets()
    runs = r.runs()
    click.echo(f"runs ({len(runs)}):")
    for run in runs:
        per_type = {dt: n for (rn, dt), n in counts.items() if rn == run}
        total = sum(per_type.values())
        detail = ", ".join(f"{dt} {n}" for dt, n in sorted(per_type.items()))
        click.echo(f"  {run}: {total} datasets ({detail})" if detail else f"  {run}: 0 datasets")
    chains = r.registry.chains()
    if chains:
        click.echo("chains:")
        for name, children in chains.items():
            click.echo(f"  {name} -> {', '.join(children)}")


@repo_group.command("clean")
@click.argument("repo", type=click.Path())
@click.option(
    "--min-age",
    type=float,
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Only files older than this (a running writer may own younger ones).",
)
@click.option("--dry-run", is_flag=True, help="List the files, remove nothing.")
def repo_clean(repo, min_age, dry_run):
    """Remove files of crashed writers from REPO (temporary or never registered)."""
    r = _open(repo)
    paths = r.orphans(min_age) if dry_run else r.remove_orphans(min_age)
    for p in paths:
        click.echo(("would remove " if dry_run else "removed ") + str(p.relative_to(r.root)))
    click.echo(f"{len(paths)} orphaned file(s){' found' if dry_run else ' removed'}", err=True)


@main.command("query")
@click.argument("repo", type=click.Path())
@click.argument("dataset_type", required=False)
@click.option(
    "--where",
    "-w",
    default=None,
    metavar="EXPR",
    help="Data-ID expression, e.g. \"tract=42 AND band IN ('g','r') AND visit > 10\".",
)
@click.option(
    "--run",
    "-r",
    multiple=True,
    metavar="RUN",
    help="Run or chain to search (repeat to search several, in order). Default: all runs.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: aligned columns; json: a list of records (dataset_type, run, data_id, uri ...).",
)
def query_cmd(repo, dataset_type, where, run, fmt):
    """List the datasets in REPO of DATASET_TYPE (default: all types) matching --where.

    \b
    Expressions use dimension names (instrument, physical_filter, band, detector, visit,
    skymap, tract, patch, or any other data-ID key), = != < <= > >=, IN (...), NOT IN,
    AND, OR, NOT, parentheses and quoted strings; inclusive ranges in IN lists: visit IN (10..20).

    \b
    Examples:
      procsky query REPO calexp --where "visit > 10 AND detector IN (1, 2)"
      procsky query REPO --run run1 --format json
    """
    r = _open(repo)
    refs = r.query(dataset_type, where=where, run=_runs(run))
    if fmt == "json":
        click.echo(json.dumps([ref.to_dict() for ref in refs], indent=1))
        return
    if not refs:
        click.echo("no matching datasets", err=True)
        return
    rows = [("DATASET_TYPE", "RUN", "DATA_ID", "URI")]
    rows += [(ref.dataset_type, ref.run, _format_data_id(ref.data_id), ref.uri) for ref in refs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    click.echo(f"{len(refs)} dataset(s)", err=True)


@main.command("show")
@click.argument("repo", type=click.Path())
@click.argument("dataset_type")
@click.option(
    "--where",
    "-w",
    required=True,
    metavar="EXPR",
    help='Data-ID expression selecting one dataset, e.g. "visit=12 AND detector=3".',
)
@click.option(
    "--run",
    "-r",
    multiple=True,
    metavar="RUN",
    help="Run or chain to search (repeatable, in order). Default: all runs, newest first.",
)
def show_cmd(repo, dataset_type, where, run):
    """Summarise one dataset of DATASET_TYPE in REPO selected by --where.

    For an exposure: shape, band, WCS centre, pixel statistics and mask-plane counts; for
    a table: columns (with units) and number of rows; for a dict: its contents.
    """
    r = _open(repo)
    refs = r.query(dataset_type, where=where, run=_runs(run))
    if not refs:
        raise ProcskyKeyError(
            f"no {dataset_type} matches --where {where!r}; list candidates with `procsky query {repo} {dataset_type}`"
        )
    # Several runs may hold the same data ID: show the first (run search order).
    distinct = {json.dumps(ref.data_id, sort_keys=True) for ref in refs}
    if len(distinct) > 1:
        sample = "; ".join(_format_data_id(ref.data_id) for ref in refs[:5])
        raise ProcskyValueError(
            f"--where {where!r} matches {len(distinct)} {dataset_type} datasets ({sample}"
            f"{' ...' if len(distinct) > 5 else ''}); narrow it to one"
        )
    ref = refs[0]
    click.echo(f"{ref.dataset_type}  {_format_data_id(ref.data_id)}")
    click.echo(f"run:           {ref.run}")
    click.echo(f"uri:           {ref.uri}")
    click.echo(f"storage class: {ref.storage_class}")
    click.echo(f"id:            {ref.id}")
    click.echo(f"checksum:      {ref.checksum}")
    if ref.created:
        click.echo(f"created:       {ref.created} UTC")
    for key, value in ref.provenance.items():
        click.echo(f"{key + ':':<15}{value}")
    obj = r.get(ref)
    for line in summarise(obj):
        click.echo(line)


def summarise(obj: Any) -> list[str]:
    """Human-readable summary lines of an Exposure, a DataFrame or a dict."""
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        return _summarise_table(obj)
    if isinstance(obj, dict):
        text = json.dumps(obj, indent=1, sort_keys=True, default=str)
        lines = text.splitlines()
        return ["contents:"] + lines[:60] + ([f"... ({len(lines) - 60} more lines)"] if len(lines) > 60 else [])
    return _summarise_exposure(obj)


def _summarise_table(df) -> list[str]:
    import pandas as pd

    units = df.attrs.get("units", {}) or {}
    out = [f"rows:          {len(df)}", f"columns ({len(df.columns)}):"]
    for name in df.columns:
        unit = units.get(str(name))
        out.append(f"  {name:<28} {str(df[name].dtype):<12} {unit or ''}".rstrip())
    if len(df):
        with pd.option_context("display.width", 120, "display.max_columns", 12):
            out.append("first rows:")
            out.extend("  " + line for line in df.head(5).to_string().splitlines())
    return out


def _summarise_exposure(exp) -> list[str]:
    import numpy as np

    ny, nx = exp.shape
    out = [f"shape:         {ny} x {nx} (y, x) pixels"]
    vi = getattr(exp, "visit_info", None)
    if vi is not None:
        out.append(
            f"band:          {vi.band} (filter {vi.physical_filter}), exposure {vi.exposure_time:g} s, "
            f"MJD {vi.mjd:.5f}, airmass {vi.airmass:.3f}"
        )
    if exp.wcs is not None:
        ra, dec = exp.pixel_to_sky((nx - 1) / 2.0, (ny - 1) / 2.0)
        scale = _pixel_scale_arcsec(exp)
        out.append(
            f"WCS centre:    RA {float(ra):.6f} deg, Dec {float(dec):.6f} deg"
            + (f", {scale:.4f} arcsec/pixel" if scale else "")
        )
    else:
        out.append("WCS:           none")
    if getattr(exp, "psf", None) is not None:
        try:
            out.append(f"PSF:           {type(exp.psf).__name__}, FWHM {exp.psf.fwhm():.3f} pixels")
        except Exception:  # a model without fwhm(): report its kind only
            out.append(f"PSF:           {type(exp.psf).__name__}")
    image = np.asarray(exp.image, dtype=np.float64)
    variance = np.asarray(exp.variance, dtype=np.float64)
    mask = np.asarray(exp.mask)
    finite = np.isfinite(image)
    n_good = int(finite.sum())
    if n_good:
        vals = image[finite]
        q = np.percentile(vals, [0.5, 50, 99.5])
        mad = 1.4826 * np.median(np.abs(vals - q[1]))
        out.append(
            f"image:         median {q[1]:.4g}, mean {vals.mean():.4g}, std {vals.std():.4g}, "
            f"robust sigma {mad:.4g}, range [{q[0]:.4g}, {q[2]:.4g}] (0.5-99.5%)"
        )
    out.append(f"               {ny * nx - n_good} non-finite pixels")
    vfin = np.isfinite(variance)
    if vfin.any():
        out.append(f"variance:      median {np.median(variance[vfin]):.4g}")
    planes = getattr(exp, "mask_planes", None)
    try:
        from procsky.masks import DEFAULT_PLANES, plane_counts

        counts = plane_counts(mask, planes if planes is not None else DEFAULT_PLANES)
    except ImportError:  # pragma: no cover - masks is part of the package
        counts = {f"bit{b}": int(np.count_nonzero(mask & np.uint32(1 << b))) for b in range(32)}
    nonzero = {k: v for k, v in counts.items() if v}
    out.append(
        "mask planes:   "
        + (", ".join(f"{k} {v} ({100.0 * v / (ny * nx):.2f}%)" for k, v in nonzero.items()) if nonzero else "none set")
    )
    return out


def _pixel_scale_arcsec(exp) -> float | None:
    try:
        from astropy.wcs.utils import proj_plane_pixel_scales

        scales = proj_plane_pixel_scales(exp.wcs.celestial)
        return float(math.sqrt(abs(scales[0] * scales[1])) * 3600.0)
    except Exception:  # a non-celestial WCS: leave the scale out
        return None


@main.command("prune")
@click.argument("repo", type=click.Path())
@click.option("--run", "-r", required=True, metavar="RUN", help="Run to prune (not a chain).")
@click.option(
    "--dataset-type",
    "-t",
    "dataset_types",
    required=True,
    multiple=True,
    metavar="TYPE",
    help="Dataset type to remove (repeatable).",
)
@click.option("--where", "-w", default=None, metavar="EXPR", help="Only datasets matching this data-ID expression.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
def prune_cmd(repo, run, dataset_types, where, dry_run):
    """Remove datasets of --dataset-type in --run from REPO (registry and files together).

    \b
    Example:
      procsky prune REPO --run run1 --dataset-type calexp --where "visit=12"
    """
    r = _open(repo)
    if run not in r.runs():
        raise ProcskyKeyError(f"no run {run!r} in {r.root}; runs: {', '.join(r.runs()) or '(none)'}")
    refs = r.query(list(dataset_types), where=where, run=run)
    refs = [ref for ref in refs if ref.run == run]
    if dry_run:
        for ref in refs:
            click.echo(f"would remove {ref.dataset_type} {_format_data_id(ref.data_id)} ({ref.uri})")
        click.echo(f"{len(refs)} dataset(s) would be removed")
        return
    n = r.remove(refs)
    click.echo(f"removed {n} dataset(s) of {', '.join(dataset_types)} from run {run}")
