"""include_usage through the real proxy: injected whenever the client did not ask for usage,
the usage chunk removed again by JSON meaning (any whitespace, any key order), and the stream
accounted exactly."""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import trio

from trioproxy.accounting.locations import open_store
from trioproxy.testing import (
    FakeUpstream,
    JSONStyle,
    RecordedRequest,
    Reply,
    default_reply,
    openai_chat_sse,
)

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy

SPACED_SHUFFLED = JSONStyle(spaced=True, shuffled=True)
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]


@pytest.fixture
async def spaced_upstream(nursery: trio.Nursery) -> AsyncIterator[FakeUpstream]:
    """A fake that writes ``"choices": []`` with its keys in random order, as many
    OpenAI-compatible servers (and Python's json.dumps default) do."""
    fake = FakeUpstream(default=functools.partial(default_reply, style=SPACED_SHUFFLED))
    await nursery.start(fake.serve)
    yield fake
    assert fake.errors == []


@pytest.fixture
async def ledger(
    nursery: trio.Nursery, spaced_upstream: FakeUpstream, tmp_path: Path,
) -> AsyncIterator[ProxyServer]:
    server = await start_proxy(nursery, proxy_settings(
        spaced_upstream, accounting=True, database_url=str(tmp_path / "usage.db")))
    server.db = tmp_path / "usage.db"  # type: ignore[attr-defined]
    yield server
    await server.stop()


async def _records(server: ProxyServer, n: int) -> list:
    await server.wait_exchanges(n)
    assert await server.app.runtime.writer.flush(10)
    store = open_store(str(server.db))  # type: ignore[attr-defined]
    try:
        return [store.get(ex.request_id) for ex in server.exchanges]
    finally:
        store.close()


def _sdk_stream(url: str, **kwargs: object) -> list:
    """Stream one Chat completion with the official SDK; touch ``choices[0]`` on every chunk."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    try:
        chunks = list(client.chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}],
            **kwargs))
    finally:
        client.close()
    return chunks


def _expected_tokens(upstream: FakeUpstream, i: int) -> int:
    """The prompt_tokens the fake reported for request ``i`` (its default reply's rule)."""
    return max(1, len(upstream.requests[i].body) // 4)


async def test_sdk_sees_no_usage_chunk_when_upstream_writes_spaced_shuffled_json(
    ledger: ProxyServer, spaced_upstream: FakeUpstream,
) -> None:
    with trio.fail_after(30):
        runs = [await trio.to_thread.run_sync(_sdk_stream, ledger.url) for _ in range(3)]
    for chunks in runs:
        assert chunks and all(c.choices for c in chunks)  # no `choices: []` chunk reached the SDK
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world"
        assert all(c.usage is None for c in chunks)
    records = await _records(ledger, 3)
    for i, rec in enumerate(records):
        assert spaced_upstream.requests[i].json()["stream_options"] == {"include_usage": True}
        assert rec.input_tokens == _expected_tokens(spaced_upstream, i)
        assert rec.output_tokens == 2


async def test_client_sending_include_usage_false_gets_no_usage_chunk_but_is_accounted(
    ledger: ProxyServer, spaced_upstream: FakeUpstream,
) -> None:
    with trio.fail_after(30):
        chunks = await trio.to_thread.run_sync(functools.partial(
            _sdk_stream, ledger.url, stream_options={"include_usage": False}))
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert spaced_upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    (rec,) = await _records(ledger, 1)
    assert rec.input_tokens == _expected_tokens(spaced_upstream, 0) and rec.output_tokens == 2


async def test_client_asking_for_usage_gets_the_usage_chunk_and_an_untouched_request(
    ledger: ProxyServer, spaced_upstream: FakeUpstream,
) -> None:
    with trio.fail_after(30):
        chunks = await trio.to_thread.run_sync(functools.partial(
            _sdk_stream, ledger.url, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == _expected_tokens(spaced_upstream, 0)
    assert all(c.choices for c in chunks[:-1])
    assert spaced_upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    (rec,) = await _records(ledger, 1)
    assert rec.output_tokens == 2


async def test_stripped_stream_is_byte_identical_apart_from_the_usage_chunk(
    upstream: FakeUpstream, proxy: ProxyServer, raw_client: RawClient,
) -> None:
    reply = openai_chat_sse(["a", "b", "c"], include_usage=True, style=SPACED_SHUFFLED)
    upstream.enqueue(reply)
    body = json.dumps({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": False},
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with trio.fail_after(20):
        resp = await raw_client.request("POST", "/v1/chat/completions", OPENAI, body)
    events = [p for p in reply.body if isinstance(p, bytes)]
    usage = [e for e in events if e != b"data: [DONE]\n\n" and json.loads(e[6:])["choices"] == []]
    assert len(usage) == 1 and b'"choices": []' in usage[0]
    assert resp.body == b"".join(e for e in events if e not in usage)


def test_the_fakes_json_style_changes_bytes_not_meaning() -> None:
    plain = openai_chat_sse(["a"], include_usage=True).body
    styled = openai_chat_sse(["a"], include_usage=True, style=JSONStyle(spaced=True, shuffled=True,
                                                                         seed=3)).body
    for a, b in zip(plain, styled, strict=True):
        if a != b"data: [DONE]\n\n":
            obj_a, obj_b = json.loads(a[6:]), json.loads(b[6:])
            assert list(obj_a) != list(obj_b) and b'": ' in b and b'": ' not in a
            obj_a.pop("id"), obj_b.pop("id"), obj_a.pop("system_fingerprint")
            obj_b.pop("system_fingerprint")
            assert obj_a == obj_b


def _gzip_when_allowed(req: RecordedRequest) -> Reply:
    """An upstream (or a CDN in front of it) that compresses SSE whenever the client allows."""
    reply = openai_chat_sse(["Hel", "lo"], include_usage=True)
    if "gzip" not in (req.header("accept-encoding") or ""):
        return reply
    body = gzip.compress(b"".join(p for p in reply.body if isinstance(p, bytes)))
    headers = [*reply.headers, ("content-encoding", "gzip")]
    return Reply(reply.status, headers, [body])


async def test_injected_usage_is_stripped_even_when_the_client_accepts_gzip(
    nursery: trio.Nursery,
) -> None:
    """With usage injected, the proxy asks the upstream for an uncompressed stream, so the
    usage chunk it added can be removed again (it cannot strip inside a gzip stream)."""
    fake = FakeUpstream(default=_gzip_when_allowed)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, proxy_settings(fake))
    client = await RawClient.connect(server.port)
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/chat/completions",
                                    [*OPENAI, ("accept-encoding", "gzip, br")], body)
    await client.aclose()
    data = gzip.decompress(resp.body) if resp.header("content-encoding") == "gzip" else resp.body
    events = [json.loads(line[5:]) for line in data.decode().splitlines()
              if line.startswith("data:") and line.strip() != "data: [DONE]"]
    assert events and all(e["choices"] for e in events)  # no usage-only chunk reached the client
    assert fake.requests[0].header("accept-encoding") == "identity"
    await server.stop()
