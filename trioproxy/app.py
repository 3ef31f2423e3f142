"""The raw ASGI application: lifespan, and dispatch of http / websocket scopes.

The app owns the shared resources (upstream pool, usage store writer) for the lifetime of the
server: they are opened in lifespan start-up (the writer on an exit stack around the lifespan
task's nursery, which runs the metrics publisher) and closed at shutdown. Requests get those
resources explicitly; nothing lives at module level. A request is taken in by :mod:`.intake`
and relayed by :mod:`.relay.http`.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Sequence
from contextlib import AsyncExitStack

import sniffio
import trio

from .asgi import (
    Receive,
    Scope,
    Send,
    error_messages,
    send_all,
)
from .config.settings import ConfigError, Settings
from .endpoints.dispatch import answer_own
from .endpoints.health import is_probe, refuse_draining
from .endpoints.usage_lookup import answer_usage_lookup, usage_request_id
from .errors import ProxyError
from .exchange import Exchange
from .extensions import Extension, ExtensionManager, load_extensions
from .intake import Intake, open_exchange
from .limits import raise_open_files, report_open_files
from .log import request_id_var, setup_logging
from .protocol.lifecycle import End
from .protocol.routing import is_own_path
from .relay.http import HttpRelay
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
            async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
                runtime = Runtime(settings, pool, extensions)
                self._relay = HttpRelay(settings, pool, extensions, runtime.finalise)
                self.runtime = runtime
                try:
                    await self._startup_extras(stack, nursery, settings)
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
        files = raise_open_files()  # before the settings: max_connections "auto" reads it
        try:
            settings = self._settings or Settings.from_env()
        except ConfigError as exc:
            raise StartupFailed(f"configuration: {exc}") from None
        if self._configure_logging:
            setup_logging(settings.log_level, settings.log_format)
        report_open_files(files, settings.max_connections)
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

    async def _startup_extras(
        self, stack: AsyncExitStack, nursery: trio.Nursery, settings: Settings
    ) -> None:
        """Accounting (record -> store writer) and complete hooks, as finalisers in order. The
        ledger stays open on ``stack`` until the lifespan ends (after ``nursery``)."""
        runtime = self.runtime
        assert runtime is not None
        if settings.accounting:
            from .accounting.ledger import open_ledger

            runtime.writer, runtime.secret = await stack.enter_async_context(open_ledger(settings))
        else:
            runtime.secret = secrets.token_bytes(32)  # records still go to complete hooks
        if settings.accounting or runtime.extensions.has_complete_hooks:
            runtime.finalisers.append(runtime.record_usage)
        if settings.metrics:
            from .metrics import Metrics

            runtime.metrics = Metrics(accounting=settings.accounting)
            runtime.finalisers.append(runtime.observe)
            if runtime.metrics.multiprocess:  # the other workers' scrapes read our files
                nursery.start_soon(runtime.metrics.run_publisher, runtime.scrape_figures)
        if settings.accounting and settings.dashboard:
            from .endpoints.dashboard import UsageReader

            runtime.reader = UsageReader(settings)

    # -- http ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime, relay = self.runtime, self._relay
        if runtime is None or relay is None:
            raise RuntimeError("trioproxy received a request before lifespan start-up")
        ex = open_exchange(scope, runtime.settings)
        raw_path = ex.path.encode("latin-1")
        token = request_id_var.set(ex.log_label())
        own = is_own_path(raw_path)  # never forwarded, never a usage row, always answered
        lookup_id = usage_request_id(raw_path) if ex.method == "GET" and not own else None
        if not own:
            runtime.inflight[ex.request_id] = ex
        try:
            if own:
                await answer_own(runtime, ex, scope, receive, send)
            elif runtime.draining:
                await refuse_draining(runtime, ex, scope, send)
            elif lookup_id is not None:
                await answer_usage_lookup(runtime, ex, lookup_id, send)
            else:
                await self._forward(runtime, relay, ex, scope, receive, send)
        except Exception as exc:  # a proxy-side fault: 500 if we still can, never silent
            log.exception("proxy fault")
            if ex.life.done:  # finalised early (a stalled client): nothing left to tell
                return
            ex.fail(End.PROXY_ERROR, f"{type(exc).__name__}: {exc}")
            if not ex.response_started:
                with trio.CancelScope(shield=True):
                    await send_all(send, ex, error_messages(ex, ProxyError("internal proxy error")))
        finally:
            await runtime.finalise(ex, recorded=lookup_id is None and not own,
                                 logged=runtime.settings.log_probes or not is_probe(raw_path))
            runtime.inflight.pop(ex.request_id, None)
            request_id_var.reset(token)

    @staticmethod
    async def _forward(runtime: Runtime, relay: HttpRelay, ex: Exchange, scope: Scope,
                       receive: Receive, send: Send) -> None:
        """Take the request in (:mod:`.intake`), then relay it; a refusal is answered here."""
        intake = Intake(ex, scope, receive, runtime.settings, runtime.extensions)
        try:
            request = await intake.take_in()
        except ProxyError as exc:
            await intake.refuse(exc, send)
            return
        if request is not None:
            await relay.relay(ex, request, receive, send)

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

