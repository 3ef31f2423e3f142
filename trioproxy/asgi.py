"""The ASGI types, and the messages the proxy makes itself: its answers and its own headers.

Errors are translated once, here: a :class:`~trioproxy.errors.ProxyError` becomes a complete
JSON response in the caller's provider format, and the exchange's lifecycle learns the failure
and the status the client was given.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ProxyError, error_body
from .exchange import Exchange
from .protocol.lifecycle import End

Scope = dict[str, Any]  # the ASGI types, named once
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

RETRY_AFTER = b"5"  # seconds a client refused while draining waits (another instance takes it)


def proxy_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """Headers the proxy adds to every response it sends."""
    out = [(b"x-trioproxy-request-id", ex.request_id.encode())]
    if ex.correlation_id:
        out.append((b"x-trioproxy-correlation-id", ex.correlation_id.encode()))
    if ex.close_connection:
        out.append((b"connection", b"close"))
    return out


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
    ex.fail(End(exc.kind), exc.detail)
    return json_messages(ex, exc.status, error_body(ex.provider, exc.status, exc.message, exc.code))


async def send_all(send: Send, ex: Exchange, messages: list[Message]) -> None:
    """Send a complete response and note that it was delivered."""
    for message in messages:
        await send(message)
    ex.life.delivered()
