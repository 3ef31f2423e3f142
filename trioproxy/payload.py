"""The request payload stage: decode once, run extension hooks, re-encode only if changed.

If nothing changed the payload, the original request bytes go upstream verbatim. A changed
payload is serialised once, compactly, keeping key order and non-ASCII text; integers keep
their digits and floats their IEEE-754 value. Bodies that are not JSON objects skip the hooks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from . import headers as hdr
from .exchange import Exchange
from .extensions import ExtensionManager, HookContext, MutableHeaders
from .providers.base import loads_object
from .routing import ACCOUNTED_APIS
from .usage_wire import inject_include_usage

log = logging.getLogger("trioproxy.payload")

PAYLOAD_APIS = ACCOUNTED_APIS  # the payload kinds hooks see are the ones usage is parsed for
_TRUE = (b"1", b"true", b"yes", b"on")


def is_bypass(headers: list[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> bool:
    """True when any configured bypass header says so."""
    return any(k in names and v.strip().lower() in _TRUE for k, v in headers)


def decode_payload(body: bytes, content_encoding: bytes | None) -> dict[str, Any] | None:
    """The JSON object in a request body, or None (not JSON, not an object, bad encoding)."""
    if not body:
        return None
    if content_encoding and content_encoding.strip().lower() not in (b"identity", b""):
        from .decoding import decompress

        body = decompress(body, content_encoding.decode("latin-1"))
        if body is None:
            return None
    try:
        return loads_object(body)
    except UnicodeDecodeError:
        return None


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def hook_context(ex: Exchange, payload: dict[str, Any] | None = None) -> HookContext:
    """The context hooks get; without ``payload`` it uses what the exchange noted."""
    if payload is not None:
        model = payload.get("model")
        stream = bool(payload.get("stream"))
    else:
        note_deferred_request(ex)
        model, stream = ex.model_requested, bool(ex.extra.get("stream_requested", ex.streamed))
    return HookContext(
        request_id=ex.request_id,
        api=ex.api(),
        provider=ex.provider,
        transport=ex.transport,
        path=ex.path,
        model=model if isinstance(model, str) else None,
        stream=stream,
        bypass=ex.bypass,
    )


@dataclass(slots=True)
class Outbound:
    body: bytes
    headers: list[tuple[bytes, bytes]]


async def prepare(
    ex: Exchange,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    manager: ExtensionManager | None,
    *,
    include_usage: bool = False,
) -> Outbound:
    """Decode the payload (when anything needs it), run payload hooks, re-encode if changed.

    ``headers`` are the outbound upstream headers (policy already applied). With
    ``include_usage``, a streamed Chat Completions request that did not ask for usage gets
    ``stream_options.include_usage`` injected (and ``ex.extra["strip_usage_chunk"]`` set so
    the relay removes the extra chunk again). Raises ``ExtensionFailed`` when a hook fails
    and the manager is fail-closed.
    """
    api = ex.api()
    if api not in PAYLOAD_APIS:
        return Outbound(body, headers)
    hooks = manager is not None and manager.has_payload_hooks and not ex.bypass
    inject = include_usage and api == "openai.chat" and not ex.bypass
    encoding = hdr.get(headers, b"content-encoding")
    if encoding and not hooks:
        return Outbound(body, headers)  # compressed: decode only when a hook needs it
    if not hooks and not (inject and b'"stream"' in body):
        # Nothing to change: keep the decode off the time-to-first-byte path. The requested
        # model is read from these bytes only if the usage record needs it, after the answer.
        ex.extra["request_body"] = body
        return Outbound(body, headers)
    payload = decode_payload(body, encoding)
    if payload is None:
        return Outbound(body, headers)
    _note_request(ex, payload)
    changed_by: list[str] = []
    out_headers = headers
    if hooks:
        assert manager is not None
        mutable = MutableHeaders(headers)
        result = await manager.run_payload(hook_context(ex, payload), payload, mutable)
        out_headers = headers
        if mutable.changed:  # an extension cannot send hop-by-hop or x-trioproxy-* upstream
            length = hdr.get(headers, b"content-length")
            out_headers = hdr.sanitize_upstream(
                mutable.raw(), int(length) if length is not None else None)
        payload, changed_by = result.payload, result.changed_by
    if inject and inject_include_usage(payload):
        changed_by.append("include_usage")
        ex.extra["strip_usage_chunk"] = True
    if not changed_by:
        return Outbound(body, out_headers)
    new_body = encode_payload(payload)
    _note_request(ex, payload)
    log.info("payload changed by %s (%d -> %d bytes)", ",".join(changed_by),
             len(body), len(new_body))
    ex.extra["payload_changed_by"] = changed_by
    drop = {b"content-length", b"content-encoding"}
    out_headers = [(k, v) for k, v in out_headers if k not in drop]
    out_headers.append((b"content-length", str(len(new_body)).encode()))
    return Outbound(new_body, out_headers)


def note_deferred_request(ex: Exchange) -> None:
    """Fill ``model_requested`` / ``stream_requested`` from a body ``prepare`` did not decode."""
    body = ex.extra.pop("request_body", None)
    if body is not None and ex.model_requested is None:
        payload = decode_payload(body, None)
        if payload is not None:
            _note_request(ex, payload)


def _note_request(ex: Exchange, payload: dict[str, Any]) -> None:
    model = payload.get("model")
    ex.model_requested = model if isinstance(model, str) else None
    ex.extra["stream_requested"] = bool(payload.get("stream"))
