"""Usage on the wire: x-usage-* headers, HTTP/2 trailers, include_usage injected and stripped."""

from __future__ import annotations

import json

import pytest
import trio

from trioproxy.protocol.usage_wire import UsageChunkStripper, inject_include_usage
from trioproxy.testing import (
    FakeUpstream,
    Reply,
    anthropic_json,
    anthropic_sse,
    openai_chat_json,
    openai_chat_sse,
    openai_responses_json,
    openai_responses_sse,
)

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy
from .h2client import h2_request

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]


def _msg(stream: bool) -> bytes:
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 9, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def _chat(stream: bool, include_usage: bool | None = None) -> bytes:
    body: dict = {"model": "gpt-4o", "stream": stream,
                  "messages": [{"role": "user", "content": "hi"}]}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return json.dumps(body).encode()


def _resp(stream: bool) -> bytes:
    return json.dumps({"model": "gpt-5", "stream": stream, "input": "hi"}).encode()


BUFFERED = [
    ("/v1/messages", ANTHROPIC, _msg(False),
     anthropic_json(input_tokens=11, output_tokens=7, cache_read=5, cache_creation=3),
     {"x-usage-prompt_tokens": "11", "x-usage-completion_tokens": "7",
      "x-usage-cache_read_input_tokens": "5", "x-usage-cache_creation_input_tokens": "3"}),
    ("/v1/chat/completions", OPENAI, _chat(False), openai_chat_json(prompt_tokens=12, completion_tokens=4),
     {"x-usage-prompt_tokens": "12", "x-usage-completion_tokens": "4"}),
    ("/v1/responses", OPENAI, _resp(False), openai_responses_json(input_tokens=13, output_tokens=6),
     {"x-usage-prompt_tokens": "13", "x-usage-completion_tokens": "6"}),
]


@pytest.mark.parametrize(("path", "headers", "body", "reply", "expected"), BUFFERED)
async def test_buffered_responses_carry_usage_headers_and_an_identical_body(
    upstream: FakeUpstream, raw_client: RawClient, path, headers, body, reply: Reply, expected,
) -> None:
    upstream.enqueue(reply)
    with trio.fail_after(20):
        resp = await raw_client.request("POST", path, headers, body)
    assert resp.status == 200
    assert resp.body == b"".join(p for p in reply.body if isinstance(p, bytes))
    for name, value in expected.items():
        assert resp.header(name) == value, name
    assert resp.header("x-request-model")
    assert resp.header("x-usage-cost_usd") is not None  # known models are priced
    if "anthropic" not in path and "messages" not in path:
        assert resp.header("x-usage-cache_read_input_tokens") is None


async def test_unknown_values_get_no_header(upstream: FakeUpstream, raw_client: RawClient) -> None:
    upstream.enqueue(anthropic_json(model="totally-unknown-model-x"))
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, _msg(False))
    assert resp.header("x-usage-prompt_tokens") is not None
    assert resp.header("x-usage-cost_usd") is None  # unknown model: no price, no header
    assert resp.header("x-usage-reasoning_tokens") is None


async def test_error_statuses_pass_through_without_usage_headers(
    upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    from trioproxy.testing import error_reply

    upstream.enqueue(error_reply("openai", 400, "invalid_request_error", "bad"))
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, _chat(False))
    assert resp.status == 400 and resp.header("x-usage-prompt_tokens") is None


STREAMED = [
    ("/v1/messages", ANTHROPIC, _msg(True), anthropic_sse(["a", "b"], input_tokens=21, output_tokens=2)),
    ("/v1/chat/completions", OPENAI, _chat(True, True), openai_chat_sse(["a", "b"], include_usage=True)),
    ("/v1/responses", OPENAI, _resp(True), openai_responses_sse(["a", "b"])),
]


@pytest.mark.parametrize(("path", "headers", "body", "reply"), STREAMED)
async def test_http2_client_asking_for_trailers_gets_usage_trailers(
    upstream: FakeUpstream, proxy: ProxyServer, path, headers, body, reply: Reply,
) -> None:
    upstream.enqueue(reply)
    with trio.fail_after(20):
        resp = await h2_request(proxy.port, "POST", path, [*headers, ("te", "trailers")], body)
    assert resp.status == 200 and resp.ended
    assert resp.body == b"".join(p for p in reply.body if isinstance(p, bytes))
    assert "x-usage-prompt_tokens" in resp.headers.get("trailer", "")
    assert resp.trailers is not None
    assert resp.trailers["x-usage-complete"] == "true"
    assert int(resp.trailers["x-usage-completion_tokens"]) > 0
    assert resp.trailers["x-request-model"]


