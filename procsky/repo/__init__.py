"""The data repository (our Butler): a root folder of Zarr/Parquet/JSON files plus a SQL
registry (SQLite or PostgreSQL) of runs, dataset types, datasets and dimension records.

Public names: :class:`Repo`, :class:`DatasetRef`, :class:`PendingDataset`,
:func:`parse_expression` (data-ID expressions) and :class:`DatasetType`.
"""

from procsky.repo.butler import PendingDataset, Repo
from procsky.repo.dimensions import STANDARD_DATASET_TYPES, DatasetType
from procsky.repo.query import Expression, parse_expression
from procsky.repo.registry import DatasetRef, Registry

__all__ = [
    "Repo",
    "DatasetRef",
    "PendingDataset",
    "DatasetType",
    "Registry",
    "Expression",
    "parse_expression",
    "STANDARD_DATASET_TYPES",
]
