"""A record becomes the same row however it is written: SQLite's multi-row INSERTs at every batch
size (with duplicates) and under any parameter limit, the record's row, its token and latency
columns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trioproxy.accounting import store as store_mod
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import COLUMNS, UsageRecord
from trioproxy.accounting.store import ROWS_PER_INSERT

from .test_store import count_rows, make_record


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A migrated SQLite ledger and its URL."""
    url = f"sqlite://{tmp_path}/usage.db"
    s = open_store(url)
    s.migrate()
    try:
        yield s, url
    finally:
        s.close()


@pytest.mark.parametrize("n", [1, 3, 4, 15, 16, 17, ROWS_PER_INSERT - 1, ROWS_PER_INSERT,
                               ROWS_PER_INSERT + 1, 200])
def test_sqlite_multi_row_inserts_take_every_batch_size(sqlite_store, n: int) -> None:
    s, url = sqlite_store
    batch = [make_record(i, extra={"i": i}, error=f"e\x00{i}") for i in range(n)]
    assert s.insert_many(batch) == n
    assert count_rows(url) == n
    assert s.get(f"req_{n - 1}") == make_record(
        n - 1, extra={"i": n - 1}, error=f"e\ufffd{n - 1}")
    # already stored, plus one new and one twice in the same batch: counted once each
    again = [*batch, make_record(n), make_record(n)]
    assert s.insert_many(again) == 1
    assert count_rows(url) == n + 1


def test_a_low_parameter_limit_gives_smaller_inserts(
        sqlite_store, monkeypatch: pytest.MonkeyPatch) -> None:
    s, url = sqlite_store
    monkeypatch.setattr(s.backend, "max_parameters", len(COLUMNS) * 5)  # an old SQLite's 999
    assert s.insert_many([make_record(i) for i in range(23)]) == 23
    assert count_rows(url) == 23


def test_a_backend_without_a_parameter_limit_uses_executemany(
        sqlite_store, monkeypatch: pytest.MonkeyPatch) -> None:
    s, url = sqlite_store
    monkeypatch.setattr(s.backend, "max_parameters", len(COLUMNS) - 1)
    called: list[Any] = []
    monkeypatch.setattr(store_mod, "_insert_chunked", lambda *a: called.append(a))
    assert s.insert_many([make_record(i) for i in range(5)]) == 5
    assert not called and count_rows(url) == 5


def test_to_row_matches_the_plain_conversion() -> None:
    rec = make_record(1, raw_usage={"x": "a\x00b"}, extra={"n": [1, 2], "o": object()},
                      error="bad\x00", streamed=False, model="m\x00")
    row = rec.to_row()
    assert len(row) == len(COLUMNS)
    by_name = dict(zip(COLUMNS, row, strict=True))
    assert by_name["error"] == "bad\ufffd" and by_name["model"] == "m\ufffd"
    assert by_name["raw_usage"] == '{"x":"a\\u0000b"}'
    assert by_name["extra"].startswith('{"n":[1,2],"o":"<object object')
    assert by_name["streamed"] is False and by_name["output_tokens"] == 10
    assert UsageRecord(request_id="r", started_at=0.0, raw_usage="s\x00").to_row()[
        COLUMNS.index("raw_usage")] == '"s\\u0000"'


def test_token_and_latency_fields_from_any_object() -> None:
    import types

    from trioproxy.accounting.build import _token_fields
    from trioproxy.accounting.record import LATENCY_FIELDS, TOKEN_FIELDS, latency_columns
    from trioproxy.protocol.latency import Latency
    from trioproxy.providers.base import Usage

    assert _token_fields(None) == dict.fromkeys(TOKEN_FIELDS)
    assert _token_fields(Usage(input_tokens=5, reasoning_tokens=2)) == {
        **dict.fromkeys(TOKEN_FIELDS), "input_tokens": 5, "reasoning_tokens": 2}
    assert _token_fields(types.SimpleNamespace(output_tokens=7)) == {
        **dict.fromkeys(TOKEN_FIELDS), "output_tokens": 7}
    assert latency_columns(None) == dict.fromkeys(LATENCY_FIELDS)
    lat = Latency(ttft_ms=1.5, duration_ms=9.0, itl_count=3)
    assert latency_columns(lat) == {name: getattr(lat, attr) for name, attr in
                                    LATENCY_FIELDS.items()}
    assert latency_columns(lat)["e2e_ms"] == 9.0
    assert latency_columns(types.SimpleNamespace(ttft_ms=2.0))["ttft_ms"] == 2.0
    latency_columns(None)["ttft_ms"] = 1.0  # a fresh dict each time
    assert latency_columns(None)["ttft_ms"] is None
