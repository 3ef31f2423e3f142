"""``trioproxy serve``'s process supervisor: Hypercorn's ``run()`` with a drain before exit.

Hypercorn stops accepting the moment its shutdown trigger fires, so a load balancer sees
refused or hanging connections, never a "draining" answer. Here the parent process turns
SIGTERM / SIGINT into a shared event; each worker (Hypercorn's own ``worker_serve``) then drains
first (:meth:`trioproxy.runtime.Runtime.drain`: readiness 503 at once, new requests still
served for ``drain_grace`` seconds (not after SIGINT: Ctrl-C has no load balancer to wait
for), then 503 with ``Connection: close`` and ``retry-after``;
in-flight streams go on), and only then lets Hypercorn shut down, with what is left of the
graceful timeout. A second signal cuts the drain short. A worker that gets SIGTERM itself
(systemd signals the whole control group) drains the same way; its handler stays installed
until the worker has flushed its usage records, so a further SIGTERM never kills it with
records in memory.

The parent supervises: a worker that dies after start-up (a crash, the OOM killer) is started
again, with an ERROR line and ``trioproxy_worker_restarts``; one that fails during start-up
stops the whole process (a configuration error would fail again). A worker whose parent dies
(SIGKILL, OOM) stops at once rather than linger holding the port: the kernel sends it SIGTERM
(``PR_SET_PDEATHSIG`` on Linux) and it also watches its parent pid; either way it skips the
drain, cuts its streams and flushes its records.

With more than one worker, prometheus_client's multiprocess mode gets a private directory
(``PROMETHEUS_MULTIPROC_DIR``, set before the workers start, removed at exit).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event
from typing import Any

import trio

log = logging.getLogger("trioproxy")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
POLL = 0.05  # seconds between checks of the shared shutdown event
PARENT_POLL = 0.5  # seconds between checks that the parent process is still there
RESTART_PAUSE = 1.0  # a worker that crashed within this many seconds waits this long first
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_workers(config: Any, workers: int) -> int:
    """Run ``workers`` worker processes on ``config``'s sockets until a signal and the drain
    end, restarting any that crashes; the exit code of the first worker that failed, else 0."""
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="trioproxy-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    sockets = config.create_sockets()
    ctx = get_context("spawn")
    shutdown, hurry, interactive = ctx.Event(), ctx.Event(), ctx.Event()
    restarts = ctx.Value("i", 0)
    caught: list[int] = []  # signals not acted on yet
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        # Only a list append: the events take locks that the interrupted code may hold.
        caught.append(signum)

    def act_on_signals() -> None:
        nonlocal signals
        while caught:
            signum = caught.pop(0)
            signals += 1
            if signum == signal.SIGINT and not shutdown.is_set():
                interactive.set()  # Ctrl-C: no balancer to wait for, no grace period
            (hurry if signals > 1 else shutdown).set()
            shutdown.set()

    def spawn() -> Worker:
        ready = ctx.Event()
        proc = ctx.Process(target=_worker, kwargs={
            "config": config, "sockets": sockets, "shutdown": shutdown, "hurry": hurry,
            "interactive": interactive, "ready": ready, "restarts": restarts,
            "parent": os.getpid()})
        proc.start()
        return Worker(proc, ready, time.monotonic())

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers inherit: the parent decides
    pool: list[Worker] = []
    try:
        pool.extend(spawn() for _ in range(workers))
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), on_signal)
        failed = _supervise(pool, spawn, shutdown, restarts, metrics_dir, act_on_signals)
        while any(w.proc.is_alive() for w in pool):  # a further signal hurries the drain
            wait([w.proc.sentinel for w in pool], timeout=0.2)
            act_on_signals()
        return failed or next((w.proc.exitcode for w in pool if w.proc.exitcode), 0)
    finally:
        for worker in pool:
            if worker.proc.is_alive():
                worker.proc.terminate()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class Worker:
    """One worker process, the event it sets once serving, and when it was started."""

    def __init__(self, proc: Any, ready: Event, started: float) -> None:
        self.proc, self.ready, self.started = proc, ready, started


def _supervise(pool: list[Worker], spawn: Any, shutdown: Event, restarts: Any,
               metrics_dir: str | None, act_on_signals: Any) -> int:
    """Until shutdown: restart a worker that died after start-up; stop everything (and
    return its exit code) when one died during start-up."""
    while not shutdown.is_set():
        wait([w.proc.sentinel for w in pool], timeout=0.2)
        act_on_signals()
        for i, worker in enumerate(pool):
            code = worker.proc.exitcode
            if code is None or shutdown.is_set():
                continue
            if not worker.ready.is_set():
                log.error("worker %d exited (code %s) during start-up; stopping",
                          worker.proc.pid, code)
                shutdown.set()
                return code or 1
            log.error("worker %d died (exit code %s); starting a new one", worker.proc.pid, code)
            if metrics_dir is not None:  # its live gauges (in flight, queue) no longer count
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.proc.pid, metrics_dir)
            with restarts.get_lock():
                restarts.value += 1
            if time.monotonic() - worker.started < RESTART_PAUSE:  # no busy crash loop
                time.sleep(RESTART_PAUSE)
                act_on_signals()
                if shutdown.is_set():  # no new worker to drain at once
                    break
            pool[i] = spawn()
    return 0


def _worker(config: Any, sockets: Any, shutdown: Event, hurry: Event, interactive: Event,
            ready: Event, restarts: Any, parent: int) -> None:
    """One worker process: Hypercorn's trio worker, with the drain as its shutdown trigger."""
    die_with_parent(parent)
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from .. import app

    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)

    async def trigger() -> None:  # Hypercorn calls it once lifespan start-up has ended
        if app.runtime is not None:  # None: start-up failed (the worker exits with it)
            app.runtime.worker_restarts = lambda: restarts.value
            ready.set()
        await drain_trigger(app, config, shutdown, hurry, interactive)

    async def main() -> None:
        # SIGTERM is handled from here to the end of the lifespan shutdown (the writer's flush)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_sigterm, signals, shutdown, hurry, parent)
                nursery.start_soon(_watch_parent, parent, shutdown, hurry)
                await worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=trigger)
                nursery.cancel_scope.cancel()

    trio.run(main)


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux); if it already has, go now."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the parent watcher still works
            pass
    if os.getppid() != parent:
        sys.exit(1)


