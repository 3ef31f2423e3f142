"""The drain a load balancer needs: after SIGTERM readiness fails at once, but new requests are
still served for the grace period (the balancer's health check takes the instance out first);
only then are they refused with 503, ``Connection: close`` and ``retry-after``. And readiness
says whether this instance should get traffic: a usage store that is down is not a reason (the
records wait in memory, then in the spill file), a spill file that cannot be written is."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from functools import partial

import httpx
import pytest
import trio
import trio_websocket as tws

from trioproxy.testing import FakeUpstream, anthropic_sse, openai_chat_sse
from trioproxy.testing.websocket import Turn

from .conftest import proxy_settings, start_proxy
from .test_health_drain import (
    AUTH,
    BIN,
    CHAT,
    MESSAGES,
    Spawned,
    assert_refused,
    get_json,
    open_stream,
    refused_request,
    server_env,
)


async def served(port: int) -> int:
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 headers=dict(AUTH), content=CHAT)
    return resp.status_code


async def test_new_requests_are_served_during_the_grace_period(
    nursery, upstream: FakeUpstream, caplog
) -> None:
    caplog.set_level(logging.WARNING, "trioproxy")
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    upstream.enqueue(openai_chat_sse(["a", "b", "c"], gaps=[0, 0, 1.5]))
    runtime = proxy.app.runtime
    with trio.fail_after(20):
        client, stream = await open_stream(proxy.port, "/v1/chat/completions", CHAT)
        remaining: list[float] = []

        async def drain() -> None:
            remaining.append(await runtime.drain(30.0, grace=0.6, notice=0.0))

        nursery.start_soon(drain)
        await trio.sleep(0.05)
        status, body = await get_json(proxy.url + "/_trioproxy/readyz")
        assert (status, body["status"]) == (503, "draining")  # the balancer stops sending...
        assert await served(proxy.port) == 200  # ...but what it still sends is served
        while trio.current_time() < runtime.drain_state.started + 0.7:
            await trio.sleep(0.05)
        assert_refused(await refused_request(proxy.port, "/v1/messages", MESSAGES), "anthropic")
        await client.read_body(stream)  # the stream opened before SIGTERM runs to its end
        await client.aclose()
        while not remaining:
            await trio.sleep(0.01)
    assert stream.complete and stream.body.rstrip().endswith(b"data: [DONE]")
    assert remaining[0] > 20
    lines = [r.getMessage() for r in caplog.records if "drain" in r.getMessage()]
    assert "served for 0.6s" in lines[0] and "1 in flight" in lines[0]
    assert "1 new requests refused" in lines[-1]
    await proxy.stop()


async def test_sigterm_serves_through_the_grace_period_then_refuses(nursery, upstream) -> None:
    """`trioproxy serve --drain-grace`: readiness 503 at once, requests 200 until the grace
    period ends, 503 after it, exit once nothing is in flight."""
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", "0",
                                 "--drain-grace", "1.5", "--drain-notice", "0.5"],
                       server_env(upstream))
    try:
        with trio.fail_after(30):
            upstream.enqueue(anthropic_sse(["a", "b"], gaps=[0, 0, 0, 0, 2.5]))
            client, resp = await open_stream(server.port, "/v1/messages", MESSAGES,
                                             [("x-api-key", "sk-ant-test")])
            signalled = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            while (await get_json(server.url + "/_trioproxy/readyz"))[0] != 503:
                await trio.sleep(0.02)
            assert await served(server.port) == 200
            assert trio.current_time() - signalled < 1.5  # it was inside the grace period
            while trio.current_time() - signalled < 1.7:
                await trio.sleep(0.05)
            assert_refused(await refused_request(server.port, "/v1/chat/completions", CHAT),
                           "openai")
            await client.read_body(resp)
            await client.aclose()
            assert resp.complete and b"message_stop" in resp.body
            assert await server.proc.wait() == 0
    finally:
        await server.stop()


async def test_readiness_stays_up_while_the_store_is_down_and_says_so(
    nursery, upstream, tmp_path
) -> None:
    """A ledger failover must not take the whole fleet out of the balancer: the writer keeps
    the records (memory, then the spill file) and traffic goes on."""
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, data_home=str(tmp_path), store_timeout=1.0,
        usage_spill_after=0.3, database_url="postgresql://postgres@127.0.0.1:1/test"))
    with trio.fail_after(20):
        assert await served(proxy.port) == 200
        writer = proxy.app.runtime.writer
        while writer.statistics().failed_attempts < 2 or writer.statistics().spilled < 1:
            await trio.sleep(0.05)
        status, body = await get_json(proxy.url + "/_trioproxy/readyz")
        assert status == 200 and body["status"] == "ready"
        store = body["store"]
        assert store["available"] is False and store["outage_seconds"] > 0
        assert store["spilled"] == 1 and store["pending"] == 0 and store["spill_ok"] is True
        async with httpx.AsyncClient() as client:
            text = (await client.get(proxy.url + "/metrics")).text
        assert re.search(r"^trioproxy_usage_store_up 0\.0$", text, re.MULTILINE)
        assert re.search(r"^trioproxy_usage_store_outage_seconds [1-9]|^trioproxy_usage_store_"
                         r"outage_seconds 0\.[1-9]", text, re.MULTILINE), text
    await proxy.stop()


async def test_readiness_fails_when_the_store_is_down_and_records_cannot_be_kept(
    nursery, upstream, tmp_path
) -> None:
    """Store down and the spill file unwritable: this instance would lose its accounting, so
    the balancer should send traffic elsewhere."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    spill_home = blocker / "sub"  # a file in the way: every spill append fails
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, data_home=str(spill_home), store_timeout=1.0,
        usage_spill_after=0.2, fingerprint_secret="s",
        database_url="postgresql://postgres@127.0.0.1:1/test"))
    with trio.fail_after(20):
        assert await served(proxy.port) == 200
        while (await get_json(proxy.url + "/_trioproxy/readyz"))[0] != 503:
            await trio.sleep(0.05)
        status, body = await get_json(proxy.url + "/_trioproxy/readyz")
        assert (status, body["status"]) == (503, "ledger_unavailable")
        assert body["store"]["available"] is False and body["store"]["spill_ok"] is False
    await proxy.stop()


