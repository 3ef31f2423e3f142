"""Usage stores (SQLite and PostgreSQL, same tests): schema, exactly-once inserts, look-ups,
aggregation, concurrency between processes, and that API keys never reach the database."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from trioproxy.accounting.keys import fingerprint
from trioproxy.accounting.locations import (
    default_database_url,
    open_store,
    resolve_database_url,
    secret_path_for,
    spill_path_for,
    sqlite_path,
)
from trioproxy.accounting.migrations import MIGRATIONS
from trioproxy.accounting.record import COLUMNS, LATENCY_FIELDS, UsageRecord

PG_URL = os.environ.get("TRIOPROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY = 86400.0
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def make_record(i: int = 0, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req_{i}", "started_at": T0 + i, "provider": "anthropic",
        "api": "anthropic.messages", "model": "claude-sonnet-4-5", "input_tokens": 100,
        "output_tokens": 10, "cost_usd": 0.001,
    }
    values.update(fields)
    return UsageRecord(**values)


def _postgres_schema_url() -> Iterator[str]:
    """A fresh schema per test (dropped after), so concurrent test runs never collide."""
    schema = f"tp_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} is required on CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set CI=1 to make this fail): {exc}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in PG_URL else "?"
            yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL of this kind ("sqlite" or "postgres"): for parametrised fixtures."""
    if kind == "sqlite":
        yield f"sqlite://{tmp_path}/usage.db"
    else:
        yield from _postgres_schema_url()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for each store kind."""
    yield from database_url(request.param, tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    s = open_store(store_url)
    s.migrate()
    yield s
    s.close()


def count_rows(url: str) -> int:
    s = open_store(url)
    try:
        with s._cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM usage_records")
            return int(cur.fetchone()[0])
    finally:
        s.close()


# -- schema -----------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_versioned(store: Any) -> None:
    store.migrate()
    store.migrate()
    with store._cursor() as cur:
        cur.execute("SELECT version FROM schema_migrations")
        assert sorted(row[0] for row in cur.fetchall()) == [v for v, _ in MIGRATIONS]


def test_a_version_1_database_is_migrated_and_its_old_rows_still_found(store_url: str) -> None:
    s = open_store(store_url)
    try:  # a database written by the previous release: schema v1 only, one old row
        v1 = MIGRATIONS[0][1]
        with s._transaction(migrating=True) as cur:
            cur.execute("CREATE TABLE schema_migrations "
                        "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            for statement in v1:
                cur.execute(statement)
            cur.execute("INSERT INTO schema_migrations VALUES (1, 0)")
            later = {"correlation_id", *LATENCY_FIELDS}  # columns added by migrations 2, 3
            old_cols = [c for c in COLUMNS if c not in later]
            cur.execute(s._sql(f"INSERT INTO usage_records ({', '.join(old_cols)}) "
                               f"VALUES ({', '.join('?' * len(old_cols))})"),
                        tuple(v for c, v in zip(COLUMNS, make_record(1, response_id="msg_1")
                                                .to_row(), strict=True) if c not in later))
        s.migrate()
        s.insert_many([make_record(2, correlation_id="gw-1")])
        assert [(r.request_id, r.correlation_id) for r in s.find("msg_1")] == [("req_1", None)]
        assert [r.request_id for r in s.find("gw-1")] == ["req_2"]
    finally:
        s.close()


def test_sqlite_uses_wal_normal_sync_and_busy_timeout(tmp_path: Path) -> None:
    s = open_store(str(tmp_path / "u.db"))
    try:
        pragma = {p: s.backend.conn.execute(f"PRAGMA {p}").fetchone()[0]
                  for p in ("journal_mode", "synchronous", "busy_timeout")}
    finally:
        s.close()
    assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 10000}
    assert (tmp_path / "u.db").stat().st_mode & 0o777 == 0o600


# -- insert / get -----------------------------------------------------------------------------


def test_wal_switch_retries_a_locked_file_and_gives_up_on_other_errors() -> None:
    import sqlite3

    from trioproxy.accounting.sqlite import _use_wal

    def error(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("database is locked" if code == 5 else "disk I/O error")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    class Conn:  # another connection is setting up the new file: locked twice, then free
        def __init__(self, failures: list[int]) -> None:
            self.failures, self.mode, self.calls = failures, "delete", 0

        def execute(self, sql: str) -> Any:
            self.calls += 1
            if self.failures:
                raise error(self.failures.pop(0))
            if sql.endswith("= WAL"):
                self.mode = "wal"
            return self

        def fetchone(self) -> tuple[str]:
            return (self.mode,)

    conn = Conn([5, 5])
    _use_wal(conn, 10.0)  # type: ignore[arg-type]
    assert conn.mode == "wal"
    already = Conn([])
    already.mode = "wal"
    _use_wal(already, 10.0)  # type: ignore[arg-type]
    assert already.calls == 1  # looked, nothing to switch
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _use_wal(Conn([10]), 10.0)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _use_wal(Conn([5] * 1000), 0.0)  # type: ignore[arg-type]


def test_every_field_round_trips(store: Any) -> None:
    rec = make_record(
        1, transport="http", method="POST", path="/v1/messages", status=200, streamed=True,
        model_requested="claude-sonnet-4-5", response_id="msg_1", upstream_request_id="req_up_1",
        cache_read_tokens=50, cache_write_tokens=20, reasoning_tokens=3, audio_input_tokens=1,
        audio_output_tokens=2, accepted_prediction_tokens=4, rejected_prediction_tokens=5,
        raw_usage={"input_tokens": 30, "cache_read_input_tokens": 50}, stop_reason="end_turn",
        end_reason="complete", error=None, ttfb_ms=12.5, duration_ms=99.25, max_gap_ms=40.0,
        bytes_in=1234, bytes_out=5678, key_fingerprint="0123456789abcdef", key_last4="wxyz",
        user_agent="claude-cli/1.0", session_id="sess-1", extra={"bypass": True, "n": [1, 2]},
    )
    assert store.insert_many([rec]) == 1
    assert store.get("req_1") == rec


def test_streamed_false_and_nul_bytes_survive(store: Any) -> None:
    rec = make_record(2, streamed=False, error="bad\x00byte", raw_usage={"x": "a\x00b"})
    store.insert_many([rec])
    got = store.get("req_2")
    assert got.streamed is False
    assert got.error == "bad\ufffdbyte"
    assert got.raw_usage == {"x": "a\x00b"}


def test_insert_is_exactly_once_per_request_id(store: Any, store_url: str) -> None:
    batch = [make_record(i) for i in range(10)]
    assert store.insert_many(batch) == 10
    assert store.insert_many(batch + [make_record(10)]) == 1
    assert store.insert_many([]) == 0
    assert count_rows(store_url) == 11


def test_get_matches_each_of_the_three_ids(store: Any) -> None:
    store.insert_many([make_record(1, upstream_request_id="req_011CUp", response_id="msg_01A")])
    for id_any in ("req_1", "req_011CUp", "msg_01A"):
        got = store.get(id_any)
        assert got is not None and got.request_id == "req_1"
    assert store.get("nope") is None


def test_find_returns_every_record_with_the_id_newest_first(store: Any) -> None:
    store.insert_many([
        make_record(1, correlation_id="gw-7", key_fingerprint="fa"),
        make_record(2, started_at=T0 + 60, correlation_id="gw-7", key_fingerprint="fb"),
        make_record(3, started_at=T0 + 30, upstream_request_id="gw-7", key_fingerprint="fa"),
        make_record(4, correlation_id="other"),
    ])
    assert [r.request_id for r in store.find("gw-7")] == ["req_2", "req_3", "req_1"]
    assert [r.request_id for r in store.find("gw-7", key_fingerprint="fa")] == ["req_3", "req_1"]
    assert [r.request_id for r in store.find("gw-7", limit=1)] == ["req_2"]
    assert store.find("gw-7", key_fingerprint="fc") == []


def test_another_keys_many_records_cannot_crowd_out_yours(store: Any) -> None:
    store.insert_many([make_record(i, started_at=T0 + i, correlation_id="same",
                                   key_fingerprint="other") for i in range(1, 120)])
    store.insert_many([make_record(0, started_at=T0, correlation_id="same", key_fingerprint="me")])
    assert len(store.find("same")) == 100  # bounded
    assert [r.request_id for r in store.find("same", key_fingerprint="me")] == ["req_0"]


def test_get_prefers_the_exact_request_id(store: Any) -> None:
    # a later record whose response id happens to equal another record's request id
    store.insert_many([make_record(1), make_record(2, started_at=T0 + 50, response_id="req_1")])
    assert store.get("req_1").request_id == "req_1"


# -- aggregation ------------------------------------------------------------------------------


@pytest.fixture
def mixed(store: Any) -> Any:
    store.insert_many([
        make_record(1, key_fingerprint="fa", key_last4="aaaa", session_id="s1", cost_usd=0.5,
                    cache_read_tokens=40, cache_write_tokens=5, reasoning_tokens=0),
        make_record(2, key_fingerprint="fa", key_last4="aaaa", session_id="s1", cost_usd=0.25),
        make_record(3, started_at=T0 + DAY, model="gpt-5", provider="openai",
                    key_fingerprint="fb", key_last4="bbbb", cost_usd=1.0, reasoning_tokens=7),
        make_record(4, started_at=T0 + 2 * DAY, model="mystery-1", cost_usd=None,
                    key_fingerprint="fb", key_last4="bbbb", session_id="s2"),
        make_record(5, started_at=T0 + 2 * DAY, model=None, model_requested="gpt-4o",
                    cost_usd=None, input_tokens=None, output_tokens=None),
    ])
    return store


def test_aggregate_by_model(mixed: Any) -> None:
    groups = {g["group"]: g for g in mixed.aggregate("model")}
    assert set(groups) == {"claude-sonnet-4-5", "gpt-5", "mystery-1", "gpt-4o"}
    claude = groups["claude-sonnet-4-5"]
    assert (claude["requests"], claude["input_tokens"], claude["output_tokens"]) == (2, 200, 20)
    assert (claude["cache_read_tokens"], claude["cache_write_tokens"]) == (40, 5)
    assert claude["cost_usd"] == pytest.approx(0.75)
    assert groups["gpt-5"]["reasoning_tokens"] == 7
    unknown = groups["mystery-1"]
    assert unknown["cost_usd"] is None and unknown["unpriced_requests"] == 1
    assert groups["gpt-4o"]["input_tokens"] == 0  # unknown usage sums as 0, counted as unpriced
    assert mixed.aggregate("model")[0]["group"] == "gpt-5"  # most expensive first


def test_aggregate_by_key_session_and_day(mixed: Any) -> None:
    keys = {g["group"]: g for g in mixed.aggregate("key")}
    assert keys["fa"]["requests"] == 2 and keys["fa"]["key_last4"] == "aaaa"
    assert keys["fb"]["cost_usd"] == pytest.approx(1.0) and keys["fb"]["unpriced_requests"] == 1
    assert keys[None]["requests"] == 1
    sessions = {g["group"]: g["requests"] for g in mixed.aggregate("session")}
    assert sessions == {"s1": 2, "s2": 1, None: 2}
    days = [(g["group"], g["requests"]) for g in mixed.aggregate("day")]
    assert days == [("2025-06-15", 2), ("2025-06-16", 1), ("2025-06-17", 2)]


def test_aggregate_time_window(mixed: Any) -> None:
    groups = mixed.aggregate("model", since=T0 + DAY, until=T0 + 2 * DAY)
    assert [(g["group"], g["requests"]) for g in groups] == [("gpt-5", 1)]
    with pytest.raises(ValueError, match="group_by"):
        mixed.aggregate("colour")


# -- keys never stored ------------------------------------------------------------------------


def test_api_key_never_reaches_the_database(store: Any, store_url: str) -> None:
    key = "sk-ant-api03-" + secrets.token_urlsafe(32)
    fp, last4 = fingerprint(key, b"s" * 32)
    store.insert_many([make_record(1, key_fingerprint=fp, key_last4=last4)])
    assert store.get("req_1").key_fingerprint == fp
    if store_url.startswith("sqlite"):
        store.close()  # checkpoints the WAL into the file
        path = sqlite_path(store_url)
        data = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.is_file())
        assert fp.encode() in data  # the check below looks at the right bytes
    else:
        with store._cursor() as cur:
            cur.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_records")
            data = repr(cur.fetchall()).encode()
    assert key.encode() not in data
    assert key[:-4].encode() not in data


# -- several processes ------------------------------------------------------------------------

_WRITER_PROCESS = textwrap.dedent("""
    import functools, sys, time, trio
    from trioproxy.accounting import UsageRecord, open_store, open_usage_writer
    url, prefix, n, start_at, spill = sys.argv[1:6]
    async def main():
        await trio.sleep(max(0.0, float(start_at) - time.time()))
        async with open_usage_writer(functools.partial(open_store, url), batch_size=7,
                                     spill_path=spill) as writer:
            for i in range(int(n)):
                writer.submit(UsageRecord(request_id=f"{prefix}-{i}", started_at=time.time()))
                if i % 50 == 0:
                    await trio.sleep(0)
            assert await writer.flush(15)
            stats = writer.statistics()
        assert stats.written == int(n) and stats.spilled == 0, stats
    trio.run(main)
