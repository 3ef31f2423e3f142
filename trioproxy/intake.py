"""The request's way in, read top to bottom: from the ASGI scope to what goes upstream.

1. the exchange, opened from the head (:func:`open_exchange`);
2. head checks: the head's size, the route (404 for a path no provider has), one credential;
3. the body, read whole (413 over ``max_body_bytes``);
4. the upstream head: base URL, target and the header policy (:mod:`trioproxy.protocol.headers`);
5. the payload stage (:mod:`trioproxy.payload`): extension hooks, ``include_usage`` (it sees,
   and may change, the outbound headers).

Every refusal on the way is a :class:`~trioproxy.errors.ProxyError` (a fail-closed hook's
failure becomes :class:`~trioproxy.errors.ExtensionRejected` where it happens); the caller
answers it at one place, :meth:`Intake.refuse`. :attr:`Intake.stage` says how far the request
got, so a refusal of the head also reads and drops the unread body, and the connection can serve
the next request.
"""

from __future__ import annotations

import enum

import trio

from .asgi import Receive, Scope, Send, error_messages, send_all
from .config.settings import Settings, UpstreamURL
from .errors import ClientRequestError, ExtensionRejected, ProxyError
from .exchange import Exchange, correlation_id
from .extensions import ExtensionFailed, ExtensionManager
from .payload import prepare
from .protocol import headers as hdr
from .protocol.headers import Headers
from .protocol.lifecycle import End
from .protocol.routing import provider_hint, resolve
from .upstream import UpstreamRequest

NO_ROUTE = ("trioproxy has no route for {method} {path}: use /v1/messages, /v1/chat/completions, "
            "/v1/responses, or the /anthropic/... and /openai/... prefixes")


class Stage(enum.Enum):
    HEAD = "head"  # nothing of the body has been read
    BODY = "body"  # the body is being read
    PAYLOAD = "payload"  # the body is in hand: payload stage and upstream head
    READY = "ready"  # the upstream request is complete


def open_exchange(scope: Scope, settings: Settings) -> Exchange:
    """The exchange of one HTTP request, from its head alone (nothing is refused here)."""
    headers: Headers = scope["headers"]
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    return Exchange(
        method=scope["method"],
        path=raw_path.decode("latin-1"),
        provider=provider_hint(raw_path, headers),
        correlation_id=correlation_id(hdr.get(headers, settings.request_id_header.encode())),
        request_headers=headers,
        close_connection=has_body(headers) or conflicting_framing(headers),
    )


class Intake:
    """One request on its way in. :meth:`take_in` runs the stages in order; :meth:`refuse`
    answers what any of them raised."""

    def __init__(self, ex: Exchange, scope: Scope, receive: Receive, settings: Settings,
                 extensions: ExtensionManager | None) -> None:
        self.ex, self.scope, self.receive = ex, scope, receive
        self.settings, self.extensions = settings, extensions
        self.stage = Stage.HEAD

    async def take_in(self) -> UpstreamRequest | None:
        """The upstream request, or None when the client left while sending its body.
        Raises :class:`ProxyError` for a request the proxy refuses."""
        self._check_head()
        self.stage = Stage.BODY
        body = await receive_body(self.receive, self.ex, self.settings.max_body_bytes)
        if body is None:
            self.ex.fail(End.CLIENT_DISCONNECT, "client disconnected while sending the body")
            return None
        self.stage = Stage.PAYLOAD
        base, target, headers = self._upstream_head(len(body))
        try:
            out = await prepare(self.ex, body, headers, self.extensions,
                                include_usage=self.settings.include_usage)
        except ExtensionFailed as exc:
            raise ExtensionRejected("request", exc) from None
        self.stage = Stage.READY
        return UpstreamRequest(base, target, out.headers, out.body)

    def _check_head(self) -> None:
        ex = self.ex
        hdr.check_head_size(self.scope, self.settings.max_header_bytes)
        raw_path = ex.path.encode("latin-1")
        ex.route = resolve(ex.method, raw_path, ex.request_headers)
        if ex.route is None:
            raise ClientRequestError(NO_ROUTE.format(method=ex.method, path=ex.path), 404,
                                     "unknown_path")
        ex.provider = ex.route.provider  # refusals below answer in the route's shape
        hdr.check_one_credential(ex.request_headers)

    def _upstream_head(self, body_length: int) -> tuple[UpstreamURL, bytes, Headers]:
        """The provider's base URL, the request target and the outbound header policy."""
        ex, settings = self.ex, self.settings
        assert ex.route is not None
        ex.bypass = hdr.is_bypass(ex.request_headers, settings.bypass_header_names)
        ex.trailers_ok = wants_trailers(self.scope)
        base = settings.upstream_for(ex.route.provider)
        query = self.scope.get("query_string", b"")
        target = base.prefix + ex.route.path + (b"?" + query if query else b"")
        with_body = body_length > 0 or ex.method in ("POST", "PUT", "PATCH")
        headers = hdr.upstream_request_headers(
            ex.request_headers, base.host_header, body_length if with_body else None,
            drop=settings.bypass_header_names,
        )
        return base, target, headers

    async def refuse(self, exc: ProxyError, send: Send) -> None:
        """Answer a refusal in the provider's error shape. Refused at the head, the body is
        read and dropped first, to keep the connection usable for the next request (a 413
        closes it instead)."""
        if self.stage is Stage.HEAD:
            await drain_body(self.receive, self.ex)
        await send_all(send, self.ex, error_messages(self.ex, exc))


def wants_trailers(scope: Scope) -> bool:
    """The server can send trailers (HTTP/2) and the client asked for them (TE: trailers)."""
    if "http.response.trailers" not in scope.get("extensions", {}):
        return False
    te = b",".join(v for k, v in scope["headers"] if k == b"te").lower()
    return b"trailers" in [t.strip().split(b";")[0] for t in te.split(b",")]


# -- the body ----------------------------------------------------------------------------------


async def receive_body(receive: Receive, ex: Exchange, limit: int) -> bytes | None:
    """The whole request body, or None if the client left first. Raises 413 over ``limit``."""
    declared = hdr.get(ex.request_headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
        if not message.get("more_body", False):
            ex.bytes_in = size
            ex.close_connection = conflicting_framing(ex.request_headers)
            return b"".join(parts)


def _too_large(limit: int) -> ClientRequestError:
    return ClientRequestError(f"request body exceeds the {limit} byte limit", 413,
                              "request_too_large")


DRAIN_LIMIT = 64 * 1024  # request bytes read and discarded to keep a connection reusable
DRAIN_TIMEOUT = 5.0


async def drain_body(receive: Receive, ex: Exchange) -> None:
    """Read and discard the body of a request the proxy answers without using it (404, 400),
    so the connection can serve the next request. A body over ``DRAIN_LIMIT``, or one that does
    not arrive within ``DRAIN_TIMEOUT``, closes the connection instead (``Connection: close``)."""
    if not ex.close_connection:
        return
    size = 0
    with trio.move_on_after(DRAIN_TIMEOUT):
        while size <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                ex.close_connection = conflicting_framing(ex.request_headers)
                return


def has_body(headers: Headers) -> bool:
    """The request announces a body (which the proxy has not read yet)."""
    length = hdr.get(headers, b"content-length")
    return hdr.get(headers, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in (b"", b"0"))


def conflicting_framing(headers: Headers) -> bool:
    """Both ``Content-Length`` and ``Transfer-Encoding``: RFC 9112 6.1 says the server must close
    the connection after responding (the shape of request smuggling behind a front proxy)."""
    names = {k for k, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names
