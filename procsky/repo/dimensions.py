"""The dimension universe: names, value types, element keys and standard dataset types.

Dimensions follow the LSST Butler's (``daf_butler`` ``dimensions.yaml``) in a reduced
form: instrument, physical_filter, band, detector, visit (= exposure here), skymap, tract,
patch. Other names may appear in data IDs; they are stored in the data-ID JSON and
queried through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from procsky.errors import ProcskyTypeError, ProcskyValueError
from procsky.repo.query import STANDARD_DIMENSION_TYPES

__all__ = [
    "DIMENSION_ORDER",
    "ELEMENT_KEYS",
    "IMPLIED",
    "STANDARD_DATASET_TYPES",
    "DatasetType",
    "canonical_data_id",
    "data_id_key",
    "data_id_path",
    "check_run_name",
]

#: Stable order of the standard dimensions, used for data-ID paths and displays.
DIMENSION_ORDER: tuple[str, ...] = (
    "instrument",
    "skymap",
    "tract",
    "patch",
    "band",
    "physical_filter",
    "visit",
    "detector",
)

#: Dimension keys that identify one record of each element.
ELEMENT_KEYS: dict[str, tuple[str, ...]] = {
    "instrument": ("instrument",),
    "band": ("band",),
    "physical_filter": ("instrument", "physical_filter"),
    "detector": ("instrument", "detector"),
    "visit": ("instrument", "visit"),
    "skymap": ("skymap",),
    "tract": ("skymap", "tract"),
    "patch": ("skymap", "tract", "patch"),
}

#: Dimensions a record of an element implies (a visit record knows its band), used to
#: fill the query columns of datasets whose data ID lacks them.
IMPLIED: dict[str, tuple[str, ...]] = {
    "visit": ("physical_filter", "band"),
    "physical_filter": ("band",),
}


@dataclass(frozen=True)
class DatasetType:
    """A named kind of dataset.

    Parameters
    ----------
    name : str
        E.g. ``"calexp"``.
    dimensions : tuple of str
        Dimensions every data ID of this type must give (more keys are allowed).
    storage_class : str or None
        ``"Exposure"``, ``"DataFrame"`` or ``"StructuredData"``; ``None`` accepts any and
        records the one inferred from each object.
    """

    name: str
    dimensions: tuple[str, ...]
    storage_class: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimensions": list(self.dimensions),
            "storage_class": self.storage_class,
        }


_VD = ("instrument", "visit", "detector")
_PATCH = ("skymap", "tract", "patch")

STANDARD_DATASET_TYPES: dict[str, DatasetType] = {
    dt.name: dt
    for dt in [
        DatasetType("raw", _VD, "Exposure"),
        DatasetType("calexp", _VD, "Exposure"),
        DatasetType("src", _VD, "DataFrame"),
        DatasetType("isr_exposure", _VD, "Exposure"),
        DatasetType("calibrate_summary", _VD, "StructuredData"),
        DatasetType("visit_photocalib", ("instrument", "visit"), "StructuredData"),
        # Calibrations: per detector; a visit, physical_filter or band key may be added.
        DatasetType("bias", ("instrument", "detector"), "Exposure"),
        DatasetType("dark", ("instrument", "detector"), "Exposure"),
        DatasetType("flat", ("instrument", "detector"), "Exposure"),
        # Individual raw calibration exposures (visit = exposure id; flats add the filter),
        # combined into the masters above by make_master_bias / _dark / _flat.
        DatasetType("bias_frame", _VD, "Exposure"),
        DatasetType("dark_frame", _VD, "Exposure"),
        DatasetType("flat_frame", _VD, "Exposure"),
        DatasetType("warp", ("instrument", "visit") + _PATCH, "Exposure"),
        DatasetType("coadd", _PATCH + ("band",), "Exposure"),
        DatasetType("template", _PATCH + ("band",), "Exposure"),
        DatasetType("object", _PATCH, "DataFrame"),
        DatasetType("forced_source", _PATCH, "DataFrame"),  # per patch: the forced_phot task
        DatasetType("object_summary", _PATCH, "StructuredData"),
        DatasetType("diff", _VD, "Exposure"),
        DatasetType("dia_source", _VD, "DataFrame"),
        DatasetType("dia_object", ("skymap", "tract"), "DataFrame"),
        DatasetType("dia_forced_source", _VD, "DataFrame"),
        DatasetType("metrics", (), None),
        DatasetType("summary", (), None),
        DatasetType("refcat", (), "DataFrame"),
    ]
}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


def check_name(kind: str, name: Any) -> str:
    """Validate a dataset type or dimension name (a Python-identifier-like word)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProcskyValueError(
            f"{kind} name {name!r} is not valid; use letters, digits and underscores, "
            "starting with a letter (e.g. 'calexp', 'visit')"
        )
    return name


