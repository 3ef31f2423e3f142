"""Failures on a relayed exchange, end to end: a client that leaves, an upstream that cannot be
reached, fails mid-stream, cuts a reused connection or is not trusted, and requests refused
before they reach the upstream (too large, unknown path, a header value HTTP/1.1 forbids)."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from trioproxy.testing import Abort, FakeUpstream, Reply, anthropic_sse

from .client_requests import ANTHROPIC, MESSAGES_STREAM, OPENAI
from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy


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
