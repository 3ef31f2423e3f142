"""The spill and quarantine files: JSON lines, ``flock``-ed, shared by worker processes.

Records the store cannot take right now (the in-memory queue is full, or the writer is shutting
down) are appended to the spill file; the writer streams it back into the store later, batch by
batch, so memory stays bounded however long the outage was. To read it, a writer takes the file
over: under the lock it renames it to ``<name>.draining-<pid>-<random>`` (appenders then start a
fresh file) and keeps the lock while it works. A draining file whose lock is free belongs to a
writer that stopped or crashed half-way: the next writer adopts it. Inserts are
``ON CONFLICT DO NOTHING``, so re-reading records already stored never duplicates them.

Records the store refuses for good, even sanitised, go to the quarantine file (same format) for
an operator to inspect; nothing reads it back. A spill line that is no record (torn, not JSON,
JSON that is not a record object, nested too deep to decode) goes to ``<spill>.corrupt``.
Every one of these files is created, or brought back to, mode 0600: they hold records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .record import UsageRecord

__all__ = ["TakenSpill", "append_spill", "quarantine_path_for", "take_spill"]

LOG = logging.getLogger("trioproxy.accounting")


def quarantine_path_for(spill_path: Path) -> Path:
    """``usage-spill.jsonl`` -> ``usage-spill.quarantine.jsonl`` (same directory)."""
    return spill_path.with_name(spill_path.name.removesuffix(".jsonl") + ".quarantine.jsonl")


def _record_line(record: UsageRecord) -> str:
    try:
        return json.dumps(record.to_dict(), default=str) + "\n"
    except (TypeError, ValueError, RecursionError):  # e.g. a tuple key in raw_usage
        return json.dumps(record.sanitised().to_dict(), default=str) + "\n"


def _open_locked(path: Path, flags: int) -> int | None:
    """An fd on ``path`` holding an exclusive flock, re-opened if the file was replaced."""
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(fd)
            if os.stat(path).st_ino == st.st_ino:
                if flags & os.O_CREAT:
                    _private(fd, st)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a reader took that file over meanwhile: open the new one
        if not flags & os.O_CREAT:
            return None


def _private(fd: int, st: os.stat_result) -> None:
    """Mode 0600 for a file that holds records (one left by an older version may be 0644)."""
    if stat.S_IMODE(st.st_mode) != PRIVATE:
        os.fchmod(fd, PRIVATE)


PRIVATE = 0o600


def _record(line: bytes) -> UsageRecord | None:
    """The record on a spill line, or None when it holds none: torn or not JSON, JSON that is
    no object (``null``, ``[]``, ``1``), an object that is no record, nesting too deep."""
    try:
        data = json.loads(line)
        return UsageRecord.from_dict(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, RecursionError):
        return None


def append_spill(path: Path, records: Iterable[UsageRecord]) -> None:
    """Append records as JSON lines, under ``flock``, fsync-ed."""
    data = "".join(_record_line(r) for r in records).encode()
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


class TakenSpill:
    """A spill file taken over by this process (the lock is held until :meth:`close`)."""

    def __init__(self, fd: int, path: Path, origin: Path | None = None) -> None:
        self.fd, self.path = fd, path
        self.origin = origin or path  # the name it had before it was taken over

    def batches(self, size: int, log: logging.Logger = LOG) -> Iterator[list[UsageRecord]]:
        """Its records, ``size`` at a time, read line by line; bad lines go to ``.corrupt``."""
        batch: list[UsageRecord] = []
        os.lseek(self.fd, 0, os.SEEK_SET)
        with open(os.dup(self.fd), "rb") as f:
            for line in f:
                record = _record(line)
                if record is None:
                    self._set_aside(line, log)
                    continue
                batch.append(record)
                if len(batch) >= size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _set_aside(self, line: bytes, log: logging.Logger) -> None:
        if not line.strip():
            return
        base = self.path.name.split(".draining-", 1)[0]
        corrupt = self.path.with_name(base + ".corrupt")
        fd = os.open(corrupt, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        with open(fd, "ab") as f:
            _private(fd, os.fstat(fd))
            f.write(line.rstrip(b"\n") + b"\n")
        log.error("usage: an unreadable line in a spill file was moved to %s", corrupt)

    def count(self) -> int:
        """Its lines (records, and any unreadable line): one read through, 1 MiB at a time."""
        n, last = 0, b"\n"
        os.lseek(self.fd, 0, os.SEEK_SET)
        while block := os.read(self.fd, 1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
        return n + (last != b"\n")

    def remove(self) -> None:
        """Everything in it is stored: delete it (then release the lock)."""
        try:
            self.path.unlink()
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock, keeping the file for a later writer to adopt."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def take_spill(path: Path) -> Iterator[TakenSpill]:
    """Take over the abandoned draining files, then the spill file itself, one at a time.

    The caller must :meth:`~TakenSpill.remove` or :meth:`~TakenSpill.close` each one before
    asking for the next.
    """
    if path.parent.is_dir():
        for orphan in sorted(path.parent.glob(path.name + ".draining-*")):
            taken = _adopt(orphan)
            if taken is not None:
                yield taken
    fd = _open_locked(path, os.O_RDONLY)
    if fd is None:
        return
    draining = path.with_name(f"{path.name}.draining-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, draining)  # appenders notice the new inode and start a fresh file
    except BaseException:
        os.close(fd)
        raise
    yield TakenSpill(fd, draining, path)


def _adopt(path: Path) -> TakenSpill | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return TakenSpill(fd, path)
    except (BlockingIOError, FileNotFoundError):  # another writer is draining it / it is done
        pass
    os.close(fd)
    return None
