"""Register camera files in a repository.

Ingest reads every file first and only then writes: a bad file among many (not FITS,
truncated, no WCS, wrong camera) stops the ingest with a clear error before anything is
registered. Datasets already registered in the target run are skipped, so re-running an
ingest is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from procsky.errors import ProcskyError, ProcskyFileError, ProcskyValueError
from procsky.instruments.base import IngestItem, check_fits_complete, get_instrument
from procsky.repo.registry import RecordConflictError

__all__ = ["ingest_files", "default_run", "IngestReport"]


def default_run(instrument: str) -> str:
    """The run ingested data go to when none is given (LSST style ``<instrument>/raw``)."""
    return f"{instrument}/raw"


class IngestReport(list):
    """The datasets ingested (``DatasetRef`` s), with ``skipped`` data IDs already present."""

    def __init__(self, refs=(), skipped=()):
        super().__init__(refs)
        self.skipped = list(skipped)


def _read_all(inst, files: Sequence[Path], progress: bool) -> list[tuple[Path, list[IngestItem]]]:
    from tqdm.auto import tqdm

    out = []
    for path in tqdm(files, desc="reading", unit="file", disable=not progress or len(files) < 2):
        try:
            # Every instrument: a truncated file is named as such, not as whatever part of
            # it the loader found missing first.
            check_fits_complete(path)
            out.append((path, inst.ingest_file(path)))
        except ProcskyError as e:
            # Name the file in the message, keep the class so callers can tell errors apart.
            msg = str(e) if str(path.name) in str(e) else f"{path}: {e}"
            raise type(e)(msg) from e
    return out


def _visit_source(item: IngestItem) -> str:
    meta = getattr(item.obj, "metadata", None) or {}
    return str(meta.get("visit_source", ""))


def _visit_hint(inst, read, element: str) -> str:
    """The way out when a visit was derived from a shared keyword (generic: DATE-OBS)."""
    if element != "visit" or not getattr(inst, "accepts_visit_key", False):
        return ""
    sources = {_visit_source(it) for _, items in read for it in items} - {""}
    return (
        f" (visits were taken from {', '.join(sorted(sources)) or 'the headers'}); if these are different exposures, "
        "take the visit from a keyword that tells them apart: visit_key='EXPID' (CLI --visit-key EXPID)"
    )


def _check_distinct(inst, read: list[tuple[Path, list[IngestItem]]]) -> None:
    """Two items with the same dataset type and data ID: stop before anything is written.

    Frames sharing ``DATE-OBS`` (the visit of a ``generic`` frame without an exposure
    number) land here; the message names the option that separates them.
    """
    seen: dict[tuple, tuple[Path, IngestItem]] = {}
    for path, items in read:
        for item in items:
            key = (item.dataset_type, tuple(sorted(item.data_id.items())))
            if key in seen:
                first, prev = seen[key]
                source = _visit_source(item) or _visit_source(prev)
                msg = (
                    f"{first} and {path} give the same {item.dataset_type} data ID {item.data_id}"
                    + (f" (visit from {source})" if source else "")
                    + "; ingest refuses to register one over the other."
                )
                if getattr(inst, "accepts_visit_key", False) and "visit" in item.data_id:
                    msg += (
                        " If they are different exposures, take the visit from a header keyword that tells them "
                        "apart: --visit-key KEY (Python: visit_key='KEY'), e.g. EXPID, FRAMENUM, OBSID or FILENAME."
                    )
                raise ProcskyValueError(msg)
            seen[key] = (path, item)


def ingest_files(
    repo,
    files: Iterable[str | Path],
    instrument: str,
    run: str | None = None,
    *,
    progress: bool = False,
    replace_records: bool = False,
    **options,
) -> IngestReport:
    """Ingest camera files into ``repo``.

    Parameters
    ----------
    repo : procsky.Repo
    files : iterable of path
        The files to ingest (for CP triplets, the ``_ooi_`` image files).
    instrument : str
        Instrument name (``generic``, ``decam-cp``, ``simcam`` ...).
    run : str, optional
        Output run; ``<instrument>/raw`` by default.
    progress : bool
        Show progress bars.
    replace_records : bool
        Overwrite dimension records (visit, detector ...) that differ from the ones
        already registered (say, after correcting the headers); by default such a
        difference stops the ingest before any dataset is written.
    **options
        Options of the instrument, e.g. for ``generic`` (:class:`~procsky.instruments.generic.GenericIngestConfig`,
        ``docs/ingest.md``): ``band_map={"Halpha": "N656"}``, ``mask_pattern="{stem}_mask.fits"``,
        ``weight_pattern="{stem}.weight.fits"``, ``weight_kind="rms"``, ``visit_key="EXPID"``,
        ``zero_point_key``, ``zero_point_unit``. An instrument that takes none refuses them.

    Returns
    -------
    IngestReport
        A list of the new ``DatasetRef`` s; ``.skipped`` lists data IDs already present.
    """
    from tqdm.auto import tqdm

    inst = get_instrument(instrument, **options)
    paths = [Path(f) for f in files]
    if not paths:
        raise ProcskyFileError("no files to ingest")
    missing = [str(f) for f in paths if not f.exists()]
    if missing:
        raise ProcskyFileError(
            f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    run = run or default_run(instrument)
    read = _read_all(inst, paths, progress)
    _check_distinct(inst, read)

    records: dict[str, dict[str, dict]] = {}
    for _, items in read:
        for item in items:
            for element, recs in item.records.items():
                for rec in recs:
                    records.setdefault(element, {})[repr(sorted(rec.items()))] = rec
    order = ["instrument", "band", "physical_filter", "detector", "visit"]
    for element in sorted(records, key=lambda e: order.index(e) if e in order else len(order)):
        try:
            repo.add_dimension_records(element, list(records[element].values()), replace=replace_records)
        except RecordConflictError as e:
            raise e.with_fix(
                f"the files describe {element} {e.key} differently from the repository; pass "
                "replace_records=True to overwrite the registered record" + _visit_hint(inst, read, element)
            ) from e

    refs, skipped = [], []
    runs = repo.runs() if callable(repo.runs) else repo.runs
    run_exists = run in runs
    total = sum(len(items) for _, items in read)
    with tqdm(total=total, desc="ingesting", unit="dataset", disable=not progress) as bar:
        for _, items in read:
            for item in items:
                if run_exists and repo.find(item.dataset_type, item.data_id, run=run) is not None:
                    skipped.append(item.data_id)
                else:
                    refs.append(repo.put(item.obj, item.dataset_type, item.data_id, run=run))
                bar.update(1)
    return IngestReport(refs, skipped)
