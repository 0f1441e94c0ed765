"""Storage classes: how each kind of in-memory object is written to and read from files.

=================  =========  =====================================================
storage class      extension  in memory
=================  =========  =====================================================
``Exposure``       ``.zarr``  :class:`procsky.exposure.Exposure` (read back lazily)
``DataFrame``      ``.parquet``  pandas DataFrame or astropy Table (read as pandas;
                              column units in the Parquet schema metadata and in
                              ``df.attrs["units"]``; astropy's ``Table.read`` sees
                              them too)
``StructuredData`` ``.json``  dict of JSON-able values (numpy scalars/arrays allowed)
=================  =========  =====================================================

Each class can ``write`` an object, ``read`` it back, and ``verify`` a written copy (re-open
it and check its structure); :func:`checksum` hashes a file or a whole directory tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from procsky.errors import ProcskyFileError, ProcskyKeyError, ProcskyTypeError

__all__ = [
    "StorageClass",
    "ExposureStorage",
    "DataFrameStorage",
    "StructuredDataStorage",
    "STORAGE_CLASSES",
    "get_storage_class",
    "infer_storage_class",
    "checksum",
    "fsync_tree",
]

_CHUNK = 1 << 20


def checksum(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory tree (relative paths, sizes and contents).

    Returns
    -------
    str
        ``"sha256:<hex digest>"``.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(path).as_posix()
            h.update(rel.encode())
            h.update(b"\0")
            h.update(str(f.stat().st_size).encode())
            h.update(b"\0")
            _hash_file(h, f)
    elif path.is_file():
        _hash_file(h, path)
    else:
        raise ProcskyFileError(f"cannot checksum {path}: it does not exist")
    return "sha256:" + h.hexdigest()


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder of a tree, to stable storage."""
    path = Path(path)
    items = [path]
    if path.is_dir():
        items = sorted(path.rglob("*"), key=lambda p: -len(p.parts)) + [path]
    for p in items:
        flags = os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0)
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)


class StorageClass:
    """How one kind of object is stored. Subclasses set ``name`` and ``extension``."""

    name: str = ""
    extension: str = ""

    def accepts(self, obj: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, obj: Any, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, path: Path) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def verify(self, path: Path) -> None:
        """Re-open a written copy; raise :class:`ProcskyFileError` if it is unreadable."""
        try:
            self.read(path)
        except Exception as exc:  # any failure to re-open means a bad write
            raise ProcskyFileError(
                f"{self.name} written to {path} cannot be read back ({exc}); the disk may "
                "be full or the object not serialisable"
            ) from exc

    def __repr__(self) -> str:
        return f"<StorageClass {self.name} ({self.extension})>"


class ExposureStorage(StorageClass):
    """A :class:`procsky.exposure.Exposure` as a Zarr v3 group (``Exposure.write``).

    Lazy planes (and extra planes such as a coadd's ``n_inputs``) are computed and written
    in batches of whole storage chunks (:func:`procsky._dask.store_planes`): this is how the
    executor writes warps, coadds and differences, with memory bounded by one batch.
    """

    name = "Exposure"
    extension = ".zarr"

    @staticmethod
    def _cls():
        try:
            from procsky.exposure import Exposure
        except ImportError:  # the data model not yet importable: accept nothing
            return None
        return Exposure

    def accepts(self, obj: Any) -> bool:
        cls = self._cls()
        return cls is not None and isinstance(obj, cls)

    def write(self, obj: Any, path: Path) -> None:
        obj.write(str(path))

    def read(self, path: Path) -> Any:
        cls = self._cls()
        if cls is None:
            raise ProcskyFileError(f"cannot read {path}: procsky.exposure is not importable in this install")
        return cls.read(str(path))

    def verify(self, path: Path) -> None:
        try:
            exp = self.read(path)
        except Exception as exc:
            raise ProcskyFileError(
                f"Exposure written to {path} cannot be read back ({exc}); the disk may be full"
            ) from exc
        shapes = {name: getattr(getattr(exp, name, None), "shape", None) for name in ("image", "variance", "mask")}
        if shapes["image"] is None or any(s is not None and s != shapes["image"] for s in shapes.values()):
            raise ProcskyFileError(f"Exposure written to {path} has inconsistent planes {shapes}; rewrite it")


