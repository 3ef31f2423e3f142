"""The usage writer: records go from trio tasks to the store without ever blocking the loop.

``submit()`` appends to an in-memory queue under a lock that is only ever held for a few
deque operations. One dedicated thread, owned and joined by :func:`open_usage_writer`, drains the
queue in batches (whatever is queued, up to ``batch_size``: it never waits to fill a batch).

Nothing is dropped:

- over ``max_queue`` records are still kept (the backlog is counted and warned about once);
- while the store is down the batch is kept and retried every ``retry_interval``, reconnecting,
  with one warning per outage; inserts are ``ON CONFLICT DO NOTHING``, so a retried batch that
  did land the first time is not duplicated;
- a record the store refuses for good (not a connection problem) is isolated from its batch and
  appended to the spill file, loudly;
- at shutdown the queue is flushed within ``shutdown_timeout``; what is left is appended to the
  spill file (JSON lines, ``flock``-ed, so worker processes can share it), and the next writer to
  start takes that file over and inserts it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from .record import UsageRecord
from .store import Store, data_dir

__all__ = ["UsageWriter", "WriterStatistics", "append_spill", "open_usage_writer", "read_spill"]

LOG = logging.getLogger("trioproxy.accounting")

StoreFactory = Callable[[], Store]


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    queued: int  # records accepted (submitted, or loaded from the spill file)
    written: int  # records stored (a duplicate request id counts as stored)
    failed_attempts: int  # store attempts (connect or insert) that failed
    pending: int  # accepted but not yet stored or spilled (queue + batch in flight)
    backlog: int  # pending records beyond max_queue
    overflowed: int  # submits that found the queue over max_queue
    spilled: int  # records appended to the spill file
    store_available: bool  # the last store attempt succeeded


class UsageWriter:
    """Queue + writer thread. Create it with :func:`open_usage_writer`."""

    def __init__(
        self, store_factory: StoreFactory, *, batch_size: int, max_queue: int,
        retry_interval: float, spill_path: Path, log: logging.Logger,
    ) -> None:
        self._factory = store_factory
        self._batch_size = max(1, batch_size)
        self._max_queue = max_queue
        self._retry_interval = retry_interval
        self.spill_path = spill_path
        self._log = log
        self._cond = threading.Condition()
        self._queue: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []
        self._closing = False  # drain, then stop
        self._abandon = threading.Event()  # stop now: the caller spills what is left
        self._thread_done = False
        self._queued = self._done = self._written = self._failed = 0
        self._overflowed = self._spilled = 0
        self._overflow_warned = False
        self._outage: tuple[float, int] | None = None  # (since, failed attempts at start)
        self._token = trio.lowlevel.current_trio_token()
        self._progress = trio.Event()
        self._stopped = trio.Event()
        self._reader: Store | None = None
        self._closed = False
        self._read_limiter = trio.CapacityLimiter(1)
        self._thread = threading.Thread(target=self._run, name="trioproxy-usage-writer", daemon=True)

    # -- trio side -------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Queue a record for writing. Never blocks, never drops; callable from any task.

        After the writer has stopped, the record is appended to the spill file directly.
        """
        size = 0
        with self._cond:
            late = self._thread_done
            self._queued += 1
            if not late:
                self._queue.append(record)
                size = len(self._queue)
                if size > self._max_queue:
                    self._overflowed += 1
                self._cond.notify()
        if late:  # the writer has already stopped: straight to the spill file
            self._spill([record], "submitted after the usage writer stopped")
        elif size > self._max_queue and not self._overflow_warned:
            self._overflow_warned = True
            self._log.warning("usage queue over %d records (store slow or down); keeping them all",
                              self._max_queue)
        elif self._overflow_warned and size <= self._max_queue // 2:
            self._overflow_warned = False

    def statistics(self) -> WriterStatistics:
        with self._cond:
            pending = len(self._queue) + len(self._inflight)
            return WriterStatistics(
                queued=self._queued, written=self._written, failed_attempts=self._failed,
                pending=pending, backlog=max(0, pending - self._max_queue),
                overflowed=self._overflowed, spilled=self._spilled,
                store_available=self._outage is None,
            )

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (or spilled); False on timeout."""
        target = self._queued
        with trio.move_on_after(timeout):
            while self._done < target:
                await self._progress.wait()
        return self._done >= target

    async def lookup(self, id_any: str) -> UsageRecord | None:
        """The record with this proxy / upstream / response id, pending ones included."""
        found = self._find_pending(id_any)
        if found is not None:
            return found
        return await trio.to_thread.run_sync(self._read, id_any, limiter=self._read_limiter)

    def _find_pending(self, id_any: str) -> UsageRecord | None:
        with self._cond:
            pending = [*self._inflight, *self._queue]
        by_request_id = next((r for r in reversed(pending) if r.request_id == id_any), None)
        return by_request_id or next((r for r in reversed(pending) if r.matches(id_any)), None)

    def _read(self, id_any: str) -> UsageRecord | None:
        if self._closed:  # after shutdown: a one-off connection, not kept open
            store = self._connect()
            try:
                return store.get(id_any)
            finally:
                store.close()
        try:
            self._reader = self._reader or self._connect()
            return self._reader.get(id_any)
        except BaseException:
            _close_quietly(self._reader)
            self._reader = None
            raise

    def _on_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _start(self) -> None:
        try:
            loaded = await trio.to_thread.run_sync(read_spill, self.spill_path, self._log)
        except OSError as exc:  # keep the file for the next start; do not refuse to start
            self._log.error("usage: cannot read spill file %s: %s", self.spill_path, exc)
            loaded = []
        if loaded:
            with self._cond:
                self._queue.extend(loaded)
                self._queued += len(loaded)
            self._log.warning("usage: re-queued %d records from spill file %s",
                              len(loaded), self.spill_path)
        self._thread.start()

    async def _aclose(self, timeout: float) -> None:
        """Drain within ``timeout``; spill what is left; join the thread. Call shielded."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        with self._cond:
            self._abandon.set()
            self._cond.notify_all()
            left = [*self._inflight, *self._queue]
            self._queue.clear()
            self._thread_done = True  # later submits go straight to the spill file
        if left:
            self._log.error("usage store did not take %d records within %gs of shutdown",
                            len(left), timeout)
            await trio.to_thread.run_sync(self._spill, left, "not written before shutdown")
        await trio.to_thread.run_sync(self._thread.join, 1.0)
        if self._thread.is_alive():
            self._log.error("usage writer thread is stuck in the store; leaving it (daemon)")
        self._closed = True
        await trio.to_thread.run_sync(_close_quietly, self._reader, limiter=self._read_limiter)
        self._reader = None

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        store: Store | None = None
        try:
            while (batch := self._next_batch()) is not None:
                store = self._write(store, batch)
        except Exception:  # noqa: BLE001 - a bug must not strand the queue: the closer spills it
            self._log.exception("usage writer thread crashed")
        finally:
            _close_quietly(store)
            self._call_trio(self._stopped.set)

    def _next_batch(self) -> list[UsageRecord] | None:
        with self._cond:
            while not self._queue and not self._closing and not self._abandon.is_set():
                self._cond.wait()
            if self._abandon.is_set() or not self._queue:
                self._thread_done = True  # from now on, submit() spills directly
                return None
            n = min(self._batch_size, len(self._queue))
            self._inflight = [self._queue.popleft() for _ in range(n)]
            return list(self._inflight)

    def _write(self, store: Store | None, batch: list[UsageRecord]) -> Store | None:
        """Store ``batch``, retrying until done or abandoned. Returns the live store."""
        chunks: deque[list[UsageRecord]] = deque([batch])
        refused: list[UsageRecord] = []
        why = ""
        while chunks and not self._abandon.is_set():
            chunk = chunks[0]
            try:
                store = store or self._connect()
                added = store.insert_many(chunk)
                if added < len(chunk):  # not silent: usually a reused inbound request id
                    self._log.warning(
                        "usage: %d of %d records had a request id already in the ledger and "
                        "were not written again (a re-sent spill, or a client/gateway reusing "
                        "its x-trioproxy-request-id)", len(chunk) - added, len(chunk))
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or spilled
                if store is None or store.is_transient(exc):
                    self._failure(exc)
                    _close_quietly(store)
                    store = None
                    self._abandon.wait(self._retry_interval)
                    continue
                chunks.popleft()
                if len(chunk) > 1:  # isolate the record(s) the store refuses
                    chunks.extendleft([r] for r in reversed(chunk))
                else:
                    refused.append(chunk[0])
                    why = f"refused by the store ({type(exc).__name__}: {exc})"
                continue
            chunks.popleft()
            self._recovered()
            self._set_inflight([refused, *chunks], len(chunk))
        if refused:  # out of the in-flight list, then into the spill file
            self._set_inflight(chunks, 0)
            self._spill(refused, why)
        return store

    def _connect(self) -> Store:
        store = self._factory()
        try:
            store.migrate()
        except BaseException:
            _close_quietly(store)
            raise
        return store

    def _set_inflight(self, chunks: Iterable[list[UsageRecord]], written: int) -> None:
        with self._cond:
            self._inflight = [r for c in chunks for r in c]
            self._written += written
            self._done += written
        if written:
            self._call_trio(self._on_progress)

    def _failure(self, exc: Exception) -> None:
        with self._cond:
            self._failed += 1
            pending = len(self._queue) + len(self._inflight)
            first = self._outage is None
            if first:
                self._outage = (time.monotonic(), self._failed - 1)
        if first:
            self._log.warning(
                "usage store unavailable (%s: %s); %d records pending, retrying every %gs",
                type(exc).__name__, exc, pending, self._retry_interval,
            )
        else:
            self._log.debug("usage store still unavailable: %s", exc)

    def _recovered(self) -> None:
        with self._cond:
            outage, self._outage = self._outage, None
            attempts = self._failed - (outage[1] if outage else 0)
        if outage is not None:
            self._log.warning("usage store available again after %.1fs (%d failed attempts)",
                              time.monotonic() - outage[0], attempts)

    def _call_trio(self, fn: Callable[[], object]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    def _spill(self, records: list[UsageRecord], why: str) -> None:
        """Append records to the spill file (any thread); log them if even that fails."""
        if not records:
            return
        try:
            append_spill(self.spill_path, records)
            self._log.error("usage: %d records %s; saved to %s (re-inserted at next start-up)",
                            len(records), why, self.spill_path)
        except OSError as exc:
            self._log.critical("usage: %d records %s and the spill file %s failed (%s); "
                               "records follow", len(records), why, self.spill_path, exc)
            for r in records:
                self._log.critical("usage record: %s", json.dumps(r.to_dict(), default=str))
        with self._cond:
            self._spilled += len(records)
            self._done += len(records)
        self._call_trio(self._on_progress)


def _close_quietly(store: Store | None) -> None:
    if store is not None:
        try:
            store.close()
        except Exception:  # closing a broken connection may fail; it is gone anyway
            LOG.debug("closing the usage store failed", exc_info=True)


# -- the spill file ----------------------------------------------------------------------------


def _open_locked(path: Path, flags: int) -> int | None:
    """An fd on ``path`` holding an exclusive flock, re-opened if the file was replaced."""
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a loader took that file over meanwhile: open the new one
        if not flags & os.O_CREAT:
            return None


def append_spill(path: Path, records: Iterable[UsageRecord]) -> None:
    """Append records as JSON lines, under ``flock``, fsync-ed."""
    data = "".join(json.dumps(r.to_dict(), default=str) + "\n" for r in records).encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = _open_locked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert fd is not None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_spill(path: Path, log: logging.Logger = LOG) -> list[UsageRecord]:
    """Take over the spill file: read its records and delete it (one process wins)."""
    fd = _open_locked(path, os.O_RDONLY)
    if fd is None:
        return []
    try:
        with open(fd, "rb", closefd=False) as f:
            lines = f.read().splitlines()
        records, bad = [], []
        for line in lines:
            try:
                records.append(UsageRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                bad.append(line)
        if bad:
            corrupt = path.with_name(path.name + ".corrupt")
            with open(corrupt, "ab") as f:
                f.write(b"".join(line + b"\n" for line in bad))
            log.error("usage: %d unreadable lines in %s moved to %s", len(bad), path, corrupt)
        path.unlink()
        return records
    finally:
        os.close(fd)


@asynccontextmanager
async def open_usage_writer(
    store_factory: StoreFactory, *, batch_size: int = 200, max_queue: int = 10_000,
    retry_interval: float = 1.0, shutdown_timeout: float = 5.0,
    spill_path: str | os.PathLike[str] | None = None, log: logging.Logger = LOG,
) -> AsyncIterator[UsageWriter]:
    """Run a :class:`UsageWriter` for the duration of the block.

    ``store_factory`` opens a store (called in the writer thread, again after failures).
    ``spill_path`` defaults to ``data_dir()/usage-spill.jsonl``; use
    :func:`~.store.spill_path_for` to keep it next to the database. On exit everything queued
    is written within ``shutdown_timeout`` seconds (shielded from cancellation); the rest goes
    to the spill file.
    """
    path = Path(spill_path) if spill_path is not None else data_dir() / "usage-spill.jsonl"
    writer = UsageWriter(
        store_factory, batch_size=batch_size, max_queue=max_queue,
        retry_interval=retry_interval, spill_path=path, log=log,
    )
    await writer._start()
    try:
        yield writer
    finally:
        with trio.CancelScope(shield=True):
            await writer._aclose(shutdown_timeout)
