"""The writer thread of :class:`~.writer.UsageWriter`: batches, retries, isolation of refused
records (sanitise, then quarantine), and streaming the spill file back into the store.

Plain threads and a lock; nothing here touches trio except through the ``_notify_*`` hooks the
trio side provides.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from .record import UsageRecord
from .redact import redact_dsn
from .spill import append_spill, take_spill
from .store import Store

__all__ = ["WriterThread", "close_quietly"]

# How a chunk of records is being tried: as a batch, one record alone, or one record sanitised.
_BATCH, _ALONE, _SANITISED = "batch", "alone", "sanitised"
# What the thread does next: write a batch, stream the spill file in (a store retry during a long
# outage), or put records straight into the spill file (the outage is older than spill_after).
_WRITE, _RELOAD, _SPILL = "write", "reload", "spill"


class _StillDown(Exception):
    """A spill file being streamed back met the store still down, past spill_after: keep the
    file for the next retry instead of holding the thread (and the queue) in a retry loop."""


class WriterThread:
    """State shared with the trio side, and the loop run by the writer thread."""

    def __init__(
        self, store_factory: Callable[[], Store], *, batch_size: int, retry_interval: float,
        spill_path: Path, quarantine_path: Path, log: logging.Logger, linger: float = 0.0,
        spill_after: float = float("inf"),
    ) -> None:
        self._factory = store_factory
        # Seconds of outage after which records go to the spill file rather than wait in
        # memory (what a SIGKILL or an OOM kill could lose); store retries go on meanwhile.
        self._spill_after = spill_after
        self._next_retry = 0.0  # monotonic time of the next store retry, once spilling
        self._spill_error: str | None = None  # the last spill append failed (cleared on success)
        self._batch_size = batch_size
        # Seconds the thread waits, after a record arrives, for more to write in the same
        # transaction: one wake-up and one commit per batch instead of per record (each wake-up
        # takes the GIL from the event loop).
        self._linger = linger
        self._retry_interval = retry_interval
        self.spill_path = spill_path
        self.quarantine_path = quarantine_path
        self._log = log
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []
        self._inflight_reloaded = False  # the batch in flight came from the spill file
        self._closing = False  # drain, then stop
        self._abandon = threading.Event()  # stop now: the caller spills what is left
        self._thread_done = False
        self._spill_dirty = True  # the spill file may hold records (set at start: look once)
        self._draining = False
        self._queued = self._done = self._written = self._failed = 0
        self._overflowed = self._spilled = self._reloaded = 0
        self._sanitised = self._quarantined = 0
        self._outage: tuple[float, int] | None = None  # (since, failed attempts at start)
        self._crashes = 0  # the thread's loop died this many times in a row (0: healthy)
        self._stopped_early = False  # the thread ended without being asked to (a bug)
        self._startup_drain = True  # the first spill drain re-queues an earlier run's file

    def _notify_progress(self) -> None:
        raise NotImplementedError

    def _notify_stopped(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        """The thread: its loop, restarted every ``retry_interval`` after a crash (a bug);
        meanwhile ``statistics().writer_running`` is False (readiness fails). Records in
        flight go back to the queue."""
        store: Store | None = None
        done = False
        try:
            while not done:
                try:
                    store = self._loop(store)
                    done = True
                except Exception as exc:  # noqa: BLE001 - a bug must not strand the queue
                    close_quietly(store)
                    store = None
                    self._crashed(exc)
                    done = self._abandon.wait(self._retry_interval)
        finally:
            close_quietly(store)
            with self._lock:
                if not done:  # died another way: submit() spills directly from now on
                    self._stopped_early = self._thread_done = True
            self._notify_stopped()

    def _loop(self, store: Store | None) -> Store | None:
        while (work := self._next_work()) is not None:
            what, records = work
            if what == _WRITE:
                store = self._write(store, records)
            elif what == _SPILL:
                self._spill(records, "waited out a usage-store outage", quiet=True)
            else:
                store = self._drain_spill(store)
            if self._crashes:
                self._came_back()
        return store

    def _crashed(self, exc: Exception) -> None:
        """One ERROR (with the traceback) per run of crashes, however long it lasts."""
        with self._lock:
            self._crashes += 1
            first = self._crashes == 1
            if self._inflight and not self._inflight_reloaded:  # a reloaded batch stays in
                self._queue.extendleft(reversed(self._inflight))  # its spill file
            self._inflight, self._inflight_reloaded = [], False
            self._spill_dirty = True  # a drain it cut short: look again
            pending = len(self._queue)
        if first:
            self._log.error("usage writer thread crashed (%s); %d records kept in memory, "
                            "restarting it every %gs; readiness fails until it writes again",
                            type(exc).__name__, pending, self._retry_interval, exc_info=exc)
        else:
            self._log.debug("usage writer thread crashed again: %r", exc)

    def _came_back(self) -> None:
        with self._lock:
            crashes, self._crashes = self._crashes, 0
        self._log.warning("usage writer thread works again after %d crashes", crashes)

    def _next_work(self) -> tuple[str, list[UsageRecord]] | None:
        """What to do next (a batch to write, records to spill, or a spill file to stream
        in); None to stop."""
        with self._lock:
            while True:
                if self._abandon.is_set() or (self._closing and not self._queue):
                    self._thread_done = True  # from now on, submit() spills directly
                    return None
                if self._spill_due():  # a long outage: to disk at once, retry at the interval
                    if self._queue:
                        records = list(self._queue)
                        self._queue.clear()
                        return _SPILL, records
                    if not self._spill_dirty:  # nothing to retry with yet
                        self._cond.wait()
                        continue
                    wait = self._next_retry - time.monotonic()
                    if wait <= 0:
                        self._next_retry = time.monotonic() + self._retry_interval
                        return _RELOAD, []
                    self._cond.wait(wait)
                    continue
                if self._queue or self._closing or self._spill_dirty:
                    break
                self._cond.wait()
            self._linger_for_more()
            return (_WRITE, self._take_batch()) if self._queue else (_RELOAD, [])

    def _spill_due(self) -> bool:  # with the lock held
        """The store has been down for spill_after seconds, and the spill file works."""
        return self._outage is not None and self._spill_error is None and \
            time.monotonic() - self._outage[0] >= self._spill_after

    def _linger_for_more(self) -> None:  # with the lock held
        deadline = time.monotonic() + self._linger
        while self._queue and len(self._queue) < self._batch_size and not self._closing \
                and not self._abandon.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take_batch(self) -> list[UsageRecord]:  # with the lock held, queue not empty
        n = min(self._batch_size, len(self._queue))
        self._inflight = [self._queue.popleft() for _ in range(n)]
        self._inflight_reloaded = False
        return list(self._inflight)

    # -- writing ---------------------------------------------------------------------------

    def _write(self, store: Store | None, batch: list[UsageRecord], *,
               reloaded: bool = False) -> Store | None:
        """Store ``batch``, retrying transient failures until done or abandoned; records the
        store refuses are isolated, sanitised, then quarantined. Returns the live store."""
        chunks: deque[tuple[str, list[UsageRecord]]] = deque([(_BATCH, batch)])
        retried = reloaded  # a retry (or a re-read) may find its records already stored
        while chunks and not self._abandon.is_set():
            how, chunk = chunks[0]
            began = time.monotonic()
            try:
                store = store or self._connect()
                added = store.insert_many(chunk)
            except Exception as exc:  # noqa: BLE001 - every failure is retried or isolated
                if store is None or store.is_transient(exc) or not _probe(store):
                    self._failure(exc, began)
                    retried = True
                    close_quietly(store)
                    store = None
                    if self._to_disk(chunks, reloaded=reloaded):
                        return None
                    self._abandon.wait(self._retry_interval)
                    continue
                chunks.popleft()
                self._refused(chunks, how, chunk, exc)
                continue
            chunks.popleft()
            if added < len(chunk):
                self._duplicates(len(chunk) - added, len(chunk), expected=retried)
            self._recovered()
            self._set_inflight((c for _, c in chunks), len(chunk), reloaded=reloaded,
                               sanitised=len(chunk) if how == _SANITISED else 0)
        return store

    def _to_disk(self, chunks: deque[tuple[str, list[UsageRecord]]], *, reloaded: bool) -> bool:
        """After a failed attempt: once the outage is spill_after old, hand what waits in
        memory (this batch and the queue) to the spill file and give up the batch (True);
        a spill file being streamed back is kept for the next retry instead."""
        with self._lock:
            if not self._spill_due():
                return False
            self._next_retry = time.monotonic() + self._retry_interval
            waiting = list(self._queue)
            self._queue.clear()
        if reloaded:
            self._spill(waiting, "waited out a usage-store outage", quiet=True)
            raise _StillDown
        self._spill([r for _, c in chunks for r in c] + waiting,
                    "waited out a usage-store outage", quiet=True, inflight=True)
        return True

    def _duplicates(self, n: int, of: int, *, expected: bool) -> None:
        if expected:  # a retried batch whose first attempt had landed, or a re-read spill
            self._log.debug("usage: %d of %d records were already stored", n, of)
        else:  # request ids are the proxy's own: a clash is a bug worth seeing
            self._log.warning("usage: %d of %d records had a request id already in the ledger "
                              "and were not written again", n, of)

    def _refused(self, chunks: deque[tuple[str, list[UsageRecord]]], how: str,
                 chunk: list[UsageRecord], exc: Exception) -> None:
        """The next step for a chunk the store refused for good (and that is not the store's
        fault: it still takes a plain record)."""
        if how == _BATCH and len(chunk) > 1:
            chunks.extendleft((_ALONE, [r]) for r in reversed(chunk))
        elif how != _SANITISED:
            chunks.appendleft((_SANITISED, [chunk[0].sanitised()]))
        else:
            self._quarantine(chunk[0], exc)

    def _connect(self) -> Store:
        store = self._factory()
        try:
            store.migrate()
        except BaseException:
            close_quietly(store)
            raise
        return store

    def _set_inflight(self, chunks: Iterable[list[UsageRecord]], written: int, *,
                      reloaded: bool, sanitised: int = 0) -> None:
        with self._lock:
            self._inflight = [r for c in chunks for r in c]
            self._written += written
            self._sanitised += sanitised
            if not reloaded:
                self._done += written
        if written:
            self._notify_progress()

    def _failure(self, exc: Exception, began: float) -> None:
        """One failed store attempt; an outage starts when its first failed attempt began."""
        with self._lock:
            self._failed += 1
            pending = len(self._queue) + len(self._inflight)
            first = self._outage is None
            if first:
                self._outage = (began, self._failed - 1)
        if first:
            self._log.warning(
                "usage store unavailable (%s: %s); %d records pending, retrying every %gs",
                type(exc).__name__, redact_dsn(str(exc)), pending, self._retry_interval,
            )
        else:
            self._log.debug("usage store still unavailable: %s", redact_dsn(str(exc)))

    def _recovered(self) -> None:
        with self._lock:
            outage, self._outage = self._outage, None
            attempts = self._failed - (outage[1] if outage else 0)
        if outage is not None:
            self._log.warning("usage store available again after %.1fs (%d failed attempts)",
                              time.monotonic() - outage[0], attempts)

    # -- the spill and quarantine files ----------------------------------------------------

    def _drain_spill(self, store: Store | None) -> Store | None:
        """Stream spill files into the store, fresh records first; keep the file if stopped.
        During a long outage (a retry): connect first, and leave the files alone if that fails."""
        with self._lock:
            retrying = self._spill_due()
        if retrying and store is None:
            began = time.monotonic()
            try:
                store = self._connect()
            except Exception as exc:  # noqa: BLE001 - still down: the next retry will tell
                self._failure(exc, began)
                return None
        with self._lock:
            self._spill_dirty, self._draining = False, True
            startup, self._startup_drain = self._startup_drain, False
        try:
            for taken in take_spill(self.spill_path):
                try:
                    if startup:
                        self._log.info("usage: re-queuing %d records from a spill file left by "
                                       "an earlier run: %s", taken.count(), taken.origin)
                    for records in taken.batches(self._batch_size, self._log):
                        store = self._write_queue_first(store)
                        if self._stopping():
                            return store
                        with self._lock:
                            self._inflight, self._inflight_reloaded = list(records), True
                            self._reloaded += len(records)
                        try:
                            store = self._write(store, records, reloaded=True)
                        except _StillDown:  # the file stays; the next retry streams it again
                            with self._lock:
                                self._inflight, self._spill_dirty = [], True
                                self._reloaded -= len(records)
                            return None
                        if self._abandon.is_set():
                            return store
                    taken.remove()
                finally:
                    taken.close()
        except OSError as exc:  # keep the file for the next start; do not spin on it
            self._log.error("usage: cannot read the spill file %s: %s", self.spill_path, exc)
        finally:
            with self._lock:
                self._draining = False
            self._notify_progress()
        return store

    def _write_queue_first(self, store: Store | None) -> Store | None:
        while not self._abandon.is_set():
            with self._lock:
                if not self._queue:
                    return store
                batch = self._take_batch()
            store = self._write(store, batch)
        return store

    def _stopping(self) -> bool:
        with self._lock:
            return self._closing or self._abandon.is_set()

    def _quarantine(self, record: UsageRecord, exc: Exception) -> None:
        try:
            append_spill(self.quarantine_path, [record])
            self._log.error("usage: record %s refused by the store even sanitised (%s); "
                            "quarantined in %s", record.request_id, type(exc).__name__,
                            self.quarantine_path)
        except OSError as err:
            self._log.critical("usage: record %s refused by the store and the quarantine file "
                               "failed (%s): %s", record.request_id, err,
                               json.dumps(record.sanitised().to_dict(), default=str))
        with self._lock:
            self._quarantined += 1
            if not self._inflight_reloaded:
                self._done += 1
        self._notify_progress()

    def _spill(self, records: list[UsageRecord], why: str, *, quiet: bool = False,
               inflight: bool = False) -> None:
        """Append records to the spill file (any thread); log them if even that fails.
        ``inflight``: they are the batch in flight, which is then done."""
        if not records:
            return
        try:
            append_spill(self.spill_path, records)
            self._spill_error = None
            log = self._log.debug if quiet else self._log.error
            log("usage: %d records %s; saved to %s (streamed into the store later)",
                len(records), why, self.spill_path)
        except OSError as exc:
            self._spill_error = str(exc)
            self._log.critical("usage: %d records %s and the spill file %s failed (%s); "
                               "records follow", len(records), why, self.spill_path, exc)
            for r in records:
                self._log.critical("usage record: %s",
                                   json.dumps(r.sanitised().to_dict(), default=str))
        with self._lock:
            if inflight:
                self._inflight = []
            self._spilled += len(records)
            self._done += len(records)
            self._spill_dirty = True
            self._cond.notify()
        self._notify_progress()


def _probe(store: Store) -> bool:
    """True when the store takes a plain record: then a refusal is the records' fault."""
    try:
        store.probe()
    except Exception:  # noqa: BLE001 - any failure means the store itself is at fault
        return False
    return True


def close_quietly(store: Store | None) -> None:
    if store is not None:
        try:
            store.close()
        except Exception:  # closing a broken connection may fail; it is gone anyway
            logging.getLogger("trioproxy.accounting").debug("closing the usage store failed",
                                                             exc_info=True)
