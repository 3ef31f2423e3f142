"""The usage writer: never blocks, never drops, bounded memory, exactly once through outages
and restarts, and a record the store refuses never blocks the others."""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import UsageRecord
from trioproxy.accounting.spill import take_spill
from trioproxy.accounting.store import Store
from trioproxy.accounting.writer import append_spill, open_usage_writer

from .test_store import count_rows, database_url, make_record

FAST = {"retry_interval": 0.01, "shutdown_timeout": 5.0}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database_url(request.param, tmp_path)


@dataclass
class Faults:
    """What the store does wrong, consumed in order."""

    connect_failures: int = 0  # the factory raises (server down, file unreachable)
    insert_failures: int = 0  # insert raises before writing (disk full, locked)
    lost_acks: int = 0  # insert commits, then the connection dies before the answer
    refuse: set[str] = field(default_factory=set)  # request ids the store refuses for good
    refuse_with: Callable[[], Exception] = lambda: ValueError("value out of range for column")
    gate: threading.Event | None = None  # inserts wait for this (a stuck store)
    entered: threading.Event = field(default_factory=threading.Event)


class FaultyStore(Store):
    def __init__(self, inner: Store, faults: Faults) -> None:
        self.inner, self.faults = inner, faults

    def migrate(self) -> None:
        self.inner.migrate()

    def insert_many(self, records: Sequence[UsageRecord]) -> int:
        f = self.faults
        f.entered.set()
        if f.gate is not None:
            f.gate.wait(10)
        if f.insert_failures:
            f.insert_failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        if f.refuse & {r.request_id for r in records}:
            raise f.refuse_with()
        n = self.inner.insert_many(records)
        if f.lost_acks:
            f.lost_acks -= 1
            raise OSError(errno.ECONNRESET, "connection reset after commit")
        return n

    def find(self, id_any: str, *, key_fingerprint: str | None = None,
             limit: int = 100) -> list[UsageRecord]:
        return self.inner.find(id_any, key_fingerprint=key_fingerprint, limit=limit)

    def probe(self) -> None:
        self.inner.probe()

    def aggregate(self, group_by: str, since: float | None = None,
                  until: float | None = None) -> list[dict[str, Any]]:
        return self.inner.aggregate(group_by, since, until)

    def close(self) -> None:
        self.inner.close()

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, OSError) or self.inner.is_transient(exc)


def faulty_factory(url: str, faults: Faults) -> Callable[[], Store]:
    def factory() -> Store:
        if faults.connect_failures:
            faults.connect_failures -= 1
            raise OSError(errno.ECONNREFUSED, "connection refused")
        return FaultyStore(open_store(url), faults)

    return factory


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/usage.db"


def spill_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the normal path --------------------------------------------------------------------------


async def test_submitted_records_are_written_and_found_by_each_id(
    store_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(store_url), batch_size=16,
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            for i in range(50):
                w.submit(make_record(i, upstream_request_id=f"up_{i}", response_id=f"msg_{i}"))
            assert await w.flush(5)
            for id_any in ("req_7", "up_7", "msg_7"):
                assert [r.request_id for r in await w.lookup(id_any)] == ["req_7"]
            assert await w.lookup("missing") == []
            stats = w.statistics()
    assert (stats.queued, stats.written, stats.pending, stats.failed_attempts) == (50, 50, 0, 0)
    assert count_rows(store_url) == 50


async def test_lookup_finds_records_not_yet_written(tmp_path: Path) -> None:
    faults = Faults(gate=threading.Event())
    url = sqlite_url(tmp_path)
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(url, faults),
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            try:
                w.submit(make_record(1, response_id="resp_1", upstream_request_id="x-1"))
                w.submit(make_record(2))
                for id_any in ("req_1", "resp_1", "x-1", "req_2"):
                    assert len(await w.lookup(id_any)) == 1
                assert w.statistics().pending == 2
            finally:
                faults.gate.set()
            assert await w.flush(5)
    assert count_rows(url) == 2


async def test_submit_never_blocks_while_the_store_is_stuck(tmp_path: Path) -> None:
    faults = Faults(gate=threading.Event())
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), faults),
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            try:
                w.submit(make_record(0))
                await trio.to_thread.run_sync(faults.entered.wait, 5)  # writer is inside insert
                # A submit that waited for the store could only go on once this watchdog opens
                # the gate: the submits must all return with the gate still shut.
                rescued = threading.Event()
                watchdog = threading.Timer(30, lambda: (rescued.set(), faults.gate.set()))
                watchdog.start()
                for i in range(1, 5001):
                    w.submit(make_record(i))
                watchdog.cancel()
                assert not rescued.is_set() and not faults.gate.is_set()
                assert w.statistics().pending == 5001
            finally:
                faults.gate.set()
            assert await w.flush(5)
    assert count_rows(sqlite_url(tmp_path)) == 5001


