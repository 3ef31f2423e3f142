"""THE FLOOR -- a lower bound for the bench, not a product.

The thinnest *correct* HTTP relay the stack allows: a raw ASGI app on Hypercorn's trio worker,
an h11 client connection to the upstream (kept alive, a small pool), the design's task shape
(per request one nursery: a disconnect watcher, an upstream reader task and the request's own
task as the client writer, joined by a memory channel bounded in bytes), no parsing, no
accounting, no timeouts, no extensions, no error shaping.

    UPSTREAM=http://127.0.0.1:9000 hypercorn floor.relay:app --worker-class trio --bind ...

(run from ``bench/``, or with ``bench/`` on ``PYTHONPATH``). What "correct" means here, and
nothing more:
- the request body is read whole, then sent upstream with its own Content-Length;
- status and headers are forwarded minus hop-by-hop ones (and minus ``date``/``server``, which
  Hypercorn adds itself);
- body bytes are forwarded as they arrive: the reader puts each upstream read into the channel
  (without a checkpoint while fewer than ``CHANNEL_BYTES`` are held), the writer gives all that
  waits to one ASGI ``send()`` (coalescing only what is already there, never waiting to batch);
  the bytes that arrived with the end of the message travel with it, in the last ``send()``;
- the response ends with ``more_body: False`` once the upstream message is complete; the
  watcher is cancelled *before* that last ``send()`` (cancelling Hypercorn inside its last
  ``send()`` leaks the client connection, see design.md);
- on ``http.disconnect`` the relay stops reading upstream and closes that upstream connection;
- an upstream that fails before the head gives a bare 502; after it, the response is left
  unfinished so Hypercorn closes the connection and the client sees the truncation.
Idle upstream connections are checked for EOF before reuse (one zero-timeout select), so a
request is never written to a connection the upstream already closed.

trioproxy does more per request by design (routing, the header policy, timeouts with phases,
the usage parser, the ledger, extensions, provider-shaped errors); this file only shows what the
server, the event loop and h11 cost by themselves.
"""

from __future__ import annotations

import os
import select
import socket
import urllib.parse
from typing import Any

import h11
import trio

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
READ_SIZE = 65536
CHANNEL_BYTES = 256 * 1024  # trioproxy's default stream_buffer
IDLE_KEEP = 256  # idle upstream connections kept for reuse


