"""Anthropic Messages usage: ``message_start`` / ``message_delta`` / ``message_stop`` / ``error``.

Stream: ``message_start.message`` gives id, model and usage (input, cache creation, cache read,
a small output); ``message_delta.usage`` is cumulative (output, and on newer APIs and gateways
input and cache fields too) and ``message_delta.delta.stop_reason`` the stop reason;
``message_stop`` marks the stream complete; an ``error`` event sets ``error``. Only those events
are JSON-decoded (by their ``event:`` name, or a sniffed leading ``"type"`` if a server omits it).

Content events (latency): ``content_block_delta`` with a non-empty ``text``, ``partial_json`` or
``thinking`` (not ``signature_delta``, ``citations_delta`` or an empty delta), found by a scan
from its ``"delta"`` key for such a key and its value, without decoding (an event without a type line or a leading
``"type"`` is decoded anyway and judged by meaning: :func:`is_content_delta`).

Normalised: ``input_tokens = input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``; ``cache_write_tokens`` is the cache creation count.
"""

from __future__ import annotations

import re
from typing import Any

from ..protocol.latency import LatencyTracker
from ..protocol.sse import SSEEvent
from .base import UsageParser, as_count, error_text, loads_object, merge_usage, sniff_type

__all__ = ["AnthropicCountTokensParser", "AnthropicMessagesParser", "is_content_delta"]

_WANTED = frozenset({"message_start", "message_delta", "message_stop", "error"})
_CONTENT_FIELDS = ("text", "partial_json", "thinking")
# A content key with a non-empty string value. A quote inside a JSON string is always escaped,
# so ``"text"\s*:`` matches a key, never string content; whitespace and key order are free.
_CONTENT = re.compile(rb'"(?:text|partial_json|thinking)"\s*:\s*"(?!")')


def is_content_delta(obj: dict[str, Any]) -> bool:
    """A ``content_block_delta`` carrying output: non-empty text, tool input JSON or thinking
    (a ``signature_delta`` or ``citations_delta`` carries no generated token)."""
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        return False
    return any(isinstance(v := delta.get(k), str) and v for k in _CONTENT_FIELDS)


class AnthropicMessagesParser(UsageParser):
    """``POST /v1/messages``, streamed (SSE) or not (the message object)."""

    api = "anthropic.messages"

    def on_event(self, event: SSEEvent) -> None:
        kind = event.event or sniff_type(event.data)
        if kind == "content_block_delta":
            if (latency := self.latency) is not None:
                data = event.data
                start = data.find(b'"delta"')
                if start >= 0 and _CONTENT.search(data, start) is not None:
                    latency.on_content(self.now)
                elif b"\\u" in data:  # an escape could spell any key: judge by meaning
                    obj = loads_object(data)
                    if obj is not None and is_content_delta(obj):
                        latency.on_content(self.now)
            return
        if kind == "message_stop":
            self.usage.complete = True
            return
        if kind is not None and kind not in _WANTED:
            return  # ping, content_block_*: never decoded
        obj = loads_object(event.data)
        if obj is None:
            return
        kind = kind or obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self._message(message)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._stop_reason(delta.get("stop_reason"))
            merge_usage(self.raw, obj.get("usage"))
        elif kind == "message_stop":
            self.usage.complete = True
        elif kind == "error":
            self.usage.error = error_text(obj.get("error"))
        elif kind == "content_block_delta" and self.latency is not None and is_content_delta(obj):
            self.note_content()  # an event without a type line, decoded: judged by meaning

    def on_json(self, obj: dict[str, Any]) -> None:
        self.usage.complete = True  # the whole body was seen
        if obj.get("type") == "error" or "error" in obj:
            self.usage.error = error_text(obj.get("error"))
            return
        self._message(obj)

    def _message(self, message: dict[str, Any]) -> None:
        self.note_ids(message.get("model"), message.get("id"))
        self._stop_reason(message.get("stop_reason"))
        merge_usage(self.raw, message.get("usage"))

    def _stop_reason(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.usage.stop_reason = value

    def normalise(self, raw: dict[str, Any]) -> None:
        u = self.usage
        fresh = as_count(raw.get("input_tokens"))
        write = as_count(raw.get("cache_creation_input_tokens"))
        read = as_count(raw.get("cache_read_input_tokens"))
        if fresh is not None or write is not None or read is not None:
            u.input_tokens = (fresh or 0) + (write or 0) + (read or 0)
        u.cache_write_tokens = write
        u.cache_read_tokens = read
        u.output_tokens = as_count(raw.get("output_tokens"))


class AnthropicCountTokensParser(UsageParser):
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``.

    The count is reported as ``input_tokens`` (and ``output_tokens = 0``); note the endpoint
    itself is not billed for tokens: the count describes the request that was measured.
    """

    api = "anthropic.count_tokens"

    def __init__(self, streaming: bool = False, *, latency: LatencyTracker | None = None) -> None:
        super().__init__(False)  # always a JSON body: no content events

    def on_json(self, obj: dict[str, Any]) -> None:
        self.usage.complete = True
        if obj.get("type") == "error" or "error" in obj:
            self.usage.error = error_text(obj.get("error"))
            return
        count = as_count(obj.get("input_tokens"))
        if count is not None:
            self.raw["input_tokens"] = count

    def normalise(self, raw: dict[str, Any]) -> None:
        self.usage.input_tokens = as_count(raw.get("input_tokens"))
        self.usage.output_tokens = 0
