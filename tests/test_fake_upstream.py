"""The fake upstream itself: wire shapes of the default replies, scripting, connections, TLS."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trustme

from trioproxy.testing import (
    Abort,
    FakeUpstream,
    Pause,
    Reply,
    anthropic_sse,
    error_reply,
)

ANTHROPIC = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
OPENAI = {"authorization": "Bearer sk-test"}


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await nursery.start(upstream.serve)
    yield upstream
    assert upstream.errors == []  # no handler ever failed


def sse_data(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields.get("event"), fields["data"]))
    return events


async def test_default_replies_have_the_real_wire_shapes(fake: FakeUpstream) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        with trio.fail_after(5):
            msg = await client.post("/anthropic/v1/messages?beta=true", headers=ANTHROPIC, json={
                "model": "claude-haiku-4-5", "stream": True, "messages": []})
            chat = await client.post("/v1/chat/completions", headers=OPENAI, json={
                "model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}})
            resp = await client.post("/v1/responses", headers=OPENAI, json={"stream": True})
            buffered = await client.post("/v1/messages", headers=ANTHROPIC, json={"model": "m"})
            count = await client.post("/v1/messages/count_tokens", headers=ANTHROPIC, json={})
            models = await client.get("/v1/models", headers=ANTHROPIC)
            missing = await client.get("/nope", headers=OPENAI)

    assert msg.headers["content-type"].startswith("text/event-stream")
    assert msg.headers["request-id"].startswith("req_011C")
    assert msg.headers["keep-alive"] == "timeout=30" and msg.headers["connection"] == "keep-alive"
    assert fake.requests[0].reply_request_id == msg.headers["request-id"]
    assert fake.requests[0].target == b"/anthropic/v1/messages?beta=true"
    assert fake.requests[0].query == b"beta=true"
    events = sse_data(msg.content)
    assert [name for name, _ in events][:3] == ["message_start", "content_block_start", "ping"]
    start = json.loads(events[0][1])["message"]
    assert start["model"] == "claude-haiku-4-5" and start["id"].startswith("msg_01")
    assert start["usage"]["cache_read_input_tokens"] == 0
    delta = json.loads(next(d for n, d in events if n == "message_delta"))
    assert delta["usage"]["output_tokens"] == 2 and events[-1][0] == "message_stop"

    chunks = [d for _, d in sse_data(chat.content)]
    assert chunks[-1] == "[DONE]" and chat.headers["x-request-id"].startswith("req_")
    usage_chunk = json.loads(chunks[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] > 0
    assert all(json.loads(c)["usage"] is None for c in chunks[:-2])
    assert json.loads(chunks[1])["model"] == "gpt-4o"

    r_events = sse_data(resp.content)
    assert [json.loads(d)["sequence_number"] for _, d in r_events] == list(range(len(r_events)))
    assert r_events[-1][0] == "response.completed"
    usage = json.loads(r_events[-1][1])["response"]["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0

    assert buffered.json()["usage"]["output_tokens"] == 2 and "content-length" in buffered.headers
    assert count.json()["input_tokens"] > 0
    assert models.json()["data"][0]["type"] == "model"
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert len({r.conn_id for r in fake.requests}) == 1  # keep-alive: one connection


async def chunked_body() -> AsyncIterator[bytes]:
    yield b"chunk"
    yield b"ed"


async def test_enqueued_replies_are_fifo_and_per_path(fake: FakeUpstream) -> None:
    fake.enqueue(error_reply("anthropic", 429, "rate_limit_error", "slow", retry_after=7),
                 path="/v1/messages")
    fake.enqueue(Reply(status=201, body=[b"a", b"b"], chunked=False))
    async with httpx.AsyncClient(base_url=fake.url) as client:
        with trio.fail_after(5):
            other = await client.post("/v1/chat/completions", content=b"x" * 70_000)
            limited = await client.post("/v1/messages", content=chunked_body())
            default = await client.post("/v1/messages", json={})
    assert (other.status_code, other.content) == (201, b"ab")
    assert fake.requests[0].body == b"x" * 70_000 and fake.requests[1].body == b"chunked"
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert limited.json()["request_id"] == limited.headers["request-id"]
    assert default.status_code == 200


async def test_pause_delays_by_virtual_time(
    autojump_clock: trio.abc.Clock, fake: FakeUpstream
) -> None:
    fake.enqueue(anthropic_sse(["a", "b"], gaps=[0, 0, 0, 0, 300]))
    async with httpx.AsyncClient(base_url=fake.url, timeout=None) as client:
        with trio.fail_after(1000):
            start = trio.current_time()
            async with client.stream("POST", "/v1/messages", json={"stream": True}) as resp:
                seen = [(trio.current_time() - start, c) async for c in resp.aiter_raw()]
    assert seen[0][0] < 1 and b"message_start" in seen[0][1]
    late = [t for t, c in seen if b'"text":"b"' in c]
    assert late and late[0] >= 300


async def test_abort_cuts_the_body(fake: FakeUpstream) -> None:
    fake.enqueue(Reply(body=[b"data: 1\n\n", Abort(), b"never"]))
    got = b""
    async with httpx.AsyncClient(base_url=fake.url) as client:
        with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/messages") as resp:
                async for chunk in resp.aiter_raw():
                    got += chunk
    assert got == b"data: 1\n\n"
    await fake.connections[0].closed.wait()
    assert fake.connections[0].close_reason == "abort"


async def test_close_before_response_and_keep_alive_false(fake: FakeUpstream) -> None:
    fake.enqueue(Reply(keep_alive=False))
    fake.enqueue(Reply(close_before_response=True))
    async with httpx.AsyncClient(base_url=fake.url) as client:
        with trio.fail_after(5):
            first = await client.get("/a")
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/b")
    assert first.headers["connection"] == "close" and "keep-alive" not in first.headers
    assert [r.conn_id for r in fake.requests] == [1, 2]
    with trio.fail_after(5):
        for conn in fake.connections:
            await conn.closed.wait()
    assert [c.close_reason for c in fake.connections] == ["close", "close_before_response"]


async def test_client_vanishing_mid_stream_is_noticed_at_once(
    autojump_clock: trio.abc.Clock, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(body=[b"data: 1\n\n", Pause(500), b"data: 2\n\n"]))
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    with trio.fail_after(60):
        got = b""
        while b"data: 1" not in got:
            got += await stream.receive_some(65536)
        gone_at = trio.current_time()
        await stream.aclose()
        await fake.connections[0].closed.wait()
    conn = fake.connections[0]
    assert conn.closed_at is not None and conn.closed_at - gone_at < 0.1
    assert conn.close_reason == "peer"
    async with httpx.AsyncClient(base_url=fake.url) as client:  # still serving
        assert (await client.get("/v1/models")).status_code == 200


async def test_tls_with_trustme(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    fake = FakeUpstream(tls=server_ctx)
    await nursery.start(fake.serve)
    assert fake.url.startswith("https://127.0.0.1:")
    async with httpx.AsyncClient(base_url=fake.url, verify=client_ctx) as client:
        with trio.fail_after(5):
            for _ in range(2):
                resp = await client.post("/v1/responses", json={"model": "gpt-5"})
                assert resp.json()["usage"]["output_tokens"] == 2
    assert [r.conn_id for r in fake.requests] == [1, 1]
