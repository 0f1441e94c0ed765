"""The registry: a SQL database (SQLAlchemy 2 Core) of runs, dataset types, datasets and
dimension records.

SQLite (in the repository root, zero set-up) or PostgreSQL (``postgresql+psycopg://...``,
for many concurrent writers). Concurrency rules:

* SQLite runs in WAL mode (readers never block the writer) with a busy timeout; every write
  transaction starts with ``BEGIN IMMEDIATE`` so that two writers never deadlock upgrading a
  read lock (the pysqlite recipe from the SQLAlchemy docs), and acquiring it is retried
  with jittered back-off when the database stays locked.
* On PostgreSQL, operations on the same file location take a transaction-scoped advisory
  lock (``pg_advisory_xact_lock``); SQLite's write lock already serialises them.
* Uniqueness of (dataset_type, run, data ID) is a database constraint, so concurrent
  writers of the same dataset cannot both succeed.

The pipeline executor may add its own tables (quanta) to :attr:`Registry.engine` and use
:meth:`Registry.transaction` to register outputs and mark a quantum done atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from procsky.errors import (
    ConflictError,
    ProcskyKeyError,
    ProcskyValueError,
    QuerySyntaxError,
    RepoError,
)
from procsky.repo.dimensions import (
    DIMENSION_ORDER,
    ELEMENT_KEYS,
    IMPLIED,
    STANDARD_DATASET_TYPES,
    DatasetType,
    canonical_data_id,
    check_name,
    check_run_name,
    data_id_key,
    sort_dimensions,
)
from procsky.repo.query import (
    STANDARD_DIMENSION_TYPES,
    Expression,
    check_identifiers,
    parse_expression,
)

__all__ = ["Registry", "DatasetRef", "RecordConflictError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

#: Provenance fields stored in their own columns; other provenance keys go to JSON.
PROVENANCE_COLUMNS = ("quantum_id", "task", "config_hash", "code_version")

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _utcnow() -> datetime:
    # Naive UTC: SQLite keeps no time zone, so store the same thing everywhere.
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class DatasetRef:
    """A registered dataset.

    Attributes
    ----------
    id : str
        UUID (text form).
    dataset_type, run : str
    data_id : dict
        The data ID as given at ``put`` (standard dimensions first).
    uri : str
        Location relative to the repository root (POSIX separators).
    storage_class : str
    checksum : str
        ``"sha256:<hex>"`` of the stored file(s).
    created : str or None
        ISO-8601 UTC registration time.
    provenance : dict
        ``quantum_id``, ``task``, ``config_hash``, ``code_version`` and any extra keys.
    """

    id: str
    dataset_type: str
    run: str
    data_id: dict
    uri: str
    storage_class: str
    checksum: str
    created: str | None = None
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return {
            "id": self.id,
            "dataset_type": self.dataset_type,
            "run": self.run,
            "data_id": dict(self.data_id),
            "uri": self.uri,
            "storage_class": self.storage_class,
            "checksum": self.checksum,
            "created": self.created,
            "provenance": dict(self.provenance),
        }

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DatasetRef) and other.id == self.id


class RecordConflictError(ConflictError):
    """A dimension record differs from the one already registered under its key.

    The message ends with the remedy for the caller's interface: ``replace=True`` for
    :meth:`Registry.add_dimension_records`; a layer with another way to say it (an
    ``ingest`` option, a command-line flag) re-raises :meth:`with_fix`.
    """

    def __init__(
        self,
        element: str = "",
        key: str = "",
        existing: Any = None,
        new: Any = None,
        fix: str = "pass replace=True to overwrite",
    ):
        super().__init__(element, key, existing, new, fix)
        self.element, self.key, self.existing, self.new, self.fix = element, key, existing, new, fix

    def __str__(self) -> str:
        if not self.key:  # made from a message alone
            return str(self.element)
        return (
            f"a different {self.element} record with key {self.key} exists: {self.existing} vs {self.new}; {self.fix}"
        )

    def with_fix(self, fix: str) -> RecordConflictError:
        """The same conflict with another remedy (raise it ``from`` this one)."""
        return RecordConflictError(self.element, self.key, self.existing, self.new, fix)


def _build_metadata() -> tuple[sa.MetaData, dict[str, sa.Table]]:
    md = sa.MetaData()
    t: dict[str, sa.Table] = {}
    t["meta"] = sa.Table(
        "procsky_meta",
        md,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    t["dataset_type"] = sa.Table(
        "dataset_type",
        md,
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("dimensions", _JSON, nullable=False),
        sa.Column("storage_class", sa.String(64), nullable=True),
    )
    t["run"] = sa.Table(
        "run",
        md,
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    t["chain"] = sa.Table(
        "collection_chain",
        md,
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("child", sa.String(256), nullable=False),
    )
    dim_cols = [
        sa.Column(d, sa.BigInteger if typ is int else sa.String(128), nullable=True)
        for d, typ in STANDARD_DIMENSION_TYPES.items()
    ]
    t["dataset"] = sa.Table(
        "dataset",
        md,
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("dataset_type", sa.String(128), sa.ForeignKey("dataset_type.name"), nullable=False),
        sa.Column("run", sa.String(256), sa.ForeignKey("run.name"), nullable=False),
        sa.Column("data_id", _JSON, nullable=False),
        sa.Column("data_id_key", sa.Text, nullable=False),
        *dim_cols,
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("checksum", sa.String(80), nullable=False),
        sa.Column("storage_class", sa.String(64), nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("quantum_id", sa.String(64), nullable=True),
        sa.Column("task", sa.String(128), nullable=True),
        sa.Column("config_hash", sa.String(128), nullable=True),
        sa.Column("code_version", sa.String(64), nullable=True),
        sa.Column("provenance", _JSON, nullable=True),
        sa.UniqueConstraint("dataset_type", "run", "data_id_key", name="uq_dataset_data_id"),
        sa.UniqueConstraint("uri", name="uq_dataset_uri"),
        sa.Index("ix_dataset_run_type", "run", "dataset_type"),
        sa.Index("ix_dataset_visit", "visit", "detector"),
        sa.Index("ix_dataset_patch", "tract", "patch"),
        sa.Index("ix_dataset_quantum", "quantum_id"),
    )
    t["dimension"] = sa.Table(
        "dimension_record",
        md,
        sa.Column("element", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(512), primary_key=True),
        *[
            sa.Column(d, sa.BigInteger if typ is int else sa.String(128), nullable=True)
            for d, typ in STANDARD_DIMENSION_TYPES.items()
        ],
        sa.Column("record", _JSON, nullable=False),
    )
    return md, t


_local = threading.local()  # per-thread depth of open write transactions


def _is_locked_error(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database is busy" in text or "sqlite_busy" in text


def _is_retryable_pg(exc: BaseException) -> bool:
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return code in ("40001", "40P01")  # serialization failure, deadlock detected


class Registry:
    """The SQL registry of a repository.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:////abs/path/registry.sqlite3`` or
        ``postgresql+psycopg://user@host:port/dbname``.
    create : bool
        Create the tables (and declare the standard dataset types) if missing.
    busy_timeout : float, s
        How long a SQLite writer waits for the lock before retrying.
    """

    def __init__(self, url: str, *, create: bool = False, busy_timeout: float = 60.0):
        self.url = str(url)
        self.busy_timeout = float(busy_timeout)
        self.metadata, self.tables = _build_metadata()
        self._engine: Engine | None = None
        self._pid = os.getpid()
        self._known_runs: set[str] = set()
        self._type_cache: dict[str, DatasetType] = {}
        if create:
            self._create_schema()
        else:
            self._check_schema()

    # -- engine, pickling, fork safety --------------------------------------------------
    @property
    def dialect(self) -> str:
        return sa.engine.make_url(self.url).get_backend_name()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (re-created in a forked or unpickled process)."""
        if self._engine is not None and self._pid != os.getpid():
            self._engine.dispose(close=False)  # do not touch the parent's connections
            self._engine = None
        if self._engine is None:
            self._engine = self._make_engine()
            self._pid = os.getpid()
        return self._engine

    def _make_engine(self) -> Engine:
        url = sa.engine.make_url(self.url)
        backend = url.get_backend_name()
        if backend == "sqlite":
            engine = sa.create_engine(
                url,
                connect_args={"timeout": self.busy_timeout},
                pool_size=2,
                max_overflow=8,
            )
            busy_ms = int(self.busy_timeout * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):
                # Let SQLAlchemy (not pysqlite) emit BEGIN, so that we can make it IMMEDIATE.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                # WAL persists in the file; on an existing WAL database this is a no-op.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn):
                write = conn.get_execution_options().get("procsky_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        if backend == "postgresql":
            try:
                # pool_recycle rather than pre-ping: one round trip less per checkout.
                return sa.create_engine(url, pool_recycle=600, pool_size=2, max_overflow=4)
            except ImportError as exc:
                raise RepoError(
                    f"cannot connect to {self.url}: the PostgreSQL driver is missing ({exc}); "
                    "pip install 'procsky[postgres]'"
                ) from exc
        raise ProcskyValueError(
            f"unsupported registry URL {self.url!r}; use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"
        )

    def __getstate__(self):
        return {"url": self.url, "busy_timeout": self.busy_timeout}

    def __setstate__(self, state):
        self.url = state["url"]
        self.busy_timeout = state["busy_timeout"]
        self.metadata, self.tables = _build_metadata()
        self._engine = None
        self._pid = os.getpid()
        self._known_runs = set()
        self._type_cache = {}

    def close(self) -> None:
        """Dispose of the engine's connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __repr__(self) -> str:
        return f"Registry({sa.engine.make_url(self.url).render_as_string(hide_password=True)!r})"

    # -- schema ---------------------------------------------------------------------------
    def _create_schema(self) -> None:
        with self.transaction() as conn:
            self.metadata.create_all(conn, checkfirst=True)
            _insert_ignore(conn, self.tables["meta"], [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
            _insert_ignore(
                conn,
                self.tables["dataset_type"],
                [
                    {"name": dt.name, "dimensions": list(dt.dimensions), "storage_class": dt.storage_class}
                    for dt in STANDARD_DATASET_TYPES.values()
                ],
            )

    def _check_schema(self) -> None:
        try:
            with self.reading() as conn:
                row = conn.execute(
                    sa.select(self.tables["meta"].c.value).where(self.tables["meta"].c.key == "schema_version")
                ).first()
        except sa.exc.SQLAlchemyError as exc:
            raise RepoError(
                f"cannot open the registry {self!r}: {exc.__class__.__name__}: "
                f"{getattr(exc, 'orig', exc)}; check the URL and that the database is running"
            ) from exc
        if row is None:
            raise RepoError(
                f"the registry {self!r} has no procsky schema; create the repository with `procsky repo create`"
            )
        if int(row[0]) > SCHEMA_VERSION:
            raise RepoError(
                f"the registry uses schema version {row[0]}, newer than this procsky "
                f"({SCHEMA_VERSION}); upgrade procsky"
            )

    # -- transactions -------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction: yields a Connection, commits on exit, rolls back on error.

        On SQLite the write lock is taken at the start (``BEGIN IMMEDIATE``), retried
        with jittered back-off while another process holds it.
        """
        if self.dialect == "sqlite" and getattr(_local, "depth", 0) > 0:
            raise RepoError(
                "a registry write transaction is already open in this thread; SQLite allows "
                "one writer, so a second one would wait for ever. Pass the open connection "
                "(e.g. repo.register(..., connection=conn)) instead of starting another."
            )
        lock_fd = self._acquire_writer_lock()
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            conn = self.engine.connect().execution_options(procsky_write=True)
            try:
                self._begin_with_retry(conn)
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            finally:
                conn.close()
        finally:
            _local.depth -= 1
            if lock_fd is not None:
                os.close(lock_fd)  # releases the flock

    def _acquire_writer_lock(self) -> int | None:
        """SQLite only: queue writers on an flock next to the database.

        SQLite's own busy handler polls with sleeps of up to 100 ms, which wastes most of
        the time when many processes write; a kernel lock wakes the next writer at once.
        The lock is advisory: SQLite's locking still guarantees correctness (e.g. on
        file systems where flock is not shared between hosts).
        """
        if self.dialect != "sqlite":
            return None
        db = sa.engine.make_url(self.url).database
        if not db or db == ":memory:":
            return None
        try:
            fd = os.open(db + ".lock", os.O_RDWR | os.O_CREAT, 0o664)
        except OSError:
            return None  # read-only location: rely on SQLite's locking
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _begin_with_retry(self, conn: Connection) -> None:
        delay = 0.01
        deadline = time.monotonic() + max(10 * self.busy_timeout, 60.0)
        while True:
            try:
                conn.begin()
                return
            except sa.exc.OperationalError as exc:
                if not _is_locked_error(exc) or time.monotonic() > deadline:
                    raise RepoError(
                        f"could not lock the registry {self!r} for writing: "
                        f"{getattr(exc, 'orig', exc)}; another process holds it too long"
                    ) from exc
                conn.rollback()
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only connection (a consistent snapshot until the block ends)."""
        with self.engine.connect() as conn:
            yield conn

    def _write(self, fn, connection: Connection | None = None):
        """Run ``fn(conn)`` in ``connection`` or in a new transaction, retrying on
        PostgreSQL serialization failures and deadlocks."""
        if connection is not None:
            return fn(connection)
        for attempt in range(10):
            try:
                with self.transaction() as conn:
                    return fn(conn)
            except sa.exc.OperationalError as exc:
                if attempt < 9 and (_is_retryable_pg(exc) or _is_locked_error(exc)):
                    time.sleep(0.05 * (attempt + 1) * (0.5 + random.random()))
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def lock_location(self, conn: Connection, uri: str) -> None:
        """Serialise operations on one file location until the transaction ends."""
        if self.dialect == "postgresql":
            key = int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big", signed=True)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        # SQLite: BEGIN IMMEDIATE already holds the database-wide write lock.

    # -- dataset types ----------------------------------------------------------------
    def dataset_types(self) -> list[DatasetType]:
        """All registered dataset types, by name."""
        t = self.tables["dataset_type"]
        with self.reading() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.name)).all()
        return [DatasetType(r.name, tuple(r.dimensions), r.storage_class) for r in rows]

    def get_dataset_type(self, name: str, conn: Connection | None = None) -> DatasetType | None:
        """The dataset type called ``name``, or None."""
        if name in self._type_cache:  # definitions never change once registered
            return self._type_cache[name]
        t = self.tables["dataset_type"]
        stmt = sa.select(t).where(t.c.name == name)
        if conn is None:
            with self.reading() as c:
                row = c.execute(stmt).first()
        else:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        dt = DatasetType(row.name, tuple(row.dimensions), row.storage_class)
        if conn is None:  # committed: safe to cache
            self._type_cache[name] = dt
        return dt

    def register_dataset_type(self, dataset_type: DatasetType, connection: Connection | None = None) -> DatasetType:
        """Register a dataset type (no-op if an identical one exists).

        Raises
        ------
        ConflictError
            If one with the same name but other dimensions or storage class exists.
        """
        check_name("dataset type", dataset_type.name)

        def fn(conn):
            _insert_ignore(conn, self.tables["dataset_type"], [dataset_type.to_dict()])
            existing = self.get_dataset_type(dataset_type.name, conn)
            assert existing is not None  # inserted just above unless already there
            if existing != dataset_type:
                raise ConflictError(
                    f"dataset type {dataset_type.name!r} is already defined as "
                    f"dimensions={list(existing.dimensions)}, storage class "
                    f"{existing.storage_class}; cannot redefine it as "
                    f"dimensions={list(dataset_type.dimensions)}, storage class "
                    f"{dataset_type.storage_class}. Use another name."
                )
            return existing

        return self._write(fn, connection)

    # -- runs and chains ----------------------------------------------------------------
    def ensure_run(self, run: str, conn: Connection) -> None:
        """Create ``run`` if it does not exist (safe under concurrency)."""
        if run in self._known_runs:
            return
        check_run_name(run)
        runs = self.tables["run"]
        if conn.execute(sa.select(runs.c.name).where(runs.c.name == run)).first():
            # Runs are never deleted, so a run seen committed stays valid to cache.
            self._known_runs.add(run)
            return
        chain = self.tables["chain"]
        if conn.execute(sa.select(chain.c.name).where(chain.c.name == run).limit(1)).first():
            raise ConflictError(
                f"{run!r} is a collection chain, not a run; write to one of its runs or pick another run name"
            )
        _insert_ignore(conn, runs, [{"name": run, "created": _utcnow()}])

    def runs(self) -> list[str]:
        """All runs, newest first."""
        t = self.tables["run"]
        with self.reading() as conn:
            return [r[0] for r in conn.execute(sa.select(t.c.name).order_by(t.c.created.desc(), t.c.name.desc()))]

    def chains(self) -> dict[str, list[str]]:
        """All collection chains: name -> ordered list of children."""
        t = self.tables["chain"]
        out: dict[str, list[str]] = {}
        with self.reading() as conn:
            for r in conn.execute(sa.select(t).order_by(t.c.name, t.c.position)):
                out.setdefault(r.name, []).append(r.child)
        return out

    def define_chain(self, name: str, children: Sequence[str]) -> None:
        """Define (or redefine) a chain searched in the order of ``children``.

        Children are runs or other chains; they must exist.
        """
        check_run_name(name)
        if isinstance(children, str):
            children = [children]
        children = list(children)

        def fn(conn):
            runs = self.tables["run"]
            if conn.execute(sa.select(runs.c.name).where(runs.c.name == name)).first():
                raise ConflictError(f"{name!r} is already a run; a chain needs a name of its own")
            known_runs = {r[0] for r in conn.execute(sa.select(runs.c.name))}
            chain = self.tables["chain"]
            known_chains = {r[0] for r in conn.execute(sa.select(chain.c.name).distinct())}
            for child in children:
                if child not in known_runs and child not in known_chains:
                    raise ProcskyKeyError(
                        f"cannot chain {child!r}: no such run or chain; known runs: "
                        f"{', '.join(sorted(known_runs)) or '(none)'}"
                    )
            conn.execute(sa.delete(chain).where(chain.c.name == name))
            if children:
                conn.execute(
                    sa.insert(chain),
                    [{"name": name, "position": i, "child": c} for i, c in enumerate(children)],
                )
            # Reject cycles now rather than at search time.
            self._resolve(name, conn)

        self._write(fn)

    def _resolve(self, name: str, conn: Connection, stack: tuple[str, ...] = ()) -> list[str]:
        if name in stack:
            raise ProcskyValueError(f"collection chain cycle: {' -> '.join(stack + (name,))}; remove one link")
        chain = self.tables["chain"]
        rows = conn.execute(sa.select(chain.c.child).where(chain.c.name == name).order_by(chain.c.position)).all()
        if rows:
            out: list[str] = []
            for (child,) in rows:
                for r in self._resolve(child, conn, stack + (name,)):
                    if r not in out:
                        out.append(r)
            return out
        runs = self.tables["run"]
        if conn.execute(sa.select(runs.c.name).where(runs.c.name == name)).first() is None:
            known = [r[0] for r in conn.execute(sa.select(runs.c.name).order_by(runs.c.name))]
            raise ProcskyKeyError(f"no run or chain called {name!r}; known runs: {', '.join(known) or '(none)'}")
        return [name]

    def resolve_runs(self, run: str | Sequence[str] | None) -> list[str]:
        """Expand a run, chain or list of them to the ordered list of runs to search.

        ``None`` gives every run, newest first.
        """
        if run is None:
            return self.runs()
        names = [run] if isinstance(run, str) else list(run)
        out: list[str] = []
        with self.reading() as conn:
            for name in names:
                for r in self._resolve(name, conn):
                    if r not in out:
                        out.append(r)
        return out

    # -- dimension records --------------------------------------------------------------
    def add_dimension_records(
        self, element: str, records: Iterable[Mapping[str, Any]], *, replace: bool = False
    ) -> int:
        """Insert dimension records (e.g. one per visit).

        Parameters
        ----------
        element : str
            ``instrument``, ``physical_filter``, ``band``, ``detector``, ``visit``,
            ``skymap``, ``tract``, ``patch`` or another name.
        records : iterable of dict
            Each must give the element's key dimensions (see ``ELEMENT_KEYS``; ``name`` or
            ``id`` may stand for the element's own key); other fields are free JSON.
        replace : bool
            Replace records that differ from existing ones instead of raising.

        Returns
        -------
        int
            Number of records newly inserted or replaced.
        """
        check_name("dimension element", element)
        rows = [self._record_row(element, r) for r in records]

        def fn(conn):
            t = self.tables["dimension"]
            changed = 0
            for row in rows:
                key_clause = sa.and_(t.c.element == element, t.c.key == row["key"])
                existing = conn.execute(sa.select(t.c.record).where(key_clause)).first()
                if existing is None:
                    changed += _insert_ignore(conn, t, [row])
                    existing = conn.execute(sa.select(t.c.record).where(key_clause)).first()
                if _jsonable(existing[0]) == _jsonable(row["record"]):
                    continue
                if not replace:
                    raise RecordConflictError(element, row["key"], existing[0], row["record"])
                conn.execute(sa.update(t).where(key_clause).values(**row))
                changed += 1
            return changed

        return self._write(fn)

    def _record_row(self, element: str, record: Mapping[str, Any]) -> dict[str, Any]:
        rec = dict(record)
        keys = ELEMENT_KEYS.get(element, (element,))
        own = keys[-1]
        if own not in rec:
            for alias in ("name", "id"):
                if alias in rec:
                    rec[own] = rec[alias]
                    break
        missing = [k for k in keys if k not in rec]
        if missing:
            raise ProcskyValueError(
                f"{element} record {record!r} lacks the key(s) {missing}; a {element} record needs {list(keys)}"
            )
        key_values = canonical_data_id({k: rec[k] for k in keys})
        rec.update(key_values)
        rec = json.loads(json.dumps(rec, default=_json_default))
        row: dict[str, Any] = {"element": element, "key": data_id_key(key_values), "record": rec}
        for d, typ in STANDARD_DIMENSION_TYPES.items():
            v = rec.get(d)
            row[d] = v if isinstance(v, typ) and not isinstance(v, bool) else None
        return row

    def dimension_records(self, element: str, where: str | Expression | None = None) -> list[dict[str, Any]]:
        """Records of ``element`` matching a data-ID expression on their fields."""
        t = self.tables["dimension"]
        expr = _as_expression(where)
        with self.reading() as conn:
            rows = conn.execute(sa.select(t.c.record).where(t.c.element == element).order_by(t.c.key)).all()
        recs = [dict(r[0]) for r in rows]
        if expr is not None:
            recs = [r for r in recs if expr.evaluate(r)]
        keys = ELEMENT_KEYS.get(element, (element,))
        recs.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in keys))
        return recs

    def implied_values(self, data_id: Mapping[str, Any], conn: Connection) -> dict[str, Any]:
        """Dimensions implied by the records of a data ID (a visit's band, ...)."""
        t = self.tables["dimension"]
        out: dict[str, Any] = {}
        for element in ("visit", "physical_filter"):
            keys = ELEMENT_KEYS[element]
            known = {**data_id, **out}
            if not all(k in known for k in keys):
                continue
            if all(d in known for d in IMPLIED[element]):
                continue
            key = data_id_key({k: known[k] for k in keys})
            row = conn.execute(sa.select(t.c.record).where(sa.and_(t.c.element == element, t.c.key == key))).first()
            if row is None:
                continue
            for d in IMPLIED[element]:
                v = row[0].get(d)
                if d not in known and isinstance(v, STANDARD_DIMENSION_TYPES[d]):
                    out[d] = v
        return out

    # -- datasets ----------------------------------------------------------------------
    def insert_datasets(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert dataset rows (see :meth:`dataset_row`); raise ConflictError on duplicates."""
        if not rows:
            return
        # No savepoint: a conflict aborts the caller's transaction anyway (it must not
        # mark a quantum done whose outputs were not registered), and it saves round trips.
        try:
            conn.execute(sa.insert(self.tables["dataset"]), rows)
        except sa.exc.IntegrityError as exc:
            text = str(getattr(exc, "orig", exc)).lower()
            if "unique" not in text and "duplicate" not in text:
                raise RepoError(
                    f"registering {len(rows)} dataset(s) violated a registry constraint: "
                    f"{getattr(exc, 'orig', exc)}; the registry may be inconsistent"
                ) from exc
            dup = rows[0] if len(rows) == 1 else None
            what = f"{dup['dataset_type']} {dup['data_id']} in run {dup['run']!r}" if dup else "one of these datasets"
            raise ConflictError(
                f"{what} is already registered; write to a new run, or remove the existing "
                f"dataset first (`procsky prune`)"
            ) from exc

    def dataset_row(
        self,
        *,
        id: str,
        dataset_type: str,
        run: str,
        data_id: Mapping[str, Any],
        uri: str,
        checksum: str,
        storage_class: str,
        provenance: Mapping[str, Any] | None,
        implied: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Build the row for one dataset."""
        row: dict[str, Any] = {
            "id": id,
            "dataset_type": dataset_type,
            "run": run,
            "data_id": dict(data_id),
            "data_id_key": data_id_key(data_id),
            "uri": uri,
            "checksum": checksum,
            "storage_class": storage_class,
            "created": _utcnow(),
        }
        for d in STANDARD_DIMENSION_TYPES:
            row[d] = data_id.get(d, implied.get(d))
        prov = dict(provenance or {})
        for c in PROVENANCE_COLUMNS:
            v = prov.pop(c, None)
            row[c] = None if v is None else str(v)
        row["provenance"] = json.loads(json.dumps(prov, default=_json_default)) if prov else None
        return row

    def _ref(self, r) -> DatasetRef:
        prov = {c: getattr(r, c) for c in PROVENANCE_COLUMNS if getattr(r, c) is not None}
        prov.update(r.provenance or {})
        data_id = dict(r.data_id)
        data_id = {k: data_id[k] for k in sort_dimensions(data_id)}
        return DatasetRef(
            id=r.id,
            dataset_type=r.dataset_type,
            run=r.run,
            data_id=data_id,
            uri=r.uri,
            storage_class=r.storage_class,
            checksum=r.checksum,
            created=r.created.isoformat() if r.created is not None else None,
            provenance=prov,
        )

    def _column_resolver(self, ds: sa.Table):
        def resolve(name: str, values: tuple[Any, ...], pos: int):
            if name in STANDARD_DIMENSION_TYPES:
                return ds.c[name]
            if name in _DATASET_COLUMNS:
                return ds.c[name]
            elem = ds.c.data_id[name]
            kinds = {type(v) for v in values}
            if kinds and kinds <= {bool}:
                return elem.as_boolean()
            if kinds and kinds <= {int}:
                return elem.as_integer()
            if kinds and kinds <= {int, float}:
                return elem.as_float()
            return elem.as_string()

        return resolve

    def query_datasets(
        self,
        dataset_type: str | Sequence[str] | None = None,
        where: str | Expression | Mapping[str, Any] | None = None,
        runs: Sequence[str] | None = None,
    ) -> list[DatasetRef]:
        """Datasets matching type(s), a data-ID expression (or dict) and runs.

        Results are ordered by run (in the order of ``runs``, else newest run first), then
        dataset type, then data ID.
        """
        ds = self.tables["dataset"]
        run_t = self.tables["run"]
        stmt = sa.select(ds).join(run_t, run_t.c.name == ds.c.run)
        if dataset_type is not None:
            types = [dataset_type] if isinstance(dataset_type, str) else list(dataset_type)
            stmt = stmt.where(ds.c.dataset_type.in_(types))
        if runs is not None:
            if not runs:
                return []
            stmt = stmt.where(ds.c.run.in_(list(runs)))
        if not isinstance(where, Mapping):
            where = _as_expression(where)
            if where is not None:
                self._check_where_names(where, dataset_type)
        clause = self._where_clause(ds, where)
        if clause is not None:
            stmt = stmt.where(clause)
        stmt = stmt.order_by(
            run_t.c.created.desc(),
            ds.c.run,
            ds.c.dataset_type,
            *(ds.c[d] for d in DIMENSION_ORDER),  # numeric order: visit 2 before visit 10
            ds.c.data_id_key,
        )
        with self.reading() as conn:
            refs = [self._ref(r) for r in conn.execute(stmt)]
        if runs is not None:
            order = {r: i for i, r in enumerate(runs)}
            refs.sort(key=lambda ref: order[ref.run])  # stable: keeps the rest of the order
        return refs

    def _check_where_names(self, expr: Expression, dataset_type) -> None:
        """Refuse a name no searched data ID can hold (``vist=1`` would match nothing).

        Known: the standard dimensions, the dataset columns (``run``, ``dataset_type``,
        ``storage_class``), the dimensions of the dataset types searched, and any other
        key present in the data ID of at least one of their datasets.
        """
        known = set(STANDARD_DIMENSION_TYPES) | set(_DATASET_COLUMNS)
        if set(expr.identifiers) <= known:
            return
        types = (
            None if dataset_type is None else ([dataset_type] if isinstance(dataset_type, str) else list(dataset_type))
        )
        dtypes = [dt for dt in self.dataset_types() if types is None or dt.name in types]
        known.update(d for dt in dtypes for d in dt.dimensions)
        ds = self.tables["dataset"]
        with self.reading() as conn:
            for name in sorted(set(expr.identifiers) - known):
                # A free data-ID key (dimensions.py: "other names may appear"): known
                # when some dataset searched carries it.
                stmt = sa.select(ds.c.id).where(ds.c.data_id[name].as_string().is_not(None))
                if types is not None:
                    stmt = stmt.where(ds.c.dataset_type.in_(types))
                if conn.execute(stmt.limit(1)).first() is not None:
                    known.add(name)
        scope = "any dataset type in this repository" if types is None else ", ".join(types)
        check_identifiers(expr, known, scope=scope)

    def _where_clause(self, ds: sa.Table, where):
        if where is None:
            return None
        if isinstance(where, Mapping):
            data_id = canonical_data_id(where)
            resolve = self._column_resolver(ds)
            return sa.and_(sa.true(), *(resolve(k, (v,), -1) == v for k, v in data_id.items()))
        expr = _as_expression(where)
        if expr is None:
            return None
        return expr.to_sql(self._column_resolver(ds))

    def find_dataset(self, dataset_type: str, data_id: Mapping[str, Any], runs: Sequence[str]) -> DatasetRef | None:
        """The dataset of this type and data ID in the first of ``runs`` that has one.

        An exact data-ID match is preferred; otherwise ``data_id`` may name a subset or
        an implied superset of the stored keys (``{visit, detector}`` or
        ``{visit, detector, band}`` for a calexp) if that picks one dataset per run.
        """
        if not runs:
            return None
        ds = self.tables["dataset"]
        data_id = canonical_data_id(data_id)
        base = sa.select(ds).where(ds.c.dataset_type == dataset_type, ds.c.run.in_(list(runs)))
        with self.reading() as conn:
            rows = conn.execute(base.where(ds.c.data_id_key == data_id_key(data_id))).all()
            if not rows:
                clause = self._where_clause(ds, data_id)
                rows = conn.execute(base.where(clause)).all()
        if not rows:
            return None
        by_run: dict[str, list] = {}
        for r in rows:
            by_run.setdefault(r.run, []).append(r)
        for run in runs:
            hits = by_run.get(run)
            if not hits:
                continue
            if len(hits) > 1:
                ids = "; ".join(json.dumps(h.data_id, sort_keys=True) for h in hits[:5])
                raise ProcskyValueError(
                    f"data ID {data_id} matches {len(hits)} {dataset_type} datasets in run "
                    f"{run!r} ({ids}{' ...' if len(hits) > 5 else ''}); give more keys"
                )
            return self._ref(hits[0])
        return None

    def exact_dataset(self, dataset_type: str, data_id: Mapping[str, Any], run: str) -> DatasetRef | None:
        """The dataset with exactly this type, data ID and run, or None."""
        ds = self.tables["dataset"]
        stmt = sa.select(ds).where(
            ds.c.dataset_type == dataset_type,
            ds.c.run == run,
            ds.c.data_id_key == data_id_key(canonical_data_id(data_id)),
        )
        with self.reading() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else self._ref(row)

    def dataset_by_uri(self, conn: Connection, uri: str) -> DatasetRef | None:
        """The dataset stored at ``uri`` (relative to the root), if registered."""
        ds = self.tables["dataset"]
        row = conn.execute(sa.select(ds).where(ds.c.uri == uri)).first()
        return None if row is None else self._ref(row)

    def delete_datasets(self, conn: Connection, ids: Sequence[str]) -> int:
        """Delete dataset rows by id; returns how many were deleted."""
        ds = self.tables["dataset"]
        n = 0
        ids = list(ids)
        for i in range(0, len(ids), 500):
            n += conn.execute(sa.delete(ds).where(ds.c.id.in_(ids[i : i + 500]))).rowcount
        return n

    def count_datasets(self) -> dict[tuple[str, str], int]:
        """Number of datasets per (run, dataset_type)."""
        ds = self.tables["dataset"]
        with self.reading() as conn:
            rows = conn.execute(
                sa.select(ds.c.run, ds.c.dataset_type, sa.func.count()).group_by(ds.c.run, ds.c.dataset_type)
            ).all()
        return {(r[0], r[1]): r[2] for r in rows}


#: Columns of the dataset table a where expression may name besides the dimensions.
_DATASET_COLUMNS = ("run", "dataset_type", "storage_class")


def new_dataset_id() -> str:
    """A new random dataset id (UUID4 text)."""
    return str(uuid.uuid4())


def _as_expression(where) -> Expression | None:
    if where is None:
        return None
    if isinstance(where, Expression):
        return where
    if isinstance(where, str):
        if not where.strip():
            return None
        return parse_expression(where)
    raise QuerySyntaxError(f'a where expression must be a string such as "visit=12", got {type(where).__name__}')


def _insert_ignore(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING (SQLite and PostgreSQL); returns rows inserted."""
    if not rows:
        return 0
    name = conn.dialect.name
    stmt: sqlite.Insert | postgresql.Insert
    if name == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    elif name == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing()
    else:  # pragma: no cover - other dialects are rejected when the engine is made
        raise RepoError(f"unsupported database dialect {name}")
    n = 0
    for row in rows:
        n += max(conn.execute(stmt, row).rowcount, 0)
    return n


def _json_default(obj: Any):
    item = getattr(obj, "item", None)
    if getattr(obj, "ndim", 0) and hasattr(obj, "tolist"):
        return obj.tolist()
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def _jsonable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _sort_key(v: Any):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
