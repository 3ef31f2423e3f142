"""Closing a Responses WebSocket: whichever side ends it, the other side hears the right close
code promptly, every open response gets its record, and a payload hook still running at the
upstream's close crashes nothing."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio_websocket as tws
from hypercorn.config import Config
from hypercorn.trio import serve

from trioproxy import Settings, TrioProxy
from trioproxy.accounting.build import build_record
from trioproxy.exchange import Exchange
from trioproxy.extensions import Extension
from trioproxy.testing.websocket import MiB, Turn

from .ws_proxy import BIG, Proxy, connect, create, start_fake, start_pair, start_proxy, turn


async def test_client_disconnect_closes_upstream_within_100ms_and_records_incomplete(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        fake, proxy = await start_pair(nursery, turns=[Turn(end="stop")])
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
        _fake, proxy = await start_pair(
            nursery, turns=[Turn(deltas=(), end="error_close", close_code=1000)])
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
        _fake, proxy = await start_pair(nursery, turns=[Turn(end="drop")])
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


class SlowHook(Extension):
    """Holds the second create in its payload hook until that create's record is finalised."""

    name = "slow"

    def __init__(self) -> None:
        self.seen = 0
        self.gate = trio.Event()

    async def on_payload(self, ctx: Any, payload: Any, headers: Any) -> None:
        self.seen += 1
        if self.seen == 2:
            await self.gate.wait()

    async def on_complete(self, ctx: Any, record: Any) -> None:
        if (record.extra or {}).get("response_index") == 2:
            self.gate.set()  # the hook returns while the socket is still being finalised
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()


async def test_upstream_close_during_a_payload_hook_leaves_one_record_and_no_crash(
    nursery: trio.Nursery,
) -> None:
    hook = SlowHook()
    app = TrioProxy(Settings(openai_base_url="http://x", accounting=False),
                    configure_logging=False, extensions=[hook])
    crashes: list[BaseException] = []

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            crashes.append(exc)
            raise

    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end="close", close_code=1000,
                                                     before_created=0.5)])
        app._settings = Settings(openai_base_url=fake.base_url, accounting=False)
        config = Config()
        config.bind, config.accesslog, config.errorlog = ["127.0.0.1:0"], None, None
        config.websocket_max_message_size = BIG
        binds = await nursery.start(lambda task_status: serve(
            watched, config, shutdown_trigger=trio.sleep_forever, task_status=task_status))
        proxy = Proxy(app, int(binds[0].rsplit(":", 1)[1]), [])

        async def capture(ex: Exchange) -> None:
            proxy.records.append((ex, None))

        app.runtime.finalisers.append(capture)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            await ws.send_message(create())
            with contextlib.suppress(tws.ConnectionClosed):  # the upstream's close reaches us
                while True:
                    json.loads(await ws.get_message())
        records = await proxy.wait_records(2)
        await trio.sleep(0.2)
    assert crashes == []
    assert len(fake.last.creates) == 1  # the held create never went to the closed upstream
    assert sorted(ex.response_index for ex, _ in records) == [1, 2]
