"""The usage page's data is aggregated in the database: its memory does not grow with the
ledger, its latency percentiles agree with ``trioproxy latency``, every query is bounded in
time, and shutdown never waits for one."""

from __future__ import annotations

import random
import sqlite3
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trioproxy import Settings
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import UsageRecord
from trioproxy.accounting.store import SQLStore
from trioproxy.dashboard import UsageReader, usage_summary
from trioproxy.latency_report import summarize_latency

from .test_store import store, store_url  # noqa: F401 - fixtures: SQLite and PostgreSQL

NOW = 1_790_000_000.0
MODELS = ("claude-sonnet-4-5", "gpt-4o-mini", None)


def records(n: int, seed: int = 7) -> Iterator[UsageRecord]:
    rng = random.Random(seed)
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        p50 = rng.lognormvariate(3, 0.5)
        yield UsageRecord(
            request_id=f"r{i}", started_at=NOW - 1000 + i * 1e-3, provider="openai",
            api="openai.chat", status=200, end_reason="complete", streamed=True,
            model=model, model_requested=model or "asked-for", input_tokens=100,
            output_tokens=rng.randint(2, 500), cost_usd=0.001,
            ttft_ms=rng.lognormvariate(5, 1), e2e_ms=rng.lognormvariate(8, 0.7),
            tpot_ms=rng.lognormvariate(3, 0.3), tokens_per_s=rng.uniform(5, 300),
            itl_p50_ms=p50, itl_p90_ms=p50 * 1.6, itl_p99_ms=p50 * 3, itl_max_ms=p50 * 5,
            itl_count=rng.randint(1, 400), duration_ms=1.0,
        )


def fill(store: Any, n: int) -> None:
    batch: list[UsageRecord] = []
    for record in records(n):
        batch.append(record)
        if len(batch) == 2000:
            store.insert_many(batch)
            batch = []
    store.insert_many(batch)


def test_page_data_memory_does_not_grow_with_the_ledger(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "u.db"))
    store.migrate()
    fill(store, 20_000)
    tracemalloc.start()
    try:
        data = usage_summary(store, NOW - 86400, NOW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    assert sum(g["requests"] for g in data["latency"]) == 20_000
    # the rows themselves would be ~20 MB of dicts; the buckets and sums are small
    assert peak < 4 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_page_latency_agrees_with_trioproxy_latency(store: Any) -> None:  # noqa: F811
    fill(store, 3000)
    page = {g["group"]: g for g in usage_summary(store, NOW - 86400, NOW)["latency"]}
    exact = {g["group"]: g for g in summarize_latency(store.latency_rows(NOW - 86400, NOW))
             ["groups"]}
    assert page.keys() == exact.keys() == {"claude-sonnet-4-5", "gpt-4o-mini", "asked-for"}
    for name, want in exact.items():
        got = page[name]
        assert got["requests"] == want["requests"]
        for metric in ("ttft_ms", "tpot_ms", "e2e_ms", "tokens_per_s"):
            g, w = got["metrics"][metric], want["metrics"][metric]
            assert g["count"] == w["count"]
            assert g["mean"] == pytest.approx(w["mean"], rel=1e-6)
            for q in ("p50", "p90", "p99"):
                assert g[q] == pytest.approx(w[q], rel=0.01), (name, metric, q)
        g, w = got["metrics"]["itl_ms"], want["metrics"]["itl_ms"]
        assert g["count"] == w["count"]
        assert g["mean"] == pytest.approx(w["mean"], rel=1e-6)
        for q in ("p50", "p90", "p99"):  # the same pooled estimate, read off buckets
            assert g[q] == pytest.approx(w[q], rel=0.01), (name, q)


def test_one_request_gives_back_its_own_figures(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "u.db"))
    store.migrate()
    store.insert_many([UsageRecord(
        request_id="one", started_at=NOW - 5, api="anthropic.messages", status=200,
        end_reason="complete", model="m", ttft_ms=412.3, e2e_ms=2345.6, tpot_ms=12.25,
        tokens_per_s=81.6, itl_p50_ms=10.0, itl_p90_ms=20.0, itl_p99_ms=40.0, itl_max_ms=90.0,
        itl_count=99, output_tokens=100)])
    (group,) = usage_summary(store, NOW - 60, NOW)["latency"]
    store.close()
    m = group["metrics"]
    assert m["ttft_ms"] == {"count": 1, "p50": 412.3, "p90": None, "p99": None, "mean": 412.3}
    assert m["e2e_ms"]["p50"] == pytest.approx(2345.6, rel=0.005)
    assert m["itl_ms"]["count"] == 99
    assert (m["itl_ms"]["p50"], m["itl_ms"]["p90"]) == (10.0, 20.0)


def test_an_empty_window_has_no_latency_groups(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "u.db"))
    store.migrate()
    assert usage_summary(store, NOW - 60, NOW)["latency"] == []
    store.close()


class EndlessStore(SQLStore):
    """A SQLite store whose page query never ends on its own (a recursive CTE)."""

    started: trio.Event | None = None
    token: trio.lowlevel.TrioToken | None = None

    def latency_summary(self, since: float | None = None, until: float | None = None) -> Any:
        return self._endless()

    def latency_rows(self, since: float | None = None, until: float | None = None) -> Any:
        return self._endless()

    def _endless(self) -> Any:
        if self.started is not None and self.token is not None:
            trio.from_thread.run_sync(self.started.set, trio_token=self.token)
        with self._cursor() as cur:
            cur.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                        "SELECT count(*) FROM c")
            return cur.fetchall()


def endless_opener(monkeypatch: pytest.MonkeyPatch, started: trio.Event) -> None:
    """The page's reader opens stores whose page query never ends."""
    token = trio.lowlevel.current_trio_token()

    def opener(url: str, **kwargs: Any) -> SQLStore:
        store = open_store(url, **kwargs)
        assert isinstance(store, SQLStore)
        endless = EndlessStore(store.backend)
        endless.started, endless.token = started, token
        return endless

    monkeypatch.setattr("trioproxy.dashboard.open_store", opener)


async def test_a_page_query_is_cut_at_the_store_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=str(tmp_path / "u.db"), store_timeout=0.5)
    store = open_store(settings.database_url)
    store.migrate()
    store.close()
    endless_opener(monkeypatch, trio.Event())
    reader = UsageReader(settings)
    with trio.fail_after(10):
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="interrupted"):
            await reader.summary(1)
        assert time.monotonic() - t0 < 3  # cut by the database's own bound, not abandoned
        with pytest.raises(sqlite3.OperationalError):  # the connection was not left busy
            await reader.summary(1)
        await reader.aclose()


async def test_shutdown_does_not_wait_for_a_running_page_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=str(tmp_path / "u.db"), store_timeout=60)
    store = open_store(settings.database_url)
    store.migrate()
    store.close()
    started = trio.Event()
    endless_opener(monkeypatch, started)
    reader = UsageReader(settings)
    failed: list[BaseException] = []

    async def ask() -> None:
        try:
            await reader.summary(1)
        except Exception as exc:  # noqa: BLE001 - what the page would answer 503 with
            failed.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await started.wait()
            await trio.sleep(0.1)  # the query is running in its thread
            t0 = time.monotonic()
            with trio.fail_after(2):
                await reader.aclose()
            assert time.monotonic() - t0 < 2
    assert failed  # the request got an error (the page answers 503), not a hang
