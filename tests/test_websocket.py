"""The Responses WebSocket relay end to end: a socket's session, one record per response with its
own tokens, and the frames it passes (payload hooks, bypass, binary and other frames)."""

from __future__ import annotations

import hashlib
import json

import pytest
import trio

from trioproxy.contrib.model_alias import ModelAlias
from trioproxy.extensions import Extension
from trioproxy.testing.websocket import MiB, Turn

from .ws_proxy import connect, create, start_fake, start_pair, start_proxy, tokens, turn


async def test_multi_turn_session_chains_previous_response_id_and_records_each_response(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery)
        async with connect(proxy, headers=[(b"session-id", b"sess-42")]) as ws:
            warm = await turn(ws, create(generate=False))
            first = await turn(ws, create())
            rid = first[-1]["response"]["id"]
            second = await turn(ws, create(previous_response_id=rid))
        records = await proxy.wait_records(3)
    assert [e["type"] for e in warm] == ["response.created", "response.completed"]
    assert [e["type"] for e in first][1:4] == ["response.output_text.delta"] * 3
    assert second[-1]["response"]["previous_response_id"] == rid
    assert fake.last.creates[2]["previous_response_id"] == rid
    exs = [ex for ex, _ in records]
    socket_id = exs[0].request_id.rsplit(".", 1)[0]
    assert [ex.request_id for ex in exs] == [f"{socket_id}.{n}" for n in (1, 2, 3)]
    assert {ex.session_id for ex in exs} == {"sess-42"}
    assert all(ex.transport == "websocket" and ex.status == 200 for ex in exs)
    assert all(ex.end_reason == "complete" and ex.upstream_complete for ex in exs)
    assert all(ex.model_requested == "gpt-5-codex" and ex.route.api == "openai.responses"
               for ex in exs if ex.route is not None)
    assert exs[0].generate is False
    assert exs[2].previous_response_id == rid
    assert exs[2].response_id == second[-1]["response"]["id"]
    assert all(ex.first_byte_at is not None and ex.bytes_in > 0 and ex.bytes_out > 0 for ex in exs)
    assert [tokens(u) for _, u in records] == [(0, 0), (200, 3), (300, 3)]
    assert [u.cache_read_tokens for _, u in records] == [0, 100, 200]
    assert [u.response_id for _, u in records] == [e[-1]["response"]["id"] for e in (warm, first, second)]
    assert all(u.complete and u.stop_reason == "completed" for _, u in records)


async def test_session_id_defaults_to_the_socket_id(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        _fake, proxy = await start_pair(nursery)
        async with connect(proxy) as ws:
            await turn(ws, create())
            socket_id = dict(ws.handshake_headers)[b"x-trioproxy-request-id"].decode()
        (ex, _), = await proxy.wait_records(1)
    assert ex.session_id == socket_id
    assert ex.request_id == f"{socket_id}.1"


@pytest.mark.parametrize("size_mib", [2, 20])
async def test_large_frames_pass_both_ways_intact(nursery: trio.Nursery, size_mib: int) -> None:
    size = size_mib * MiB
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery, turns=[Turn(big_delta_bytes=size)])
        frame = create(instructions="y" * size)
        async with connect(proxy) as ws:
            events = await turn(ws, frame)
        records = await proxy.wait_records(1)
    assert fake.last.frames[0] == frame
    big = [e for e in events if e["type"] == "response.output_text.delta" and len(e["delta"]) == size]
    assert len(big) == 1
    ex = records[0][0]
    assert ex.bytes_in == len(frame)
    assert ex.bytes_out > size and ex.end_reason == "complete"


@pytest.mark.parametrize(("end", "stop"), [("failed", "failed"),
                                         ("incomplete", "max_output_tokens")])
async def test_failed_and_incomplete_responses_end_their_record(
    nursery: trio.Nursery, end: str, stop: str
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end=end)])  # type: ignore[arg-type]
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            events = await turn(ws, create())
            await turn(ws, create())  # the socket stays usable
        records = await proxy.wait_records(2)
    assert events[-1]["type"] == f"response.{end}"
    (ex, usage), (_, after) = records
    assert ex.end_reason == "complete" and ex.upstream_complete
    assert usage.complete and usage.stop_reason == stop and usage.output_tokens == 3
    assert after.stop_reason == "completed"


