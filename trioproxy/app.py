"""The raw ASGI application: lifespan, and dispatch of http / websocket scopes.

The app owns the shared resources (upstream pool, usage store writer) for the lifetime of the
server: they are opened in lifespan start-up inside the lifespan task's nursery and closed at
shutdown. Requests get those resources explicitly; nothing lives at module level.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Sequence

import sniffio
import trio

from .accounting.keys import extract_api_key
from .config import ConfigError, Settings
from .errors import ClientRequestError, ProxyError
from .exchange import Exchange, correlation_id
from .extensions import Extension, ExtensionFailed, ExtensionManager, load_extensions
from .health import answer_operational, is_operational, refuse_draining
from .ledger import _is_admin, answer_usage_lookup, usage_request_id
from .log import request_id_var, setup_logging
from .payload import is_bypass, prepare
from .protocol import headers as hdr
from .protocol.lifecycle import End
from .protocol.routing import provider_hint, resolve
from .relay.http import HttpRelay
from .relay.responses import (
    Receive,
    Scope,
    Send,
    conflicting_framing,
    drain_body,
    error_messages,
    has_body,
    json_messages,
    read_body,
    send_all,
)
from .runtime import Runtime
from .upstream import UpstreamPool

log = logging.getLogger("trioproxy")

WRONG_WORKER = (
    "trioproxy runs on Trio only. Start it with `hypercorn trioproxy:app --worker-class trio` "
    "or `trioproxy serve`."
)


class StartupFailed(Exception):
    """Lifespan start-up cannot complete; the message is what the server reports."""


class TrioProxy:
    """The ASGI callable. ``settings=None`` reads ``TRIOPROXY_*`` at lifespan start-up."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        configure_logging: bool = True,
        extensions: Sequence[Extension] | None = None,
    ) -> None:
        """``extensions`` replaces entry-point/env discovery (tests, embedding)."""
        self._settings = settings
        self._extensions = extensions
        self._ssl_context = ssl_context
        self._configure_logging = configure_logging
        self.runtime: Runtime | None = None
        self._relay: HttpRelay | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    # -- lifespan --------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            settings, extensions, pool = self._resources()
        except StartupFailed as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        try:
            async with trio.open_nursery() as nursery:
                runtime = Runtime(settings, pool, extensions)
                self._relay = HttpRelay(settings, pool, extensions, runtime.finish)
                self.runtime = runtime
                try:
                    await self._startup_extras(nursery, settings)
                except Exception as exc:  # e.g. the usage store cannot be opened
                    log.exception("start-up failed")
                    self.runtime = None
                    await send({"type": "lifespan.startup.failed", "message": f"{exc!r}"})
                    nursery.cancel_scope.cancel()
                    return
                await send({"type": "lifespan.startup.complete"})
                log.info(
                    "trioproxy ready: anthropic=%s openai=%s",
                    settings.anthropic_upstream, settings.openai_upstream,
                )
                message = await receive()
                assert message["type"] == "lifespan.shutdown"
                pending = runtime.writer.statistics().pending if runtime.writer else 0
                log.info("trioproxy shutting down: %d requests in flight, %d usage records to "
                         "write", len(runtime.inflight), pending)
                nursery.cancel_scope.cancel()
        finally:
            reader, self.runtime = self.runtime and self.runtime.reader, None
            with trio.CancelScope(shield=True):
                if reader is not None:
                    await reader.aclose()
                await pool.aclose()
        log.info("trioproxy stopped")
        await send({"type": "lifespan.shutdown.complete"})

    def _resources(self) -> tuple[Settings, ExtensionManager, UpstreamPool]:
        """Settings, extensions and the upstream pool; StartupFailed says what is wrong."""
        if sniffio.current_async_library() != "trio":
            raise StartupFailed(WRONG_WORKER)
        try:
            settings = self._settings or Settings.from_env()
        except ConfigError as exc:
            raise StartupFailed(f"configuration: {exc}") from None
        if self._configure_logging:
            setup_logging(settings.log_level, settings.log_format)
        try:
            extensions = ExtensionManager(
                self._extensions if self._extensions is not None
                else load_extensions(settings.extension_specs, settings=settings),
                fail_closed=settings.extensions_fail_closed,
            )
        except Exception as exc:  # noqa: BLE001 - a broken extension must stop start-up, loudly
            raise StartupFailed(f"extensions: {exc!r}") from None
        try:
            pool = UpstreamPool(settings, self._ssl_context)  # reads HTTPS_PROXY / NO_PROXY
        except ConfigError as exc:
            raise StartupFailed(f"configuration: {exc}") from None
        return settings, extensions, pool

    async def _startup_extras(self, nursery: trio.Nursery, settings: Settings) -> None:
        """Accounting (record -> store writer) and complete hooks, as finishers in order."""
        runtime = self.runtime
        assert runtime is not None
        if settings.accounting:
            from .ledger import open_ledger

            runtime.writer, runtime.secret = await nursery.start(open_ledger, settings)
        else:
            runtime.secret = secrets.token_bytes(32)  # records still go to complete hooks
        if settings.accounting or runtime.extensions.has_complete_hooks:
            runtime.finishers.append(runtime.record)
        if settings.metrics:
            from .metrics import Metrics

            runtime.metrics = Metrics(accounting=settings.accounting)
            runtime.finishers.append(runtime.observe)
            if runtime.metrics.multiprocess:  # the other workers' scrapes read our files
                nursery.start_soon(runtime.metrics.run_publisher, runtime.scrape_figures)
        if settings.accounting and settings.dashboard:
            from .dashboard import UsageReader

            runtime.reader = UsageReader(settings)

    # -- http ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime, relay = self.runtime, self._relay
        if runtime is None or relay is None:
            raise RuntimeError("trioproxy received a request before lifespan start-up")
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        ex = Exchange(
            method=scope["method"],
            path=raw_path.decode("latin-1"),
            provider=provider_hint(raw_path, headers),
            correlation_id=correlation_id(
                hdr.get(headers, runtime.settings.request_id_header.encode())),
            request_headers=headers,
            close_connection=has_body(headers) or conflicting_framing(headers),
        )
        token = request_id_var.set(ex.log_label())
        own = is_operational(raw_path)  # never forwarded, never a usage row, always answered
        lookup_id = usage_request_id(raw_path) if ex.method == "GET" and not own else None
        if not own:
            runtime.inflight[ex.request_id] = ex
        try:
            if own:
                await answer_operational(runtime, ex, scope, receive, send)
            elif runtime.draining:
                await refuse_draining(runtime, ex, scope, send)
            elif lookup_id is not None:
                await self._usage_lookup(runtime, ex, lookup_id, send)
            else:
                await self._handle(runtime, relay, ex, scope, raw_path, receive, send)
        except Exception as exc:  # a proxy-side fault: 500 if we still can, never silent
            log.exception("proxy fault")
            if ex.life.done:  # finalised early (a stalled client): nothing left to tell
                return
            ex.fail(End.PROXY_ERROR, f"{type(exc).__name__}: {exc}")
            if not ex.response_started:
                with trio.CancelScope(shield=True):
                    await send_all(send, ex, error_messages(ex, ProxyError("internal proxy error")))
        finally:
            await runtime.finish(ex, recorded=lookup_id is None and not own)
            runtime.inflight.pop(ex.request_id, None)
            request_id_var.reset(token)

    async def _handle(
        self, runtime: Runtime, relay: HttpRelay, ex: Exchange, scope: Scope, raw_path: bytes,
        receive: Receive, send: Send,
    ) -> None:
        settings = runtime.settings
        try:
            hdr.check_head_size(scope, settings.max_header_bytes)
            ex.route = resolve(ex.method, raw_path, ex.request_headers)
            if ex.route is None:
                raise ClientRequestError(
                    f"trioproxy has no route for {ex.method} {ex.path}: use /v1/messages, "
                    "/v1/chat/completions, /v1/responses, or the /anthropic/... and /openai/... "
                    "prefixes",
                    404,
                    "unknown_path",
                )
            ex.provider = ex.route.provider  # refusals below answer in the route's shape
            hdr.check_one_credential(ex.request_headers)
        except ClientRequestError as exc:
            await drain_body(receive, ex)  # keep the connection usable for the next request
            await send_all(send, ex, error_messages(ex, exc))
            return
        ex.provider = ex.route.provider
        try:
            body = await read_body(receive, ex, settings.max_body_bytes)
        except ClientRequestError as exc:  # 413: the connection closes after the answer
            await send_all(send, ex, error_messages(ex, exc))
            return
        if body is None:
            ex.fail(End.CLIENT_DISCONNECT, "client disconnected while sending the body")
            return
        ex.bypass = is_bypass(ex.request_headers, settings.bypass_header_names)
        ex.trailers_ok = wants_trailers(scope)
        base = relay.upstream_for(ex)
        query = scope.get("query_string", b"")
        target = base.prefix + ex.route.path + (b"?" + query if query else b"")
        with_body = bool(body) or ex.method in ("POST", "PUT", "PATCH")
        headers = hdr.upstream_request_headers(
            ex.request_headers, base.host_header, len(body) if with_body else None,
            drop=settings.bypass_header_names,
        )
        try:
            out = await prepare(
                ex, body, headers, runtime.extensions, include_usage=settings.include_usage
            )
        except ExtensionFailed as exc:
            ex.fail(End.EXTENSION_ERROR, str(exc))  # the first failure names the outcome
            await send_all(send, ex, error_messages(ex, ProxyError(f"request rejected: {exc}")))
            return
        del body  # only the outbound bytes live on, for as long as they are being sent
        await relay.relay(ex, base, target, out.headers, out.body, receive, send)

    async def _usage_lookup(
        self, runtime: Runtime, ex: Exchange, lookup_id: str, send: Send
    ) -> None:
        # A client that fetches usage the moment its stream ended can be a few milliseconds
        # ahead of finalisation: wait (bounded) for that exchange's record to exist. Only for
        # the caller's own exchanges: another key's stream that reuses the id is none of its
        # business (and must not hold its lookup for as long as that stream runs).
        key = extract_api_key(ex.request_headers, ex.provider)
        admin = _is_admin(ex.request_headers, runtime.settings.admin_token)
        for other in list(runtime.inflight.values()):
            if other is not ex and lookup_id in (
                    other.request_id, other.correlation_id, other.upstream_request_id) and (
                    admin or (key is not None and extract_api_key(other.request_headers, other.provider) == key)):
                with trio.move_on_after(10):
                    await other.finalised.wait()
        status, body = await answer_usage_lookup(
            lookup_id, ex.request_headers, runtime.writer, runtime.secret,
            runtime.settings.admin_token, ex.provider,
        )
        if status != 200:
            ex.fail(End.REJECTED, f"usage lookup answered {status}")
        await send_all(send, ex, json_messages(ex, status, body))

    # -- websocket -------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("trioproxy received a websocket before lifespan start-up")
        from .relay.websocket import relay_websocket

        runtime.sockets += 1
        try:
            await relay_websocket(runtime, scope, receive, send)
        finally:
            runtime.sockets -= 1


def wants_trailers(scope: Scope) -> bool:
    """The server can send trailers (HTTP/2) and the client asked for them (TE: trailers)."""
    if "http.response.trailers" not in scope.get("extensions", {}):
        return False
    te = b",".join(v for k, v in scope["headers"] if k == b"te").lower()
    return b"trailers" in [t.strip().split(b";")[0] for t in te.split(b",")]
