"""The OpenAI Responses WebSocket relay, accounted per response: the trio side.

Codex (``supports_websockets = true``) opens ``GET /v1/responses`` with ``Upgrade: websocket``,
sends one ``response.create`` text frame per turn and receives one JSON event per frame. Frame
classification, close codes and handshake headers are :mod:`trioproxy.protocol.websocket` (no
I/O); the responses in flight and their usage records are :mod:`.ws_responses` (no I/O either).

- **Handshake.** The upstream (the configured OpenAI base, ``https`` as ``wss``) is connected
  first; only then is the client accepted, with the upstream's end-to-end handshake headers and
  ``x-trioproxy-request-id``. An upstream refusal reaches the client as the same HTTP status,
  headers and body (``websocket.http.response``), so Codex sees a real 401/429 and can fall back
  to HTTP; a connect failure is a 502 and a timeout a 504, in OpenAI's error shape.
- **Relay.** ``ws_frames.FramePumps``: frames both ways, pings, closes, one usage record per
  response.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio_websocket as tws
from wsproto.utilities import ProtocolError

from ..asgi import RETRY_AFTER, Receive, Scope, Send
from ..config.settings import UpstreamURL
from ..errors import (
    ClientRequestError,
    UpstreamConnectError,
    UpstreamTimeout,
    error_body,
)
from ..exchange import Exchange, correlation_id, new_request_id
from ..log import request_id_var
from ..protocol import headers as hdr
from ..protocol.headers import Headers
from ..protocol.lifecycle import End
from ..protocol.routing import Route, resolve
from ..protocol.websocket import (
    ROUTE,
    client_handshake_headers,
    is_responses_route,
    upstream_handshake_headers,
)
from ..upstream import build_request
from .ws_frames import FramePumps
from .ws_responses import InflightResponse, ResponseBook

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["ResponsesSocket", "relay_websocket"]

log = logging.getLogger("trioproxy.websocket")

CANCELLED_CLOSE_TIMEOUT = 1.0  # the same, shielded, when the relay is cancelled (shutdown)
RECEIVE_BUFFER = 65536  # trio-websocket reads 4 KiB at a time by default
_JSON = [(b"content-type", b"application/json")]


_UPSTREAM_BROKEN = (
    tws.HandshakeError, ProtocolError, h11.ProtocolError, OSError, trio.BrokenResourceError
)


# -- the relay ----------------------------------------------------------------------------------


async def relay_websocket(runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI ``websocket`` scope: relays ``/v1/responses`` and ``/openai/v1/responses``;
    while the process drains, refuses the handshake like a new HTTP request."""
    if (await receive())["type"] != "websocket.connect":
        return
    sock = ResponsesSocket(runtime, scope, receive, send)
    route = resolve("GET", sock.raw_path, scope["headers"])
    token = request_id_var.set(sock.book.socket_id + (
        f"({sock.book.correlation_id})" if sock.book.correlation_id else ""))
    try:
        if runtime.draining:
            runtime.refused += 1
            await sock.refuse_draining()
        elif is_responses_route(route):
            await sock.run(route.path, scope.get("query_string", b""))
        else:
            await sock.refuse_path()
    finally:
        request_id_var.reset(token)


