"""ASGI messages the proxy makes itself: its JSON answers, its own headers, the request body.

Errors are translated once, here: a :class:`~trioproxy.errors.ProxyError` becomes a complete
JSON response in the caller's provider format, and the exchange's lifecycle learns the failure
and the status the client was given.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import ClientRequestError, ProxyError, error_body
from ..exchange import Exchange
from ..protocol import headers as hdr
from ..protocol.lifecycle import End

Scope = dict[str, Any]  # the ASGI types, named once
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


def proxy_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """Headers the proxy adds to every response it sends."""
    out = [(b"x-trioproxy-request-id", ex.request_id.encode())]
    if ex.correlation_id:
        out.append((b"x-trioproxy-correlation-id", ex.correlation_id.encode()))
    if ex.close_connection:
        out.append((b"connection", b"close"))
    return out


PREFIX = b"/_trioproxy/"  # the proxy's own pages: never an upstream path
RETRY_AFTER = b"5"  # seconds a client refused while draining waits (another instance takes it)


def answer(ex: Exchange, status: int, body: bytes, content_type: bytes,
           extra: list[tuple[bytes, bytes]] | None = None) -> list[Message]:
    """A complete response the proxy makes itself (not JSON-error shaped)."""
    ex.status = status
    ex.life.answered(status)
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or []), *proxy_headers(ex)]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


def json_answer(ex: Exchange, status: int, obj: Any) -> list[Message]:
    return answer(ex, status, json.dumps(obj).encode(), b"application/json")


def json_messages(ex: Exchange, status: int, body: bytes) -> list[Message]:
    """A complete JSON response made by the proxy itself (start and body)."""
    ex.status = status
    ex.life.answered(status)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *proxy_headers(ex),
    ]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


def error_messages(ex: Exchange, exc: ProxyError) -> list[Message]:
    """The error as a JSON response in the caller's provider format; the failure is noted."""
    ex.fail(End(exc.kind), exc.message)
    return json_messages(ex, exc.status, error_body(ex.provider, exc.status, exc.message, exc.code))


async def send_all(send: Send, ex: Exchange, messages: list[Message]) -> None:
    """Send a complete response and note that it was delivered."""
    for message in messages:
        await send(message)
    ex.life.delivered()


async def read_body(receive: Receive, ex: Exchange, limit: int) -> bytes | None:
    """The whole request body, or None if the client left first. Raises 413 over ``limit``."""
    declared = hdr.get(ex.request_headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientRequestError(f"request body exceeds the {limit} byte limit", 413, "request_too_large")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ClientRequestError(f"request body exceeds the {limit} byte limit", 413, "request_too_large")
            parts.append(chunk)
        if not message.get("more_body", False):
            ex.bytes_in = size
            ex.close_connection = conflicting_framing(ex.request_headers)
            return b"".join(parts)


DRAIN_LIMIT = 64 * 1024  # request bytes read and discarded to keep a connection reusable
DRAIN_TIMEOUT = 5.0


async def drain_body(receive: Receive, ex: Exchange) -> None:
    """Read and discard the body of a request the proxy answers without using it (404, 400),
    so the connection can serve the next request. A body over ``DRAIN_LIMIT``, or one that does
    not arrive within ``DRAIN_TIMEOUT``, closes the connection instead (``Connection: close``)."""
    if not ex.close_connection:
        return
    size = 0
    with trio.move_on_after(DRAIN_TIMEOUT):
        while size <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                ex.close_connection = conflicting_framing(ex.request_headers)
                return


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request announces a body (which the proxy has not read yet)."""
    length = hdr.get(headers, b"content-length")
    return hdr.get(headers, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in (b"", b"0"))


def conflicting_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both ``Content-Length`` and ``Transfer-Encoding``: RFC 9112 6.1 says the server must close
    the connection after responding (the shape of request smuggling behind a front proxy)."""
    names = {k for k, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names
