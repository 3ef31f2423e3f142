"""``GET /v1/usage/{id}`` answers: key-scoped, never hidden by another key's record with the
same id, the newest of the caller's own, and 503 (not 500) while the store is unreachable.
Through the proxy, a record belongs to the key the upstream bills, not to a header the upstream
ignores or never receives."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.accounting.keys import fingerprint
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.writer import UsageWriter, open_usage_writer
from trioproxy.endpoints.usage_lookup import usage_lookup
from trioproxy.testing import FakeUpstream, anthropic_sse

from .conftest import ProxyServer, proxy_settings, start_proxy
from .test_store import T0, make_record

SECRET = b"s" * 32
KEY_A, KEY_B = "sk-ant-api03-KEYAAAA1111", "sk-ant-api03-KEYBBBB2222"
FP_A, FP_B = fingerprint(KEY_A, SECRET)[0], fingerprint(KEY_B, SECRET)[0]
REAL = "sk-proj-REALKEYbilled0001"
DECOY = "sk-proj-DECOYkeyXXXX0002"


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


# -- through the proxy: the record belongs to the key the upstream bills ---------------------------


@pytest.fixture
async def ledger_proxy(nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path):
    server = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "usage.db")))
    yield server
    await server.stop()


async def _lookup(server: ProxyServer, http: httpx.AsyncClient, rid: str,
                  headers: dict[str, str]) -> int:
    await server.wait_exchanges(1)
    assert await server.app.runtime.writer.flush(10)
    return (await http.get(f"/v1/usage/{rid}", headers=headers)).status_code


async def test_openai_record_belongs_to_the_bearer_key_not_a_stray_x_api_key(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=ledger_proxy.url) as http:
            resp = await http.post("/v1/chat/completions", json={"model": "gpt-4o-mini"},
                                   headers={"authorization": f"Bearer {REAL}", "x-api-key": DECOY})
            assert resp.status_code == 400  # two credentials: refused, nothing forwarded
            assert upstream.requests == []
            rid = resp.headers["x-trioproxy-request-id"]
            # OpenAI bills the bearer key: its owner sees the record, the decoy's holder does not
            assert await _lookup(ledger_proxy, http, rid, {"authorization": f"Bearer {REAL}"}) == 200
            assert await _lookup(ledger_proxy, http, rid, {"x-api-key": DECOY}) == 404


async def test_a_key_header_named_in_connection_is_not_the_records_key(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["hi"]))
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=ledger_proxy.url) as http:
            resp = await http.post(
                "/v1/messages", content=body,
                headers={"authorization": f"Bearer {REAL}", "x-api-key": DECOY,
                         "connection": "x-api-key", "anthropic-version": "2023-06-01"})
            assert resp.status_code == 200
            sent = upstream.requests[-1].headers
            assert all(k.lower() != b"x-api-key" for k, _ in sent)  # hop-by-hop: not forwarded
            rid = resp.headers["x-trioproxy-request-id"]
            assert await _lookup(ledger_proxy, http, rid, {"authorization": f"Bearer {REAL}"}) == 200
            assert await _lookup(ledger_proxy, http, rid, {"x-api-key": DECOY}) == 404


async def test_a_lookup_does_not_wait_for_another_keys_stream_that_reuses_the_id(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    from trioproxy.testing import openai_chat_sse

    from .conftest import RawClient

    upstream.enqueue(openai_chat_sse(["a", "b"], gaps=[0, 0, 3600]))  # B's stream stays open
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    with trio.fail_after(20):
        raw = await RawClient.connect(ledger_proxy.port)
        await raw.send_request("POST", "/v1/chat/completions", [
            ("authorization", f"Bearer {DECOY}"), ("x-trioproxy-request-id", "shared-id-1")], body)
        await raw.read_body(await raw.read_head(), max_chunks=1)
        async with httpx.AsyncClient(base_url=ledger_proxy.url) as http:
            # A's lookup of an id B is using is answered while B's stream is still running
            with trio.move_on_after(5) as waited:
                got = await http.get("/v1/usage/shared-id-1",
                                     headers={"authorization": f"Bearer {REAL}"})
        await raw.aclose()
    assert not waited.cancelled_caught
    assert got.status_code == 404
