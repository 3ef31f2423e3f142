"""The usage writer: records go from trio tasks to the store without ever blocking the loop.

``submit()`` appends to a bounded in-memory queue under a lock that is only ever held for a few
deque operations. One dedicated thread, owned and joined by :func:`open_usage_writer`, drains the
queue in batches (whatever is queued, up to ``batch_size``: it never waits to fill a batch).

What happens to a record, in every case (none is lost; the store never holds one twice):

- the queue and the batch in flight hold at most ``max_pending`` records; past that a record
  goes to the spill file instead (a second thread appends it, so ``submit`` never does I/O),
  counted in ``statistics().overflowed``; once the store takes records again the writer
  streams the spill file back in, batch by batch, so memory stays bounded;
- while the store is down (or hangs: every store call is bounded by the store's timeout) the
  batch is kept and retried every ``retry_interval``, reconnecting, with one warning per outage;
  inserts are ``ON CONFLICT DO NOTHING``, so a retried batch that did land is not duplicated;
- a batch the store refuses for good (syntax, schema, data, constraint: not a connection
  problem) is written record by record; a refused record is sanitised and tried once more, and
  if the store still refuses it (while it accepts a plain record) it goes to the quarantine file
  next to the spill file, with one log line naming its request id; the others flow on;
- at shutdown the queue is flushed within ``shutdown_timeout``; what is left is appended to the
  spill file, which the next writer to start streams into the store (with one INFO line naming
  the file and its record count);
- if the writer thread's loop dies (a bug), it logs one ERROR, puts the batch in flight back in
  the queue and restarts every ``retry_interval``; ``statistics().writer_running`` is False
  (readiness fails) until a unit of work completes again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from .record import UsageRecord
from .spill import append_spill, quarantine_path_for
from .store import LOOKUP_LIMIT, Store, StoreUnavailable
from .writer_thread import WriterThread, close_quietly

__all__ = ["StoreUnavailable", "UsageWriter", "WriterStatistics", "append_spill",
           "open_usage_writer"]

LOG = logging.getLogger("trioproxy.accounting")

StoreFactory = Callable[[], Store]


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    queued: int  # records submitted
    written: int  # records stored (a duplicate request id counts as stored), spill re-reads too
    failed_attempts: int  # store attempts (connect or insert) that failed
    pending: int  # records in memory: queue + batch in flight (at most max_pending)
    spilled: int  # records appended to the spill file (overflow, shutdown, after close)
    overflowed: int  # of those, records that found the queue full
    reloaded: int  # records read back from a spill file and sent to the store
    sanitised: int  # records the store took only once sanitised
    quarantined: int  # records the store refused even sanitised (in the quarantine file)
    store_available: bool  # the last store attempt succeeded
    outage_seconds: float = 0.0  # how long the store has been unavailable (0 while available)
    spill_ok: bool = True  # the last append to the spill file worked
    writer_running: bool = True  # the writer thread is not crashing (readiness fails if so)


class UsageWriter(WriterThread):
    """Bounded queue + writer thread + spill thread. Create it with :func:`open_usage_writer`."""

    def __init__(
        self, store_factory: StoreFactory, *, batch_size: int, max_pending: int,
        retry_interval: float, spill_path: Path, quarantine_path: Path,
        lookup_timeout: float, log: logging.Logger, linger: float = 0.0,
        spill_after: float = float("inf"),
    ) -> None:
        super().__init__(store_factory, batch_size=min(max(1, batch_size), max(1, max_pending)),
                         retry_interval=retry_interval, spill_path=spill_path,
                         quarantine_path=quarantine_path, log=log, linger=linger,
                         spill_after=spill_after)
        self._max_pending = max(1, max_pending)
        self._lookup_timeout = lookup_timeout
        self._overflow: list[UsageRecord] = []  # waiting for the spill thread
        self._overflow_warned = False
        self._spill_wake = threading.Condition(self._lock)
        self._spiller_stop = False
        self._progress = trio.Event()
        self._stopped = trio.Event()
        self._reader: Store | None = None
        self._closed = False
        self._read_limiter = trio.CapacityLimiter(1)
        self._thread = threading.Thread(target=self._run, name="trioproxy-usage-writer", daemon=True)
        self._spiller = threading.Thread(target=self._run_spiller, name="trioproxy-usage-spill",
                                         daemon=True)

    # -- trio side -------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Queue a record for writing. Never blocks, never drops, never does I/O while the
        writer runs; callable from any task. After the writer has stopped, the record is
        appended to the spill file directly."""
        with self._lock:
            late = self._thread_done
            self._queued += 1
            full = len(self._queue) + len(self._inflight) >= self._max_pending
            if late:
                pass
            elif full:
                self._overflow.append(record)
                self._overflowed += 1
                self._spill_dirty = True
                self._spill_wake.notify()
            else:
                self._queue.append(record)
                if len(self._queue) in (1, self._batch_size):  # a first record, or a batch
                    self._cond.notify()
            warn = full and not late and not self._overflow_warned
            if warn:
                self._overflow_warned = True
        if late:  # the writer has already stopped: straight to the spill file
            self._spill([record], "submitted after the usage writer stopped")
        elif warn:
            self._log.warning("usage queue full (%d records; store slow or down): further "
                              "records go to %s until it drains", self._max_pending,
                              self.spill_path)

    def statistics(self) -> WriterStatistics:
        with self._lock:
            return WriterStatistics(
                queued=self._queued, written=self._written, failed_attempts=self._failed,
                pending=len(self._queue) + len(self._inflight), spilled=self._spilled,
                overflowed=self._overflowed, reloaded=self._reloaded, sanitised=self._sanitised,
                quarantined=self._quarantined, store_available=self._outage is None,
                outage_seconds=0.0 if self._outage is None
                else time.monotonic() - self._outage[0],
                spill_ok=self._spill_error is None,
                writer_running=not self._crashes and not self._stopped_early,
            )

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is in the store or the quarantine file,
        including what overflowed into the spill file (and anything found there at start).
        False on timeout."""
        target = self._queued
        with trio.move_on_after(timeout):
            while not self._flushed(target):
                await self._progress.wait()
        return self._flushed(target)

    def _flushed(self, target: int) -> bool:
        with self._lock:
            return self._done >= target and not self._spill_dirty and not self._draining

    async def lookup(
        self, id_any: str, *, key_fingerprint: str | None = None, limit: int = LOOKUP_LIMIT
    ) -> list[UsageRecord]:
        """Every record whose proxy, correlation, upstream or response id is ``id_any``, pending
        ones included, newest first, at most ``limit``; only ``key_fingerprint``'s when given.

        Raises :class:`StoreUnavailable` (its ``pending`` holds the in-memory matches) when the
        store cannot be read within ``lookup_timeout``.
        """
        pending = self._find_pending(id_any, key_fingerprint)
        try:
            with trio.fail_after(self._lookup_timeout):
                stored = await trio.to_thread.run_sync(
                    self._read, id_any, key_fingerprint, limit,
                    limiter=self._read_limiter, abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            raise StoreUnavailable(f"no answer within {self._lookup_timeout:g}s", pending) \
                from None
        except StoreUnavailable as exc:
            exc.pending = pending
            raise
        seen = {r.request_id for r in pending}
        found = pending + [r for r in stored if r.request_id not in seen]
        found.sort(key=lambda r: r.started_at, reverse=True)
        return found[:limit]

    def _find_pending(self, id_any: str, key_fingerprint: str | None) -> list[UsageRecord]:
        with self._lock:
            pending = [*self._inflight, *self._queue]
        return [r for r in pending if r.matches(id_any)
                and (key_fingerprint is None or r.key_fingerprint == key_fingerprint)]

    def _read(self, id_any: str, key_fingerprint: str | None, limit: int) -> list[UsageRecord]:
        """In a thread: the store's matches; any failure becomes :class:`StoreUnavailable`."""
        try:
            if self._closed:  # after shutdown: a one-off connection, not kept open
                store = self._connect()
                try:
                    return store.find(id_any, key_fingerprint=key_fingerprint, limit=limit)
                finally:
                    store.close()
            self._reader = self._reader or self._connect()
            return self._reader.find(id_any, key_fingerprint=key_fingerprint, limit=limit)
        except Exception as exc:
            close_quietly(self._reader)
            self._reader = None
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _on_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _notify_progress(self) -> None:  # from the threads
        self._call_trio(self._on_progress)

    def _notify_stopped(self) -> None:
        self._call_trio(self._stopped.set)

    def _call_trio(self, fn: Callable[[], object]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    async def _start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()
        self._spiller.start()

    async def _aclose(self, timeout: float) -> None:
        """Drain within ``timeout``; spill what is left; join the threads. Call shielded."""
        with self._lock:
            self._closing = True
            self._cond.notify_all()
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        with self._lock:
            self._abandon.set()
            self._cond.notify_all()
            left = [*([] if self._inflight_reloaded else self._inflight), *self._queue]
            self._queue.clear()
            self._thread_done = True  # later submits go straight to the spill file
            self._spiller_stop = True
            self._spill_wake.notify_all()
        if left:
            self._log.error("usage store did not take %d records within %gs of shutdown",
                            len(left), timeout)
            await trio.to_thread.run_sync(self._spill, left, "not written before shutdown")
        for thread in (self._spiller, self._thread):
            await trio.to_thread.run_sync(thread.join, 1.0)
        if self._thread.is_alive():
            self._log.error("usage writer thread is stuck in the store; leaving it (daemon)")
        self._closed = True
        await trio.to_thread.run_sync(close_quietly, self._reader, limiter=self._read_limiter)
        self._reader = None

    # -- spill thread ----------------------------------------------------------------------

    def _run_spiller(self) -> None:
        while True:
            with self._lock:
                while not self._overflow and not self._spiller_stop:
                    self._spill_wake.wait()
                records, self._overflow = self._overflow, []
                if not records and self._spiller_stop:
                    return
            self._spill(records, "overflowed the usage queue", quiet=True)
            with self._lock:
                if len(self._queue) + len(self._inflight) <= self._max_pending // 2:
                    self._overflow_warned = False
                self._cond.notify()  # the writer streams them back once the store is up


@asynccontextmanager
async def open_usage_writer(
    store_factory: StoreFactory, *, spill_path: str | os.PathLike[str],
    quarantine_path: str | os.PathLike[str] | None = None, batch_size: int = 200,
    max_pending: int = 10_000, retry_interval: float = 1.0, shutdown_timeout: float = 5.0,
    lookup_timeout: float = 15.0, log: logging.Logger = LOG, linger: float = 0.0,
    spill_after: float = float("inf"),
) -> AsyncIterator[UsageWriter]:
    """Run a :class:`UsageWriter` for the duration of the block.

    ``store_factory`` opens a store (called in the writer thread, again after failures); its
    calls should be bounded (see :func:`~.store.open_store`'s ``timeout``). ``spill_path``:
    use :func:`~.store.spill_path_for`; ``quarantine_path`` defaults to
    :func:`~.spill.quarantine_path_for` of it. ``lookup_timeout`` bounds one look-up.
    ``linger``: seconds the writer waits after a record for more to batch with it.
    ``spill_after``: seconds of store outage after which records go to the spill file at once
    instead of waiting in memory (store retries go on at ``retry_interval``). On exit
    everything queued is written within ``shutdown_timeout`` seconds (shielded from
    cancellation); the rest goes to the spill file.
    """
    spill = Path(spill_path)
    writer = UsageWriter(
        store_factory, batch_size=batch_size, max_pending=max_pending, linger=linger,
        retry_interval=retry_interval, spill_path=spill,
        quarantine_path=Path(quarantine_path) if quarantine_path else quarantine_path_for(spill),
        lookup_timeout=lookup_timeout, log=log, spill_after=spill_after,
    )
    await writer._start()
    try:
        yield writer
    finally:
        with trio.CancelScope(shield=True):
            await writer._aclose(shutdown_timeout)
