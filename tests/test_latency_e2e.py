"""Latency figures through the real proxy: a scripted upstream with known event times (virtual
time) for the three APIs over HTTP and the Responses WebSocket, the proxy's own added time, and
the figures' way through the store to ``GET /v1/usage/{id}`` and ``trioproxy latency``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.accounting.build import build_record
from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import LATENCY_FIELDS
from trioproxy.commands.cli import main
from trioproxy.exchange import Exchange
from trioproxy.extensions import Extension
from trioproxy.protocol.gapsketch import GapSketch
from trioproxy.testing import (
    FakeUpstream,
    Pause,
    Reply,
    anthropic_json,
    anthropic_sse,
    openai_chat_sse,
    openai_responses_sse,
)
from trioproxy.testing.websocket import FakeResponsesWS, Turn

from .conftest import ProxyServer, RawClient, proxy_settings, start_proxy
from .h2client import h2_request
from .test_store import T0, database_url, make_record
from .ws_proxy import connect, create, turn
from .ws_proxy import start_proxy as start_ws_proxy

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]
DELTAS = ["a", "b", "c", "d"]
OUTPUT_TOKENS = 5

# The script: head 200 ms after the request, the first (non-content) event 100 ms later, the
# first content event at 600 ms, then gaps of 10, 20 and 40 ms, the last events at 700 and 705.
EXPECTED: dict[str, float | int] = {
    "ttft_ms": 600.0, "itl_p50_ms": 20.0, "itl_p90_ms": 36.0, "itl_p99_ms": 39.6,
    "itl_max_ms": 40.0, "itl_count": 3, "tpot_ms": 17.5,  # (670 - 600) / (5 - 1)
    "tokens_per_s": 38.095,  # (5 - 1) / (0.705 - 0.600)
    "duration_ms": 705.0, "upstream_head_ms": 200.0, "proxy_request_ms": 0.0,
    "proxy_relay_ms": 0.0, "proxy_relay_max_ms": 0.0, "proxy_overhead_ms": 0.0,
    "content_events": 4, "last_token_ms": 670.0,  # the last content event (600 + 70)
}
TIMING = {"upstream": 200.0, "ttft": 600.0, "itl": 20.0, "tpot": 17.5, "proxy": 0.0,
          "total": 705.0}


def timeline(before: int, after: int) -> list[float]:
    """Pauses before each event: ``before`` events ahead of the deltas, ``after`` behind."""
    return ([0.1] + [0.0] * (before - 1) + [0.3, 0.01, 0.02, 0.04]
            + [0.03] + [0.0] * (after - 2) + [0.005])


def scripted(api: str) -> tuple[str, list[tuple[str, str]], bytes, Reply]:
    """(path, headers, body, reply) of a stream following the script for ``api``."""
    if api == "anthropic.messages":
        reply = anthropic_sse(DELTAS, output_tokens=OUTPUT_TOKENS, gaps=timeline(3, 3))
        body = {"model": "claude-sonnet-4-5", "max_tokens": 9, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        path, headers = "/v1/messages", ANTHROPIC
    elif api == "openai.chat":  # the role-only first chunk is no content
        reply = openai_chat_sse(DELTAS, include_usage=True, completion_tokens=OUTPUT_TOKENS,
                                gaps=timeline(1, 3))
        body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}]}
        path, headers = "/v1/chat/completions", OPENAI
    else:
        reply = openai_responses_sse(DELTAS, output_tokens=OUTPUT_TOKENS, gaps=timeline(4, 4))
        body = {"model": "gpt-5", "stream": True, "input": "hi"}
        path, headers = "/v1/responses", OPENAI
    reply.before_headers = 0.2
    return path, headers, json.dumps(body).encode(), reply


def figures(ex: Exchange) -> dict[str, Any]:
    latency = ex.latency()
    assert latency is not None
    return latency.as_dict()


def assert_figures(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal to the microsecond (the figures are rounded to 3 decimals of a ms)."""
    assert got.keys() >= expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-3), name


def server_timing(value: str) -> dict[str, float]:
    """``name;dur=...;desc="..."`` entries by name (W3C Server-Timing, read by meaning)."""
    out = {}
    for entry in value.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        attrs = dict(p.split("=", 1) for p in params)
        out[name] = float(attrs["dur"])
    return out


