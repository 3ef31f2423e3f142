"""OpenAI Responses usage, over SSE, over WebSocket (one JSON event per frame) or as JSON.

Decoded events: ``response.created`` / ``response.in_progress`` / ``response.queued`` (only while
id or model is unknown), the terminal ``response.completed`` / ``response.failed`` /
``response.incomplete`` (``response.usage``), and ``error``. Everything else (output items,
text deltas) is skipped by its event name or sniffed leading ``"type"``.

Content events (latency): every ``response.*.delta`` event (output_text, refusal,
function_call_arguments, reasoning_text, reasoning_summary_text, audio, ...) with a non-empty
``delta``, by type name; only a delta whose text holds ``""`` is decoded to check it is not
empty. ``response.created`` and the other lifecycle events never count.

Semantics: ``input_tokens`` (already includes cached), ``cache_read_tokens =
input_tokens_details.cached_tokens``, ``output_tokens`` (includes reasoning),
``reasoning_tokens = output_tokens_details.reasoning_tokens``. Stop reason: ``"completed"``,
``response.incomplete_details.reason`` (or ``"incomplete"``), ``"failed"``; for a JSON body
the same mapping from ``status``. A terminal event sets ``complete``; ``response.failed`` also
sets ``error`` from ``response.error``.
"""

from __future__ import annotations

from typing import Any

from ..protocol.sse import SSEEvent
from .base import UsageParser, as_count, error_text, loads_object, merge_usage, sniff_type

__all__ = ["OpenAIResponsesParser", "is_content_event"]

_START = frozenset({"response.created", "response.in_progress", "response.queued"})
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
_WANTED = _START | TERMINAL | {"error"}


def is_content_event(obj: dict[str, Any]) -> bool:
    """A ``response.*.delta`` event with a non-empty ``delta`` (output text, refusal, function
    call arguments, reasoning text or summary, audio, tool input...)."""
    delta = obj.get("delta")
    return bool(delta) and isinstance(delta, str | dict | list)


class OpenAIResponsesParser(UsageParser):
    """``POST /v1/responses`` (SSE or JSON) and the Responses WebSocket (``feed_event``)."""

    api = "openai.responses"

    def wants(self, kind: str | None) -> bool:
        """Whether an event of this type needs decoding (None: type unknown, so yes)."""
        if kind is None or kind in TERMINAL or kind == "error":
            return True
        u = self.usage
        return kind in _START and (u.response_id is None or u.model is None)

    def on_event(self, event: SSEEvent) -> None:
        self._data(event.event or sniff_type(event.data), event.data)

    def _data(self, kind: str | None, data: bytes | str) -> None:
        """One event's JSON text whose type is ``kind`` (None: not known without decoding)."""
        if kind is not None and kind[-6:] == ".delta":
            if (latency := self.latency) is None:
                return
            suspect = ('""' if isinstance(data, str) else b'""') in data  # may be empty
            if not suspect or ((obj := loads_object(data)) is not None and is_content_event(obj)):
                latency.on_content(self.now)
            return
        if self.wants(kind) and (obj := loads_object(data)) is not None:
            self._event(kind or obj.get("type"), obj)

    def feed_message(
        self, message: str | bytes, now: float | None = None, kind: str | None = None
    ) -> None:
        """One WebSocket text frame that arrived at ``now``; ``kind`` is its type if the caller
        already knows it (else sniffed). Decoded only if its type matters. Never raises."""
        if now is not None:
            self.now = now
        if self.failed is not None or self._usage is not None:
            return
        try:
            if kind is None:
                kind = sniff_type(message.encode() if isinstance(message, str) else message)
            self._data(kind, message)
        except Exception as exc:  # noqa: BLE001 - a parser must never break the relay
            self.give_up(f"{type(exc).__name__}: {exc}")

    def feed_event(self, obj: dict[str, Any], now: float | None = None) -> None:
        """One already-decoded event (a WebSocket frame) that arrived at ``now``. Never
        raises. Feed each frame once: either here or through :meth:`feed_message`."""
        if now is not None:
            self.now = now
        if self.failed is not None or self._usage is not None:
            return
        try:
            if isinstance(obj, dict):
                self._event(obj.get("type"), obj)
        except Exception as exc:  # noqa: BLE001
            self.give_up(f"{type(exc).__name__}: {exc}")

    def on_json(self, obj: dict[str, Any]) -> None:
        self.usage.complete = True  # the whole body was seen
        if "error" in obj and obj.get("object") != "response":
            self.usage.error = error_text(obj.get("error"))
            return
        status = obj.get("status")
        self._response(obj, status if isinstance(status, str) else None)

    def _event(self, kind: object, obj: dict[str, Any]) -> None:
        if isinstance(kind, str) and kind[-6:] == ".delta":
            if self.latency is not None and is_content_event(obj):
                self.note_content()
            return
        if kind == "error":
            err = obj.get("error")
            self.usage.error = error_text(err if isinstance(err, dict) else obj)
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        if kind in TERMINAL:
            self.usage.complete = True
            self._response(response, str(kind)[len("response."):])
        elif kind in _START:
            self.note_ids(response.get("model"), response.get("id"))

    def _response(self, response: dict[str, Any], status: str | None) -> None:
        """A response object, final (terminal event or JSON body) with ``status``."""
        u = self.usage
        self.note_ids(response.get("model"), response.get("id"))
        merge_usage(self.raw, response.get("usage"))
        if status == "incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            u.stop_reason = reason if isinstance(reason, str) and reason else "incomplete"
        elif status:
            u.stop_reason = status
        if status == "failed":
            u.error = error_text(response.get("error") or "response failed")

    def normalise(self, raw: dict[str, Any]) -> None:
        u = self.usage
        u.input_tokens = as_count(raw.get("input_tokens"))
        u.output_tokens = as_count(raw.get("output_tokens"))
        details = raw.get("input_tokens_details")
        if isinstance(details, dict):
            u.cache_read_tokens = as_count(details.get("cached_tokens"))
        details = raw.get("output_tokens_details")
        if isinstance(details, dict):
            u.reasoning_tokens = as_count(details.get("reasoning_tokens"))
