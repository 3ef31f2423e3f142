"""Logging: the request id on every line, one structured access line per request.

The proxy request id lives in a ``contextvars.ContextVar``. Trio copies the context into
every task started from the request's nursery, so the reader, the writer, extension hooks and
accounting all log with the same id without passing it around.

Two formats (``log_format``): ``text`` (a readable prefix, then the message; the access line's
fields as JSON) and ``json`` (every line one JSON object: ``ts``, ``level``, ``logger``,
``request_id``, ``message``, plus the access fields on access lines and ``exc`` on errors).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trioproxy_request_id", default="-")

access_log = logging.getLogger("trioproxy.access")

#: loggers whose lines the chosen format covers: ours, and the server's own under `serve`
LOGGERS = ("trioproxy", "hypercorn.error")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out["message"] = "access"
            out.update((k, v) for k, v in fields.items() if k not in out)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str, ensure_ascii=False)


def make_handler(log_format: str = "text", stream: object = None) -> logging.Handler:
    """A stderr handler in ``log_format`` with the request-id filter."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler._trioproxy = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_FORMAT))
    handler.addFilter(RequestIdFilter())
    return handler


def setup_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """One stderr handler on the ``trioproxy`` logger, once per process; with ``json`` also on
    Hypercorn's error logger, so every line the process writes is a JSON object.

    ``log_format=None`` keeps the format already set up in this process (else ``text``)."""
    if log_format is None:
        ours = [h for h in logging.getLogger("trioproxy").handlers if hasattr(h, "_format")]
        log_format = ours[0]._format if ours else "text"  # type: ignore[attr-defined]
    names = LOGGERS if log_format == "json" else LOGGERS[:1]
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        ours = [h for h in logger.handlers if getattr(h, "_trioproxy", False)]
        if ours and getattr(ours[0], "_format", None) == log_format:
            continue
        handler = make_handler(log_format)
        handler._format = log_format  # type: ignore[attr-defined]
        if name == "trioproxy":
            logger.handlers = [h for h in logger.handlers if h not in ours] + [handler]
        else:  # Hypercorn's own text handler would print the same lines again
            logger.handlers = [handler]
        logger.propagate = False


def access_enabled() -> bool:
    """The access line would be written: compute its fields only then (cached by logging)."""
    return access_log.isEnabledFor(logging.INFO)


def log_access(fields: dict[str, object]) -> None:
    """One line per request with stable keys (never any credential): ``access {json}`` in
    text, the fields themselves in JSON."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("access %s", json.dumps(fields, separators=(",", ":"), default=str),
                        extra={"access": fields})