""")


def test_two_processes_write_the_same_store_exactly_once(store_url: str, tmp_path: Path) -> None:
    n = 300
    start_at = time.time() + 0.7  # both migrate a fresh database, then insert, at once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER_PROCESS, store_url, prefix, str(n), str(start_at),
             str(tmp_path / f"spill-{prefix}.jsonl")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for prefix in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
    assert count_rows(store_url) == 2 * n


# -- URLs and paths ---------------------------------------------------------------------------


def test_database_url_forms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the data home is a parameter (the settings read $XDG_DATA_HOME), never read here
    monkeypatch.setenv("XDG_DATA_HOME", "/not/used")
    monkeypatch.setenv("TRIOPROXY_DATABASE_URL", "postgres://not.used/usage")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_database_url(tmp_path) == f"sqlite://{tmp_path}/trioproxy/usage.db"
    assert sqlite_path(default_database_url()) == tmp_path / ".local/share/trioproxy/usage.db"
    assert resolve_database_url(None, tmp_path) == f"sqlite://{tmp_path}/trioproxy/usage.db"
    assert resolve_database_url("postgres://db/u", tmp_path) == "postgres://db/u"
    assert spill_path_for("postgres://db/u", tmp_path) == tmp_path / "trioproxy/usage-spill.jsonl"
    assert sqlite_path("sqlite:///abs/u.db") == Path("/abs/u.db")
    assert sqlite_path("sqlite:rel/u.db") == Path("rel/u.db")
    assert sqlite_path("/plain/u.db") == Path("/plain/u.db")
    assert spill_path_for("/d/u.db") == Path("/d/u.db.spill.jsonl")
    assert secret_path_for("sqlite:///d/u.db") == Path("/d/u.db.fingerprint-secret")
    with pytest.raises(ValueError, match="scheme"):
        open_store("mysql://db/usage")
