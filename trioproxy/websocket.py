"""The OpenAI Responses WebSocket relay, accounted per response: the trio side.

Codex (``supports_websockets = true``) opens ``GET /v1/responses`` with ``Upgrade: websocket``,
sends one ``response.create`` text frame per turn and receives one JSON event per frame. Frame
classification, close codes, handshake headers and usage records are ``ws_protocol`` (no I/O).

- **Handshake.** The upstream (the configured OpenAI base, ``https`` as ``wss``) is connected
  first; only then is the client accepted, with the upstream's end-to-end handshake headers and
  ``x-trioproxy-request-id``. An upstream refusal reaches the client as the same HTTP status,
  headers and body (``websocket.http.response``), so Codex sees a real 401/429 and can fall back
  to HTTP; a connect failure is a 502 and a timeout a 504, in OpenAI's error shape.
- **Relay.** One nursery: client->upstream, upstream->client and a ping on the upstream leg.
  Frames pass unchanged (text stays text, binary stays binary). When one side closes, the other
  is closed with its code. A ``response.create`` opens a usage record, read (decoded) only after
  the frame has been forwarded; a close mid-response records it incomplete.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio_websocket as tws
from wsproto.utilities import ProtocolError

from . import headers as hdr
from .config import UpstreamURL
from .errors import UpstreamConnectError, UpstreamTimeout, error_body
from .errors import ClientRequestError
from .exchange import Exchange, correlation_id, new_request_id
from .extensions import ExtensionFailed, MutableHeaders
from .lifecycle import End
from .log import request_id_var
from .payload import encode_payload, hook_context, is_bypass
from .responses import Receive, Send
from .routing import Route, resolve
from .upstream.pool import build_request
from .ws_protocol import (
    DECODED,
    ROUTE,
    CreateContext,
    Headers,
    Message,
    Record,
    ResponseLedger,
    classify,
    client_handshake_headers,
    close_code_for_client,
    close_code_for_upstream,
    decode,
    extension_error_event,
    is_responses_route,
    size_of,
    upstream_handshake_headers,
)

if TYPE_CHECKING:
    from .runtime import Runtime

Scope = dict[str, Any]

__all__ = ["CreateContext", "ResponsesSocket", "relay_websocket"]

log = logging.getLogger("trioproxy.websocket")

CLOSE_TIMEOUT = 5.0  # seconds for the closing handshake with the upstream
CANCELLED_CLOSE_TIMEOUT = 1.0  # the same, shielded, when the relay is cancelled (shutdown)
RECEIVE_BUFFER = 65536  # trio-websocket reads 4 KiB at a time by default
_JSON = [(b"content-type", b"application/json")]


_UPSTREAM_BROKEN = (
    tws.HandshakeError, ProtocolError, h11.ProtocolError, OSError, trio.BrokenResourceError
)


# -- the payload hook stage ---------------------------------------------------------------------


async def _payload_stage(runtime: Runtime, ctx: CreateContext, frame_text: str) -> str:
    """The one place each ``response.create`` frame meets the payload hooks.

    Unchanged frames are forwarded as the original text; a frame a hook changed is
    re-encoded once. Sockets opened with the bypass header never reach this. Raises
    ``ExtensionFailed`` when a hook fails and extensions are fail-closed."""
    manager = runtime.extensions
    if manager is None or not manager.has_payload_hooks:
        return frame_text
    payload = ctx.payload if ctx.payload is not None else decode(frame_text)
    if payload is None:
        return frame_text
    ctx.payload = payload
    headers = MutableHeaders(ctx.handshake_headers)  # read-only here: a frame has no headers
    result = await manager.run_payload(hook_context(ctx.exchange, payload), payload, headers)
    if not result.changed_by:
        return frame_text
    ctx.payload = result.payload
    ctx.exchange.payload_changed_by = result.changed_by
    log.info("response.create changed by %s", ",".join(result.changed_by))
    return encode_payload(result.payload).decode("utf-8")


# -- the relay ----------------------------------------------------------------------------------


async def relay_websocket(runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI ``websocket`` scope: relays ``/v1/responses`` and ``/openai/v1/responses``."""
    if (await receive())["type"] != "websocket.connect":
        return
    sock = ResponsesSocket(runtime, scope, receive, send)
    route = resolve("GET", sock.raw_path, scope["headers"])
    token = request_id_var.set(sock.ledger.socket_id + (
        f"({sock.ledger.correlation_id})" if sock.ledger.correlation_id else ""))
    try:
        if is_responses_route(route):
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
        self.ledger = ResponseLedger(
            socket_id, session.decode("latin-1") if session else socket_id,
            self.raw_path.decode("latin-1"), headers,
            is_bypass(headers, settings.bypass_header_names),
            correlation_id(hdr.get(headers, settings.request_id_header.encode())),
        )
        self.max_size = settings.ws_max_message_size  # both legs; Hypercorn has its own too
        self.ping_interval = settings.ws_ping_interval
        self.client_open = True  # False once the client left or was sent a close
        self.accepted = False  # the client's upgrade has been accepted

    # -- handshake ----------------------------------------------------------------------------

    async def run(self, route_path: bytes, query: bytes) -> None:
        base = self.runtime.settings.openai_upstream
        resource = base.prefix + route_path + (b"?" + query if query else b"")
        try:  # h11 would refuse it later, quoting the value (a credential, maybe): refuse now
            build_request(b"GET", resource, [(b"host", base.host_header), *upstream_handshake_headers(
                self.ledger.headers, self.runtime.settings.bypass_header_names)])
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
            self.ledger.cut(End.ABORTED, "the relay stopped before the response ended")
            await self._finish_all()
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
            await self._close_client(1011, "upstream failed")

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
                    self.ledger.headers, self.runtime.settings.bypass_header_names),
                max_message_size=self.max_size, receive_buffer_size=RECEIVE_BUFFER,
            )
        if upstream is None:
            await self._timed_out()
            return
        await self._accept(upstream)
        try:
            await self._relay(upstream)
        finally:  # a no-op unless cancelled: say goodbye to the upstream, briefly
            with trio.move_on_after(CANCELLED_CLOSE_TIMEOUT, shield=True):
                await upstream.aclose()

    async def _accept(self, upstream: tws.WebSocketConnection) -> None:
        upstream_headers = list(upstream.handshake_headers)
        self.ledger.upstream_request_id = hdr.upstream_request_id(upstream_headers)
        headers = client_handshake_headers(upstream_headers, self.ledger.socket_id,
                                           self.ledger.correlation_id)
        message: dict[str, Any] = {"type": "websocket.accept", "headers": headers}
        if upstream.subprotocol and upstream.subprotocol in (self.scope.get("subprotocols") or ()):
            message["subprotocol"] = upstream.subprotocol
        await self.send(message)
        self.accepted = True
        log.info("websocket open: %s session=%s upstream_request_id=%s", self.ledger.path,
                 self.ledger.session_id, self.ledger.upstream_request_id)

    async def refuse_path(self) -> None:
        msg = (f"trioproxy relays WebSockets only on /v1/responses and /openai/v1/responses, "
               f"not {self.ledger.path}")
        await self._failed(404, "rejected", "unknown_path", msg, route=None)

    async def _refused(self, exc: tws.ConnectionRejected) -> None:
        status = exc.status_code
        log.info("upstream refused the websocket upgrade with %d", status)
        if status < 300:  # an answer that neither upgrades nor refuses
            await self._failed(502, "upstream_error", "upstream_error",
                               f"upstream answered the websocket upgrade with {status}")
            return
        ex = self.ledger.exchange(self.ledger.socket_id)
        ex.upstream_request_id = hdr.upstream_request_id(exc.headers)
        ex.life.sent_upstream()  # the upstream's own answer, delivered as it was
        await self._http_response(ex, status, list(exc.headers), exc.body or b"")

    async def _timed_out(self) -> None:
        timeout = self.runtime.settings.connect_timeout
        await self._failed(504, "timeout", "upstream_timeout",
                           f"upstream websocket connect/upgrade timeout after {timeout:g}s")

    async def _failed(self, status: int, kind: str, code: str, msg: str,
                      route: Route | None = ROUTE) -> None:
        log.warning("websocket refused with %d (%s): %s", status, kind, msg)
        ex = self.ledger.exchange(self.ledger.socket_id)
        ex.route = route
        ex.fail(End(kind), msg)
        await self._http_response(ex, status, _JSON, error_body("openai", status, msg, code))

    async def _http_response(self, ex: Exchange, status: int, headers: Headers, body: bytes) -> None:
        """Answers the upgrade with HTTP (``websocket.http.response``), else closes with 1008."""
        ex.status, ex.bytes_out = status, len(body)
        ex.life.answered(status)
        try:
            if "websocket.http.response" not in (self.scope.get("extensions") or {}):
                await self.send({"type": "websocket.close", "code": 1008})
            else:
                out = client_handshake_headers(headers, ex.request_id, ex.correlation_id)
                out.append((b"content-length", str(len(body)).encode()))
                await self.send({"type": "websocket.http.response.start", "status": status,
                                 "headers": out})
                await self.send({"type": "websocket.http.response.body", "body": body})
            ex.life.delivered()
        finally:
            await self._finish(Record(ex))

    # -- relay --------------------------------------------------------------------------------

    async def _relay(self, upstream: tws.WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream_to_client, upstream, nursery.cancel_scope)
            if self.ping_interval:
                nursery.start_soon(self._keepalive, upstream, self.ping_interval)
            await self._client_to_upstream(upstream, nursery.cancel_scope)

    async def _client_to_upstream(self, upstream: tws.WebSocketConnection,
                                  done: trio.CancelScope) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                await self._client_left(upstream, message.get("code"))
                done.cancel()
                return
            if message["type"] != "websocket.receive":
                continue
            text = message.get("text")
            data: Message = text if text is not None else (message.get("bytes") or b"")
            size = size_of(data)
            if size > self.max_size:
                await self._client_too_big(upstream, size)
                done.cancel()
                return
            try:
                await self._forward_client_frame(upstream, data, size)
            except tws.ConnectionClosed:
                return  # the upstream pump relays the upstream's close to the client

    async def _forward_client_frame(self, upstream: tws.WebSocketConnection, data: Message,
                                    size: int) -> None:
        kind, obj = classify(data) if isinstance(data, str) else (None, None)
        if kind != "response.create" or not isinstance(data, str):
            self.ledger.on_client_frame(size)
            await upstream.send_message(data)
            return
        rec = self.ledger.start(size)
        ctx = CreateContext(rec.ex, self.ledger.session_id, self.ledger.headers, obj)
        if not self.ledger.bypass:
            try:
                data = await _payload_stage(self.runtime, ctx, data)
            except ExtensionFailed as exc:
                await self._reject_create(rec, ctx, data, exc)
                return
        self.ledger.forwarded(rec)  # from here on the response may come
        try:
            await upstream.send_message(data)
        finally:  # decoded after forwarding: the frame is not delayed by it
            self.ledger.note_create(rec, ctx.payload if ctx.payload is not None else decode(data))
        if rec.ended:  # the terminal event came first: the upstream pump left it to us
            await self._finish(rec)

    async def _upstream_to_client(self, upstream: tws.WebSocketConnection,
                                  done: trio.CancelScope) -> None:
        while True:
            try:
                message = await upstream.get_message()
            except tws.ConnectionClosed:
                if self.client_open:  # else the client pump is closing the upstream already
                    await self._upstream_closed(upstream.closed)
                    done.cancel()
                return
            now = trio.current_time()
            kind, obj = classify(message) if isinstance(message, str) else (None, None)
            if self.client_open:
                key = "text" if isinstance(message, str) else "bytes"
                await self.send({"type": "websocket.send", key: message})
            if kind in DECODED and obj is None and isinstance(message, str):
                obj = decode(message)  # after forwarding: the frame is not delayed by it
            ended = self.ledger.on_upstream_frame(size_of(message), now, kind, obj)
            if ended is not None and ended.noted:
                await self._finish(ended)

    async def _keepalive(self, upstream: tws.WebSocketConnection, interval: float) -> None:
        """Pings the upstream every ``interval`` seconds (trio-websocket never does)."""
        while True:
            await trio.sleep(interval)
            sent = trio.current_time()
            with trio.move_on_after(interval) as late:
                try:
                    await upstream.ping()
                except tws.ConnectionClosed:
                    return
            if late.cancelled_caught:
                log.warning("upstream websocket did not answer a ping within %gs", interval)
            else:
                log.debug("upstream pong after %.1f ms", (trio.current_time() - sent) * 1000)

    # -- closing ------------------------------------------------------------------------------

    async def _client_left(self, upstream: tws.WebSocketConnection, code: int | None) -> None:
        self.client_open = False
        out = close_code_for_upstream(code)
        log.info("client closed the websocket (%s): closing the upstream with %d", code, out)
        self.ledger.cut(End.CLIENT_DISCONNECT, f"client closed the websocket ({code})")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(out)
        await self._finish_all()

    async def _client_too_big(self, upstream: tws.WebSocketConnection, size: int) -> None:
        log.warning("client message of %d bytes exceeds ws_max_message_size=%d: closing with 1009",
                    size, self.max_size)
        self.ledger.cut(End.REJECTED, f"client message of {size} bytes is too big")
        await self._close_client(1009, "message too big")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(1000)
        await self._finish_all()

    async def _upstream_closed(self, reason: tws.CloseReason | None) -> None:
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None else None
        if code == 1009:
            log.warning("upstream websocket closed with 1009 (message too big): %s", text)
        out = close_code_for_client(code)
        log.info("upstream closed the websocket (%d%s): closing the client with %d",
                 code, f" {text}" if text else "", out)
        self.ledger.cut(End.UPSTREAM_ERROR, f"upstream closed the websocket ({code})")
        await self._close_client(out, text)
        await self._finish_all()

    async def _close_client(self, code: int, reason: str | None = None) -> None:
        if self.client_open:
            self.client_open = False  # Hypercorn raises on websocket.send after our close
            message: dict[str, Any] = {"type": "websocket.close", "code": code}
            await self.send({**message, "reason": reason} if reason else message)

    async def _reject_create(
        self, rec: Record, ctx: CreateContext, data: str, exc: ExtensionFailed
    ) -> None:
        """Fail-closed: the frame is not forwarded; the client gets an ``error`` event."""
        payload = ctx.payload if ctx.payload is not None else decode(data)
        self.ledger.reject(rec, payload, str(exc))
        if self.client_open:
            await self.send({"type": "websocket.send", "text": extension_error_event(exc)})
        await self._finish(rec)

    async def _finish_all(self) -> None:
        for rec in list(self.ledger.unfinished):
            await self._finish(rec)

    async def _finish(self, rec: Record) -> None:
        """Finalises one record (``Runtime.finish`` is shielded and runs once per exchange)."""
        self.ledger.discharge(rec)
        token = request_id_var.set(rec.ex.log_label())
        try:
            await self.runtime.finish(rec.ex)
        finally:
            request_id_var.reset(token)