async def test_a_create_while_a_response_is_open_gets_a_record_of_its_own(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        _fake, proxy = await start_pair(nursery, turns=[Turn(end="stop")])
        async with connect(proxy) as ws:
            await ws.send_message(create())
            await ws.get_message()  # response.created, then the upstream goes quiet
            await ws.send_message(create(model="gpt-5"))
            await trio.sleep(0.05)
        records = await proxy.wait_records(2)
    assert [ex.end_reason for ex, _ in records] == ["client_disconnect", "client_disconnect"]
    assert sorted(ex.model_requested for ex, _ in records) == ["gpt-5", "gpt-5-codex"]


async def test_back_to_back_creates_are_each_charged_their_own_tokens(
    nursery: trio.Nursery,
) -> None:
    """Two response.create frames sent before the first response began: two records, each
    with the usage of its own response.completed, in order."""
    with trio.fail_after(10):
        _fake, proxy = await start_pair(nursery)
        async with connect(proxy) as ws:
            await ws.send_message(create(model="gpt-5-codex"))
            await ws.send_message(create(model="gpt-5"))
            done = []
            while len(done) < 2:
                event = json.loads(await ws.get_message())
                if event["type"] == "response.completed":
                    done.append(event["response"])
        records = sorted(await proxy.wait_records(2), key=lambda r: r[0].response_index)
    assert [ex.model_requested for ex, _ in records] == ["gpt-5-codex", "gpt-5"]
    assert [ex.response_id for ex, _ in records] == [r["id"] for r in done]
    for (ex, usage), response in zip(records, done, strict=True):
        assert ex.end_reason == "complete" and usage.complete
        assert tokens(usage) == (response["usage"]["input_tokens"],
                                 response["usage"]["output_tokens"])
    assert tokens(records[0][1]) != tokens(records[1][1])


async def test_create_frames_pass_the_payload_hooks_unless_bypassed(nursery: trio.Nursery) -> None:
    frame = '{"type": "response.create",  "model": "gpt-5-codex", "input": "h\u00e9"}'
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url,
                                  extensions=[ModelAlias({"gpt-5-codex": "gpt-5-mini"})])
        async with connect(proxy, headers=[(b"x-trioproxy-request-id", b"s1")]) as ws:
            await turn(ws, frame)
        async with connect(proxy, headers=[(b"x-trioproxy-request-id", b"s2"),
                                           (b"x-trioproxy-bypass", b"true")]) as ws:
            await turn(ws, frame)
        records = await proxy.wait_records(2)
    assert [s.creates[0]["model"] for s in fake.sockets] == ["gpt-5-mini", "gpt-5-codex"]
    changed, bypassed = fake.sockets[0].frames[0], fake.sockets[1].frames[0]
    assert changed == '{"type":"response.create","model":"gpt-5-mini","input":"h\u00e9"}'
    assert hashlib.sha256(bypassed.encode()).digest() == hashlib.sha256(frame.encode()).digest()
    assert [ex.bypass for ex, _ in records] == [False, True]
    assert records[0][0].payload_changed_by == ["model_alias"]


async def test_unchanged_create_frame_is_forwarded_verbatim(nursery: trio.Nursery) -> None:
    frame = '{"type": "response.create",   "model": "gpt-5", "input": "x"}'
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url,
                                  extensions=[ModelAlias({"other": "model"})])
        async with connect(proxy) as ws:
            await turn(ws, frame)
    assert fake.last.frames[0] == frame


async def test_fail_closed_create_gets_an_error_event_and_one_record(nursery: trio.Nursery) -> None:
    class Broken(Extension):
        name = "broken"

        async def on_payload(self, ctx, payload, headers):
            raise RuntimeError("nope")

    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url, extensions=[Broken()],
                                  extensions_fail_closed=True)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            event = json.loads(await ws.get_message())
        records = await proxy.wait_records(1)
    assert event["type"] == "error" and event["status"] == 500
    assert fake.last.creates == []
    assert [(ex.status, ex.end_reason) for ex, _ in records] == [(500, "extension_error")]


async def test_binary_and_non_create_frames_pass_through_unchanged(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery)
        async with connect(proxy) as ws:
            await ws.send_message(b"\x00\x01binary")
            await ws.send_message('  {"type": "response.cancel"}')
            await turn(ws, create())
    assert fake.last.frames[:2] == [b"\x00\x01binary", '  {"type": "response.cancel"}']
