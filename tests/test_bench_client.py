"""Benchmark clients against trioproxy: the probes they make before they start, and the
agreement of a client's TTFT / ITL / e2e (measured as AIPerf, GenAI-Perf and vLLM ``bench
serve`` measure them) with trioproxy's own figures for the same requests."""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.accounting.build import build_record
from trioproxy.accounting.locations import open_store
from trioproxy.protocol.gapsketch import GapSketch
from trioproxy.testing import FakeUpstream, openai_chat_sse

from .conftest import proxy_settings, start_proxy

AUTH = {"authorization": "Bearer sk-test-bench", "content-type": "application/json"}


async def test_health_probe_is_answered_and_never_forwarded_or_recorded(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """AIPerf, vLLM ``bench serve`` and others probe ``GET /health`` (vLLM's convention)
    before benchmarking; a 404 there made one refuse to start."""
    db = tmp_path / "u.db"
    proxy = await start_proxy(nursery, proxy_settings(upstream, accounting=True,
                                                      database_url=str(db)))
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            got = await client.get(proxy.url + "/health")
            head = await client.head(proxy.url + "/health")
            assert await proxy.app.runtime.writer.flush(10)
    assert (got.status_code, got.json()["status"], head.status_code) == (200, "ready", 200)
    assert upstream.requests == []
    store = open_store(str(db))
    try:
        assert store.recent(100) == []
    finally:
        store.close()
    await proxy.stop()


# -- a client of the standard kind ----------------------------------------------------------------


@dataclass
class ClientFigures:
    """What a streaming OpenAI-chat benchmark client measures (AIPerf's definitions): TTFT to
    the first chunk with content, the gaps between content chunks (``inter_chunk_latency``),
    the request latency to the LAST CONTENT chunk, ITL per token = (latency - TTFT) /
    (output tokens - 1), and (not a standard figure) the time to the last byte."""

    ttft_ms: float = 0.0
    chunk_gaps_ms: list[float] = field(default_factory=list)
    latency_ms: float = 0.0
    last_byte_ms: float = 0.0
    output_tokens: int = 0

    @property
    def itl_per_token_ms(self) -> float:
        return (self.latency_ms - self.ttft_ms) / (self.output_tokens - 1)


async def bench_client(url: str, request_id: str) -> ClientFigures:
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 100,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "count"}]}
    out = ClientFigures()
    content_at: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        start = trio.current_time()
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={**AUTH, "x-request-id": request_id}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                now = trio.current_time()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    content_at.append(now)
        out.last_byte_ms = (trio.current_time() - start) * 1000
    out.ttft_ms = (content_at[0] - start) * 1000
    out.latency_ms = (content_at[-1] - start) * 1000
    out.chunk_gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(content_at)]
    return out


# A stream whose figures differ by definition: the role chunk comes 50 ms before the first
# content (at ~300 ms), the content chunks are 30 ms apart and carry 2 tokens each, and the
# finish, usage and [DONE] chunks come 250 ms after the last content.
DELTAS = [f" w{i} x{i}" for i in range(25)]
GAPS = [0.25, 0.05] + [0.03] * 24 + [0.25, 0.0, 0.0]
SLACK_MS = 40.0  # the proxy's time, loopback and scheduling on a loaded machine


async def test_a_benchmark_client_agrees_with_the_record_of_the_same_request(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream, request_id_header="x-request-id"))
    upstream.enqueue(openai_chat_sse(DELTAS, include_usage=True, completion_tokens=50,
                                     gaps=GAPS))
    with trio.fail_after(30):
        client = await bench_client(proxy.url, "bench-req-1")
        (ex,) = await proxy.wait_exchanges(1)
    record = build_record(ex, b"s" * 32)
    assert record.correlation_id == "bench-req-1" and record.output_tokens == 50

    # TTFT: both to the first content (not the role chunk, 50 ms earlier); the client later
    assert 0 <= client.ttft_ms - record.ttft_ms < SLACK_MS
    assert record.ttft_ms >= 295
    # the client's request latency stops at the last content chunk: last_token_ms, not e2e_ms
    assert 0 <= client.latency_ms - record.last_token_ms < SLACK_MS
    assert record.e2e_ms - record.last_token_ms >= 240  # the finish/usage/[DONE] tail
    assert 0 <= client.last_byte_ms - record.e2e_ms < SLACK_MS
    # ITL per token (AIPerf's inter_token_latency) is TPOT; per chunk it is the gap sketch
    assert client.itl_per_token_ms == pytest.approx(record.tpot_ms, abs=2.0)
    assert record.tpot_ms == pytest.approx(15.0, abs=3.0)  # 30 ms per event of 2 tokens
    sketch = GapSketch.decode(record.itl_sketch)
    assert sketch.count == len(client.chunk_gaps_ms) == 24
    median = statistics.median(client.chunk_gaps_ms)
    assert median == pytest.approx(sketch.percentile(50), abs=6.0)
    assert median == pytest.approx(record.itl_p50_ms, abs=6.0)
    assert record.itl_p50_ms == pytest.approx(30.0, abs=6.0)
    await proxy.stop()
