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
