"""A real PostgreSQL that goes away mid-run (refusing, or hanging) and comes back: no record
lost, none twice, memory bounded, and look-ups answer 503 in bounded time meanwhile.

A TCP relay run by the test sits in front of the shared PostgreSQL; the test cuts it (every
connection dropped, new ones closed at once) or makes it hang (connections accepted, nothing
forwarded either way), then restores it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.store import StoreUnavailable
from trioproxy.accounting.writer import open_usage_writer
from trioproxy.testing import FakeUpstream, anthropic_sse

from .conftest import proxy_settings, start_proxy
from .test_store import _postgres_schema_url, count_rows, make_record

KEY = "sk-ant-api03-OUTAGEKEY0001"


class TcpRelay:
    """Forwards 127.0.0.1:<port> to the database; ``cut()``, ``hang()``, ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "up"
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()
        self._flowing = trio.Event()
        self._flowing.set()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with client:
                    if self.mode == "down":
                        return
                    await self._flowing.wait()  # a hung relay accepts and answers nothing
                    async with await trio.open_tcp_stream(*self.target) as server, \
                            trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        async for data in src:
            await self._flowing.wait()
            await dst.send_all(data)
        scope.cancel()

    def _drop_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    def cut(self) -> None:
        self.mode = "down"
        self._drop_all()

    def hang(self) -> None:
        self.mode = "hang"
        self._flowing = trio.Event()

    def restore(self) -> None:
        self._drop_all()  # hung connections are dropped, not resumed
        self.mode = "up"
        self._flowing.set()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _postgres_schema_url()


@pytest.fixture
async def relay(nursery: trio.Nursery, pg_url: str) -> AsyncIterator[TcpRelay]:
    info = conninfo_to_dict(pg_url)
    relay = TcpRelay(info.get("host") or "127.0.0.1", int(info.get("port") or 5432))
    await nursery.start(relay.serve)
    yield relay
    relay.restore()


def via(relay: TcpRelay, url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{relay.port}"))


async def test_postgres_down_mid_run_loses_nothing_doubles_nothing_memory_bounded(
    relay: TcpRelay, pg_url: str, tmp_path: Path
) -> None:
    n, max_pending = 1500, 50
    spill = tmp_path / "spill.jsonl"
    max_seen = 0
    with trio.fail_after(60):
        async with open_usage_writer(lambda: open_store(via(relay, pg_url), timeout=2.0),
                                     spill_path=spill, batch_size=10, max_pending=max_pending,
                                     retry_interval=0.05) as w:
            for i in range(n):
                if i == 300:
                    relay.cut()
                elif i == 900:
                    relay.restore()
                w.submit(make_record(i))
                max_seen = max(max_seen, w.statistics().pending)
                if i % 10 == 0:
                    await trio.sleep(0.002)
            assert await w.flush(30)
            stats = w.statistics()
    assert max_seen <= max_pending
    assert stats.overflowed > 0 and stats.failed_attempts > 0  # the outage did bite
    assert (stats.quarantined, stats.pending, stats.store_available) == (0, 0, True)
    assert count_rows(pg_url) == n  # request_id is the primary key: n rows = each exactly once
    store = open_store(pg_url)
    try:
        assert all(len(store.find(f"req_{i}")) == 1 for i in range(0, n, 97))
    finally:
        store.close()
    assert list(tmp_path.glob("spill.jsonl*")) == []


async def test_a_hanging_postgres_does_not_pin_the_writer_and_lookups_answer_in_time(
    relay: TcpRelay, pg_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with open_usage_writer(lambda: open_store(via(relay, pg_url), timeout=1.0),
                                     spill_path=tmp_path / "spill.jsonl", batch_size=10,
                                     max_pending=20, retry_interval=0.05,
                                     lookup_timeout=2.0) as w:
            for i in range(100):
                w.submit(make_record(i))
            assert await w.flush(10)
            relay.hang()
            for i in range(100, 200):
                w.submit(make_record(i))
            assert w.statistics().pending <= 20
            with trio.fail_after(5), pytest.raises(StoreUnavailable):
                await w.lookup("req_5")
            while w.statistics().failed_attempts < 2:  # each hung call gave up; retrying
                await trio.sleep(0.05)
            relay.restore()
            assert await w.flush(30)
            stats = w.statistics()
    assert (stats.written, stats.quarantined) == (200, 0)
    assert count_rows(pg_url) == 200


async def test_usage_lookup_while_the_store_is_down_is_a_503_in_the_provider_shape(
    nursery: trio.Nursery, upstream: FakeUpstream, relay: TcpRelay, pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=via(relay, pg_url)))
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 9, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as http:
            upstream.enqueue(anthropic_sse())
            resp = await http.post("/v1/messages", headers=headers, content=json.dumps(body))
            request_id = resp.headers["x-trioproxy-request-id"]
            await proxy.wait_exchanges(1)
            assert await proxy.app.runtime.writer.flush(10)
            ok = await http.get(f"/v1/usage/{request_id}", headers=headers)
            assert ok.status_code == 200 and ok.json()["id"] == request_id
            relay.cut()
            caplog.clear()
            down = await http.get(f"/v1/usage/{request_id}", headers=headers)
            relay.restore()
            again = await http.get(f"/v1/usage/{request_id}", headers=headers)
    await proxy.stop()
    assert down.status_code == 503
    assert down.json()["type"] == "error" and down.json()["error"]["type"] == "api_error"
    assert again.status_code == 200
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None and request_id in lines[0].getMessage()
