"""The data repository (our Butler): files under a root folder plus a SQL registry.

Layout::

    <root>/procsky.yaml                        repository config (registry URL or SQLite)
    <root>/registry.sqlite3                     the default registry
    <root>/<run>/<dataset_type>/<data id path>.zarr|.parquet|.json

A dataset exists only when it is registered, and it is registered only after its files
are complete (DESIGN.md section 4):

1. write the object to a hidden temporary sibling (``.<name>.tmp-<token><ext>``),
2. verify it (re-open it; SHA-256 of the written files; optional fsync),
3. under the location's lock (SQLite's write lock, or a PostgreSQL advisory lock), refuse
   if the location is registered, remove an *unregistered* leftover at the final name (a
   crashed writer's) and rename the temporary into place (atomic on POSIX),
4. insert the registry row and commit.

``put`` does 3 and 4 in one transaction. ``write_pending`` stops after 3 and
``register`` does 4 later, possibly in the caller's transaction (the executor marks the
producing quantum done in the same commit), after checking that the file at the final
name is still the one renamed in step 3 (same inode).

A crash between any two steps leaves nothing registered (at worst an unregistered file,
which the next writer of that name replaces and ``Repo.orphans`` lists), or a complete
registered dataset.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from procsky._version import code_version
from procsky.errors import (
    ConflictError,
    ProcskyFileError,
    ProcskyKeyError,
    ProcskyTypeError,
    ProcskyValueError,
    RepoError,
)
from procsky.repo.dimensions import (
    STANDARD_DATASET_TYPES,
    DatasetType,
    canonical_data_id,
    check_name,
    check_run_name,
    data_id_path,
)
from procsky.repo.query import Expression
from procsky.repo.registry import DatasetRef, Registry, new_dataset_id
from procsky.repo.storage import (
    StorageClass,
    checksum,
    fsync_tree,
    get_storage_class,
    infer_storage_class,
)

__all__ = ["Repo", "PendingDataset", "CONFIG_NAME", "PAUSE_ENV"]

CONFIG_NAME = "procsky.yaml"
SQLITE_NAME = "registry.sqlite3"
REPO_FORMAT_VERSION = 1

#: Test hook: seconds to sleep between writing a dataset's files and registering it
#: (lets tests SIGKILL a writer at the worst moment).
PAUSE_ENV = "PROCSKY_REPO_PAUSE_BEFORE_REGISTER"


@dataclass
class PendingDataset:
    """A dataset whose files are complete at their final location but not yet registered.

    Made by :meth:`Repo.write_pending`; becomes a dataset with :meth:`Repo.register`.
    It pickles, so a worker may write and the client register.
    """

    id: str
    dataset_type: str
    run: str
    data_id: dict
    uri: str
    storage_class: str
    checksum: str
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the renamed file/folder
    provenance: dict = field(default_factory=dict)


class Repo:
    """A procsky data repository.

    Parameters
    ----------
    root : str or path-like
        The repository folder (made by :meth:`Repo.create` or ``procsky repo create``).

    Examples
    --------
    >>> repo = Repo.create("/tmp/demo-repo")                      # doctest: +SKIP
    >>> ref = repo.put({"n": 3}, "metrics", {"visit": 1}, "run1")  # doctest: +SKIP
    >>> repo.get("metrics", {"visit": 1})                          # doctest: +SKIP
    {'n': 3}
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        config_path = self.root / CONFIG_NAME
        if not self.root.exists():
            raise ProcskyFileError(
                f"no repository at {self.root}: the folder does not exist; create one with "
                f"`procsky repo create {self.root}`"
            )
        if not config_path.is_file():
            raise ProcskyFileError(
                f"{self.root} is not a procsky repository (no {CONFIG_NAME}); create one "
                f"with `procsky repo create {self.root}` or point at the repository root"
            )
        try:
            self.config = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ProcskyFileError(f"cannot read {config_path}: {exc}") from exc
        if int(self.config.get("format_version", 1)) > REPO_FORMAT_VERSION:
            raise RepoError(
                f"{self.root} was written by a newer procsky (format {self.config['format_version']}); upgrade procsky"
            )
        self.registry = Registry(self._registry_url(self.config.get("registry")))
        #: Flush dataset files to disk before they are renamed and registered (survives
        #: power loss, not only process crashes); ``fsync: true`` in procsky.yaml.
        self.fsync = bool(self.config.get("fsync", False))

    def _registry_url(self, configured: str | None) -> str:
        if not configured:
            return f"sqlite:///{self.root / SQLITE_NAME}"
        return str(configured)

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        registry: str | None = None,
        *,
        exist_ok: bool = False,
        fsync: bool = False,
    ) -> Repo:
        """Create a repository.

        Parameters
        ----------
        root : str or path-like
            Folder to create (may exist if empty).
        registry : str, optional
            SQLAlchemy URL of the registry database, e.g.
            ``postgresql+psycopg://user@host:5432/procsky``; default SQLite in the root.
        exist_ok : bool
            Return the existing repository instead of failing when ``root`` already is
            one.
        fsync : bool
            Flush each dataset's files to stable storage before registering it (costly
            on network file systems; protects against power loss, not just crashes).
        """
        root = Path(root).expanduser().absolute()
        config_path = root / CONFIG_NAME
        if config_path.exists():
            if exist_ok:
                return cls(root)
            raise ProcskyFileError(
                f"{root} is already a procsky repository; open it with Repo({str(root)!r}) or pass exist_ok=True"
            )
        if root.exists() and not root.is_dir():
            raise ProcskyFileError(f"cannot create a repository at {root}: it is a file")
        if root.is_dir() and any(root.iterdir()):
            raise ProcskyFileError(
                f"cannot create a repository in {root}: the folder is not empty; pick a new or empty folder"
            )
        if registry is not None and not isinstance(registry, str):
            raise ProcskyTypeError(f"registry must be a URL string, got {registry!r}")
        root.mkdir(parents=True, exist_ok=True)
        url = registry or f"sqlite:///{root / SQLITE_NAME}"
        Registry(url, create=True).close()
        config = {
            "format_version": REPO_FORMAT_VERSION,
            "registry": registry,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "procsky_version": code_version(),
            "fsync": bool(fsync),
        }
        tmp = root / f".{CONFIG_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, config_path)  # the config appears last: a half-made repo won't open
        return cls(root)

    def __repr__(self) -> str:
        return f"Repo({str(self.root)!r}, registry={self.registry!r})"

    def __getstate__(self):
        return {"root": str(self.root)}

    def __setstate__(self, state):
        type(self).__init__(self, state["root"])

    # -- dataset types, runs, chains, dimensions ------------------------------------------
    def dataset_types(self) -> list[DatasetType]:
        """All registered dataset types."""
        return self.registry.dataset_types()

    def register_dataset_type(self, name: str, dimensions: Sequence[str], storage_class: str | None) -> DatasetType:
        """Declare a dataset type ahead of its first ``put``."""
        if storage_class is not None:
            get_storage_class(storage_class)
        dt = DatasetType(check_name("dataset type", name), tuple(dimensions), storage_class)
        return self.registry.register_dataset_type(dt)

    def runs(self) -> list[str]:
        """All runs, newest first."""
        return self.registry.runs()

    def define_chain(self, name: str, runs: Sequence[str]) -> None:
        """Define a collection chain: ``runs`` (or chains) searched in order."""
        self.registry.define_chain(name, runs)

    def add_dimension_records(
        self, element: str, records: Iterable[Mapping[str, Any]], *, replace: bool = False
    ) -> int:
        """Add dimension records (e.g. visits); see :meth:`Registry.add_dimension_records`."""
        return self.registry.add_dimension_records(element, records, replace=replace)

    def dimension_records(self, element: str, where: str | None = None) -> list[dict]:
        """Dimension records of ``element`` matching ``where`` (e.g. ``"band='g'"``)."""
        return self.registry.dimension_records(element, where)

    # -- writing -------------------------------------------------------------------------
    def put(
        self,
        obj: Any,
        dataset_type: str,
        data_id: Mapping[str, Any],
        run: str,
        *,
        provenance: Mapping[str, Any] | None = None,
    ) -> DatasetRef:
        """Store ``obj`` and register it atomically.

        Parameters
        ----------
        obj : Exposure, pandas.DataFrame, astropy.table.Table or dict
        dataset_type : str
            A declared type, or a new name (declared now with the data ID's keys as
            dimensions and the storage class inferred from ``obj``).
        data_id : dict
            E.g. ``{"instrument": "simcam", "visit": 12, "detector": 3}``.
        run : str
            Output run (created if new).
        provenance : dict, optional
            ``quantum_id``, ``task``, ``config_hash``, ``code_version`` and free keys.

        Returns
        -------
        DatasetRef

        Raises
        ------
        ConflictError
            If this dataset type, data ID and run is already registered.
        """
        pending, tmp = self._write_temporary(obj, dataset_type, data_id, run)
        final = self.root / pending.uri
        renamed = False

        def fn(conn):
            nonlocal renamed
            pending.identity = self._rename_locked(conn, tmp, final, pending.uri)
            renamed = True
            pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
            if pause > 0:  # test hook: the files are in place, the row not yet inserted
                time.sleep(pause)
            return self._insert_pending(conn, [pending], provenance)[0]

        try:
            # One transaction: lock the location, rename into place, insert the row. A
            # crash before the commit leaves an unregistered file the next writer removes.
            with self.registry.transaction() as conn:
                return fn(conn)
        except BaseException:
            _remove_path(tmp)
            if renamed:
                self.discard([pending])
            raise

    def write_pending(self, obj: Any, dataset_type: str, data_id: Mapping[str, Any], run: str) -> PendingDataset:
        """Write a dataset's files to their final location, verified, without registering.

        Call :meth:`register` (or :meth:`discard`) with the result.
        """
        pending, tmp = self._write_temporary(obj, dataset_type, data_id, run)
        try:
            with self.registry.transaction() as conn:
                pending.identity = self._rename_locked(conn, tmp, self.root / pending.uri, pending.uri)
        except BaseException:
            _remove_path(tmp)
            raise
        return pending

    def _write_temporary(
        self, obj: Any, dataset_type: str, data_id: Mapping[str, Any], run: str
    ) -> tuple[PendingDataset, Path]:
        """Write and verify ``obj`` at a temporary sibling of its final location."""
        check_name("dataset type", dataset_type)
        check_run_name(run)
        data_id = canonical_data_id(data_id)
        dt, sc = self._dataset_type_for(obj, dataset_type, data_id)
        uri = f"{run}/{dataset_type}/{data_id_path(data_id)}{sc.extension}"
        final = self.root / uri
        existing = self.registry.exact_dataset(dataset_type, data_id, run)
        if existing is not None:
            raise ConflictError(
                f"{dataset_type} {data_id} is already registered in run {run!r} "
                f"(id {existing.id}); write to a new run or remove it first (`procsky prune`)"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        stem = final.name[: -len(sc.extension)]
        tmp = final.parent / f".{stem}.tmp-{token}{sc.extension}"
        try:
            sc.write(obj, tmp)
            if not tmp.exists():
                raise ProcskyFileError(f"writing {dataset_type} {data_id} produced no file at {tmp}")
            sc.verify(tmp)
            digest = checksum(tmp)
            if self.fsync:
                fsync_tree(tmp)
        except BaseException:
            _remove_path(tmp)
            raise
        pending = PendingDataset(
            id=new_dataset_id(),
            dataset_type=dataset_type,
            run=run,
            data_id=data_id,
            uri=uri,
            storage_class=sc.name,
            checksum=digest,
        )
        return pending, tmp

    def _dataset_type_for(self, obj: Any, name: str, data_id: dict[str, Any]) -> tuple[DatasetType, StorageClass]:
        dt = self.registry.get_dataset_type(name)
        if dt is None:
            std = STANDARD_DATASET_TYPES.get(name)
            if std is not None:
                dt = self.registry.register_dataset_type(std)
            else:
                sc = infer_storage_class(obj)
                dt = self.registry.register_dataset_type(DatasetType(name, tuple(data_id), sc.name))
        missing = [d for d in dt.dimensions if d not in data_id]
        if missing:
            raise ProcskyValueError(f"data ID {data_id} for {name} lacks {missing}; {name} needs {list(dt.dimensions)}")
        if dt.storage_class is None:
            return dt, infer_storage_class(obj)
        sc = get_storage_class(dt.storage_class)
        if not sc.accepts(obj):
            wanted = {"Exposure": "an Exposure", "DataFrame": "a DataFrame/Table"}.get(sc.name, "a dict")
            raise ProcskyTypeError(
                f"{name} is stored as {sc.name} but got a {type(obj).__name__}; pass {wanted}"
                " or store it under another dataset type name"
            )
        return dt, sc

    def _rename_locked(self, conn, tmp: Path, final: Path, uri: str) -> tuple[int, int]:
        """Under the location lock: refuse if registered, drop a leftover, rename."""
        self.registry.lock_location(conn, uri)
        ref = self.registry.dataset_by_uri(conn, uri)
        if ref is not None:
            raise ConflictError(
                f"{ref.dataset_type} {ref.data_id} is already registered in run "
                f"{ref.run!r} at {uri}; write to a new run or remove it first"
            )
        if final.exists() or final.is_symlink():
            _remove_path(final)  # an unregistered leftover of a crashed writer
        os.rename(tmp, final)
        if self.fsync:  # make the rename itself durable before the row is committed
            _fsync_dir(final.parent)
        st = final.stat()
        return (st.st_dev, st.st_ino)

    def register(
        self,
        pendings: Sequence[PendingDataset],
        *,
        provenance: Mapping[str, Any] | None = None,
        connection=None,
    ) -> list[DatasetRef]:
        """Register pending datasets in one transaction.

        Parameters
        ----------
        pendings : sequence of PendingDataset
        provenance : dict, optional
            Applied to every dataset (merged over each pending's own provenance).
        connection : sqlalchemy.engine.Connection, optional
            A connection from ``repo.registry.transaction()``; the rows are inserted in
            that transaction (committed by the caller).
        """
        pendings = list(pendings)
        if not pendings:
            return []

        def fn(conn):
            for p in sorted(pendings, key=lambda p: p.uri):
                self.registry.lock_location(conn, p.uri)
            for p in pendings:
                path = self.root / p.uri
                try:
                    st = path.stat()
                except FileNotFoundError:
                    raise ConflictError(
                        f"the files of pending {p.dataset_type} {p.data_id} at {p.uri} are "
                        "gone (removed by another writer of the same dataset?); write it again"
                    ) from None
                if (st.st_dev, st.st_ino) != tuple(p.identity):
                    raise ConflictError(
                        f"{p.uri} was replaced by another writer of {p.dataset_type} "
                        f"{p.data_id} in run {p.run!r}; only one of them can be registered"
                    )
            return self._insert_pending(conn, pendings, provenance)

        return self.registry._write(fn, connection)

    def _insert_pending(self, conn, pendings, provenance) -> list[DatasetRef]:
        for run in sorted({p.run for p in pendings}):
            self.registry.ensure_run(run, conn)
        rows = []
        for p in pendings:
            prov = {"code_version": code_version(), **p.provenance, **dict(provenance or {})}
            rows.append(
                self.registry.dataset_row(
                    id=p.id,
                    dataset_type=p.dataset_type,
                    run=p.run,
                    data_id=p.data_id,
                    uri=p.uri,
                    checksum=p.checksum,
                    storage_class=p.storage_class,
                    provenance=prov,
                    implied=self.registry.implied_values(p.data_id, conn),
                )
            )
        self.registry.insert_datasets(conn, rows)
        return [self.registry._ref(_Row(r)) for r in rows]

    def discard(self, pendings: Sequence[PendingDataset]) -> None:
        """Remove the files of pending datasets that were not registered."""
        for p in pendings:
            path = self.root / p.uri
            trash = None
            try:
                with self.registry.transaction() as conn:
                    self.registry.lock_location(conn, p.uri)
                    if self.registry.dataset_by_uri(conn, p.uri) is not None:
                        continue
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    if (st.st_dev, st.st_ino) == tuple(p.identity):
                        trash = _trash_name(path)
                        os.rename(path, trash)
                if trash is not None:
                    _remove_path(trash)
            except Exception:  # best effort: a leftover is removed by the next writer
                pass

    # -- reading -------------------------------------------------------------------------
    def _runs(self, run: str | Sequence[str] | None) -> list[str]:
        return self.registry.resolve_runs(run)

    def find(
        self,
        dataset_type: str,
        data_id: Mapping[str, Any],
        run: str | Sequence[str] | None = None,
    ) -> DatasetRef | None:
        """The dataset's ref, or None.

        ``run`` is a run or chain, a list searched in order, or None for every run
        (newest first).
        """
        return self.registry.find_dataset(dataset_type, data_id, self._runs(run))

    def get_ref(
        self,
        dataset_type: str,
        data_id: Mapping[str, Any],
        run: str | Sequence[str] | None = None,
    ) -> DatasetRef:
        """Like :meth:`find` but raises :class:`ProcskyKeyError` if absent."""
        runs = self._runs(run)
        ref = self.registry.find_dataset(dataset_type, data_id, runs)
        if ref is None:
            known = {dt.name for dt in self.dataset_types()}
            if dataset_type not in known:
                hint = f"no dataset type {dataset_type!r} in this repository; known: {', '.join(sorted(known))}"
            else:
                n = len(self.registry.query_datasets(dataset_type, None, runs))
                hint = (
                    f"{n} {dataset_type} dataset(s) exist in the searched runs; list them "
                    f"with `procsky query {self.root} {dataset_type}`"
                )
            where = f"runs {runs}" if runs else "any run (the repository has none)"
            raise ProcskyKeyError(f"no {dataset_type} with data ID {canonical_data_id(data_id)} in {where}; " + hint)
        return ref

    def get(
        self,
        dataset_type: str | DatasetRef,
        data_id: Mapping[str, Any] | None = None,
        run: str | Sequence[str] | None = None,
    ) -> Any:
        """Read a dataset: an Exposure (lazy, dask-backed), a DataFrame or a dict.

        ``dataset_type`` may also be a :class:`DatasetRef`.
        """
        ref = dataset_type if isinstance(dataset_type, DatasetRef) else self.get_ref(dataset_type, data_id or {}, run)
        path = self.root / ref.uri
        if not path.exists():
            raise ProcskyFileError(
                f"{ref.dataset_type} {ref.data_id} in run {ref.run!r} is registered but "
                f"its file {path} is missing; remove the entry with `procsky prune` and "
                "rerun the step that made it"
            )
        return get_storage_class(ref.storage_class).read(path)

    def path(self, ref: DatasetRef) -> Path:
        """Absolute path of a dataset's file or folder."""
        return self.root / ref.uri

    def query(
        self,
        dataset_type: str | Sequence[str] | None = None,
        where: str | Expression | Mapping[str, Any] | None = None,
        run: str | Sequence[str] | None = None,
    ) -> list[DatasetRef]:
        """Datasets matching a type, a data-ID expression and run(s).

        Examples
        --------
        >>> repo.query("calexp", "visit > 10 AND band IN ('g', 'r')", run="run1")  # doctest: +SKIP
        """
        if dataset_type is not None:
            known = {dt.name for dt in self.dataset_types()}
            for name in [dataset_type] if isinstance(dataset_type, str) else dataset_type:
                if name not in known:
                    raise ProcskyKeyError(
                        f"no dataset type {name!r} in this repository; known: {', '.join(sorted(known))}"
                    )
        runs = None if run is None else self._runs(run)
        return self.registry.query_datasets(dataset_type, where, runs)

    def verify(self, refs: Iterable[DatasetRef]) -> list[tuple[DatasetRef, str]]:
        """Check files against their checksums; returns ``(ref, problem)`` for bad ones."""
        bad = []
        for ref in refs:
            path = self.root / ref.uri
            if not path.exists():
                bad.append((ref, "missing"))
                continue
            if checksum(path) != ref.checksum:
                bad.append((ref, "checksum mismatch"))
        return bad

    # -- removal -------------------------------------------------------------------------
    def remove(self, refs: Iterable[DatasetRef]) -> int:
        """Remove datasets from the registry and from disk; returns how many.

        The rows go first (in one transaction); the files follow, each under its
        location's lock and only if no new dataset was written there meanwhile. A crash in
        between leaves unregistered files, which the next writer of the name removes.
        """
        refs = list(refs)
        if not refs:
            return 0
        identities: dict[str, tuple[int, int] | None] = {}

        def fn(conn):
            for ref in sorted(refs, key=lambda r: r.uri):
                self.registry.lock_location(conn, ref.uri)
                try:
                    st = (self.root / ref.uri).stat()
                    identities[ref.uri] = (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    identities[ref.uri] = None
            return self.registry.delete_datasets(conn, [r.id for r in refs])

        n = self.registry._write(fn)
        for ref in refs:
            ident = identities.get(ref.uri)
            if ident is None:
                continue
            path = self.root / ref.uri
            trash = None
            with self.registry.transaction() as conn:
                self.registry.lock_location(conn, ref.uri)
                if self.registry.dataset_by_uri(conn, ref.uri) is not None:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) == ident:
                    trash = _trash_name(path)
                    os.rename(path, trash)
            if trash is not None:
                _remove_path(trash)
        return n

    def orphans(self, min_age: float = 3600.0) -> list[Path]:
        """Temporary and unregistered files older than ``min_age`` seconds (for cleanup).

        Parameters
        ----------
        min_age : float, s
            Leave younger files alone: a writer may still be working on them.
        """
        registered = {ref.uri for ref in self.registry.query_datasets()}
        now = time.time()
        out: list[Path] = []
        # Walk every folder, not only registered runs: a crashed writer's first dataset
        # leaves files in a run that was never registered.
        for base in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for p in base.rglob("*"):
                parts = p.relative_to(self.root).parts
                if any(part.endswith(".zarr") or ".trash-" in part for part in parts[:-1]):
                    continue  # inside a dataset folder: judged with the folder
                leftover = ".tmp-" in p.name or ".trash-" in p.name
                if not leftover and p.suffix not in (".zarr", ".parquet", ".json"):
                    continue
                if p.relative_to(self.root).as_posix() in registered:
                    continue
                try:
                    if now - p.stat().st_mtime >= min_age:
                        out.append(p)
                except FileNotFoundError:
                    continue
        return sorted(out)

    def remove_orphans(self, min_age: float = 3600.0) -> list[Path]:
        """Delete the files :meth:`orphans` finds; returns them.

        A leftover at a final dataset name is removed under its location lock and only
        if still unregistered, so a concurrent writer is never harmed.
        """
        removed = []
        for path in self.orphans(min_age):
            name = path.name
            if ".tmp-" in name or ".trash-" in name:
                _remove_path(path)
                removed.append(path)
                continue
            uri = path.relative_to(self.root).as_posix()
            trash = None
            with self.registry.transaction() as conn:
                self.registry.lock_location(conn, uri)
                if self.registry.dataset_by_uri(conn, uri) is None and path.exists():
                    trash = _trash_name(path)
                    os.rename(path, trash)
            if trash is not None:
                _remove_path(trash)
                removed.append(path)
        return removed


class _Row:
    """Attribute access over a row dict (to build refs from rows not read back)."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trash_name(path: Path) -> Path:
    return path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:12]}"


def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
