"""``trioproxy latency --compare``: two groups of a real ledger side by side, with bootstrap
intervals that separate when the distributions differ and not when they are one."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import UsageRecord
from trioproxy.commands.cli import main
from trioproxy.protocol.gapsketch import GapSketch, merge_sketches
from trioproxy.protocol.latency import percentile

from .test_store import T0, database_url, make_record

HOUR = 3600.0
UNTIL = "2025-06-15T17:00Z"  # before the third hour: the first two providers' requests only
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "tokens_per_s")


def paced(i: int, rng: random.Random, ttft: float, itl: float, **fields: Any) -> UsageRecord:
    """A streamed request of 51 tokens: TTFT and its 50 gaps drawn around ``ttft`` / ``itl``
    ms, with the gaps' summary and sketch as the proxy stores them."""
    first = ttft * rng.lognormvariate(0.0, 0.25)
    pace = itl * rng.lognormvariate(0.0, 0.1)
    gaps = sorted(pace * rng.lognormvariate(0.0, 0.3) for _ in range(50))
    e2e = first + sum(gaps) + 5.0
    return make_record(
        i, status=200, end_reason="complete", output_tokens=51, ttft_ms=first,
        itl_p50_ms=percentile(gaps, 50), itl_p90_ms=percentile(gaps, 90),
        itl_p99_ms=percentile(gaps, 99), itl_max_ms=gaps[-1], itl_count=50,
        itl_sketch=GapSketch.from_ms(gaps).encode(), tpot_ms=sum(gaps) / 50, e2e_ms=e2e,
        tokens_per_s=50 / (e2e - first) * 1000, **fields)


def ledger(url: str) -> None:
    """Hour 0: 60 requests to anthropic (TTFT ~300 ms, ITL ~20 ms); hour 1: 60 to openai
    (~450 ms, ~28 ms). Models m-1 and m-2 (hour 2): 60 each from one distribution."""
    rng = random.Random(7)
    records = [paced(i, rng, 300.0, 20.0, provider="anthropic", model="claude-x")
               for i in range(60)]
    records += [paced(100 + i, rng, 450.0, 28.0, provider="openai", model="gpt-x",
                      api="openai.chat", started_at=T0 + HOUR + i) for i in range(60)]
    records += [paced(200 + i, rng, 350.0, 25.0, provider="openai", model=f"m-{1 + i % 2}",
                      api="openai.chat", started_at=T0 + 2 * HOUR + i) for i in range(120)]
    records += [paced(400 + i, rng, 350.0, 25.0, provider="openai", model="few",
                      api="openai.chat", started_at=T0 + 2 * HOUR + i) for i in range(4)]
    records += [paced(500 + i, rng, 350.0, 25.0, provider="openai", model="some",
                      api="openai.chat", started_at=T0 + 2 * HOUR + i) for i in range(15)]
    store = open_store(url)
    try:
        store.migrate()
        store.insert_many(records)
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    for url in database_url(request.param, tmp_path):
        ledger(url)
        yield url


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    url = f"sqlite://{tmp_path}/usage.db"
    ledger(url)
    return url


