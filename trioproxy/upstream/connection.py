"""One upstream HTTP/1.1 connection (a trio stream) and the response read from it; heads are
written and parsed by ``http11``, bodies decoded by ``body``.

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

import trio

from ..errors import ClientRequestError, UpstreamProtocolError, UpstreamTimeout
from ..protocol.headers import Headers
from .body import BodyDecoder
from .http11 import InvalidField, ResponseHead, request_head

READ_SIZE = 65536
Origin = tuple[str, str, int]


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (honours SSL_CERT_FILE / SSL_CERT_DIR), HTTP/1.1 via ALPN."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


_conn_ids = count(1)


@dataclass(eq=False)
class Connection:
    stream: trio.abc.Stream
    origin: Origin
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    requests: int = 0
    idle_since: float = 0.0
    keep: bool = False  # the last response ended exactly where its framing said, keep-alive

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def body_decoder(head: ResponseHead, method: bytes) -> BodyDecoder:
    """How this response's body is framed (RFC 9112 section 6.3, as h11 reads it)."""
    if method == b"HEAD" or head.status in (204, 304):
        return BodyDecoder(length=0)
    if head.chunked:
        return BodyDecoder(length="chunked")
    if head.length is not None:
        return BodyDecoder(length=head.length)
    return BodyDecoder(length="close")


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read chunk by chunk."""

    def __init__(self, conn: Connection, head: ResponseHead, rest: bytes, read_timeout: float,
                 method: bytes = b"GET") -> None:
        """``rest``: the bytes read after the head (the body's first bytes, perhaps)."""
        self._conn = conn
        self.status: int = head.status
        self.reason: bytes = head.reason
        self.headers: Headers = head.headers
        self.trailers: Headers = []
        self.complete = False
        self.sent_at: float | None = None  # trio time the request was written (head and body)
        self._read_timeout = read_timeout
        self._release: Callable[[Connection], Awaitable[None]] | None = None
        self._body = body_decoder(head, method)
        self._close = head.close or self._body.until_close
        conn.keep = False
        if rest:
            self._body.feed(rest)

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
        while True:
            data = self._take(body)
            if data or self.complete:
                return data or None
            received = await read_some(self._conn, deadline, self._read_timeout)
            if received:
                body.feed(received)
            else:
                body.eof()

    def receive_buffered(self) -> bytes | None:
        """The next body bytes already received (no I/O), or None when more must be read --
        or when the body is complete (then ``complete`` is set). Lets a reader take at once
        everything that arrived while it was busy."""
        if self.complete:
            return None
        return self._take(self._body) or None

    def _take(self, body: BodyDecoder) -> bytes:
        """The decoded bytes; ``complete`` once the body ended. Raises UpstreamProtocolError
        when the framing broke and nothing decoded before the break is left."""
        data = body.take()
        if body.done:
            self.trailers = body.trailers
            self.complete = True
            self._conn.keep = not (body.extra or self._close)
        elif not data and body.error is not None:
            raise UpstreamProtocolError(f"upstream broke the response body: {body.error}")
        return data


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


def build_request(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request head, validated before any connection is used.

    HTTP/2 clients can send header values HTTP/1.1 forbids; that is the client's error (400),
    reported by header name only: the value may be a credential and is never echoed or logged.
    """
    try:
        return request_head(method, target, headers)
    except InvalidField as exc:
        what = f"header {exc.args[0]!r}" if exc.args else "request target"
        raise ClientRequestError(
            f"the {what} contains characters an HTTP/1.1 upstream does not accept", 400,
            "invalid_request",
        ) from None
