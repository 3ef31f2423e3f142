"""HTTP/1.1 semantics a client, a load balancer and an attacker rely on (issue 11), with raw
sockets against the real server on loopback: keep-alive, Connection: close, conflicting framing,
413, dot-segments, request-head size, WebSocket message size.

Open client sockets are counted from the server process itself (/proc), never inferred."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h11
import httpx
import pytest
import trio
from hypercorn.config import Config
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from trioproxy.protocol.headers import MAX_HEAD_BYTES, hypercorn_head_limit
from trioproxy.testing import FakeUpstream
from trioproxy.testing.websocket import FakeResponsesWS

from .conftest import ProxyServer, RawClient, RawResponse, proxy_settings, start_proxy
from .test_server import HYPERCORN, _run_until_listening, _stop

TRIOPROXY = os.path.join(os.path.dirname(sys.executable), "trioproxy")
KEEP_ALIVE = 1  # seconds, for the spawned servers (Hypercorn's flag takes whole seconds)
PAST_KEEP_ALIVE = KEEP_ALIVE + 10  # how long an idle socket may outlive it, at most
ANTHROPIC = [("x-api-key", "sk-ant-test"), ("content-type", "application/json")]
MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 9, "messages": []}


# -- counting the server's client sockets from /proc --------------------------------------------


def _process_tree(root: int) -> set[int]:
    """``root`` and its descendants (Hypercorn serves from spawned worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= found
        grew = bool(found)
    return tree


def open_client_sockets(server_pid: int, port: int) -> int:
    """TCP connections on ``port`` that the server's processes hold open (listener excluded)."""
    inodes: set[str] = set()
    for pid in _process_tree(server_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    with open(f"/proc/{server_pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A" and fields[9] in inodes:  # 0A: LISTEN
                count += 1
    return count


async def wait_open_sockets(pid: int, port: int, expected: int) -> int:
    """Poll until the server holds ``expected`` client sockets, for at most PAST_KEEP_ALIVE."""
    with trio.move_on_after(PAST_KEEP_ALIVE):
        while open_client_sockets(pid, port) != expected:
            await trio.sleep(0.1)
    return open_client_sockets(pid, port)


async def witness(port: int) -> trio.SocketStream:
    """A connection in the middle of a request: Hypercorn never times it out, so it must stay
    counted while the idle ones go (proof that the count sees the server's sockets)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
                          b"content-length: 10\r\n\r\n{\"a\"")
    return stream


class Closing:
    """Client sockets a test opened, all closed when it ends, whatever happened."""

    def __init__(self) -> None:
        self.streams: list[trio.SocketStream] = []

    def add(self, stream: trio.SocketStream) -> trio.SocketStream:
        self.streams.append(stream)
        return stream


@asynccontextmanager
async def closing() -> AsyncIterator[Closing]:
    held = Closing()
    try:
        yield held
    finally:
        with trio.CancelScope(shield=True):
            for stream in held.streams:
                await stream.aclose()


async def read_response(stream: trio.SocketStream) -> RawResponse:
    """The response on a connection whose request the test wrote by hand."""
    client = RawClient(stream)
    client.conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    with trio.fail_after(10):
        return await client.read_body(await client.read_head())


async def read_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (a reset after its response counts as closed)."""
    data = b""
    with trio.fail_after(PAST_KEEP_ALIVE):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


# -- spawned servers, as users start them --------------------------------------------------------


@dataclass
class Spawned:
    pid: int
    port: int


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:  # keep the server's log pipe from filling up and blocking it
        pass


@asynccontextmanager
async def spawned(kind: str, env: dict[str, str], *flags: str) -> AsyncIterator[Spawned]:
    """``hypercorn trioproxy:app --worker-class trio`` or ``trioproxy serve`` on 127.0.0.1:0."""
    if kind == "hypercorn":
        cmd = [HYPERCORN, "trioproxy:app", "--worker-class", "trio", "--bind", "127.0.0.1:0"]
    else:
        cmd = [TRIOPROXY, "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--keep-alive", str(KEEP_ALIVE), "--graceful-timeout", "1", *flags]
    env = {**os.environ, "TRIOPROXY_ACCOUNTING": "false", **env}
    async with trio.open_nursery() as nursery:
        proc, url = await _run_until_listening(cmd, env, nursery)
        nursery.start_soon(_drain, proc.stderr)
        try:
            yield Spawned(proc.pid, int(url.rsplit(":", 1)[1]))
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)


def upstream_env(upstream: FakeUpstream) -> dict[str, str]:
    return {"TRIOPROXY_ANTHROPIC_BASE_URL": upstream.url,
            "TRIOPROXY_OPENAI_BASE_URL": upstream.url}


async def post_message(client: RawClient, *, stream: bool, extra: list[tuple[str, str]] = ()):
    body = json.dumps({**MESSAGE, "stream": stream}).encode()
    return await client.request("POST", "/v1/messages", [*ANTHROPIC, *extra], body)


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


# -- dot-segments ---------------------------------------------------------------------------------

ESCAPES = [
    b"/anthropic/../../x",
    b"/anthropic/v1/messages/../../../x",
    b"/anthropic/%2e%2e/%2e%2e/x",
    b"/anthropic/.%2E/x",
    b"/anthropic/../openai/v1/chat/completions",
    b"/anthropic/..%2f..%2fx",
    b"/anthropic/v1/..;/..;/x",
    b"/anthropic\\..\\..\\x",
    b"/v1/messages/../../../x",
]


@pytest.mark.parametrize("path", ESCAPES, ids=lambda p: p.decode())
async def test_path_escaping_its_route_is_a_400_and_nothing_is_forwarded(
    proxy: ProxyServer, raw_client: RawClient, upstream: FakeUpstream, path: bytes
) -> None:
    with trio.fail_after(10):
        resp = await raw_client.request("POST", path + b"?beta=true", ANTHROPIC, b"{}")
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 400
    error = json.loads(resp.body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []
    assert (ex.status, ex.end_reason) == (400, "rejected")


async def test_percent_encoded_escape_via_httpx_is_refused(
    proxy: ProxyServer, upstream: FakeUpstream
) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with trio.fail_after(10):
            resp = await client.post("/openai/v1/%2e%2e/%2E%2E/admin", json={},
                                     headers={"authorization": "Bearer sk-test"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_path"
    assert upstream.requests == []


@pytest.mark.parametrize("path", [b"/anthropic/v1/files/../messages",
                                  b"/anthropic/v1/x/%2e%2E/./messages", b"/./v1/messages"])
async def test_dot_segments_inside_the_route_forward_the_normalised_path_and_query(
    proxy: ProxyServer, raw_client: RawClient, upstream: FakeUpstream, path: bytes
) -> None:
    query = b"beta=true&next=../%2e%2e/x&a=%2F"
    with trio.fail_after(10):
        resp = await raw_client.request("POST", path + b"?" + query, ANTHROPIC,
                                        json.dumps(MESSAGE).encode())
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 200
    (seen,) = upstream.requests
    assert seen.target == b"/anthropic-upstream/v1/messages?" + query
    assert ex.route is not None and ex.route.api == "anthropic.messages"


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
