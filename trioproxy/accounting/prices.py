"""Cost of one record from the offline ``genai-prices`` data.

Called once per record at finalisation, never per chunk. Model look-ups are cached (hits and
misses). Nothing here raises: an unknown model or inconsistent counts give ``None`` (unknown),
never 0.

genai-prices' general calculation costs about 100 µs per call (it re-derives the model's
priced units and validates them every time), about a tenth of the proxy's whole CPU per
request. :class:`PricePlan` does the same arithmetic -- each priced unit's leaf count (its
usage minus the more specific priced units inside it), times its rate (for tiered prices, the
tier the total input reaches) -- from a structure derived once per model price. A plan checks
itself: its first results are compared with genai-prices' own, and a plan that ever disagrees
is dropped for good (``tests/test_prices.py`` compares them for every model in the data).

genai-prices' ``input_tokens`` is the TOTAL input including cache reads and writes, which is
exactly the record's normalised ``input_tokens``; cache reads/writes are passed alongside so
they are priced at their own rates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache, partial
from typing import Any

from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import TieredPrices

__all__ = ["compute_cost", "known_model", "price_usage"]

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


def known_model(model: str, provider: str | None = None) -> bool:
    """The price table has a price for ``model`` (cached, as every look-up)."""
    try:
        return _find_model(model, provider, id(get_snapshot())) is not None
    except Exception:  # noqa: BLE001 - an unreadable price table knows nothing
        return False


def _usage_kwargs(fields: Any, detailed: bool) -> dict[str, int] | None:
    # one Mapping check (an ABC: not free), then plain look-ups
    get = fields.get if isinstance(fields, Mapping) else partial(getattr, fields)
    input_tokens, output_tokens = get("input_tokens", None), get("output_tokens", None)
    if input_tokens is None and output_tokens is None:
        return None
    kwargs = {
        "input_tokens": _count(input_tokens),
        "output_tokens": _count(output_tokens),
        "cache_read_tokens": _count(get("cache_read_tokens", None)),
        "cache_write_tokens": _count(get("cache_write_tokens", None)),
    }
    if detailed:
        kwargs["input_audio_tokens"] = _count(get("audio_input_tokens", None))
        kwargs["output_audio_tokens"] = _count(get("audio_output_tokens", None))
        raw = get("raw_usage", None)
        creation = raw.get("cache_creation") if isinstance(raw, dict) else None
        if isinstance(creation, dict):  # Anthropic: 1 h cache writes cost more than 5 min ones
            kwargs["cache_write_1h_tokens"] = _count(creation.get("ephemeral_1h_input_tokens"))
    return {k: v for k, v in kwargs.items() if v or k in ("input_tokens", "output_tokens")}


def _when(fields: Any) -> datetime | None:
    started = _get(fields, "started_at")
    if isinstance(started, int | float) and started > 0:
        return datetime.fromtimestamp(started, UTC)  # prices in force when the request ran
    return None


VERIFY_FIRST = 3  # results of a new plan checked against genai-prices before it is trusted


class PricePlan:
    """One model price's units in the order genai-prices decomposes them, for fast pricing."""

    __slots__ = ("_unambiguous", "broken", "tiered", "units", "verified")

    def __init__(self, units: list[tuple[str, Any, int, tuple[str, ...]]]) -> None:
        self.units = units  # (usage key, Decimal | TieredPrices, per, more specific keys)
        self.tiered = any(isinstance(price, TieredPrices) for _, price, _, _ in units)
        self.verified = 0
        self.broken = False
        self._unambiguous: dict[frozenset[str], bool] = {}  # by the keys counted above 0

    @classmethod
    def of(cls, model_price: Any) -> PricePlan | None:
        """The plan of a model price, or None when its structure is not one this handles."""
        try:
            from genai_prices.units import _get_registry  # private: any change means no plan
        except ImportError:
            return None
        try:
            registry = _get_registry()
            priced = [(registry.unit_for_price_key(key), value)
                      for key, value in vars(model_price).items()
                      if not key.startswith("_") and value is not None]
        except (KeyError, AttributeError, TypeError):
            return None
        priced.sort(key=lambda p: (-len(p[0].dimensions), p[0].usage_key))
        units = []
        for unit, price in priced:
            if unit.usage_key == "requests" or not isinstance(price, Decimal | TieredPrices):
                return None
            inner = tuple(other.usage_key for other, _ in priced if other is not unit and
                          unit.dimensions.items() <= other.dimensions.items())
            units.append((unit.usage_key, price, unit.per, inner))
        return cls(units)

    def price(self, counts: Mapping[str, int]) -> Decimal:
        """Total USD for ``counts`` (usage key -> tokens; missing keys are 0). Raises
        ValueError for inconsistent counts, as genai-prices does."""
        self._check_missing(counts)
        total_input = counts.get("input_tokens", 0) if self.tiered else 0
        leaves: dict[str, int] = {}
        total = Decimal(0)
        for key, price, per, inner in self.units:
            leaf = counts.get(key, 0) - sum(map(leaves.__getitem__, inner))
            if leaf < 0:
                raise ValueError(f"{key} is smaller than the usage inside it")
            leaves[key] = leaf
            if not leaf:  # adds nothing (Decimal arithmetic is not free)
                continue
            if isinstance(price, TieredPrices):
                rate = price.base
                for tier in reversed(price.tiers):
                    if total_input > tier.start:
                        rate = tier.price
                        break
            else:
                rate = price
            total += rate * leaf / per
        return total

    def _check_missing(self, counts: Mapping[str, int]) -> None:
        """A priced unit the counts leave out is 0 -- unless genai-prices finds it ambiguous
        (a more specific, or two overlapping, usages were counted): then the counts are
        refused, as genai-prices refuses them. That depends only on which counts are above 0,
        so genai-prices' own inference is asked once per such set."""
        counted = frozenset(k for k, v in counts.items() if v > 0)
        ok = self._unambiguous.get(counted)
        if ok is None:
            usage = Usage(**counts)
            try:
                for key, _, _, _ in self.units:
                    if key not in counts:
                        getattr(usage, key)  # genai-prices' inference: 0, or ValueError
                ok = True
            except ValueError:
                ok = False
            self._unambiguous[counted] = ok
        if not ok:
            raise ValueError("the counts leave a priced usage ambiguous")


