"""``GET /v1/usage/{id}`` answers: key-scoped, never hidden by another key's record with the
same id, the newest of the caller's own, and 503 (not 500) while the store is unreachable."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from trioproxy.accounting.keys import fingerprint
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.writer import UsageWriter, open_usage_writer
from trioproxy.endpoints.usage_lookup import usage_lookup

from .test_store import T0, make_record

SECRET = b"s" * 32
KEY_A, KEY_B = "sk-ant-api03-KEYAAAA1111", "sk-ant-api03-KEYBBBB2222"
FP_A, FP_B = fingerprint(KEY_A, SECRET)[0], fingerprint(KEY_B, SECRET)[0]


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[UsageWriter]:
    url = f"sqlite://{tmp_path}/usage.db"
    async with open_usage_writer(lambda: open_store(url), spill_path=tmp_path / "spill.jsonl",
                                 retry_interval=0.01) as w:
        yield w


async def ask(writer: UsageWriter | None, lookup_id: str, key: str | None = None,
              admin: str | None = None) -> tuple[int, dict]:
    headers = [(b"x-api-key", key.encode())] if key else []
    if admin:
        headers.append((b"x-trioproxy-admin-token", admin.encode()))
    status, body = await usage_lookup(lookup_id, headers, writer, SECRET, "adm", "anthropic")
    return status, json.loads(body)


async def test_another_keys_record_with_the_same_correlation_id_never_hides_yours(
    writer: UsageWriter,
) -> None:
    with trio.fail_after(10):
        writer.submit(make_record(1, correlation_id="gw-1", key_fingerprint=FP_A))
        writer.submit(make_record(2, started_at=T0 + 9, correlation_id="gw-1",
                                  key_fingerprint=FP_B))
        for flushed in (False, True):  # pending, then stored
            if flushed:
                assert await writer.flush(5)
            assert (await ask(writer, "gw-1", KEY_A))[1]["id"] == "req_1"
            assert (await ask(writer, "gw-1", KEY_B))[1]["id"] == "req_2"
            assert (await ask(writer, "gw-1", admin="adm"))[1]["id"] == "req_2"  # the newest
        assert (await ask(writer, "gw-1", "sk-ant-api03-NOBODY0000"))[0] == 404
        assert (await ask(writer, "gw-1"))[0] == 404
        assert (await ask(writer, "nothing", KEY_A))[0] == 404


async def test_a_client_reusing_its_own_id_gets_its_newest_record(writer: UsageWriter) -> None:
    with trio.fail_after(10):
        for i, at in ((1, T0), (2, T0 + 5), (3, T0 + 2)):
            writer.submit(make_record(i, started_at=at, correlation_id="mine",
                                      key_fingerprint=FP_A))
        assert await writer.flush(5)
        status, body = await ask(writer, "mine", KEY_A)
    assert (status, body["id"], body["correlation_id"]) == (200, "req_2", "mine")


async def test_store_unreachable_is_a_503_in_the_provider_shape_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioproxy")
    (tmp_path / "not-a-dir").write_text("")
    url = f"sqlite://{tmp_path}/not-a-dir/usage.db"  # cannot be opened
    with trio.fail_after(10):
        async with open_usage_writer(lambda: open_store(url), spill_path=tmp_path / "s.jsonl",
                                     retry_interval=0.01, shutdown_timeout=0.1) as w:
            status, body = await ask(w, "req_1", KEY_A)
            w.submit(make_record(1, correlation_id="gw-9", key_fingerprint=FP_A))
            pending_status, pending_body = await ask(w, "gw-9", KEY_A)
            other_status, _ = await ask(w, "gw-9", KEY_B)
    assert status == 503 and body["type"] == "error" and body["error"]["type"] == "api_error"
    lookup_lines = [r for r in caplog.records if "usage lookup" in r.getMessage()]
    assert len(lookup_lines) == 2 and all(r.exc_info is None for r in lookup_lines)
    assert (pending_status, pending_body["id"]) == (200, "req_1")  # its own, still in memory
    assert other_status == 503
