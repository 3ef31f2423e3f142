"""Header policy, one rule for every path (streaming, buffered, error). Pure, no I/O.

Forward every end-to-end header in both directions. Drop only:
- the hop-by-hop headers of RFC 9110 section 7.6.1 (plus the proxy-auth pair, which is meant
  for a proxy, and ``expect``, which the proxy has already answered by reading the body);
- any header named in ``Connection``;
- the proxy's own control headers ``x-trioproxy-*`` (never sent upstream);
- ``host`` and ``content-length`` upstream (set from the configured upstream and actual body);
- ``date`` and ``server`` downstream, which the ASGI server always adds itself.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    headers = list(headers)
    named = connection_tokens(headers) | frozenset(extra)
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in drop or low in named or low.startswith(CONTROL_PREFIX):
            continue
        out.append((low, value))
    return out


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
    """Upstream response headers -> headers sent to the client."""
    return _filter(headers, _RESPONSE_DROP)


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of header ``name`` (lower-case) or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


UPSTREAM_REQUEST_ID_HEADERS = (b"request-id", b"x-request-id", b"anthropic-request-id")


def upstream_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The upstream's own request id (Anthropic ``request-id``, OpenAI ``x-request-id``)."""
    found = {k: v for k, v in headers if k in UPSTREAM_REQUEST_ID_HEADERS}
    for name in UPSTREAM_REQUEST_ID_HEADERS:
        if name in found:
            return found[name].decode("latin-1")
    return None
