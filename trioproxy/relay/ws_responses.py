"""The responses in flight on one Responses WebSocket, and their usage records. Bookkeeping
only: no I/O, never raises on bad input.

Each ``response.create`` opens an :class:`InflightResponse` (an ``Exchange`` with its own proxy
id, the socket's id and its index on the socket), matched to its response in order and then by
response id, and ended by ``response.completed`` / ``failed`` / ``incomplete`` or an ``error``
event, or cut. Each measures its latency like an HTTP exchange: received = the create frame's
arrival, request sent = the frame forwarded, head = ``response.created``, content events = the
``response.*.delta`` frames (timed by their arrival, never decoded for it), end = the terminal
event, relay delay = arrival to hand-over to the client's ``send``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..exchange import Exchange
from ..protocol.headers import Headers
from ..protocol.latency import LatencyTracker
from ..protocol.lifecycle import End
from ..protocol.websocket import ROUTE, Message, size_of
from ..providers import make_parser
from ..providers.openai_responses import TERMINAL

log = logging.getLogger("trioproxy.websocket")  # one logger for the relay and its bookkeeping

RESPONSE_STATUS = 200  # a record is one response: the status an HTTP client would have seen
DECODED = TERMINAL | {"response.created", "error"}  # upstream events worth a json.loads


@dataclass(eq=False)
class CreateContext:
    """One ``response.create`` frame on its way upstream."""

    exchange: Exchange
    session_id: str
    handshake_headers: Headers
    payload: dict[str, Any] | None = None  # set once decoded (saves the book a decode)


@dataclass(eq=False)
class InflightResponse:
    """One response on the socket, from its ``response.create`` until it is finalised."""

    ex: Exchange
    noted: bool = False  # the create frame has been read into the exchange
    ended: bool = False  # a terminal or error event, or a cut, ended the response


@dataclass(eq=False)
class ResponseBook:
    """The responses in flight on one socket. Bookkeeping only: no I/O, never raises on bad
    input.

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
    # creates without a response.created yet
    waiting: deque[InflightResponse] = field(default_factory=deque)
    by_id: dict[str, InflightResponse] = field(default_factory=dict)  # created, not ended
    latest: InflightResponse | None = None  # the response created last, while it runs
    inflight: list[InflightResponse] = field(default_factory=list)

    def exchange(self, request_id: str) -> Exchange:
        return Exchange(request_id=request_id, method="GET", path=self.path, provider="openai",
                        route=ROUTE, transport="websocket", request_headers=self.headers,
                        correlation_id=self.correlation_id, bypass=self.bypass,
                        upstream_request_id=self.upstream_request_id,
                        session_id=self.session_id, socket_id=self.socket_id)

    def start(self, size: int) -> InflightResponse:
        """A ``response.create`` arrived from the client: its response is in flight."""
        self.count += 1
        ex = self.exchange(f"{self.socket_id}.{self.count}")
        ex.streamed, ex.bytes_in, ex.response_index = True, size, self.count
        ex.parser = _new_parser(ex.track_latency())
        response = InflightResponse(ex)
        self.inflight.append(response)
        return response

    def forwarded(self, response: InflightResponse) -> None:
        """The create frame went upstream: its response may come."""
        response.ex.life.sent_upstream()
        self.waiting.append(response)

    def written(self, response: InflightResponse, now: float) -> None:
        """The create frame was written to the upstream at ``now``."""
        if response.ex.tracker is not None:
            response.ex.tracker.request_sent(now)

    def note_create(self, response: InflightResponse, payload: dict[str, Any] | None) -> None:
        response.noted = True
        ex = response.ex
        if payload is None:
            return
        model, previous = payload.get("model"), payload.get("previous_response_id")
        ex.model_requested = model if isinstance(model, str) else None
        if isinstance(previous, str):
            ex.previous_response_id = previous
        if payload.get("generate") is False:
            ex.generate = False

    def reject(self, response: InflightResponse, payload: dict[str, Any] | None,
               error: str) -> None:
        """The create frame was refused before it went upstream (an extension failed)."""
        self.note_create(response, payload)
        response.ended = True
        response.ex.status = 500
        response.ex.fail(End.EXTENSION_ERROR, error)

    def on_client_frame(self, size: int) -> None:
        target = self.latest or (self.waiting[-1] if self.waiting else None)
        if target is not None:
            target.ex.bytes_in += size

    def on_upstream_frame(self, message: Message, now: float, kind: str | None,
                          obj: dict[str, Any] | None, handed: float | None = None
                          ) -> InflightResponse | None:
        """Attributes one upstream frame that arrived at ``now`` (``obj`` decoded for
        ``DECODED`` kinds) and was handed to the client at ``handed`` (None: not relayed);
        returns the response it ended, if it ended one."""
        if kind == "response.created":
            response = self._created(obj, now)
        elif kind in TERMINAL:
            response = self._by_response_id(obj)
        elif kind == "error":
            response = self.waiting.popleft() if self.waiting else self.latest
            if response is None and obj is not None:
                log.warning("upstream error event outside a response: %s", _error_text(obj))
        else:
            response = self.latest
        if response is None or response.ended:
            return None
        ex = response.ex
        ex.observe_chunk(size_of(message), now)
        if handed is not None and ex.tracker is not None:
            ex.tracker.on_relay(now, handed)
        if obj is not None:
            self._feed(response, kind, obj, now)
        elif kind is not None and isinstance(message, str) and ex.parser is not None:
            ex.parser.feed_message(message, now, kind)  # times a delta without decoding it
        return response if response.ended else None

    def _created(self, obj: dict[str, Any] | None, now: float) -> InflightResponse | None:
        if not self.waiting:
            return None
        response = self.waiting.popleft()
        response.ex.status = RESPONSE_STATUS
        if response.ex.tracker is not None:
            response.ex.tracker.response_head(now)
        response.ex.life.head()
        response.ex.life.answered(RESPONSE_STATUS)
        rid = _response_id(obj)
        if rid is not None:
            response.ex.response_id = rid
            self.by_id[rid] = response
        self.latest = response
        return response

    def _by_response_id(self, obj: dict[str, Any] | None) -> InflightResponse | None:
        rid = _response_id(obj)
        response = self.by_id.pop(rid, None) if rid is not None else None
        if response is None:  # no id, or no response.created seen: the order decides
            response = self.latest if self.latest is not None else (
                self.waiting.popleft() if self.waiting else None)
            if response is not None and response.ex.response_id is not None:
                self.by_id.pop(response.ex.response_id, None)
        return response

    def _feed(self, response: InflightResponse, kind: str | None, obj: dict[str, Any],
              now: float) -> None:
        """Reads a decoded event that arrived at ``now`` into its response's exchange."""
        ex = response.ex
        if ex.parser is not None:
            ex.parser.feed_event(obj, now)
        if kind in TERMINAL:
            if ex.life.answered_status is None:  # a terminal event without response.created
                ex.status = RESPONSE_STATUS
                ex.life.head()
                ex.life.answered(RESPONSE_STATUS)
            ex.body_ended(now)  # response.failed too: the upstream's answer, relayed whole
            ex.life.delivered()
            self._end(response)
        elif kind == "error":
            ex.status = ex.status or RESPONSE_STATUS
            ex.fail(End.UPSTREAM_ERROR, _error_text(obj))
            self._end(response)

    def _end(self, response: InflightResponse) -> None:
        response.ended = True
        if self.latest is response:
            self.latest = None
        if response in self.waiting:
            self.waiting.remove(response)
        if response.ex.response_id is not None:
            self.by_id.pop(response.ex.response_id, None)

    def cut(self, reason: End, error: str) -> None:
        """Ends every response in flight without a terminal event (their records: incomplete)."""
        for response in self.inflight:
            if not response.ended:
                response.ex.fail(reason, error)
                self._end(response)

    def discharge(self, response: InflightResponse) -> None:
        """``response`` is being finalised: it is no longer in flight."""
        if response in self.inflight:
            self.inflight.remove(response)


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
    """The streaming usage parser of one response, timing its content events."""
    return make_parser("openai.responses", streaming=True, latency=latency)
