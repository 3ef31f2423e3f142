"""The Responses WebSocket relay's protocol side: no I/O, no trio.

- **Frames.** ``classify`` finds an event's ``type`` by a prefix match on the text (OpenAI's and
  Codex's serialisation put it first) and decodes only when that fails; ``size_of`` counts
  bytes on the wire.
- **Close codes.** Codes an endpoint may not send (RFC 6455 7.4) become 1000 towards the
  upstream (Hypercorn reports every client close as 1006, hypercorn#127) and 1011 towards the
  client when the upstream vanished without a close frame.
- **Handshake headers.** End-to-end headers pass both ways; hop-by-hop ones, ``host``,
  ``sec-websocket-*`` and ``x-trioproxy-*`` do not.

The responses in flight on a socket, and their usage records, are kept by
:mod:`trioproxy.relay.ws_responses`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import headers as hdr
from .decoding import loads_object
from .headers import Headers
from .routing import Route

RESPONSES_PATH = b"/v1/responses"
ROUTE = Route("openai", "openai.responses", RESPONSES_PATH)
_TYPE_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]{1,128})"')
Message = str | bytes


def is_responses_route(route: Route | None) -> bool:
    """True for the routes relayed as a WebSocket: OpenAI's ``/v1/responses``."""
    return route is not None and route.provider == "openai" and (
        route.path.rstrip(b"/") == RESPONSES_PATH
    )


# -- frames -------------------------------------------------------------------------------------


def classify(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """(type, decoded object if decoding was needed to find the type). A frame starting
    ``{"type": "..."`` (OpenAI's and Codex's serialisation) is classified without decoding."""
    match = _TYPE_HEAD.match(text)
    if match:
        return match.group(1), None
    obj = decode(text)
    kind = obj.get("type") if obj is not None else None
    return (kind if isinstance(kind, str) else None), obj


def decode(text: str) -> dict[str, Any] | None:
    """The JSON object in a text frame, or None."""
    return loads_object(text)


def size_of(message: Message) -> int:
    """Bytes on the wire (``str.isascii`` is O(1) in CPython: no copy for ASCII JSON)."""
    if isinstance(message, str):
        return len(message) if message.isascii() else len(message.encode("utf-8", "surrogatepass"))
    return len(message)


def extension_error_event(exc: Exception) -> str:
    """The ``error`` event a client gets for a ``response.create`` an extension rejected."""
    event = {"type": "error", "status": 500,
             "error": {"type": "server_error", "code": "extension_error",
                       "message": f"request rejected: {exc}"}}
    return json.dumps(event)


# -- close codes --------------------------------------------------------------------------------


def sendable_close_code(code: int | None, fallback: int) -> int:
    """``code`` if an endpoint may send it (RFC 6455 7.4: not 1004-1006, 1015), else ``fallback``."""
    if code is not None and (code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014
                             or 3000 <= code <= 4999):
        return code
    return fallback


def close_code_for_upstream(client_code: int | None) -> int:
    """The client's close code as sent upstream: 1000 if it may not be sent."""
    return sendable_close_code(client_code, 1000)


def close_code_for_client(upstream_code: int) -> int:
    """The upstream's close code as sent to the client: 1011 if the upstream vanished without a
    close frame (1006, 1015), 1000 for any other code that may not be sent."""
    return sendable_close_code(upstream_code, 1011 if upstream_code in (1006, 1015) else 1000)


# -- handshake headers --------------------------------------------------------------------------


def upstream_handshake_headers(headers: Headers, bypass_names: tuple[bytes, ...]) -> Headers:
    """Every end-to-end client header (``authorization``, ``openai-beta``, ``session-id``,
    ``x-codex-*``, ...); not hop-by-hop ones, ``host``, ``sec-websocket-*`` (trio-websocket
    writes its own) or ``x-trioproxy-*``."""
    out = hdr.upstream_request_headers(headers, b"", None, drop=bypass_names)
    return [(k, v) for k, v in out if k != b"host" and not k.startswith(b"sec-websocket-")]


def client_handshake_headers(upstream_headers: Headers, request_id: str,
                             correlation: str | None = None) -> Headers:
    """Every end-to-end upstream handshake header (``x-codex-*``, ``x-request-id``,
    ``openai-*``, ``*ratelimit*``, ...) plus ``x-trioproxy-request-id`` (and
    ``x-trioproxy-correlation-id`` when the client sent an id of its own)."""
    out = [(k, v) for k, v in hdr.client_response_headers(upstream_headers)
           if k != b"content-length" and not k.startswith(b"sec-websocket-")]
    out.append((b"x-trioproxy-request-id", request_id.encode()))
    if correlation:
        out.append((b"x-trioproxy-correlation-id", correlation.encode()))
    return out
