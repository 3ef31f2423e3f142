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
  ``response.create`` opens one (an ``Exchange`` with its own proxy id, the socket's id and
  its index on the socket), matched to its response in order and then by response id, and
  closed by ``response.completed`` / ``failed`` / ``incomplete`` or an ``error`` event, or cut.
  Each record measures its latency like an HTTP exchange: received = the create frame's
  arrival, request sent = the frame forwarded, head = ``response.created``, content events =
  the ``response.*.delta`` frames (timed by their arrival, never decoded for it), end = the
  terminal event, relay delay = arrival to hand-over to the client's ``send``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..exchange import Exchange
from ..providers import make_parser
from ..providers.base import loads_object
from ..providers.openai_responses import TERMINAL
from . import headers as hdr
from .latency import LatencyTracker
from .lifecycle import End
from .routing import Route

log = logging.getLogger("trioproxy.websocket")  # one logger for the relay and its bookkeeping

RESPONSES_PATH = b"/v1/responses"
ROUTE = Route("openai", "openai.responses", RESPONSES_PATH)
RECORD_STATUS = 200  # a record is one response: the status an HTTP client would have seen
DECODED = TERMINAL | {"response.created", "error"}  # upstream events worth a json.loads
_TYPE_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]{1,128})"')
Headers = hdr.Headers
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


