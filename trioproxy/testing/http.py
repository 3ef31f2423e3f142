"""A scriptable fake LLM upstream (Anthropic and OpenAI) for tests, the bench and demos.

``FakeUpstream`` (replies scripted with :mod:`.replies`) is a raw h11-over-trio HTTP/1.1
server, so every byte and every connection is
under the test's control; it uses only trio primitives and ``trio.sleep`` (``autojump_clock``
safe). Every request is kept (``requests``), every TCP connection too (``connections``).
Replies are scripted with ``enqueue(Reply(...))`` (FIFO, optionally per path); when nothing is
queued a default reply in the real wire shape is made from the request (``default_reply``).

    fake = FakeUpstream()
    await nursery.start(fake.serve)
    fake.enqueue(anthropic_sse(["Hel", "lo"], gaps=[0, 0, 0, 30], abort_after=5))

A ``Reply`` body is a list of ``bytes`` (one h11 ``Data`` each, i.e. one chunk), ``Pause(s)``
and ``Abort()`` (close the TCP connection right there: a truncated body). The builders return
replies with real-style provider headers; every reply also carries the hop-by-hop headers
``connection: keep-alive`` and ``keep-alive: timeout=30``. The upstream request id that was sent
is ``RecordedRequest.reply_request_id`` (and ``Reply.request_id``).

Run standalone: ``python -m trioproxy.testing --port 9000``.
"""

from __future__ import annotations

import argparse
import functools
import math
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11
import trio

from .replies import default_reply
from .script import (
    HOP_BY_HOP,
    Abort,
    Pause,
    RecordedRequest,
    Reply,
    anthropic_request_id,
    openai_request_id,
)


@dataclass
class ConnInfo:
    conn_id: int
    opened_at: float
    closed_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    requests: int = 0
    close_reason: str | None = None  # "peer", "abort", "close_before_response",
    # "reset_before_response", "idle_timeout", "close", "error"


# -- the server -------------------------------------------------------------------------------


class _Closed(Exception):
    """End this connection (reason in args[0])."""


