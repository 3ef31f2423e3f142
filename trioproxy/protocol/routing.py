"""Pure routing: (method, raw path, headers) -> Route, or one of the proxy's own paths. No I/O.

The upstream host always comes from configuration; the request only chooses the provider and
the path that is appended to that provider's configured base URL.

Dot-segments (``.``, ``..``, also percent-encoded as ``%2e``) are removed before routing
(RFC 3986 section 5.2.4), so the route is chosen on, and the upstream receives, the path the
request names. A path whose ``..`` would climb out of its route (``/anthropic/../x``, or above the
upstream base URL's own path) is refused, and so is a dot-segment that only some servers see
as one (joined by ``%2f``, ``%5c``, ``\\`` or ``;``): what it reaches depends on the upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import ClientRequestError

Provider = Literal["anthropic", "openai"]

ANTHROPIC_PREFIX = b"/anthropic"
OPENAI_PREFIX = b"/openai"
OWN_PREFIX = b"/_trioproxy/"  # the proxy's own pages: never an upstream path
METRICS_PATH = b"/metrics"
HEALTH_PATH = b"/health"  # what benchmark clients probe (vLLM's convention)


def is_own_path(path: bytes) -> bool:
    """The path is one of the proxy's own endpoints, answered here and never forwarded."""
    return (path in (METRICS_PATH, HEALTH_PATH) or path.startswith(OWN_PREFIX)
            or path == OWN_PREFIX.rstrip(b"/"))


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    api: str  # "anthropic.messages", "openai.chat", ... or "<provider>.other"
    path: bytes  # raw path sent upstream (after the base URL's prefix), percent-encoding intact

    @property
    def accounted(self) -> bool:
        """Whether this API produces billable usage worth parsing."""
        return self.api in ACCOUNTED_APIS


ACCOUNTED_APIS = frozenset(
    {"anthropic.messages", "anthropic.count_tokens", "openai.chat", "openai.responses"}
)


# What some server along the way may read as a segment separator: "/", an encoded slash, a
# backslash (Windows servers, WHATWG URL parsers) or an encoded backslash.
_ANY_SEPARATOR = re.compile(rb"/|\\|%2[fF]|%5[cC]")


def _dot_kind(segment: bytes) -> int:
    """1 for ``.``, 2 for ``..`` (either dot may be written ``%2e``), else 0."""
    plain = segment.replace(b"%2e", b".").replace(b"%2E", b".")
    return len(plain) if plain in (b".", b"..") else 0


def _loose_dot_segments(path: bytes) -> int:
    """Dot-segments as the most lenient server reads them (any separator, ``;params`` cut)."""
    return sum(1 for seg in _ANY_SEPARATOR.split(path) if _dot_kind(seg.split(b";", 1)[0]))


def remove_dot_segments(path: bytes, route: str = "the upstream base path") -> bytes:
    """``path`` (starting with "/") without dot-segments; percent-encoding and the rest intact.

    Raises ClientRequestError (400) when a ``..`` would climb above ``path``'s root (``route``
    names that root in the message), or when a dot-segment is joined by anything but "/"."""
    if b"." not in path and b"%2" not in path:
        return path  # the common case: no dot, plain or encoded (%2e), anywhere
    loose = _loose_dot_segments(path)
    if not loose:
        return path
    segments = path.split(b"/")[1:]
    if loose != sum(1 for seg in segments if _dot_kind(seg)):
        raise ClientRequestError(
            "the request path has a dot-segment joined by an encoded slash, a backslash or ';' "
            "(such as '..%2f'); servers disagree on where it leads, so it is refused",
            400, "invalid_path",
        )
    out: list[bytes] = []
    for i, seg in enumerate(segments):
        kind = _dot_kind(seg)
        if kind == 2:
            if not out:
                raise ClientRequestError(
                    f"the request path's '..' segments climb out of {route}", 400, "invalid_path"
                )
            out.pop()
        elif kind == 0:
            out.append(seg)
        if kind and i == len(segments) - 1:
            out.append(b"")  # "/a/b/.." is "/a/": the trailing slash stays
    return b"/" + b"/".join(out)


def _strip_prefix(path: bytes, prefix: bytes) -> bytes | None:
    if path == prefix:
        return b"/"
    if path.startswith(prefix + b"/"):
        return path[len(prefix) :]
    return None


def api_kind(provider: Provider, method: str, path: bytes) -> str:
    """Classify an upstream path into an API kind."""
    p = path.rstrip(b"/")
    if provider == "anthropic":
        if p == b"/v1/messages":
            return "anthropic.messages" if method == "POST" else "anthropic.other"
        if p == b"/v1/messages/count_tokens":
            return "anthropic.count_tokens"
        if p.startswith(b"/v1/messages/batches"):
            return "anthropic.batches"
        return "anthropic.other"
    if p == b"/v1/chat/completions" and method == "POST":
        return "openai.chat"
    if p == b"/v1/responses" and method == "POST":
        return "openai.responses"
    if p == b"/v1/responses" or p.startswith(b"/v1/responses/"):
        return "openai.responses.other"
    return "openai.other"


def _known_provider(path: bytes) -> Provider | None:
    p = path.rstrip(b"/")
    if p == b"/v1/messages" or p.startswith(b"/v1/messages/"):
        return "anthropic"
    if p == b"/v1/chat/completions" or p == b"/v1/responses" or p.startswith(b"/v1/responses/"):
        return "openai"
    return None


def provider_from_auth(headers: list[tuple[bytes, bytes]]) -> Provider | None:
    """Guess the provider from the client's auth style (for ambiguous paths)."""
    bearer = False
    for name, value in headers:
        if name in (b"x-api-key", b"anthropic-version"):
            return "anthropic"
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = True
    return "openai" if bearer else None


def resolve(method: str, path: bytes, headers: list[tuple[bytes, bytes]]) -> Route | None:
    """Map a client request onto an upstream route, or None (404).

    Raises ClientRequestError (400) for a path that dot-segments would take out of its route."""
    for prefix, provider in ((ANTHROPIC_PREFIX, "anthropic"), (OPENAI_PREFIX, "openai")):
        rest = _strip_prefix(path, prefix)
        if rest is not None:
            rest = remove_dot_segments(rest, f"the {prefix.decode()} route")
            return Route(provider, api_kind(provider, method, rest), rest)  # type: ignore[arg-type]
    if not path.startswith(b"/"):
        return None  # "*" or an absolute-form target: nothing to route
    clean = remove_dot_segments(path)
    if clean != path:  # e.g. "/./anthropic/v1/messages": route what it names (no dots remain)
        return resolve(method, clean, headers)
    provider = _known_provider(path)
    if provider is None and path.startswith(b"/v1/"):
        provider = provider_from_auth(headers)
    if provider is None:
        return None
    return Route(provider, api_kind(provider, method, path), path)


def provider_hint(path: bytes, headers: list[tuple[bytes, bytes]]) -> Provider:
    """The provider whose error format a (possibly unroutable) request should get."""
    if path.startswith(ANTHROPIC_PREFIX):
        return "anthropic"
    if path.startswith(OPENAI_PREFIX):
        return "openai"
    return _known_provider(path) or provider_from_auth(headers) or "openai"
