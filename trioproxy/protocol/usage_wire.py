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

With the usage headers (buffered responses) and among the trailers, ``server-timing`` (W3C
Server-Timing) carries the latency figures known for the response: ``upstream`` (head
latency), ``ttft``, ``itl`` (p50), ``tpot``, ``proxy`` (added by the proxy) and ``total``
(see :func:`trioproxy.protocol.latency.server_timing`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .latency import server_timing
from .sse import SSEFramer

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
TRAILER_FIELDS = (*USAGE_FIELDS, "x-usage-complete", "server-timing")
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


def timing_values(latency: Any) -> dict[str, str]:
    """``{"server-timing": ...}`` for a :class:`~trioproxy.protocol.latency.Latency` (empty when it is
    None or knows nothing)."""
    value = server_timing_value(latency)
    return {"server-timing": value.decode("ascii")} if value else {}


def server_timing_value(latency: Any) -> bytes:
    """The proxy's ``Server-Timing`` value for a response (b"" when nothing is known)."""
    return server_timing(latency) if latency is not None else b""


def as_headers(values: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1", "replace")) for k, v in values.items()]


# -- include_usage ---------------------------------------------------------------------------


def inject_include_usage(payload: dict[str, Any]) -> bool:
    """Make a streamed Chat Completions request report usage unless the client asked for it.

    ``stream_options.include_usage`` absent, null or ``false`` becomes ``true`` (other
    ``stream_options`` kept); ``true`` from the client, a non-boolean value or a
    ``stream_options`` that is not an object are left alone. True if changed: the response
    then goes through :class:`UsageChunkStripper`, so the client sees what it asked for and
    the stream is still accounted exactly.
    """
    if payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return False
    asked = options.get("include_usage")
    if asked is not None and asked is not False:
        return False  # the client asked for usage (or said something only the upstream judges)
    payload["stream_options"] = {**options, "include_usage": True}
    return True


MAX_HELD_EVENT = 1024 * 1024  # a usage chunk is ~1 KB; bigger events pass through undecoded

# Superset tests. JSON writes an empty list as "[", JSON whitespace, "]" (no escapes possible
# there), so event data without this cannot have ``"choices": []`` and is never decoded. In the
# raw stream such data shows either on one line or as a "[" that ends its line (the rest is on
# the next ``data:`` line): raw bytes without either hold no candidate, whatever the framing.
_EMPTY_LIST = re.compile(rb"\[[ \t\n\r]*\]")
_RAW_EMPTY_LIST = re.compile(rb"\[[ \t]*[\]\r\n]")


@dataclass(frozen=True, slots=True)
class StripperStatistics:
    bytes_held: int  # bytes of an unfinished event waiting for its end (at most the cap + a chunk)
    bytes_copied: int  # bytes copied into the hold buffer or into a rebuilt output, all told
    events_decoded: int  # events JSON-decoded because they passed the superset test
    events_stripped: int
    events_oversized: int  # events over the cap, passed through undecoded


class UsageChunkStripper:
    """Removes the usage-only chunk from a Chat Completions SSE stream, by JSON meaning.

    An event is that chunk iff its data decodes to an object whose ``choices`` is an empty
    list and whose ``usage`` is an object (any whitespace, any key order, escaped keys), and
    that carries no ``error``. Built on :class:`~trioproxy.protocol.sse.SSEFramer`: the event's whole
    block (its comments and fields up to its blank line) is cut out; every other byte passes
    unchanged. Complete events are returned at once; only an unfinished trailing event is held
    until its blank line, up to ``max_event_size`` (then it is passed through as it arrives,
    undecoded). Linear time: each byte is scanned once and copied at most twice.
    ``feed`` and ``flush`` never raise.
    """

    __slots__ = ("_framer", "_held", "_max", "_n", "_offset", "_skip_lf", "stripped")

    def __init__(self, *, max_event_size: int = MAX_HELD_EVENT) -> None:
        self._framer = SSEFramer(max_event_size=max_event_size, on_overflow="skip")
        self._max = max_event_size
        self._held = bytearray()  # bytes not passed on yet: the start of an unfinished event
        self._offset = 0  # stream offset of _held[0] (of the next chunk when nothing is held)
        self._skip_lf = False  # a cut event ended in CR: a following LF belongs to it
        self._n = [0, 0, 0, 0]  # copied, decoded, stripped, oversized
        self.stripped = False

    def statistics(self) -> StripperStatistics:
        copied, decoded, stripped, oversized = self._n
        return StripperStatistics(len(self._held), copied, decoded, stripped, oversized)

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (and of earlier held ones) that can go to the client now."""
        if not chunk:
            return b""
        framer, held = self._framer, self._held
        if not held and not _RAW_EMPTY_LIST.search(chunk) and framer.skip_whole_blocks(chunk):
            self._offset += len(chunk)
            return chunk  # the common case: whole events, none of which can be the usage chunk
        start = self._offset + len(held)  # stream offset of chunk[0]
        end = start + len(chunk)
        was_skipping = framer.skipping
        cuts = []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                cuts.append((start, start + 1))
        for event in framer.feed(chunk):
            if self._is_usage_chunk(event.data):
                cuts.append((event.start, event.end))
                self._skip_lf = event.end == end and chunk[-1] == 0x0D
        if not framer.skipping and end - framer.block_start > self._max:
            framer.skip_event()  # its comments alone outgrew the cap
        if framer.skipping:
            self._n[3] += not was_skipping
            upto = end  # an oversized event: pass it on as it comes
        else:
            upto = framer.block_start
        if not held and not cuts and upto == end:
            self._offset = end
            return chunk  # whole events, nothing to hold or cut
        return self._release(chunk, start, upto, cuts)

    def _release(self, chunk: bytes, start: int, upto: int, cuts: list[tuple[int, int]]) -> bytes:
        """Pass on the stream up to offset ``upto`` minus the ``cuts``; hold the rest."""
        held, n = self._held, self._n
        if held:
            held += chunk
            n[0] += len(chunk)
            data: bytes | bytearray = held
            base = self._offset
        else:
            data, base = chunk, start
        with memoryview(data) as view:
            pieces, pos = [], base
            for a, b in cuts:
                pieces.append(view[pos - base : a - base])
                pos = b
            pieces.append(view[pos - base : upto - base])
            out = b"".join(pieces)
            del pieces  # the slices pin ``held``: drop them before it is resized
            if data is not held:
                held += view[upto - base :]
        n[0] += len(out) + (len(held) if data is not held else 0)
        if data is held:
            del held[: upto - base]
        self._offset = upto
        return out

    def flush(self) -> bytes:
        """End of stream: the held unfinished event, unless it is the usage chunk itself."""
        tail, self._held = bytes(self._held), bytearray()
        self._offset += len(tail)
        events = self._framer.close(flush=True)
        if tail and events and self._is_usage_chunk(events[-1].data):
            return b""
        return tail

    def _is_usage_chunk(self, data: bytes) -> bool:
        if not _EMPTY_LIST.search(data):
            return False
        self._n[1] += 1
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        if not (isinstance(obj, dict) and obj.get("choices") == [] and obj.get("error") is None
                and isinstance(obj.get("usage"), dict)):
            return False
        self._n[2] += 1
        self.stripped = True
        return True
