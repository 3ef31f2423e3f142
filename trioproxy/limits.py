"""The open-files limit (``RLIMIT_NOFILE``): raised to its hard limit at start, and what it
allows.

Every proxied stream holds two sockets in its worker (the client's and the upstream's), and a
WebSocket two as well, so the soft limit a process starts with (often 1,024) caps a worker at
about 500 concurrent streams. ``trioproxy serve`` raises the soft limit to the hard limit
before it reads its settings (its workers inherit it); plain ``hypercorn trioproxy:app`` does
it at lifespan start-up. Each worker then logs the limit it got and the streams that allows,
and warns when the configured connection limit needs more descriptors than that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None  # type: ignore[assignment]

log = logging.getLogger("trioproxy")

#: descriptors kept back from streams: listeners, the ledger and its spill file, log files,
#: idle kept-alive connections, client connections closing (Hypercorn holds a closed idle
#: connection up to its keep-alive timeout)
RESERVED_FDS = 100
FDS_PER_STREAM = 2  # the client's socket and the upstream's
#: below this many concurrent streams a worker is short for agent traffic: say so at start
FEW_STREAMS = 1000


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-files limit a process runs with, before and after raising it."""

    soft: int  # now
    hard: int
    before: int  # the soft limit the process started with

    @property
    def streams(self) -> int:
        """Concurrent streams (or WebSockets) this limit allows one worker."""
        return streams_allowed(self.soft)


def streams_allowed(nofile: int) -> int:
    """Concurrent streams ``nofile`` descriptors allow one worker (at least 1)."""
    return max(1, (nofile - RESERVED_FDS) // FDS_PER_STREAM)


def _limits() -> tuple[int, int]:
    if resource is None:  # pragma: no cover
        return 1 << 20, 1 << 20
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def current_streams_allowed() -> int:
    """What ``max_connections = "auto"`` resolves to: the streams the current soft limit
    allows one worker."""
    return streams_allowed(_limits()[0])


def raise_open_files() -> OpenFiles:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (an unlimited hard limit: to the
    kernel's per-process ceiling). Never fails: a refusal keeps the soft limit it had."""
    soft, hard = _limits()
    before = soft
    if resource is not None and soft != hard:
        target = hard if hard != resource.RLIM_INFINITY else _nr_open(soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s",
                        soft, target, exc)
    return OpenFiles(soft=soft, hard=hard, before=before)


def _nr_open(fallback: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(fallback, 1 << 20)


def report_open_files(files: OpenFiles, max_connections: int) -> None:
    """The start-up lines: the limit this worker got and the streams it allows; a warning
    when ``max_connections`` (per upstream origin) needs more than that, or when the limit
    leaves a worker short for agent traffic."""
    raised = f" (raised from {files.before})" if files.before != files.soft else ""
    log.info("open files limit %d%s, hard limit %d: about %d concurrent streams or WebSockets "
             "in this worker (%d descriptors each, %d kept back)", files.soft, raised,
             files.hard, files.streams, FDS_PER_STREAM, RESERVED_FDS)
    if max_connections > files.streams:
        log.warning(
            "open files limit %d is too low for max_connections = %d: a worker runs out of "
            "descriptors at about %d concurrent streams, and later connections fail instead "
            "of waiting for the pool. Raise the hard limit (systemd LimitNOFILE=, docker "
            "--ulimit nofile=, ulimit -Hn) to at least %d, or lower max_connections",
            files.soft, max_connections, files.streams,
            max_connections * FDS_PER_STREAM + RESERVED_FDS)
    elif files.streams < FEW_STREAMS:
        log.warning(
            "open files limit %d allows only about %d concurrent streams per worker; agent "
            "traffic holds one per running turn. Raise the hard limit (systemd LimitNOFILE=, "
            "docker --ulimit nofile=, ulimit -Hn) to at least %d", files.soft, files.streams,
            FEW_STREAMS * FDS_PER_STREAM + RESERVED_FDS)
