"""Anthropic Messages usage: ``message_start`` / ``message_delta`` / ``message_stop`` / ``error``.

Stream: ``message_start.message`` gives id, model and usage (input, cache creation, cache read,
a small output); ``message_delta.usage`` is cumulative (output, and on newer APIs and gateways
input and cache fields too) and ``message_delta.delta.stop_reason`` the stop reason;
``message_stop`` marks the stream complete; an ``error`` event sets ``error``. Only those events
are JSON-decoded (by their ``event:`` name, or a sniffed leading ``"type"`` if a server omits it).

Normalised: ``input_tokens = input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``; ``cache_write_tokens`` is the cache creation count.
"""

from __future__ import annotations

from typing import Any

from ..sse import SSEEvent
from .base import UsageParser, as_count, error_text, loads_object, merge_usage, sniff_type

__all__ = ["AnthropicCountTokensParser", "AnthropicMessagesParser"]

_WANTED = frozenset({"message_start", "message_delta", "message_stop", "error"})


class AnthropicMessagesParser(UsageParser):
    """``POST /v1/messages``, streamed (SSE) or not (the message object)."""

    api = "anthropic.messages"

    def on_event(self, event: SSEEvent) -> None:
        kind = event.event or sniff_type(event.data)
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

    def __init__(self, streaming: bool = False) -> None:
        super().__init__(False)  # always a JSON body

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
