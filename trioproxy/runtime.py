"""What lives from lifespan start-up to shutdown, the one place an exchange is finalised, and
the drain before exit."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .accounting.build import build_record
from .config.settings import Settings
from .exchange import Exchange
from .extensions import ExtensionManager
from .log import access_enabled, log_access
from .upstream import UpstreamPool

log = logging.getLogger("trioproxy")

Finaliser = Callable[[Exchange], Awaitable[None]]  # run once per exchange, at finalisation

# Seconds before the graceful timeout at which WebSockets still busy are closed with 1012
# (service restart) rather than cut by Hypercorn without a close frame.
WS_CLOSE_MARGIN = 1.0


@dataclass(eq=False)
class DrainState:
    """Where this process's drain is: serving (``started`` None), the grace period (readiness
    fails, requests are served), refusing (``refusing`` set: new requests get 503)."""

    started: float | None = None  # trio time the drain began
    refusing: trio.Event = field(default_factory=trio.Event)
    ws_close_at: float = float("inf")  # trio time: WebSockets still busy then are closed


@dataclass(eq=False)
class Runtime:
    """Resources that live from lifespan start-up to shutdown (owned by the lifespan task)."""

    settings: Settings
    pool: UpstreamPool
    extensions: ExtensionManager
    finalisers: list[Finaliser] = field(default_factory=list)
    inflight: dict[str, Exchange] = field(default_factory=dict)  # by proxy request id
    writer: Any = None  # accounting.writer.UsageWriter when accounting is on
    secret: bytes = b""  # key-fingerprint secret
    metrics: Any = None  # metrics.Metrics when /metrics is on
    reader: Any = None  # dashboard.UsageReader when accounting is on
    sockets: int = 0  # open WebSocket connections
    drain_state: DrainState = field(default_factory=lambda: DrainState())
    refused: int = 0  # requests refused while draining
    worker_restarts: Callable[[], int] | None = None  # trioproxy serve: workers restarted

    @property
    def unready(self) -> bool:
        """Draining: readiness fails (new requests are still served in the grace period)."""
        return self.drain_state.started is not None

    @property
    def draining(self) -> bool:
        """Draining past the grace period: new requests get 503."""
        return self.drain_state.refusing.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        assert value, "a drain is not undone"
        self.drain_state.refusing.set()

    async def observe(self, ex: Exchange) -> None:
        """Finaliser: the exchange's metrics."""
        self.metrics.observe(ex)

    def busy(self) -> int:
        """Proxied requests and WebSocket connections in flight."""
        return len(self.inflight) + self.sockets

    def scrape_figures(self) -> dict[str, Any]:
        """What ``Metrics.refresh`` reads at scrape time."""
        return {
            "in_flight": self.busy(), "draining": self.unready,
            "pool": self.pool.origin_statistics(),
            "writer": self.writer.statistics() if self.writer is not None else None,
            "worker_restarts": self.worker_restarts() if self.worker_restarts else 0,
        }

    async def drain(
        self, timeout: float, *, grace: float = 0.0, notice: float = 0.0,
        hurry: Callable[[], bool] = lambda: False,
    ) -> float:
        """Drain before exit, in two phases, within ``timeout`` seconds (or until ``hurry()``):

        1. for ``grace`` seconds readiness fails but new requests are still served, so a load
           balancer's health check takes this instance out before any client is refused;
        2. then new requests get 503 (``Connection: close``, ``retry-after``) until nothing
           is in flight and at least ``notice`` seconds have passed. Each Responses WebSocket
           closes with 1012 (service restart) once no response is in flight on it, or
           ``WS_CLOSE_MARGIN`` before the timeout whatever runs.

        Logs one line when it starts, one when refusing starts, one when it ends. Returns the
        seconds left of ``timeout`` (what in-flight streams still get)."""
        start, busy = trio.current_time(), self.busy()
        state, deadline = self.drain_state, start + timeout
        state.started, state.ws_close_at = start, deadline - min(WS_CLOSE_MARGIN, timeout / 2)
        log.warning("draining: readiness fails; new requests are served for %gs more, then get "
                    "503; %d in flight, waiting up to %gs for them", grace, busy, timeout)
        await _sleep_until(min(start + grace, deadline), hurry)
        state.refusing.set()  # and WebSockets close (1012) once their response in flight ended
        refusing, busy = trio.current_time(), self.busy()
        if grace:
            log.warning("drain: grace period over, new requests get 503; %d in flight", busy)
        while trio.current_time() < deadline and not hurry() and (
                self.busy() or trio.current_time() < refusing + notice):
            await trio.sleep(min(0.05, max(0.0, deadline - trio.current_time())))
        now, left = trio.current_time(), self.busy()
        remaining = 0.0 if hurry() else max(0.0, deadline - now)
        log.warning("drain ended after %.1fs: %d of %d in flight finished, %d new requests "
                    "refused, %d still running%s", now - start, max(0, busy - left), busy,
                    self.refused, left, " (cut now)" if left and not remaining else "")
        return remaining

    async def record_usage(self, ex: Exchange) -> None:
        """Finaliser: record the exchange's usage (build its record, queue it for the store), then
        run complete hooks."""
        rec = build_record(ex, self.secret)
        if self.writer is not None:
            self.writer.submit(rec)
        if self.extensions.has_complete_hooks:
            await self.extensions.run_complete(ex.hook_context(), rec)

    async def finalise(self, ex: Exchange, *, recorded: bool = True, logged: bool = True) -> None:
        """Finalise one exchange exactly once: decide its outcome, write the access line, then
        run every finaliser (accounting, complete hooks). Shielded; a second call returns.

        ``recorded=False`` (reads of the ledger itself) writes the access line only: those are
        not proxied traffic and would skew per-key request counts. ``logged=False`` (health
        and readiness probes) writes not even that."""
        with trio.CancelScope(shield=True):
            if ex.life.done:
                return
            ex.life.decide()
            ex.finalised_at = trio.current_time()
            if logged and access_enabled():  # no fields built when no line is written
                log_access(ex.access_fields())
            try:
                if recorded:
                    await self._run_finalisers(ex)
            finally:
                ex.finalised.set()

    async def _run_finalisers(self, ex: Exchange) -> None:
        for finaliser in self.finalisers:
            try:
                await finaliser(ex)
            except Exception:
                log.exception("finaliser %r failed", finaliser)


async def _sleep_until(deadline: float, hurry: Callable[[], bool]) -> None:
    """Sleep until ``deadline`` (trio time), checking ``hurry()`` every 50 ms."""
    while not hurry() and trio.current_time() < deadline:
        await trio.sleep(min(0.05, deadline - trio.current_time()))
