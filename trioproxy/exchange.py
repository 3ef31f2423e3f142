"""Per-request state shared by the relay, the access log and accounting."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .routing import Route

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    return "tp_" + secrets.token_hex(12)


def adopt_request_id(value: bytes | None) -> str:
    """Adopt an inbound id if it is a sane token, else generate one."""
    if value:
        text = value.decode("latin-1").strip()
        if _VALID_ID.match(text):
            return text
    return new_request_id()


@dataclass(eq=False)
class Exchange:
    """Everything known about one proxied request, filled in as it happens."""

    request_id: str
    method: str
    path: str
    provider: str
    route: Route | None = None
    transport: str = "http"
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=trio.current_time)
    request_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    status: int | None = None
    streamed: bool = False
    response_started: bool = False
    headers_at: float | None = None  # trio time the upstream response head arrived
    first_byte_at: float | None = None  # trio time the first body byte arrived
    last_chunk_at: float | None = None
    max_gap: float = 0.0
    upstream_request_id: str | None = None
    upstream_complete: bool = False
    end_reason: str | None = None  # complete / client_disconnect / upstream_error / ...
    error: str | None = None
    finished_at: float | None = None
    bypass: bool = False
    model_requested: str | None = None
    parser: Any = None  # a providers.UsageParser when the route is accounted
    extra: dict[str, Any] = field(default_factory=dict)
    finalised: trio.Event = field(default_factory=trio.Event)  # set once its record exists

    def usage(self) -> Any:
        """The parsed usage (a providers.Usage), computed once, after the body has ended."""
        if "usage" not in self.extra:
            self.extra["usage"] = self.parser.finish() if self.parser is not None else None
        return self.extra["usage"]

    def cost_usd(self) -> float | None:
        """Cost of the parsed usage (None when unknown), priced once."""
        if "cost_usd" not in self.extra:
            from .accounting.prices import price_usage

            self.extra["cost_usd"] = price_usage(self.usage(), self.provider)
        return self.extra["cost_usd"]

    def api(self) -> str:
        return self.route.api if self.route else "unrouted"

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

    def fail(self, reason: str, error: str | None = None) -> None:
        """Record the first failure only: later ones are consequences."""
        if self.end_reason is None:
            self.end_reason = reason
            self.error = error

    def timings_ms(self) -> dict[str, float | None]:
        end = self.finished_at if self.finished_at is not None else trio.current_time()

        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - self.started) * 1000, 3)

        return {
            "ttfb_ms": ms(self.first_byte_at if self.first_byte_at is not None else self.headers_at),
            "duration_ms": round((end - self.started) * 1000, 3),
            "max_gap_ms": round(self.max_gap * 1000, 3),
        }

    def access_fields(self) -> dict[str, object]:
        return {
            "id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.api(),
            "status": self.status,
            "streamed": self.streamed,
            **self.timings_ms(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "upstream_request_id": self.upstream_request_id,
            "end": self.end_reason,
            **({"error": self.error} if self.error else {}),
        }
