"""The ledger, wired from the settings: where the store is, the fingerprint secret, migrations at
start-up, and the writer that takes records off the event loop (:mod:`.writer`).

    async with open_ledger(settings) as (writer, secret):
        ...  # finalisation: writer.submit(build_record(ex, secret))
        ...  # GET /v1/usage/{id}: await writer.lookup(id, key_fingerprint=fp)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..config.settings import Settings
from .keys import load_or_create_secret
from .locations import open_store, resolve_database_url, secret_path_for, spill_path_for
from .redact import redact_dsn
from .writer import UsageWriter, open_usage_writer

log = logging.getLogger("trioproxy.accounting")

# The writer waits this long after a record for others to commit with it: under load one
# wake-up and one transaction per batch (the writer thread shares the GIL with the event
# loop); a record waiting in memory is still answered by GET /v1/usage/{id}.
WRITE_LINGER = 0.05


@asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[tuple[UsageWriter, bytes]]:
    """The usage store writer and the key-fingerprint secret, for the duration of the block;
    on exit every queued record is written (or spilled) within the writer's shutdown timeout.

    The store is opened (and migrated) lazily in the writer thread, so a database that is
    down at start-up does not stop the proxy: records wait in memory and are retried.

    The lifespan enters it on an exit stack from inside its nursery and leaves it after the
    nursery has closed, so neither this nor :func:`~.writer.open_usage_writer` may hold a
    nursery or a cancel scope open across its ``yield``.
    """
    home = settings.data_home
    url = resolve_database_url(settings.database_url, home)
    secret = await trio.to_thread.run_sync(
        load_or_create_secret, secret_path_for(url, home), settings.fingerprint_secret)
    try:  # migrations at start-up; a store that is down is retried by the writer instead
        await trio.to_thread.run_sync(_migrate, url, settings.store_timeout)
    except Exception as exc:  # noqa: BLE001 - any store failure: keep proxying
        log.warning("usage store not migrated at start-up (%s: %s); the writer will retry",
                    type(exc).__name__, _safe_error(exc, url))
    async with open_usage_writer(
        lambda: open_store(url, data_home=home, timeout=settings.store_timeout),
        spill_path=spill_path_for(url, home), shutdown_timeout=10.0,
        max_pending=settings.usage_max_pending, lookup_timeout=settings.usage_lookup_timeout,
        linger=WRITE_LINGER, spill_after=settings.usage_spill_after,
    ) as writer:
        log.info("usage ledger: %s", _safe_url(url))
        yield writer, secret


def _migrate(url: str, timeout: float) -> None:
    store = open_store(url, timeout=timeout)
    try:
        store.migrate()
    finally:
        store.close()


def _safe_error(exc: Exception, url: str) -> str:
    """An error's text without the database URL's credentials."""
    return redact_dsn(str(exc).replace(url, redact_dsn(url)))


def _safe_url(url: str) -> str:
    """A database URL without its credentials, for logs (every form libpq accepts)."""
    return redact_dsn(url)
