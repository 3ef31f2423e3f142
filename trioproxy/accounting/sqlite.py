"""SQLite usage store: one file shared by every worker process.

WAL mode (readers never block the writer), ``synchronous=NORMAL`` (durable across process
crashes; an OS crash may lose the last commits), and a busy timeout so concurrent writers wait
for each other instead of failing. Write transactions are ``BEGIN IMMEDIATE``: the write lock is
taken up front, so two processes migrating or inserting at once queue instead of deadlocking.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from .store import SQLStore

__all__ = ["SQLiteStore"]


class SQLiteStore(SQLStore):
    """A usage store in a SQLite file. Connects on construction."""

    transient_errors = (sqlite3.OperationalError, OSError)  # locked, disk full, I/O, ...
    day_expr = "date(started_at, 'unixepoch')"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # private from the start; SQLite gives -wal/-shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _transaction(self, *, migrating: bool = False) -> Iterator[Any]:
        with closing(self._conn.cursor()) as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise
            self._conn.commit()

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with closing(self._conn.cursor()) as cur:
            yield cur

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
