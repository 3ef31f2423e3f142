"""The Responses WebSocket handshake: the headers forwarded and dropped, the upstream's refusals
and failures answered in HTTP, permessage-deflate, a header value HTTP/1.1 forbids, and the
refusal of new sockets while the proxy drains."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_websocket as tws
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioproxy.accounting.build import build_record
from trioproxy.testing.websocket import Rejection, Turn

from .ws_proxy import AUTH, connect, create, refusal, start_fake, start_pair, start_proxy, turn


async def test_handshake_headers_forwarded_dropped_and_request_id_on_accept(
    nursery: trio.Nursery,
) -> None:
    sent = [
        (b"session-id", b"sess-1"), (b"originator", b"codex_cli_rs"),
        (b"x-codex-turn-metadata", b"{}"), (b"chatgpt-account-id", b"acct-1"),
        (b"x-client-request-id", b"cli-1"), (b"x-custom-end-to-end", b"kept"),
        (b"keep-alive", b"timeout=5"), (b"proxy-authorization", b"Basic eA=="),
        (b"x-trioproxy-request-id", b"my-socket-1"), (b"x-trioproxy-bypass", b"false"),
        (b"connection", b"Upgrade, x-named-hop"), (b"x-named-hop", b"dropped"),
    ]
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url + "/base")
        async with connect(proxy, "/openai/v1/responses?stage=1", sent) as ws:
            accept = dict(ws.handshake_headers)
            await turn(ws, create())
        (ex, _), = await proxy.wait_records(1)
    seen = fake.last
    assert seen.path == "/base/v1/responses?stage=1"
    expected = dict(AUTH + sent)
    for name in (b"authorization", b"openai-beta", b"session-id", b"originator",
                 b"x-codex-turn-metadata", b"chatgpt-account-id", b"x-client-request-id",
                 b"x-custom-end-to-end"):
        assert seen.header(name.decode()) == expected[name].decode(), name
    for name in ("keep-alive", "proxy-authorization", "x-trioproxy-request-id",
                 "x-trioproxy-bypass", "x-named-hop"):
        assert seen.header(name) is None, name
    names = [k.lower() for k, _ in seen.headers]
    assert b"host" not in names  # wsproto reports Host apart: no client Host was added
    assert names.count(b"sec-websocket-key") == 1 and names.count(b"upgrade") == 1
    assert accept[b"x-trioproxy-request-id"].startswith(b"tp_")
    assert accept[b"x-trioproxy-correlation-id"] == b"my-socket-1"
    for name in (b"x-request-id", b"openai-model", b"openai-processing-ms",
                 b"x-codex-turn-state", b"x-ratelimit-remaining-requests", b"x-models-etag"):
        assert name in accept, name
    assert b"keep-alive" not in accept
    socket_id = accept[b"x-trioproxy-request-id"].decode()
    assert ex.request_id == f"{socket_id}.1" and ex.correlation_id == "my-socket-1"
    assert ex.upstream_request_id == "req_fake_ws_1"


@pytest.mark.parametrize(
    "rejection",
    [Rejection.json(401, "Incorrect API key provided", "invalid_api_key"),
     Rejection.json(429, "Rate limit reached", "rate_limit_exceeded", retry_after="7")],
    ids=["401", "429"],
)
async def test_upstream_refusal_reaches_client_as_the_same_http_status(
    nursery: trio.Nursery, rejection: Rejection
) -> None:
    with trio.fail_after(10):
        _fake, proxy = await start_pair(nursery, reject=rejection)
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == rejection.status
    assert info.body == rejection.body
    got = dict(info.headers)
    assert got[b"content-type"] == b"application/json" and b"x-trioproxy-request-id" in got
    if rejection.status == 429:
        assert got[b"retry-after"] == b"7"
    assert ex.status == rejection.status and ex.transport == "websocket"


async def test_unknown_websocket_path_is_refused_with_404_and_nothing_upstream(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery)
        info = await refusal(proxy, "/v1/chat/completions")
    assert info.status_code == 404
    assert json.loads(info.body or b"")["error"]["code"] == "unknown_path"
    assert fake.sockets == []


async def test_unreachable_upstream_is_a_502_in_openai_shape(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()  # nothing listens there any more
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}")
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == 502
    error = json.loads(info.body or b"")["error"]
    assert error["code"] == "upstream_connect_error" and error["type"] == "server_error"
    assert ex.end_reason == "connect_error"


async def test_silent_upstream_handshake_is_a_504(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
        port = listeners[0].socket.getsockname()[1]
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}", connect_timeout=0.2)
        info = await refusal(proxy)
        await listeners[0].aclose()
    assert info.status_code == 504
    assert json.loads(info.body or b"")["error"]["code"] == "upstream_timeout"


async def test_permessage_deflate_is_negotiated_with_a_client_that_offers_it(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(
            host="127.0.0.1", target="/v1/responses", extensions=[PerMessageDeflate()],
            extra_headers=AUTH)))
        accepted = await _next_event(stream, conn, lambda e: isinstance(e, AcceptConnection))
        frame = create(instructions="compress me " * 1000)
        await stream.send_all(conn.send(TextMessage(data=frame)))
        done = await _next_event(stream, conn, lambda e: isinstance(e, TextMessage)
                                 and '"response.completed"' in e.data)
        await stream.send_all(conn.send(CloseConnection(code=1000)))
        await stream.aclose()
        await fake.last.closed.wait()
    assert isinstance(accepted, AcceptConnection)
    assert [type(x) for x in accepted.extensions] == [PerMessageDeflate]
    assert json.loads(done.data)["response"]["status"] == "completed"
    assert fake.last.frames[0] == frame


async def _next_event(stream: trio.SocketStream, conn: WSConnection,
                      wanted: Callable[[Any], bool]) -> Any:
    while True:
        for event in conn.events():
            if wanted(event):
                return event
        conn.receive_data(await stream.receive_some(65536))


async def test_broken_upstream_handshake_is_a_502_with_one_record(nursery: trio.Nursery) -> None:
    async def bogus_upgrade(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n")
        await trio.sleep(5)

    with trio.fail_after(10):
        listeners = await nursery.start(trio.serve_tcp, bogus_upgrade, 0)
        port = listeners[0].socket.getsockname()[1]
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}")
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == 502
    assert json.loads(info.body)["error"]["code"] == "upstream_error"
    assert ex.status == 502 and ex.end_reason == "upstream_error"


async def _h2_websocket_refusal(port: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """An RFC 8441 WebSocket upgrade over HTTP/2 (where header values HTTP/1.1 forbids can
    arrive); returns the proxy's status and body."""
    import h2.config
    import h2.connection
    import h2.events

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    status, body = 0, b""
    sent = False
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return status, body
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, body
            if not sent and conn.remote_settings.enable_connect_protocol:
                sent = True
                conn.send_headers(1, [
                    (b":method", b"CONNECT"), (b":protocol", b"websocket"),
                    (b":scheme", b"http"), (b":path", b"/v1/responses"),
                    (b":authority", b"proxy.test"), (b"sec-websocket-version", b"13"),
                    *headers])
            await stream.send_all(conn.data_to_send())
    finally:
        await stream.aclose()