class ResponsesSocket:
    """One client socket and its upstream socket."""

    def __init__(self, runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
        settings = runtime.settings
        headers: Headers = scope["headers"]
        socket_id = new_request_id()
        session = hdr.get(headers, b"session-id") or hdr.get(headers, b"session_id")
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        self.runtime, self.scope, self.receive, self.send = runtime, scope, receive, send
        self.book = ResponseBook(
            socket_id, session.decode("latin-1") if session else socket_id,
            self.raw_path.decode("latin-1"), headers,
            hdr.is_bypass(headers, settings.bypass_header_names),
            correlation_id(hdr.get(headers, settings.request_id_header.encode())),
        )
        self.frames = FramePumps(runtime, self.book, receive, send,
                                 settings.ws_max_message_size, settings.ws_ping_interval)
        self.accepted = False  # the client's upgrade has been accepted

    # -- handshake ----------------------------------------------------------------------------

    async def run(self, route_path: bytes, query: bytes) -> None:
        base = self.runtime.settings.openai_upstream
        resource = base.prefix + route_path + (b"?" + query if query else b"")
        try:  # h11 would refuse it later, quoting the value (a credential, maybe): refuse now
            hdr.check_one_credential(self.book.headers)
            build_request(b"GET", resource, [
                (b"host", base.host_header),
                *upstream_handshake_headers(self.book.headers,
                                            self.runtime.settings.bypass_header_names)])
        except ClientRequestError as exc:
            await self._failed(400, "rejected", exc.code or "invalid_request", exc.message)
            return
        deadline = trio.current_time() + self.runtime.settings.connect_timeout
        stream = await self._open_stream(base, deadline)
        if stream is None:
            return
        rejected: list[tws.ConnectionRejected] = []
        broken: list[BaseException] = []
        try:
            try:
                async with trio.open_nursery() as nursery:  # owns trio-websocket's reader task
                    await self._session(nursery, stream, base, resource, deadline)
                    nursery.cancel_scope.cancel()
            except* tws.ConnectionRejected as group:  # raised by the reader task
                rejected.extend(group.exceptions)  # type: ignore[arg-type]
            except* _UPSTREAM_BROKEN as group:  # e.g. a bad Sec-WebSocket-Accept, a reset
                broken.extend(group.exceptions)
        finally:
            # Ours to close: trio-websocket leaves the socket open when the upstream closes first.
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.book.cut(End.ABORTED, "the relay stopped before the response ended")
            await self.frames.finalise_all()
        if rejected:
            await self._refused(rejected[0])
        elif broken:
            await self._upstream_broke(broken[0])

    async def _upstream_broke(self, exc: BaseException) -> None:
        """The upstream leg failed at the protocol level: 502 if the client is not accepted
        yet, else a 1011 close (its records were already cut as incomplete)."""
        # A local protocol error is about what we sent: its text may quote a client header.
        detail = "" if isinstance(exc, h11.LocalProtocolError) else f": {exc}"
        msg = f"upstream websocket failed: {type(exc).__name__}{detail}"
        if not self.accepted:
            await self._failed(502, "upstream_error", "upstream_error", msg)
        else:
            log.warning("%s", msg)
            await self.frames.close_client(1011, "upstream failed")

    async def _open_stream(self, base: UpstreamURL, deadline: float) -> trio.abc.Stream | None:
        """TCP (through the outbound proxy's tunnel if one applies) and TLS, shared with the
        HTTP pool's connect logic; or None once the client has had its 502 / 504."""
        try:
            with trio.fail_at(deadline):
                return await self.runtime.pool.open_stream(base)
        except (trio.TooSlowError, UpstreamTimeout):
            await self._timed_out()
        except UpstreamConnectError as exc:
            await self._failed(502, "connect_error", "upstream_connect_error",
                               f"cannot connect to the upstream websocket: {exc.message}")
        return None

    async def _session(self, nursery: trio.Nursery, stream: trio.abc.Stream,
                       base: UpstreamURL, resource: bytes, deadline: float) -> None:
        """The upgrade, the client's accept, the relay, the closing handshake."""
        upstream: tws.WebSocketConnection | None = None
        with trio.move_on_at(deadline):
            upstream = await tws.wrap_client_stream(
                nursery, stream, base.host_header.decode(), resource.decode("latin-1"),
                subprotocols=self.scope.get("subprotocols") or None,
                extra_headers=upstream_handshake_headers(
                    self.book.headers, self.runtime.settings.bypass_header_names),
                max_message_size=self.frames.max_size, receive_buffer_size=RECEIVE_BUFFER,
            )
        if upstream is None:
            await self._timed_out()
            return
        await self._accept(upstream)
        try:
            await self.frames.run(upstream)
        finally:  # a no-op unless cancelled: say goodbye to the upstream, briefly
            with trio.move_on_after(CANCELLED_CLOSE_TIMEOUT, shield=True):
                await upstream.aclose()

    async def _accept(self, upstream: tws.WebSocketConnection) -> None:
        upstream_headers = list(upstream.handshake_headers)
        self.book.upstream_request_id = hdr.upstream_request_id(upstream_headers)
        headers = client_handshake_headers(upstream_headers, self.book.socket_id,
                                           self.book.correlation_id)
        message: dict[str, Any] = {"type": "websocket.accept", "headers": headers}
        if upstream.subprotocol and upstream.subprotocol in (self.scope.get("subprotocols") or ()):
            message["subprotocol"] = upstream.subprotocol
        await self.send(message)
        self.accepted = True
        log.info("websocket open: %s session=%s upstream_request_id=%s", self.book.path,
                 self.book.session_id, self.book.upstream_request_id)

    async def refuse_path(self) -> None:
        msg = (f"trioproxy relays WebSockets only on /v1/responses and /openai/v1/responses, "
               f"not {self.book.path}")
        await self._failed(404, "rejected", "unknown_path", msg, route=None)

    async def refuse_draining(self) -> None:
        """503 in OpenAI's shape with ``retry-after`` (or close 1013, try again later, where
        the server cannot answer a handshake with HTTP); one record."""
        await self._failed(503, "rejected", "proxy_draining",
                           "trioproxy is shutting down and takes no new connections; retry "
                           "(another instance)", extra=[(b"retry-after", RETRY_AFTER)],
                           close_code=1013)

    async def _refused(self, exc: tws.ConnectionRejected) -> None:
        status = exc.status_code
        log.info("upstream refused the websocket upgrade with %d", status)
        if status < 300:  # an answer that neither upgrades nor refuses
            await self._failed(502, "upstream_error", "upstream_error",
                               f"upstream answered the websocket upgrade with {status}")
            return
        ex = self.book.exchange(self.book.socket_id)
        ex.upstream_request_id = hdr.upstream_request_id(exc.headers)
        ex.life.sent_upstream()  # the upstream's own answer, delivered as it was
        await self._http_response(ex, status, list(exc.headers), exc.body or b"")

    async def _timed_out(self) -> None:
        timeout = self.runtime.settings.connect_timeout
        await self._failed(504, "timeout", "upstream_timeout",
                           f"upstream websocket connect/upgrade timeout after {timeout:g}s")

    async def _failed(self, status: int, kind: str, code: str, msg: str,
                      route: Route | None = ROUTE, extra: Headers | None = None,
                      close_code: int = 1008) -> None:
        log.warning("websocket refused with %d (%s): %s", status, kind, msg)
        ex = self.book.exchange(self.book.socket_id)
        ex.route = route
        ex.fail(End(kind), msg)
        await self._http_response(ex, status, [*_JSON, *(extra or [])],
                                  error_body("openai", status, msg, code), close_code)

    async def _http_response(self, ex: Exchange, status: int, headers: Headers, body: bytes,
                             close_code: int = 1008) -> None:
        """Answers the upgrade with HTTP (``websocket.http.response``), else closes with
        ``close_code`` (policy violation by default)."""
        ex.status, ex.bytes_out = status, len(body)
        ex.life.answered(status)
        try:
            if "websocket.http.response" not in (self.scope.get("extensions") or {}):
                await self.send({"type": "websocket.close", "code": close_code})
            else:
                out = client_handshake_headers(headers, ex.request_id, ex.correlation_id)
                out.append((b"content-length", str(len(body)).encode()))
                await self.send({"type": "websocket.http.response.start", "status": status,
                                 "headers": out})
                await self.send({"type": "websocket.http.response.body", "body": body})
            ex.life.delivered()
        finally:
            await self.frames.finalise(InflightResponse(ex))
