"""Accounting glue: Exchange -> UsageRecord at finalisation, and ``GET /v1/usage/{id}``.

The relay fills an :class:`~trioproxy.exchange.Exchange` as bytes move; nothing here runs per
chunk. At finalisation (exactly once, shielded) the record is built, priced and handed to the
store writer, which never blocks the event loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import operator
from typing import Any

import trio

from .accounting.keys import extract_api_key, fingerprint, load_or_create_secret
from .accounting.locations import open_store, resolve_database_url, secret_path_for, spill_path_for
from .accounting.record import TOKEN_FIELDS, UsageRecord, latency_columns
from .accounting.redact import redact_dsn
from .accounting.store import StoreUnavailable
from .accounting.writer import UsageWriter, open_usage_writer
from .config import Settings
from .errors import ClientRequestError, error_body
from .exchange import Exchange
from .protocol import headers as hdr

log = logging.getLogger("trioproxy.accounting")

SESSION_HEADERS = (b"x-claude-code-session-id", b"session-id")
USAGE_PATH = b"/v1/usage/"
# The writer waits this long after a record for others to commit with it: under load one
# wake-up and one transaction per batch (the writer thread shares the GIL with the event
# loop); a record waiting in memory is still answered by GET /v1/usage/{id}.
WRITE_LINGER = 0.05


def _text(value: bytes | None, limit: int = 512) -> str | None:
    return value.decode("latin-1")[:limit] if value is not None else None


def build_record(ex: Exchange, secret: bytes) -> UsageRecord:
    """The usage record of one finished exchange."""
    usage = ex.usage()
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
    timings = ex.timings_ms()
    free = ex.api() == "anthropic.count_tokens"  # counting tokens consumes none: cost 0
    known = usage is not None and usage.known and not free
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
        cost_usd=0.0 if free else (ex.cost_usd() if known else None),
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
        **latency_columns(ex.latency()),
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


async def open_ledger(
    settings: Settings, *, task_status: trio.TaskStatus[tuple[UsageWriter, bytes]]
) -> None:
    """Run the usage store writer until cancelled; report ``(writer, secret)`` when ready.

    The store is opened (and migrated) lazily in the writer thread, so a database that is
    down at start-up does not stop the proxy: records wait in memory and are retried.
    """
    home = settings.data_home
    url = resolve_database_url(settings.database_url, home)
    secret = await trio.to_thread.run_sync(
        load_or_create_secret, secret_path_for(url, home), settings.fingerprint_secret)
    try:  # migrations at start-up; a store that is down is retried by the writer instead
        await trio.to_thread.run_sync(_migrate, url, settings.store_timeout)
    except Exception as exc:  # noqa: BLE001 - any store failure: keep proxying
        log.warning("usage store not migrated at start-up (%s: %s); the writer will retry",
                    type(exc).__name__, _safe_error(exc, url))
    async with open_usage_writer(
        lambda: open_store(url, data_home=home, timeout=settings.store_timeout),
        spill_path=spill_path_for(url, home), shutdown_timeout=10.0,
        max_pending=settings.usage_max_pending, lookup_timeout=settings.usage_lookup_timeout,
        linger=WRITE_LINGER, spill_after=settings.usage_spill_after,
    ) as writer:
        log.info("usage ledger: %s", _safe_url(url))
        task_status.started((writer, secret))
        await trio.sleep_forever()


def _migrate(url: str, timeout: float) -> None:
    store = open_store(url, timeout=timeout)
    try:
        store.migrate()
    finally:
        store.close()


def _safe_error(exc: Exception, url: str) -> str:
    """An error's text without the database URL's credentials."""
    return redact_dsn(str(exc).replace(url, redact_dsn(url)))


def _safe_url(url: str) -> str:
    """A database URL without its credentials, for logs (every form libpq accepts)."""
    return redact_dsn(url)


def usage_request_id(path: bytes) -> str | None:
    """The id in ``/v1/usage/{id}``, or None for other paths."""
    if path.startswith(USAGE_PATH) and len(path) > len(USAGE_PATH):
        return path[len(USAGE_PATH):].decode("latin-1")
    return None


async def answer_usage_lookup(
    lookup_id: str, headers: list[tuple[bytes, bytes]], writer: Any, secret: bytes,
    admin_token: str | None, provider: str,
) -> tuple[int, bytes]:
    """(status, JSON body) for ``GET /v1/usage/{id}``.

    ``lookup_id`` may be the proxy's request id, the correlation id (an adopted inbound id),
    the upstream request id or the response id. Only the caller's own records count (same key
    fingerprint; the admin token sees every key's), so another key's record with the same
    correlation id never hides the caller's. If several of the caller's records match (a client
    reusing its own id), the newest is answered. 404 when none matches; 503 in the provider's
    shape when the store cannot be read now (one log line, no traceback).
    """
    not_found = ClientRequestError(f"no usage record {lookup_id!r} for this key", 404, "not_found")
    admin = _is_admin(headers, admin_token)
    key = extract_api_key(headers, provider)
    if writer is None or (not admin and key is None):
        return 404, error_body(provider, 404, not_found.message, not_found.code)
    key_fp = None if admin else fingerprint(key, secret)[0]
    try:
        records = await writer.lookup(lookup_id, key_fingerprint=key_fp)
    except StoreUnavailable as exc:
        records = exc.pending
        if not any(_may_read(r, key_fp, admin) for r in records):
            log.warning("usage lookup %r: usage store unavailable (%s); answered 503",
                        lookup_id, exc)
            return 503, error_body(provider, 503, "the usage store is unavailable; retry later",
                                   "store_unavailable")
    mine = [r for r in records if _may_read(r, key_fp, admin)]
    if not mine:
        return 404, error_body(provider, 404, not_found.message, not_found.code)
    record = max(mine, key=lambda r: r.started_at)
    return 200, json.dumps(record.to_public_json(), separators=(",", ":")).encode()


def _is_admin(headers: list[tuple[bytes, bytes]], admin_token: str | None) -> bool:
    return bool(admin_token) and any(
        name == b"x-trioproxy-admin-token" and hmac.compare_digest(value, admin_token.encode())
        for name, value in headers
    )


def _may_read(record: UsageRecord, key_fp: str | None, admin: bool) -> bool:
    return admin or (key_fp is not None and record.key_fingerprint == key_fp)
