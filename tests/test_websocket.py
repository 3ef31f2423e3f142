"""The Responses WebSocket relay end to end: Hypercorn (trio) + TrioProxy + FakeResponsesWS."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio_websocket as tws
from hypercorn.config import Config
from hypercorn.trio import serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioproxy import Settings, TrioProxy
from trioproxy.contrib.model_alias import ModelAlias
from trioproxy.exchange import Exchange
from trioproxy.extensions import Extension
from trioproxy.accounting.build import build_record
from trioproxy.testing.websocket import FakeResponsesWS, MiB, Rejection, Turn

BIG = 64 * MiB
AUTH = [(b"authorization", b"Bearer sk-test-ws"),
        (b"openai-beta", b"responses_websockets=2026-02-06")]


@dataclass
class Proxy:
    app: TrioProxy
    port: int
    records: list[tuple[Exchange, Any]]  # (exchange, parsed usage), in finalisation order

    async def wait_records(self, n: int) -> list[tuple[Exchange, Any]]:
        while len(self.records) < n:
            await trio.sleep(0.005)
        return self.records


async def start_fake(nursery: trio.Nursery, **kwargs: Any) -> FakeResponsesWS:
    return await nursery.start(FakeResponsesWS(**kwargs).serve)


async def start_proxy(
    nursery: trio.Nursery, base_url: str, extensions: list[Extension] | None = None,
    **overrides: Any,
) -> Proxy:
    settings = Settings(openai_base_url=base_url, accounting=False, **overrides)
    app = TrioProxy(settings, configure_logging=False, extensions=extensions)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.websocket_max_message_size = BIG
    binds = await nursery.start(
        lambda task_status: serve(app, config, shutdown_trigger=trio.sleep_forever,
                                  task_status=task_status))
    proxy = Proxy(app, int(binds[0].rsplit(":", 1)[1]), [])

    async def capture(ex: Exchange) -> None:
        proxy.records.append((ex, ex.usage()))

    assert app.runtime is not None
    app.runtime.finalisers.append(capture)
    return proxy


@asynccontextmanager
async def connect(
    proxy: Proxy, path: str = "/v1/responses", headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[tws.WebSocketConnection]:
    """trio-websocket's client over a socket the test owns and closes (``open_websocket``
    leaves it open when the server closes first or refuses the upgrade)."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await tws.wrap_client_stream(
                nursery, stream, f"127.0.0.1:{proxy.port}", path,
                extra_headers=AUTH + (headers or []), max_message_size=BIG)
            try:
                yield ws
            finally:
                with trio.move_on_after(5, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def refusal(proxy: Proxy, path: str = "/v1/responses") -> tws.ConnectionRejected:
    """The proxy's HTTP answer to an upgrade it did not accept."""
    rejected: list[tws.ConnectionRejected] = []
    try:
        async with connect(proxy, path):
            raise AssertionError("the upgrade was accepted")
    except* tws.ConnectionRejected as group:
        rejected.extend(group.exceptions)  # type: ignore[arg-type]
    return rejected[0]


def create(**fields: Any) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-5-codex", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        **fields})


async def turn(ws: tws.WebSocketConnection, frame: str) -> list[dict[str, Any]]:
    """Sends one response.create; returns its events up to the terminal one."""
    await ws.send_message(frame)
    events = []
    while True:
        event = json.loads(await ws.get_message())
        events.append(event)
        if event["type"] in ("response.completed", "response.failed", "response.incomplete"):
            return events


def tokens(usage: Any) -> tuple[int, int] | None:
    return None if usage is None else (usage.input_tokens, usage.output_tokens)


# -- sessions and accounting --------------------------------------------------------------------


async def test_multi_turn_session_chains_previous_response_id_and_records_each_response(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
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
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
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
        fake = await start_fake(nursery, turns=[Turn(big_delta_bytes=size)])
        proxy = await start_proxy(nursery, fake.base_url)
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
        fake = await start_fake(nursery, turns=[Turn(end="stop")])
        proxy = await start_proxy(nursery, fake.base_url)
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
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
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
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(b"\x00\x01binary")
            await ws.send_message('  {"type": "response.cancel"}')
            await turn(ws, create())
    assert fake.last.frames[:2] == [b"\x00\x01binary", '  {"type": "response.cancel"}']


# -- the handshake ------------------------------------------------------------------------------


async def test_handshake_headers_forwarded_dropped_and_request_id_on_accept(
    nursery: trio.Nursery,
) -> None:
    sent = [
        (b"session-id", b"sess-1"), (b"originator", b"codex_cli_rs"),
        (b"x-codex-turn-metadata", b"{}"), (b"chatgpt-account-id", b"acct-1"),
        (b"x-client-request-id", b"cli-1"), (b"x-custom-end-to-end", b"kept"),
        (b"keep-alive", b"timeout=5"), (b"proxy-authorization", b"Basic eA=="),
        (b"x-trioproxy-request-id", b"my-socket-1"), (b"x-trioproxy-bypass", b"false"),
        (b"connection", b"Upgrade, x-named-hop"), (b"x-named-hop", b"dropped"),
    ]
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url + "/base")
        async with connect(proxy, "/openai/v1/responses?stage=1", sent) as ws:
            accept = dict(ws.handshake_headers)
            await turn(ws, create())
        (ex, _), = await proxy.wait_records(1)
    seen = fake.last
    assert seen.path == "/base/v1/responses?stage=1"
    expected = dict(AUTH + sent)
    for name in (b"authorization", b"openai-beta", b"session-id", b"originator",
                 b"x-codex-turn-metadata", b"chatgpt-account-id", b"x-client-request-id",
                 b"x-custom-end-to-end"):
        assert seen.header(name.decode()) == expected[name].decode(), name
    for name in ("keep-alive", "proxy-authorization", "x-trioproxy-request-id",
                 "x-trioproxy-bypass", "x-named-hop"):
        assert seen.header(name) is None, name
    names = [k.lower() for k, _ in seen.headers]
    assert b"host" not in names  # wsproto reports Host apart: no client Host was added
    assert names.count(b"sec-websocket-key") == 1 and names.count(b"upgrade") == 1
    assert accept[b"x-trioproxy-request-id"].startswith(b"tp_")
    assert accept[b"x-trioproxy-correlation-id"] == b"my-socket-1"
    for name in (b"x-request-id", b"openai-model", b"openai-processing-ms",
                 b"x-codex-turn-state", b"x-ratelimit-remaining-requests", b"x-models-etag"):
        assert name in accept, name
    assert b"keep-alive" not in accept
    socket_id = accept[b"x-trioproxy-request-id"].decode()
    assert ex.request_id == f"{socket_id}.1" and ex.correlation_id == "my-socket-1"
    assert ex.upstream_request_id == "req_fake_ws_1"


@pytest.mark.parametrize(
    "rejection",
    [Rejection.json(401, "Incorrect API key provided", "invalid_api_key"),
     Rejection.json(429, "Rate limit reached", "rate_limit_exceeded", retry_after="7")],
    ids=["401", "429"],
)
async def test_upstream_refusal_reaches_client_as_the_same_http_status(
    nursery: trio.Nursery, rejection: Rejection
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, reject=rejection)
        proxy = await start_proxy(nursery, fake.base_url)
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == rejection.status
    assert info.body == rejection.body
    got = dict(info.headers)
    assert got[b"content-type"] == b"application/json" and b"x-trioproxy-request-id" in got
    if rejection.status == 429:
        assert got[b"retry-after"] == b"7"
    assert ex.status == rejection.status and ex.transport == "websocket"


async def test_unknown_websocket_path_is_refused_with_404_and_nothing_upstream(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
        info = await refusal(proxy, "/v1/chat/completions")
    assert info.status_code == 404
    assert json.loads(info.body or b"")["error"]["code"] == "unknown_path"
    assert fake.sockets == []


async def test_unreachable_upstream_is_a_502_in_openai_shape(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()  # nothing listens there any more
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}")
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == 502
    error = json.loads(info.body or b"")["error"]
    assert error["code"] == "upstream_connect_error" and error["type"] == "server_error"
    assert ex.end_reason == "connect_error"


async def test_silent_upstream_handshake_is_a_504(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
        port = listeners[0].socket.getsockname()[1]
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}", connect_timeout=0.2)
        info = await refusal(proxy)
        await listeners[0].aclose()
    assert info.status_code == 504
    assert json.loads(info.body or b"")["error"]["code"] == "upstream_timeout"


async def test_permessage_deflate_is_negotiated_with_a_client_that_offers_it(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(
            host="127.0.0.1", target="/v1/responses", extensions=[PerMessageDeflate()],
            extra_headers=AUTH)))
        accepted = await _next_event(stream, conn, lambda e: isinstance(e, AcceptConnection))
        frame = create(instructions="compress me " * 1000)
        await stream.send_all(conn.send(TextMessage(data=frame)))
        done = await _next_event(stream, conn, lambda e: isinstance(e, TextMessage)
                                 and '"response.completed"' in e.data)
        await stream.send_all(conn.send(CloseConnection(code=1000)))
        await stream.aclose()
        await fake.last.closed.wait()
    assert isinstance(accepted, AcceptConnection)
    assert [type(x) for x in accepted.extensions] == [PerMessageDeflate]
    assert json.loads(done.data)["response"]["status"] == "completed"
    assert fake.last.frames[0] == frame


async def _next_event(stream: trio.SocketStream, conn: WSConnection,
                      wanted: Callable[[Any], bool]) -> Any:
    while True:
        for event in conn.events():
            if wanted(event):
                return event
        conn.receive_data(await stream.receive_some(65536))


# -- closing ------------------------------------------------------------------------------------


async def test_client_disconnect_closes_upstream_within_100ms_and_records_incomplete(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end="stop")])
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            assert json.loads(await ws.get_message())["type"] == "response.created"
            assert json.loads(await ws.get_message())["type"] == "response.output_text.delta"
            left = trio.current_time()
        await fake.last.closed.wait()
        records = await proxy.wait_records(1)
    seen = fake.last
    assert seen.closed_by == "peer" and seen.close_code == 1000
    assert seen.closed_at is not None and seen.closed_at - left < 0.1
    ex, usage = records[0]
    assert ex.end_reason == "client_disconnect" and not ex.upstream_complete
    assert usage is not None and not usage.complete and usage.response_id == "resp_fake_1"
    record = build_record(ex, b"secret")
    assert (record.stop_reason, record.end_reason) == ("incomplete", "client_disconnect")
    assert record.transport == "websocket" and record.session_id == ex.session_id


