"""Costs from the offline genai-prices data: cache-aware, None when unknown, never raising."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from genai_prices.data_snapshot import get_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.accounting.prices import _find_model, compute_cost, price_usage
from trioproxy.accounting.record import UsageRecord
from trioproxy.providers.base import Usage

M = Decimal(1_000_000)


def base_prices(model: str, provider: str) -> dict[str, Decimal]:
    """Per-MTok prices straight from the package's data (tier base: below 200k input)."""
    _, info = get_snapshot().find_provider_model(model, None, provider, None)
    prices = info.get_prices(datetime.now(UTC))
    out = {}
    for name in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"):
        value = getattr(prices, name)
        out[name] = getattr(value, "base", value)
    return out


def record(model: str, provider: str, **tokens: Any) -> UsageRecord:
    return UsageRecord(request_id="r", started_at=0.0, model=model, provider=provider, **tokens)


def test_anthropic_cache_read_and_write_priced_at_their_rates() -> None:
    p = base_prices("claude-sonnet-4-5", "anthropic")
    # normalised: input_tokens is the TOTAL (1000 uncached + 5000 cache read + 2000 cache write)
    rec = record("claude-sonnet-4-5-20250929", "anthropic", input_tokens=8000, output_tokens=500,
                 cache_read_tokens=5000, cache_write_tokens=2000)
    expected = (1000 * p["input_mtok"] + 5000 * p["cache_read_mtok"]
                + 2000 * p["cache_write_mtok"] + 500 * p["output_mtok"]) / M
    assert compute_cost(rec) == pytest.approx(float(expected), rel=1e-12)
    assert float(expected) == pytest.approx((1000 * 3 + 5000 * 0.3 + 2000 * 3.75 + 500 * 15) / 1e6)


def test_openai_cached_input_is_cheaper_than_uncached() -> None:
    p = base_prices("gpt-4o", "openai")
    cached = record("gpt-4o-2024-08-06", "openai", input_tokens=10_000, output_tokens=100,
                    cache_read_tokens=8000)
    uncached = record("gpt-4o-2024-08-06", "openai", input_tokens=10_000, output_tokens=100)
    expected = (2000 * p["input_mtok"] + 8000 * p["cache_read_mtok"] + 100 * p["output_mtok"]) / M
    assert compute_cost(cached) == pytest.approx(float(expected), rel=1e-12)
    assert compute_cost(cached) < compute_cost(uncached)
    assert compute_cost(uncached) == pytest.approx(float((10_000 * p["input_mtok"]
                                                          + 100 * p["output_mtok"]) / M))


def test_gpt5_reasoning_is_part_of_output() -> None:
    p = base_prices("gpt-5", "openai")
    rec = record("gpt-5", "openai", input_tokens=1000, output_tokens=300, reasoning_tokens=200)
    assert compute_cost(rec) == pytest.approx(float((1000 * p["input_mtok"]
                                                     + 300 * p["output_mtok"]) / M))


