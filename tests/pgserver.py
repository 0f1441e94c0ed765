"""A throw-away PostgreSQL server for tests.

``PgServer.start()`` runs ``initdb`` on a fresh temporary data folder and starts
``postgres`` on 127.0.0.1 at a free port (Unix socket in the same folder, fsync off: the
data is disposable). PostgreSQL refuses to run as root, so when the tests run as root the
server runs as the ``postgres`` system user (through ``runuser``), which is created if
missing. ``skip_reason()`` says why a server cannot be started (binaries absent), so
tests can ``pytest.skip`` with a clear message.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN_CANDIDATES = [
    os.environ.get("PROCSKY_PG_BIN", ""),
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
]


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    for cand in PG_BIN_CANDIDATES:
        if cand and all((Path(cand) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(cand)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def skip_reason() -> str | None:
    """Why a server cannot be started here, or None if it can."""
    if find_bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
            "/usr/lib/postgresql/*/bin or on PATH; apt-get install postgresql, or set "
            "PROCSKY_PG_BIN"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed; pip install 'procsky[postgres]'"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and `runuser` is missing: cannot drop to an unprivileged user"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A running throw-away PostgreSQL server (use as a context manager)."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.workdir: Path | None = None
        self.port: int | None = None
        self.user = "postgres"
        self._as_user: list[str] = []
        self.running = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> PgServer:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="procsky-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            _ensure_system_user("postgres")
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        data = self.workdir / "data"
        self._run(
            [str(self.bin_dir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"]
        )
        last_error = None
        for _attempt in range(3):  # a free port may be taken between probe and bind
            self.port = _free_port()
            opts = (
                f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=60"
            )
            try:
                self._run(
                    [
                        str(self.bin_dir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-o",
                        opts,
                        "-l",
                        str(self.workdir / "postgres.log"),
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                )
                self.running = True
                return self
            except RuntimeError as exc:
                last_error = exc
        self.stop()
        raise RuntimeError(f"could not start PostgreSQL: {last_error}")

    def stop(self) -> None:
        if self.workdir is None:
            return
        if self.running:
            try:
                self._run(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.workdir / "data"), "-m", "immediate", "-w", "stop"]
                )
            except RuntimeError:
                pass
            self.running = False
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of database ``dbname``."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create a new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"procsky_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.workdir / "postgres.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(self._as_user + cmd, capture_output=True, text=True, timeout=120, cwd="/tmp")
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()} "
                f"{proc.stdout.strip()[-500:]} {self.log()[-1000:]}"
            )


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