@pytest.mark.parametrize("code", [4000, 1011])
async def test_upstream_close_code_reaches_the_client(nursery: trio.Nursery, code: int) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end="close", close_code=code,
                                                     close_reason="upstream says bye")])
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            with pytest.raises(tws.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
        (ex, _), = await proxy.wait_records(1)
    assert info.value.reason is not None
    assert (info.value.reason.code, info.value.reason.reason) == (code, "upstream says bye")
    assert ex.end_reason == "upstream_error"
    assert build_record(ex, b"secret").stop_reason == "incomplete"


async def test_connection_cap_error_event_and_close_reach_the_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(deltas=(), end="error_close", close_code=1000)])
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            events = []
            with pytest.raises(tws.ConnectionClosed) as info:
                while True:
                    events.append(json.loads(await ws.get_message()))
        (ex, _), = await proxy.wait_records(1)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "websocket_connection_limit_reached"
    assert info.value.reason is not None and info.value.reason.code == 1000
    assert ex.end_reason == "upstream_error" and "60 minutes" in (ex.error or "")


async def test_upstream_vanishing_without_close_frame_reaches_client_as_1011(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end="drop")])
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            with pytest.raises(tws.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
        (ex, _), = await proxy.wait_records(1)
    assert info.value.reason is not None and info.value.reason.code == 1011
    assert ex.end_reason == "upstream_error"


async def test_oversize_messages_close_with_1009_in_both_directions(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioproxy.websocket")
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(big_delta_bytes=2 * MiB)])
        proxy = await start_proxy(nursery, fake.base_url, ws_max_message_size=MiB)
        async with connect(proxy) as ws:  # client -> proxy
            await ws.send_message(create(instructions="y" * (2 * MiB)))
            with pytest.raises(tws.ConnectionClosed) as outbound:
                await ws.get_message()
        async with connect(proxy) as ws:  # upstream -> proxy
            await ws.send_message(create())
            with pytest.raises(tws.ConnectionClosed) as inbound:
                while True:
                    await ws.get_message()
    assert outbound.value.reason is not None and outbound.value.reason.code == 1009
    assert inbound.value.reason is not None and inbound.value.reason.code == 1009
    assert fake.sockets[0].frames == []  # the oversize frame never went upstream
    messages = [r.getMessage() for r in caplog.records]
    assert any("exceeds ws_max_message_size" in m for m in messages)
    assert any("1009" in m and "upstream" in m for m in messages)