async def test_websockets_finish_their_response_then_close_with_1012(nursery) -> None:
    """After the grace period a Responses WebSocket closes with 1012 (service restart) as soon
    as no response is in flight: an idle one at once, a busy one once its response ended. So
    the drain does not wait the whole graceful timeout for sockets Codex keeps open."""
    from .ws_proxy import connect, create, start_pair, turn

    _fake, proxy = await start_pair(nursery, turns=[Turn(), Turn(gaps=0.4)])
    runtime = proxy.app.runtime
    with trio.fail_after(20):
        async with connect(proxy) as idle, connect(proxy) as busy:
            assert (await turn(idle, create()))[-1]["type"] == "response.completed"
            await busy.send_message(create())
            assert json.loads(await busy.get_message())["type"] == "response.created"
            remaining: list[float] = []

            async def drain() -> None:
                remaining.append(await runtime.drain(30.0, grace=0.2))

            nursery.start_soon(drain)
            events = []
            while not events or events[-1]["type"] != "response.completed":
                events.append(json.loads(await busy.get_message()))  # the response goes on
            for ws in (idle, busy):
                with pytest.raises(tws.ConnectionClosed):
                    await ws.get_message()
                assert ws.closed.code == 1012
            while not remaining:
                await trio.sleep(0.01)
    assert remaining[0] > 25  # the drain ended with the sockets, not at the timeout
    await proxy.app.runtime.pool.aclose()


async def test_a_websocket_busy_at_the_graceful_timeout_is_closed_with_1012(nursery) -> None:
    from .ws_proxy import connect, create, start_pair

    _fake, proxy = await start_pair(nursery, turns=[Turn(gaps=5.0)])
    with trio.fail_after(20):
        async with connect(proxy) as ws:
            await ws.send_message(create())
            assert json.loads(await ws.get_message())["type"] == "response.created"
            started = trio.current_time()
            nursery.start_soon(partial(proxy.app.runtime.drain, 2.0, grace=0.2))
            with pytest.raises(tws.ConnectionClosed):
                while True:
                    await ws.get_message()
            assert ws.closed.code == 1012
            assert 0.8 < trio.current_time() - started < 2.0  # before Hypercorn would cut it
        rows = await proxy.wait_records(1)
    assert rows[0][0].end_reason == "aborted"


async def test_ctrl_c_skips_the_grace_period(nursery, upstream) -> None:
    """SIGINT (a terminal's Ctrl-C) has no load balancer to wait for: refuse at once."""
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", "0",
                                 "--drain-notice", "0.5"], server_env(upstream))
    try:
        with trio.fail_after(20):
            signalled = trio.current_time()
            server.proc.send_signal(signal.SIGINT)
            while b"draining: " not in server.stderr:
                await trio.sleep(0.02)
            assert_refused(await refused_request(server.port, "/v1/chat/completions", CHAT),
                           "openai")
            assert await server.proc.wait() == 0
            assert trio.current_time() - signalled < 10  # not the 15 s default grace
    finally:
        await server.stop()