class FakeUpstream:
    """``idle_timeout``: close a connection whose next request has not arrived within this long
    (trio time), as servers and load balancers do with idle keep-alive connections (None: never).
    It may be set on a running fake; it applies from the next wait on."""

    def __init__(self, *, tls: ssl.SSLContext | None = None,
                 default: Callable[[RecordedRequest], Reply] = default_reply,
                 idle_timeout: float | None = None) -> None:
        self.tls = tls
        self.default = default
        self.idle_timeout = idle_timeout
        self.port = 0
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.connections: list[ConnInfo] = []
        self.errors: list[BaseException] = []  # unexpected exceptions in connection handlers
        self._queue: list[tuple[str | None, Reply]] = []
        self._changed = trio.Event()

    def enqueue(self, reply: Reply, *, path: str | None = None) -> None:
        """Queue a reply (FIFO); with `path`, only for requests whose path ends with it."""
        self._queue.append((path, reply))

    async def wait_for_requests(self, n: int) -> None:
        while len(self.requests) < n:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _pick(self, req: RecordedRequest) -> Reply:
        for i, (path, reply) in enumerate(self._queue):
            if path is None or req.path.endswith(path):
                del self._queue[i]
                return reply
        return self.default(req)

    async def serve(self, *, host: str = "127.0.0.1", port: int = 0,
                    task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[Any] = list(await trio.open_tcp_listeners(port, host=host))
        self.port = listeners[0].socket.getsockname()[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"{'https' if self.tls else 'http'}://{shown}:{self.port}"
        if self.tls is not None:
            listeners = [trio.SSLListener(ln, self.tls, https_compatible=True) for ln in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection (for a server that accepts connections itself, e.g.
        ``trioproxy fake-upstream``, which also hands WebSocket upgrades elsewhere)."""
        await self._handle(stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        info = ConnInfo(len(self.connections) + 1, trio.current_time())
        self.connections.append(info)
        self._notify()
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                idle = math.inf if self.idle_timeout is None else self.idle_timeout
                with trio.move_on_after(idle) as waiting:
                    req = await self._read_request(stream, conn, info)
                if waiting.cancelled_caught:
                    raise _Closed("idle_timeout")
                reply = req.reply = self._pick(req)
                if reply.reset_before_response:
                    _linger_zero(stream)
                    raise _Closed("reset_before_response")
                if reply.close_before_response:
                    raise _Closed("close_before_response")
                await self._respond(stream, conn, reply, req)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    raise _Closed("close")
                conn.start_next_cycle()
        except _Closed as exc:
            info.close_reason = exc.args[0]
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            info.close_reason = "peer"
        except Exception as exc:  # noqa: BLE001  # never crash the serve loop; see .errors
            info.close_reason = "error"
            self.errors.append(exc)
        finally:
            await trio.aclose_forcefully(stream)
            info.closed_at = trio.current_time()
            info.closed.set()

    async def _next_event(self, stream: trio.abc.Stream, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            conn.receive_data(await stream.receive_some(65536))

    async def _read_request(self, stream: trio.abc.Stream, conn: h11.Connection,
                            info: ConnInfo) -> RecordedRequest:
        event = await self._next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            raise _Closed("peer")
        assert isinstance(event, h11.Request), event
        body = bytearray()
        while not isinstance(part := await self._next_event(stream, conn), h11.EndOfMessage):
            if isinstance(part, h11.ConnectionClosed):
                raise _Closed("peer")
            body += part.data
        raw_path, _, query = bytes(event.target).partition(b"?")
        req = RecordedRequest(
            event.method.decode(), bytes(event.target),
            urllib.parse.unquote(raw_path.decode("latin-1")), query, list(event.headers),
            bytes(body), info.conn_id, trio.current_time())
        info.requests += 1
        self.requests.append(req)
        self._notify()
        return req

    async def _respond(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply,
                       req: RecordedRequest) -> None:
        """Write the reply while watching the socket: a peer that goes away ends it at once."""
        gone, failure = False, None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                try:
                    while data := await stream.receive_some(65536):
                        conn.receive_data(data)  # pipelined bytes: kept for the next cycle
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await self._write(stream, conn, reply, req)
            except Exception as exc:  # noqa: BLE001  # re-raised below, unwrapped
                failure = exc
            nursery.cancel_scope.cancel()
        if gone:
            raise _Closed("peer")
        if failure is not None:
            raise failure

    async def _write(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply,
                     req: RecordedRequest) -> None:
        if reply.before_headers:
            await trio.sleep(reply.before_headers)
        headers = self._response_headers(reply)
        req.reply_request_id = next((v for k, v in headers if k in ("request-id", "x-request-id")),
                                    None)
        try:
            reason = HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b"Overloaded" if reply.status == 529 else b""
        await stream.send_all(conn.send(h11.Response(
            status_code=reply.status, headers=headers, reason=reason)))
        due = req.received_at + reply.before_headers  # reply.scheduled: pauses end on time
        for part in reply.body if req.method != "HEAD" else []:
            if isinstance(part, Pause):
                due += part.seconds
                if reply.scheduled:
                    await trio.sleep_until(due)
                else:
                    await trio.sleep(part.seconds)
            elif isinstance(part, Abort):
                raise _Closed("abort")
            elif part:
                await stream.send_all(conn.send(h11.Data(data=part)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _response_headers(self, reply: Reply) -> list[tuple[str, str]]:
        extra = [(k.lower(), v) for k, v in reply.headers]
        if reply.uses:  # a re-sent Reply object: keep request ids unique per request
            fresh = {"request-id": anthropic_request_id, "x-request-id": openai_request_id}
            extra = [(k, fresh[k]() if k in fresh else v) for k, v in extra]
        reply.uses += 1
        base = [("date", formatdate(time.time(), usegmt=True))]
        if reply.keep_alive:
            base += HOP_BY_HOP
        else:
            base.append(("connection", "close"))
        if reply.chunked:
            base.append(("transfer-encoding", "chunked"))
        else:
            base.append(("content-length", str(len(reply.body_bytes))))
        names = {k for k, _ in extra}
        return [(k, v) for k, v in base if k not in names] + extra


def _linger_zero(stream: trio.abc.Stream) -> None:
    """Make the coming close a TCP reset (RST) instead of an orderly FIN."""
    sock = getattr(stream, "transport_stream", stream).socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _main(host: str, port: int) -> None:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(fake.serve, host=host, port=port))
        print(f"fake LLM upstream listening on {fake.url}", flush=True)
        seen = 0
        while True:
            await fake.wait_for_requests(seen + 1)
            for req in fake.requests[seen:]:
                print(f"conn {req.conn_id}: {req.method} {req.target.decode('latin-1')} "
                      f"({len(req.body)} bytes)", flush=True)
            seen = len(fake.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trioproxy.testing",
        description="Serve a fake Anthropic/OpenAI upstream (default replies) until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    try:
        trio.run(_main, args.host, args.port)
    except KeyboardInterrupt:
        pass

