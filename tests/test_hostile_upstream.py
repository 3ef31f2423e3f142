"""A lying upstream, end to end: framing it contradicts, usage and timing headers it forges.

What a client of the proxy would notice: a body whose length header disagrees with its framing
(a truncated or broken answer), two ``x-usage-*`` values for one name (which one is the
proxy's?), a ``Server-Timing`` metric named twice.
"""

from __future__ import annotations

import json
import re

import pytest
import trio
import trio_websocket as tws

from trioproxy import Settings
from trioproxy.testing import FakeUpstream, Reply, openai_chat_json, openai_chat_sse
from trioproxy.testing.websocket import FakeResponsesWS

from .conftest import ProxyServer, RawClient, start_proxy
from .h2client import h2_request
from .test_upstream_body import ScriptedUpstream

OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]
CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT_STREAM = json.dumps({"model": "gpt-4o", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()

BOTH_FRAMINGS = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 60\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/models", b""),  # relayed as it streams
    ("POST", "/v1/chat/completions", CHAT),  # accounted: read whole, answered with usage
])
async def test_chunked_beside_a_content_length_reaches_the_client_whole_and_is_not_reused(
        nursery: trio.Nursery, method: str, path: str, body: bytes) -> None:
    answer = json.loads(openai_chat_json(prompt_tokens=3).body_bytes)
    payload = json.dumps(answer).encode()
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    upstream = ScriptedUpstream([[BOTH_FRAMINGS + _chunked(payload)], [ok]])
    await nursery.start(upstream.serve)
    url = f"http://127.0.0.1:{upstream.port}"
    proxy = await start_proxy(nursery, Settings(anthropic_base_url=url, openai_base_url=url,
                                                accounting=False))
    client = await RawClient.connect(proxy.port)
    try:
        with trio.fail_after(10):
            first = await client.request(method, path, OPENAI, body)
            second = await client.request(method, path, OPENAI, body)
            exchanges = await proxy.wait_exchanges(2)
    finally:
        await client.aclose()
        await proxy.stop()
    assert first.error is None and first.complete and first.status == 200
    assert json.loads(first.body) == answer
    assert first.header_all("content-length") in ([], [str(len(first.body))])
    assert second.complete and second.body == b"{}"
    assert upstream.connections == 2  # the suspect connection was closed, not reused
    assert len(exchanges) == 2


FORGED = [("x-usage-prompt_tokens", "999999"), ("x-usage-cost_usd", "0"),
          ("x-usage-made_up", "1"), ("X-Request-Model", "forged-model"),
          ("x-trioproxy-request-id", "tp_forged"), ("x-upstream-kept", "yes"),
          ("server-timing", 'total;dur=1, db;dur=5;desc="a, b"'),
          ("Server-Timing", "ttft;dur=2, cache;desc=hit")]


def _forging(reply: Reply) -> Reply:
    reply.headers.extend(FORGED)
    return reply


def _assert_no_forgery(headers: dict[str, list[str]]) -> None:
    for name in ("x-usage-prompt_tokens", "x-usage-cost_usd", "x-request-model",
                 "x-trioproxy-request-id"):
        assert len(headers.get(name, [])) <= 1, name
    assert "x-usage-made_up" not in headers
    assert "999999" not in headers.get("x-usage-prompt_tokens", [])
    assert "forged-model" not in headers.get("x-request-model", [])
    assert "tp_forged" not in headers.get("x-trioproxy-request-id", [])
    assert headers["x-upstream-kept"] == ["yes"]


def _timing_names(values: list[str]) -> list[bytes]:
    """Metric names of Server-Timing fields (quoted descriptions may hold commas)."""
    names = []
    for value in values:
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', value)
        names += [e.split(";")[0].strip().lower().encode() for e in unquoted.split(",")]
    return names


def _multi(headers: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(k.decode().lower(), []).append(v.decode("latin-1"))
    return out


async def test_a_buffered_answer_carries_only_the_proxys_usage_and_one_timing_per_name(
        upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient) -> None:
    upstream.enqueue(_forging(openai_chat_json(prompt_tokens=12, completion_tokens=4)))
    with trio.fail_after(10):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, CHAT)
    headers = _multi(resp.headers)
    _assert_no_forgery(headers)
    assert headers["x-usage-prompt_tokens"] == ["12"]
    assert headers["x-request-model"] != ["forged-model"]
    assert len(headers["server-timing"]) == 1  # merged into one field
    names = _timing_names(headers["server-timing"])
    assert len(names) == len(set(names))  # no metric named twice
    assert {b"db", b"cache", b"total"} <= set(names)  # the upstream's others kept
    value = headers["server-timing"][0]
    assert 'db;dur=5;desc="a, b"' in value and "total;dur=1," not in value


async def test_a_streamed_answer_relays_no_upstream_usage_header(
        upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient) -> None:
    upstream.enqueue(_forging(openai_chat_sse(["a", "b"], include_usage=True)))
    with trio.fail_after(10):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, CHAT_STREAM)
    headers = _multi(resp.headers)
    _assert_no_forgery(headers)
    assert not [k for k in headers if k.startswith("x-usage-") or k == "x-request-model"]
    assert _timing_names(headers["server-timing"]) == [b"db", b"cache"]


async def test_http2_trailers_and_the_head_never_name_a_metric_twice(
        upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.enqueue(_forging(openai_chat_sse(["a", "b"], include_usage=True)))
    with trio.fail_after(20):
        resp = await h2_request(proxy.port, "POST", "/v1/chat/completions",
                                [*OPENAI, ("te", "trailers")], CHAT_STREAM)
    assert resp.trailers is not None and resp.trailers["x-usage-prompt_tokens"] == "12"
    assert "x-usage-prompt_tokens" not in resp.headers  # only the proxy's, as a trailer
    assert "x-usage-made_up" not in resp.headers and "x-request-model" not in resp.headers
    names = _timing_names([resp.headers["server-timing"], resp.trailers["server-timing"]])
    assert len(names) == len(set(names)) and b"total" in names and b"db" in names


async def test_the_websocket_accept_carries_no_upstream_usage_header(
        nursery: trio.Nursery) -> None:
    fake = FakeResponsesWS(accept_headers=[(k.encode(), v.encode()) for k, v in FORGED])
    await nursery.start(fake.serve)
    proxy = await start_proxy(nursery, Settings(openai_base_url=fake.base_url, accounting=False))
    with trio.fail_after(10):
        async with tws.open_websocket_url(
                f"ws://127.0.0.1:{proxy.port}/v1/responses",
                extra_headers=[("authorization", "Bearer sk-test-ws")]) as ws:
            accept = _multi(list(ws.handshake_headers))
    await proxy.stop()
    _assert_no_forgery(accept)
    assert _timing_names(accept["server-timing"]) == [b"db", b"cache"]
