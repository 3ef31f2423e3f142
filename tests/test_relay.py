"""End to end: the real proxy under Hypercorn, the fake upstream, a raw HTTP/1.1 client."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import trio

from trioproxy.log import RequestIdFilter
from trioproxy.testing import Abort, FakeUpstream, Pause, Reply, anthropic_sse, error_reply

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]
MESSAGES_STREAM = json.dumps(
    {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
     "messages": [{"role": "user", "content": "hi"}]}
).encode()


def body_bytes(reply: Reply) -> bytes:
    return b"".join(p for p in reply.body if isinstance(p, bytes | bytearray))


async def test_first_event_reaches_client_before_upstream_sends_the_second(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient
) -> None:
    upstream.enqueue(Reply(status=200, headers=[("content-type", "text/event-stream")],
                           body=[b"event: a\ndata: 1\n\n", Pause(30), b"event: b\ndata: 2\n\n"]))
    with trio.fail_after(120):
        start = trio.current_time()
        await raw_client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        resp = await raw_client.read_head()
        await raw_client.read_body(resp, max_chunks=1)
        first_at = resp.chunks[0][0]
        assert resp.chunks[0][1] == b"event: a\ndata: 1\n\n"
        assert first_at - start < 1  # not held back for the 30 s the upstream pauses
        await raw_client.read_body(resp)
    assert resp.complete and resp.body.endswith(b"data: 2\n\n")
    assert resp.chunks[-1][0] - start >= 30


async def test_600s_stream_with_280s_silences_completes_byte_identical(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
    proxy: ProxyServer,
) -> None:
    reply = anthropic_sse([f"part {i} " for i in range(20)],
                          gaps=[0, 280] + [1] * 20 + [280])
    upstream.enqueue(reply)
    with trio.fail_after(1200):
        start = trio.current_time()
        resp = await raw_client.request("POST", "/v1/messages?beta=true", ANTHROPIC, MESSAGES_STREAM)
    assert resp.status == 200 and resp.complete
    assert resp.body == body_bytes(reply)
    assert trio.current_time() - start >= 580
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.max_gap >= 280 and ex.end_reason == "complete"


def _policy_view(resp) -> dict[str, object]:
    return {
        "ids": [resp.header("request-id") is not None or resp.header("x-request-id") is not None,
                resp.header("x-trioproxy-request-id") is not None],
        "hop": [resp.header(h) for h in ("keep-alive", "connection", "proxy-connection")],
        "dates": len(resp.header_all("date")),
        "servers": len(resp.header_all("server")),
    }


async def test_header_policy_is_identical_on_streaming_buffered_and_error_paths(
    upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    with trio.fail_after(20):
        streaming = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        buffered = await raw_client.request(
            "POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM.replace(b'"stream": true', b'"stream": false'))
        upstream.enqueue(error_reply("anthropic", 429, "rate_limit_error", "slow down", retry_after=7))
        error = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert streaming.header("content-type", ).startswith("text/event-stream")
    assert buffered.header("content-type").startswith("application/json")
    assert error.status == 429 and error.header("retry-after") == "7"
    assert json.loads(error.body)["error"]["type"] == "rate_limit_error"
    views = [_policy_view(r) for r in (streaming, buffered, error)]
    assert views[0] == views[1] == views[2] == {
        "ids": [True, True], "hop": [None, None, None], "dates": 1, "servers": 1,
    }
    for resp in (streaming, buffered, error):
        assert any(k.startswith(b"anthropic-ratelimit-") for k, _ in resp.headers)


async def test_query_string_and_body_bytes_reach_upstream_unchanged(
    upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    target = "/v1/messages?beta=true&x=%2F%20a&empty=&b=1&b=2"
    body = ('{"model":"claude-sonnet-4-5",  "max_tokens":5,"messages":[{"role":"user",'
            '"content":"h\u00e9llo \\u00e9 1.0e5"}] }').encode()
    with trio.fail_after(20):
        resp = await raw_client.request("POST", target, [("host", "evil.example"), *ANTHROPIC], body)
    assert resp.status == 200
    seen = upstream.requests[-1]  # Host from the request never picks the upstream
    assert seen.target == b"/anthropic-upstream" + target.encode()
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(body).digest()
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"


async def test_client_disconnect_closes_the_upstream_connection_promptly(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["a", "b", "c"], gaps=[0, 0, 0, 500]))
    client = await RawClient.connect(proxy.port)
    with trio.fail_after(60):
        await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        resp = await client.read_head()
        await client.read_body(resp, max_chunks=1)
        await upstream.wait_for_requests(1)
        conn = next(c for c in upstream.connections if c.conn_id == upstream.requests[-1].conn_id)
        assert conn.closed_at is None
        gone_at = trio.current_time()
        await client.aclose()
        await conn.closed.wait()
    assert conn.closed_at - gone_at < 0.1
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.end_reason == "client_disconnect"


@pytest.mark.parametrize(("headers", "shape"), [(ANTHROPIC, "anthropic"), (OPENAI, "openai")])
async def test_connect_failure_is_502_in_the_provider_shape(
    nursery: trio.Nursery, headers, shape: str,
) -> None:
    with trio.socket.socket() as s:  # a port with nothing listening
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    from trioproxy import Settings

    server = await start_proxy(
        nursery, Settings(anthropic_base_url=dead, openai_base_url=dead, accounting=False))
    client = await RawClient.connect(server.port)
    path = "/v1/messages" if shape == "anthropic" else "/v1/chat/completions"
    with trio.fail_after(20):
        resp = await client.request("POST", path, headers, b"{}")
    await client.aclose()
    assert resp.status == 502 and resp.header("x-trioproxy-request-id")
    body = json.loads(resp.body)
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
    else:
        assert body["error"]["type"] == "server_error"
        assert body["error"]["code"] == "upstream_connect_error"
    assert "cannot connect" in (body["error"]["message"])
    await server.stop()


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


async def test_mid_stream_upstream_failure_is_a_truncated_stream(
    upstream: FakeUpstream, raw_client: RawClient, proxy: ProxyServer,
) -> None:
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n", Abort()]))
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.status == 200
    assert resp.body == b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"
    assert not resp.complete and resp.error  # no terminating chunk: the client can tell
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.end_reason == "upstream_error"


async def test_oversized_body_is_413_and_never_reaches_upstream(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, max_body_bytes=1000))
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, b"x" * 1001)
    await client.aclose()
    assert resp.status == 413
    assert json.loads(resp.body)["error"]["type"] == "request_too_large"
    assert upstream.requests == []
    await server.stop()


async def test_unknown_path_is_404_and_never_reaches_upstream(
    upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    with trio.fail_after(20):
        resp = await raw_client.request("GET", "/admin/secrets", [("host", "evil.example")])
    assert resp.status == 404
    assert "no route" in json.loads(resp.body)["error"]["message"]
    assert upstream.requests == []


async def test_keepalive_connection_is_reused(upstream: FakeUpstream, raw_client: RawClient) -> None:
    with trio.fail_after(20):
        for _ in range(3):
            resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            assert resp.complete
    assert len({r.conn_id for r in upstream.requests}) == 1


async def test_keepalive_connection_cut_before_the_response_is_not_resent(
    upstream: FakeUpstream, raw_client: RawClient, proxy: ProxyServer,
) -> None:
    with trio.fail_after(20):
        first = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        upstream.enqueue(Reply(close_before_response=True))
        cut = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        after = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert first.complete and cut.status == 502 and after.status == 200 and after.complete
    assert "not resent" in json.loads(cut.body)["error"]["message"]
    conns = [r.conn_id for r in upstream.requests]  # the upstream may have taken it: sent once
    assert len(conns) == 3 and conns[0] == conns[1] != conns[2]
    assert proxy.app.runtime.pool.retried == 0


async def test_inbound_request_id_is_a_correlation_id_beside_the_proxys_own(
    upstream: FakeUpstream, raw_client: RawClient, proxy: ProxyServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="trioproxy")
    with trio.fail_after(20):
        resp = await raw_client.request(
            "POST", "/v1/messages", [*ANTHROPIC, ("x-trioproxy-request-id", "gw-1234.abc")],
            MESSAGES_STREAM)
        fresh = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    await proxy.wait_exchanges(2)
    own = resp.header("x-trioproxy-request-id")
    assert own is not None and own.startswith("tp_") and own == proxy.exchanges[0].request_id
    assert resp.header("x-trioproxy-correlation-id") == "gw-1234.abc"
    assert proxy.exchanges[0].correlation_id == "gw-1234.abc"
    assert fresh.header("x-trioproxy-request-id") not in (None, own)
    assert fresh.header("x-trioproxy-correlation-id") is None
    assert all(r.header("x-trioproxy-request-id") is None for r in upstream.requests)
    access = [r for r in caplog.records if r.name == "trioproxy.access"]
    assert [r.request_id for r in access] == [
        f"{own}(gw-1234.abc)", fresh.header("x-trioproxy-request-id")]


async def test_a_reused_inbound_id_gets_a_new_proxy_id_every_time(
    upstream: FakeUpstream, raw_client: RawClient, proxy: ProxyServer,
) -> None:
    with trio.fail_after(20):
        answers = [await raw_client.request(
            "POST", "/v1/messages", [*ANTHROPIC, ("x-trioproxy-request-id", "same-id")],
            MESSAGES_STREAM) for _ in range(3)]
    ids = {a.header("x-trioproxy-request-id") for a in answers}
    assert len(ids) == 3 and all(a.status == 200 for a in answers)


async def test_request_id_header_is_configurable(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    server = await start_proxy(
        nursery, proxy_settings(upstream, request_id_header="x-api-request-log-id"))
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request(
            "POST", "/v1/messages", [*ANTHROPIC, ("x-api-request-log-id", "log-77")], MESSAGES_STREAM)
    await client.aclose()
    assert resp.header("x-trioproxy-correlation-id") == "log-77"
    await server.wait_exchanges(1)
    assert server.exchanges[0].correlation_id == "log-77"
    assert resp.header("x-trioproxy-request-id") == server.exchanges[0].request_id != "log-77"
    await server.stop()


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


async def test_slow_client_backpressures_the_upstream_read(
    upstream: FakeUpstream, proxy: ProxyServer,
) -> None:
    chunk = b"data: " + b"x" * 65530 + b"\n\n"
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], body=[chunk] * 1600))
    client = await RawClient.connect(proxy.port)
    with trio.fail_after(60):
        await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
        await client.read_head()  # ...and then stop reading for a while
        while not proxy.app.runtime.inflight:
            await trio.sleep(0.01)
        (ex,) = proxy.app.runtime.inflight.values()
        await trio.sleep(1.0)
        stalled_at = ex.bytes_out
        await trio.sleep(0.5)
        # 100 MiB upstream; the proxy holds only its channel plus socket buffers
        assert stalled_at < 32 * 1024 * 1024 and ex.bytes_out == stalled_at
        await client.aclose()


async def test_tls_upstream_is_verified_against_the_trust_store(nursery: trio.Nursery) -> None:
    import ssl

    import trustme

    from trioproxy import Settings

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    fake = FakeUpstream(tls=server_ctx)
    await nursery.start(fake.serve)
    settings = Settings(anthropic_base_url=fake.url, openai_base_url=fake.url, accounting=False)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    trusted = await start_proxy(nursery, settings, ssl_context=client_ctx)
    untrusted = await start_proxy(nursery, settings)  # system store: does not know this CA
    results = []
    for server in (trusted, untrusted):
        client = await RawClient.connect(server.port)
        with trio.fail_after(20):
            results.append(await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM))
        await client.aclose()
    assert fake.url.startswith("https://")
    assert results[0].status == 200 and results[0].complete
    assert results[1].status == 502 and b"CERTIFICATE_VERIFY_FAILED" in results[1].body
    await trusted.stop()
    await untrusted.stop()


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


async def test_header_value_http11_forbids_is_400_and_the_value_is_never_logged(
    upstream: FakeUpstream, proxy: ProxyServer, caplog: pytest.LogCaptureFixture,
) -> None:
    from .h2client import h2_request

    caplog.set_level(logging.DEBUG, logger="trioproxy")
    headers = [("x-api-key", "sk-ant-SUPERSECRET\x0c123456"), ("anthropic-version", "2023-06-01")]
    with trio.fail_after(20):
        resp = await h2_request(proxy.port, "POST", "/v1/messages", headers, MESSAGES_STREAM)
    assert resp.status == 400
    assert "x-api-key" in json.loads(resp.body)["error"]["message"]
    assert "SUPERSECRET" not in resp.body.decode()
    assert all("SUPERSECRET" not in r.getMessage()
               for r in caplog.records if r.name.startswith("trioproxy"))
    assert upstream.requests == []
    (ex,) = await proxy.wait_exchanges(1)
    assert ex.status == 400


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