async def drain_trigger(app: Any, config: Any, shutdown: Event, hurry: Event,
                        interactive: Event) -> None:
    """Return once this worker has drained: wait for the shutdown event, drain (without the
    grace period after a Ctrl-C), and leave Hypercorn the rest of the graceful timeout."""
    while not shutdown.is_set():
        await trio.sleep(POLL)
    runtime = app.runtime
    if runtime is not None:  # None: lifespan start-up failed
        settings = runtime.settings
        config.graceful_timeout = await runtime.drain(
            config.graceful_timeout, notice=settings.drain_notice, hurry=hurry.is_set,
            grace=0.0 if interactive.is_set() else settings.drain_grace)


async def _on_sigterm(signals: Any, shutdown: Event, hurry: Event, parent: int) -> None:
    """SIGTERM sent to this worker: drain (all workers: the event is shared). Only the parent
    counts signals: a SIGTERM to the whole process group (systemd's default, ``timeout``,
    a shell's Ctrl-C) reaches the parent and every worker at once, and must not read as a
    second signal that cuts the drain short. A SIGTERM after the parent died (the kernel's
    parent-death signal) stops at once."""
    async for _ in signals:
        if os.getppid() != parent:
            _orphaned(shutdown, hurry)
        shutdown.set()


async def _watch_parent(parent: int, shutdown: Event, hurry: Event) -> None:
    """Where there is no parent-death signal: notice the parent is gone within a poll."""
    while os.getppid() == parent:
        await trio.sleep(PARENT_POLL)
    _orphaned(shutdown, hurry)


def _orphaned(shutdown: Event, hurry: Event) -> None:
    if not hurry.is_set():
        log.error("the trioproxy serve parent process is gone; this worker stops now "
                  "(in-flight streams are cut, usage records are flushed)")
    hurry.set()
    shutdown.set()
