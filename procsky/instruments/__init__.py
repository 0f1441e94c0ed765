"""Camera definitions and ingest.

``get_instrument(name)`` returns a camera definition; ``ingest_files(repo, files,
instrument=...)`` registers files in a repository.
"""

from procsky.instruments.base import (
    DetectorSpec,
    IngestItem,
    Instrument,
    get_instrument,
    instrument_names,
    register_instrument,
)
from procsky.instruments.ingest import ingest_files

__all__ = [
    "Instrument",
    "IngestItem",
    "DetectorSpec",
    "register_instrument",
    "get_instrument",
    "instrument_names",
    "ingest_files",
]
