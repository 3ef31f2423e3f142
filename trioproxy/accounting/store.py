"""Usage stores: the common synchronous interface and the SQL both back ends share.

Stores are synchronous and used from threads, one thread at a time per store object (the
writer thread has its own; look-ups use another). Both back ends share one schema and one set
of SQL statements in :class:`SQLStore`; a back end (:mod:`.sqlite`, :mod:`.postgres`) supplies
the connection, transactions, the few dialect differences, a bound on every call and the
transient/permanent classification of its errors. Back ends import nothing from here;
:func:`.locations.open_store` picks and imports them, so there is no import cycle. Inserts are
``ON CONFLICT (request_id) DO NOTHING``, so a batch that is retried (or a spill file read twice)
never duplicates a row.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from functools import lru_cache
from typing import Any, Protocol

from .migrations import MIGRATIONS
from .record import COLUMNS, UsageRecord

__all__ = ["GROUP_BY", "LOOKUP_LIMIT", "SQLBackend", "SQLStore", "Store", "StoreUnavailable"]

log = logging.getLogger("trioproxy.accounting")

GROUP_BY: tuple[str, ...] = (
    "model", "key", "session", "day", "hour", "provider", "api", "status", "outcome",
)
LOOKUP_LIMIT = 100  # candidates returned by one look-up
ROWS_PER_INSERT = 64  # rows in one multi-row INSERT, where the back end allows it (SQLite)

_COLS = ", ".join(COLUMNS)
_INSERT = (
    f"INSERT INTO usage_records ({_COLS}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_ROW = f"({', '.join('?' * len(COLUMNS))})"
_FIND = (
    f"SELECT {_COLS} FROM usage_records "
    "WHERE (request_id = ? OR correlation_id = ? OR upstream_request_id = ? OR response_id = ?)"
)
_SUMS = (
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
)


class StoreUnavailable(Exception):
    """The store cannot answer now (down, hung, or refusing every statement): retry later.

    ``pending`` holds the matching records still waiting in the writer's memory, if any.
    """

    def __init__(self, message: str, pending: Sequence[UsageRecord] = ()) -> None:
        super().__init__(message)
        self.pending = list(pending)


class Store(abc.ABC):
    """The synchronous store interface (used from one thread at a time)."""

    @abc.abstractmethod
    def migrate(self) -> None: ...

    @abc.abstractmethod
    def insert_many(self, records: Sequence[UsageRecord]) -> int:
        """Insert records, skipping request ids already stored; returns the rows added."""

    @abc.abstractmethod
    def find(
        self, id_any: str, *, key_fingerprint: str | None = None, limit: int = LOOKUP_LIMIT
    ) -> list[UsageRecord]:
        """Every record whose request id, correlation id, upstream request id or response id
        is ``id_any`` (only ``key_fingerprint``'s when given), newest first, at most ``limit``."""

    def get(self, id_any: str) -> UsageRecord | None:
        """One record for ``id_any``, for an operator who sees every key (``trioproxy usage
        --id``): the record with that proxy request id, else the newest match."""
        found = self.find(id_any)
        return next((r for r in found if r.request_id == id_any), found[0] if found else None)

    def probe(self) -> None:
        """Raise unless the store accepts a plain record now (written, then rolled back)."""

    @abc.abstractmethod
    def aggregate(
        self, group_by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Totals per group (one of :data:`GROUP_BY`; days and hours in UTC) over
        ``since <= started_at < until``."""

    def latency_rows(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """The latency figures of completed 2xx responses of the generation APIs over
        ``since <= started_at < until``, oldest first: dicts with the keys of
        ``trioproxy.accounting.latency_summary.ROW_KEYS`` (``duration_ms`` is the record's ``e2e_ms``)."""
        raise NotImplementedError

    def latency_summary(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        """Per-model latency percentiles of the rows :meth:`latency_rows` would return,
        aggregated in the database (the usage page; see :mod:`.page_query`)."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Make a call running in another thread fail at once (shutdown); thread-safe."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def is_transient(self, exc: BaseException) -> bool:
        """True when ``exc`` means "unavailable right now" (retry the same records later);
        False when the store refuses these records for good (syntax, schema, data, constraint)."""
        return isinstance(exc, OSError)


class SQLBackend(Protocol):
    """What a SQL back end supplies to :class:`SQLStore` (see :mod:`.sqlite`, :mod:`.postgres`)."""

    day_expr: str  # SQL giving 'YYYY-MM-DD' (UTC) of started_at

    def transaction(self, *, migrating: bool = False) -> AbstractContextManager[Any]:
        """A write transaction yielding a cursor; ``migrating`` takes the migration lock."""

    def cursor(self) -> AbstractContextManager[Any]:
        """A cursor for reads outside an explicit transaction."""

    def sql(self, sql: str) -> str:
        """Dialect placeholders (statements are written with ``?``)."""

    def is_transient(self, exc: BaseException) -> bool: ...

    def interrupt(self) -> None:
        """Make the statement running in another thread fail at once; thread-safe."""

    def close(self) -> None: ...


class _Rollback(Exception):
    pass


class SQLStore(Store):
    """Shared SQL for both back ends."""

    def __init__(self, backend: SQLBackend) -> None:
        self.backend = backend
        self.day_expr = backend.day_expr

    def _transaction(self, *, migrating: bool = False) -> AbstractContextManager[Any]:
        return self.backend.transaction(migrating=migrating)

    def _cursor(self) -> AbstractContextManager[Any]:
        return self.backend.cursor()

    def _sql(self, sql: str) -> str:
        return self.backend.sql(sql)

    def is_transient(self, exc: BaseException) -> bool:
        return self.backend.is_transient(exc)

    def close(self) -> None:
        self.backend.close()

    def interrupt(self) -> None:
        self.backend.interrupt()

    def __repr__(self) -> str:
        return f"SQLStore({self.backend!r})"

    def migrate(self) -> None:
        """Apply pending migrations, serialised against other processes."""
        with self._transaction(migrating=True) as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    cur.execute(statement)
                cur.execute(
                    self._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                    (version, time.time()),
                )
                log.info("usage store: applied schema migration %d", version)
            latest = MIGRATIONS[-1][0]
            if done and max(done) > latest:
                log.warning("usage store schema (v%d) is newer than this trioproxy (v%d)",
                            max(done), latest)

    def insert_many(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        rows = [r.to_row() for r in records]
        most = min(ROWS_PER_INSERT, getattr(self.backend, "max_parameters", 0) // len(COLUMNS))
        with self._transaction() as cur:
            if most <= 1:
                cur.executemany(self._sql(_INSERT), rows)
                return max(cur.rowcount, 0)
            return _insert_chunked(cur, rows, most)

    def probe(self) -> None:
        row = UsageRecord(request_id="trioproxy-probe", started_at=0.0).to_row()
        try:
            with self._transaction() as cur:
                cur.execute(self._sql(_INSERT), row)
                raise _Rollback
        except _Rollback:
            pass

    def find(
        self, id_any: str, *, key_fingerprint: str | None = None, limit: int = LOOKUP_LIMIT
    ) -> list[UsageRecord]:
        sql, params = _FIND, [id_any] * 4
        if key_fingerprint is not None:
            sql += " AND key_fingerprint = ?"
            params.append(key_fingerprint)
        sql += " ORDER BY started_at DESC, request_id LIMIT ?"
        params.append(int(limit))
        with self._cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            rows = cur.fetchall()
        return [UsageRecord.from_row(row) for row in rows]

    def recent(self, limit: int = 20, since: float | None = None) -> list[UsageRecord]:
        """The newest records (started at or after ``since``), newest first, at most ``limit``."""
        where, params = _time_filter(since, None)
        sql = f"SELECT {_COLS} FROM usage_records{where} ORDER BY started_at DESC, request_id LIMIT ?"
        with self._cursor() as cur:
            cur.execute(self._sql(sql), (*params, int(limit)))
            rows = cur.fetchall()
        return [UsageRecord.from_row(row) for row in rows]

    def aggregate(
        self, group_by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        exprs = {
            "model": "COALESCE(model, model_requested)",
            "key": "key_fingerprint",
            "session": "session_id",
            "day": self.day_expr,
            # floor(started_at / 3600) in both dialects (NUMERIC rounds half away from zero)
            "hour": "ROUND(CAST(started_at / 3600 - 0.5 AS NUMERIC))",
            "provider": "provider",
            "api": "api",
            "status": "status",
            "outcome": _OUTCOME,
        }
        if group_by not in exprs:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
        where, params = _time_filter(since, until)
        sums = ", ".join(f"SUM({c})" for c in _SUMS)
        sql = (
            f"SELECT {exprs[group_by]}, {_OUTCOME}, {_BILLING}, COUNT(*), {sums}, "
            f"SUM(cost_usd), MAX(key_last4), MIN(started_at), MAX(started_at) "
            f"FROM usage_records{where} GROUP BY 1, 2, 3"
        )
        with self._cursor() as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        groups: dict[Any, dict[str, Any]] = {}
        for row in rows:
            _group_dict(groups, group_by, row)
        return _sort_groups(list(groups.values()), group_by)

    def latency_rows(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        where, params = _time_filter(since, until)
        where = f"{where} AND {_LATENCY_ROWS}" if where else f" WHERE {_LATENCY_ROWS}"
        sql = (f"SELECT {', '.join(expr for _, expr in _LATENCY_SELECT)} FROM usage_records"
               f"{where} ORDER BY started_at, request_id")
        with self._cursor() as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        keys = [key for key, _ in _LATENCY_SELECT]
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def latency_summary(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        from .page_query import latency_summary

        where, params = _time_filter(since, until)
        where = f"{where} AND {_LATENCY_ROWS}" if where else f" WHERE {_LATENCY_ROWS}"
        with self._cursor() as cur:
            return latency_summary(cur, self._sql, where, params, _LATENCY_SELECT)


# ``trioproxy latency`` rows: (key, SQL) in latency_report.ROW_KEYS order, over the responses a
# benchmark counts (complete, 2xx, from a generation API, relayed so measured).
_LATENCY_SELECT = (
    ("started_at", "started_at"), ("model", "COALESCE(model, model_requested)"),
    ("provider", "provider"), ("api", "api"), ("key_fingerprint", "key_fingerprint"),
    ("session_id", "session_id"), ("ttft_ms", "ttft_ms"), ("itl_p50_ms", "itl_p50_ms"),
    ("itl_p90_ms", "itl_p90_ms"), ("itl_p99_ms", "itl_p99_ms"), ("itl_max_ms", "itl_max_ms"),
    ("itl_count", "itl_count"), ("tpot_ms", "tpot_ms"), ("tokens_per_s", "tokens_per_s"),
    ("duration_ms", "e2e_ms"), ("output_tokens", "output_tokens"),
    ("last_token_ms", "last_token_ms"), ("itl_sketch", "itl_sketch"),
)
_LATENCY_ROWS = (
    "e2e_ms IS NOT NULL AND end_reason = 'complete' AND status >= 200 AND status < 300 "
    "AND api IN ('anthropic.messages', 'openai.chat', 'openai.responses')"
)


# What a request came to (``ok``, ``upstream_4xx``/``upstream_5xx`` for an upstream's error
# answer, else why it ended: ``client_disconnect``, ``upstream_error``, ``connect_error``,
# ``timeout``, ``rejected``, ``cancelled``, ...).
_OUTCOME = (
    "CASE WHEN end_reason = 'complete' AND status >= 500 THEN 'upstream_5xx' "
    "WHEN end_reason = 'complete' AND status >= 400 THEN 'upstream_4xx' "
    "WHEN end_reason = 'complete' THEN 'ok' "
    "ELSE COALESCE(end_reason, 'unknown') END"
)
# Whether a request cost something: priced; unpriced (tokens, or a model answered, but no
# known price); or free by nature: it never reached a model (404, 413, connect failures,
# refused or errored before generation, other endpoints such as GET /v1/models).
_BILLING = (
    "CASE WHEN cost_usd IS NOT NULL THEN 'priced' "
    "WHEN COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0) > 0 THEN 'unpriced' "
    "WHEN api IN ('anthropic.messages', 'openai.chat', 'openai.responses') AND status < 400 "
    "THEN 'unpriced' "
    "WHEN end_reason = 'timeout' AND substr(error, 1, 21) = 'upstream read timeout' "
    "THEN 'unpriced' "
    "ELSE 'free' END"
)


def _insert_chunked(cur: Any, rows: list[tuple[Any, ...]], most: int) -> int:
    """Insert ``rows`` with multi-row INSERTs of ``most`` rows, then of a quarter, a sixteenth..:
    SQLite releases the GIL for every statement step, so one step per row would make the writer
    thread and the event loop trade the GIL for every record; a few fixed sizes keep the
    statements in the connection's cache. Returns the rows added."""
    added = start = 0
    size = most
    while start < len(rows):
        if len(rows) - start < size:
            size = max(1, size // 4)
            continue
        sql = _insert_rows(size)
        while len(rows) - start >= size:
            cur.execute(sql, [v for row in rows[start:start + size] for v in row])
            added += max(cur.rowcount, 0)
            start += size
    return added


@lru_cache(maxsize=32)
def _insert_rows(n: int) -> str:
    """INSERT of ``n`` rows (cached: a few fixed sizes)."""
    return (f"INSERT INTO usage_records ({_COLS}) VALUES {', '.join([_ROW] * n)} "
            "ON CONFLICT (request_id) DO NOTHING")


def _time_filter(since: float | None, until: float | None) -> tuple[str, tuple[float, ...]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(float(since))
    if until is not None:
        clauses.append("started_at < ?")
        params.append(float(until))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def _group_dict(groups: dict[Any, dict[str, Any]], group_by: str, row: Sequence[Any]) -> None:
    """Fold one (group, outcome, billing) row into its group's totals."""
    group, outcome, billing, requests, *sums = row[:4 + len(_SUMS)]
    cost, last4, first_at, last_at = row[4 + len(_SUMS):]
    if group_by == "hour" and group is not None:
        group = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(int(group) * 3600))
    elif group_by == "status" and group is not None:
        group = int(group)
    out = groups.get(group)
    if out is None:
        out = groups[group] = {"group": group, "requests": 0, **dict.fromkeys(_SUMS, 0),
                               "cost_usd": None, "priced_requests": 0, "unpriced_requests": 0,
                               "free_requests": 0, "outcomes": {},
                               "first_at": first_at, "last_at": last_at}
        if group_by == "key":
            out["key_last4"] = last4
    n = int(requests)
    out["requests"] += n
    for name, v in zip(_SUMS, sums, strict=True):
        out[name] += int(v) if v is not None else 0
    out[f"{billing}_requests"] += n
    if cost is not None:
        out["cost_usd"] = (out["cost_usd"] or 0.0) + float(cost)
    out["outcomes"][outcome] = out["outcomes"].get(outcome, 0) + n
    if group_by == "key" and last4 and not out["key_last4"]:
        out["key_last4"] = last4
    out["first_at"] = min(out["first_at"], first_at)
    out["last_at"] = max(out["last_at"], last_at)


def _sort_groups(groups: list[dict[str, Any]], group_by: str) -> list[dict[str, Any]]:
    for g in groups:  # nothing to price is free, not unknown
        if g["cost_usd"] is None and not g["unpriced_requests"]:
            g["cost_usd"] = 0.0
    if group_by in ("day", "hour", "status"):
        return sorted(groups, key=lambda g: (g["group"] is None, g["group"] or 0))
    return sorted(groups, key=lambda g: (-(g["cost_usd"] or 0.0), -g["requests"], str(g["group"])))
