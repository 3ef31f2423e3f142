"""Several `trioproxy serve` instances (two workers each) behind a real HAProxy with health
checks on /_trioproxy/readyz, one PostgreSQL ledger, and a rolling restart under traffic:
streams of a few seconds, buffered requests and Responses WebSockets. Also the bad luck: the
ledger going away during the restart, HAProxy reloading its configuration, an instance
SIGKILLed mid-stream; and the same setup behind nginx, shorter.

HAProxy and nginx run the files in ``contrib/`` with only their ports, paths and HAProxy's
check timings replaced. CI installs both with apt (``.ci/run``)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.accounting.locations import open_store
from trioproxy.testing import FakeUpstream
from trioproxy.testing.calibration import OneOrigin
from trioproxy.testing.websocket import FakeResponsesWS, Turn

from .fleet import (
    KEY,
    MESSAGES,
    HAProxy,
    Instance,
    Nginx,
    Tally,
    buffered_client,
    free_port,
    slow_streams,
    stream_client,
    ws_client,
)
from .test_store import _postgres_schema_url
from .test_store_outage import TcpRelay, via

GRACEFUL = 8.0  # seconds: longer than any stream here, so none is ever cut by a restart


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _postgres_schema_url()


def ledger_ids(url: str) -> list[str]:
    store = open_store(url)
    try:
        with store._cursor() as cur:
            cur.execute("SELECT request_id FROM usage_records")
            return [row[0] for row in cur.fetchall()]
    finally:
        store.close()


async def start_fleet(nursery: trio.Nursery, tmp: Path, origin: OneOrigin, database_url: str,
                      n: int = 3, workers: int = 2, **extra: str) -> list[Instance]:
    instances = []
    for i in range(n):
        env = {**os.environ,
               "TRIOPROXY_ANTHROPIC_BASE_URL": origin.url, "TRIOPROXY_OPENAI_BASE_URL": origin.url,
               "TRIOPROXY_DATABASE_URL": database_url, "TRIOPROXY_DATA_HOME": str(tmp / f"i{i}"),
               "TRIOPROXY_FINGERPRINT_SECRET": "fleet", "TRIOPROXY_STORE_TIMEOUT": "2",
               "TRIOPROXY_USAGE_SPILL_AFTER": "1", "TRIOPROXY_DRAIN_GRACE": "1",
               "TRIOPROXY_DRAIN_NOTICE": "0.3", "TRIOPROXY_GRACEFUL_TIMEOUT": str(GRACEFUL),
               **extra}
        instances.append(Instance(port=free_port(), env=env, workers=workers))
    async with trio.open_nursery() as starting:  # start-ups overlap: the machine has 2 cores
        for inst in instances:
            starting.start_soon(inst.launch, nursery)
    return instances


async def start_origin(nursery: trio.Nursery, gap: float) -> tuple[FakeUpstream, FakeResponsesWS,
                                                                    OneOrigin]:
    http = FakeUpstream(default=slow_streams(gap))
    ws = FakeResponsesWS(turns=[Turn(gaps=0.25)] * 1000)
    origin = OneOrigin(http, ws)
    await nursery.start(origin.serve)
    return http, ws, origin


def drain_ends(log: str) -> list[tuple[int, int, int]]:
    """(finished, of, still running) per drain-ended line."""
    return [(int(a), int(b), int(c)) for a, b, c in re.findall(
        r"drain ended after [\d.]+s: (\d+) of (\d+) in flight finished, \d+ new requests "
        r"refused, (\d+) still running", log)]


async def test_rolling_restart_behind_haproxy_loses_no_request_and_no_record(
    nursery, tmp_path, pg_url
) -> None:
    relay = TcpRelay(*_host_port(pg_url))
    await nursery.start(relay.serve)
    http, ws, origin = await start_origin(nursery, gap=0.25)  # streams of ~2 s
    front = free_port()
    instances: list[Instance] = []
    haproxy: HAProxy | None = None
    try:
        with trio.fail_after(30):
            instances = await start_fleet(nursery, tmp_path, origin, via(relay, pg_url))
            haproxy = HAProxy(tmp_path, front, [i.port for i in instances])
            await haproxy.launch(nursery)
            for n in range(3):
                await haproxy.wait_state(f"tp{n + 1}", "UP")
        tally, stop = Tally(), trio.Event()
        url = f"http://127.0.0.1:{front}"
        async with trio.open_nursery() as traffic:
            for _ in range(5):
                traffic.start_soon(stream_client, url, tally, stop)
            for _ in range(2):
                traffic.start_soon(buffered_client, url, tally, stop)
                traffic.start_soon(ws_client, front, tally, stop)
            await trio.sleep(1.0)
            with trio.fail_after(60):
                for n, inst in enumerate(instances):
                    before = (tally.streams, tally.ws_responses)
                    inst.signal_group(signal.SIGTERM)  # systemd's stop: the whole group
                    if n == 0:  # bad luck: the ledger restarts meanwhile
                        relay.cut()
                        await trio.sleep(1.5)
                        relay.restore()
                    if n == 1:  # bad luck: HAProxy reloads while this instance refuses
                        await trio.sleep(1.3)
                        await haproxy.reload()
                    assert await inst.proc.wait() == 0, inst.text
                    assert (tally.streams, tally.ws_responses) > before
                    await inst.launch(nursery)
                    await haproxy.wait_state(f"tp{n + 1}", "UP")
            await trio.sleep(0.5)
            stop.set()
        with trio.fail_after(30):  # a graceful stop of all: the writers flush
            for inst in instances:
                inst.signal_group(signal.SIGTERM)
            for inst in instances:
                assert await inst.proc.wait() == 0, inst.text
    finally:
        relay.restore()
        for proc in (haproxy, *instances):
            if proc is not None:
                await proc.stop()
    reloaded = haproxy.text.split("Reloading HAProxy", 1)[1]  # with the saved health states
    assert "Loading success" in reloaded and "server state file" not in reloaded, reloaded
    assert tally.failures == []
    assert tally.streams >= 15 and tally.buffered >= 20 and tally.ws_responses >= 10
    # sockets open across a restart were closed with 1012 (service restart) and reconnected
    assert tally.ws_closes and {code for _, code in tally.ws_closes} == {1012}
    logs = "".join(inst.all_logs() for inst in instances)
    ends = drain_ends(logs)
    assert len(ends) == 2 * 2 * len(instances)  # every worker, at the restart and at the end
    assert all(still == 0 and done == of for done, of, still in ends), ends
    assert "usage store unavailable" in logs  # the ledger outage did bite
    rows = ledger_ids(pg_url)
    creates = sum(len(s.creates) for s in ws.sockets)
    assert len(rows) == len(set(rows)) == len(http.requests) + creates
    assert set(tally.request_ids) <= set(rows)
    assert len(tally.request_ids) == len(http.requests)


async def test_an_instance_killed_mid_stream_cuts_only_its_own_streams(
    nursery, tmp_path, pg_url
) -> None:
    """SIGKILL (the OOM killer, a power cut): that instance's clients see a cut stream, the
    other instance's streams and every later request through HAProxy are untouched. Lost for
    accounting: the killed instance's in-flight requests (never finalised, no row); kept:
    everything it finalised more than a moment before (the writer commits at once while the
    ledger is up)."""
    _, _, origin = await start_origin(nursery, gap=0.4)
    front = free_port()
    instances: list[Instance] = []
    haproxy: HAProxy | None = None
    try:
        with trio.fail_after(30):
            instances = await start_fleet(nursery, tmp_path, origin, pg_url, n=2, workers=1)
            haproxy = HAProxy(tmp_path, front, [i.port for i in instances] + [free_port()])
            await haproxy.launch(nursery)
            await haproxy.wait_state("tp1", "UP")
            await haproxy.wait_state("tp2", "UP")
        victim, survivor = instances
        with trio.fail_after(30):
            async with httpx.AsyncClient() as client:
                done = await client.post(f"http://127.0.0.1:{victim.port}/v1/chat/completions",
                                         headers={"authorization": "Bearer sk-x"},
                                         content=json.dumps({"model": "m", "messages": []}))
            await trio.sleep(0.5)  # the writer has committed it
            streams: dict[int, list[tuple[str, bool]]] = {victim.port: [], survivor.port: []}

            async def one(port: int) -> None:
                headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
                async with httpx.AsyncClient(timeout=20) as client:
                    rid, complete = "", False
                    try:
                        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/messages",
                                                 headers=headers, content=MESSAGES) as resp:
                            rid = resp.headers["x-trioproxy-request-id"]
                            body = b"".join([c async for c in resp.aiter_bytes()])
                            complete = b"message_stop" in body
                    except httpx.HTTPError:
                        pass
                    streams[port].append((rid, complete))

            async with trio.open_nursery() as clients:
                for port in (victim.port, survivor.port):
                    for _ in range(2):
                        clients.start_soon(one, port)
                await trio.sleep(1.0)  # every stream is mid-way
                victim.signal_group(signal.SIGKILL)
            async with httpx.AsyncClient() as client:  # later requests: all served
                for _ in range(6):
                    resp = await client.post(f"http://127.0.0.1:{front}/v1/chat/completions",
                                             headers={"authorization": "Bearer sk-x"},
                                             content=json.dumps({"model": "m", "messages": []}))
                    assert resp.status_code == 200
            survivor.signal_group(signal.SIGTERM)
            assert await survivor.proc.wait() == 0
    finally:
        for proc in (haproxy, *instances):
            if proc is not None:
                await proc.stop()
    assert [complete for _, complete in streams[victim.port]] == [False, False]
    assert [complete for _, complete in streams[survivor.port]] == [True, True]
    rows = set(ledger_ids(pg_url))
    assert done.headers["x-trioproxy-request-id"] in rows  # finalised before: kept
    assert all(rid in rows for rid, _ in streams[survivor.port])
    assert not any(rid in rows for rid, _ in streams[victim.port])  # in flight: no row


async def test_nginx_relays_a_stream_as_it_comes_and_a_websocket(nursery, tmp_path) -> None:
    """contrib/nginx.conf: buffering off (the first event arrives long before the last),
    600 s read timeouts, the WebSocket upgrade."""
    _, ws, origin = await start_origin(nursery, gap=0.4)
    front = free_port()
    instances: list[Instance] = []
    nginx: Nginx | None = None
    try:
        with trio.fail_after(30):
            instances = await start_fleet(nursery, tmp_path, origin, "", n=1, workers=1,
                                          TRIOPROXY_ACCOUNTING="false")
            nginx = Nginx(tmp_path, front, [i.port for i in instances])
            await nginx.launch(nursery, front)
        with trio.fail_after(20):
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
            arrivals = []
            async with httpx.AsyncClient() as client, client.stream(
                    "POST", f"http://127.0.0.1:{front}/v1/messages", headers=headers,
                    content=MESSAGES) as resp:
                assert resp.status_code == 200, nginx.text
                body = b""
                async for chunk in resp.aiter_bytes():
                    arrivals.append(trio.current_time())
                    body += chunk
            assert b"message_stop" in body
            assert arrivals[-1] - arrivals[0] > 2.0  # streamed, not buffered
            tally, stop = Tally(), trio.Event()
            async with trio.open_nursery() as sockets:
                sockets.start_soon(ws_client, front, tally, stop)
                while tally.ws_responses < 2:
                    await trio.sleep(0.05)
                stop.set()
        assert tally.failures == [] and ws.sockets[-1].header("upgrade") == "websocket"
        assert nginx.proc.returncode is None, nginx.text
    finally:
        for proc in (nginx, *instances):
            if proc is not None:
                await proc.stop()


def _host_port(url: str) -> tuple[str, int]:
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(url)
    return info.get("host") or "127.0.0.1", int(info.get("port") or 5432)
