"""Review: the usage record is scoped to the key the upstream is billed for, not to a header the
upstream ignores or never receives (x-api-key next to an OpenAI bearer token, a header the
client named in ``Connection``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.testing import FakeUpstream, anthropic_sse

from .conftest import ProxyServer, proxy_settings, start_proxy

REAL = "sk-proj-REALKEYbilled0001"
DECOY = "sk-proj-DECOYkeyXXXX0002"


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


def test_openai_bills_the_bearer_token_when_both_headers_are_sent() -> None:
    from trioproxy.accounting.keys import extract_api_key

    headers = [(b"x-api-key", DECOY.encode()), (b"authorization", f"Bearer {REAL}".encode())]
    assert extract_api_key(headers, "openai") == REAL
    assert extract_api_key(headers, "anthropic") == DECOY  # Anthropic's API-key header


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
