"""What lives from lifespan start-up to shutdown, and the one place an exchange is finalised."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .config import Settings
from .exchange import Exchange
from .extensions import ExtensionManager
from .ledger import build_record
from .log import log_access
from .payload import hook_context
from .upstream import UpstreamPool

log = logging.getLogger("trioproxy")

Finisher = Callable[[Exchange], Awaitable[None]]


@dataclass(eq=False)
class Runtime:
    """Resources that live from lifespan start-up to shutdown (owned by the lifespan task)."""

    settings: Settings
    pool: UpstreamPool
    extensions: ExtensionManager
    finishers: list[Finisher] = field(default_factory=list)
    inflight: dict[str, Exchange] = field(default_factory=dict)  # by proxy request id
    writer: Any = None  # accounting.writer.UsageWriter when accounting is on
    secret: bytes = b""  # key-fingerprint secret

    async def record(self, ex: Exchange) -> None:
        """Finisher: build the usage record, queue it for the store, run complete hooks."""
        rec = build_record(ex, self.secret)
        if self.writer is not None:
            self.writer.submit(rec)
        if self.extensions.has_complete_hooks:
            await self.extensions.run_complete(hook_context(ex), rec)

    async def finish(self, ex: Exchange, *, recorded: bool = True) -> None:
        """Finalise one exchange exactly once: decide its outcome, write the access line, then
        run every finisher (accounting, complete hooks). Shielded; a second call returns.

        ``recorded=False`` (reads of the ledger itself) writes the access line only: those are
        not proxied traffic and would skew per-key request counts."""
        with trio.CancelScope(shield=True):
            if ex.life.done:
                return
            ex.life.finish()
            ex.finished_at = trio.current_time()
            log_access(ex.access_fields())
            try:
                if recorded:
                    await self._run_finishers(ex)
            finally:
                ex.finalised.set()

    async def _run_finishers(self, ex: Exchange) -> None:
        for finisher in self.finishers:
            try:
                await finisher(ex)
            except Exception:
                log.exception("finaliser %r failed", finisher)
