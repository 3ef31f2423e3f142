"""HTTP/1.1 semantics a client, a load balancer and an attacker rely on, with raw sockets
against the real server on loopback: keep-alive, Connection: close, conflicting framing, 413,
request-head size, WebSocket message size.

Open client sockets are counted from the server process itself (/proc), never inferred."""

from __future__ import annotations

import json

import h11
import pytest
import trio
from hypercorn.config import Config
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from trioproxy.protocol.headers import MAX_HEAD_BYTES, hypercorn_head_limit
from trioproxy.testing import FakeUpstream
from trioproxy.testing.websocket import FakeResponsesWS

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy
from .spawned_server import (
    ANTHROPIC,
    MESSAGE,
    PAST_KEEP_ALIVE,
    Closing,
    closing,
    post_message,
    read_eof,
    read_response,
    spawned,
    upstream_env,
    wait_open_sockets,
    witness,
)

# -- keep-alive: idle clients are closed after a proxied response --------------------------------


@pytest.mark.parametrize("kind", ["hypercorn", "serve"])
async def test_idle_keepalive_clients_are_closed_after_proxied_responses(
    upstream: FakeUpstream, kind: str
) -> None:
    async with spawned(kind, upstream_env(upstream)) as server, closing() as streams:
        clients = [RawClient(streams.add(await trio.open_tcp_stream("127.0.0.1", server.port)))
                   for _ in range(8)]
        with trio.fail_after(30):
            for i, client in enumerate(clients):
                resp = await post_message(client, stream=i % 2 == 0)
                assert resp.status == 200 and resp.complete
            streams.add(await witness(server.port))
        left = await wait_open_sockets(server.pid, server.port, 1)
        assert left == 1, f"{left - 1} of 8 idle keep-alive sockets still open in the server"
        for client in clients:
            assert await read_eof(client.stream) == b""


# -- Connection: close, conflicting framing, 413 -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_client_connection_close_gets_connection_close_and_eof(
    proxy: ProxyServer, raw_client: RawClient, stream: bool
) -> None:
    with trio.fail_after(10):
        resp = await post_message(raw_client, stream=stream, extra=[("connection", "close")])
    assert resp.status == 200 and resp.complete
    assert resp.header("connection") == "close"
    assert await read_eof(raw_client.stream) == b""


async def test_content_length_with_transfer_encoding_is_answered_then_closed(
    proxy: ProxyServer, upstream: FakeUpstream
) -> None:
    body = json.dumps(MESSAGE).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    smuggled = b"GET /v1/models?smuggled=1 HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n\r\n"
    head = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
            b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(chunked + smuggled))
    data = b""
    async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as stream:
        await stream.send_all(head + chunked + smuggled)
        with trio.move_on_after(PAST_KEEP_ALIVE):  # whatever came back by then is judged below
            while chunk := await stream.receive_some(65536):
                data += chunk
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))  # to read replies
    conn.receive_data(data)
    conn.receive_data(b"")
    first = conn.next_event()
    assert isinstance(first, h11.Response)
    assert (b"connection", b"close") in list(first.headers)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    assert isinstance(conn.next_event(), h11.ConnectionClosed)  # no second response after it
    assert not any(b"smuggled" in r.target for r in upstream.requests)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_413_carries_connection_close_and_the_connection_closes(
    nursery: trio.Nursery, upstream: FakeUpstream, framing: str
) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, max_body_bytes=1024))
    body = b'{"x":"' + b"a" * 2048 + b'"}'
    if framing == "chunked":
        framed = b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        framed = b"content-length: %d\r\n\r\n%s" % (len(body), body)
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
                              + framed)
        resp = await read_response(stream)
        assert resp.status == 413 and resp.complete
        assert resp.header("connection") == "close"
        assert await read_eof(stream) == b""
    assert upstream.requests == []


# -- request-head size: the same answer however the head is segmented ----------------------------


