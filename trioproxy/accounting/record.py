"""The usage record: one per proxied request (or per WebSocket response).

Token fields are normalised across providers: ``input_tokens`` is the TOTAL input including
cache reads and cache writes (Anthropic reports those separately; they are added up), and
``output_tokens`` includes reasoning tokens. ``raw_usage`` keeps the provider's own usage object
with its own field names. ``cost_usd`` is None when the price is unknown, never 0.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COLUMNS", "LATENCY_FIELDS", "TOKEN_FIELDS", "UsageRecord", "latency_columns"]

TOKEN_FIELDS = (
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "audio_input_tokens", "audio_output_tokens",
    "accepted_prediction_tokens", "rejected_prediction_tokens",
)
# record field -> trioproxy.protocol.latency.Latency attribute (``duration_ms`` is the exchange's own
# duration, to finalisation; the latency's end-to-end time is ``e2e_ms``)
LATENCY_FIELDS: dict[str, str] = {
    "ttft_ms": "ttft_ms", "itl_p50_ms": "itl_p50_ms", "itl_p90_ms": "itl_p90_ms",
    "itl_p99_ms": "itl_p99_ms", "itl_max_ms": "itl_max_ms", "itl_count": "itl_count",
    "tpot_ms": "tpot_ms", "tokens_per_s": "tokens_per_s", "e2e_ms": "duration_ms",
    "upstream_head_ms": "upstream_head_ms", "proxy_request_ms": "proxy_request_ms",
    "proxy_relay_ms": "proxy_relay_ms", "proxy_relay_max_ms": "proxy_relay_max_ms",
    "proxy_overhead_ms": "proxy_overhead_ms", "content_events": "content_events",
    "last_token_ms": "last_token_ms", "itl_sketch": "itl_sketch",
}
_JSON_FIELDS = frozenset({"raw_usage", "extra"})


@dataclass(slots=True)
class UsageRecord:
    """What one proxied request (or one WebSocket response) did and used."""

    request_id: str  # the proxy's own unique id (the primary key)
    started_at: float  # unix time
    provider: str | None = None  # "anthropic" / "openai"
    api: str | None = None  # "anthropic.messages", "openai.chat", "openai.responses", ...
    transport: str | None = None  # "http" / "websocket"
    method: str | None = None
    path: str | None = None  # route path, no query
    status: int | None = None
    streamed: bool | None = None
    model_requested: str | None = None
    model: str | None = None  # as answered by the upstream
    response_id: str | None = None  # msg_… / chatcmpl-… / resp_…
    upstream_request_id: str | None = None  # upstream request-id / x-request-id header
    correlation_id: str | None = None  # an adopted inbound id (e.g. a gateway's log id)
    input_tokens: int | None = None  # TOTAL input, incl. cache read + cache write
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    audio_input_tokens: int | None = None
    audio_output_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    raw_usage: dict[str, Any] | None = None  # the provider's own usage object
    stop_reason: str | None = None  # "end_turn", "stop", "completed", ..., "incomplete"
    end_reason: str | None = None  # "complete", "client_disconnect", "upstream_error", ...
    error: str | None = None
    cost_usd: float | None = None  # None when the price is unknown
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    max_gap_ms: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    key_fingerprint: str | None = None  # keyed hash of the API key, never the key
    key_last4: str | None = None
    user_agent: str | None = None
    session_id: str | None = None
    extra: dict[str, Any] | None = None
    # latency (see trioproxy.protocol.latency; all None when the request was never relayed upstream)
    ttft_ms: float | None = None  # first content event (text / tool-call / reasoning delta)
    itl_p50_ms: float | None = None  # gaps between content events
    itl_p90_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_max_ms: float | None = None
    itl_count: int | None = None  # number of gaps
    tpot_ms: float | None = None  # (last - first content event) / (output tokens - 1)
    tokens_per_s: float | None = None  # (output tokens - 1) / (e2e - TTFT)
    e2e_ms: float | None = None  # request received -> last byte of the response
    upstream_head_ms: float | None = None  # request written upstream -> response head
    proxy_request_ms: float | None = None  # request received -> written upstream
    proxy_relay_ms: float | None = None  # mean delay of a chunk through the proxy
    proxy_relay_max_ms: float | None = None
    proxy_overhead_ms: float | None = None  # proxy_request_ms + proxy_relay_ms
    content_events: int | None = None
    last_token_ms: float | None = None  # request received -> last content event
    itl_sketch: str | None = None  # every gap, as trioproxy.protocol.gapsketch.GapSketch text

    def to_row(self) -> tuple[Any, ...]:
        """Values in :data:`COLUMNS` order, ready for a parameterised INSERT: text without NUL
        (PostgreSQL TEXT cannot hold it), the JSON fields encoded."""
        values = _ALL(self)
        row = [v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in values]
        for i in _JSON_AT:
            row[i] = None if values[i] is None else _json(values[i])
        return tuple(row)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> UsageRecord:
        """The inverse of :meth:`to_row` (a row selected in :data:`COLUMNS` order)."""
        values = {name: _from_column(name, value) for name, value in zip(COLUMNS, row, strict=True)}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (the spill file format)."""
        return {name: getattr(self, name) for name in COLUMNS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageRecord:
        """A record from :meth:`to_dict` output; unknown keys are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _FIELD_SET})

    def matches(self, id_any: str) -> bool:
        """True when ``id_any`` is this record's proxy, correlation, upstream or response id."""
        return id_any in (
            self.request_id, self.correlation_id, self.upstream_request_id, self.response_id
        )

    def sanitised(self) -> UsageRecord:
        """A copy any store accepts: text without NUL or lone surrogates, integers that fit a
        BIGINT (else None), JSON fields that encode (else their ``repr``). For a record the
        store refused: client-supplied strings (``model``, ``session_id``...) can hold anything.
        """
        values = {name: _sane(name, getattr(self, name)) for name in COLUMNS}
        values["request_id"] = values["request_id"] or "?"
        values["started_at"] = _sane_float(self.started_at) or 0.0
        return UsageRecord(**values)

    def to_public_json(self) -> dict[str, Any]:
        """The body of ``GET /v1/usage/{id}``. Never contains the key or its fingerprint."""
        return {
            "object": "trioproxy.usage",
            "id": self.request_id,
            "upstream_request_id": self.upstream_request_id,
            "correlation_id": self.correlation_id,
            "response_id": self.response_id,
            "created_at": self.started_at,
            "provider": self.provider,
            "api": self.api,
            "transport": self.transport,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "model_requested": self.model_requested,
            "status": self.status,
            "streamed": self.streamed,
            "stop_reason": self.stop_reason,
            "end_reason": self.end_reason,
            "error": self.error,
            "timings": {
                "ttfb_ms": self.ttfb_ms,
                "duration_ms": self.duration_ms,
                "max_gap_ms": self.max_gap_ms,
            },
            "latency": {name: getattr(self, name) for name in LATENCY_FIELDS},
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "cost_usd": self.cost_usd,
            "usage": self.raw_usage,
            "totals": {name: getattr(self, name) for name in TOKEN_FIELDS},
            "session_id": self.session_id,
        }


COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageRecord))


