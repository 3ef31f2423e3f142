"""The ledger's files under hostile or broken content, and a writer thread that dies.

What an operator would notice: a spill line that is JSON but no record must not stop the
writer (records piling up in memory while ``/readyz`` stays green); a writer thread that dies
says so (readiness 503, one ERROR line) and comes back; the files that hold records are
private; a spill file left by an earlier run is announced when it is re-queued.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from trioproxy import Settings
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import UsageRecord
from trioproxy.accounting.spill import append_spill, take_spill
from trioproxy.accounting.writer import open_usage_writer
from trioproxy.endpoints.health import readiness
from trioproxy.extensions import ExtensionManager
from trioproxy.runtime import Runtime
from trioproxy.upstream import UpstreamPool

from .test_store import count_rows, make_record
from .test_writer import FAST, Faults, FaultyStore, faulty_factory, sqlite_url

NOT_RECORDS = [b"null", b"[]", b"1", b'"text"', b"true", b"{}", b'{"model": "x"}',
               b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_spill_lines_that_are_json_but_no_record_are_set_aside_and_the_rest_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="trioproxy.accounting")
    spill = tmp_path / "spill.jsonl"
    append_spill(spill, [make_record(1)])
    with spill.open("ab") as f:
        f.write(b"\n".join(NOT_RECORDS) + b"\n")
    append_spill(spill, [make_record(2)])
    with trio.fail_after(20):
        async with open_usage_writer(lambda: open_store(sqlite_url(tmp_path)), spill_path=spill,
                                     **FAST) as w:
            assert await w.flush(10)
            w.submit(make_record(3))  # the writer still works afterwards
            assert await w.flush(10)
    assert count_rows(sqlite_url(tmp_path)) == 3
    corrupt = tmp_path / "spill.jsonl.corrupt"
    assert corrupt.read_bytes().splitlines() == NOT_RECORDS
    assert not any("crashed" in r.getMessage() for r in caplog.records)


def test_the_corrupt_and_quarantine_files_are_private(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    append_spill(spill, [make_record(1)])
    with spill.open("ab") as f:
        f.write(b'{"request_id": "torn\n')
    corrupt = tmp_path / "spill.jsonl.corrupt"
    corrupt.write_bytes(b"")  # left by an older version, readable by all
    corrupt.chmod(0o644)
    [taken] = list(take_spill(spill))
    assert [r.request_id for b in taken.batches(10) for r in b] == ["req_1"]
    taken.remove()
    assert _mode(corrupt) == 0o600
    quarantine = tmp_path / "q.jsonl"
    quarantine.write_bytes(b"")
    quarantine.chmod(0o644)
    append_spill(quarantine, [make_record(2)])
    assert _mode(quarantine) == 0o600


async def test_a_refused_record_lands_in_a_private_quarantine_file(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    with trio.fail_after(10):
        async with open_usage_writer(faulty_factory(sqlite_url(tmp_path), Faults(refuse={"req_3"})),
                                     spill_path=spill, **FAST) as w:
            w.submit(make_record(3))
            assert await w.flush(5)
    assert _mode(tmp_path / "spill.quarantine.jsonl") == 0o600


async def test_a_spill_file_from_an_earlier_run_is_announced_once_with_its_count_and_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.accounting")
    spill = tmp_path / "spill.jsonl"
    append_spill(spill, [make_record(i) for i in range(7)])
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(sqlite_url(tmp_path)), spill_path=spill,
                                     batch_size=3, **FAST) as w:
            assert await w.flush(5)
    said = [r for r in caplog.records if "earlier run" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno >= logging.INFO
    assert "7 records" in said[0].getMessage() and str(spill) in said[0].getMessage()
    assert count_rows(sqlite_url(tmp_path)) == 7


class BuggyStore(FaultyStore):
    """A store whose error classification itself fails (a bug): the writer thread meets an
    exception it has no plan for, ``crashes`` times, then the store works."""

    crashes = 0
    lock = threading.Lock()

    def insert_many(self, records: Sequence[UsageRecord]) -> int:
        with self.lock:
            if BuggyStore.crashes:
                raise RuntimeError("insert failed")
        return super().insert_many(records)

    def is_transient(self, exc: BaseException) -> bool:
        with self.lock:
            if BuggyStore.crashes:
                BuggyStore.crashes -= 1
                raise KeyError("a bug in the store's error table")
        return super().is_transient(exc)


def _runtime(writer: object) -> Runtime:
    settings = Settings(accounting=False)
    runtime = Runtime(settings, UpstreamPool(settings, proxies={}), ExtensionManager([]))
    runtime.writer = writer
    return runtime


@pytest.mark.parametrize("crashes", [1, 10**9])
async def test_a_writer_thread_that_dies_fails_readiness_logs_once_and_comes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, crashes: int) -> None:
    caplog.set_level(logging.DEBUG, logger="trioproxy.accounting")
    BuggyStore.crashes = crashes
    url = sqlite_url(tmp_path)
    with trio.fail_after(20):
        async with open_usage_writer(lambda: BuggyStore(open_store(url), Faults()),
                                     spill_path=tmp_path / "spill.jsonl",
                                     retry_interval=0.05, shutdown_timeout=0.5) as w:
            runtime = _runtime(w)
            w.submit(make_record(1))
            while readiness(runtime)[0] == 200 and BuggyStore.crashes == crashes:
                await trio.sleep(0.01)
            status, body = readiness(runtime)
            if crashes == 1:  # restarted: the record is written, readiness green again
                assert await w.flush(10)
                assert readiness(runtime)[0] == 200
                assert count_rows(url) == 1
            else:  # still failing: readiness stays red, records are kept, not lost
                assert (status, body["status"]) == (503, "usage_writer_failed")
                await trio.sleep(0.5)  # several restarts
                assert readiness(runtime)[0] == 503
                assert w.statistics().pending == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and "writer thread" in r.getMessage()]
    assert len(errors) == 1  # once, however often it died
    if crashes != 1:
        spilled = [json.loads(line) for line in (tmp_path / "spill.jsonl").read_text().splitlines()]
        assert [r["request_id"] for r in spilled] == ["req_1"]  # kept for the next start