def compare(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["latency", "--database-url", url, "--json", "--compare", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def lines(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(ln["metric"], ln["quantile"]): ln for ln in report["lines"]}


def test_different_providers_separate_on_every_metric(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = compare(db, capsys, "provider", "anthropic", "openai", "--until", UNTIL)
    assert (report["a"]["requests"], report["b"]["requests"]) == (60, 60)
    found = lines(report)
    assert set(found) == {(m, q) for m in METRICS for q in ("p50", "p90")}
    for line in found.values():
        assert line["separated"] is True, line
        for side in ("a", "b"):
            lo, hi = line[side]["ci"]
            assert lo <= line[side]["value"] <= hi
    ttft = found["ttft_ms", "p50"]
    assert 250 < ttft["a"]["value"] < 350 and 380 < ttft["b"]["value"] < 520
    assert 30 < ttft["diff_pct"] < 70  # 450 against 300: +50 %
    lo, hi = ttft["diff_ci_pct"]
    assert lo < ttft["diff_pct"] < hi and lo > 0
    assert found["tokens_per_s", "p50"]["diff_pct"] < 0  # slower tokens: fewer per second
    itl = found["itl_ms", "p50"]
    assert (itl["a"]["n"], itl["a"]["gaps"]) == (60, 3000)
    assert 25 < itl["diff_pct"] < 55  # 28 against 20: +40 %


def test_two_samples_of_one_distribution_do_not_separate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five ledgers, each with two models drawn from one distribution. Two 95 % intervals fail
    to overlap by chance in under 1 % of lines; a ledger's lines are correlated (ITL, TPOT, e2e
    and tokens/s all follow each request's ITL here), so a chance split shows on a few lines of
    one ledger: at most one ledger of five may show one."""
    separated, ledgers = [], []
    for seed in range(5):
        url = f"sqlite://{tmp_path}/same-{seed}.db"
        rng = random.Random(seed)
        store = open_store(url)
        try:
            store.migrate()
            store.insert_many([paced(i, rng, 350.0, 25.0, model=f"m-{1 + i % 2}")
                               for i in range(120)])
        finally:
            store.close()
        report = compare(url, capsys, "model", "m-1", "m-2", "--resamples", "1000")
        assert (report["a"]["requests"], report["b"]["requests"]) == (60, 60)
        separated += [ln["separated"] for ln in report["lines"]]
        ledgers.append(any(ln["separated"] for ln in report["lines"]))
    assert None not in separated and ledgers.count(True) <= 1, separated


def test_hours_compare_by_label_or_a_prefix(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = compare(sqlite_db, capsys, "hour", "2025-06-15T15:00Z", "2025-06-15T16")
    assert (report["a"]["requests"], report["b"]["requests"]) == (60, 60)
    assert lines(report)["ttft_ms", "p50"]["separated"] is True


def test_the_table_names_both_groups_their_samples_and_the_verdict(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["latency", "--database-url", sqlite_db, "--compare", "provider", "anthropic",
                 "openai", "--until", UNTIL]) == 0
    out = capsys.readouterr().out
    assert "A = anthropic (60 requests), B = openai (60 requests)" in out
    assert "2,000 resamples, seed 0" in out
    ttft = next(line for line in out.splitlines() if line.startswith("ttft_ms") and " p50 " in line)
    cells = ttft.split()
    assert cells[:4] == ["ttft_ms", "p50", "60", "60"] and cells[-1] == "yes"
    assert "gaps pooled: A 3,000, B 3,000" in out


def test_the_same_seed_gives_the_same_intervals(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("model", "m-1", "m-2", "--resamples", "500")
    first = compare(sqlite_db, capsys, *args, "--seed", "3")
    again = compare(sqlite_db, capsys, *args, "--seed", "3")
    other = compare(sqlite_db, capsys, *args, "--seed", "4")
    assert first == again
    assert [ln["a"]["ci"] for ln in first["lines"]] != [ln["a"]["ci"] for ln in other["lines"]]
    assert [ln["a"]["value"] for ln in first["lines"]] == [ln["a"]["value"] for ln in other["lines"]]


def test_too_few_requests_are_refused(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["latency", "--database-url", sqlite_db, "--compare", "model", "few",
                 "m-1"]) == 2
    err = capsys.readouterr().err
    assert "'few' has 4" in err and "at least 10" in err


def test_a_p90_without_enough_samples_compares_nothing_and_says_so(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["latency", "--database-url", sqlite_db, "--json", "--compare", "model", "some",
                 "m-1"]) == 0
    captured = capsys.readouterr()
    found = lines(json.loads(captured.out))
    assert found["ttft_ms", "p50"]["separated"] is not None
    assert found["ttft_ms", "p90"]["separated"] is None
    assert found["ttft_ms", "p90"]["note"] == "n<30" and found["ttft_ms", "p90"]["a"]["n"] == 15
    assert "too few samples" in captured.err


def test_an_unknown_group_lists_the_known_ones(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["latency", "--database-url", sqlite_db, "--compare", "provider", "anthropic",
                 "mistral"]) == 2
    assert "no requests in provider 'mistral' (groups: anthropic, openai)" in (
        capsys.readouterr().err)


def test_plot_draws_both_groups_cdfs(sqlite_db: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "cdf.png"
    assert main(["latency", "--database-url", sqlite_db, "--compare", "provider", "anthropic",
                 "openai", "--until", UNTIL, "--resamples", "200", "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000


def test_without_numpy_the_command_names_the_extra(sqlite_db: str) -> None:
    code = ("import sys; sys.modules['numpy'] = None; from trioproxy.commands.cli import main; "
            f"sys.exit(main(['latency', '--database-url', {sqlite_db!r}, '--compare', "
            "'provider', 'anthropic', 'openai']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert "--compare needs numpy: pip install 'trioproxy[compare]'" in done.stderr
    assert done.stdout == ""


def test_pooled_itl_interval_covers_the_truth_of_one_distribution() -> None:
    """Both groups are drawn from one ITL distribution (p50 ~ 25 ms): each interval holds the
    pooled p50 of the other group's model, and the point estimate is the report's own."""
    from trioproxy.accounting.latency_summary import summarize_latency
    from trioproxy.commands.latency_compare import compare_groups

    rng = random.Random(1)
    rows = [{"ttft_ms": r.ttft_ms, "itl_p50_ms": r.itl_p50_ms, "itl_p90_ms": r.itl_p90_ms,
             "itl_p99_ms": r.itl_p99_ms, "itl_max_ms": r.itl_max_ms, "itl_count": r.itl_count,
             "tpot_ms": r.tpot_ms, "duration_ms": r.e2e_ms, "tokens_per_s": r.tokens_per_s,
             "output_tokens": 51, "model": "m"}
            for r in (paced(i, rng, 350.0, 25.0) for i in range(80))]
    found = {(ln["metric"], ln["quantile"]): ln for ln in compare_groups(rows[:40], rows[40:])}
    itl = found["itl_ms", "p50"]
    pooled = summarize_latency(rows[:40])["groups"][0]["metrics"]["itl_ms"]["p50"]
    assert itl["a"]["value"] == pytest.approx(pooled, abs=1e-3)
    lo, hi = itl["a"]["ci"]
    assert lo < 25.0 < hi and hi - lo < 5.0 and math.isfinite(itl["diff_pct"])


def test_pooled_itl_agrees_with_the_report_from_the_gap_sketches(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = compare(sqlite_db, capsys, "provider", "anthropic", "openai", "--until", UNTIL)
    assert main(["latency", "--database-url", sqlite_db, "--by", "provider", "--json",
                 "--until", UNTIL]) == 0
    groups = {g["group"]: g["metrics"]["itl_ms"] for g in
              json.loads(capsys.readouterr().out)["groups"]}
    found = lines(report)
    for q in ("p50", "p90"):
        line = found["itl_ms", q]
        assert line["a"]["value"] == pytest.approx(groups["anthropic"][q], abs=1e-3)
        assert line["b"]["value"] == pytest.approx(groups["openai"][q], abs=1e-3)
    assert found["itl_ms", "p50"]["b"]["gaps"] == groups["openai"]["count"] == 3000


def test_a_huge_group_shares_columns_and_keeps_its_interval_around_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the work bound, neighbouring sketch buckets share a column (at least 32): the
    interval still brackets the pooled value, which stays exact."""
    import trioproxy.commands.latency_compare as lc

    rng = random.Random(5)
    rows = [{"itl_sketch": r.itl_sketch, "itl_p50_ms": r.itl_p50_ms, "itl_p90_ms": r.itl_p90_ms,
             "itl_p99_ms": r.itl_p99_ms, "itl_max_ms": r.itl_max_ms, "itl_count": 50}
            for r in (paced(i, rng, 350.0, 25.0) for i in range(60))]
    import numpy as np

    assert len(merge_sketches(r["itl_sketch"] for r in rows).items()) > 2 * 32  # to share
    full = lc._itl_side(rows, [50.0, 90.0], np.random.default_rng(0), 400)
    monkeypatch.setattr(lc, "_ITL_FLOPS", 1.0)  # as if the group were enormous
    coarse = lc._itl_side(rows, [50.0, 90.0], np.random.default_rng(0), 400)
    assert list(coarse["values"]) == list(full["values"])
    for i in (0, 1):
        lo, hi = coarse["ci"][i]
        assert lo <= coarse["values"][i] <= hi * 1.03
        assert abs(lo - full["ci"][i][0]) < 0.1 * full["values"][i]
