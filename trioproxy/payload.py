"""The request payload stage: decode once, run extension hooks, re-encode only if changed.

If nothing changed the payload, the original request bytes go upstream verbatim. A changed
payload is serialised once, compactly, keeping key order and non-ASCII text; integers keep
their digits and floats their IEEE-754 value. Bodies that are not JSON objects skip the hooks.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from .exchange import Exchange
from .extensions import ExtensionManager, MutableHeaders
from .protocol import headers as hdr
from .protocol.decoding import loads_object
from .protocol.routing import ACCOUNTED_APIS
from .protocol.usage_wire import inject_include_usage

log = logging.getLogger("trioproxy.payload")

PAYLOAD_APIS = ACCOUNTED_APIS  # the payload kinds hooks see are the ones usage is parsed for
MODEL_SCAN_BYTES = 64 * 1024  # how much of a body is read to find its top-level "model"
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def decode_payload(body: bytes, content_encoding: bytes | None) -> dict[str, Any] | None:
    """The JSON object in a request body, or None (not JSON, not an object, bad encoding)."""
    if not body:
        return None
    if content_encoding and content_encoding.strip().lower() not in (b"identity", b""):
        from .protocol.decoding import decompress

        body = decompress(body, content_encoding.decode("latin-1"))
        if body is None:
            return None
    try:
        return loads_object(body)
    except UnicodeDecodeError:
        return None


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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
    ``stream_options.include_usage`` injected (and ``ex.strip_usage_chunk`` set so the relay
    removes the extra chunk again). Raises ``ExtensionFailed`` when a hook fails
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
    # b'"stream"' narrows which bodies are decoded; a \u escape could spell the key itself.
    if not hooks and not (inject and (b'"stream"' in body or b"\\u" in body)):
        # Nothing to change: no decode of the whole body on the time-to-first-byte path.
        ex.model_requested = requested_model(body)
        return Outbound(body, headers)
    payload = decode_payload(body, encoding)
    if payload is None:
        return Outbound(body, headers)
    _note_request(ex, payload)
    changed_by: list[str] = []
    out_headers = headers
    if hooks:
        assert manager is not None
        payload, changed_by, out_headers = await _run_hooks(ex, manager, payload, headers)
    if inject and inject_include_usage(payload):
        changed_by.append("include_usage")
        ex.strip_usage_chunk = True
    if not changed_by:
        return Outbound(body, out_headers)
    new_body = encode_payload(payload)
    _note_request(ex, payload)
    log.info("payload changed by %s (%d -> %d bytes)", ",".join(changed_by),
             len(body), len(new_body))
    ex.payload_changed_by = changed_by
    return Outbound(new_body, _rewritten(out_headers, len(new_body), ex.strip_usage_chunk))


def _rewritten(headers: list[tuple[bytes, bytes]], length: int,
               plain_answer: bool) -> list[tuple[bytes, bytes]]:
    """Headers for a re-encoded body (sent uncompressed). ``plain_answer``: ask for an
    uncompressed answer too -- an injected usage chunk can only be removed from plain text."""
    drop = {b"content-length", b"content-encoding"}
    if plain_answer:
        drop.add(b"accept-encoding")
    out = [(k, v) for k, v in headers if k not in drop]
    out.append((b"content-length", str(length).encode()))
    if plain_answer:
        out.append((b"accept-encoding", b"identity"))
    return out


async def _run_hooks(
    ex: Exchange, manager: ExtensionManager, payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
) -> tuple[dict[str, Any], list[str], list[tuple[bytes, bytes]]]:
    """(payload, names of the hooks that changed it, outbound headers) after the hooks ran."""
    mutable = MutableHeaders(headers)
    result = await manager.run_payload(ex.hook_context(payload), payload, mutable)
    out_headers = headers
    if mutable.changed:  # an extension cannot send hop-by-hop or x-trioproxy-* upstream
        length = hdr.get(headers, b"content-length")
        out_headers = hdr.sanitize_upstream(
            mutable.raw(), int(length) if length is not None else None)
    return result.payload, list(result.changed_by), out_headers


def requested_model(body: bytes, budget: int = MODEL_SCAN_BYTES) -> str | None:
    """The top-level ``"model"`` of a JSON object body without decoding the whole body.

    The object's keys are read in order; each value before ``"model"`` is skipped by decoding
    it, within the first ``budget`` bytes. Agents put ``model`` first, so this reads a few
    dozen bytes of a multi-megabyte context. None when it is not found within the budget."""
    text = body[:budget].decode("utf-8", "ignore")
    try:
        i = _WS.match(text).end()  # type: ignore[union-attr]
        if text[i:i + 1] != "{":
            return None
        i += 1
        while True:
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != '"':
                return None
            key, i = scanstring(text, i + 1)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != ":":
                return None
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            value, i = _DECODER.raw_decode(text, i)
            if key == "model":
                return value if isinstance(value, str) else None
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i:i + 1] != ",":
                return None
            i += 1
    except ValueError:  # malformed, or the value runs past the budget
        return None


def _note_request(ex: Exchange, payload: dict[str, Any]) -> None:
    model = payload.get("model")
    ex.model_requested = model if isinstance(model, str) else None
    ex.stream_requested = bool(payload.get("stream"))
