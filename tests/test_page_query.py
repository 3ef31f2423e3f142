"""The usage page's data is aggregated in the database: its memory does not grow with the
ledger, its latency percentiles agree with ``trioproxy latency``, every query is bounded in
time, and shutdown never waits for one."""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trioproxy import Settings
from trioproxy.accounting.latency_summary import summarize_latency
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.page_query import SAMPLE_PER_MODEL
from trioproxy.accounting.record import UsageRecord
from trioproxy.accounting.store import SQLStore
from trioproxy.endpoints.dashboard import UsageReader, usage_summary

from .test_store import store_url  # noqa: F401 - the fixture: SQLite and PostgreSQL

NOW = 1_790_000_000.0


@pytest.fixture
def ledger(store_url: str) -> Iterator[Any]:  # noqa: F811
    store = open_store(store_url)
    store.migrate()
    yield store
    store.close()
MODELS = ("claude-sonnet-4-5", "gpt-4o-mini", None)


def records(n: int, seed: int = 7) -> Iterator[UsageRecord]:
    rng = random.Random(seed)
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        p50 = rng.lognormvariate(3, 0.5)
        e2e = rng.lognormvariate(8, 0.7)
        yield UsageRecord(
            request_id=f"r{i}", started_at=NOW - 1000 + i * 1e-3, provider="openai",
            api="openai.chat", status=200, end_reason="complete", streamed=True,
            model=model, model_requested=model or "asked-for", input_tokens=100,
            output_tokens=rng.randint(2, 500), cost_usd=0.001,
            ttft_ms=rng.lognormvariate(5, 1), e2e_ms=e2e, last_token_ms=e2e * 0.97,
            tpot_ms=rng.lognormvariate(3, 0.3), tokens_per_s=rng.uniform(5, 300),
            itl_p50_ms=p50, itl_p90_ms=p50 * 1.6, itl_p99_ms=p50 * 3, itl_max_ms=p50 * 5,
            itl_count=rng.randint(1, 400), duration_ms=1.0,
        )


def fill(store: Any, n: int, first: int = 0) -> None:
    batch: list[UsageRecord] = []
    ids = random.Random(first)  # the proxy's request ids: time, then 20 random hex digits
    for record in records(n, seed=first + 7):
        record.request_id = f"tp_{first + int(record.request_id[1:]):011x}{ids.getrandbits(80):020x}"
        batch.append(record)
        if len(batch) == 2000:
            store.insert_many(batch)
            batch = []
    store.insert_many(batch)


def page_peak(store: Any) -> int:
    tracemalloc.start()
    try:
        data = usage_summary(store, NOW - 86400, NOW)
        return tracemalloc.get_traced_memory()[1] if data["latency"] else 0
    finally:
        tracemalloc.stop()


def test_page_data_memory_does_not_grow_with_the_ledger(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "u.db"))
    store.migrate()
    fill(store, 10_000)
    small = page_peak(store)
    fill(store, 30_000, first=10_000)
    big = page_peak(store)
    (n,) = [sum(g["requests"] for g in usage_summary(store, NOW - 86400, NOW)["latency"])]
    store.close()
    assert n == 40_000
    # loading the rows would take four times the memory for four times the rows
    assert big < 1.3 * small, f"{small / 1e6:.1f} MB for 10,000 rows, {big / 1e6:.1f} for 40,000"


def approx(value: float | None, rel: float) -> Any:
    return None if value is None else pytest.approx(value, rel=rel)


def exact_latency(store: Any) -> dict[str, Any]:
    rows = store.latency_rows(NOW - 86400, NOW)
    return {g["group"]: g for g in summarize_latency(rows)["groups"]}


def page_latency(store: Any) -> dict[str, Any]:
    return {g["group"]: g for g in usage_summary(store, NOW - 86400, NOW)["latency"]}


def test_page_latency_is_trioproxy_latencys_when_models_have_few_requests(
    ledger: Any,
) -> None:
    store = ledger
    fill(store, 3 * SAMPLE_PER_MODEL)
    page, exact = page_latency(store), exact_latency(store)
    assert page.keys() == exact.keys() == {"claude-sonnet-4-5", "gpt-4o-mini", "asked-for"}
    for name, want in exact.items():
        got = page[name]
        assert got["requests"] == want["requests"]
        for metric, w in want["metrics"].items():
            g = got["metrics"][metric]
            assert g["mean"] == (None if w["mean"] is None else approx(w["mean"], 1e-6))
            assert {k: g[k] for k in ("count", "p50", "p90", "p99")} == \
                {k: w[k] for k in ("count", "p50", "p90", "p99")}, (name, metric)


