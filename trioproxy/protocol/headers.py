"""Header policy, one rule for every path (streaming, buffered, error). Pure, no I/O.

Forward every end-to-end header in both directions. Drop only:
- the hop-by-hop headers of RFC 9110 section 7.6.1 (plus the proxy-auth pair, which is meant
  for a proxy, and ``expect``, which the proxy has already answered by reading the body);
- any header named in ``Connection``;
- the proxy's own control headers ``x-trioproxy-*`` (never sent upstream, and an upstream's
  never reach the client);
- ``host`` and ``content-length`` upstream (set from the configured upstream and actual body);
- ``date`` and ``server`` downstream, which the ASGI server always adds itself;
- downstream, the usage headers the proxy writes itself (``x-usage-*``, ``x-request-model``):
  an upstream's (another proxy's, or a forged count) never reach the client, so the proxy's
  are the only ones, whether or not it adds its own to this response;
- downstream, ``Server-Timing`` entries named like the proxy's own metrics (``upstream``,
  ``ttft``, ``itl``, ``tpot``, ``proxy``, ``total``); the upstream's other entries are kept,
  in one field, that the proxy's entries are merged into (:func:`merge_server_timing`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ClientRequestError

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
CONTROL_PREFIX = b"x-trioproxy-"
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any ``Connection`` header (lower-cased)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def _filter(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes], extra: Iterable[bytes] = ()
) -> Headers:
    headers = headers if isinstance(headers, list) else list(headers)
    skip = drop | connection_tokens(headers) | frozenset(extra)  # one pass finds Connection
    return [(low, value) for name, value in headers
            if (low := name.lower()) not in skip and not low.startswith(CONTROL_PREFIX)]


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]], host: bytes, body_length: int | None,
    drop: Iterable[bytes] = (),
) -> Headers:
    """Client request headers -> headers sent upstream (``Host`` set to the upstream's).

    ``drop`` names extra headers to withhold (the configured bypass header names)."""
    out = [(b"host", host)]
    out.extend(_filter(headers, _REQUEST_DROP, drop))
    if body_length is not None:
        out.append((b"content-length", str(body_length).encode()))
    return out


def sanitize_upstream(headers: Iterable[tuple[bytes, bytes]], body_length: int | None) -> Headers:
    """Re-apply the upstream policy to headers an extension changed (``host`` kept as set)."""
    headers = list(headers)
    host = get(headers, b"host")
    out = upstream_request_headers(headers, host or b"", body_length)
    return out if host else out[1:]


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Upstream response headers -> headers sent to the client: no usage header of the
    upstream's, its ``Server-Timing`` in one field without the proxy's metric names."""
    out = _filter(headers, _RESPONSE_DROP)
    if not any(k.startswith(_USAGE_PREFIX) or k in _OWN_RESPONSE for k, _ in out):
        return out  # the common case: one pass, nothing to remove
    timing = [v for k, v in out if k == SERVER_TIMING]
    out = [(k, v) for k, v in out
           if not k.startswith(_USAGE_PREFIX) and k not in _OWN_RESPONSE]
    entries = [e for v in timing for e in server_timing_entries(v)
               if timing_name(e) not in PROXY_TIMING_NAMES]
    if entries:
        out.append((SERVER_TIMING, b", ".join(entries)))
    return out


# -- Server-Timing (W3C): the proxy's metric names are its own --------------------------------

SERVER_TIMING = b"server-timing"
PROXY_TIMING_NAMES = frozenset({b"upstream", b"ttft", b"itl", b"tpot", b"proxy", b"total"})
_USAGE_PREFIX = b"x-usage-"
_OWN_RESPONSE = frozenset({b"x-request-model", SERVER_TIMING})
_TIMING_SPECIAL = re.compile(rb'[,"\\]')


def server_timing_entries(value: bytes) -> list[bytes]:
    """The comma-separated entries of a ``Server-Timing`` value (a comma inside a quoted
    ``desc`` does not split), stripped, empty ones left out. Linear time."""
    if b'"' not in value:
        parts = value.split(b",")
    else:
        parts, start, quoted, skip = [], 0, False, -1
        for m in _TIMING_SPECIAL.finditer(value):
            i = m.start()
            if i == skip:
                continue  # the byte a backslash escapes
            c = value[i]
            if c == 0x22:  # "
                quoted = not quoted
            elif c == 0x5C:  # backslash
                skip = i + 1 if quoted else -1
            elif not quoted:
                parts.append(value[start:i])
                start = i + 1
        parts.append(value[start:])
    return [e for p in parts if (e := p.strip(b" \t"))]


def timing_name(entry: bytes) -> bytes:
    """An entry's metric name (lower-cased: compared case-insensitively)."""
    return entry.split(b";", 1)[0].strip(b" \t").lower()


def merge_server_timing(headers: Headers, value: bytes) -> None:
    """Add the proxy's ``Server-Timing`` entries (``value``) to ``headers`` in place: into
    the field already there (the upstream's other entries first), else as a new field."""
    if not value:
        return
    for i, (name, old) in enumerate(headers):
        if name == SERVER_TIMING:
            headers[i] = (name, old + b", " + value)
            return
    headers.append((SERVER_TIMING, value))


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of header ``name`` (lower-case) or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def check_one_credential(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Raise ClientRequestError (400) when a request carries more than one credential: two
    ``authorization`` or two ``x-api-key`` fields, or an ``x-api-key`` beside a bearer token.
    Which key would pay is then the upstream's choice, and the ledger could bill another one.
    Headers named in ``Connection`` do not count (they are never forwarded). The message names
    the headers, never their values."""
    headers = headers if isinstance(headers, list) else list(headers)
    authorization = api_keys = bearer = 0
    for name, value in headers:
        if name == b"authorization":
            authorization += 1
            bearer += value.strip().partition(b" ")[0].lower() == b"bearer"
        elif name == b"x-api-key":
            api_keys += 1
    if authorization + api_keys < 2:
        return  # the common case: no Connection header to look at
    hop = connection_tokens(headers)
    if b"authorization" in hop:
        authorization = bearer = 0
    if b"x-api-key" in hop:
        api_keys = 0
    if authorization > 1 or api_keys > 1 or (api_keys and bearer):
        raise ClientRequestError(
            "the request carries more than one credential (authorization: "
            f"{authorization}, x-api-key: {api_keys}); send exactly one", 400,
            "invalid_request",
        )


UPSTREAM_REQUEST_ID_HEADERS = (b"request-id", b"x-request-id", b"anthropic-request-id")


def upstream_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The upstream's own request id (Anthropic ``request-id``, OpenAI ``x-request-id``)."""
    found = {k: v for k, v in headers if k in UPSTREAM_REQUEST_ID_HEADERS}
    for name in UPSTREAM_REQUEST_ID_HEADERS:
        if name in found:
            return found[name].decode("latin-1")
    return None


# -- request-head size: the same answer however TCP segmented the head -----------------------
#
# Hypercorn's h11 checks ``h11_max_incomplete_size`` only while a head is still incomplete, so a
# head that arrives in one read passes at any size up to Hypercorn's 64 KiB read, and the same
# head in 4 KiB writes gets a bare 431. Measured on the complete head, as below, the limit does
# not depend on segmentation. Keep it at or below Hypercorn's limit: Hypercorn's default (16 KiB)
# equals MAX_HEAD_BYTES, and ``hypercorn_head_limit`` gives the value a server should set so
# that only heads far beyond ours meet Hypercorn's body-less 431 first.

MAX_HEAD_BYTES = 16 * 1024  # Hypercorn's default h11_max_incomplete_size
HYPERCORN_HEAD_MARGIN = 64 * 1024  # Hypercorn reads at most 64 KiB per receive


def request_head_size(scope: Mapping[str, Any]) -> int:
    """Bytes of the request head written as HTTP/1.1 (request line, ``name: value`` lines, blank
    line), from the ASGI scope: whitespace a client added around values is not counted."""
    target = len(scope.get("raw_path") or scope["path"].encode())
    query = scope.get("query_string", b"")
    if query:
        target += 1 + len(query)
    request_line = len(scope["method"]) + 1 + target + len(b" HTTP/1.1\r\n")
    return request_line + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + 2


def check_head_size(scope: Mapping[str, Any], limit: int = MAX_HEAD_BYTES) -> None:
    """Raise ClientRequestError (431) when the request head is over ``limit`` bytes."""
    size = request_head_size(scope)
    if size > limit:
        raise ClientRequestError(
            f"request head is {size} bytes, over the {limit} byte limit (request line and "
            "headers)", 431, "request_header_fields_too_large",
        )


def hypercorn_head_limit(max_head_bytes: int) -> int:
    """The ``h11_max_incomplete_size`` a server should run with for ``max_head_bytes``.

    At least ``max_head_bytes`` (else h11 refuses, depending on segmentation, heads the app
    accepts), plus a margin: heads between the two get the provider-shaped 431 in any
    segmentation; h11 still caps what one connection can make the server buffer."""
    return max_head_bytes + HYPERCORN_HEAD_MARGIN


_TRUE = (b"1", b"true", b"yes", b"on")


def is_bypass(headers: Headers, names: tuple[bytes, ...]) -> bool:
    """True when any configured bypass header says so."""
    return any(k in names and v.strip().lower() in _TRUE for k, v in headers)
