"""``trioproxy fake-upstream``, the calibration upstream, run as the real command."""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from trioproxy.commands.fake_upstream import parse_duration, parse_fraction

BIN = os.path.dirname(sys.executable)
TTFT, ITL, TOKENS = 150.0, 10.0, 20  # ms, ms, tokens; jitter 10 %
SLACK = 60.0  # ms a loaded machine may add to a pause (never removes any)


@pytest.fixture
def fake_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [os.path.join(BIN, "trioproxy"), "fake-upstream", "--host", "127.0.0.1", "--port", "0",
         "--ttft", f"{TTFT:g}ms", "--itl", f"{ITL:g}ms", "--tokens", str(TOKENS),
         "--jitter", "10%", "--seed", "7"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "fake upstream on http://127.0.0.1:PORT (...)"
        assert "fake upstream on http://127.0.0.1:" in line, line
        yield line.split()[3]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def assert_paced(times_ms: list[float]) -> None:
    """First token after TTFT ± 10 %, then gaps of ITL ± 10 % (a pause is never cut short)."""
    assert len(times_ms) == TOKENS
    assert TTFT * 0.9 <= times_ms[0] < TTFT * 1.1 + SLACK
    gaps = [b - a for a, b in itertools.pairwise(times_ms)]
    assert times_ms[-1] - times_ms[0] >= (TOKENS - 1) * ITL * 0.9 - 1.0  # the fake's timer
    assert ITL * 0.9 - 2.0 <= statistics.median(gaps) < ITL * 1.1 + SLACK / 4


async def stream_sse(url: str, path: str, body: dict) -> tuple[list[float], list[dict]]:
    """(arrival of each content delta in ms, every event's JSON) of one streamed request."""
    times, events = [], []
    async with httpx.AsyncClient(timeout=30) as client:
        start = trio.current_time()
        async with client.stream("POST", url + path, json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                events.append(event)
                delta = (event.get("delta") if event.get("type") != "message_delta" else None)
                chat = (event.get("choices") or [{}])[0].get("delta", {}).get("content") \
                    if "choices" in event else None
                if (isinstance(delta, dict) and delta.get("text")) or \
                        (isinstance(delta, str) and delta) or chat:
                    times.append((trio.current_time() - start) * 1000)
    return times, events


async def test_streams_the_three_apis_with_known_pacing_and_real_usage(fake_url: str) -> None:
    with trio.fail_after(30):
        times, events = await stream_sse(fake_url, "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
        assert_paced(times)
        assert events[-2]["usage"]["output_tokens"] == TOKENS  # message_delta
        assert events[0]["message"]["usage"]["input_tokens"] > 0

        times, events = await stream_sse(fake_url, "/v1/chat/completions", {
            "model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]})
        assert_paced(times)
        assert events[-1]["usage"]["completion_tokens"] == TOKENS
        assert events[-1]["choices"] == []

        times, events = await stream_sse(fake_url, "/v1/responses", {
            "model": "gpt-5", "stream": True, "input": "hi"})
        assert_paced(times)
        assert events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["usage"]["output_tokens"] == TOKENS


async def test_serves_the_responses_websocket_on_the_same_port(fake_url: str) -> None:
    with trio.fail_after(30):
        async with open_websocket_url(fake_url.replace("http", "ws", 1) + "/v1/responses") as ws:
            for _ in range(2):  # two responses on one socket, each paced
                start = trio.current_time()
                await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-5",
                                                  "input": "hi"}))
                times = []
                while (event := json.loads(await ws.get_message()))["type"] != \
                        "response.completed":
                    if event["type"] == "response.output_text.delta":
                        times.append((trio.current_time() - start) * 1000)
                assert_paced(times)
                assert event["response"]["usage"]["output_tokens"] == TOKENS


async def test_json_answers_after_the_generation_time_and_health_answers(fake_url: str) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(fake_url + "/health")).status_code == 200
            models = await client.get(fake_url + "/v1/models")
            assert models.json()["data"]
            start = trio.current_time()
            resp = await client.post(fake_url + "/v1/chat/completions", json={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            took = (trio.current_time() - start) * 1000
    assert resp.json()["usage"]["completion_tokens"] == TOKENS
    assert resp.json()["choices"][0]["message"]["content"].count(" ") == TOKENS
    assert took >= 0.9 * (TTFT + (TOKENS - 1) * ITL)


def test_durations_and_jitter_parse_as_written() -> None:
    assert parse_duration("300ms") == pytest.approx(0.3)
    assert parse_duration("0.02s") == pytest.approx(0.02)
    assert parse_duration("250us") == pytest.approx(0.00025)
    assert parse_fraction("10%") == pytest.approx(0.1)
    assert parse_fraction("0.05") == pytest.approx(0.05)
    for bad in ("fast", "-1ms"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="jitter"):
        parse_fraction("150%")
