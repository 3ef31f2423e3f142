"""Per-exchange facts shared by the relay, the access log and accounting. No I/O.

An :class:`Exchange` is one proxied HTTP request, or one response on the Responses WebSocket.
What happened to it (its state, failure and outcome) lives in its :class:`Lifecycle`; the
fields here are what was observed on the way: ids, timings, byte counts, the requested model.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .extensions import HookContext
from .protocol.latency import Latency, LatencyTracker
from .protocol.lifecycle import End, Lifecycle
from .protocol.routing import Route

# access log key -> Latency attribute
ACCESS_LATENCY = (
    ("ttft_ms", "ttft_ms"), ("itl_p50_ms", "itl_p50_ms"), ("itl_p99_ms", "itl_p99_ms"),
    ("tpot_ms", "tpot_ms"), ("tokens_per_s", "tokens_per_s"), ("e2e_ms", "duration_ms"),
    ("upstream_head_ms", "upstream_head_ms"), ("proxy_ms", "proxy_overhead_ms"),
)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    """The proxy's own id: unique, the usage record's key. The time in milliseconds (11 hex
    digits) comes first, so ids sort by creation and the ledger's primary-key index is appended
    to rather than written all over (an SQLite insert costs ~26 instead of ~36 µs); 80 random
    bits after it make it unique."""
    return f"tp_{time.time_ns() // 1_000_000:011x}{secrets.token_hex(10)}"


def correlation_id(value: bytes | None) -> str | None:
    """An inbound id (the configured header) kept beside the proxy's id, if it is a sane token.

    It is never the record's key: a client may reuse it, or send another client's."""
    if value:
        text = value.decode("latin-1").strip()
        if _VALID_ID.match(text):
            return text
    return None


@dataclass(eq=False)
class Exchange:
    """Everything known about one exchange, filled in as it happens."""

    method: str
    path: str
    provider: str
    request_id: str = field(default_factory=new_request_id)
    correlation_id: str | None = None
    route: Route | None = None
    transport: str = "http"
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=trio.current_time)
    request_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    life: Lifecycle = field(default_factory=Lifecycle)
    bytes_in: int = 0
    bytes_out: int = 0
    status: int | None = None  # the status the client got (the upstream's, or the proxy's own)
    streamed: bool = False
    headers_at: float | None = None  # trio time the upstream response head arrived
    first_byte_at: float | None = None  # trio time the first body byte arrived
    last_chunk_at: float | None = None
    max_gap: float = 0.0
    finalised_at: float | None = None  # trio time the exchange was finalised
    upstream_request_id: str | None = None
    response_id: str | None = None  # set by the WebSocket relay (HTTP: from the parsed usage)
    bypass: bool = False
    model_requested: str | None = None
    stream_requested: bool | None = None  # None: the payload was never decoded
    session_id: str | None = None
    close_connection: bool = False  # the client connection closes after this response
    trailers_ok: bool = False  # HTTP/2 and the client sent TE: trailers
    strip_usage_chunk: bool = False  # include_usage was injected: remove its chunk again
    payload_changed_by: list[str] | None = None
    # The Responses WebSocket: which socket, which response on it.
    socket_id: str | None = None
    response_index: int | None = None
    previous_response_id: str | None = None
    generate: bool | None = None
    parser: Any = None  # a providers.UsageParser when the route is accounted
    tracker: LatencyTracker | None = None  # set by the relay once it handles the request
    finalised: trio.Event = field(default_factory=trio.Event)  # set once its record exists
    _usage: Any = field(default=None, repr=False)
    _priced: tuple[float | None] | None = field(default=None, repr=False)
    _latency: Latency | None = field(default=None, repr=False)

    # -- what happened (read from the lifecycle) ---------------------------------------------

    @property
    def end_reason(self) -> str | None:
        return self.life.end_reason()

    @property
    def error(self) -> str | None:
        return self.life.error

    @property
    def upstream_complete(self) -> bool:
        return self.life.upstream_complete

    @property
    def response_started(self) -> bool:
        return self.life.started

    def fail(self, reason: End | str, error: str | None = None) -> bool:
        """Note a failure (the first one wins). True if this one counted."""
        return self.life.fail(End(reason), error)

    # -- derived, computed once after the body ended ------------------------------------------

    def usage(self) -> Any:
        """The parsed usage (a providers.Usage), computed once, after the body has ended."""
        if self._usage is None and self.parser is not None:
            self._usage = self.parser.close()
        return self._usage

    def track_latency(self) -> LatencyTracker:
        """Start measuring this exchange's latency (from :attr:`started`, when the request was
        received); the tracker is also handed to the usage parser for content events."""
        if self.tracker is None:
            self.tracker = LatencyTracker(self.started)
        return self.tracker

    def latency(self) -> Latency | None:
        """The latency figures (None without a tracker), computed once: after the body ended,
        or at finalisation for a response cut short (its end is then the finalisation time)."""
        if self._latency is None and self.tracker is not None:
            end = self.finalised_at if self.finalised_at is not None else trio.current_time()
            usage = self.usage()
            self._latency = self.tracker.figures(
                self.tracker.end(end), getattr(usage, "output_tokens", None))
        return self._latency

    def cost_usd(self) -> float | None:
        """Cost of the parsed usage (None when unknown), priced once."""
        if self._priced is None:
            from .accounting.prices import price_usage

            self._priced = (price_usage(self.usage(), self.provider),)
        return self._priced[0]

    def log_label(self) -> str:
        """How log lines name this exchange: the proxy's id, and the inbound id beside it."""
        return f"{self.request_id}({self.correlation_id})" if self.correlation_id else self.request_id

    def hook_context(self, payload: dict[str, Any] | None = None) -> HookContext:
        """What extension hooks are told of this exchange; without ``payload``, what the
        exchange noted of its request."""
        if payload is not None:
            model = payload.get("model")
            stream = bool(payload.get("stream"))
        else:
            model = self.model_requested
            stream = self.stream_requested if self.stream_requested is not None else self.streamed
        return HookContext(
            request_id=self.request_id, api=self.api(), provider=self.provider,
            transport=self.transport, path=self.path,
            model=model if isinstance(model, str) else None, stream=stream, bypass=self.bypass,
        )

    def api(self) -> str:
        return self.route.api if self.route else "unrouted"

    def body_ended(self, now: float) -> None:
        """The upstream body (on a WebSocket: the response's terminal event) ended at ``now``."""
        self.life.body_ended()
        if self.tracker is not None:
            self.tracker.body_ended(now)

    def observe_chunk(self, size: int, now: float) -> None:
        """Timing and byte counters for one upstream body chunk (hot path: keep it tiny)."""
        last = self.last_chunk_at
        if last is None:
            self.first_byte_at = now
            last = self.headers_at if self.headers_at is not None else now
        gap = now - last
        self.max_gap = max(self.max_gap, gap)
        self.last_chunk_at = now
        self.bytes_out += size

    # -- reports --------------------------------------------------------------------------------

    def timings_ms(self) -> dict[str, float | None]:
        end = self.finalised_at if self.finalised_at is not None else trio.current_time()

        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - self.started) * 1000, 3)

        return {
            "ttfb_ms": ms(self.first_byte_at if self.first_byte_at is not None else self.headers_at),
            "duration_ms": round((end - self.started) * 1000, 3),
            "max_gap_ms": round(self.max_gap * 1000, 3),
        }

    def latency_fields(self) -> dict[str, float | None]:
        """The access log's latency keys (always present; None when not measured)."""
        lat = self.latency()
        return {name: getattr(lat, attr, None) for name, attr in ACCESS_LATENCY}

    def access_fields(self) -> dict[str, object]:
        return {
            "id": self.request_id,
            **({"correlation_id": self.correlation_id} if self.correlation_id else {}),
            "method": self.method,
            "path": self.path,
            "route": self.api(),
            "status": self.status,
            "streamed": self.streamed,
            **self.timings_ms(),
            **self.latency_fields(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "upstream_request_id": self.upstream_request_id,
            "end": self.end_reason,
            **({"error": self.error} if self.error else {}),
        }