@dataclass(eq=False)
class ResponseLedger:
    """The usage records of one socket. Bookkeeping only: no I/O, never raises on bad input.

    Responses are matched to their ``response.create`` frames strictly in order: the n-th
    ``response.created`` event belongs to the n-th create still waiting for one. From then on
    the response's events are attributed by its id (``response.completed`` / ``failed`` /
    ``incomplete`` carry it); events without an id (deltas) go to the response that was
    created last. An ``error`` event answers the oldest create still waiting (a create the
    upstream refused), else the response created last."""

    socket_id: str
    session_id: str
    path: str
    headers: Headers
    bypass: bool
    correlation_id: str | None = None
    upstream_request_id: str | None = None
    count: int = 0
    waiting: deque[Record] = field(default_factory=deque)  # creates without response.created
    by_id: dict[str, Record] = field(default_factory=dict)  # created, not ended
    latest: Record | None = None  # the response created last, while it runs
    unfinished: list[Record] = field(default_factory=list)

    def exchange(self, request_id: str) -> Exchange:
        return Exchange(request_id=request_id, method="GET", path=self.path, provider="openai", route=ROUTE,
                        transport="websocket", request_headers=self.headers,
                        correlation_id=self.correlation_id, bypass=self.bypass,
                        upstream_request_id=self.upstream_request_id,
                        session_id=self.session_id, socket_id=self.socket_id)

    def start(self, size: int) -> Record:
        """A ``response.create`` arrived from the client: open its record."""
        self.count += 1
        ex = self.exchange(f"{self.socket_id}.{self.count}")
        ex.streamed, ex.bytes_in, ex.response_index = True, size, self.count
        ex.parser = _new_parser(ex.track_latency())
        rec = Record(ex)
        self.unfinished.append(rec)
        return rec

    def forwarded(self, rec: Record) -> None:
        """The create frame went upstream: its response may come."""
        rec.ex.life.sent_upstream()
        self.waiting.append(rec)

    def written(self, rec: Record, now: float) -> None:
        """The create frame was written to the upstream at ``now``."""
        if rec.ex.tracker is not None:
            rec.ex.tracker.request_sent(now)

    def note_create(self, rec: Record, payload: dict[str, Any] | None) -> None:
        rec.noted = True
        ex = rec.ex
        if payload is None:
            return
        model, previous = payload.get("model"), payload.get("previous_response_id")
        ex.model_requested = model if isinstance(model, str) else None
        if isinstance(previous, str):
            ex.previous_response_id = previous
        if payload.get("generate") is False:
            ex.generate = False

    def reject(self, rec: Record, payload: dict[str, Any] | None, error: str) -> None:
        """The create frame was refused before it went upstream (an extension failed)."""
        self.note_create(rec, payload)
        rec.ended = True
        rec.ex.status = 500
        rec.ex.fail(End.EXTENSION_ERROR, error)

    def on_client_frame(self, size: int) -> None:
        target = self.latest or (self.waiting[-1] if self.waiting else None)
        if target is not None:
            target.ex.bytes_in += size

    def on_upstream_frame(self, message: Message, now: float, kind: str | None,
                          obj: dict[str, Any] | None, handed: float | None = None
                          ) -> Record | None:
        """Attributes one upstream frame that arrived at ``now`` (``obj`` decoded for
        ``DECODED`` kinds) and was handed to the client at ``handed`` (None: not relayed);
        returns the record it ended, if it ended one."""
        if kind == "response.created":
            rec = self._created(obj, now)
        elif kind in TERMINAL:
            rec = self._by_response_id(obj)
        elif kind == "error":
            rec = self.waiting.popleft() if self.waiting else self.latest
            if rec is None and obj is not None:
                log.warning("upstream error event outside a response: %s", _error_text(obj))
        else:
            rec = self.latest
        if rec is None or rec.ended:
            return None
        ex = rec.ex
        ex.observe_chunk(size_of(message), now)
        if handed is not None and ex.tracker is not None:
            ex.tracker.on_relay(now, handed)
        if obj is not None:
            self._feed(rec, kind, obj, now)
        elif kind is not None and isinstance(message, str) and ex.parser is not None:
            ex.parser.feed_message(message, now, kind)  # times a delta without decoding it
        return rec if rec.ended else None

    def _created(self, obj: dict[str, Any] | None, now: float) -> Record | None:
        if not self.waiting:
            return None
        rec = self.waiting.popleft()
        rec.ex.status = RECORD_STATUS
        if rec.ex.tracker is not None:
            rec.ex.tracker.response_head(now)
        rec.ex.life.head()
        rec.ex.life.answered(RECORD_STATUS)
        rid = _response_id(obj)
        if rid is not None:
            rec.ex.response_id = rid
            self.by_id[rid] = rec
        self.latest = rec
        return rec

    def _by_response_id(self, obj: dict[str, Any] | None) -> Record | None:
        rid = _response_id(obj)
        rec = self.by_id.pop(rid, None) if rid is not None else None
        if rec is None:  # no id, or no response.created seen: the order decides
            rec = self.latest if self.latest is not None else (
                self.waiting.popleft() if self.waiting else None)
            if rec is not None and rec.ex.response_id is not None:
                self.by_id.pop(rec.ex.response_id, None)
        return rec

    def _feed(self, rec: Record, kind: str | None, obj: dict[str, Any], now: float) -> None:
        """Reads a decoded event that arrived at ``now`` into its record."""
        ex = rec.ex
        if ex.parser is not None:
            ex.parser.feed_event(obj, now)
        if kind in TERMINAL:
            if ex.life.answered_status is None:  # a terminal event without response.created
                ex.status = RECORD_STATUS
                ex.life.head()
                ex.life.answered(RECORD_STATUS)
            ex.body_ended(now)  # response.failed too: the upstream's answer, relayed whole
            ex.life.delivered()
            self._end(rec)
        elif kind == "error":
            ex.status = ex.status or RECORD_STATUS
            ex.fail(End.UPSTREAM_ERROR, _error_text(obj))
            self._end(rec)

    def _end(self, rec: Record) -> None:
        rec.ended = True
        if self.latest is rec:
            self.latest = None
        if rec in self.waiting:
            self.waiting.remove(rec)
        if rec.ex.response_id is not None:
            self.by_id.pop(rec.ex.response_id, None)

    def cut(self, reason: End, error: str) -> None:
        """Ends every open response without a terminal event (records become incomplete)."""
        for rec in self.unfinished:
            if not rec.ended:
                rec.ex.fail(reason, error)
                self._end(rec)

    def discharge(self, rec: Record) -> None:
        """``rec`` is being finalised: it is no longer unfinished."""
        if rec in self.unfinished:
            self.unfinished.remove(rec)


def _response(obj: dict[str, Any] | None) -> dict[str, Any]:
    response = obj.get("response") if obj is not None else None
    return response if isinstance(response, dict) else {}


def _response_id(obj: dict[str, Any] | None) -> str | None:
    rid = _response(obj).get("id")
    return rid if isinstance(rid, str) else None


def _error_text(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or err)
    return str(err or obj.get("message") or "error")


def _new_parser(latency: LatencyTracker) -> Any:
    """The streaming usage parser of one Responses record, timing its content events."""
    return make_parser("openai.responses", streaming=True, latency=latency)
