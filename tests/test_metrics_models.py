"""The bounded ``model`` label of /metrics against a client behind an upstream that echoes
whatever model name it is sent (many OpenAI-compatible servers do): made-up names must not use
up the labels before the real models are seen."""

from __future__ import annotations

import httpx
import trio

from trioproxy.metrics import MAX_MODELS, Metrics
from trioproxy.testing import FakeUpstream, anthropic_json
from trioproxy.testing.replies import _json_reply

from .conftest import proxy_settings, start_proxy
from .test_metrics import scrape, value

REAL = "claude-sonnet-4-5-20250929"  # in the price table


async def ask(client: httpx.AsyncClient, url: str, model: str) -> int:
    resp = await client.post(url + "/v1/messages", headers={"x-api-key": "sk-ant-x"},
                             json={"model": model, "max_tokens": 5,
                                   "messages": [{"role": "user", "content": "hi"}]})
    return resp.status_code


async def test_echoed_made_up_models_leave_labels_for_the_priced_models(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    made_up = [f"echo-{i}" for i in range(MAX_MODELS)]
    for name in made_up:  # the upstream answers 200, naming the model it was asked for
        upstream.enqueue(anthropic_json(model=name))
    upstream.enqueue(anthropic_json(model=REAL))
    with trio.fail_after(30):
        async with httpx.AsyncClient() as client:
            for name in made_up:
                assert await ask(client, proxy.url, name) == 200
            assert await ask(client, proxy.url, "claude-sonnet-4-5") == 200
            await proxy.wait_exchanges(MAX_MODELS + 1)
            text = await scrape(client, proxy.url)
    assert value(text, "trioproxy_requests_total", model=REAL) == 1
    labelled = {m for m in made_up if f'model="{m}"' in text}
    assert 0 < len(labelled) <= MAX_MODELS // 2  # some made-up names shown, never all slots
    assert value(text, "trioproxy_requests_total", model="other") == MAX_MODELS - len(labelled)
    await proxy.stop()


async def test_a_model_named_only_in_an_error_answer_takes_no_label(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    for i in range(MAX_MODELS):  # a lying upstream: 500, with a message body naming a model
        upstream.enqueue(_json_reply("anthropic", {
            "id": f"msg_{i}", "type": "message", "role": "assistant", "model": f"junk-{i}",
            "content": [], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}}, status=500))
    upstream.enqueue(anthropic_json(model="my-local-model"))
    with trio.fail_after(30):
        async with httpx.AsyncClient() as client:
            for i in range(MAX_MODELS):
                assert await ask(client, proxy.url, f"junk-{i}") == 500
            assert await ask(client, proxy.url, "my-local-model") == 200
            await proxy.wait_exchanges(MAX_MODELS + 1)
            text = await scrape(client, proxy.url)
    assert 'model="junk-' not in text
    assert value(text, "trioproxy_requests_total", model="my-local-model") == 1
    await proxy.stop()


def test_names_the_price_table_knows_keep_their_labels_once_unknown_ones_are_capped() -> None:
    metrics = Metrics(multiprocess=False, max_models=6, accounting=False)
    unknown = [metrics.model_label(f"echo-{i}", provider="openai") for i in range(10)]
    assert unknown[:3] == ["echo-0", "echo-1", "echo-2"] and set(unknown[3:]) == {"other"}
    known = ["gpt-4o-mini", "gpt-4o", "o3-mini", "gpt-4.1"]
    labels = [metrics.model_label(m, provider="openai") for m in known]
    assert labels == [*known[:3], "other"]  # 6 labels in all
    assert metrics.model_label("echo-1", provider="openai") == "echo-1"  # kept once given
    assert metrics.model_label("gpt-4o", provider="openai", claim=False) == "gpt-4o"
    assert metrics.model_label("gpt-5", provider="openai", claim=False) == "other"
