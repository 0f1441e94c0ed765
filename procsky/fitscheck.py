"""Is a FITS file as long as its headers say? (no pixels read, no procsky imports but errors)

Lives outside :mod:`procsky.instruments` so that :mod:`procsky.exposure` can use it without
importing every camera module (which import the exposure).
"""

from __future__ import annotations

from pathlib import Path

from procsky.errors import ProcskyFileError

__all__ = ["check_fits_complete"]

_FITS_BLOCK = 2880


def _header_values(fh, size: int, start: int, path: Path, index: int) -> tuple[dict, int] | None:
    """Keyword values of the header at ``start`` and the offset just past it.

    ``None`` when no HDU starts there (end of file, or bytes that are not a FITS header).
    """
    fh.seek(start)
    values: dict[str, str] = {}
    pos = start
    while True:
        block = fh.read(_FITS_BLOCK)
        if pos == start and not block.startswith(b"SIMPLE  =" if index == 0 else b"XTENSION="):
            return None  # not an HDU: end of the file, or trailing bytes astropy ignores
        if len(block) < _FITS_BLOCK:
            raise ProcskyFileError(
                f"{path} is truncated or corrupt: it has {size} bytes and ends inside the header of HDU "
                f"#{index}, which starts at byte {start}; copy, download or write the file again"
            )
        pos += _FITS_BLOCK
        for i in range(0, _FITS_BLOCK, 80):
            card = block[i : i + 80]
            key = card[:8].decode("ascii", "replace").strip()
            if key == "END":
                return values, pos
            if card[8:10] == b"= ":
                values[key] = card[10:].split(b"/")[0].decode("ascii", "replace").strip().strip("'").strip()


def _data_bytes(values: dict) -> int:
    """Bytes of the data of an HDU, from its header (FITS standard 4.4.1)."""

    def num(key, default):
        try:
            return int(float(values.get(key, default)))
        except ValueError:
            return default

    naxis = num("NAXIS", 0)
    if naxis <= 0:
        return 0
    dims = [num(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
    if dims[0] == 0 and values.get("GROUPS") == "T":  # random groups
        dims = dims[1:]
    n = 1
    for d in dims:
        n *= d
    return abs(num("BITPIX", 8)) // 8 * num("GCOUNT", 1) * (num("PCOUNT", 0) + n)


def check_fits_complete(path: str | Path) -> None:
    """Refuse a FITS file shorter than its headers say (a cut copy or an interrupted download).

    Walks the headers only (no pixels are read). Every instrument's ingest calls it, so
    a truncated file is reported as such instead of as a missing HDU, a bad shape or an
    unknown camera. Gzipped files are left to astropy (their size is known only after
    decompression); files that are not FITS pass (the caller says what they are not).

    Raises
    ------
    ProcskyFileError
        Naming the file, its size, the size its headers describe and the HDU cut.
    """
    path = Path(path)
    if path.is_dir():
        raise ProcskyFileError(f"{path} is a directory, not a FITS file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            return
        start, index = 0, 0
        while start < size:
            found = _header_values(fh, size, start, path, index)
            if found is None:
                return
            values, data_start = found
            nbytes = _data_bytes(values)
            end = data_start + -(-nbytes // _FITS_BLOCK) * _FITS_BLOCK
            if data_start + nbytes > size:
                name = values.get("EXTNAME", "PRIMARY" if index == 0 else "")
                raise ProcskyFileError(
                    f"{path} is truncated or corrupt: it has {size} bytes, but its headers describe at "
                    f"least {end} (HDU #{index}{f' {name}' if name else ''} has {nbytes} bytes of data "
                    f"from byte {data_start}); copy, download or write the file again"
                )
            start, index = end, index + 1