async def send_head(port: int, size: int, *, chunk: int | None) -> tuple[int, bytes]:
    """A request whose head is ``size`` bytes, written at once or in ``chunk``-byte writes."""
    body = json.dumps(MESSAGE).encode()
    head = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
            b"content-length: %d\r\nx-pad: " % len(body))
    head += b"p" * (size - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == size
    data = head + body
    step = chunk or len(data)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for i in range(0, len(data), step):
            try:
                await stream.send_all(data[i:i + step])
            except trio.BrokenResourceError:
                break  # the server answered and closed before the head was complete
            await trio.sleep(0.005 if chunk else 0)  # let the server read each write alone
        resp = await read_response(stream)
    return resp.status, resp.body


@pytest.mark.parametrize(("size", "status"), [(12_000, 200), (MAX_HEAD_BYTES + 1, 431),
                                              (52_000, 431)])
async def test_head_size_answer_does_not_depend_on_segmentation(
    proxy: ProxyServer, size: int, status: int
) -> None:
    one_write = await send_head(proxy.port, size, chunk=None)
    small_writes = await send_head(proxy.port, size, chunk=4096)
    assert (one_write[0], small_writes[0]) == (status, status)


async def test_oversized_head_gets_the_provider_shaped_431_in_any_segmentation(
    nursery: trio.Nursery, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hypercorn's own limit as a server should set it (see README, Serving)
    monkeypatch.setattr(Config, "h11_max_incomplete_size", hypercorn_head_limit(MAX_HEAD_BYTES))
    server = await start_proxy(nursery, proxy_settings(upstream))
    answers = [await send_head(server.port, 52_000, chunk=chunk) for chunk in (None, 4096)]
    for status, body in answers:
        assert status == 431
        error = json.loads(body)
        assert error["type"] == "error" and str(MAX_HEAD_BYTES) in error["error"]["message"]
    assert upstream.requests == []


async def test_serve_answers_oversized_heads_with_the_provider_shaped_431(
    upstream: FakeUpstream,
) -> None:
    async with spawned("serve", upstream_env(upstream)) as server:
        answers = [await send_head(server.port, 52_000, chunk=chunk) for chunk in (None, 4096)]
    assert [status for status, _ in answers] == [431, 431]
    assert [json.loads(body)["type"] for _, body in answers] == ["error", "error"]


# -- WebSocket message size under `trioproxy serve` ----------------------------------------------


async def test_serve_refuses_an_oversized_websocket_message_with_1009_as_it_arrives(
    nursery: trio.Nursery,
) -> None:
    fake = await nursery.start(FakeResponsesWS().serve)
    env = {"TRIOPROXY_OPENAI_BASE_URL": fake.base_url, "TRIOPROXY_WS_MAX_MESSAGE_SIZE": "65536"}
    async with spawned("serve", env) as server, await trio.open_tcp_stream(
        "127.0.0.1", server.port
    ) as stream:
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(
            host="127.0.0.1", target="/v1/responses",
            extra_headers=[(b"authorization", b"Bearer sk-test"),
                           (b"openai-beta", b"responses_websockets=2026-02-06")])))
        closed = None
        with trio.move_on_after(10):
            while closed is None:
                conn.receive_data(await stream.receive_some(65536) or None)
                for event in conn.events():
                    if isinstance(event, AcceptConnection):  # half the limit, over and over,
                        part = TextMessage(data="x" * 32768, message_finished=False)
                        for _ in range(4):  # never finishing the message
                            await stream.send_all(conn.send(part))
                    elif isinstance(event, CloseConnection):
                        closed = event
    assert closed is not None and closed.code == 1009
    assert all(not s.frames for s in fake.sockets)


# -- a long mixed run leaves nothing open ---------------------------------------------------------


async def _mixed_client(port: int, worker: int, rounds: int, streams: Closing) -> None:
    client = RawClient(streams.add(await trio.open_tcp_stream("127.0.0.1", port)))
    for i in range(rounds):
        kind = (worker + i) % 6
        if kind == 0:
            resp = await post_message(client, stream=True)
        elif kind == 1:
            resp = await post_message(client, stream=False)
        elif kind == 2:
            resp = await client.request("GET", "/nope", ANTHROPIC)
        elif kind == 3:
            resp = await client.request("POST", "/anthropic/../x", ANTHROPIC, b"{}")
        else:
            if kind == 4:  # over the body limit: the server closes after its 413
                resp = await client.request("POST", "/v1/messages", ANTHROPIC, b"a" * 5000)
            else:  # the client leaves mid-response
                await client.send_request("POST", "/v1/messages", ANTHROPIC,
                                          json.dumps({**MESSAGE, "stream": True}).encode())
                resp = await client.read_head()
            await client.aclose()
            client = RawClient(streams.add(await trio.open_tcp_stream("127.0.0.1", port)))
        assert resp.status in (200, 404, 400, 413)


async def test_long_mixed_run_leaves_no_client_socket_open_past_keepalive(
    upstream: FakeUpstream,
) -> None:
    env = {**upstream_env(upstream), "TRIOPROXY_MAX_BODY_BYTES": "4096",
           "TRIOPROXY_LOG_LEVEL": "WARNING"}
    async with spawned("hypercorn", env) as server, closing() as streams:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for worker in range(12):  # 12 x 25 = 300 requests
                    nursery.start_soon(_mixed_client, server.port, worker, 25, streams)
            streams.add(await witness(server.port))
        left = await wait_open_sockets(server.pid, server.port, 1)
        assert left == 1, f"{left - 1} client sockets open past the keep-alive timeout"