def test_anthropic_one_hour_cache_writes_cost_more() -> None:
    five = {"cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 0}}
    hour = {"cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2000}}
    tokens = {"input_tokens": 3000, "output_tokens": 10, "cache_write_tokens": 2000}
    cost_5m = compute_cost(record("claude-sonnet-4-5", "anthropic", raw_usage=five, **tokens))
    cost_1h = compute_cost(record("claude-sonnet-4-5", "anthropic", raw_usage=hour, **tokens))
    assert cost_5m is not None and cost_1h is not None and cost_1h > cost_5m


@pytest.mark.parametrize("fields", [
    {"model": "totally-unknown-model-9000", "provider": "openai", "input_tokens": 10},
    {"model": None, "provider": "openai", "input_tokens": 10},
    {"model": "gpt-4o", "provider": "openai"},  # usage unknown (interrupted stream)
])
def test_unknown_is_none_never_zero(fields: dict[str, Any]) -> None:
    assert compute_cost(fields) is None


def test_model_requested_is_the_fallback() -> None:
    rec = UsageRecord(request_id="r", started_at=0.0, model_requested="gpt-4o", provider="openai",
                      input_tokens=1000, output_tokens=0)
    assert compute_cost(rec) == pytest.approx(1000 * 2.5 / 1e6)


def test_price_usage_takes_a_parsed_usage() -> None:
    usage = Usage(model="claude-sonnet-4-5", input_tokens=1000, output_tokens=0, known=True)
    assert price_usage(usage, "anthropic") == pytest.approx(1000 * 3 / 1e6)
    assert price_usage(None, "anthropic") is None


def test_model_lookups_are_cached() -> None:
    rec = record("claude-opus-4-1", "anthropic", input_tokens=1, output_tokens=1)
    compute_cost(rec)
    hits = _find_model.cache_info().hits
    compute_cost(rec)
    assert _find_model.cache_info().hits == hits + 1


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["model", "provider", "input_tokens", "output_tokens", "cache_read_tokens",
                     "cache_write_tokens", "audio_input_tokens", "raw_usage", "started_at"]),
    st.one_of(st.none(), st.integers(-5, 10**7), st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "anthropic", "openai"]),
              st.dictionaries(st.text(max_size=5), st.integers())),
))
def test_never_raises(fields: dict[str, Any]) -> None:
    cost = compute_cost(fields)
    assert cost is None or cost >= 0


def _all_model_prices() -> list[tuple[str, Any, Any]]:
    """(label, provider, model price) for every model price in the bundled data."""
    out = []
    for provider in get_snapshot().providers:
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, list) else [model.prices]
            for i, entry in enumerate(prices):
                out.append((f"{provider.id}/{model.id}#{i}", model, getattr(entry, "prices", entry)))
    return out


ALL_PRICES = _all_model_prices()
@st.composite
def consistent_counts(draw: st.DrawFn) -> dict[str, int]:
    """Counts as trioproxy passes them: parts never exceed their whole (cache reads and writes
    and audio are inside the input, 1-hour writes inside the writes, audio inside the output);
    zero counts are left out, as ``_usage_kwargs`` does."""
    n = st.integers(0, 300_000)
    cache_read, cache_write, audio_in = draw(n), draw(n), draw(st.integers(0, 20_000))
    counts = {
        "input_tokens": cache_read + cache_write + audio_in + draw(n),
        "output_tokens": draw(st.integers(0, 200_000)),
        "cache_read_tokens": cache_read, "cache_write_tokens": cache_write,
        "cache_write_1h_tokens": draw(st.integers(0, cache_write)),
        "input_audio_tokens": audio_in,
    }
    counts["output_audio_tokens"] = draw(st.integers(0, counts["output_tokens"]))
    return {k: v for k, v in counts.items() if v or k in ("input_tokens", "output_tokens")}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(ALL_PRICES), consistent_counts())
def test_the_fast_price_plan_agrees_with_genai_prices_for_every_model(
    entry: tuple[str, Any, Any], counts: dict[str, int],
) -> None:
    """Every model price in the data: the plan gives genai-prices' exact Decimal, or both
    refuse the counts; a price structure the plan does not handle has no plan at all."""
    from genai_prices import Usage as GUsage

    from trioproxy.accounting.prices import PricePlan

    label, _, model_price = entry
    plan = PricePlan.of(model_price)
    if plan is None:
        return
    try:
        slow: Decimal | None = model_price.calc_price(GUsage(**counts))["total_price"]
    except ValueError:
        slow = None
    try:
        fast: Decimal | None = plan.price(counts)
    except ValueError:
        fast = None
    assert fast == slow, label


def test_most_models_have_a_fast_plan() -> None:
    from trioproxy.accounting.prices import PricePlan

    planned = sum(PricePlan.of(price) is not None for _, _, price in ALL_PRICES)
    assert planned >= 0.8 * len(ALL_PRICES), (planned, len(ALL_PRICES))
