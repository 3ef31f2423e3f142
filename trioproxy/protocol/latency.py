"""Per-request latency figures, measured on the side of the relay. Pure: no I/O, no clock.

The relay hands a :class:`LatencyTracker` the times it already has (``trio.current_time()``
values, in seconds); the usage parser calls :meth:`LatencyTracker.on_content` with the arrival
time of each *content* event (a text, tool-call or reasoning delta; see the parsers). At the end
:meth:`LatencyTracker.figures` returns a :class:`Latency` in milliseconds.

Figures (ours, then the GenAI-Perf / AIPerf and vLLM ``bench serve`` names):

- ``ttft_ms``: first content event − request received (``time_to_first_token`` / ``ttft``).
  Role-only chunks, ``message_start``, ``response.created`` and ``: ping`` do not count.
- ``itl_p50_ms`` … ``itl_max_ms``: gaps between consecutive content events
  (``inter_token_latency`` / ``itl``, per event: an event may carry several tokens; events that
  arrive in the same chunk have a gap of 0). ``itl_count`` is the number of gaps.
- ``tpot_ms``: (last − first content event) / (output tokens − 1) (``tpot``); None with fewer
  than 2 output tokens or fewer than 2 content events.
- ``tokens_per_s``: (output tokens − 1) / (e2e − TTFT) in seconds: the decode rate a user sees
  (AIPerf's ``output_token_throughput_per_user``); None when TTFT is unknown (not streamed).
- ``duration_ms``: end − request received (``request_latency`` / ``e2el``); the end is the
  arrival of the response's last byte (its terminal event on a WebSocket), or, for a response
  cut short, the moment the exchange was finalised. Stored in the record as ``e2e_ms``.
- ``upstream_head_ms``: response head received − request written upstream.
- ``proxy_request_ms``: request written upstream − request received (routing, extensions, and
  the upstream connection set-up when no pooled connection was free).
- ``proxy_relay_ms`` / ``proxy_relay_max_ms``: mean / max delay of a chunk from its read from
  upstream to its hand-over to the client ``send()`` (includes waiting for a slow client).
- ``proxy_overhead_ms`` = ``proxy_request_ms`` + ``proxy_relay_ms``: what the proxy adds to the
  arrival of a token, on average.

- ``last_token_ms``: last content event − request received: the end to end time of a client
  that stops at the last content chunk (vLLM ``bench serve``'s ``e2el`` and GenAI-Perf's
  request latency stop at the last chunk they read; ``duration_ms`` runs on to the last byte,
  after the finish, usage and ``[DONE]`` chunks).
- ``itl_sketch``: every gap of the response, as the stored text of a
  :class:`~trioproxy.protocol.gapsketch.GapSketch` (1 % log buckets): sketches of many
  responses merge, so percentiles of the gaps pooled over many responses are known within 1 %.

Memory is bounded: the first :data:`EXACT_GAPS` gaps are kept exactly (an ``array('d')``, 8 bytes
each, so percentiles are exact for ordinary responses); past that every gap goes to the gap
sketch (1 % log buckets; sparse, so a few hundred buckets at most), and the percentiles are read
from it (within 1 %). The maximum stays exact.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .gapsketch import GapSketch

__all__ = [
    "EXACT_GAPS",
    "Latency",
    "LatencyTracker",
    "percentile",
    "server_timing",
]

EXACT_GAPS = 4096  # 32 KiB of exact gaps per response, then the gap sketch


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of a sorted, non-empty
    sequence; ``q`` in [0, 100]."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass(frozen=True, slots=True)
class Latency:
    """The latency figures of one response, in ms (None: not measurable for this response)."""

    ttft_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p90_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_max_ms: float | None = None
    itl_count: int = 0
    tpot_ms: float | None = None
    tokens_per_s: float | None = None
    duration_ms: float | None = None
    upstream_head_ms: float | None = None
    proxy_request_ms: float | None = None
    proxy_relay_ms: float | None = None
    proxy_relay_max_ms: float | None = None
    proxy_overhead_ms: float | None = None
    content_events: int = 0
    last_token_ms: float | None = None
    itl_sketch: str | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


class LatencyTracker:
    """Accumulates the times of one response; :meth:`figures` turns them into a :class:`Latency`.

    ``received`` is when the proxy got the request. The relay sets :attr:`upstream_sent` and
    :attr:`head` (or calls the methods), calls :meth:`on_relay` per chunk handed to the client,
    and the parser calls :meth:`on_content` per content event. Never raises on odd input.
    """

    __slots__ = (
        "_gaps",
        "_max_gap",
        "_overflow",
        "_relay_count",
        "_relay_max",
        "_relay_sum",
        "body_end",
        "content_events",
        "first_content",
        "head",
        "last_content",
        "received",
        "upstream_sent",
    )

    def __init__(self, received: float) -> None:
        self.received = received
        self.upstream_sent: float | None = None
        self.head: float | None = None
        self.body_end: float | None = None
        self.first_content: float | None = None
        self.last_content: float | None = None
        self.content_events = 0
        self._gaps = array("d")
        self._overflow: GapSketch | None = None  # only once EXACT_GAPS is exceeded
        self._max_gap = 0.0
        self._relay_sum = 0.0
        self._relay_count = 0
        self._relay_max = 0.0

    def request_sent(self, now: float) -> None:
        """The request (head and body) was written upstream."""
        self.upstream_sent = now

    def response_head(self, now: float) -> None:
        """The upstream response head arrived."""
        self.head = now

    def body_ended(self, now: float) -> None:
        """The last byte of the response (or its terminal WebSocket event) arrived: the end
        of ``duration_ms`` (see :meth:`end`)."""
        self.body_end = now

    def end(self, fallback: float) -> float:
        """When the response ended: its last byte's arrival, else ``fallback`` (a response cut
        short ends when the exchange is finalised)."""
        return self.body_end if self.body_end is not None else fallback

    def on_content(self, now: float) -> None:
        """A content event arrived at ``now`` (the time of the chunk that completed it)."""
        last = self.last_content
        self.last_content = now
        self.content_events += 1
        if last is None:
            self.first_content = now
            return
        gap = now - last
        if gap > self._max_gap:  # noqa: PLR1730 - per event: a compare, not a call
            self._max_gap = gap
        if len(self._gaps) < EXACT_GAPS:
            self._gaps.append(gap)
        else:
            overflow = self._overflow
            if overflow is None:
                overflow = self._overflow = GapSketch()
            overflow.add(gap * 1000.0)

    def on_relay(self, read_at: float, handed_at: float) -> None:
        """A chunk read from upstream at ``read_at`` was handed to the client's send at
        ``handed_at`` (for coalesced chunks: once per chunk, each with its own read time)."""
        delay = handed_at - read_at
        self._relay_sum += delay
        self._relay_count += 1
        if delay > self._relay_max:  # noqa: PLR1730 - per chunk: a compare, not a call
            self._relay_max = delay

    def _summary(self) -> tuple[tuple[float, float, float] | None, GapSketch | None]:
        """(p50, p90, p99) of the gaps in seconds and the sketch of every gap; (None, None)
        without gaps. Sorts the exact gaps once for both."""
        if not self._gaps:
            return None, None
        ordered = sorted(self._gaps)
        sketch = GapSketch()
        sketch.add_sorted_seconds(ordered)
        if self._overflow is None:
            return (percentile(ordered, 50), percentile(ordered, 90),
                    percentile(ordered, 99)), sketch
        sketch.merge(self._overflow)
        top = self._max_gap * 1000.0  # the maximum is exact: no estimate above it
        p50, p90, p99 = (min(v, top) / 1000.0 for v in sketch.percentiles((50, 90, 99)))  # type: ignore[type-var]
        return (p50, p90, p99), sketch

    def itl_percentiles(self) -> tuple[float, float, float] | None:
        """(p50, p90, p99) of the gaps in seconds, None without gaps."""
        return self._summary()[0]

    def figures(self, ended: float, output_tokens: int | None) -> Latency:
        """The figures for a response that ended at ``ended`` with ``output_tokens``."""
        ttft = None if self.first_content is None else self.first_content - self.received
        duration = ended - self.received
        itl, sketch = self._summary()
        last = None if self.last_content is None else self.last_content - self.received
        n = output_tokens if isinstance(output_tokens, int) and output_tokens >= 0 else None
        tpot = rate = None
        if n is not None and n > 1 and self.content_events > 1:
            tpot = (self.last_content - self.first_content) / (n - 1)  # type: ignore[operator]
        if n is not None and n > 1 and ttft is not None and duration - ttft > 0:
            rate = round((n - 1) / (duration - ttft), 3)
        sent = self.upstream_sent
        head = None if self.head is None or sent is None else self.head - sent
        proxy_request = None if sent is None else sent - self.received
        relay = self._relay_sum / self._relay_count if self._relay_count else None
        overhead = None
        if proxy_request is not None or relay is not None:
            overhead = (proxy_request or 0.0) + (relay or 0.0)
        return Latency(
            ttft_ms=_ms(ttft),
            itl_p50_ms=_ms(itl[0]) if itl else None,
            itl_p90_ms=_ms(itl[1]) if itl else None,
            itl_p99_ms=_ms(itl[2]) if itl else None,
            itl_max_ms=_ms(self._max_gap) if itl else None,
            itl_count=max(0, self.content_events - 1),
            tpot_ms=_ms(tpot),
            tokens_per_s=rate,
            duration_ms=_ms(duration),
            upstream_head_ms=_ms(head),
            proxy_request_ms=_ms(proxy_request),
            proxy_relay_ms=_ms(relay),
            proxy_relay_max_ms=_ms(self._relay_max) if self._relay_count else None,
            proxy_overhead_ms=_ms(overhead),
            content_events=self.content_events,
            last_token_ms=_ms(last),
            itl_sketch=sketch.encode() if sketch is not None else None,
        )


_TIMING_FIELDS = (
    ("upstream", "upstream_head_ms", "upstream response head"),
    ("ttft", "ttft_ms", "time to first token"),
    ("itl", "itl_p50_ms", "inter-token latency p50"),
    ("tpot", "tpot_ms", "time per output token"),
    ("proxy", "proxy_overhead_ms", "added by the proxy"),
    ("total", "duration_ms", "end to end"),
)


def _dur(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def server_timing(latency: Latency) -> bytes:
    """A W3C ``Server-Timing`` header (or trailer) value for the figures that are known, e.g.
    ``ttft;dur=12.3;desc="time to first token", total;dur=80;desc="end to end"``. Empty when
    nothing is known."""
    parts = []
    for name, attr, desc in _TIMING_FIELDS:
        value = getattr(latency, attr)
        if value is not None:
            parts.append(f'{name};dur={_dur(value)};desc="{desc}"')
    return ", ".join(parts).encode("ascii")
