"""Usage accounting: records, prices, key fingerprints, stores (SQLite, PostgreSQL), the
non-blocking writer, and the read side used by ``trioproxy usage``.

Wiring (``accounting.ledger.open_ledger`` does it once at lifespan start-up)::

    url = resolve_database_url(settings.database_url, settings.data_home)
    secret = load_or_create_secret(secret_path_for(url, home), settings.fingerprint_secret)
    async with open_usage_writer(functools.partial(open_store, url),
                                 spill_path=spill_path_for(url, home)) as writer:
        ...  # finalisation: writer.submit(record)
        ...  # GET /v1/usage/{id}: await writer.lookup(id, key_fingerprint=fp) -> [records]
"""

from .keys import extract_api_key, fingerprint, load_or_create_secret
from .locations import (
    default_database_url,
    open_store,
    resolve_database_url,
    secret_path_for,
    spill_path_for,
)
from .prices import compute_cost, price_usage
from .record import UsageRecord
from .store import Store
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
