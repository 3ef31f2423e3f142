"""Extensions: payload / response-start / complete hooks, mutation tracking, bypass contract."""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

import pytest
import trio

from trioproxy import Settings
from trioproxy.contrib.model_alias import ModelAlias
from trioproxy.extensions import Extension, HookContext, MutableHeaders, load_extensions, load_spec
from trioproxy.testing import FakeUpstream

from .conftest import RawClient, proxy_settings, start_proxy

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]

# Deliberately not in compact form: re-encoding would show up in the sha256.
MESSAGES = b'{ "model" : "fast",\n "max_tokens": 5, "messages": [{"role": "user", "content": "h\\u00e9"}] }'
COUNT = b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}'
CHAT = b'{"model": "fast",  "messages": [{"role": "user", "content": "hi"}], "temperature": 0.10}'
RESPONSES = b'{"model": "fast",   "input": "hi", "extra": 12345678901234567890}'
CASES = [
    ("/v1/messages", ANTHROPIC, MESSAGES),
    ("/v1/messages/count_tokens", ANTHROPIC, COUNT),
    ("/v1/chat/completions", OPENAI, CHAT),
    ("/v1/responses", OPENAI, RESPONSES),
]


class Recorder(Extension):
    """Records every hook call, in order, across all stages."""

    def __init__(self, name: str, calls: list[tuple[str, str]], *, change: bool = False) -> None:
        self.name = name
        self.calls = calls
        self.change = change

    async def on_payload(self, ctx, payload, headers):
        self.calls.append((self.name, "payload"))
        if self.change:
            payload["model"] = "claude-haiku-4-5"
            headers.add("anthropic-beta", f"added-by-{self.name}")
            return payload
        return None

    async def on_response_start(self, ctx, status, headers):
        self.calls.append((self.name, "response_start"))
        headers.set(f"x-ext-{self.name}", "1")

    async def on_complete(self, ctx, record):
        self.calls.append((self.name, "complete"))


class Boom(Extension):
    name = "boom"

    def __init__(self, mode: str = "raise") -> None:
        self.mode = mode
        self.timeout = 2.0

    async def on_payload(self, ctx, payload, headers):
        payload["model"] = "half-changed"  # mutated in place, then fails
        headers.add("x-half", "1")
        if self.mode == "raise":
            raise RuntimeError("kaboom")
        await trio.sleep(3600)


async def _proxy_with(nursery, upstream, extensions, **settings):
    return await start_proxy(nursery, proxy_settings(upstream, **settings), extensions=extensions)


@pytest.mark.parametrize(("path", "headers", "body"), CASES)
async def test_mutating_extension_changes_every_http_payload_kind(
    nursery: trio.Nursery, upstream: FakeUpstream, path, headers, body,
) -> None:
    server = await _proxy_with(nursery, upstream, [ModelAlias({"fast": "claude-haiku-4-5"})])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", path, headers, body)
    await client.aclose()
    assert resp.status == 200
    seen = upstream.requests[-1]
    payload = json.loads(seen.body)
    assert payload["model"] == "claude-haiku-4-5"
    # serialised once, compactly, keeping key order, non-ASCII text and number digits
    original = json.loads(body)
    assert list(payload) == list(original)
    assert seen.body == json.dumps({**original, "model": "claude-haiku-4-5"},
                                   ensure_ascii=False, separators=(",", ":")).encode()
    assert int(seen.header("content-length")) == len(seen.body)
    await server.stop()


@pytest.mark.parametrize(("path", "headers", "body"), CASES)
async def test_unchanged_payload_goes_upstream_verbatim(
    nursery: trio.Nursery, upstream: FakeUpstream, path, headers, body,
) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Recorder("watcher", calls)])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        await client.request("POST", path + "?q=%20x", headers, body)
    await client.aclose()
    assert hashlib.sha256(upstream.requests[-1].body).hexdigest() == hashlib.sha256(body).hexdigest()
    assert ("watcher", "payload") in calls
    await server.stop()


