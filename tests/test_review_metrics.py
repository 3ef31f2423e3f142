"""Review: a client cannot poison the bounded ``model`` label of /metrics with model names it
makes up (requests the upstream refuses), nor blow up a scrape with a huge name."""

from __future__ import annotations

import httpx
import pytest
import trio

from trioproxy.metrics import MAX_MODELS
from trioproxy.testing import FakeUpstream, error_reply, openai_chat_sse

from .conftest import proxy_settings, start_proxy
from .test_metrics import KEY, chat_stream, samples, scrape, value


@pytest.mark.trio
async def test_refused_made_up_models_do_not_use_up_the_model_labels(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
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
