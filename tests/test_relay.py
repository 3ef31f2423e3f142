"""End to end: the real proxy under Hypercorn, the fake upstream, a raw HTTP/1.1 client. Streamed
events reach the client as they arrive and byte for byte, the request reaches the upstream
unchanged, one header policy on every path, a reused connection, the proxy's own request id
beside the client's, and a slow client's backpressure."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import trio

from trioproxy.log import RequestIdFilter
from trioproxy.testing import FakeUpstream, Pause, Reply, anthropic_sse, error_reply

from .client_requests import ANTHROPIC, MESSAGES_STREAM, body_bytes
from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy


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


async def test_keepalive_connection_is_reused(upstream: FakeUpstream, raw_client: RawClient) -> None:
    with trio.fail_after(20):
        for _ in range(3):
            resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            assert resp.complete
    assert len({r.conn_id for r in upstream.requests}) == 1


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
