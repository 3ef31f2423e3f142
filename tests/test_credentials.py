"""Several credentials in one request are refused, never forwarded side by side.

Which key pays would otherwise be the upstream's choice (and the ledger's guess could differ).
The answer is a 400 in the provider's error shape, nothing goes upstream, one usage record, and
no credential value appears in the answer.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket as tws

from trioproxy import Settings
from trioproxy.testing import FakeUpstream, anthropic_json, openai_chat_json
from trioproxy.testing.websocket import FakeResponsesWS

from .conftest import ProxyServer, RawClient, start_proxy

MSG = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 9,
                  "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
KEY_A, KEY_B = "sk-ant-first-credential-1111", "sk-second-credential-2222"
JSON = ("content-type", "application/json")

SEVERAL = {
    "two authorization": [("authorization", f"Bearer {KEY_A}"), ("authorization", f"Bearer {KEY_B}")],
    "two x-api-key": [("x-api-key", KEY_A), ("x-api-key", KEY_B)],
    "x-api-key and bearer": [("x-api-key", KEY_A), ("authorization", f"Bearer {KEY_B}")],
}


def _no_secret(body: bytes) -> None:
    assert KEY_A.encode() not in body and KEY_B.encode() not in body
    assert b"first-credential" not in body and b"second-credential" not in body


@pytest.mark.parametrize("case", list(SEVERAL))
@pytest.mark.parametrize(("path", "body", "provider"), [
    ("/v1/messages", MSG, "anthropic"), ("/v1/chat/completions", CHAT, "openai"),
])
async def test_several_credentials_get_a_400_in_the_providers_shape_and_one_record(
        upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient, case: str, path: str,
        body: bytes, provider: str) -> None:
    with trio.fail_after(10):
        resp = await raw_client.request("POST", path, [*SEVERAL[case], JSON], body)
        exchanges = await proxy.wait_exchanges(1)
        await trio.sleep(0.05)  # a second record would have been finalised by now
    assert resp.status == 400 and resp.complete
    error = json.loads(resp.body)
    if provider == "anthropic":
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    else:
        assert error["error"]["type"] == "invalid_request_error" and "param" in error["error"]
    _no_secret(resp.body)
    assert upstream.requests == []  # nothing forwarded
    assert len(proxy.exchanges) == len(exchanges) == 1
    assert exchanges[0].status == 400


@pytest.mark.parametrize("headers", [
    [("x-api-key", KEY_A)],
    [("authorization", f"Bearer {KEY_A}")],
    [("authorization", f"Bearer {KEY_A}"), ("connection", "x-api-key"), ("x-api-key", KEY_B)],
])
async def test_one_credential_is_forwarded(upstream: FakeUpstream, proxy: ProxyServer,
                                           raw_client: RawClient, headers) -> None:
    upstream.enqueue(anthropic_json())
    with trio.fail_after(10):
        resp = await raw_client.request("POST", "/v1/messages", [*headers, JSON], MSG)
    assert resp.status == 200
    assert len(upstream.requests) == 1


async def test_a_websocket_handshake_with_several_credentials_is_refused(
        nursery: trio.Nursery) -> None:
    fake = FakeResponsesWS()
    await nursery.start(fake.serve)
    proxy = await start_proxy(nursery, Settings(openai_base_url=fake.base_url, accounting=False))
    rejected: list[tws.ConnectionRejected] = []
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    try:
        with trio.fail_after(10):
            try:
                async with trio.open_nursery() as inner:
                    await tws.wrap_client_stream(
                        inner, stream, f"127.0.0.1:{proxy.port}", "/v1/responses",
                        extra_headers=[(b"authorization", f"Bearer {KEY_A}".encode()),
                                       (b"x-api-key", KEY_B.encode())])
                    raise AssertionError("the upgrade was accepted")
            except* tws.ConnectionRejected as group:
                rejected.extend(group.exceptions)  # type: ignore[arg-type]
            exchanges = await proxy.wait_exchanges(1)
    finally:
        await trio.aclose_forcefully(stream)
        await proxy.stop()
    assert rejected[0].status_code == 400
    body = rejected[0].body or b""
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    _no_secret(body)
    assert fake.sockets == []  # the upstream never saw it
    assert len(exchanges) == 1


async def test_openai_route_with_two_bearer_tokens_never_reaches_the_upstream(
        upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient) -> None:
    upstream.enqueue(openai_chat_json())
    with trio.fail_after(10):
        resp = await raw_client.request(
            "POST", "/openai/v1/chat/completions", [*SEVERAL["two authorization"], JSON], CHAT)
    assert resp.status == 400 and upstream.requests == []
