"""OpenAI Chat Completions usage: ``data: {chunk}`` … ``data: [DONE]``, or one JSON object.

Stream: chunks carry no event name. The first chunks are decoded until id and model are known
(Azure's first chunk may have ``"model": ""``); after that only chunks whose bytes show a usage
*object*, a non-null ``finish_reason`` or an ``error`` object are decoded (``"usage":null``
is skipped). With ``stream_options.include_usage`` the last chunk (``choices: []``) has ``usage``.
``[DONE]`` marks the stream complete.

Semantics: ``input_tokens = prompt_tokens`` (already includes cached tokens),
``cache_read_tokens = prompt_tokens_details.cached_tokens``, ``output_tokens =
completion_tokens`` (includes reasoning); stop reason is the last non-null ``finish_reason``.
A stream without a usage chunk (not requested, or cut) gives ``known=False`` and no token
counts, but model, id, stop reason and ``complete`` are still reported.
"""

from __future__ import annotations

import re
from typing import Any

from ..sse import SSEEvent
from .base import UsageParser, as_count, error_text, loads_object, merge_usage

__all__ = ["OpenAIChatParser"]

_INTERESTING = re.compile(rb'"(?:usage"\s*:\s*\{|finish_reason"\s*:\s*"|error"\s*:\s*\{)')


class OpenAIChatParser(UsageParser):
    """``POST /v1/chat/completions``, streamed or not."""

    api = "openai.chat"

    def on_event(self, event: SSEEvent) -> None:
        data = event.data
        if data[:1] == b"[" and data.strip() == b"[DONE]":
            self.usage.complete = True
            return
        u = self.usage
        if u.model is not None and u.response_id is not None and not _INTERESTING.search(data):
            return
        obj = loads_object(data)
        if obj is not None:
            self._chunk(obj)

    def on_json(self, obj: dict[str, Any]) -> None:
        self.usage.complete = True  # the whole body was seen
        self._chunk(obj)

    def _chunk(self, obj: dict[str, Any]) -> None:
        """A streamed chunk or a whole completion: same fields."""
        if "error" in obj and "choices" not in obj:
            self.usage.error = error_text(obj.get("error"))
            return
        self.note_ids(obj.get("model"), obj.get("id"))
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                reason = choice.get("finish_reason") if isinstance(choice, dict) else None
                if isinstance(reason, str) and reason:
                    self.usage.stop_reason = reason
        merge_usage(self.raw, obj.get("usage"))

    def normalise(self, raw: dict[str, Any]) -> None:
        u = self.usage
        u.input_tokens = as_count(raw.get("prompt_tokens"))
        u.output_tokens = as_count(raw.get("completion_tokens"))
        prompt = raw.get("prompt_tokens_details")
        if isinstance(prompt, dict):
            u.cache_read_tokens = as_count(prompt.get("cached_tokens"))
            u.audio_input_tokens = as_count(prompt.get("audio_tokens"))
        completion = raw.get("completion_tokens_details")
        if isinstance(completion, dict):
            u.reasoning_tokens = as_count(completion.get("reasoning_tokens"))
            u.audio_output_tokens = as_count(completion.get("audio_tokens"))
            u.accepted_prediction_tokens = as_count(completion.get("accepted_prediction_tokens"))
            u.rejected_prediction_tokens = as_count(completion.get("rejected_prediction_tokens"))
