"""``trioproxy usage``: table and JSON totals from either store, time windows, one record."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from trioproxy.accounting.query import parse_when
from trioproxy.accounting.store import open_store
from trioproxy.usage_cli import add_usage_parser, run_usage

from .test_store import DAY, T0, database_url, make_record


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    for url in database_url(request.param, tmp_path):
        store = open_store(url)
        store.migrate()
        store.insert_many([
            make_record(1, cost_usd=0.5, key_fingerprint="f1", key_last4="AAAA",
                        cache_read_tokens=30, cache_write_tokens=4),
            make_record(2, cost_usd=0.25, key_fingerprint="f1", key_last4="AAAA",
                        response_id="msg_2", upstream_request_id="req_up_2"),
            make_record(3, started_at=T0 + DAY, model="mystery-7", cost_usd=None,
                        input_tokens=1000, output_tokens=50, reasoning_tokens=8),
        ])
        store.close()
        yield url


def usage(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trioproxy")
    add_usage_parser(parser.add_subparsers(dest="command"))
    return run_usage(parser.parse_args(["usage", *argv]))


def test_table_by_model_shows_unknown_cost_as_question_mark(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage("--database-url", db_url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "requests", "input"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if not line.startswith("-")}
    assert rows["claude-sonnet-4-5"] == ["claude-sonnet-4-5", "2", "200", "20", "30", "4", "0",
                                         "0.7500", "0"]
    assert rows["mystery-7"] == ["mystery-7", "1", "1,000", "50", "0", "0", "8", "?", "1"]
    assert rows["total"] == ["total", "3", "1,200", "70", "30", "4", "8", "0.7500+?", "1"]


def test_json_by_key(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage("--database-url", db_url, "--by", "key", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group_by"] == "key"
    groups = {g["group"]: g for g in out["groups"]}
    assert groups["f1"]["requests"] == 2 and groups["f1"]["key_last4"] == "AAAA"
    assert groups["f1"]["cost_usd"] == pytest.approx(0.75)
    assert groups[None]["cost_usd"] is None and groups[None]["unpriced_requests"] == 1
    assert out["totals"]["requests"] == 3 and out["totals"]["cost_usd"] == pytest.approx(0.75)
    assert out["totals"]["unpriced_requests"] == 1


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
