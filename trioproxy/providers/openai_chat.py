"""OpenAI Chat Completions usage: ``data: {chunk}`` … ``data: [DONE]``, or one JSON object.

Stream: chunks carry no event name. The first chunks are decoded until id and model are known
(Azure's first chunk may have ``"model": ""``); after that only chunks whose bytes show a usage
*object*, a non-null ``finish_reason`` or an ``error`` object are decoded (``"usage":null``
is skipped). With ``stream_options.include_usage`` the last chunk (``choices: []``) has ``usage``.
``[DONE]`` marks the stream complete.

Content events (latency): a chunk whose ``choices[].delta`` carries output (see
:func:`has_content`; the role-only first chunk, ``delta: {}`` and the usage chunk do not). A
chunk decoded anyway is judged by meaning; any other by a scan from its ``"delta"`` key for a
content key with a non-empty value. Without ``parser.latency`` nothing is scanned for content.

Semantics: ``input_tokens = prompt_tokens`` (already includes cached tokens),
``cache_read_tokens = prompt_tokens_details.cached_tokens``, ``output_tokens =
completion_tokens`` (includes reasoning); stop reason is the last non-null ``finish_reason``.
A stream without a usage chunk (not requested, or cut) gives ``known=False`` and no token
counts, but model, id, stop reason and ``complete`` are still reported.
"""

from __future__ import annotations

import re
from typing import Any

from ..protocol.sse import SSEEvent
from .base import UsageParser, as_count, error_text, loads_object, merge_usage

__all__ = ["OpenAIChatParser", "has_content"]

_INTERESTING = re.compile(rb'"(?:usage"\s*:\s*\{|finish_reason"\s*:\s*"|error"\s*:\s*\{)')
# Content in a chunk that is not decoded: from ``"delta"`` on, a text key with a non-empty
# string, a non-empty tool_calls list or audio object. A quote inside a JSON string is always
# escaped, so ``"name"\s*:`` matches a key, never string content; whitespace and order are free.
_CONTENT = re.compile(
    rb'"(?:(?:content|reasoning_content|reasoning|refusal)"\s*:\s*"(?!")'
    rb'|tool_calls"\s*:\s*\[\s*\{|audio"\s*:\s*\{\s*")'
)
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def has_content(obj: dict[str, Any]) -> bool:
    """A chunk whose ``choices[].delta`` carries output: non-empty ``content``,
    ``reasoning_content`` / ``reasoning`` (vLLM, DeepSeek, OpenRouter), ``refusal``, a non-empty
    ``tool_calls`` list or ``audio`` object. A role-only chunk or ``delta: {}`` does not."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        if any(isinstance(v := delta.get(k), str) and v for k in _TEXT_FIELDS):
            return True
        calls, audio = delta.get("tool_calls"), delta.get("audio")
        if (isinstance(calls, list) and calls) or (isinstance(audio, dict) and audio):
            return True
    return False


class OpenAIChatParser(UsageParser):
    """``POST /v1/chat/completions``, streamed or not."""

    api = "openai.chat"

    def on_event(self, event: SSEEvent) -> None:
        data = event.data
        if data[:1] == b"[" and data.strip() == b"[DONE]":
            self.usage.complete = True
            return
        u = self.usage
        # The byte checks only narrow which events are decoded: an event with a \u escape
        # (which could spell any key) is always decoded, so nothing is missed.
        if u.model is None or u.response_id is None or _INTERESTING.search(data) is not None \
                or b"\\u" in data:
            obj = loads_object(data)
            if obj is not None:
                self._chunk(obj)
                if self.latency is not None and has_content(obj):  # judged by meaning
                    self.note_content()
        elif (latency := self.latency) is not None:
            start = data.find(b'"delta"')
            if start >= 0 and _CONTENT.search(data, start) is not None:
                latency.on_content(self.now)

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