class UpstreamConn:
    """One kept-alive h11 client connection."""

    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(our_role=h11.CLIENT)

    def looks_alive(self) -> bool:
        """False when the upstream closed the idle connection (EOF or stray bytes waiting)."""
        try:
            readable, _, _ = select.select([self.stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


class Pool:
    """Idle connections to one origin; opened on demand, returned when both sides are done."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[UpstreamConn] = []

    async def acquire(self) -> UpstreamConn:
        while self.idle:
            conn = self.idle.pop()
            if conn.looks_alive():
                return conn
            await conn.stream.aclose()
        stream = await trio.open_tcp_stream(self.host, self.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return UpstreamConn(stream)

    async def release(self, conn: UpstreamConn, reusable: bool) -> None:
        h = conn.h11
        if reusable and h.our_state is h11.DONE and h.their_state is h11.DONE \
                and len(self.idle) < IDLE_KEEP:
            h.start_next_cycle()
            self.idle.append(conn)
        else:
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()


class FloorRelay:
    """The ASGI callable. The pool is created on the first request, inside the worker's trio
    run (a trio socket cannot be created at import time, before the event loop exists)."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.host_header = u.netloc.encode()
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.pool: Pool | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for conn in self.pool.idle if self.pool else ():
                    await conn.stream.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        headers = [(b"host", self.host_header), (b"content-length", b"%d" % len(body))]
        headers += [(k, v) for k, v in scope["headers"] if k not in REQUEST_DROP]
        if self.pool is None:
            self.pool = Pool(self.host, self.port)
        try:
            conn = await self.pool.acquire()
        except OSError:
            await _bare_502(send)
            return
        state = {"done": False, "started": False, "tail": b""}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
                try:
                    await _relay(conn, scope["method"].encode(), target, headers, body, send,
                                 state, nursery)
                except (OSError, h11.ProtocolError, trio.BrokenResourceError):
                    pass  # upstream failure: handled below by what was already sent
                nursery.cancel_scope.cancel()  # stop watching before the last send()
        finally:
            await self.pool.release(conn, reusable=state["done"])
        if state["done"]:
            await send({"type": "http.response.body", "body": state["tail"], "more_body": False})
        elif not state["started"]:
            await _bare_502(send)
        # else: started but unfinished (upstream cut or client gone): Hypercorn closes it


async def _watch_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            scope.cancel()
            return


class _Channel:
    """A memory channel bounded in bytes: put while fewer than CHANNEL_BYTES are held."""

    def __init__(self) -> None:
        self.tx, self.rx = trio.open_memory_channel(float("inf"))
        self.held = 0
        self.room: trio.Event | None = None

    async def put(self, data: bytes, end: bool) -> None:
        while self.held >= CHANNEL_BYTES:
            self.room = self.room or trio.Event()
            await self.room.wait()
        self.held += len(data)
        self.tx.send_nowait((data, end))

    def sent(self, size: int) -> None:
        self.held -= size
        if self.room is not None and self.held < CHANNEL_BYTES:
            self.room.set()
            self.room = None


async def _relay(conn: UpstreamConn, method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes, send: Any,
                 state: dict[str, Any], nursery: trio.Nursery) -> None:
    """Send the request, forward the head, then relay the body: a reader task and this task
    as the writer. The last piece is left in ``state["tail"]`` for the caller's final send
    (after the watcher has stopped)."""
    h = conn.h11
    out = h.send(h11.Request(method=method, target=target, headers=headers))
    out += h.send(h11.Data(data=body)) if body else b""
    out += h.send(h11.EndOfMessage())
    await conn.stream.send_all(out)
    while True:
        ev = h.next_event()
        if ev is h11.NEED_DATA:
            h.receive_data(await conn.stream.receive_some(READ_SIZE))
        elif isinstance(ev, h11.Response):
            break
        elif isinstance(ev, h11.ConnectionClosed):
            raise trio.BrokenResourceError("upstream closed before the response")
    await send({"type": "http.response.start", "status": ev.status_code,
                "headers": [(k, v) for k, v in ev.headers if k not in RESPONSE_DROP]})
    state["started"] = True
    channel = _Channel()
    nursery.start_soon(_read, h, conn.stream, channel)
    async for data, end in channel.rx:
        pending = [data]
        while not end:
            try:
                data, end = channel.rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            pending.append(data)
        joined = b"".join(pending)
        if end:
            state["tail"] = joined
            state["done"] = True
            return
        await send({"type": "http.response.body", "body": joined, "more_body": True})
        channel.sent(len(joined))


async def _read(h: h11.Connection, stream: trio.SocketStream, channel: _Channel) -> None:
    """The upstream reader: one item per read (all the Data events it completed). A failure
    closes the channel without the end: the writer leaves the response unfinished."""
    with channel.tx:
        try:
            await _read_events(h, stream, channel)
        except (OSError, h11.ProtocolError, trio.BrokenResourceError):
            pass


async def _read_events(h: h11.Connection, stream: trio.SocketStream, channel: _Channel) -> None:
    pending: list[bytes] = []
    while True:
        ev = h.next_event()
        if ev is h11.NEED_DATA:
            if pending:
                await channel.put(b"".join(pending), False)
                pending.clear()
            data = await stream.receive_some(READ_SIZE)
            h.receive_data(data)  # b"" is EOF: h11 raises or gives ConnectionClosed next
        elif isinstance(ev, h11.Data):
            pending.append(bytes(ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            await channel.put(b"".join(pending), True)
            return
        elif isinstance(ev, h11.ConnectionClosed):
            return
        # InformationalResponse (1xx): nothing to forward


async def _bare_502(send: Any) -> None:
    await send({"type": "http.response.start", "status": 502,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"502", "more_body": False})


app = FloorRelay(os.environ.get("UPSTREAM", "http://127.0.0.1:9000"))