async def test_queue_is_bounded_overflow_goes_to_the_spill_file_then_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioproxy.accounting")
    faults = Faults(gate=threading.Event())
    spill = tmp_path / "spill.jsonl"
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), faults), max_pending=5,
                                     batch_size=2, spill_path=spill, **FAST) as w:
            try:
                w.submit(make_record(0))
                await trio.to_thread.run_sync(faults.entered.wait, 5)
                for i in range(1, 21):
                    w.submit(make_record(i))
                stats = w.statistics()
                assert (stats.pending, stats.overflowed) == (5, 16)
                while w.statistics().spilled < 16:  # the spill thread appends them
                    await trio.sleep(0.01)
                assert len(spill_lines(spill)) == 16
            finally:
                faults.gate.set()
            assert await w.flush(5)  # the spilled records are streamed back in
            stats = w.statistics()
    assert (stats.written, stats.reloaded, stats.pending) == (21, 16, 0)
    assert count_rows(sqlite_url(tmp_path)) == 21
    assert not spill.exists() and list(tmp_path.glob("spill.jsonl*")) == []
    assert sum("usage queue full" in r.getMessage() for r in caplog.records) == 1


# -- failures ---------------------------------------------------------------------------------


async def test_store_down_then_back_loses_nothing_and_duplicates_nothing(
    store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trioproxy.accounting")
    faults = Faults(connect_failures=3, insert_failures=2, lost_acks=1)
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(store_url, faults), batch_size=25,
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            for i in range(100):
                w.submit(make_record(i))
            assert await w.flush(5)
            stats = w.statistics()
    assert stats.failed_attempts == 6
    assert (stats.written, stats.pending, stats.spilled, stats.store_available) == (100, 0, 0, True)
    assert count_rows(store_url) == 100  # the batch whose ack was lost is not duplicated
    messages = [r.getMessage() for r in caplog.records]
    assert sum("usage store unavailable" in m for m in messages) == 1  # once per outage
    assert sum("available again" in m for m in messages) == 1


async def test_flush_times_out_while_the_store_is_down(tmp_path: Path) -> None:
    faults = Faults(connect_failures=10**9)
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), faults),
                                     retry_interval=0.01, shutdown_timeout=0.1,
                                     spill_path=tmp_path / "spill.jsonl") as w:
            w.submit(make_record(1))
            assert not await w.flush(0.1)
            assert w.statistics().store_available is False
    assert len(spill_lines(tmp_path / "spill.jsonl")) == 1


async def test_refused_record_is_quarantined_and_the_rest_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="trioproxy.accounting")
    faults = Faults(refuse={"req_3"})
    spill = tmp_path / "spill.jsonl"
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), faults),
                                     spill_path=spill, **FAST) as w:
            for i in range(10):
                w.submit(make_record(i))
            assert await w.flush(5)
            stats = w.statistics()
    assert (stats.written, stats.quarantined, stats.spilled, stats.pending) == (9, 1, 0, 0)
    assert count_rows(sqlite_url(tmp_path)) == 9
    assert not spill.exists()
    assert [r["request_id"] for r in spill_lines(tmp_path / "spill.quarantine.jsonl")] == ["req_3"]
    logged = [r.getMessage() for r in caplog.records if "req_3" in r.getMessage()]
    assert len(logged) == 1 and "value out of range" not in logged[0]


async def test_a_permanent_sqlite_error_for_one_record_does_not_block_the_rest(
    tmp_path: Path,
) -> None:
    def schema_error() -> Exception:
        exc = sqlite3.OperationalError("table usage_records has no column named colour")
        exc.sqlite_errorcode = 1  # SQLITE_ERROR: syntax / schema, not "busy" or "I/O"
        return exc

    faults = Faults(refuse={"req_2"}, refuse_with=schema_error)
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), faults), batch_size=4,
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            for i in range(10):
                w.submit(make_record(i))
            assert await w.flush(5)
            stats = w.statistics()
    assert (stats.written, stats.quarantined, stats.failed_attempts) == (9, 1, 0)
    assert count_rows(sqlite_url(tmp_path)) == 9


async def test_a_record_the_store_cannot_encode_is_sanitised_and_stored(
    store_url: str, tmp_path: Path
) -> None:
    # a client-supplied model with a lone surrogate (valid JSON: "\ud800") and a NUL
    bad = make_record(3, model="claude\ud800\x00x",
                      input_tokens=2**64)
    spill = tmp_path / "spill.jsonl"
    append_spill(spill, [bad, make_record(4)])  # spilled by an earlier run: re-read at start
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(store_url), batch_size=8,
                                     spill_path=spill, **FAST) as w:
            for i in range(3):
                w.submit(make_record(i))
            assert await w.flush(5)
            stats = w.statistics()
            stored = await w.lookup("req_3")
    assert (stats.written, stats.sanitised, stats.quarantined) == (5, 1, 0)
    assert count_rows(store_url) == 5
    assert stored[0].model == "claude?x" and stored[0].input_tokens is None
    assert not spill.exists()


