"""Cost of one record from the offline ``genai-prices`` data.

Called once per record at finalisation, never per chunk. Model look-ups are cached (hits and
misses), so pricing is a dictionary look-up plus a little Decimal arithmetic. Nothing here
raises: an unknown model or inconsistent counts give ``None`` (unknown), never 0.

genai-prices' ``input_tokens`` is the TOTAL input including cache reads and writes, which is
exactly the record's normalised ``input_tokens``; cache reads/writes are passed alongside so
they are priced at their own rates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot

__all__ = ["compute_cost", "price_usage"]

log = logging.getLogger("trioproxy.accounting")

_PROVIDER_IDS = {"anthropic": "anthropic", "openai": "openai"}


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


@lru_cache(maxsize=1024)
def _find_model(model: str, provider: str | None, snapshot_id: int) -> tuple[Any, Any] | None:
    """(provider, model info) for a model name, or None when unknown. Cached, misses too."""
    snapshot = get_snapshot()
    provider_id = _PROVIDER_IDS.get(provider or "")
    attempts = [provider_id, None] if provider_id else [None]
    for pid in attempts:
        try:
            return snapshot.find_provider_model(model, None, pid, None)
        except LookupError:
            continue
    return None


def _usage_kwargs(fields: Any, detailed: bool) -> dict[str, int] | None:
    input_tokens, output_tokens = _get(fields, "input_tokens"), _get(fields, "output_tokens")
    if input_tokens is None and output_tokens is None:
        return None
    kwargs = {
        "input_tokens": _count(input_tokens),
        "output_tokens": _count(output_tokens),
        "cache_read_tokens": _count(_get(fields, "cache_read_tokens")),
        "cache_write_tokens": _count(_get(fields, "cache_write_tokens")),
    }
    if detailed:
        kwargs["input_audio_tokens"] = _count(_get(fields, "audio_input_tokens"))
        kwargs["output_audio_tokens"] = _count(_get(fields, "audio_output_tokens"))
        raw = _get(fields, "raw_usage")
        creation = raw.get("cache_creation") if isinstance(raw, dict) else None
        if isinstance(creation, dict):  # Anthropic: 1 h cache writes cost more than 5 min ones
            kwargs["cache_write_1h_tokens"] = _count(creation.get("ephemeral_1h_input_tokens"))
    return {k: v for k, v in kwargs.items() if v or k in ("input_tokens", "output_tokens")}


def _when(fields: Any) -> datetime | None:
    started = _get(fields, "started_at")
    if isinstance(started, int | float) and started > 0:
        return datetime.fromtimestamp(started, UTC)  # prices in force when the request ran
    return None


def compute_cost(fields: Any, provider: str | None = None) -> float | None:
    """USD cost of a record (or any object/mapping with the record's token fields).

    ``fields`` needs ``model`` (or ``model_requested``) and the normalised token counts.
    ``provider`` defaults to ``fields.provider``. Returns None when the model or the usage is
    unknown. Never raises.
    """
    try:
        model = _get(fields, "model") or _get(fields, "model_requested")
        if not isinstance(model, str) or not model:
            return None
        provider = provider or _get(fields, "provider")
        found = _find_model(model, provider, id(get_snapshot()))
        if found is None:
            return None
        provider_info, model_info = found
        for detailed in (True, False):  # the detailed split first; plain counts if it is refused
            kwargs = _usage_kwargs(fields, detailed)
            if kwargs is None:
                return None
            try:
                calc = model_info.calc_price(
                    Usage(**kwargs), provider_info, genai_request_timestamp=_when(fields)
                )
            except ValueError:
                continue
            return float(calc.total_price)
        return None
    except Exception:  # pricing must never break finalisation
        log.debug("pricing failed for %r", _get(fields, "model"), exc_info=True)
        return None


def price_usage(usage: Any, provider: str | None) -> float | None:
    """Cost of a parsed ``providers.Usage`` (None when unknown); see :func:`compute_cost`."""
    if usage is None:
        return None
    return compute_cost(usage, provider)
