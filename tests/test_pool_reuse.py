"""Keep-alive reuse without double sends: dead idle connections are dropped before reuse, a
request the upstream may have received is never sent again, and a closed pool stays closed.

Load balancers cut idle keep-alive connections after 60-100 s; a POST resent after the
upstream took it is billed twice. The fake upstream closes idle connections
(``idle_timeout``) or takes a request and hangs up without a byte (``close_before_response``,
``reset_before_response``).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from trioproxy import Settings
from trioproxy.accounting.locations import open_store
from trioproxy.config import UpstreamURL
from trioproxy.errors import UpstreamPoolClosed
from trioproxy.testing import FakeUpstream, Reply
from trioproxy.upstream import UpstreamPool

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy
from .test_connect_proxy import ConnectProxy, _post

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]
CALLS = {
    "anthropic": ("/v1/messages", ANTHROPIC, json.dumps(
        {"model": "claude-sonnet-4-5", "max_tokens": 9,
         "messages": [{"role": "user", "content": "bill me once"}]}).encode()),
    "openai": ("/v1/chat/completions", OPENAI, json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bill me once"}]}
    ).encode()),
}


async def _call(server: ProxyServer, provider: str):
    """One request on its own client connection (the proxy's keep-alive to clients is 5 s)."""
    path, headers, body = CALLS[provider]
    client = await RawClient.connect(server.port)
    try:
        with trio.fail_after(60):
            return await client.request("POST", path, headers, body)
    finally:
        await client.aclose()


def _headers(base: UpstreamURL, body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"host", base.host_header), (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]


def _bodies_seen(upstream: FakeUpstream) -> list[bytes]:
    return [r.body for r in upstream.requests]


# -- an idle connection the upstream closed is not reused ---------------------------------------


async def test_idle_connection_closed_by_the_upstream_is_replaced_not_reused(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, proxy: ProxyServer,
) -> None:
    upstream.idle_timeout = 5  # the proxy keeps idle connections for 30 s
    first = await _call(proxy, "anthropic")
    with trio.fail_after(60):
        await upstream.connections[0].closed.wait()
        await trio.testing.wait_all_tasks_blocked()
    second = await _call(proxy, "openai")
    assert first.status == second.status == 200 and second.complete
    assert upstream.connections[0].close_reason == "idle_timeout"
    assert [r.conn_id for r in upstream.requests] == [1, 2]  # each request seen once


async def test_idle_tls_connection_closed_by_the_upstream_is_replaced_not_reused(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery,
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    fake = FakeUpstream(tls=server_ctx, idle_timeout=5)
    await nursery.start(fake.serve)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = await start_proxy(nursery, proxy_settings(fake), ssl_context=client_ctx)
    first = await _call(server, "anthropic")
    with trio.fail_after(60):
        await fake.connections[0].closed.wait()
        await trio.testing.wait_all_tasks_blocked()
    second = await _call(server, "anthropic")
    assert first.status == second.status == 200 and second.complete
    assert [r.conn_id for r in fake.requests] == [1, 2]
    assert fake.errors == []
    await server.stop()


async def test_idle_tunnelled_connection_closed_by_the_upstream_is_replaced_not_reused(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    tunnel = ConnectProxy()
    await nursery.start(tunnel.serve)
    upstream.idle_timeout = 5
    base = UpstreamURL.parse(upstream.url)
    pool = UpstreamPool(Settings(accounting=False), proxies={"http": tunnel.url})
    with trio.fail_after(60):
        first = await _post(pool, base)
        await upstream.connections[0].closed.wait()
        await trio.testing.wait_all_tasks_blocked()  # the tunnel passes the close on
        second = await _post(pool, base)
        await pool.aclose()
    assert first[0] == second[0] == 200
    assert [r.conn_id for r in upstream.requests] == [1, 2] and len(tunnel.requests) == 2
    assert tunnel.errors == []


# -- a request the upstream may have received is never sent twice --------------------------------


@pytest.fixture
async def ledger_proxy(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[ProxyServer]:
    db = tmp_path / "usage.db"
    server = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(db)))
    server.db = db  # type: ignore[attr-defined]
    yield server
    await server.stop()


async def _all_records(server: ProxyServer, n_exchanges: int) -> tuple[int, list]:
    """(records in the ledger, the record of each exchange in order)."""
    await server.wait_exchanges(n_exchanges)
    assert await server.app.runtime.writer.flush(10)
    store = open_store(str(server.db))  # type: ignore[attr-defined]
    try:
        total = sum(g["requests"] for g in store.aggregate("key"))
        return total, [store.get(ex.request_id) for ex in server.exchanges]
    finally:
        store.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("hang_up", ["close_before_response", "reset_before_response"])
async def test_request_cut_after_the_upstream_read_it_is_a_502_never_a_resend(
    upstream: FakeUpstream, ledger_proxy: ProxyServer, provider: str, hang_up: str,
) -> None:
    warm = await _call(ledger_proxy, provider)  # leaves a keep-alive connection in the pool
    upstream.enqueue(Reply(**{hang_up: True}))
    cut = await _call(ledger_proxy, provider)
    assert warm.status == 200
    assert _bodies_seen(upstream) == [CALLS[provider][2]] * 2  # the cut one exactly once
    assert upstream.requests[0].conn_id == upstream.requests[1].conn_id  # it was a reuse
    assert cut.status == 502 and cut.complete
    body = json.loads(cut.body)
    if provider == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
    else:
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == "upstream_error"
    total, (_, record) = await _all_records(ledger_proxy, 2)
    assert total == 2
    assert record.request_id == cut.header("x-trioproxy-request-id")
    assert record.status == 502 and record.end_reason == "upstream_error"


class _SendFails(trio.abc.Stream):
    """A real connection whose next write fails before a byte leaves (an RST that raced in)."""

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


async def test_reused_connection_whose_write_fails_is_retried_once_on_a_fresh_one(
    upstream: FakeUpstream,
) -> None:
    base = UpstreamURL.parse(upstream.url)
    pool = UpstreamPool(Settings(accounting=False))
    with trio.fail_after(20):
        assert (await _post(pool, base))[0] == 200
        (idle,) = pool._idle[(base.scheme, base.host, base.port)]
        idle.stream = _SendFails(idle.stream)
        status, _ = await _post(pool, base)
        await pool.aclose()
    assert status == 200
    assert [r.conn_id for r in upstream.requests] == [1, 2]  # the failed write reached nobody
    assert pool.statistics()["retried"] == 1


# -- a closed pool -------------------------------------------------------------------------------


async def test_closed_pool_refuses_requests_and_closes_connections_given_back(
    upstream: FakeUpstream,
) -> None:
    base = UpstreamURL.parse(upstream.url)
    pool = UpstreamPool(Settings(accounting=False))
    body = CALLS["anthropic"][2]
    with trio.fail_after(20):
        response = await pool.send_request(
            base, b"POST", b"/v1/messages", _headers(base, body), body)
        await pool.aclose()  # while a response is still being read
        while await response.receive_chunk() is not None:
            pass
        await response.aclose()  # complete and reusable, but the pool is closed
        await upstream.connections[0].closed.wait()
        with pytest.raises(UpstreamPoolClosed) as refused:
            await pool.send_request(base, b"GET", b"/v1/models", _headers(base, b""), b"")
    assert refused.value.status == 503 and "closed" in refused.value.message
    assert pool.statistics()["idle"] == 0
    assert len(upstream.requests) == 1 and upstream.connections[0].close_reason == "peer"