def test_page_latency_is_estimated_from_a_bounded_sample_beyond_that(
    ledger: Any,
) -> None:
    store = ledger
    fill(store, 9 * SAMPLE_PER_MODEL)
    page, exact = page_latency(store), exact_latency(store)
    for name, want in exact.items():
        got = page[name]
        assert got["requests"] == want["requests"] == 3 * SAMPLE_PER_MODEL
        for metric, w in want["metrics"].items():
            g = got["metrics"][metric]
            assert g["count"] == w["count"]  # exact: counted by the database
            assert g["mean"] == (None if w["mean"] is None else approx(w["mean"], 1e-6))
            assert g["p50"] == approx(w["p50"], 0.08), (name, metric)
            assert g["p90"] == approx(w["p90"], 0.1), (name, metric)
            assert g["p99"] == approx(w["p99"], 0.2), (name, metric)
    assert page == page_latency(store)  # the same sample at every refresh


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
    """A store whose page query never ends on its own (SQLite: an endless recursive CTE;
    PostgreSQL: a long sleep)."""

    started: trio.Event | None = None
    token: trio.lowlevel.TrioToken | None = None

    def latency_summary(self, since: float | None = None, until: float | None = None) -> Any:
        return self._endless()

    def latency_rows(self, since: float | None = None, until: float | None = None) -> Any:
        return self._endless()

    def _endless(self) -> Any:
        if self.started is not None and self.token is not None:
            trio.from_thread.run_sync(self.started.set, trio_token=self.token)
        sql = "SELECT pg_sleep(600)" if "Postgres" in type(self.backend).__name__ else \
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        with self._cursor() as cur:
            cur.execute(sql)
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

    monkeypatch.setattr("trioproxy.endpoints.dashboard.open_store", opener)


def migrated(url: str) -> None:
    store = open_store(url)
    store.migrate()
    store.close()


async def test_a_page_query_is_cut_at_the_store_timeout(
    store_url: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    migrated(store_url)
    endless_opener(monkeypatch, trio.Event())
    reader = UsageReader(Settings(database_url=store_url, store_timeout=0.5))
    with trio.fail_after(10):
        for _ in range(2):  # and the connection was not left busy
            t0 = time.monotonic()
            with pytest.raises(Exception, match="interrupted|statement timeout") as failed:
                await reader.summary(1)
            assert not isinstance(failed.value, trio.TooSlowError)
            assert time.monotonic() - t0 < 2  # cut by the database's own bound, not abandoned
        await reader.aclose()


async def test_shutdown_does_not_wait_for_a_running_page_query(
    store_url: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    migrated(store_url)
    started = trio.Event()
    endless_opener(monkeypatch, started)
    reader = UsageReader(Settings(database_url=store_url, store_timeout=60))
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
            await trio.sleep(0.2)  # the query is running in its thread
            t0 = time.monotonic()
            with trio.fail_after(3):
                await reader.aclose()
            assert time.monotonic() - t0 < 3
    assert failed  # the request got an error (the page answers 503), not a hang


def test_the_sample_is_bounded_in_all_however_many_models() -> None:
    from trioproxy.accounting.page_query import SAMPLE_ROWS, _thresholds

    counts = {f"model-{i}": 50_000 for i in range(40)} | {"small": 10}
    thresholds = _thresholds(counts)
    assert "small" not in thresholds  # every row of a small model
    expected = 10 + sum(int(t, 16) / 16 ** 4 * counts[g] for g, t in thresholds.items())
    assert expected <= SAMPLE_ROWS * 1.01


class CountingStore(SQLStore):
    """A store that counts the page's latency queries, each taking ``delay`` seconds."""

    calls = 0
    delay = 0.0

    def latency_summary(self, since: float | None = None, until: float | None = None) -> Any:
        type(self).calls += 1
        time.sleep(self.delay)
        return super().latency_summary(since, until)


def counting(monkeypatch: pytest.MonkeyPatch, delay: float) -> type[CountingStore]:
    class Counting(CountingStore):
        pass

    Counting.delay = delay

    def opener(url: str, **kwargs: Any) -> SQLStore:
        store = open_store(url, **kwargs)
        assert isinstance(store, SQLStore)
        return Counting(store.backend)

    monkeypatch.setattr("trioproxy.endpoints.dashboard.open_store", opener)
    return Counting


async def test_a_slow_page_is_computed_once_for_the_refreshes_that_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "u.db")
    migrated(url)
    store = counting(monkeypatch, delay=1.0)
    reader = UsageReader(Settings(database_url=url))
    with trio.fail_after(20):
        pages: list[dict[str, Any]] = []

        async def load() -> None:
            pages.append(await reader.summary(7))

        async with trio.open_nursery() as nursery:  # two browsers refresh at once
            nursery.start_soon(load)
            nursery.start_soon(load)
        pages.append(await reader.summary(7))  # the next refresh
        assert store.calls == 1
        assert len({p["generated_at"] for p in pages}) == 1  # the page says how old it is
        await reader.summary(1)  # another window is computed
        assert store.calls == 2
    await reader.aclose()


async def test_a_fast_page_is_computed_at_every_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "u.db")
    migrated(url)
    store = counting(monkeypatch, delay=0.0)
    reader = UsageReader(Settings(database_url=url))
    with trio.fail_after(20):
        for _ in range(3):
            await reader.summary(7)
    assert store.calls == 3
    await reader.aclose()