_ALL = operator.attrgetter(*COLUMNS)
_JSON_AT = tuple(i for i, name in enumerate(COLUMNS) if name in _JSON_FIELDS)
_json = json.JSONEncoder(separators=(",", ":"), default=str).encode  # built once, not per call


def latency_columns(latency: Any) -> dict[str, Any]:
    """The record's latency fields from a :class:`trioproxy.protocol.latency.Latency` (or None)."""
    if latency is None:
        return dict(_NO_LATENCY)
    try:
        return dict(zip(LATENCY_FIELDS, _LATENCY(latency)))
    except AttributeError:  # not a Latency: whatever it has
        return {name: getattr(latency, attr, None) for name, attr in LATENCY_FIELDS.items()}


_LATENCY = operator.attrgetter(*LATENCY_FIELDS.values())
_NO_LATENCY = dict.fromkeys(LATENCY_FIELDS)
_FIELD_SET = frozenset(COLUMNS)


_BIGINT = 2**63


def _sane(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON_FIELDS:
        try:
            return json.loads(json.dumps(value, default=str, skipkeys=True))
        except (TypeError, ValueError, RecursionError):
            return {"unparsed": _sane_text(repr(value))[:4096]}
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_BIGINT <= value < _BIGINT else None
    if isinstance(value, float):
        return _sane_float(value)
    if isinstance(value, str):
        return _sane_text(value)
    return _sane_text(str(value))  # a wrong type from an extension: keep it readable


def _sane_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _sane_text(text: str) -> str:
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _from_column(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON_FIELDS:
        try:
            return json.loads(value)
        except (TypeError, ValueError):
            return {"unparsed": str(value)}
    if name == "streamed":
        return bool(value)
    return value
