"""SQLite back end: one file shared by every worker process.

WAL mode (readers never block the writer), ``synchronous=NORMAL`` (durable across process
crashes; an OS crash may lose the last commits), and a busy timeout so concurrent writers wait
for each other instead of failing (and no call waits longer than that). Write transactions are
``BEGIN IMMEDIATE``: the write lock is taken up front, so two processes migrating or inserting
at once queue instead of deadlocking.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["SQLiteBackend"]

# Primary result codes that mean "not now" rather than "never for these rows": busy, locked,
# out of memory, read-only (permissions), interrupted, I/O error, corrupt, disk full, cannot
# open, lock protocol, not a database. SQLITE_ERROR (syntax, no such table/column), CONSTRAINT,
# MISMATCH, TOOBIG and RANGE are permanent.
_TRANSIENT_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26})
_PROGRESS_STEPS = 10_000  # virtual machine steps between two looks at a read's deadline


class SQLiteBackend:
    """A connection to a SQLite file. Connects on construction."""

    day_expr = "date(started_at, 'unixepoch')"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0,
                 read_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.read_timeout = read_timeout
        self.conn = self._connect()
        # bound parameters one statement may have (SQLStore.insert_many sizes its INSERTs by it)
        self.max_parameters = self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # private from the start; SQLite gives -wal/-shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            _use_wal(conn, self.busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None:  # no code (e.g. a closed connection): an unusable connection
                return isinstance(exc, sqlite3.OperationalError | sqlite3.InterfaceError)
            return code & 0xFF in _TRANSIENT_CODES
        return isinstance(exc, OSError)

    def sql(self, sql: str) -> str:
        return sql

    @contextmanager
    def transaction(self, *, migrating: bool = False) -> Iterator[Any]:
        with closing(self.conn.cursor()) as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.rollback()
                raise
            self.conn.commit()

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        """A cursor for reads; with ``read_timeout``, past that many seconds the statement
        fails ("interrupted"), however much it still has to read."""
        if self.read_timeout is None:
            with closing(self.conn.cursor()) as cur:
                yield cur
            return
        deadline = time.monotonic() + self.read_timeout
        self.conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
        try:
            with closing(self.conn.cursor()) as cur:
                yield cur
        finally:
            with suppress(sqlite3.ProgrammingError):  # closed meanwhile (interrupt, shutdown)
                self.conn.set_progress_handler(None, 0)

    def interrupt(self) -> None:
        with suppress(sqlite3.ProgrammingError):  # already closed: nothing runs on it
            self.conn.interrupt()

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.path)!r})"


def _use_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode (it stays so). Switching needs the file to itself, and SQLite
    answers "database is locked" at once, without its busy handler, while another connection
    (another thread or process) is setting up or migrating a new file: so look first, and
    retry until ``timeout``. Runs in a thread, never on the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in (5, 6) or time.monotonic() >= deadline:
                raise  # not busy/locked, or for too long
        time.sleep(0.01)
