"""The usage record of one finalised exchange: what the relay noted, priced, with the client's
key reduced to a fingerprint. Built once, at finalisation; nothing here runs per chunk."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from ..protocol import headers as hdr
from .keys import extract_api_key, fingerprint
from .record import TOKEN_FIELDS, UsageRecord, latency_columns

if TYPE_CHECKING:
    from ..exchange import Exchange

SESSION_HEADERS = (b"x-claude-code-session-id", b"session-id")


def _text(value: bytes | None, limit: int = 512) -> str | None:
    return value.decode("latin-1")[:limit] if value is not None else None


def build_record(ex: Exchange, secret: bytes) -> UsageRecord:
    """The usage record of one finalised exchange."""
    # What the exchange knows, read first (each computed once there); then what is derived.
    usage, timings, latency = ex.usage(), ex.timings_ms(), ex.latency()
    free = ex.api() == "anthropic.count_tokens"  # counting tokens consumes none: cost 0
    known = usage is not None and usage.known and not free
    cost = 0.0 if free else (ex.cost_usd() if known else None)
    headers = ex.request_headers
    key = extract_api_key(headers, ex.provider)  # the credential that provider bills
    key_fp, key_last4 = fingerprint(key, secret) if key else (None, None)
    session = ex.session_id or next(
        (_text(v) for k, v in headers if k in SESSION_HEADERS), None
    )
    complete = bool(usage is not None and usage.complete)
    stop_reason = usage.stop_reason if usage is not None else None
    if ex.route is not None and ex.route.accounted and not complete and ex.status is not None \
            and 200 <= ex.status < 300:
        stop_reason = "incomplete"
    return UsageRecord(
        request_id=ex.request_id,
        correlation_id=ex.correlation_id,
        started_at=ex.started_wall,
        provider=ex.provider,
        api=ex.api(),
        transport=ex.transport,
        method=ex.method,
        path=ex.path,
        status=ex.status,
        streamed=ex.streamed,
        model_requested=ex.model_requested,
        model=usage.model if usage is not None else None,
        response_id=ex.response_id or (usage.response_id if usage is not None else None),
        upstream_request_id=ex.upstream_request_id,
        **_token_fields(usage if known else None),
        raw_usage=usage.raw_usage if usage is not None else None,
        stop_reason=stop_reason,
        end_reason=ex.end_reason,
        error=ex.error or (usage.error if usage is not None else None),
        cost_usd=cost,
        ttfb_ms=timings["ttfb_ms"],
        duration_ms=timings["duration_ms"],
        max_gap_ms=timings["max_gap_ms"],
        bytes_in=ex.bytes_in,
        bytes_out=ex.bytes_out,
        key_fingerprint=key_fp,
        key_last4=key_last4,
        user_agent=_text(hdr.get(headers, b"user-agent")),
        session_id=session,
        extra=_record_extra(ex),
        **latency_columns(latency),
    )


def _token_fields(usage: Any) -> dict[str, int | None]:
    """The record's token counts: all None when the usage is unknown."""
    if usage is None:
        return dict(_NO_TOKENS)
    try:
        return dict(zip(TOKEN_FIELDS, _TOKENS(usage)))
    except AttributeError:  # not a providers.Usage: whatever it has
        return {name: getattr(usage, name, None) for name in TOKEN_FIELDS}


_TOKENS = operator.attrgetter(*TOKEN_FIELDS)
_NO_TOKENS = dict.fromkeys(TOKEN_FIELDS)


def _record_extra(ex: Exchange) -> dict[str, Any] | None:
    extra = {
        "payload_changed_by": ex.payload_changed_by,
        "socket_id": ex.socket_id,
        "response_index": ex.response_index,
        "previous_response_id": ex.previous_response_id,
        "generate": ex.generate,
        "bypass": True if ex.bypass else None,
    }
    return {k: v for k, v in extra.items() if v is not None} or None
