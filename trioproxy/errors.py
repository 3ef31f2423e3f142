"""Proxy errors, grouped by phase and mapped to a status once, at the edge.

Before the response has started an error becomes a JSON body in the caller's provider format;
after it has started the stream is cut so the client can tell it is truncated.
"""

from __future__ import annotations

import json


class ProxyError(Exception):
    """Base of every error the proxy itself raises. ``status`` is the HTTP status hint."""

    status = 500
    kind = "proxy_error"  # recorded as the usage record's end_reason
    code: str | None = "proxy_error"  # OpenAI-style error code in the JSON body

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.detail = message  # what the usage record keeps as its error


class ClientRequestError(ProxyError):
    status = 400
    kind = "rejected"

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ExtensionRejected(ProxyError):
    """A fail-closed extension hook failed, so the request (or response) is refused with a
    500; the record keeps the hook's own failure."""

    kind = "extension_error"

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{what} rejected: {cause}")
        self.detail = str(cause)


class UpstreamError(ProxyError):
    """Anything that went wrong talking to the upstream."""

    status = 502
    kind = "upstream_error"
    code = "upstream_error"


class UpstreamConnectError(UpstreamError):
    kind = "connect_error"
    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    """A timeout in a named phase: connect, write, read or pool."""

    status = 504
    kind = "timeout"
    code = "upstream_timeout"

    def __init__(self, phase: str, seconds: float, detail: str = "") -> None:
        super().__init__(f"upstream {phase} timeout after {seconds:g}s{detail}")
        self.phase = phase


class UpstreamProtocolError(UpstreamError):
    """The upstream broke the connection or spoke invalid HTTP."""


class StaleConnection(UpstreamProtocolError):
    """A reused keep-alive connection broke while the request was being written, so its end
    never left this host and the upstream cannot have taken it: safe to retry once on a fresh
    connection. (A cut after the write is a plain UpstreamProtocolError: never resent.)"""


class UpstreamPoolClosed(UpstreamError):
    """The upstream pool has been closed (the proxy is shutting down): nothing was sent."""

    status = 503
    code = "proxy_shutting_down"


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    431: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(provider: str, status: int, message: str, code: str | None = None) -> bytes:
    """A JSON error body in the provider's own shape."""
    if provider == "anthropic":
        err_type = _ANTHROPIC_TYPES.get(status, "api_error")
        body: dict = {"type": "error", "error": {"type": err_type, "message": message}}
    else:
        err_type = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return json.dumps(body, separators=(",", ":")).encode()