async def test_a_handshake_header_h11_refuses_never_echoes_its_value(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
) -> None:
    """An authorization value with a control character (possible over HTTP/2) is refused with
    a 400 that names the header only: the key reaches no log line, record or response."""
    caplog.set_level(logging.DEBUG, logger="trioproxy")
    secret = b"sk-proj-TOPSECRETKEY1234\x0cmore"
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery)
        status, body = await _h2_websocket_refusal(
            proxy.port, [(b"authorization", b"Bearer " + secret)])
        (ex, _), = await proxy.wait_records(1)
    assert status == 400 and b"authorization" in body
    assert b"TOPSECRETKEY" not in body
    assert "TOPSECRETKEY" not in (ex.error or "")
    assert "TOPSECRETKEY" not in json.dumps(build_record(ex, b"k").to_dict())
    assert all("TOPSECRETKEY" not in r.getMessage() for r in caplog.records)
    assert fake.sockets == []  # nothing was sent upstream


async def test_a_draining_proxy_refuses_new_websockets_in_openai_shape_with_one_record(
    nursery: trio.Nursery,
) -> None:
    """While draining, a new handshake is refused like a new HTTP request: 503 with
    retry-after and OpenAI's error body, one record; nothing reaches the upstream. A socket
    opened before the drain finishes its response, then closes with 1012 (service restart)."""
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery, turns=[Turn(gaps=0.2)])
        async with connect(proxy) as ws:
            await ws.send_message(create())
            assert json.loads(await ws.get_message())["type"] == "response.created"
            proxy.app.runtime.draining = True
            rejected = await refusal(proxy)
            while json.loads(await ws.get_message())["type"] != "response.completed":
                pass  # the open socket still relays its response
            with pytest.raises(tws.ConnectionClosed):
                await ws.get_message()
            assert ws.closed.code == 1012
        records = await proxy.wait_records(2)
    assert rejected.status_code == 503
    headers = {k.lower(): v for k, v in rejected.headers}
    assert int(headers[b"retry-after"]) > 0
    assert json.loads(rejected.body)["error"]["code"] == "proxy_draining"
    refused = [ex for ex, _ in records if ex.status == 503]
    assert len(refused) == 1 and refused[0].end_reason == "rejected"
    assert len(fake.sockets) == 1  # only the socket opened before the drain