async def test_a_store_refusing_every_record_is_an_outage_not_a_quarantine(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    faults = Faults()
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(url, faults), spill_path=tmp_path / "s.jsonl",
                                     retry_interval=0.01, shutdown_timeout=0.2) as w:
            w.submit(make_record(0))
            assert await w.flush(5)
            s = open_store(url)
            with s._transaction() as cur:
                cur.execute("DROP TABLE usage_records")  # the store is broken, not the records
            s.close()
            w.submit(make_record(1))
            assert not await w.flush(0.3)
            stats = w.statistics()
    assert (stats.quarantined, stats.store_available) == (0, False)
    assert [r["request_id"] for r in spill_lines(tmp_path / "s.jsonl")] == ["req_1"]


# -- shutdown and restart ---------------------------------------------------------------------


async def test_restart_with_rows_queued_spills_then_reloads_exactly_once(
    store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="trioproxy.accounting")
    spill = tmp_path / "spill.jsonl"
    down = Faults(connect_failures=10**9)
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(store_url, down), retry_interval=0.01,
                                     shutdown_timeout=0.2, spill_path=spill) as w:
            for i in range(20):
                w.submit(make_record(i))
        assert w.statistics().spilled == 20
        assert len(spill_lines(spill)) == 20
        assert any("did not take 20 records" in r.getMessage() for r in caplog.records)
        # five of them did land before the outage (say): re-inserting must not duplicate them
        s = open_store(store_url)
        s.migrate()
        s.insert_many([make_record(i) for i in range(5)])
        s.close()
        async with open_usage_writer(lambda: open_store(store_url), spill_path=spill,
                                     **FAST) as w2:
            assert await w2.flush(5)
            assert w2.statistics().reloaded == 20
            assert not spill.exists()
            assert len(await w2.lookup("req_19")) == 1
    assert count_rows(store_url) == 20


async def test_a_spill_file_left_half_read_is_adopted_by_the_next_writer(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "spill.jsonl"
    append_spill(spill, [make_record(i) for i in range(6)])
    taken = next(take_spill(spill))  # a writer took it over, then died before finishing
    taken.close()
    assert not spill.exists()
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(sqlite_url(tmp_path)), spill_path=spill,
                                     **FAST) as w:
            assert await w.flush(5)
    assert count_rows(sqlite_url(tmp_path)) == 6
    assert list(tmp_path.glob("spill.jsonl*")) == []


async def test_exit_flushes_even_when_cancelled(tmp_path: Path) -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.05):
            async with open_usage_writer(lambda: open_store(sqlite_url(tmp_path)),
                                         spill_path=tmp_path / "spill.jsonl", **FAST) as w:
                for i in range(30):
                    w.submit(make_record(i))
                await trio.sleep_forever()
    assert count_rows(sqlite_url(tmp_path)) == 30
    assert not (tmp_path / "spill.jsonl").exists()


async def test_submit_after_close_goes_to_the_spill_file(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(sqlite_url(tmp_path)),
                                     spill_path=spill, **FAST) as w:
            pass
        w.submit(make_record(1))
    assert [r["request_id"] for r in spill_lines(spill)] == ["req_1"]
    assert w.statistics().spilled == 1


def test_spill_file_round_trip_keeps_bad_lines_aside(tmp_path: Path) -> None:
    spill = tmp_path / "d" / "spill.jsonl"
    append_spill(spill, [make_record(1, raw_usage={"a": 1}, streamed=True)])
    append_spill(spill, [make_record(2)])
    with spill.open("a") as f:
        f.write('{"request_id": "torn\n')
    assert spill.stat().st_mode & 0o777 == 0o600
    [taken] = list(take_spill(spill))
    records = [r for batch in taken.batches(10) for r in batch]
    taken.remove()
    assert records == [make_record(1, raw_usage={"a": 1}, streamed=True), make_record(2)]
    assert not spill.exists() and list(spill.parent.glob("spill.jsonl.draining*")) == []
    assert "torn" in (tmp_path / "d" / "spill.jsonl.corrupt").read_text()
    assert list(take_spill(spill)) == []


async def test_records_arriving_together_are_written_in_one_transaction(tmp_path: Path) -> None:
    """With a linger the writer thread wakes once for a burst of records and commits them
    together, instead of one wake-up (and one transaction) per record."""
    batches: list[int] = []
    url = sqlite_url(tmp_path)

    class Counting(FaultyStore):
        def insert_many(self, records: Sequence[UsageRecord]) -> int:
            batches.append(len(records))
            return super().insert_many(records)

    with trio.fail_after(10):
        async with open_usage_writer(lambda: Counting(open_store(url), Faults()), linger=1.0,
                                     spill_path=tmp_path / "spill.jsonl", **FAST) as w:
            for i in range(20):  # one record per request, requests 10 ms apart
                w.submit(make_record(i))
                await trio.sleep(0.01)
            assert await w.flush(5)
    assert batches == [20] and count_rows(url) == 20
