"""The parsed usage (:class:`Usage`) and the parser base: incremental, I/O-free, never raising.

A parser is fed the upstream response body (chunks exactly as they go to the client) and,
after the body ended, ``close()`` returns a :class:`Usage`. Streaming parsers frame SSE and
JSON-decode only the events that can carry usage, ids or stop reasons; non-streaming parsers
buffer the body (up to a cap) and decode it once in ``close()``.

Streaming parsers also spot *content events* (a text, tool-call or reasoning delta; per API in
each module) and tell ``parser.latency`` (a :class:`~trioproxy.protocol.latency.LatencyTracker`, if set)
their arrival time: ``feed(chunk, now)`` times every event the chunk completes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..protocol.decoding import loads_object
from ..protocol.latency import LatencyTracker
from ..protocol.sse import SSEEvent, SSEFramer

__all__ = [
    "MAX_BODY_BYTES",
    "NullParser",
    "Usage",
    "UsageParser",
    "as_count",
    "error_text",
    "loads_object",
    "merge_usage",
    "sniff_type",
]

MAX_BODY_BYTES = 64 * 1024 * 1024  # non-streaming bodies beyond this are not parsed
_TYPE = re.compile(rb'\A\s*\{\s*"type"\s*:\s*"([^"\\]{1,100})"')


@dataclass
class Usage:
    """What one response used, normalised across providers (see the module docs per API)."""

    model: str | None = None  # model the upstream answered with
    response_id: str | None = None  # msg_… / chatcmpl-… / resp_…
    input_tokens: int | None = None  # NORMALISED: total input incl. cache reads and writes
    output_tokens: int | None = None  # total output incl. reasoning
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    audio_input_tokens: int | None = None
    audio_output_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    stop_reason: str | None = None
    raw_usage: dict | None = None  # the provider's own usage object, merged as seen
    complete: bool = False  # the terminal event / the full JSON body was seen
    error: str | None = None  # upstream in-band error ("type: message")
    known: bool = False  # False => token usage unknown


def as_count(value: object) -> int | None:
    """A token count: a non-negative int (not bool), else None."""
    if type(value) is int and value >= 0:
        return value
    return None


def merge_usage(dst: dict[str, Any], src: object) -> None:
    """Merge a provider usage object into ``dst`` in place.

    Counters are cumulative, so for two counts the larger one wins (robust to gateways that
    send 0 in one of two events); nested objects merge recursively; null never overwrites.
    """
    if not isinstance(src, dict):
        return
    for key, value in src.items():
        if value is None or not isinstance(key, str):
            continue
        old = dst.get(key)
        if isinstance(value, dict):
            if not isinstance(old, dict):
                old = dst[key] = {}
            merge_usage(old, value)
        elif as_count(old) is not None and as_count(value) is not None:
            dst[key] = max(old, value)
        else:
            dst[key] = value


def error_text(err: object) -> str:
    """``"type: message"`` for a provider error object (or whatever it is)."""
    if isinstance(err, dict):
        kind = err.get("type")
        if not kind or kind == "error":  # a top-level error event: its code says more
            kind = err.get("code") or kind
        message = err.get("message")
        if kind and message:
            return f"{kind}: {message}"
        if kind or message:
            return str(kind or message)
        return json.dumps(err)[:500]
    return str(err)[:500] if err else "error"


def sniff_type(data: bytes | bytearray) -> str | None:
    """The ``type`` of a JSON object that starts with ``{"type": "..."``, without decoding it."""
    m = _TYPE.match(data)
    return m.group(1).decode("ascii", "replace") if m else None


class UsageParser:
    """Base parser: ``feed(bytes)`` then ``close() -> Usage``. Neither ever raises.

    Subclasses implement :meth:`on_event` (streaming) and :meth:`on_json` (a whole body) and
    fill ``self.usage`` (ids, stop reason, error, complete) and ``self.raw`` (merged provider
    usage); :meth:`normalise` turns ``self.raw`` into token fields. Any internal failure makes the
    parser give up: ``close()`` then reports ``known=False``.
    """

    api = "unknown"

    def __init__(
        self, streaming: bool = False, *, max_body: int = MAX_BODY_BYTES,
        latency: LatencyTracker | None = None,
    ) -> None:
        self.streaming = streaming
        self.latency = latency  # told the arrival time of each content event (streams only)
        self.now = 0.0  # arrival time of the chunk being fed
        self.usage = Usage()
        self.raw: dict[str, Any] = {}
        self.failed: str | None = None  # why the parser gave up
        self._framer = SSEFramer() if streaming else None
        self._body = bytearray()
        self._max_body = max_body
        self._usage: Usage | None = None

    def feed(self, data: bytes, now: float | None = None) -> None:
        """Consume a chunk of the response body that arrived at ``now`` (the relay's clock;
        content events completed by this chunk are timed by it). Never raises."""
        if now is not None:
            self.now = now
        if self.failed is not None or self._usage is not None or not data:
            return
        try:
            if self._framer is not None:
                for event in self._framer.feed(data):
                    self.on_event(event)
            elif len(self._body) + len(data) > self._max_body:
                self.give_up(f"body larger than {self._max_body} bytes")
            else:
                self._body += data
        except Exception as exc:  # noqa: BLE001 - a parser must never break the relay
            self.give_up(f"{type(exc).__name__}: {exc}")

    def close(self) -> Usage:
        """The usage of the whole response (computed once). Never raises."""
        if self._usage is None:
            try:
                self._usage = self._close()
            except Exception as exc:  # noqa: BLE001
                self.give_up(f"{type(exc).__name__}: {exc}")
                self._usage = self._unknown()
        return self._usage

    def give_up(self, reason: str) -> None:
        """Stop parsing; ``close()`` will report unknown usage."""
        if self.failed is None:
            self.failed = reason
        self._framer = None
        self._body = bytearray()

    def _close(self) -> Usage:
        if self.failed is None and self._framer is not None:
            for event in self._framer.close(flush=True):
                self.on_event(event)
        elif self.failed is None:
            obj = loads_object(self._body) if self._body else None
            self._body = bytearray()
            if obj is None:
                self.give_up("body is not a JSON object")
            else:
                self.on_json(obj)
        if self.failed is not None:
            return self._unknown()
        u = self.usage
        if self.raw:
            u.raw_usage = self.raw
            self.normalise(self.raw)
        u.known = u.input_tokens is not None or u.output_tokens is not None
        return u

    def _unknown(self) -> Usage:
        u = self.usage
        return Usage(model=u.model, response_id=u.response_id, error=u.error, known=False)

    # -- for subclasses ------------------------------------------------------------------------

    def on_event(self, event: SSEEvent) -> None:
        """One SSE event of a streamed response."""

    def on_json(self, obj: dict[str, Any]) -> None:
        """The whole (non-streamed) response body."""

    def normalise(self, raw: dict[str, Any]) -> None:
        """Fill the token fields of ``self.usage`` from the merged provider usage ``raw``."""

    def note_content(self) -> None:
        """A content event (text, tool-call or reasoning delta) completed at ``self.now``."""
        if self.latency is not None:
            self.latency.on_content(self.now)

    def note_ids(self, model: object, response_id: object) -> None:
        """Note the answering model and the response id (non-empty strings only)."""
        if isinstance(model, str) and model:
            self.usage.model = model
        if isinstance(response_id, str) and response_id:
            self.usage.response_id = response_id


class NullParser(UsageParser):
    """For APIs without usage: ignores everything, ``close()`` reports unknown usage."""

    def __init__(self, streaming: bool = False) -> None:
        super().__init__(streaming)
        self.give_up("no usage parser for this API")

    def close(self) -> Usage:
        return Usage(known=False)
