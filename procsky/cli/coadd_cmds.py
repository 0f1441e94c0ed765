"""``procsky skymap ...`` and ``procsky export``: sky maps and FITS export of exposures."""

from __future__ import annotations

import click

from procsky.cli import main


@main.group("skymap")
def skymap_group():
    """Define and inspect sky maps (tracts and patches)."""


@skymap_group.command("register")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("name")
@click.option("--kind", type=click.Choice(["rings", "discrete"]), default="rings", show_default=True)
@click.option("--center", "centers", multiple=True, help="Tract centre 'RA,DEC' in degrees (discrete; repeat).")
@click.option("--radius", type=float, default=0.5, show_default=True, help="Half-side of discrete tracts, deg.")
@click.option("--pixel-scale", type=float, default=0.2, show_default=True, help="arcsec/pixel.")
@click.option("--patch-inner", type=int, default=4000, show_default=True, help="Patch inner side, pixels.")
@click.option("--patch-border", type=int, default=100, show_default=True, help="Patch border, pixels.")
@click.option("--num-rings", type=int, default=120, show_default=True, help="Declination rings (rings).")
def skymap_register(repo, name, kind, centers, radius, pixel_scale, patch_inner, patch_border, num_rings):
    """Register sky map NAME in REPO (idempotent; refuses a different map of the same name).

    \b
    Examples:
      procsky skymap register repo hsc_rings
      procsky skymap register repo tc3 --kind discrete --center 244.78,12.07 --radius 0.02
    """
    from procsky.errors import ProcskyValueError
    from procsky.repo import Repo
    from procsky.skymap import SkyMap, SkyMapConfig, register_skymap

    parsed = []
    for c in centers:
        try:
            ra, dec = (float(v) for v in c.split(","))
        except ValueError:
            raise ProcskyValueError(f"--center {c!r} is not 'RA,DEC' in degrees, e.g. --center 244.78,12.07") from None
        parsed.append((ra, dec))
    try:
        cfg = SkyMapConfig(kind=kind, centers=tuple(parsed), radius=radius, pixel_scale=pixel_scale,
                           patch_inner=patch_inner, patch_border=patch_border, num_rings=num_rings)
    except ValueError as e:
        raise ProcskyValueError(f"invalid sky map options: {e}") from None
    sm = SkyMap(cfg, name=name)
    n = register_skymap(Repo(repo), sm, tracts=(kind == "discrete"))
    click.echo(f"{'registered' if n else 'already registered'}: {sm!r}")


@skymap_group.command("show")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("name")
@click.option("--ra", type=float, default=None, help="Show the tract/patch of this RA (deg) ...")
@click.option("--dec", type=float, default=None, help="... and Dec (deg).")
def skymap_show(repo, name, ra, dec):
    """Describe sky map NAME, or the tract and patches holding (--ra, --dec)."""
    from procsky.repo import Repo
    from procsky.skymap import load_skymap

    sm = load_skymap(Repo(repo), name)
    click.echo(repr(sm))
    if ra is not None and dec is not None:
        for tract, patches in sm.tracts_patches_for_sky([ra], [dec]).items():
            t = sm.tract(tract)
            click.echo(f"tract {tract}: centre ({t.ra:.5f}, {t.dec:.5f}) {t.box.nx}x{t.box.ny} px, "
                       f"{t.n_patches[0]}x{t.n_patches[1]} patches; patches {patches}")


@main.command("export")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("dataset_type")
@click.option("--where", default=None, help="Data-ID expression selecting one dataset, e.g. \"tract=0 AND patch=3\".")
@click.option("--run", default=None, help="Run or chain to search (default: all, newest first).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Output FITS file (.fits/.fits.gz).")
def export(repo, dataset_type, where, run, out):
    """Export one exposure dataset (coadd, warp, calexp ...) of REPO to a FITS file.

    The file is LSST-style multi-extension FITS (IMAGE, MASK, VARIANCE with the WCS, mask
    planes as MP_* keywords), readable by DS9 and astropy.

    \b
    Example:
      procsky export repo coadd --where "tract=0 AND patch=3 AND band='r'" --out coadd.fits
    """
    from procsky.errors import ProcskyValueError
    from procsky.exposure import Exposure
    from procsky.repo import Repo

    r = Repo(repo)
    refs = r.query(dataset_type, where, run=run)
    seen, unique = set(), []
    for ref in refs:  # first run wins per data ID
        key = tuple(sorted(ref.data_id.items()))
        if key not in seen:
            seen.add(key)
            unique.append(ref)
    if not unique:
        raise ProcskyValueError(f"no {dataset_type} matches --where {where!r}; list them with "
                                f"`procsky query {repo} {dataset_type}`")
    if len(unique) > 1:
        ids = "; ".join(str(u.data_id) for u in unique[:5])
        raise ProcskyValueError(f"{len(unique)} {dataset_type} datasets match ({ids} ...); narrow --where to one")
    obj = r.get(unique[0])
    if not isinstance(obj, Exposure):
        raise ProcskyValueError(f"{dataset_type} is not an exposure; only exposures export to FITS")
    obj.write(out)
    click.echo(f"wrote {dataset_type} {unique[0].data_id} to {out}")