async def test_incomplete_stream_trailers_say_so(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.enqueue(anthropic_sse(["a", "b", "c"], input_tokens=21, abort_after=4))
    with trio.fail_after(20):
        resp = await h2_request(proxy.port, "POST", "/v1/messages",
                                [*ANTHROPIC, ("te", "trailers")], _msg(True))
    assert resp.trailers is not None and resp.trailers["x-usage-complete"] == "false"
    assert resp.trailers["x-usage-prompt_tokens"] == "21"  # known from message_start


@pytest.mark.parametrize("http2", [False, True])
async def test_no_trailers_for_clients_that_did_not_ask(
    upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient, http2: bool,
) -> None:
    reply = anthropic_sse(["a", "b"])
    upstream.enqueue(reply)
    expected = b"".join(p for p in reply.body if isinstance(p, bytes))
    with trio.fail_after(20):
        if http2:
            resp = await h2_request(proxy.port, "POST", "/v1/messages", ANTHROPIC, _msg(True))
            assert resp.trailers is None and resp.ended and "trailer" not in resp.headers
            assert resp.body == expected
        else:
            r = await raw_client.request("POST", "/v1/messages", [*ANTHROPIC, ("te", "trailers")], _msg(True))
            assert r.complete and r.body == expected and r.header("trailer") is None


async def test_include_usage_injected_upstream_and_stripped_downstream(
    upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient,
) -> None:
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, _chat(True))
    sent = json.loads(upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    # What upstream would have sent without injection, apart from the "usage": null fields
    plain = openai_chat_sse(["Hello", " world"], include_usage=False)
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(json.loads(e.removeprefix(b"data: "))["choices"] for e in events[:-1])
    expected_events = [e for e in b"".join(p for p in plain.body if isinstance(p, bytes)).split(b"\n\n") if e]
    assert len(events) == len(expected_events)
    # exact accounting despite the client not asking
    (ex,) = await proxy.wait_exchanges(1)
    usage = ex.usage()
    assert usage.known and usage.input_tokens is not None


async def test_client_that_asked_for_usage_is_untouched(
    upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient,
) -> None:
    body = _chat(True, True)
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, body)
    assert upstream.requests[-1].body == body
    events = [json.loads(e.removeprefix(b"data: ")) for e in resp.body.split(b"\n\n")
              if e and e != b"data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] > 0


async def test_include_usage_can_be_turned_off(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    server = await start_proxy(nursery, proxy_settings(upstream, include_usage=False))
    client = await RawClient.connect(server.port)
    body = _chat(True)
    with trio.fail_after(20):
        await client.request("POST", "/v1/chat/completions", OPENAI, body)
        await client.request("POST", "/v1/chat/completions", [*OPENAI], body)
    await client.aclose()
    assert upstream.requests[-1].body == body
    await server.stop()


async def test_bypass_gets_no_injection_no_usage_headers(
    upstream: FakeUpstream, raw_client: RawClient,
) -> None:
    body = _chat(True)
    with trio.fail_after(20):
        await raw_client.request("POST", "/v1/chat/completions", [*OPENAI, ("x-trioproxy-bypass", "1")], body)
        upstream.enqueue(anthropic_json())
        buffered = await raw_client.request(
            "POST", "/v1/messages", [*ANTHROPIC, ("x-trioproxy-bypass", "true")], _msg(False))
    assert upstream.requests[-2].body == body
    assert buffered.header("x-usage-prompt_tokens") is None


def test_stripper_handles_events_split_across_chunks() -> None:
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3}}\n\n'
    stream = b'data: {"choices":[{"delta":{}}],"usage":null}\n\n' + usage + b"data: [DONE]\n\n"
    for step in (1, 3, 7, len(stream)):
        s = UsageChunkStripper()
        out = b"".join(s.feed(stream[i:i + step]) for i in range(0, len(stream), step)) + s.flush()
        assert out == stream.replace(usage, b"") and s.stripped


def test_inject_whenever_the_client_did_not_ask_for_usage() -> None:
    for options in ({"include_usage": False}, {"include_usage": None}, None, {}):
        p = {"stream": True, "stream_options": options}
        assert inject_include_usage(p) and p["stream_options"] == {"include_usage": True}
    p = {"stream": True, "stream_options": {"x": 1, "include_usage": False}}
    assert inject_include_usage(p) and p["stream_options"] == {"x": 1, "include_usage": True}
    p = {"stream": True}
    assert inject_include_usage(p) and p["stream_options"] == {"include_usage": True}


def test_inject_leaves_alone_what_the_client_decided_or_the_upstream_must_judge() -> None:
    for payload in ({"stream": True, "stream_options": {"include_usage": True}},
                    {"stream": True, "stream_options": {"include_usage": "yes"}},
                    {"stream": True, "stream_options": {"include_usage": 0}},
                    {"stream": True, "stream_options": "on"},
                    {"stream": False}, {"stream": "true"}):
        before = json.dumps(payload)
        assert not inject_include_usage(payload) and json.dumps(payload) == before


async def test_oversized_chunked_json_is_streamed_on_without_usage_headers(
    upstream: FakeUpstream, raw_client: RawClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trioproxy.relay.http

    monkeypatch.setattr(trioproxy.relay.http, "BUFFER_LIMIT", 1000)
    reply = anthropic_json(text="x" * 5000)
    reply.chunked = True
    reply.body = [reply.body_bytes[i:i + 700] for i in range(0, len(reply.body_bytes), 700)]
    upstream.enqueue(reply)
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, _msg(False))
    assert resp.status == 200 and resp.complete
    assert resp.body == reply.body_bytes
    assert resp.header("x-usage-prompt_tokens") is None


async def test_include_usage_is_injected_when_the_stream_key_is_escaped(
    upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient,
) -> None:
    """``"\\u0073tream": true`` is ``"stream": true``: usage is injected (and stripped) too."""
    body = _chat(True).replace(b'"stream"', b'"\\u0073tream"')
    assert json.loads(body)["stream"] is True
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, body)
    assert json.loads(upstream.requests[-1].body)["stream_options"] == {"include_usage": True}
    events = [e for e in resp.body.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert events and all(json.loads(e.removeprefix(b"data: "))["choices"] for e in events)
