"""One upstream HTTP/1.1 connection (h11 over a trio stream) and the response read from it.

``build_request`` validates the request before any connection is used: header values that
HTTP/1.1 forbids (an HTTP/2 client can send them) are the client's error, reported by header
name only -- the value may be a credential.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Self

import h11
import trio

from ..errors import ClientRequestError, UpstreamProtocolError, UpstreamTimeout
from .body import BodyDecoder

READ_SIZE = 65536
Headers = list[tuple[bytes, bytes]]
Origin = tuple[str, str, int]


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (honours SSL_CERT_FILE / SSL_CERT_DIR), HTTP/1.1 via ALPN."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


_conn_ids = count(1)


def _new_h11() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=256 * 1024)


@dataclass(eq=False)
class Connection:
    stream: trio.abc.Stream
    origin: Origin
    h11: h11.Connection = field(default_factory=_new_h11)
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    requests: int = 0
    idle_since: float = 0.0
    body_read: bool = False  # the last response's body ended cleanly, read by a BodyDecoder

    def reusable(self) -> bool:
        """Both sides finished their messages and keep-alive holds."""
        h = self.h11
        return h.our_state is h11.DONE and (self.body_read or h.their_state is h11.DONE)

    def next_cycle(self) -> None:
        """Ready for the next request (only when ``reusable()``)."""
        if self.body_read:  # h11 never saw that body: start it afresh
            self.h11, self.body_read = _new_h11(), False
        else:
            self.h11.start_next_cycle()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def body_decoder(event: h11.Response, method: bytes) -> BodyDecoder | None:
    """A decoder for this response's body when it is chunked or has a Content-Length and the
    connection may be kept; None leaves the body to h11 (no body, read until close, 1.0)."""
    if method == b"HEAD" or event.status_code in (204, 304) or event.http_version != b"1.1":
        return None
    length: bytes | None = None
    for name, value in event.headers:
        if name == b"transfer-encoding":
            return BodyDecoder(length=None) if value.lower() == b"chunked" else None
        if name == b"content-length":
            length = value
        elif name == b"connection" and b"close" in value.lower():
            return None
    return None if length is None else BodyDecoder(length=int(length))


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read chunk by chunk."""

    def __init__(self, conn: Connection, event: h11.Response, read_timeout: float,
                 method: bytes = b"GET") -> None:
        self._conn = conn
        self.status: int = event.status_code
        self.reason: bytes = event.reason
        self.headers: Headers = list(event.headers)
        self.trailers: Headers = []
        self.complete = False
        self.sent_at: float | None = None  # trio time the request was written (head and body)
        self._read_timeout = read_timeout
        self._release: Callable[[Connection], Awaitable[None]] | None = None
        self._body = body_decoder(event, method)
        # body bytes that came with the head: decoded by the first read (a broken body is an
        # error of the body, not of the head)
        self._head_rest = conn.h11.trailing_data[0] if self._body is not None else b""

    async def aclose(self) -> None:
        """Give the connection back (body complete and reusable) or close it. Idempotent."""
        release, self._release = self._release, None
        if release is None:
            return
        if not self.complete:
            await self._conn.aclose()  # shielded
        await release(self._conn)  # keeps the connection (no await) or closes it, shielded

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def conn_id(self) -> int:
        return self._conn.conn_id

    async def receive_chunk(self, deadline: float | None = None) -> bytes | None:
        """Next body bytes, or None once the body is complete.

        ``deadline`` (trio time) bounds the wait; by default one read timeout from now;
        ``math.inf`` leaves it to the caller's cancel scope (the relay's hot path).
        Raises UpstreamTimeout('read') or UpstreamProtocolError on a cut connection.
        """
        if self.complete:
            return None
        if deadline is None:
            deadline = trio.current_time() + self._read_timeout
        body = self._body
        if body is None:
            return await self._receive_h11(deadline)
        if self._head_rest:
            body.feed(self._head_rest)
            self._head_rest = b""
        while True:
            data = self._take(body)
            if data or self.complete:
                return data or None
            received = await read_some(self._conn, deadline, self._read_timeout)
            if not received:
                raise UpstreamProtocolError(
                    "upstream broke the response body: peer closed connection without sending "
                    "complete message body")
            body.feed(received)

    def receive_buffered(self) -> bytes | None:
        """The next body bytes already received (no I/O), or None when more must be read --
        or when the body is complete (then ``complete`` is set). Lets a reader take at once
        everything that arrived while it was busy."""
        if self.complete:
            return None
        body = self._body
        if body is not None:
            if self._head_rest:
                body.feed(self._head_rest)
                self._head_rest = b""
            return self._take(body) or None
        try:
            event = self._conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamProtocolError(f"upstream broke the response body: {exc}") from exc
        if type(event) is h11.Data:
            return event.data
        if type(event) is h11.EndOfMessage:
            self.trailers = list(event.headers)
            self.complete = True
        elif event is not h11.NEED_DATA:
            raise UpstreamProtocolError(f"unexpected upstream event {type(event).__name__}")
        return None

    def _take(self, body: BodyDecoder) -> bytes:
        """The decoded bytes; ``complete`` once the body ended. Raises UpstreamProtocolError
        when the framing broke and nothing decoded before the break is left."""
        data = body.take()
        if body.done:
            self.trailers = body.trailers
            self.complete = True
            self._conn.body_read = not body.extra
        elif not data and body.error is not None:
            raise UpstreamProtocolError(f"upstream broke the response body: {body.error}")
        return data

    async def _receive_h11(self, deadline: float) -> bytes | None:
        conn = self._conn.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"upstream broke the response body: {exc}") from exc
            if event is h11.NEED_DATA:
                conn.receive_data(await read_some(self._conn, deadline, self._read_timeout))
                continue
            if type(event) is h11.Data:
                return event.data
            if type(event) is h11.EndOfMessage:
                self.trailers = list(event.headers)
                self.complete = True
                return None
            raise UpstreamProtocolError(f"unexpected upstream event {type(event).__name__}")


async def read_some(conn: Connection, deadline: float, timeout: float) -> bytes:
    """One read. ``deadline=math.inf``: the caller bounds the wait with its own cancel scope."""
    try:
        if deadline == math.inf:
            return await conn.stream.receive_some(READ_SIZE)
        with trio.fail_at(deadline):
            return await conn.stream.receive_some(READ_SIZE)
    except trio.TooSlowError:
        raise UpstreamTimeout("read", timeout) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise UpstreamProtocolError(f"upstream connection lost: {exc!r}") from exc


def build_request(method: bytes, target: bytes, headers: Headers) -> h11.Request:
    """The h11 request event, validated before any connection is used.

    HTTP/2 clients can send header values HTTP/1.1 forbids; that is the client's error (400),
    reported by header name only: the value may be a credential and is never echoed or logged.
    """
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError:
        bad = [n.decode("latin-1") for n, v in headers if not _valid_field(n, v)]
        what = f"header {bad[0]!r}" if bad else "request target"
        raise ClientRequestError(
            f"the {what} contains characters an HTTP/1.1 upstream does not accept", 400,
            "invalid_request",
        ) from None


def _valid_field(name: bytes, value: bytes) -> bool:
    probe = [(name, value)] if name.lower() == b"host" else [(b"host", b"x"), (name, value)]
    try:
        h11.Request(method=b"GET", target=b"/", headers=probe)
    except h11.LocalProtocolError:
        return False
    return True