async def test_bypass_forwards_exact_bytes_and_skips_hooks(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Recorder("r", calls, change=True)])
    client = await RawClient.connect(server.port)
    target = "/v1/messages?beta=true&a=%2F"
    with trio.fail_after(20):
        resp = await client.request(
            "POST", target,
            [*ANTHROPIC, ("x-trioproxy-bypass", "true"), ("x-trioproxy-debug", "1"), ("x-custom", "k")],
            MESSAGES)
    await client.aclose()
    seen = upstream.requests[-1]
    assert hashlib.sha256(seen.body).digest() == hashlib.sha256(MESSAGES).digest()
    assert seen.target.endswith(target.encode())
    assert seen.header("x-trioproxy-bypass") is None and seen.header("x-trioproxy-debug") is None
    assert seen.header("x-custom") == "k" and seen.header("anthropic-beta") is None
    assert resp.header("x-ext-r") is None  # no response-start hook either
    await server.wait_exchanges(1)
    assert calls == [("r", "complete")]  # the complete hook still fires
    await server.stop()


async def test_bypass_header_name_is_configurable(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Recorder("r", calls, change=True)],
                               bypass_headers="x-trioproxy-bypass,x-headroom-bypass")
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        await client.request("POST", "/v1/messages", [*ANTHROPIC, ("x-headroom-bypass", "true")], MESSAGES)
    await client.aclose()
    seen = upstream.requests[-1]
    assert seen.body == MESSAGES and seen.header("x-headroom-bypass") is None
    await server.stop()


async def test_fail_open_keeps_the_payload_as_before_the_failing_hook(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Boom("raise"), Recorder("after", calls)])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
    await client.aclose()
    assert resp.status == 200
    seen = upstream.requests[-1]
    assert seen.body == MESSAGES and seen.header("x-half") is None
    assert ("after", "payload") in calls
    assert any("boom" in r.getMessage() and "kaboom" in r.getMessage() for r in caplog.records)
    assert len(await server.wait_exchanges(1)) == 1
    await server.stop()