@pytest.mark.parametrize("api", ["anthropic.messages", "openai.chat", "openai.responses"])
async def test_stream_figures_to_the_millisecond_in_trailers_record_and_log(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, proxy: ProxyServer,
    caplog: pytest.LogCaptureFixture, api: str,
) -> None:
    path, headers, body, reply = scripted(api)
    upstream.enqueue(reply)
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    with trio.fail_after(60):
        resp = await h2_request(proxy.port, "POST", path, [*headers, ("te", "trailers")], body)
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 200 and resp.ended
    assert resp.body == reply.body_bytes  # measuring changes no byte
    assert_figures(figures(ex), EXPECTED)
    assert "server-timing" in [t.strip() for t in resp.headers["trailer"].split(",")]
    assert resp.trailers is not None
    assert server_timing(resp.trailers["server-timing"]) == pytest.approx(TIMING, abs=1e-3)
    record = build_record(ex, b"s" * 32)
    stored = {f: getattr(record, f) for f in LATENCY_FIELDS}
    public = record.to_public_json()["latency"]
    expected = {f: EXPECTED[attr] for f, attr in LATENCY_FIELDS.items() if f != "itl_sketch"}
    assert_figures(stored, expected)
    assert_figures(public, expected)
    gaps = GapSketch.decode(record.itl_sketch)  # every gap, within 1 %: 10, 20 and 40 ms
    assert gaps.count == 3 and public["itl_sketch"] == record.itl_sketch
    assert gaps.percentiles([0, 50, 100]) == pytest.approx([10.0, 20.0, 40.0], rel=0.01)
    (line,) = [r.access for r in caplog.records if r.name == "trioproxy.access"]  # type: ignore[attr-defined]
    assert_figures(line, {"ttft_ms": 600.0, "itl_p50_ms": 20.0, "itl_p99_ms": 39.6,
                          "tpot_ms": 17.5, "tokens_per_s": 38.095, "e2e_ms": 705.0,
                          "upstream_head_ms": 200.0, "proxy_ms": 0.0})


async def test_buffered_response_carries_server_timing_without_token_figures(
    autojump_clock: trio.abc.Clock, upstream: FakeUpstream, raw_client: RawClient,
    proxy: ProxyServer,
) -> None:
    reply = anthropic_json(output_tokens=7)
    reply.before_headers = 0.2
    reply.body = [Pause(0.1), *reply.body]
    upstream.enqueue(reply)
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 9,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with trio.fail_after(60):
        resp = await raw_client.request("POST", "/v1/messages", ANTHROPIC, body)
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 200 and resp.header("x-usage-completion_tokens") == "7"
    timing = server_timing(resp.header("server-timing") or "")
    assert timing == pytest.approx({"upstream": 200.0, "proxy": 0.0, "total": 300.0}, abs=1e-3)
    assert_figures(figures(ex), {"duration_ms": 300.0, "upstream_head_ms": 200.0,
                                 "content_events": 0})
    assert figures(ex)["ttft_ms"] is None and figures(ex)["tpot_ms"] is None


async def test_websocket_responses_are_timed_each_from_its_own_create_frame(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery,
) -> None:
    script = Turn(deltas=DELTAS, before_created=0.2, gaps=[0.4, 0.01, 0.02, 0.04],
                  before_end=0.035, usage={"input_tokens": 10, "output_tokens": OUTPUT_TOKENS})
    with trio.fail_after(60):
        fake = await nursery.start(FakeResponsesWS(turns=[script, script]).serve)
        proxy = await start_ws_proxy(nursery, fake.base_url)
        async with connect(proxy) as ws:
            await turn(ws, create())
            await trio.sleep(5)  # the second response starts later on the same socket
            await turn(ws, create())
        records = await proxy.wait_records(2)
    for ex, _ in records:
        assert_figures(figures(ex), EXPECTED)
        gaps = GapSketch.decode(figures(ex)["itl_sketch"])  # each response's own gaps
        assert gaps.percentiles([0, 50, 100]) == pytest.approx([10.0, 20.0, 40.0], rel=0.01)


class Sleepy(Extension):
    """A payload hook that takes 250 ms (as a slow policy check or a lookup would)."""

    name = "sleepy"

    async def on_payload(self, ctx: Any, payload: Any, headers: Any) -> None:
        await trio.sleep(0.25)


