"""``GET /v1/usage/{id}``: a client reads back the usage record of one of its own requests."""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from ..accounting.keys import extract_api_key, fingerprint
from ..accounting.record import UsageRecord
from ..accounting.store import StoreUnavailable
from ..asgi import Send, json_messages, send_all
from ..errors import ClientRequestError, error_body
from ..exchange import Exchange
from ..protocol.lifecycle import End
from ..runtime import Runtime
from .access import admin_presented

log = logging.getLogger("trioproxy.accounting")

USAGE_PATH = b"/v1/usage/"


def usage_request_id(path: bytes) -> str | None:
    """The id in ``/v1/usage/{id}``, or None for other paths."""
    if path.startswith(USAGE_PATH) and len(path) > len(USAGE_PATH):
        return path[len(USAGE_PATH):].decode("latin-1")
    return None


async def answer_usage_lookup(runtime: Runtime, ex: Exchange, lookup_id: str, send: Send) -> None:
    """Answer ``GET /v1/usage/{lookup_id}`` for the caller's key (every key's: the admin)."""
    # A client that fetches usage the moment its stream ended can be a few milliseconds
    # ahead of finalisation: wait (bounded) for that exchange's record to exist. Only for
    # the caller's own exchanges: another key's stream that reuses the id is none of its
    # business (and must not hold its lookup for as long as that stream runs).
    key = extract_api_key(ex.request_headers, ex.provider)
    admin = admin_presented(ex.request_headers, runtime.settings.admin_token)
    for other in list(runtime.inflight.values()):
        same_id = lookup_id in (other.request_id, other.correlation_id, other.upstream_request_id)
        mine = admin or (
            key is not None and extract_api_key(other.request_headers, other.provider) == key)
        if other is not ex and same_id and mine:
            with trio.move_on_after(10):
                await other.finalised.wait()
    status, body = await usage_lookup(
        lookup_id, ex.request_headers, runtime.writer, runtime.secret,
        runtime.settings.admin_token, ex.provider,
    )
    if status != 200:
        ex.fail(End.REJECTED, f"usage lookup answered {status}")
    await send_all(send, ex, json_messages(ex, status, body))


async def usage_lookup(
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
    admin = admin_presented(headers, admin_token)
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


def _may_read(record: UsageRecord, key_fp: str | None, admin: bool) -> bool:
    return admin or (key_fp is not None and record.key_fingerprint == key_fp)
