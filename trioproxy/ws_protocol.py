"""The Responses WebSocket relay's protocol side: no I/O, no trio.

- **Frames.** ``classify`` finds an event's ``type`` by a prefix match on the text (OpenAI's and
  Codex's serialisation put it first) and decodes only when that fails; ``size_of`` counts
  bytes on the wire.
- **Close codes.** Codes an endpoint may not send (RFC 6455 7.4) become 1000 towards the
  upstream (Hypercorn reports every client close as 1006, hypercorn#127) and 1011 towards the
  client when the upstream vanished without a close frame.
- **Handshake headers.** End-to-end headers pass both ways; hop-by-hop ones, ``host``,
  ``sec-websocket-*`` and ``x-trioproxy-*`` do not.
- **Accounting.** ``ResponseLedger`` keeps the usage records of one socket: each
  ``response.create`` opens one (an ``Exchange`` with id ``<socket id>.<n>`` and status 200),
  closed by ``response.completed`` / ``failed`` / ``incomplete`` or an ``error`` event, or cut.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from . import headers as hdr
from .exchange import Exchange
from .providers import make_parser
from .providers.base import loads_object
from .providers.openai_responses import TERMINAL
from .routing import Route

log = logging.getLogger("trioproxy.websocket")  # one logger for the relay and its bookkeeping

RESPONSES_PATH = b"/v1/responses"
ROUTE = Route("openai", "openai.responses", RESPONSES_PATH)
RECORD_STATUS = 200  # a record is one response: the status an HTTP client would have seen
DECODED = TERMINAL | {"response.created", "error"}  # upstream events worth a json.loads
_TYPE_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]{1,128})"')
Headers = list[tuple[bytes, bytes]]
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
    """The JSON object in a text frame, or None (the parsers' own helper)."""
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


def client_handshake_headers(upstream_headers: Headers, request_id: str) -> Headers:
    """Every end-to-end upstream handshake header (``x-codex-*``, ``x-request-id``,
    ``openai-*``, ``*ratelimit*``, ...) plus ``x-trioproxy-request-id``."""
    out = [(k, v) for k, v in hdr.client_response_headers(upstream_headers)
           if k != b"content-length" and not k.startswith(b"sec-websocket-")]
    out.append((b"x-trioproxy-request-id", request_id.encode()))
    return out


# -- accounting ---------------------------------------------------------------------------------


@dataclass(eq=False)
class CreateContext:
    """One ``response.create`` frame on its way upstream."""

    exchange: Exchange
    session_id: str
    handshake_headers: Headers
    payload: dict[str, Any] | None = None  # set once decoded (saves the ledger a decode)


@dataclass(eq=False)
class Record:
    ex: Exchange
    noted: bool = False  # the create frame has been read into the record
    ended: bool = False  # a terminal or error event, or a cut, ended the response
    warmup: bool = False  # generate: false


@dataclass(eq=False)
class ResponseLedger:
    """The usage records of one socket. Bookkeeping only: no I/O, never raises on bad input."""

    socket_id: str
    session_id: str
    path: str
    headers: Headers
    bypass: bool
    upstream_request_id: str | None = None
    count: int = 0
    current: Record | None = None
    unfinished: list[Record] = field(default_factory=list)

    def exchange(self, request_id: str) -> Exchange:
        ex = Exchange(request_id=request_id, method="GET", path=self.path, provider="openai",
                      route=ROUTE, transport="websocket", request_headers=self.headers,
                      bypass=self.bypass, upstream_request_id=self.upstream_request_id)
        ex.extra.update(session_id=self.session_id, socket_id=self.socket_id)
        return ex

    def start(self, size: int) -> tuple[Record, Record | None]:
        """A ``response.create`` arrived: open its record; also return the one it supersedes."""
        previous = self.cut("superseded", "a new response.create arrived before this one ended")
        self.count += 1
        ex = self.exchange(f"{self.socket_id}.{self.count}")
        ex.status, ex.streamed, ex.bytes_in = RECORD_STATUS, True, size
        ex.parser = _new_parser()
        ex.extra["response_index"] = self.count
        self.current = Record(ex)
        self.unfinished.append(self.current)
        return self.current, previous

    def note_create(self, rec: Record, payload: dict[str, Any] | None) -> None:
        rec.noted = True
        ex = rec.ex
        if payload is None:
            return
        model, previous = payload.get("model"), payload.get("previous_response_id")
        ex.model_requested = model if isinstance(model, str) else None
        if isinstance(previous, str):
            ex.extra["previous_response_id"] = previous
        if payload.get("generate") is False:
            rec.warmup, ex.extra["generate"] = True, False

    def reject(self, rec: Record, payload: dict[str, Any] | None, error: str) -> None:
        """The create frame was refused before it went upstream (an extension failed)."""
        self.note_create(rec, payload)
        if self.current is rec:
            self.current = None
        rec.ended = True
        rec.ex.status = 500
        rec.ex.fail("extension_error", error)

    def on_client_frame(self, size: int) -> None:
        if self.current is not None:
            self.current.ex.bytes_in += size

    def on_upstream_frame(self, size: int, now: float, kind: str | None) -> Record | None:
        """Counts an upstream frame against the open record, before it is forwarded."""
        rec = self.current
        if rec is None:
            return None
        rec.ex.observe_chunk(size, now)
        rec.ex.response_started = True
        if kind in TERMINAL or kind == "error":
            rec.ended, self.current = True, None
        return rec

    def feed(self, rec: Record | None, kind: str, obj: dict[str, Any] | None) -> None:
        """Reads a decoded event into its record, after the frame was forwarded."""
        if obj is None or rec is None:
            if obj is not None and kind == "error":
                log.warning("upstream error event outside a response: %s", _error_text(obj))
            return
        ex = rec.ex
        if ex.parser is not None:
            ex.parser.feed_event(obj)
        response = obj.get("response")
        response = response if isinstance(response, dict) else {}
        if isinstance(response.get("id"), str):
            ex.extra["response_id"] = response["id"]
        if kind in TERMINAL:
            ex.upstream_complete = True
            ex.end_reason = ex.end_reason or "complete"
            if kind == "response.failed":
                ex.error = _error_text(response)
        elif kind == "error":
            ex.fail("upstream_error", _error_text(obj))

    def cut(self, reason: str, error: str) -> Record | None:
        """Ends the open response without a terminal event (a warm-up counts as complete)."""
        rec, self.current = self.current, None
        if rec is None:
            return None
        rec.ended = True
        if rec.warmup:
            rec.ex.end_reason = rec.ex.end_reason or "complete"
        else:  # no terminal event: the usage record's stop reason becomes "incomplete"
            rec.ex.fail(reason, error)
        return rec

    def discharge(self, rec: Record) -> None:
        """``rec`` is being finalised: it is no longer unfinished."""
        if rec in self.unfinished:
            self.unfinished.remove(rec)


def _error_text(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or err)
    return str(err or obj.get("message") or "error")


def _new_parser() -> Any:
    """The streaming usage parser of one Responses record."""
    return make_parser("openai.responses", streaming=True)
