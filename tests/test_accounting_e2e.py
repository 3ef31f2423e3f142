"""Accounting through the real proxy: exactly one record per request, whatever happens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy import Settings
from trioproxy.accounting.locations import open_store
from trioproxy.testing import Abort, FakeUpstream, Reply, anthropic_sse, openai_chat_sse

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy

KEY_A = "sk-ant-api03-SECRETKEYAAAA1234"
KEY_B = "sk-ant-api03-OTHERKEYBBBB5678"
SESSION = "5f0c-session-77"


def _anthropic(key: str = KEY_A) -> list[tuple[str, str]]:
    return [("x-api-key", key), ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"), ("user-agent", "claude-cli/2.0.0 (external, cli)"),
            ("x-claude-code-session-id", SESSION)]


OPENAI = [("authorization", "Bearer sk-proj-OPENAIKEY9999"), ("content-type", "application/json")]
MSG = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 9, "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def ledger_proxy(nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path):
    db = tmp_path / "usage.db"
    server = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(db), read_timeout=1.0, admin_token="adm-1"))
    server.db = db  # type: ignore[attr-defined]
    yield server
    await server.stop()


async def _records(server: ProxyServer, n: int) -> list:
    await server.wait_exchanges(n)
    writer = server.app.runtime.writer
    assert await writer.flush(10)
    store = open_store(str(server.db))  # type: ignore[attr-defined]
    try:
        rows = [store.get(ex.request_id) for ex in server.exchanges]
    finally:
        store.close()
    assert all(r is not None for r in rows)
    return rows


async def _request(server: ProxyServer, path: str, headers, body: bytes):
    client = await RawClient.connect(server.port)
    try:
        with trio.fail_after(20):
            return await client.request("POST", path, headers, body)
    finally:
        await client.aclose()


async def test_clean_stream_is_one_complete_priced_record(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["Hi", "!"], input_tokens=100, output_tokens=12,
                                   cache_read=40, cache_creation=10))
    resp = await _request(ledger_proxy, "/v1/messages?beta=true", _anthropic(), MSG)
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.status == 200 and rec.stop_reason == "end_turn" and rec.end_reason == "complete"
    assert rec.input_tokens == 150 and rec.cache_read_tokens == 40 and rec.cache_write_tokens == 10
    assert rec.output_tokens == 12 and rec.streamed is True
    assert rec.cost_usd is not None and rec.cost_usd > 0
    assert rec.upstream_request_id == resp.header("request-id")
    assert rec.request_id == resp.header("x-trioproxy-request-id")
    assert rec.response_id.startswith("msg_") and rec.model_requested == "claude-sonnet-4-5"
    assert rec.session_id == SESSION and rec.user_agent.startswith("claude-cli")
    assert rec.key_last4 == KEY_A[-4:] and rec.key_fingerprint and KEY_A not in rec.key_fingerprint
    assert rec.bytes_in == len(MSG) and rec.bytes_out == len(resp.body)
    assert rec.ttfb_ms is not None and rec.duration_ms >= rec.ttfb_ms


async def test_mid_stream_failure_is_one_incomplete_record_with_tokens_so_far(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["a", "b", "c"], input_tokens=70, abort_after=4))
    await _request(ledger_proxy, "/v1/messages", _anthropic(), MSG)
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.stop_reason == "incomplete" and rec.end_reason == "upstream_error"
    assert rec.input_tokens == 70 and rec.status == 200


async def test_client_disconnect_is_one_incomplete_record(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["a", "b"], gaps=[0, 0, 30], input_tokens=5))
    client = await RawClient.connect(ledger_proxy.port)
    with trio.fail_after(20):
        await client.send_request("POST", "/v1/messages", _anthropic(), MSG)
        resp = await client.read_head()
        await client.read_body(resp, max_chunks=1)
    await client.aclose()
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.end_reason == "client_disconnect" and rec.stop_reason == "incomplete"
    assert rec.input_tokens == 5


async def test_connect_failure_is_one_502_record(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    server = await start_proxy(nursery, Settings(
        anthropic_base_url=dead, openai_base_url=dead, database_url=str(tmp_path / "u.db")))
    server.db = tmp_path / "u.db"  # type: ignore[attr-defined]
    resp = await _request(server, "/v1/chat/completions", OPENAI, b'{"model":"gpt-4o"}')
    assert resp.status == 502
    (rec,) = await _records(server, 1)
    assert rec.status == 502 and rec.end_reason == "connect_error" and rec.input_tokens is None
    await server.stop()


async def test_timeout_is_one_504_record(upstream: FakeUpstream, ledger_proxy: ProxyServer) -> None:
    upstream.enqueue(Reply(before_headers=5))
    resp = await _request(ledger_proxy, "/v1/messages", _anthropic(), MSG)
    assert resp.status == 504
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.status == 504 and rec.end_reason == "timeout"


async def test_chat_stream_without_include_usage_is_still_counted(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    await _request(ledger_proxy, "/v1/chat/completions", OPENAI, body)
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.input_tokens and rec.output_tokens and rec.stop_reason == "stop"


async def test_usage_endpoint_answers_the_owner_by_any_id_and_404s_others(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(anthropic_sse(["a"], input_tokens=9, output_tokens=3))
    resp = await _request(ledger_proxy, "/v1/messages", _anthropic(KEY_A), MSG)
    (rec,) = await _records(ledger_proxy, 1)
    async with httpx.AsyncClient(base_url=ledger_proxy.url, timeout=10) as http:
        for ident in (rec.request_id, rec.upstream_request_id, rec.response_id):
            got = await http.get(f"/v1/usage/{ident}", headers={"x-api-key": KEY_A})
            assert got.status_code == 200, ident
            data = got.json()
            assert data["object"] == "trioproxy.usage" and data["id"] == rec.request_id
            assert data["usage"]["input_tokens"] == 9 and data["totals"]["output_tokens"] == 3
            assert data["stop_reason"] == "end_turn" and data["cost_usd"] == rec.cost_usd
        other = await http.get(f"/v1/usage/{rec.request_id}", headers={"x-api-key": KEY_B})
        assert other.status_code == 404 and other.json()["type"] == "error"
        anon = await http.get(f"/v1/usage/{rec.request_id}")
        assert anon.status_code == 404
        admin = await http.get(f"/v1/usage/{rec.request_id}",
                               headers={"x-trioproxy-admin-token": "adm-1"})
        assert admin.status_code == 200
    assert resp.header("x-trioproxy-request-id") == rec.request_id


async def test_usage_is_readable_as_soon_as_the_stream_ended(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    async with httpx.AsyncClient(base_url=ledger_proxy.url, timeout=10) as http:
        for _ in range(20):  # the lookup goes out the moment the stream's last byte is in
            resp = await _request(ledger_proxy, "/v1/messages", _anthropic(), MSG)
            got = await http.get(f"/v1/usage/{resp.header('x-trioproxy-request-id')}",
                                 headers={"x-api-key": KEY_A})
            assert got.status_code == 200 and got.json()["totals"]["input_tokens"] > 0


async def test_api_keys_never_reach_logs_or_the_database(
    upstream: FakeUpstream, ledger_proxy: ProxyServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[b"event: ping\ndata: {}\n\n", Abort()]))
    await _request(ledger_proxy, "/v1/messages", _anthropic(KEY_A), MSG)
    await _request(ledger_proxy, "/v1/chat/completions", OPENAI, b'{"model":"gpt-4o","stream":true}')
    await _request(ledger_proxy, "/nope", _anthropic(KEY_B), b"{}")
    await _records(ledger_proxy, 3)
    text = "\n".join(r.getMessage() for r in caplog.records)
    db = ledger_proxy.db  # type: ignore[attr-defined]
    blobs = [p.read_bytes() for p in db.parent.iterdir() if p.is_file()]
    for key in (KEY_A, KEY_B, "sk-proj-OPENAIKEY9999"):
        assert key not in text
        assert all(key.encode() not in blob for blob in blobs)
    assert "access" in text  # the access lines were there to be searched


async def test_every_request_leaves_exactly_one_record(
    upstream: FakeUpstream, ledger_proxy: ProxyServer,
) -> None:
    upstream.enqueue(openai_chat_sse(["x"], include_usage=True))
    await _request(ledger_proxy, "/v1/chat/completions", OPENAI, b'{"model":"gpt-4o","stream":true}')
    await _request(ledger_proxy, "/unknown", OPENAI, b"{}")  # 404
    await _request(ledger_proxy, "/v1/chat/completions", OPENAI, b"not json at all")
    records = await _records(ledger_proxy, 3)
    assert len({r.request_id for r in records}) == 3
    assert [r.status for r in records] == [200, 404, 200]


async def test_count_tokens_is_recorded_free_and_not_as_consumed_tokens(
    ledger_proxy: ProxyServer,
) -> None:
    body = b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}'
    resp = await _request(ledger_proxy, "/v1/messages/count_tokens", _anthropic(), body)
    assert resp.status == 200
    (rec,) = await _records(ledger_proxy, 1)
    assert rec.api == "anthropic.count_tokens" and rec.cost_usd == 0.0
    assert rec.input_tokens is None and rec.raw_usage["input_tokens"] > 0


async def test_a_reused_or_foreign_inbound_id_never_hides_a_record(
    ledger_proxy: ProxyServer,
) -> None:
    """Key A sends id X, key B sends the same X (another client's id), key A reuses it: three
    records, each under its own proxy id; lookups by X stay scoped to the caller's key."""
    for key in (KEY_A, KEY_B, KEY_A):
        await _request(ledger_proxy, "/v1/messages",
                       [*_anthropic(key), ("x-trioproxy-request-id", "gateway-123")], MSG)
    records = await _records(ledger_proxy, 3)
    assert len({r.request_id for r in records}) == 3
    assert [r.correlation_id for r in records] == ["gateway-123"] * 3
    async with httpx.AsyncClient(base_url=ledger_proxy.url, timeout=10) as http:
        mine_b = await http.get("/v1/usage/gateway-123", headers={"x-api-key": KEY_B})
        mine_a = await http.get("/v1/usage/gateway-123", headers={"x-api-key": KEY_A})
        for rec in records:  # each record by its own id, for its owner only
            owner = KEY_B if rec is records[1] else KEY_A
            got = await http.get(f"/v1/usage/{rec.request_id}", headers={"x-api-key": owner})
            assert got.status_code == 200 and got.json()["id"] == rec.request_id
    assert mine_b.status_code == 200 and mine_b.json()["id"] == records[1].request_id
    assert mine_a.status_code == 200 and mine_a.json()["id"] == records[2].request_id
