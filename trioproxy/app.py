"""The raw ASGI application: lifespan, and dispatch of http / websocket scopes.

The app owns the shared resources (upstream pool, usage store writer) for the lifetime of the
server: they are opened in lifespan start-up inside the lifespan task's nursery and closed at
shutdown. Requests get those resources explicitly; nothing lives at module level.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sniffio
import trio

from . import headers as hdr
from .config import ConfigError, Settings
from .errors import ClientRequestError, ProxyError
from .exchange import Exchange, adopt_request_id
from .extensions import Extension, ExtensionFailed, ExtensionManager, load_extensions
from .ledger import answer_usage_lookup, build_record, usage_request_id
from .log import log_access, request_id_var, setup_logging
from .payload import hook_context, is_bypass, prepare
from .relay import HttpRelay, Receive, Scope, Send, read_body, send_error, send_json
from .routing import provider_hint, resolve
from .upstream import UpstreamPool

log = logging.getLogger("trioproxy")

WRONG_WORKER = (
    "trioproxy runs on Trio only. Start it with `hypercorn trioproxy:app --worker-class trio` "
    "or `trioproxy serve`."
)


@dataclass(eq=False)
class Runtime:
    """Resources that live from lifespan start-up to shutdown."""

    settings: Settings
    pool: UpstreamPool
    relay: HttpRelay
    finishers: list[Callable[[Exchange], Awaitable[None]]]
    extensions: ExtensionManager

    inflight: dict[str, Exchange] = field(default_factory=dict)  # by proxy request id
    writer: Any = None  # accounting.writer.UsageWriter when accounting is on
    secret: bytes = b""  # key-fingerprint secret

    async def record(self, ex: Exchange) -> None:
        """Finisher: build the usage record, queue it for the store, run complete hooks.

        Reads of the ledger itself (``GET /v1/usage/{id}``) are access-logged, not recorded:
        they are not proxied traffic and would skew per-key request counts."""
        if ex.extra.get("usage_lookup"):
            return
        rec = build_record(ex, self.secret)
        if self.writer is not None:
            self.writer.submit(rec)
        if self.extensions.has_complete_hooks:
            await self.extensions.run_complete(hook_context(ex), rec)

    async def finish(self, ex: Exchange) -> None:
        """Finalise one exchange (an HTTP request, or one WebSocket response) exactly once:
        the access line, then every finisher (accounting, complete hooks). Shielded."""
        with trio.CancelScope(shield=True):
            if ex.finished_at is not None:
                return
            ex.finished_at = trio.current_time()
            if ex.end_reason is None:  # every normal path names its end: this was cut off
                ex.end_reason = "cancelled"
            log_access(ex.access_fields())
            try:
                for finisher in self.finishers:
                    try:
                        await finisher(ex)
                    except Exception:
                        log.exception("finaliser %r failed", finisher)
            finally:
                ex.finalised.set()


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
        if sniffio.current_async_library() != "trio":
            await send({"type": "lifespan.startup.failed", "message": WRONG_WORKER})
            return
        try:
            settings = self._settings or Settings.from_env()
        except ConfigError as exc:
            await send({"type": "lifespan.startup.failed", "message": f"configuration: {exc}"})
            return
        if self._configure_logging:
            setup_logging(settings.log_level)
        try:
            extensions = ExtensionManager(
                self._extensions if self._extensions is not None
                else load_extensions(settings.extension_specs),
                fail_closed=settings.extensions_fail_closed,
            )
        except Exception as exc:  # noqa: BLE001 - a broken extension must stop start-up, loudly
            await send({"type": "lifespan.startup.failed", "message": f"extensions: {exc!r}"})
            return
        try:
            pool = UpstreamPool(settings, self._ssl_context)  # reads HTTPS_PROXY / NO_PROXY
        except ConfigError as exc:
            await send({"type": "lifespan.startup.failed", "message": f"configuration: {exc}"})
            return
        try:
            async with trio.open_nursery() as nursery:
                relay = HttpRelay(settings, pool, extensions)
                self.runtime = Runtime(settings, pool, relay, [], extensions)
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
                nursery.cancel_scope.cancel()
        finally:
            self.runtime = None
            with trio.CancelScope(shield=True):
                await pool.aclose()
        await send({"type": "lifespan.shutdown.complete"})

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

    # -- http ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("trioproxy received a request before lifespan start-up")
        settings = runtime.settings
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        ex = Exchange(
            request_id=adopt_request_id(hdr.get(headers, settings.request_id_header.encode())),
            method=scope["method"],
            path=raw_path.decode("latin-1"),
            provider=provider_hint(raw_path, headers),
            request_headers=headers,
        )
        token = request_id_var.set(ex.request_id)
        runtime.inflight[ex.request_id] = ex
        try:
            await self._handle(runtime, ex, scope, raw_path, receive, send)
        except Exception as exc:  # a proxy-side fault: 500 if we still can, never silent
            log.exception("proxy fault")
            ex.fail("proxy_error", f"{type(exc).__name__}: {exc}")
            if not ex.response_started:
                with trio.CancelScope(shield=True):
                    await send_error(send, ex, ProxyError("internal proxy error"))
        finally:
            await runtime.finish(ex)
            runtime.inflight.pop(ex.request_id, None)
            request_id_var.reset(token)

    async def _handle(
        self, runtime: Runtime, ex: Exchange, scope: Scope, raw_path: bytes,
        receive: Receive, send: Send,
    ) -> None:
        try:
            hdr.check_head_size(scope)  # the lead wires settings.max_head_bytes here
            lookup_id = usage_request_id(raw_path)
            if lookup_id is not None and ex.method == "GET":
                await self._usage_lookup(runtime, ex, lookup_id, send)
                return
            ex.route = resolve(ex.method, raw_path, ex.request_headers)
            if ex.route is None:
                raise ClientRequestError(
                    f"trioproxy has no route for {ex.method} {ex.path}: use /v1/messages, "
                    "/v1/chat/completions, /v1/responses, or the /anthropic/... and /openai/... "
                    "prefixes",
                    404,
                    "unknown_path",
                )
            ex.provider = ex.route.provider
            body = await read_body(receive, ex, runtime.settings.max_body_bytes)
        except ClientRequestError as exc:
            ex.fail(exc.kind, exc.message)
            await send_error(send, ex, exc)
            return
        if body is None:
            ex.fail("client_disconnect", "client disconnected while sending the body")
            return
        settings = runtime.settings
        ex.bypass = is_bypass(ex.request_headers, settings.bypass_header_names)
        ex.extra["trailers_ok"] = wants_trailers(scope)
        relay = runtime.relay
        base = relay.upstream_for(ex)
        query = scope.get("query_string", b"")
        target = base.prefix + ex.route.path + (b"?" + query if query else b"")
        has_body = bool(body) or ex.method in ("POST", "PUT", "PATCH")
        headers = hdr.upstream_request_headers(
            ex.request_headers, base.host_header, len(body) if has_body else None,
            drop=settings.bypass_header_names,
        )
        try:
            out = await prepare(
                ex, body, headers, runtime.extensions, include_usage=settings.include_usage
            )
        except ExtensionFailed as exc:
            ex.fail("extension_error", str(exc))
            await send_error(send, ex, ProxyError(f"request rejected: {exc}"))
            return
        await relay.relay(ex, base, target, out.headers, out.body, receive, send)

    async def _usage_lookup(
        self, runtime: Runtime, ex: Exchange, lookup_id: str, send: Send
    ) -> None:
        ex.extra["usage_lookup"] = True
        # A client that fetches usage the moment its stream ended can be a few milliseconds
        # ahead of finalisation: wait (bounded) for that exchange's record to exist.
        for other in list(runtime.inflight.values()):
            if lookup_id in (other.request_id, other.upstream_request_id) and other is not ex:
                with trio.move_on_after(10):
                    await other.finalised.wait()
        status, body = await answer_usage_lookup(
            lookup_id, ex.request_headers, runtime.writer, runtime.secret,
            runtime.settings.admin_token, ex.provider,
        )
        ex.end_reason = "complete" if status == 200 else "rejected"
        await send_json(send, ex, status, body)

    # -- websocket -------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("trioproxy received a websocket before lifespan start-up")
        from .websocket import relay_websocket

        await relay_websocket(runtime, scope, receive, send)


def wants_trailers(scope: Scope) -> bool:
    """The server can send trailers (HTTP/2) and the client asked for them (TE: trailers)."""
    if "http.response.trailers" not in scope.get("extensions", {}):
        return False
    te = b",".join(v for k, v in scope["headers"] if k == b"te").lower()
    return b"trailers" in [t.strip().split(b";")[0] for t in te.split(b",")]
