"""``procsky sim``: draw a simulated survey with GalSim (see :mod:`procsky.sim`)."""

from __future__ import annotations

import click

from procsky.cli import main


def _int_list(text: str | None, what: str):
    """Parse '1,3,5-8' into [1, 3, 5, 6, 7, 8]."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of numbers like '1,3,5-8'", param_hint=what) from None
    return out


@main.command("sim")
@click.argument("recipe")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--seed", type=int, default=None, help="Override the recipe's random seed.")
@click.option(
    "--mode",
    type=click.Choice(["calibrated", "raw"]),
    default="calibrated",
    show_default=True,
    help="calibrated: image/variance/mask per detector; raw: overscan, bias, dark, flat + calibs.",
)
@click.option(
    "--scheduler",
    type=click.Choice(["processes", "threads", "sync"]),
    default="processes",
    show_default=True,
    help="dask local scheduler (GalSim holds the GIL: processes scale best).",
)
@click.option("--workers", "-j", type=int, default=None, help="Parallel workers (default: all CPUs).")
@click.option("--visits", default=None, help="Only these visits, e.g. '1,2,5-8'.")
@click.option("--detectors", default=None, help="Only these detectors, e.g. '0-3'.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sim(recipe, out, seed, mode, scheduler, workers, visits, detectors, no_progress):
    """Simulate a survey from RECIPE (tiny, small, medium, or a YAML file) into --out.

    \b
    Writes DIR/images/*.fits, DIR/calibs/ (raw mode), DIR/truth/*.parquet,
    DIR/refcat/refcat.parquet and DIR/recipe.yaml; ingest the images with
      procsky ingest REPO DIR/images/*.fits --instrument simcam
    The same recipe and seed give bit-identical files.
    """
    from procsky.sim import simulate

    res = simulate(
        recipe,
        out,
        seed=seed,
        mode=mode,
        scheduler=scheduler,
        workers=workers,
        visits=_int_list(visits, "--visits"),
        detectors=_int_list(detectors, "--detectors"),
        progress=not no_progress,
    )
    click.echo(
        f"wrote {len(res.images)} {('raw' if mode == 'raw' else 'calexp')} images"
        + (f", {len(res.calibs)} master calibrations (calibs/)" if res.calibs else "")
        + (f" and {len(res.calib_frames)} calibration exposures (calib_frames/)" if res.calib_frames else "")
        + f" of recipe {res.recipe.name!r} (seed {res.recipe.seed}, {res.n_objects} objects) to {res.out} "
        f"in {res.seconds:.1f} s"
    )
