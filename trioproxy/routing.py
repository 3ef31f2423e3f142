"""Pure routing: (method, raw path, headers) -> Route. No I/O.

The upstream host always comes from configuration; the request only chooses the provider and
the path that is appended to that provider's configured base URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provider = Literal["anthropic", "openai"]

ANTHROPIC_PREFIX = b"/anthropic"
OPENAI_PREFIX = b"/openai"


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
    """Map a client request onto an upstream route, or None (404)."""
    for prefix, provider in ((ANTHROPIC_PREFIX, "anthropic"), (OPENAI_PREFIX, "openai")):
        rest = _strip_prefix(path, prefix)
        if rest is not None:
            return Route(provider, api_kind(provider, method, rest), rest)  # type: ignore[arg-type]
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