def check_run_name(run: Any) -> str:
    """Validate a run or chain name: words of ``[A-Za-z0-9_.-]`` joined by ``/``."""
    if not isinstance(run, str) or not _RUN_RE.match(run) or ".." in run.split("/"):
        raise ProcskyValueError(
            f"run name {run!r} is not valid; use letters, digits, '_', '.', '-' and '/' "
            "between words (e.g. 'drp/run1'), without '..' or a leading '/'"
        )
    return run


def _plain_value(key: str, value: Any) -> Any:
    """Convert numpy scalars to Python ones and check standard-dimension types."""
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, (str, bytes)):
        try:
            value = item()
        except (TypeError, ValueError):
            pass
    want = STANDARD_DIMENSION_TYPES.get(key)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ProcskyTypeError(f"data ID value {key}={value!r} must be an integer (e.g. {key}=12)")
    elif want is str:
        if not isinstance(value, str):
            raise ProcskyTypeError(f"data ID value {key}={value!r} must be a string (e.g. {key}='g')")
    elif not isinstance(value, (str, int, float, bool)):
        raise ProcskyTypeError(
            f"data ID value {key}={value!r} has type {type(value).__name__}; data-ID "
            "values must be str, int, float or bool"
        )
    return value


def canonical_data_id(data_id: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a plain-typed copy of ``data_id`` in stable dimension order."""
    if data_id is None:
        return {}
    if not isinstance(data_id, Mapping):
        raise ProcskyTypeError(
            f"a data ID must be a dict such as {{'visit': 12, 'detector': 3}}, got {type(data_id).__name__}"
        )
    out: dict[str, Any] = {}
    for key in sort_dimensions(data_id.keys()):
        check_name("dimension", key)
        out[key] = _plain_value(key, data_id[key])
    return out


def sort_dimensions(names) -> list[str]:
    """Standard dimensions in :data:`DIMENSION_ORDER`, then any others alphabetically."""
    names = list(names)
    std = [d for d in DIMENSION_ORDER if d in names]
    return std + sorted(n for n in names if n not in DIMENSION_ORDER)


def data_id_key(data_id: Mapping[str, Any]) -> str:
    """Canonical text of a data ID (sorted compact JSON): the registry's uniqueness key."""
    return json.dumps(dict(data_id), sort_keys=True, separators=(",", ":"))


def data_id_path(data_id: Mapping[str, Any]) -> str:
    """Relative path of a data ID, e.g. ``instrument=simcam/visit=12/detector=3``.

    Values are percent-quoted so that any string is one safe path component.
    """
    if not data_id:
        return "_"
    # Keys implied by another key of the same data ID (a visit implies its band and
    # physical filter) add nothing to identity; leaving them out keeps paths short and
    # free of long filter names such as DECam's "z DECam SDSS c0004 9260.0 1520.0".
    implied = {k for key in data_id for k in IMPLIED.get(key, ())}
    parts = []
    for key in sort_dimensions(k for k in data_id.keys() if k not in implied):
        value = data_id[key]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key}={quote(text, safe='-_.,+@')}")
    return "/".join(parts)
