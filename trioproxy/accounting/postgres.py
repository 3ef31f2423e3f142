"""PostgreSQL usage store (psycopg 3, synchronous API, used from the writer thread).

One connection in autocommit mode with explicit transactions. Migrations hold a transaction-
scoped advisory lock keyed on the current schema, so processes on several hosts starting at
once apply them exactly once. Several hosts sharing one database must share
``TRIOPROXY_FINGERPRINT_SECRET`` (see :mod:`.keys`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .store import SQLStore

__all__ = ["PostgresStore"]

_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('trioproxy.migrate:' || " \
    "coalesce(current_schema(), '')))"


class PostgresStore(SQLStore):
    """A usage store in PostgreSQL. Connects on construction."""

    transient_errors = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
    day_expr = "to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(
        self, url: str, *, connect_timeout: int = 10, statement_timeout_ms: int = 60_000
    ) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"autocommit": True}
        params = conninfo_to_dict(url)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = connect_timeout
        if "application_name" not in params:
            kwargs["application_name"] = "trioproxy"
        self._conn = psycopg.connect(url, **kwargs)
        try:  # a hung server must not pin the writer thread forever
            self._conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
        except BaseException:
            self._conn.close()
            raise

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self, *, migrating: bool = False) -> Iterator[Any]:
        with self._conn.transaction(), self._conn.cursor() as cur:
            if migrating:
                cur.execute(_MIGRATION_LOCK)
            yield cur

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._conn.cursor() as cur:
            yield cur

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        info = conninfo_to_dict(self.url)
        return f"PostgresStore(host={info.get('host')!r}, dbname={info.get('dbname')!r})"
