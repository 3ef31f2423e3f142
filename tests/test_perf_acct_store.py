"""The finalisation fast paths keep their results: multi-row INSERTs of SQLite (every size, with
duplicates), the record's row, and the bounded caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trioproxy.accounting import store as store_mod
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import COLUMNS, UsageRecord
from trioproxy.accounting.store import ROWS_PER_INSERT

from .test_store import count_rows, make_record


@pytest.mark.parametrize("n", [1, 3, 4, 15, 16, 17, ROWS_PER_INSERT - 1, ROWS_PER_INSERT,
                               ROWS_PER_INSERT + 1, 200])
def test_sqlite_multi_row_inserts_take_every_batch_size(tmp_path: Path, n: int) -> None:
    url = f"sqlite://{tmp_path}/usage.db"
    s = open_store(url)
    s.migrate()
    try:
        assert s.backend.max_parameters // len(COLUMNS) >= ROWS_PER_INSERT
        batch = [make_record(i, extra={"i": i}, error=f"e\x00{i}") for i in range(n)]
        assert s.insert_many(batch) == n
        assert count_rows(url) == n
        assert s.get(f"req_{n - 1}") == make_record(
            n - 1, extra={"i": n - 1}, error=f"e\ufffd{n - 1}")
        # already stored, plus one new and one twice in the same batch: counted once each
        again = [*batch, make_record(n), make_record(n)]
        assert s.insert_many(again) == 1
        assert count_rows(url) == n + 1
    finally:
        s.close()


def test_a_backend_without_a_parameter_limit_uses_executemany(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite://{tmp_path}/usage.db"
    s = open_store(url)
    s.migrate()
    try:
        monkeypatch.setattr(s.backend, "max_parameters", len(COLUMNS) - 1)
        called: list[Any] = []
        monkeypatch.setattr(store_mod, "_insert_chunked", lambda *a: called.append(a))
        assert s.insert_many([make_record(i) for i in range(5)]) == 5
        assert not called and count_rows(url) == 5
    finally:
        s.close()


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
