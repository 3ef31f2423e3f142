"""The official anthropic and openai SDKs, pointed at the proxy, stream and parse correctly."""

from __future__ import annotations

import anthropic
import openai
import trio

from trioproxy.testing import FakeUpstream

from .conftest import ProxyServer


async def test_anthropic_sdk_streams_and_sees_request_id(
    proxy: ProxyServer, upstream: FakeUpstream
) -> None:
    def run() -> tuple[str, object, str | None]:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-test", max_retries=0)
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        raw = client.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        )
        client.close()
        return text, final, raw.headers.get("request-id")

    with trio.fail_after(30):
        text, final, request_id = await trio.to_thread.run_sync(run)
    assert text == "Hello world"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert request_id == upstream.requests[-1].reply_request_id
    assert upstream.requests[0].target.startswith(b"/anthropic-upstream/v1/messages")


async def test_openai_sdk_chat_and_responses_stream(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    def run() -> tuple[str, list, str]:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}]
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        events = list(client.responses.create(model="gpt-5", input="hi", stream=True))
        client.close()
        return text, [chunks, events], events[-1].type

    with trio.fail_after(30):
        text, (chunks, events), last = await trio.to_thread.run_sync(run)
    assert text == "Hello world"
    # include_usage was injected upstream for accounting, yet the SDK sees no usage chunk
    assert all(c.choices for c in chunks)
    assert upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    assert last == "response.completed"
    assert events[-1].response.usage.output_tokens > 0
