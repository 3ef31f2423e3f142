"""Waiting on a relayed exchange, end to end: the upstream's read timeout (before the headers,
mid-stream, counted from its last byte), SSE keep-alive comments in its silences (which extend
no timeout), a client that pauses or stops reading, and a full connection pool."""

from __future__ import annotations

import json

import trio

from trioproxy.testing import FakeUpstream, Pause, Reply, anthropic_sse

from .client_requests import ANTHROPIC, MESSAGES_STREAM, OPENAI, body_bytes
from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy


async def test_timeout_before_response_headers_is_504(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
    proxy: ProxyServer,
) -> None:
    upstream.enqueue(Reply(before_headers=3600))
    with trio.fail_after(2000):
        start = trio.current_time()
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, b"{}")
    assert resp.status == 504
    assert json.loads(resp.body)["error"]["code"] == "upstream_timeout"
    assert 600 <= trio.current_time() - start < 700  # the per-read timeout, default 600 s
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.end_reason == "timeout"


async def test_sse_keepalive_comments_only_at_event_boundaries(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, sse_keepalive=15.0))
    event1, event2 = b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[event1, Pause(50), b"event: b\n", Pause(40), b"data: 2\n\n"]))
    client = await RawClient.connect(server.port)
    with trio.fail_after(200):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    await client.aclose()
    assert resp.complete
    # three comments in the 50 s silence at a boundary; none inside the half-sent event
    assert resp.body == event1 + b": keepalive\n\n" * 3 + event2
    await server.stop()


async def test_no_keepalive_by_default(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"data: 1\n\n", Pause(100), b"data: 2\n\n"]))
    with trio.fail_after(200):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.body == b"data: 1\n\ndata: 2\n\n"


async def test_upstream_silent_mid_stream_past_the_read_timeout_is_cut(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
    proxy: ProxyServer,
) -> None:
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"data: 1\n\n", Pause(900), b"data: 2\n\n"]))
    with trio.fail_after(2000):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.body == b"data: 1\n\n" and not resp.complete
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.end_reason == "timeout" and "read timeout" in ex.error


async def test_the_read_timeout_counts_from_the_last_upstream_byte_exactly(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
    proxy: ProxyServer,
) -> None:
    """Bytes that arrive between the watcher's looks restart the wait: the cut comes
    read_timeout (600 s) after the last byte, not at a coarser tick."""
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"data: 1\n\n", Pause(7), b"data: 2\n\n", Pause(900),
                                 b"data: 3\n\n"]))
    with trio.fail_after(2000):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.body == b"data: 1\n\ndata: 2\n\n" and not resp.complete
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.end_reason == "timeout"
    assert 600 <= ex.finalised_at - ex.last_chunk_at < 600.1


async def test_keepalive_comments_do_not_extend_the_read_timeout(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """Comments the proxy sends to the client are not upstream bytes: an upstream silent past
    the read timeout is cut with keep-alive comments on, as without them."""
    server = await start_proxy(nursery, proxy_settings(upstream, sse_keepalive=15.0))
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"data: 1\n\n", Pause(900), b"data: 2\n\n"]))
    client = await RawClient.connect(server.port)
    with trio.fail_after(2000):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert not resp.complete and b"data: 2" not in resp.body
    assert resp.body.replace(b": keepalive\n\n", b"") == b"data: 1\n\n"
    assert resp.body.count(b": keepalive\n\n") >= 39  # every 15 s of the 600 s wait
    (ex,) = await server.wait_exchanges(1)
    assert ex.end_reason == "timeout"
    assert 600 <= ex.finalised_at - ex.last_chunk_at < 600.1
    await client.aclose()
    await server.stop()


async def test_a_client_that_pauses_reading_is_not_an_upstream_timeout(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream, write_stall_timeout=1200))
    chunk = b"data: " + b"y" * 65530 + b"\n\n"
    reply = Reply(headers=[("content-type", "text/event-stream")], body=[chunk] * 400)
    upstream.enqueue(reply)
    client = await RawClient.connect(proxy.port)
    with trio.fail_after(3000):
        await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        resp = await client.read_head()
        await trio.sleep(900)  # longer than the 600 s read timeout, while the channel is full
        await client.read_body(resp)
    await client.aclose()
    assert resp.complete and resp.body == body_bytes(reply)
    await proxy.stop()


async def test_a_client_that_stops_reading_frees_the_upstream_connection(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """One connection per origin: a client that reads nothing would otherwise hold it for
    ever. After the write-stall timeout the exchange ends as client_stalled with one record,
    the upstream connection is closed and the next client gets through."""
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, max_connections=1, write_stall_timeout=30, pool_timeout=300))
    chunk = b"data: " + b"z" * 65530 + b"\n\n"
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], body=[chunk] * 2000))
    stalled = await RawClient.connect(proxy.port)
    with trio.fail_after(600):
        await stalled.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        await stalled.read_head()  # and then read nothing
        after = await RawClient.connect(proxy.port)
        resp = await after.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        (first, *_) = await proxy.wait_exchanges(1)
    assert resp.status == 200 and resp.complete
    assert first.end_reason == "client_stalled" and not first.upstream_complete
    assert upstream.connections[0].close_reason == "peer"  # the proxy closed it
    await stalled.aclose()
    await after.aclose()
    await proxy.wait_exchanges(2)
    assert [ex.end_reason for ex in proxy.exchanges] == ["client_stalled", "complete"]
    await proxy.stop()


async def test_exhausted_connection_pool_is_a_504_that_names_the_limit(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, max_connections=1, pool_timeout=5))
    upstream.enqueue(anthropic_sse(["a"], gaps=[0, 100]))
    busy = await RawClient.connect(server.port)
    waiting = await RawClient.connect(server.port)
    with trio.fail_after(300):
        await busy.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        await busy.read_head()
        resp = await waiting.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.status == 504
    assert "TRIOPROXY_MAX_CONNECTIONS" in json.loads(resp.body)["error"]["message"]
    await busy.aclose()
    await waiting.aclose()
    await server.stop()


async def test_sse_with_content_length_survives_keepalive_comments(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, sse_keepalive=15.0))
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], chunked=False,
                           body=[b"data: 1\n\n", Pause(20), b"data: 2\n\n"]))
    client = await RawClient.connect(server.port)
    with trio.fail_after(200):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    await client.aclose()
    assert resp.complete and resp.header("content-length") is None
    assert resp.body == b"data: 1\n\n: keepalive\n\ndata: 2\n\n"
    await server.stop()