_PLANS: dict[int, tuple[Any, PricePlan | None]] = {}  # id(model price) -> (it, its plan)


def _plan(model_price: Any) -> PricePlan | None:
    """The model price's plan, made once (model prices are not hashable: keyed by identity,
    holding the object so that the identity stays its own; bounded by the price data)."""
    found = _PLANS.get(id(model_price))
    if found is None or found[0] is not model_price:
        found = _PLANS[id(model_price)] = (model_price, PricePlan.of(model_price))
    return found[1]


def _fast_price(model_info: Any, provider_info: Any, kwargs: dict[str, int],
                when: datetime | None) -> float | None:
    """The plan's price, once the plan has proven itself; None means: ask genai-prices."""
    plan = _plan(model_info.get_prices(when or datetime.now(tz=UTC)))
    if plan is None or plan.broken:
        return None
    fast = plan.price(kwargs)
    if plan.verified >= VERIFY_FIRST:
        return float(fast)
    slow = model_info.calc_price(Usage(**kwargs), provider_info, genai_request_timestamp=when)
    if slow.total_price != fast:
        plan.broken = True
        log.debug("fast pricing disagrees for %s; using genai-prices", model_info.id)
        return float(slow.total_price)
    plan.verified += 1
    return float(fast)


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
                fast = _fast_price(model_info, provider_info, kwargs, _when(fields))
                if fast is not None:
                    return fast
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
