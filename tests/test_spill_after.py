"""A usage-store outage longer than ``spill_after``: records stop waiting in memory (where a
SIGKILL or an OOM kill would lose them) and go to the spill file as they come; the store is
retried meanwhile, and once it is back every record lands exactly once. With a real
PostgreSQL behind a TCP relay the test cuts."""

from __future__ import annotations

from pathlib import Path

import trio

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.writer import open_usage_writer

from .test_store import count_rows, make_record
from .test_store_outage import TcpRelay, pg_url, relay, via  # noqa: F401 - fixtures


async def wait_until(check, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def test_records_leave_memory_for_the_spill_file_after_spill_after(
    relay: TcpRelay, pg_url: str, tmp_path: Path,  # noqa: F811 - fixtures
) -> None:
    spill = tmp_path / "usage.spill.jsonl"
    with trio.fail_after(30):
        async with open_usage_writer(lambda: open_store(via(relay, pg_url), timeout=2.0),
                                     spill_path=spill, retry_interval=0.1,
                                     spill_after=0.3) as w:
            w.submit(make_record(0))
            assert await w.flush(10)
            relay.cut()
            began = trio.current_time()
            for i in range(1, 6):
                w.submit(make_record(i))
            await wait_until(lambda: w.statistics().spilled == 5)
            assert trio.current_time() - began < 2.0  # spill_after + a retry, not the outage
            stats = w.statistics()
            assert (stats.pending, stats.store_available, stats.spill_ok) == (0, False, True)
            assert stats.outage_seconds > 0.3
            for i in range(6, 11):  # later in the outage: straight to disk
                w.submit(make_record(i))
            await wait_until(lambda: w.statistics().spilled == 10, timeout=2.0)
            assert w.statistics().pending == 0
            for i in range(11, 21):  # retries go on meanwhile, without piling up files
                w.submit(make_record(i))
                await trio.sleep(0.1)
            assert w.statistics().spilled == 20 and w.statistics().pending == 0
            assert len(list(tmp_path.glob("usage.spill.jsonl.draining-*"))) <= 1
            relay.restore()
            assert await w.flush(15)
            stats = w.statistics()
    assert (stats.store_available, stats.pending, stats.quarantined) == (True, 0, 0)
    assert stats.outage_seconds == 0
    assert count_rows(pg_url) == 21  # each exactly once (request_id is the primary key)
    assert not spill.exists() or spill.read_text() == ""
