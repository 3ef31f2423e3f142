"""The per-record gap sketch: pooled ITL percentiles within 1 % of the exact ones."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.accounting.latency_summary import pooled_gaps, summarize_latency
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import COLUMNS, latency_columns
from trioproxy.commands.cli import main
from trioproxy.protocol.gapsketch import GapSketch, merge_sketches
from trioproxy.protocol.latency import EXACT_GAPS, LatencyTracker, percentile

from .test_store import database_url, make_record

QS = (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100)
REL = 0.01 * (1 + 1e-9)  # 1 %, and the float rounding of a value on a bucket's edge

# A gap in ms: same-chunk zeros, sub-ms, paced tokens, long tool-call pauses.
gap_ms = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.001, max_value=120_000.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([20.0, 20.0000001, 19.9999999, 1.0, 0.001]),
)
requests = st.lists(st.lists(gap_ms, min_size=0, max_size=60), min_size=1, max_size=25)


def record_row(gaps: list[float]) -> dict:
    """The ``trioproxy latency`` row of one streamed response with these gaps (ms), built the
    way the proxy builds it: tracker -> Latency -> record columns."""
    tracker = LatencyTracker(0.0)
    now = 0.3
    tracker.on_content(now)
    for gap in gaps:
        now += gap / 1000.0
        tracker.on_content(now)
    latency = tracker.figures(now + 0.01, len(gaps) + 1)
    cols = latency_columns(latency)
    return {"started_at": 1.0, "model": "m", **cols, "duration_ms": cols["e2e_ms"],
            "output_tokens": len(gaps) + 1}


def tracked_gaps(gaps: list[float]) -> list[float]:
    """The gaps (ms) as the tracker sees them: differences of the summed arrival times."""
    times = [0.3]
    for gap in gaps:
        times.append(times[-1] + gap / 1000.0)
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(times)]


def assert_within(got: float | None, exact: float, rel: float = REL, abs_: float = 0.0) -> None:
    """Within 1 %, or 1 µs: a gap under 1 µs counts as 0 (and an interpolated percentile
    carries that absolute error)."""
    assert got is not None
    assert abs(got - exact) <= rel * exact + 0.001 + abs_, (got, exact)


@settings(max_examples=300, deadline=None)
@given(requests)
def test_pooled_itl_percentiles_are_within_1pct_of_the_exact_percentile_of_all_gaps(
    per_request: list[list[float]],
) -> None:
    rows = [record_row(gaps) for gaps in per_request]
    every = sorted(g for gaps in per_request for g in tracked_gaps(gaps))
    pooled = pooled_gaps(rows)
    assert pooled is not None and pooled.count == len(every)
    if not every:
        assert pooled.percentiles(QS) == [None] * len(QS)
        return
    for q, got in zip(QS, pooled.percentiles(QS), strict=True):
        assert_within(got, percentile(every, q))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(gap_ms, min_size=5, max_size=60), min_size=3, max_size=20))
def test_trioproxy_latency_reports_pooled_itl_within_1pct(per_request: list[list[float]]) -> None:
    rows = [record_row(gaps) for gaps in per_request]
    every = sorted(g for gaps in per_request for g in tracked_gaps(gaps))
    itl = summarize_latency(rows)["groups"][0]["metrics"]["itl_ms"]
    assert itl["count"] == len(every)
    assert_within(itl["p50"], percentile(every, 50), abs_=0.0005)  # printed to 1 µs
    if len(every) >= 10:
        assert_within(itl["p90"], percentile(every, 90), abs_=0.0005)
    if len(every) >= 100:
        assert_within(itl["p99"], percentile(every, 99), abs_=0.0005)


def test_pooled_itl_is_exact_where_the_summary_estimate_was_not() -> None:
    """One request's gaps alternate 10 / 100 ms, another's are all 20 ms: 90 % of the pooled
    gaps are at most 100 ms and p90 is 100. The estimate from per-request p50/p90/p99 (all
    there was before sketches were stored) drew it at 88.75."""
    rows = [record_row([10.0, 100.0] * 50), record_row([20.0] * 100)]
    itl = summarize_latency(rows)["groups"][0]["metrics"]["itl_ms"]
    assert (itl["count"], itl["p50"]) == (200, pytest.approx(20.0, rel=0.01))
    assert itl["p90"] == pytest.approx(100.0, rel=0.01)
    old = [{**row, "itl_sketch": None} for row in rows]
    estimated = summarize_latency(old)["groups"][0]["metrics"]["itl_ms"]
    assert estimated["p90"] == pytest.approx(88.75, abs=0.01)


def test_rows_without_a_sketch_fall_back_to_the_estimate() -> None:
    old = {**record_row([10.0] * 20), "itl_sketch": None}
    assert pooled_gaps([old, record_row([20.0] * 20)]) is None
    itl = summarize_latency([old])["groups"][0]["metrics"]["itl_ms"]
    assert itl["p50"] == pytest.approx(10.0) and itl["count"] == 20


@given(st.lists(gap_ms, max_size=200))
def test_encoding_round_trips(gaps: list[float]) -> None:
    sketch = GapSketch.from_ms(gaps)
    text = sketch.encode()
    assert GapSketch.decode(text) == sketch
    assert sketch.count == len(gaps)


@given(st.lists(gap_ms, max_size=200))
def test_sorted_seconds_fill_the_same_buckets_as_one_by_one(gaps: list[float]) -> None:
    one_by_one = GapSketch.from_ms(gaps)
    bulk = GapSketch()
    bulk.add_sorted_seconds(sorted(g / 1000.0 for g in gaps))
    assert bulk.count == one_by_one.count == len(gaps)
    if gaps:
        assert bulk.percentiles(QS) == pytest.approx(one_by_one.percentiles(QS), rel=REL * 2)


def test_encoding_shape() -> None:
    sketch = GapSketch()
    sketch.buckets.update({150: 23, 151: 19, 152: 4, 155: 1})
    sketch.zeros = 2
    assert sketch.encode() == "1;2;150:23,19,4,3:1"
    assert GapSketch.decode("1;0;-40:2,1") .buckets == {-40: 2, -39: 1}
    assert GapSketch.decode("1;0;").count == 0


@pytest.mark.parametrize("text", ["", "2;0;1:1", "1;0;5", "1;0;5:1,0:1", "1;x;", "1;0;5:0",
                                  "1;-1;", "1;0;5:1,-2:1"])
def test_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        GapSketch.decode(text)
    assert merge_sketches([text, "1;1;"]).count == 1  # merging skips it


def test_a_paced_response_is_a_few_dozen_bytes() -> None:
    gaps = [20.0 * (1 + 0.1 * ((i * 7919) % 21 - 10) / 10) for i in range(199)]  # 20 ms ± 10 %
    text = GapSketch.from_ms(gaps).encode()
    assert len(text) < 80, text


def test_long_stream_sketch_counts_every_gap() -> None:
    tracker = LatencyTracker(0.0)
    now = 0.0
    for i in range(2 * EXACT_GAPS + 1):
        tracker.on_content(now)
        now += (i % 10 + 1) / 1000
    latency = tracker.figures(now, 2 * EXACT_GAPS + 1)
    sketch = GapSketch.decode(latency.itl_sketch)
    assert sketch.count == 2 * EXACT_GAPS
    assert sketch.percentile(100) == pytest.approx(10.0, rel=0.01)


@pytest.fixture(params=["sqlite", "postgres"])
def sketch_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list]]:
    """A store holding 40 responses whose gaps are known: a fast and a slow half, jittered."""
    per_request = [[(10.0 if i % 2 else 100.0) * (1 + ((i * 31 + j * 17) % 21 - 10) / 100)
                    for j in range(30)] for i in range(40)]
    for url in database_url(request.param, tmp_path):
        store = open_store(url)
        store.migrate()
        records = []
        for i, gaps in enumerate(per_request):
            cols = {k: v for k, v in record_row(gaps).items()
                    if k in COLUMNS and k not in ("started_at", "model")}
            records.append(make_record(i, status=200, end_reason="complete", **cols))
        store.insert_many(records)
        store.close()
        yield url, per_request


def test_trioproxy_latency_pools_the_stored_sketches_on_both_stores(
    sketch_db: tuple[str, list], capsys: pytest.CaptureFixture[str],
) -> None:
    url, per_request = sketch_db
    assert main(["latency", "--database-url", url, "--json", "--since", "2000-01-01"]) == 0
    itl = json.loads(capsys.readouterr().out)["groups"][0]["metrics"]["itl_ms"]
    every = sorted(g for gaps in per_request for g in tracked_gaps(gaps))
    assert itl["count"] == len(every) == 1200
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert_within(itl[name], percentile(every, q), abs_=0.0005)


def test_trioproxy_latency_reports_the_time_to_the_last_token_beside_e2e() -> None:
    """AIPerf's request latency stops at the last content chunk: ``last_token_ms``; ``e2e_ms``
    runs to the last byte (here 10 ms later, see record_row)."""
    metrics = summarize_latency([record_row([20.0] * 9)])["groups"][0]["metrics"]
    assert metrics["last_token_ms"]["p50"] == pytest.approx(300 + 180, abs=0.01)
    assert metrics["e2e_ms"]["p50"] == pytest.approx(300 + 180 + 10, abs=0.01)
