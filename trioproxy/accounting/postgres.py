"""PostgreSQL back end (psycopg 3, synchronous API, used from the writer and look-up threads).

One connection in autocommit mode with explicit transactions. Migrations hold a transaction-
scoped advisory lock keyed on the current schema, so processes on several hosts starting at
once apply them exactly once. Several hosts sharing one database must share
``TRIOPROXY_FINGERPRINT_SECRET`` (see :mod:`.keys`).

Every call is bounded by ``timeout``: ``connect_timeout`` for connecting, ``statement_timeout``
for a slow server, and a client-side deadline for a server (or a network path) that accepts
and then never answers: past it the socket is shut down, so the blocked call fails at once.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = ["PostgresBackend"]

_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('trioproxy.migrate:' || " \
    "coalesce(current_schema(), '')))"

# SQLSTATE classes that mean "not now": invalid transaction state (a read-only standby), no
# connection, insufficient resources, object in use (lock not available), operator intervention
# (admin shutdown, statement timeout), system error (I/O), transaction rollback (deadlock,
# serialisation), internal error. Syntax/access (42), data (22), integrity (23) are permanent.
_TRANSIENT_CLASSES = frozenset({"08", "25", "40", "53", "55", "57", "58", "XX"})
_DEADLINE_MARGIN = 2.0  # seconds past statement_timeout before the client gives up


class PostgresBackend:
    """A connection to PostgreSQL. Connects on construction."""

    day_expr = "to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        kwargs: dict[str, Any] = {"autocommit": True}
        params = conninfo_to_dict(url)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(2, math.ceil(timeout))
        if "application_name" not in params:
            kwargs["application_name"] = "trioproxy"
        self.conn = psycopg.connect(url, **kwargs)
        try:  # a slow server must not pin the calling thread
            with self._deadline():
                self.conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        except BaseException:
            self.conn.close()
            raise

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, psycopg.Error):
            state = exc.sqlstate
            if state is None:  # connection refused / lost / timed out, connection closed
                return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            return state[:2] in _TRANSIENT_CLASSES
        return isinstance(exc, OSError)

    def sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _deadline(self) -> Iterator[None]:
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            # wakes the blocked read: the call fails instead of waiting forever (a connection
            # already closed has nothing blocked on it)
            with suppress(OSError, psycopg.Error), \
                    socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout + _DEADLINE_MARGIN, cut)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception as exc:
            if expired.is_set():
                raise TimeoutError(
                    f"no answer from PostgreSQL within {self.timeout + _DEADLINE_MARGIN:g}s"
                ) from exc
            raise
        finally:
            timer.cancel()

    @contextmanager
    def transaction(self, *, migrating: bool = False) -> Iterator[Any]:
        with self._deadline(), self.conn.transaction(), self.conn.cursor() as cur:
            if migrating:
                cur.execute(_MIGRATION_LOCK)
            yield cur

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        with self._deadline(), self.conn.cursor() as cur:
            yield cur

    def interrupt(self) -> None:
        """Ask the server to cancel the running statement (a short network call)."""
        with suppress(psycopg.Error, OSError):
            self.conn.cancel_safe(timeout=min(self.timeout, 3.0))

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        info = conninfo_to_dict(self.url)
        return f"PostgresBackend(host={info.get('host')!r}, dbname={info.get('dbname')!r})"
