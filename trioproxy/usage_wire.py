"""Usage on the wire: ``x-usage-*`` headers, HTTP/2 trailers, and include_usage for the client.

Header mapping (a header is present only when its value is known):

| header | Anthropic Messages | Chat Completions | Responses |
|---|---|---|---|
| ``x-request-model`` | ``model`` answered (else requested) | same | same |
| ``x-usage-prompt_tokens`` | ``input_tokens`` (uncached part) | ``prompt_tokens`` | ``input_tokens`` |
| ``x-usage-completion_tokens`` | ``output_tokens`` | ``completion_tokens`` | ``output_tokens`` |
| ``x-usage-reasoning_tokens`` | – | ``completion_tokens_details.reasoning_tokens`` | ``output_tokens_details.reasoning_tokens`` |
| ``x-usage-audio_tokens`` | – | prompt + completion ``audio_tokens`` | – |
| ``x-usage-accepted_prediction_tokens`` | – | ``completion_tokens_details.…`` | – |
| ``x-usage-rejected_prediction_tokens`` | – | ``completion_tokens_details.…`` | – |
| ``x-usage-cache_read_input_tokens`` | ``cache_read_input_tokens`` | – | – |
| ``x-usage-cache_creation_input_tokens`` | ``cache_creation_input_tokens`` | – | – |
| ``x-usage-cost_usd`` | priced with genai-prices | same | same |
| ``x-usage-complete`` | trailers only: ``true`` / ``false`` | same | same |
"""

from __future__ import annotations

from typing import Any

USAGE_FIELDS = (
    "x-request-model",
    "x-usage-prompt_tokens",
    "x-usage-completion_tokens",
    "x-usage-reasoning_tokens",
    "x-usage-audio_tokens",
    "x-usage-accepted_prediction_tokens",
    "x-usage-rejected_prediction_tokens",
    "x-usage-cache_read_input_tokens",
    "x-usage-cache_creation_input_tokens",
    "x-usage-cost_usd",
)
TRAILER_FIELDS = (*USAGE_FIELDS, "x-usage-complete")
TRAILER_ANNOUNCE = ", ".join(TRAILER_FIELDS).encode()
SSE_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # a blank line ends an SSE event


def _sum(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def usage_values(
    api: str, usage: Any, cost_usd: float | None, model_requested: str | None
) -> dict[str, str]:
    """The ``x-usage-*`` values known for one response (``usage`` is a providers.Usage)."""
    out: dict[str, object | None] = {}
    model = getattr(usage, "model", None) or model_requested
    out["x-request-model"] = model
    if usage is not None and getattr(usage, "known", False):
        inp, cr, cw = usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens
        if api.startswith("anthropic") and inp is not None:
            inp = inp - (cr or 0) - (cw or 0)  # Anthropic's own input_tokens excludes cache
            out["x-usage-cache_read_input_tokens"] = cr
            out["x-usage-cache_creation_input_tokens"] = cw
        out["x-usage-prompt_tokens"] = inp
        out["x-usage-completion_tokens"] = usage.output_tokens
        out["x-usage-reasoning_tokens"] = usage.reasoning_tokens
        out["x-usage-audio_tokens"] = _sum(usage.audio_input_tokens, usage.audio_output_tokens)
        out["x-usage-accepted_prediction_tokens"] = usage.accepted_prediction_tokens
        out["x-usage-rejected_prediction_tokens"] = usage.rejected_prediction_tokens
        if cost_usd is not None:
            out["x-usage-cost_usd"] = f"{cost_usd:.10f}".rstrip("0").rstrip(".") or "0"
    return {k: str(v) for k, v in out.items() if v is not None}


def as_headers(values: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1", "replace")) for k, v in values.items()]


# -- include_usage ---------------------------------------------------------------------------


def inject_include_usage(payload: dict[str, Any]) -> bool:
    """Ask a streamed Chat Completions request for usage if it did not. True if changed."""
    if payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is not None:
        return False  # the client decided; leave it alone
    if options is not None and not isinstance(options, dict):
        return False
    payload["stream_options"] = {**(options or {}), "include_usage": True}
    return True


class UsageChunkStripper:
    """Removes the usage-only final chunk (``"choices":[]`` + ``"usage":{``) from a Chat SSE
    stream. Complete events pass at once; only an unfinished trailing event is held until its
    blank line arrives. Never raises; the bytes of every other event are untouched."""

    __slots__ = ("_tail", "stripped")

    def __init__(self) -> None:
        self._tail = b""
        self.stripped = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + bytes(chunk) if self._tail else bytes(chunk)
        end = _last_boundary(data)
        if end < 0:
            self._tail = data
            return b""
        self._tail = data[end:]
        complete = data[:end]
        if b'"choices":[]' not in complete:
            return complete
        return self._drop_usage_events(complete)

    def _drop_usage_events(self, data: bytes) -> bytes:
        out = []
        for event in _split_events(data):
            if b'"choices":[]' in event and b'"usage":{' in event:
                self.stripped = True
                continue
            out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


def _last_boundary(data: bytes) -> int:
    """Index just past the last blank line (event end) in ``data``, or -1."""
    best = -1
    for sep in SSE_EVENT_ENDS:
        i = data.rfind(sep)
        if i >= 0 and i + len(sep) > best:
            best = i + len(sep)
    return best


def _split_events(data: bytes) -> list[bytes]:
    """Split complete SSE text into events, each keeping its own terminating blank line."""
    events = []
    start = 0
    n = len(data)
    while start < n:
        ends = [i + len(s) for s in SSE_EVENT_ENDS if (i := data.find(s, start)) >= 0]
        end = min(ends) if ends else n
        events.append(data[start:end])
        start = end
    return events