@pytest.mark.parametrize(("extensions", "added"), [([], 0.0), ([Sleepy()], 250.0)])
async def test_proxy_added_time_is_zero_for_a_direct_relay_and_grows_by_an_extension_sleep(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
    extensions: list[Extension], added: float,
) -> None:
    path, headers, body, reply = scripted("anthropic.messages")
    upstream.enqueue(reply)
    server = await start_proxy(nursery, proxy_settings(upstream), extensions=extensions)
    client = await RawClient.connect(server.port)
    with trio.fail_after(60):
        resp = await client.request("POST", path, headers, body)
        (ex,) = await server.wait_exchanges(1)
    await client.aclose()
    assert resp.complete
    # The provider's own figures do not move; what the client waits for grows by the sleep.
    assert_figures(figures(ex), {
        "proxy_request_ms": added, "proxy_overhead_ms": added, "proxy_relay_ms": 0.0,
        "upstream_head_ms": 200.0, "itl_p50_ms": 20.0, "tpot_ms": 17.5,
        "ttft_ms": 600.0 + added, "duration_ms": 705.0 + added})
    await server.stop()


async def test_figures_reach_the_store_and_the_usage_lookup(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    path, headers, body, reply = scripted("openai.responses")
    upstream.enqueue(reply)
    server = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=server.url) as http:
            resp = await http.post(path, headers=dict(headers), content=body)
            (ex,) = await server.wait_exchanges(1)
            assert await server.app.runtime.writer.flush(10)  # type: ignore[union-attr]
            got = await http.get(f"/v1/usage/{resp.headers['x-trioproxy-request-id']}",
                                 headers=dict(headers))
    await server.stop()
    latency = got.json()["latency"]
    mine = figures(ex)
    assert latency == {f: mine[attr] for f, attr in LATENCY_FIELDS.items()}
    assert latency["content_events"] == 4 and latency["ttft_ms"] >= 600  # the script's pauses


# -- trioproxy latency, on both stores ------------------------------------------------------------

FIGS = {"itl_p50_ms": 20.0, "itl_p90_ms": 30.0, "itl_p99_ms": 40.0, "itl_max_ms": 50.0,
        "itl_count": 9, "tpot_ms": 25.0, "tokens_per_s": 40.0, "output_tokens": 10,
        "status": 200, "end_reason": "complete"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@pytest.fixture(params=["sqlite", "postgres"])
def latency_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    for url in database_url(request.param, tmp_path):
        store = open_store(url)
        store.migrate()
        store.insert_many([
            *(make_record(i, ttft_ms=100.0 * i, e2e_ms=1000.0 + i, **FIGS) for i in (1, 2, 3)),
            make_record(4, model="gpt-5", api="openai.responses", provider="openai",
                        ttft_ms=7.0, e2e_ms=70.0, **FIGS),
            # not counted: an upstream error, a cut stream, an endpoint that generates nothing
            make_record(5, ttft_ms=9999.0, e2e_ms=9999.0, **{**FIGS, "status": 429}),
            make_record(6, ttft_ms=9999.0, e2e_ms=9999.0,
                        **{**FIGS, "end_reason": "client_disconnect"}),
            make_record(7, api="anthropic.count_tokens", ttft_ms=None, e2e_ms=5.0, **FIGS),
            # a request recorded before migration 3: no figures at all
            make_record(8, status=200, end_reason="complete"),
        ])
        store.close()
        yield url


def test_trioproxy_latency_reports_percentiles_per_model(
    latency_db: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["latency", "--database-url", latency_db, "--json",
                 "--since", iso(T0)]) == 0
    summary = json.loads(capsys.readouterr().out)
    groups = {g["group"]: g for g in summary["groups"]}
    assert sorted(groups) == ["claude-sonnet-4-5", "gpt-5"]
    claude = groups["claude-sonnet-4-5"]
    assert claude["requests"] == 3
    ttft = claude["metrics"]["ttft_ms"]
    assert (ttft["count"], ttft["p50"], ttft["mean"], ttft["p90"]) == (3, 200.0, 200.0, None)
    assert claude["metrics"]["e2e_ms"]["p50"] == 1002.0
    assert claude["metrics"]["itl_ms"]["p50"] == pytest.approx(20.0)
    assert claude["metrics"]["itl_ms"]["count"] == 27
    assert groups["gpt-5"]["metrics"]["ttft_ms"]["p50"] == 7.0


def test_trioproxy_latency_table_and_time_window(
    latency_db: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["latency", "--database-url", latency_db, "--by", "api",
                 "--since", iso(T0 + 2), "--until", iso(T0 + 4)]) == 0
    out = capsys.readouterr().out
    assert "anthropic.messages" in out and "openai.responses" not in out
    assert "n<10" in out  # two requests: no p90 pretending to be one
