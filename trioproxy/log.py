"""Logging: the request id on every line, one structured access line per request.

The proxy request id lives in a ``contextvars.ContextVar``. Trio copies the context into
every task started from the request's nursery, so the reader, the writer, extension hooks and
accounting all log with the same id without passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trioproxy_request_id", default="-")

access_log = logging.getLogger("trioproxy.access")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Attach one stderr handler to the ``trioproxy`` logger, once per process."""
    logger = logging.getLogger("trioproxy")
    logger.setLevel(level.upper())
    if any(getattr(h, "_trioproxy", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._trioproxy = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    logger.propagate = False


def log_access(fields: dict[str, object]) -> None:
    """One line per request: ``access {json}`` with stable keys (never any credential)."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("access %s", json.dumps(fields, separators=(",", ":"), default=str))
