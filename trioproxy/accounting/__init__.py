"""Usage accounting: records, prices, key fingerprints, stores (SQLite, PostgreSQL), the
non-blocking writer, and the read side used by ``trioproxy usage``.

Wiring (done once at lifespan start-up)::

    url = resolve_database_url(settings.database_url)
    secret = load_or_create_secret(secret_path_for(url))
    async with open_usage_writer(functools.partial(open_store, url),
                                 spill_path=spill_path_for(url)) as writer:
        ...  # finalisation: writer.submit(record); GET /v1/usage/{id}: await writer.lookup(id)
"""

from .keys import extract_api_key, fingerprint, load_or_create_secret
from .prices import compute_cost, price_usage
from .record import UsageRecord
from .store import (
    Store,
    default_database_url,
    open_store,
    resolve_database_url,
    secret_path_for,
    spill_path_for,
)
from .writer import UsageWriter, WriterStatistics, open_usage_writer

__all__ = [
    "Store",
    "UsageRecord",
    "UsageWriter",
    "WriterStatistics",
    "compute_cost",
    "default_database_url",
    "extract_api_key",
    "fingerprint",
    "load_or_create_secret",
    "open_store",
    "open_usage_writer",
    "price_usage",
    "resolve_database_url",
    "secret_path_for",
    "spill_path_for",
]
