"""``procsky objects ...``: look up objects near a position, pull a light curve."""

from __future__ import annotations

import click

from procsky.cli import main

_DEFAULT_COLUMNS = ("ref_band", "ref_extendedness")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _echo_table(df, columns) -> None:
    cols = [c for c in columns if c in df.columns]
    units = df.attrs.get("units", {})
    head = [f"{c}[{units[c]}]" if c in units else c for c in cols]
    rows = [head] + [[_fmt(v) for v in rec] for rec in df[cols].itertuples(index=False, name=None)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        click.echo("  ".join(v.rjust(w) for v, w in zip(r, widths)))


@main.group("objects")
def objects_group():
    """The data release's object catalogue (object, forced_source) of a drp run."""


@objects_group.command("near")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.option("--ra", type=float, required=True, help="Right ascension, deg.")
@click.option("--dec", type=float, required=True, help="Declination, deg.")
@click.option("--radius", type=float, default=2.0, show_default=True, help="Search radius, arcsec.")
@click.option("--run", "-r", multiple=True, metavar="RUN", help="Run(s) to search (default: all).")
@click.option("--all", "all_rows", is_flag=True, help="Also non-primary rows (patch overlaps, sky objects).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Write every column to CSV.")
def objects_near(repo, ra, dec, radius, run, all_rows, csv_path):
    """Objects of REPO within --radius of (--ra, --dec), nearest first.

    \b
    Examples:
      procsky objects near REPO --ra 150.1 --dec 2.2 --radius 5
      procsky objects near REPO --ra 150.1 --dec 2.2 --run demo/drp --csv near.csv
    """
    from procsky.pipeline.catalogue import find_objects
    from procsky.repo import Repo

    df = find_objects(Repo(repo), ra, dec, radius, run=list(run) or None, primary_only=not all_rows)
    if csv_path:
        df.to_csv(csv_path, index=False)
    if len(df) == 0:
        click.echo(f"no object within {radius:g} arcsec of ({ra}, {dec})", err=True)
        return
    bands = sorted({c.split("_", 1)[0] for c in df.columns if c.endswith("_psf_flux") and len(c.split("_")[0]) == 1})
    cols = ["object_id", "ra", "dec", "sep_arcsec", *_DEFAULT_COLUMNS]
    cols += [f"{b}_{k}" for b in bands for k in ("psf_flux", "psf_flux_err", "cmodel_flux")]
    _echo_table(df, cols)
    click.echo(f"{len(df)} object(s)", err=True)


@objects_group.command("lightcurve")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("object_id", type=int, required=False)
@click.option("--ra", type=float, default=None, help="Instead of OBJECT_ID: the object nearest (--ra, --dec), deg.")
@click.option("--dec", type=float, default=None, help="Declination for --ra, deg.")
@click.option("--radius", type=float, default=1.0, show_default=True, help="Search radius for --ra/--dec, arcsec.")
@click.option("--band", default=None, help="Only this band.")
@click.option("--run", "-r", multiple=True, metavar="RUN", help="Run(s) to search (default: all).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Write the points to CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Save a PNG plot.")
def objects_lightcurve(repo, object_id, ra, dec, radius, band, run, csv_path, plot_path):
    """The forced-photometry light curve of OBJECT_ID, or of the primary object nearest
    (--ra, --dec): calexp and difference-image PSF fluxes, nJy.

    \b
    Examples:
      procsky objects lightcurve REPO 16777217 --band r
      procsky objects lightcurve REPO --ra 150.01 --dec 2.003 --plot lc.png --csv lc.csv
    """
    from procsky.errors import ProcskyValueError
    from procsky.pipeline.catalogue import find_objects, light_curve
    from procsky.repo import Repo

    r = Repo(repo)
    runs = list(run) or None
    if object_id is None:
        if ra is None or dec is None:
            raise ProcskyValueError("give an OBJECT_ID, or --ra and --dec of the object")
        near = find_objects(r, ra, dec, radius, run=runs, columns=["is_primary"])
        if len(near) == 0:
            raise ProcskyValueError(f"no primary object within {radius:g} arcsec of ({ra}, {dec})")
        object_id = int(near["object_id"].iloc[0])
        click.echo(f"object {object_id} at {near['sep_arcsec'].iloc[0]:.2f} arcsec", err=True)
    lc = light_curve(r, object_id, run=runs, band=band)
    if csv_path:
        lc.to_csv(csv_path, index=False)
    _echo_table(
        lc, ["mjd", "band", "visit", "detector", "psf_flux", "psf_flux_err", "psf_diff_flux", "psf_diff_flux_err"]
    )
    click.echo(f"{len(lc)} point(s)", err=True)
    if plot_path:
        _plot(lc, object_id, plot_path)
        click.echo(f"plot: {plot_path}", err=True)


def _plot(lc, object_id, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for b, g in lc.groupby("band"):
        axes[0].errorbar(g["mjd"], g["psf_flux"], g["psf_flux_err"], fmt="o", ms=4, label=b)
        axes[1].errorbar(g["mjd"], g["psf_diff_flux"], g["psf_diff_flux_err"], fmt="o", ms=4, label=b)
    axes[0].set_ylabel("calexp PSF flux [nJy]")
    axes[1].set_ylabel("difference PSF flux [nJy]")
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set_xlabel("MJD")
    axes[0].legend()
    axes[0].set_title(f"object {object_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
