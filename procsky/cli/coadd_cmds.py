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
        cfg = SkyMapConfig(
            kind=kind,
            centers=tuple(parsed),
            radius=radius,
            pixel_scale=pixel_scale,
            patch_inner=patch_inner,
            patch_border=patch_border,
            num_rings=num_rings,
        )
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
            click.echo(
                f"tract {tract}: centre ({t.ra:.5f}, {t.dec:.5f}) {t.box.nx}x{t.box.ny} px, "
                f"{t.n_patches[0]}x{t.n_patches[1]} patches; patches {patches}"
            )


def _ints(text: str, n: int, option: str, example: str) -> list[int]:
    from procsky.errors import ProcskyValueError

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise ProcskyValueError(f"{option} {text!r} is not {n} comma-separated integers, e.g. {option} {example}")
    return values


def _sky_box(exp, center: str, size: str) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of side ``size`` (pixels or an angle) centred on 'RA,DEC'."""
    import math

    import astropy.units as u

    from procsky.errors import ProcskyValueError
    from procsky.wcs import pixel_scale

    try:
        ra, dec = (float(v) for v in center.split(","))
    except ValueError:
        raise ProcskyValueError(f"--center {center!r} is not 'RA,DEC' in degrees, e.g. --center 150.01,2.02") from None
    if exp.wcs is None:
        raise ProcskyValueError("this exposure has no WCS: give the cut-out in pixels with --bbox")
    x, y = (float(v) for v in exp.sky_to_pixel(ra, dec))
    ny, nx = exp.shape
    if not (math.isfinite(x) and math.isfinite(y)) or not (-0.5 <= x < nx - 0.5 and -0.5 <= y < ny - 0.5):
        raise ProcskyValueError(
            f"--center {center} is outside this exposure (pixel x={x:.1f}, y={y:.1f} of {nx} x {ny})"
        )
    try:
        n = float(size)  # a plain number: pixels
    except ValueError:
        try:
            angle = u.Quantity(size)
            n = angle.to_value(u.arcsec) / pixel_scale(exp.wcs, x, y)
        except (TypeError, ValueError, u.UnitsError):
            raise ProcskyValueError(
                f"--size {size!r} is neither a number of pixels nor an angle; e.g. --size 200 or --size 30arcsec"
            ) from None
    n = int(round(n))
    if n < 1:
        raise ProcskyValueError(f"--size {size} is less than one pixel")
    x0, y0 = int(math.floor(x + 0.5)) - n // 2, int(math.floor(y + 0.5)) - n // 2
    return x0, y0, x0 + n, y0 + n


def cutout_box(
    exp, *, bbox: str | None = None, center: str | None = None, size: str | None = None, trim: bool = False
) -> tuple[int, int, int, int] | None:
    """The box ``(x0, y0, x1, y1)`` (array pixels, ends excluded) that ``procsky export`` writes.

    ``None`` means the whole exposure. The box is clipped to the exposure; ``trim`` then
    shrinks it to the pixels with data (:meth:`procsky.exposure.Exposure.data_bbox`).
    """
    from procsky.errors import ProcskyValueError

    if bbox is not None and center is not None:
        raise ProcskyValueError("give either --bbox (pixels) or --center with --size (sky), not both")
    if (center is None) != (size is None):
        raise ProcskyValueError("--center and --size go together, e.g. --center 150.01,2.02 --size 30arcsec")
    ny, nx = exp.shape
    box = None
    if bbox is not None:
        box = _ints(bbox, 4, "--bbox", "100,200,400,500")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ProcskyValueError(f"--bbox {bbox}: X1 must exceed X0 and Y1 Y0 (X1, Y1 are excluded)")
    elif center is not None:
        assert size is not None  # checked above: --center and --size go together
        box = list(_sky_box(exp, center, size))
    if box is not None:
        asked = tuple(box)
        box = [max(box[0], 0), max(box[1], 0), min(box[2], nx), min(box[3], ny)]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ProcskyValueError(f"the cut-out {asked} (x0, y0, x1, y1) misses this {nx} x {ny} exposure")
    if trim:
        sub = exp if box is None else exp[box[1] : box[3], box[0] : box[2]]
        data = sub.data_bbox()
        if data is None:
            raise ProcskyValueError("--trim: no pixel of the cut-out has data (all NaN or NO_DATA)")
        ox, oy = (0, 0) if box is None else (box[0], box[1])
        box = [data[0] + ox, data[1] + oy, data[2] + ox, data[3] + oy]
    return None if box is None else (box[0], box[1], box[2], box[3])


@main.command("export")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("dataset_type")
@click.option("--where", default=None, help='Data-ID expression selecting one dataset, e.g. "tract=0 AND patch=3".')
@click.option("--run", default=None, help="Run or chain to search (default: all, newest first).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Output FITS file (.fits/.fits.gz).")
@click.option(
    "--bbox",
    default=None,
    metavar="X0,Y0,X1,Y1",
    help="Cut-out in pixels of the dataset: 0-based, X1 and Y1 excluded (Python's exp[y0:y1, x0:x1]).",
)
@click.option("--center", default=None, metavar="RA,DEC", help="Centre of a cut-out, degrees (with --size).")
@click.option(
    "--size",
    default=None,
    metavar="N|ANGLE",
    help="Side of the --center cut-out: pixels (200) or an angle (30arcsec, 1.5arcmin).",
)
@click.option(
    "--trim",
    is_flag=True,
    help="Shrink the image (or the cut-out) to the box of pixels with data (finite, not NO_DATA).",
)
def export(repo, dataset_type, where, run, out, bbox, center, size, trim):
    """Export one exposure dataset (coadd, warp, calexp ...) of REPO to a FITS file.

    The file is LSST-style multi-extension FITS (IMAGE, MASK, VARIANCE with the WCS, mask
    planes as MP_* keywords), readable by DS9 and astropy. A cut-out keeps the WCS (CRPIX
    shifted) and records its offset in the parent as LTV1/LTV2.

    \b
    Examples:
      procsky export repo coadd --where "tract=0 AND patch=3 AND band='r'" --out coadd.fits
      procsky export repo coadd --where "tract=0 AND patch=3 AND band='r'" --trim --out data.fits
      procsky export repo coadd --where "..." --center 150.01,2.02 --size 30arcsec --out stamp.fits
      procsky export repo calexp --where "visit=3 AND detector=1" --bbox 100,200,400,500 --out cut.fits
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
        raise ProcskyValueError(
            f"no {dataset_type} matches --where {where!r}; list them with `procsky query {repo} {dataset_type}`"
        )
    if len(unique) > 1:
        ids = "; ".join(str(u.data_id) for u in unique[:5])
        raise ProcskyValueError(f"{len(unique)} {dataset_type} datasets match ({ids} ...); narrow --where to one")
    obj = r.get(unique[0])
    if not isinstance(obj, Exposure):
        raise ProcskyValueError(f"{dataset_type} is not an exposure; only exposures export to FITS")
    box = cutout_box(obj, bbox=bbox, center=center, size=size, trim=trim)
    what = ""
    if box is not None:
        x0, y0, x1, y1 = box
        ny, nx = obj.shape
        obj = obj[y0:y1, x0:x1]
        what = f" pixels x {x0}:{x1}, y {y0}:{y1} (of {nx} x {ny})"
    obj.write(out)
    click.echo(f"wrote {dataset_type} {unique[0].data_id}{what} to {out}")