async def test_upstream_leg_is_kept_alive_with_pings(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "trioproxy.websocket")
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url, ws_ping_interval=0.05)
        async with connect(proxy) as ws:
            await trio.sleep(0.3)
            await turn(ws, create())
    pongs = [r for r in caplog.records if r.getMessage().startswith("upstream pong")]
    assert len(pongs) >= 3


async def test_broken_upstream_handshake_is_a_502_with_one_record(nursery: trio.Nursery) -> None:
    async def bogus_upgrade(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n")
        await trio.sleep(5)

    with trio.fail_after(10):
        listeners = await nursery.start(trio.serve_tcp, bogus_upgrade, 0)
        port = listeners[0].socket.getsockname()[1]
        proxy = await start_proxy(nursery, f"http://127.0.0.1:{port}")
        info = await refusal(proxy)
        (ex, _), = await proxy.wait_records(1)
    assert info.status_code == 502
    assert json.loads(info.body)["error"]["code"] == "upstream_error"
    assert ex.status == 502 and ex.end_reason == "upstream_error"


async def _h2_websocket_refusal(port: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """An RFC 8441 WebSocket upgrade over HTTP/2 (where header values HTTP/1.1 forbids can
    arrive); returns the proxy's status and body."""
    import h2.config
    import h2.connection
    import h2.events

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    status, body = 0, b""
    sent = False
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return status, body
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, body
            if not sent and conn.remote_settings.enable_connect_protocol:
                sent = True
                conn.send_headers(1, [
                    (b":method", b"CONNECT"), (b":protocol", b"websocket"),
                    (b":scheme", b"http"), (b":path", b"/v1/responses"),
                    (b":authority", b"proxy.test"), (b"sec-websocket-version", b"13"),
                    *headers])
            await stream.send_all(conn.data_to_send())
    finally:
        await stream.aclose()


async def test_a_handshake_header_h11_refuses_never_echoes_its_value(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
) -> None:
    """An authorization value with a control character (possible over HTTP/2) is refused with
    a 400 that names the header only: the key reaches no log line, record or response."""
    caplog.set_level(logging.DEBUG, logger="trioproxy")
    secret = b"sk-proj-TOPSECRETKEY1234\x0cmore"
    with trio.fail_after(10):
        fake = await start_fake(nursery)
        proxy = await start_proxy(nursery, fake.base_url)
        status, body = await _h2_websocket_refusal(
            proxy.port, [(b"authorization", b"Bearer " + secret)])
        (ex, _), = await proxy.wait_records(1)
    assert status == 400 and b"authorization" in body
    assert b"TOPSECRETKEY" not in body
    assert "TOPSECRETKEY" not in (ex.error or "")
    assert "TOPSECRETKEY" not in json.dumps(build_record(ex, b"k").to_dict())
    assert all("TOPSECRETKEY" not in r.getMessage() for r in caplog.records)
    assert fake.sockets == []  # nothing was sent upstream


async def test_a_draining_proxy_refuses_new_websockets_in_openai_shape_with_one_record(
    nursery: trio.Nursery,
) -> None:
    """While draining, a new handshake is refused like a new HTTP request: 503 with
    retry-after and OpenAI's error body, one record; nothing reaches the upstream. A socket
    opened before the drain finishes its response, then closes with 1012 (service restart)."""
    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(gaps=0.2)])
        proxy = await start_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            assert json.loads(await ws.get_message())["type"] == "response.created"
            proxy.app.runtime.draining = True
            rejected = await refusal(proxy)
            while json.loads(await ws.get_message())["type"] != "response.completed":
                pass  # the open socket still relays its response
            with pytest.raises(tws.ConnectionClosed):
                await ws.get_message()
            assert ws.closed.code == 1012
        records = await proxy.wait_records(2)
    assert rejected.status_code == 503
    headers = {k.lower(): v for k, v in rejected.headers}
    assert int(headers[b"retry-after"]) > 0
    assert json.loads(rejected.body)["error"]["code"] == "proxy_draining"
    refused = [ex for ex, _ in records if ex.status == 503]
    assert len(refused) == 1 and refused[0].end_reason == "rejected"
    assert len(fake.sockets) == 1  # only the socket opened before the drain
