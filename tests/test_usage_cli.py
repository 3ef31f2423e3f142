"""``trioproxy usage``: table and JSON totals from either store, time windows, one record."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.query import parse_when
from trioproxy.commands.usage import add_usage_parser, run_usage

from .test_store import DAY, T0, database_url, make_record

FREE = {"input_tokens": None, "output_tokens": None, "cost_usd": None}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    for url in database_url(request.param, tmp_path):
        store = open_store(url)
        store.migrate()
        ok = {"status": 200, "end_reason": "complete"}
        store.insert_many([
            make_record(1, cost_usd=0.5, key_fingerprint="f1", key_last4="AAAA",
                        cache_read_tokens=30, cache_write_tokens=4, **ok),
            make_record(2, cost_usd=0.25, key_fingerprint="f1", key_last4="AAAA",
                        response_id="msg_2", upstream_request_id="req_up_2", **ok),
            make_record(3, started_at=T0 + DAY, model="mystery-7", cost_usd=None,
                        input_tokens=1000, output_tokens=50, reasoning_tokens=8, **ok),
            # never reached a model: free by nature, not "unpriced"
            make_record(4, provider=None, api=None, model=None, status=404,
                        end_reason="rejected", **FREE),
            make_record(5, model=None, model_requested="claude-sonnet-4-5", status=502,
                        end_reason="connect_error", **FREE),
            # sub-cent spend
            make_record(6, provider="openai", api="openai.chat", model="gpt-4o-mini",
                        cost_usd=0.000312, **ok),
            # reached a model that never answered: the cost is unknown
            make_record(7, provider="openai", api="openai.responses", model=None,
                        model_requested="gpt-5", status=504, end_reason="timeout",
                        error="upstream read timeout after 600s", **FREE),
        ])
        store.close()
        yield url


def usage(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trioproxy")
    add_usage_parser(parser.add_subparsers(dest="command"))
    return run_usage(parser.parse_args(["usage", *argv]))


def table_rows(out: str) -> dict[str, list[str]]:
    """label -> the nine fixed cells plus the outcomes text."""
    lines = [line for line in out.splitlines()[2:] if line and not line.startswith("-")]
    rows = {}
    for line in lines:
        if line.startswith(("requests since", "all recorded")):
            continue
        cells = line.split()
        rows[cells[0]] = [*cells[:9], " ".join(cells[9:])]
    return rows


def test_table_by_model_prices_to_the_micro_dollar_and_separates_free_from_unpriced(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage("--database-url", db_url, "--since", "all") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["model", "requests", "input"]
    rows = table_rows(out)
    assert rows["claude-sonnet-4-5"] == ["claude-sonnet-4-5", "3", "200", "20", "30", "4", "0",
                                         "0.750000", "0", "ok 2, connect_error 1"]
    assert rows["gpt-4o-mini"][7:] == ["0.000312", "0", "ok 1"]
    assert rows["mystery-7"] == ["mystery-7", "1", "1,000", "50", "0", "0", "8", "?", "1",
                                 "ok 1"]
    assert rows["gpt-5"][7:] == ["?", "1", "timeout 1"]
    assert rows["(unknown)"][7:] == ["0.000000", "0", "rejected 1"]  # the 404 costs nothing
    assert rows["total"] == ["total", "7", "1,300", "80", "30", "4", "8", "0.750312+?", "2",
                             "ok 4, connect_error 1, rejected 1, timeout 1"]
    assert out.rstrip().endswith("all recorded requests")


def test_json_by_key(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage("--database-url", db_url, "--by", "key", "--json", "--since", "all") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group_by"] == "key"
    groups = {g["group"]: g for g in out["groups"]}
    assert groups["f1"]["requests"] == 2 and groups["f1"]["key_last4"] == "AAAA"
    assert groups["f1"]["cost_usd"] == pytest.approx(0.75)
    assert groups[None]["cost_usd"] == pytest.approx(0.000312)
    assert (groups[None]["unpriced_requests"], groups[None]["free_requests"]) == (2, 2)
    assert out["totals"]["requests"] == 7
    assert out["totals"]["cost_usd"] == pytest.approx(0.750312)
    assert out["totals"]["unpriced_requests"] == 2 and out["totals"]["free_requests"] == 2
    assert out["totals"]["outcomes"] == {"ok": 4, "connect_error": 1, "rejected": 1,
                                         "timeout": 1}


@pytest.mark.parametrize(("by", "expected"), [
    ("provider", {"anthropic": 4, "openai": 2, None: 1}),
    ("api", {"anthropic.messages": 4, "openai.chat": 1, "openai.responses": 1, None: 1}),
    ("hour", {"2025-06-15T15:00Z": 6, "2025-06-16T15:00Z": 1}),
    ("status", {200: 4, 404: 1, 502: 1, 504: 1}),
    ("outcome", {"ok": 4, "connect_error": 1, "rejected": 1, "timeout": 1}),
])
def test_group_by_provider_api_hour_status_and_outcome(
    db_url: str, capsys: pytest.CaptureFixture[str], by: str, expected: dict[Any, int]
) -> None:
    assert usage("--database-url", db_url, "--by", by, "--json", "--since", "all") == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert {g["group"]: g["requests"] for g in groups} == expected
    if by in ("hour", "status"):
        assert [g["group"] for g in groups] == sorted(expected)  # in time / code order


def test_default_window_is_the_last_24_hours(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(db_url)
    store.insert_many([make_record(99, started_at=time.time() - 3600, cost_usd=0.002,
                                   status=200, end_reason="complete")])
    store.close()
    assert usage("--database-url", db_url, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["requests"] == 1 and out["since"] == pytest.approx(
        time.time() - 86400, abs=60)
    assert usage("--database-url", db_url) == 0
    assert "--since all for everything" in capsys.readouterr().out
    assert usage("--database-url", db_url, "--since", "all", "--json") == 0
    assert json.loads(capsys.readouterr().out)["totals"]["requests"] == 8


def test_by_day_within_a_window(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage("--database-url", db_url, "--by", "day", "--since", "2025-06-16",
                 "--until", "2025-06-17T00:00:00Z", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [(g["group"], g["requests"]) for g in out["groups"]] == [("2025-06-16", 1)]


def test_one_record_by_any_id(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for id_any in ("req_2", "msg_2", "req_up_2"):
        assert usage("--database-url", db_url, "--id", id_any, "--json") == 0
        out = json.loads(capsys.readouterr().out)
        assert out["object"] == "trioproxy.usage" and out["id"] == "req_2"
        assert "key_fingerprint" not in out
    assert usage("--database-url", db_url, "--id", "nope") == 1


def test_missing_sqlite_database_is_an_empty_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "none.db"
    assert usage("--database-url", str(db), "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["groups"] == []
    assert "no usage database" in captured.err
    assert not db.exists()


def test_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage("--since", "last tuesday") == 2
    assert "not a time" in capsys.readouterr().err


def test_unreachable_store_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1"
    assert usage("--database-url", url) == 1
    assert "cannot open the usage store" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    ("24h", T0 - DAY), ("7d", T0 - 7 * DAY), ("30m", T0 - 1800), ("2w", T0 - 14 * DAY),
    ("now", T0), ("today", 1_749_945_600.0), ("2025-06-15", 1_749_945_600.0),
    ("2025-06-15T12:00", 1_749_988_800.0), ("2025-06-15T14:00+02:00", 1_749_988_800.0),
])
def test_parse_when(text: str, expected: float) -> None:
    assert parse_when(text, now=T0) == expected