async def test_hook_over_its_time_budget_is_abandoned(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await _proxy_with(nursery, upstream, [Boom("hang")])
    client = await RawClient.connect(server.port)
    with trio.fail_after(60):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
    await client.aclose()
    assert resp.status == 200 and upstream.requests[-1].body == MESSAGES
    await server.stop()


async def test_fail_closed_answers_500_in_the_provider_shape(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    server = await _proxy_with(nursery, upstream, [Boom("raise")], extensions_fail_closed=True)
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        a = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
        o = await client.request("POST", "/v1/chat/completions", OPENAI, CHAT)
    await client.aclose()
    assert a.status == 500 and json.loads(a.body)["type"] == "error"
    assert o.status == 500 and json.loads(o.body)["error"]["type"] == "server_error"
    failure = "extension 'boom' failed in payload: RuntimeError: kaboom"
    assert json.loads(a.body)["error"]["message"] == f"request rejected: {failure}"
    assert upstream.requests == []
    exchanges = await server.wait_exchanges(2)
    assert [e.end_reason for e in exchanges] == ["extension_error", "extension_error"]
    assert [e.error for e in exchanges] == [failure, failure]  # the hook's failure, as it was
    await server.stop()


async def test_stage_order_is_deterministic(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Recorder("first", calls), Recorder("second", calls)])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
    await client.aclose()
    await server.wait_exchanges(1)
    await server.stop()
    assert resp.header("x-ext-first") == "1" and resp.header("x-ext-second") == "1"
    assert calls == [
        ("first", "payload"), ("second", "payload"),
        ("first", "response_start"), ("second", "response_start"),
        ("first", "complete"), ("second", "complete"),
    ]


async def test_compressed_request_body_is_decoded_only_for_hooks(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    compressed = gzip.compress(MESSAGES)
    headers = [*ANTHROPIC, ("content-encoding", "gzip")]
    plain = await start_proxy(nursery, proxy_settings(upstream))
    client = await RawClient.connect(plain.port)
    with trio.fail_after(20):
        await client.request("POST", "/v1/messages", headers, compressed)
    await client.aclose()
    assert upstream.requests[-1].body == compressed  # forwarded as-is
    assert upstream.requests[-1].header("content-encoding") == "gzip"
    aliasing = await _proxy_with(nursery, upstream, [ModelAlias({"fast": "claude-haiku-4-5"})])
    client = await RawClient.connect(aliasing.port)
    with trio.fail_after(20):
        await client.request("POST", "/v1/messages", headers, compressed)
    await client.aclose()
    seen = upstream.requests[-1]
    assert json.loads(seen.body)["model"] == "claude-haiku-4-5"
    assert seen.header("content-encoding") is None
    await plain.stop()
    await aliasing.stop()


async def test_non_json_body_skips_hooks_and_goes_upstream_unchanged(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    calls: list[tuple[str, str]] = []
    server = await _proxy_with(nursery, upstream, [Recorder("r", calls, change=True)])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        await client.request("POST", "/v1/messages", ANTHROPIC, b'{"model": "fast", oops')
    await client.aclose()
    assert upstream.requests[-1].body == b'{"model": "fast", oops'
    assert ("r", "payload") not in calls
    await server.stop()


def test_mutable_headers_track_changes() -> None:
    h = MutableHeaders([(b"Anthropic-Beta", b"a"), (b"x-api-key", b"k")])
    assert h.get("anthropic-beta") == "a" and not h.changed
    h.add("anthropic-beta", "b")
    assert h.get_all("ANTHROPIC-BETA") == ["a", "b"] and h.changed
    h.remove("x-api-key")
    assert "x-api-key" not in h


def test_loading_by_spec_and_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    ext = load_spec("trioproxy.contrib.model_alias:ModelAlias", Settings())
    assert isinstance(ext, ModelAlias) and ext.name == "model_alias"
    with pytest.raises(ValueError, match="module:attr"):
        load_spec("no-colon")
    monkeypatch.setenv("TRIOPROXY_MODEL_ALIASES", '{"a": "b"}')
    loaded = load_extensions(["trioproxy.contrib.model_alias:ModelAlias"],
                             settings=Settings.from_env())
    assert [e.name for e in loaded][-1] == "model_alias" and loaded[-1].aliases == {"a": "b"}


async def test_model_alias_leaves_unknown_models_alone() -> None:
    alias = ModelAlias({"fast": "claude-haiku-4-5"})
    ctx = HookContext("id", "openai.chat", "openai", "http", "/v1/chat/completions", "gpt-4o", False, False)
    payload: dict[str, Any] = {"model": "gpt-4o"}
    assert await alias.on_payload(ctx, payload, MutableHeaders([])) is None
    assert payload == {"model": "gpt-4o"}


async def test_fail_closed_response_start_hook_is_a_clean_500(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    class BadStart(Extension):
        name = "bad-start"

        async def on_response_start(self, ctx, status, headers):
            raise RuntimeError("no")

    server = await _proxy_with(nursery, upstream, [BadStart()], extensions_fail_closed=True)
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
    await client.aclose()
    failure = "extension 'bad-start' failed in response_start: RuntimeError: no"
    assert resp.status == 500 and json.loads(resp.body)["type"] == "error"
    assert json.loads(resp.body)["error"]["message"] == f"response rejected: {failure}"
    (ex,) = await server.wait_exchanges(1)
    assert ex.end_reason == "extension_error" and ex.error == failure
    await server.stop()


async def test_in_place_change_is_noticed_and_hook_headers_obey_the_policy(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    class Sloppy(Extension):
        name = "sloppy"

        async def on_payload(self, ctx, payload, headers):
            payload["max_tokens"] = 7  # mutated in place, returns None
            headers.add("x-trioproxy-internal", "1")
            headers.add("connection", "close")
            headers.add("anthropic-beta", "ok")

    server = await _proxy_with(nursery, upstream, [Sloppy()])
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES)
    await client.aclose()
    seen = upstream.requests[-1]
    assert json.loads(seen.body)["max_tokens"] == 7
    assert seen.header("x-trioproxy-internal") is None and seen.header("connection") is None
    assert seen.header("anthropic-beta") == "ok"
    assert int(seen.header("content-length")) == len(seen.body)
    await server.stop()
