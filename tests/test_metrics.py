"""GET /metrics on the real server: the GenAI histograms, the proxy's own figures, bounded labels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.accounting.locations import open_store
from trioproxy.metrics import MAX_MODELS, TOKEN_BUCKETS, Metrics
from trioproxy.testing import FakeUpstream, anthropic_sse, error_reply, openai_chat_sse

from .conftest import RawClient, proxy_settings, start_proxy

KEY = "sk-test-secret-key-1234"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    found = [v for n, lab, v in samples(text) if n == name
             and all(lab.get(k) == want for k, want in labels.items())]
    assert found, f"no sample {name} {labels}"
    return sum(found)


async def scrape(client: httpx.AsyncClient, url: str) -> str:
    resp = await client.get(url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


async def chat_stream(client: httpx.AsyncClient, url: str) -> str:
    resp = await client.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                             json={"model": "gpt-4o-mini", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    return resp.text


@pytest.mark.trio
async def test_a_streamed_request_is_counted_by_outcome_with_tokens_and_cost(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    upstream.enqueue(openai_chat_sse(["Hel", "lo"], include_usage=True, prompt_tokens=300,
                                     completion_tokens=20))
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            await chat_stream(client, proxy.url)
            await client.post(proxy.url + "/v1/nowhere", json={})
            (ex, _) = await proxy.wait_exchanges(2)
            text = await scrape(client, proxy.url)
    model = "gpt-4o-mini-2024-07-18"
    ok = {"provider": "openai", "api": "openai.chat", "model": model}
    assert value(text, "trioproxy_requests_total", **ok, status_class="2xx",
                 end_reason="complete") == 1
    assert value(text, "trioproxy_requests_total", api="unrouted", status_class="4xx",
                 end_reason="rejected") == 1
    assert value(text, "gen_ai_client_operation_duration_seconds_count", **ok,
                 end_reason="complete") == 1
    assert value(text, "gen_ai_client_token_usage_sum", **ok, gen_ai_token_type="input") == 300
    assert value(text, "gen_ai_client_token_usage_sum", **ok, gen_ai_token_type="output") == 20
    # tokens fall in the OpenTelemetry buckets: 300 is above 256, within 1024
    assert value(text, "gen_ai_client_token_usage_bucket", **ok, gen_ai_token_type="input",
                 le="256.0") == 0
    assert value(text, "gen_ai_client_token_usage_bucket", **ok, gen_ai_token_type="input",
                 le="1024.0") == 1
    assert value(text, "trioproxy_cost_usd_total", provider="openai", model=model) == \
        pytest.approx(ex.cost_usd())
    assert ex.cost_usd() > 0
    await proxy.stop()


@pytest.mark.trio
async def test_labels_never_carry_a_request_id_key_session_or_path(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    upstream.enqueue(anthropic_sse(["a", "b"]))
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            resp = await client.post(
                proxy.url + "/v1/messages?beta=true",
                headers={"x-api-key": KEY, "x-claude-code-session-id": "sess-abc-123",
                         "x-trioproxy-request-id": "corr-xyz-789"},
                json={"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200
            await proxy.wait_exchanges(1)
            text = await scrape(client, proxy.url)
    rid = resp.headers["x-trioproxy-request-id"]
    label_values = {v for _, labels, _ in samples(text) for v in labels.values()}
    for secret in (rid, KEY, KEY[-4:], "sess-abc-123", "corr-xyz-789", "/v1/messages"):
        assert not any(secret in v for v in label_values), secret
    assert value(text, "trioproxy_requests_total", api="anthropic.messages") == 1
    await proxy.stop()


def test_models_beyond_the_cap_are_counted_as_other() -> None:
    metrics = Metrics(multiprocess=False, max_models=2)
    names = ("gpt-4o", "gpt-4o-mini", "o3-mini", "gpt-4o", None, "gpt-4.1")
    assert [metrics.model_label(m, provider="openai") for m in names] == \
        ["gpt-4o", "gpt-4o-mini", "other", "gpt-4o", "none", "other"]


@pytest.mark.trio
async def test_refused_made_up_models_do_not_use_up_the_model_labels(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    """A client cannot fill the bounded ``model`` label with names it makes up (requests the
    upstream refuses), nor blow up a scrape with a huge name."""
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    for _ in range(MAX_MODELS):
        upstream.enqueue(error_reply("openai", 404, "invalid_request_error", "no such model"))
    upstream.enqueue(openai_chat_sse(["Hi"], include_usage=True))
    with trio.fail_after(30):
        async with httpx.AsyncClient() as client:
            for i in range(MAX_MODELS):
                made_up = f"junk-{i}-" + "x" * 5000
                resp = await client.post(
                    proxy.url + "/v1/chat/completions", json={"model": made_up, "stream": True},
                    headers={"authorization": f"Bearer {KEY}"})
                assert resp.status_code == 404
            await chat_stream(client, proxy.url)
            await proxy.wait_exchanges(MAX_MODELS + 1)
            text = await scrape(client, proxy.url)
    assert value(text, "trioproxy_requests_total", model="gpt-4o-mini-2024-07-18",
                 status_class="2xx") == 1
    assert max(len(v) for _, labels, _ in samples(text) for v in labels.values()) < 200
    await proxy.stop()


def test_token_buckets_are_the_opentelemetry_boundaries() -> None:
    assert TOKEN_BUCKETS[0] == 1 and TOKEN_BUCKETS[-1] == 67108864
    assert all(b == a * 4 for a, b in itertools.pairwise(TOKEN_BUCKETS))


@pytest.mark.trio
async def test_scrape_reads_pool_connections_and_the_usage_writer(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    origin = f"http://127.0.0.1:{upstream.port}"
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            await chat_stream(client, proxy.url)
            await proxy.wait_exchanges(1)
            assert await proxy.app.runtime.writer.flush(10)
            text = await scrape(client, proxy.url)
    assert value(text, "trioproxy_upstream_connections", origin=origin, state="idle") == 1
    assert value(text, "trioproxy_upstream_connections", origin=origin, state="in_use") == 0
    assert value(text, "trioproxy_upstream_pool_waiting", origin=origin) == 0
    assert value(text, "trioproxy_usage_store_up") == 1
    assert value(text, "trioproxy_usage_queue_depth") == 0
    assert value(text, "trioproxy_streams_in_flight") == 0
    assert value(text, "trioproxy_draining") == 0
    await proxy.stop()


@pytest.mark.trio
async def test_streams_in_flight_counts_an_open_stream(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    upstream.enqueue(openai_chat_sse(["a", "b"], gaps=[0, 0, 30]))
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    with trio.fail_after(20):
        raw = await RawClient.connect(proxy.port)
        await raw.send_request("POST", "/v1/chat/completions",
                               [("authorization", f"Bearer {KEY}")], body)
        await raw.read_body(await raw.read_head(), max_chunks=1)  # open, its upstream pausing
        async with httpx.AsyncClient() as client:
            text = await scrape(client, proxy.url)
        await raw.aclose()
    assert value(text, "trioproxy_streams_in_flight") == 1
    assert value(text, "trioproxy_upstream_connections", state="in_use") == 1
    await proxy.stop()


@pytest.mark.trio
async def test_operational_paths_are_never_forwarded_or_recorded(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "u.db"
    proxy = await start_proxy(nursery, proxy_settings(upstream, accounting=True,
                                                      database_url=str(db)))
    paths = ["/metrics", "/_trioproxy/healthz", "/_trioproxy/readyz", "/_trioproxy/",
             "/_trioproxy/dashboard.js", "/_trioproxy/api/usage", "/_trioproxy/nothing"]
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(proxy.url + p)).status_code for p in paths]
            assert await proxy.app.runtime.writer.flush(10)
            text = await scrape(client, proxy.url)
    assert statuses == [200, 200, 200, 200, 200, 200, 404]
    assert upstream.requests == []
    store = open_store(str(db))
    try:
        assert store.recent(100) == []
    finally:
        store.close()
    assert not [s for s in samples(text) if s[0] == "trioproxy_requests_total"]
    await proxy.stop()


@pytest.mark.trio
async def test_time_to_first_chunk_and_time_per_chunk_histograms(
    nursery: trio.Nursery, upstream: FakeUpstream, autojump_clock: trio.abc.Clock
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    # first content 2 s after the request, then one chunk every 0.25 s
    upstream.enqueue(openai_chat_sse(["a", "b", "c", "d"], include_usage=True,
                                     completion_tokens=4, gaps=[0, 2.0, 0.25, 0.25, 0.25]))
    with trio.fail_after(60):
        async with httpx.AsyncClient() as client:
            await chat_stream(client, proxy.url)
            await proxy.wait_exchanges(1)
            text = await scrape(client, proxy.url)
    labels = {"provider": "openai", "api": "openai.chat", "model": "gpt-4o-mini-2024-07-18"}
    name = "gen_ai_client_operation_time_to_first_chunk_seconds"
    assert value(text, name + "_count", **labels) == 1
    assert value(text, name + "_bucket", **labels, le="1.0") == 0
    assert value(text, name + "_bucket", **labels, le="2.5") == 1
    name = "gen_ai_client_operation_time_per_output_chunk_seconds"
    assert value(text, name + "_count", **labels) == 1
    assert value(text, name + "_bucket", **labels, le="0.2") == 0
    assert value(text, name + "_bucket", **labels, le="0.3") == 1
    await proxy.stop()


def test_cached_labelled_children_count_like_labels_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import trioproxy.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "MAX_CHILDREN", 5)
    m = Metrics(multiprocess=False)
    lat = types.SimpleNamespace(ttft_ms=50.0, itl_p50_ms=10.0)
    for i in range(40):
        usage = types.SimpleNamespace(model=f"m{i % 8}", known=True, input_tokens=3,
                                      output_tokens=None)
        ex = types.SimpleNamespace(
            usage=lambda u=usage: u, provider="openai", api=lambda: "openai.chat",
            end_reason="complete", status=200, finalised_at=2.0, started=1.0, streamed=True,
            cost_usd=lambda: 0.5, latency=lambda: lat, model_requested=None)
        m.observe(ex)
    assert len(m._children) <= 5
    text = m.render()[0].decode()
    assert value(text, "trioproxy_requests_total") == 40
    assert value(text, "trioproxy_requests_total", model="m3") == 5
    assert value(text, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 40
    assert not [s for s in samples(text) if s[1].get("gen_ai_token_type") == "output"]
    assert value(text, "trioproxy_cost_usd_total", model="m7") == 2.5
    assert value(text, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 40