class DataFrameStorage(StorageClass):
    """A table as one Parquet file (pyarrow); astropy units kept in the schema metadata."""

    name = "DataFrame"
    extension = ".parquet"

    def accepts(self, obj: Any) -> bool:
        # An object can only be a DataFrame/Table if its library is already imported:
        # looking in sys.modules spares a writer of dicts the import of pandas.
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(obj, pd.DataFrame):
            return True
        pa = sys.modules.get("pyarrow")
        if pa is not None and isinstance(obj, pa.Table):
            return True
        table = sys.modules.get("astropy.table")
        return table is not None and isinstance(obj, table.Table)

    @staticmethod
    def to_arrow(obj: Any):
        """Convert a DataFrame/astropy Table/pyarrow Table to a pyarrow Table with units."""
        import pandas as pd
        import pyarrow as pa

        units: dict[str, str] = {}
        descriptions: dict[str, str] = {}
        meta: dict[str, Any] = {}
        if isinstance(obj, pa.Table):
            table = obj
        elif isinstance(obj, pd.DataFrame):
            units = {str(k): str(v) for k, v in dict(obj.attrs.get("units", {})).items()}
            meta = dict(obj.attrs.get("meta", {}))
            plain = obj.copy(deep=False)
            plain.attrs = {}
            table = pa.Table.from_pandas(plain)
        else:  # astropy Table
            from astropy.table import Table

            assert isinstance(obj, Table)
            for name in obj.colnames:
                unit = obj[name].unit
                if unit is not None:
                    units[name] = unit.to_string()
                if obj[name].description:
                    descriptions[name] = str(obj[name].description)
            meta = dict(obj.meta)
            try:
                frame = obj.to_pandas(index=False)
            except ValueError as exc:
                raise ProcskyTypeError(
                    f"astropy Table cannot be stored as Parquet ({exc}); split "
                    "multidimensional columns into scalar columns first"
                ) from exc
            table = pa.Table.from_pandas(frame, preserve_index=False)
        fields = []
        for f in table.schema:
            if f.name in units:
                md = dict(f.metadata or {})
                md[b"unit"] = units[f.name].encode()
                f = f.with_metadata(md)
            fields.append(f)
        schema_md = dict(table.schema.metadata or {})
        if units:
            schema_md[b"procsky.units"] = json.dumps(units).encode()
        plain_meta: dict[str, Any] = {}
        if meta:
            try:
                text = json.dumps(meta, default=_json_default)
            except TypeError:
                pass  # non-JSON metadata is dropped, as astropy does for Parquet
            else:
                schema_md[b"procsky.meta"] = text.encode()
                plain_meta = json.loads(text)
        schema_md.update(_astropy_metadata(table, units, descriptions, plain_meta))
        schema = pa.schema(fields, metadata=schema_md)
        return pa.Table.from_arrays(table.columns, schema=schema)

    def write(self, obj: Any, path: Path) -> None:
        import pyarrow.parquet as pq

        pq.write_table(self.to_arrow(obj), str(path))

    def read(self, path: Path):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(path))
        except Exception as exc:
            raise ProcskyFileError(f"cannot read Parquet file {path} ({exc}); it may be truncated") from exc
        df = table.to_pandas()
        md = table.schema.metadata or {}
        units = json.loads(md[b"procsky.units"]) if b"procsky.units" in md else {}
        df.attrs["units"] = units
        if b"procsky.meta" in md:
            df.attrs["meta"] = json.loads(md[b"procsky.meta"])
        return df

    def verify(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(str(path))
            pq.read_table(str(path))
        except Exception as exc:
            raise ProcskyFileError(f"Parquet written to {path} cannot be read back ({exc})") from exc


def _astropy_metadata(table, units: dict, descriptions: dict, meta: dict) -> dict[bytes, bytes]:
    """Schema metadata in the form astropy's Parquet writer uses, so ``Table.read`` shows units.

    astropy (``astropy.io.misc.parquet``) keeps column units, descriptions and the table
    ``meta`` in an ECSV-style YAML header under ``table_meta_yaml`` (every column must be
    listed there), and the length of string columns under ``table::len::<name>``. The
    header is built with astropy's public ``astropy.table.meta.get_yaml_from_header`` from
    zero-length columns, so no data are copied. pandas and dask ignore these keys.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from astropy.table import Column
    from astropy.table.meta import get_yaml_from_header

    out: dict[bytes, bytes] = {}
    cols = []
    for f in table.schema:
        t = f.type
        is_text = pa.types.is_string(t) or pa.types.is_large_string(t)
        is_bytes = pa.types.is_binary(t) or pa.types.is_large_binary(t)
        if is_text or is_bytes:
            length = pc.max((pc.utf8_length if is_text else pc.binary_length)(table[f.name])).as_py()
            out[f"table::len::{f.name}".encode()] = str(max(int(length or 0), 1)).encode()
            dtype: Any = str if is_text else bytes
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            dtype = np.dtype(t.to_pandas_dtype())
        else:  # timestamps, lists ...: the YAML type is informative only, astropy reads arrow's
            dtype = object
        cols.append(
            Column(name=f.name, dtype=dtype, length=0, unit=units.get(f.name), description=descriptions.get(f.name))
        )
    try:
        lines = get_yaml_from_header({"cols": cols, "meta": meta} if meta else {"cols": cols})
    except Exception:  # a meta value YAML refuses: keep the units, drop the meta
        lines = get_yaml_from_header({"cols": cols})
    out[b"table_meta_yaml"] = "\n".join(lines).encode()
    return out


def _json_default(obj: Any):
    """JSON encoder for numpy scalars/arrays, paths, sets and astropy quantities."""
    item = getattr(obj, "item", None)
    tolist = getattr(obj, "tolist", None)
    if tolist is not None and getattr(obj, "ndim", 0) > 0:
        return tolist()
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class StructuredDataStorage(StorageClass):
    """A dict as a JSON file (numpy scalars and arrays converted to plain values)."""

    name = "StructuredData"
    extension = ".json"

    def accepts(self, obj: Any) -> bool:
        return isinstance(obj, dict)

    def write(self, obj: Any, path: Path) -> None:
        try:
            text = json.dumps(obj, default=_json_default, indent=1, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ProcskyTypeError(
                f"cannot store this dict as JSON ({exc}); keep values to str, numbers, "
                "bools, None, lists and dicts (numpy values are converted)"
            ) from exc
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def read(self, path: Path) -> dict:
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError) as exc:
            raise ProcskyFileError(f"cannot read JSON file {path} ({exc})") from exc


STORAGE_CLASSES: dict[str, StorageClass] = {
    sc.name: sc for sc in (StructuredDataStorage(), DataFrameStorage(), ExposureStorage())
}


def get_storage_class(name: str) -> StorageClass:
    """The storage class called ``name``."""
    try:
        return STORAGE_CLASSES[name]
    except KeyError:
        raise ProcskyKeyError(f"unknown storage class {name!r}; known: {', '.join(STORAGE_CLASSES)}") from None


def infer_storage_class(obj: Any) -> StorageClass:
    """The storage class for an in-memory object (Exposure, table or dict)."""
    for sc in STORAGE_CLASSES.values():
        if sc.accepts(obj):
            return sc
    raise ProcskyTypeError(
        f"cannot store an object of type {type(obj).__name__}; the repository stores "
        "procsky.exposure.Exposure (Zarr), pandas DataFrame / astropy Table (Parquet) and "
        "dict (JSON)"
    )
