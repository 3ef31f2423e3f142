"""``trioproxy serve``'s process supervisor: Hypercorn's ``run()`` with a drain before exit.

Hypercorn stops accepting the moment its shutdown trigger fires, so a load balancer sees
refused or hanging connections, never a "draining" answer. Here the parent process turns
SIGTERM / SIGINT into a shared event; each worker (Hypercorn's own ``worker_serve``) then drains
first (:meth:`trioproxy.runtime.Runtime.drain`: readiness 503, new requests 503 with
``Connection: close`` and ``retry-after``, in-flight streams go on), and only then lets Hypercorn
shut down, with what is left of the graceful timeout. A second signal cuts the drain short.
A worker that gets SIGTERM itself (systemd signals the whole control group) drains the same way.

With more than one worker, prometheus_client's multiprocess mode gets a private directory
(``PROMETHEUS_MULTIPROC_DIR``, set before the workers start, removed at exit).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event
from typing import Any

import trio

log = logging.getLogger("trioproxy")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
POLL = 0.05  # seconds between checks of the shared shutdown event


def run_workers(config: Any, workers: int) -> int:
    """Run ``workers`` worker processes on ``config``'s sockets until a signal and the drain
    end; the exit code of the first worker that failed, else 0."""
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="trioproxy-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    sockets = config.create_sockets()
    ctx = get_context("spawn")
    shutdown, hurry = ctx.Event(), ctx.Event()
    signals = 0

    def on_signal(*_: object) -> None:
        nonlocal signals
        signals += 1
        (hurry if signals > 1 else shutdown).set()
        shutdown.set()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers inherit: the parent decides
    procs = [ctx.Process(target=_worker, kwargs={"config": config, "sockets": sockets,
                                                  "shutdown": shutdown, "hurry": hurry})
             for _ in range(workers)]
    try:
        for proc in procs:
            proc.start()
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), on_signal)
        wait([p.sentinel for p in procs])  # one ended (by the drain, or it failed): all end
        shutdown.set()
        for proc in procs:
            proc.join()
        return next((p.exitcode for p in procs if p.exitcode), 0)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(config: Any, sockets: Any, shutdown: Event, hurry: Event) -> None:
    """One worker process: Hypercorn's trio worker, with the drain as its shutdown trigger."""
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from . import app

    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)

    async def trigger() -> None:
        await drain_trigger(app, config, shutdown, hurry)

    trio.run(lambda: worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=trigger))


async def drain_trigger(app: Any, config: Any, shutdown: Event, hurry: Event) -> None:
    """Return once this worker has drained: wait for the shutdown event (or SIGTERM here),
    drain, and leave Hypercorn the rest of the graceful timeout."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_sigterm, signals, shutdown, hurry)
            while not shutdown.is_set():
                await trio.sleep(POLL)
            runtime = app.runtime
            if runtime is not None:  # None: lifespan start-up failed
                config.graceful_timeout = await runtime.drain(
                    runtime.settings.drain_notice, config.graceful_timeout, hurry.is_set)
            nursery.cancel_scope.cancel()


async def _on_sigterm(signals: Any, shutdown: Event, hurry: Event) -> None:
    """SIGTERM sent to this worker: drain (all workers: the event is shared). Only the parent
    counts signals: a SIGTERM to the whole process group (systemd's default, ``timeout``,
    a shell's Ctrl-C) reaches the parent and every worker at once, and must not read as a
    second signal that cuts the drain short."""
    async for _ in signals:
        shutdown.set()
