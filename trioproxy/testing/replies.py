"""Real-style provider replies for the fake upstreams: headers and bodies (Anthropic Messages,
Chat Completions, Responses; SSE and JSON; errors; the model list), each a :class:`.script.Reply`.

Import them from :mod:`trioproxy.testing`, which serves them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from .script import (
    ALNUM,
    ANTHROPIC_MODEL,
    B58,
    CHAT_MODEL,
    COMPACT,
    DEFAULT_TEXT,
    RESPONSES_MODEL,
    Abort,
    JSONStyle,
    Pause,
    RecordedRequest,
    Reply,
    anthropic_request_id,
    openai_request_id,
    random_chars,
    rng,
)

# -- real-style headers and bodies ------------------------------------------------------------


def _reset_at(seconds: int) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_headers(content_type: str = "application/json") -> list[tuple[str, str]]:
    sse = content_type.startswith("text/event-stream")
    hs = [("content-type", content_type)]
    if sse:
        hs.append(("cache-control", "no-cache"))
    hs += [("request-id", anthropic_request_id()),
           ("anthropic-organization-id", "4f6b2c1e-9a7d-4e3b-8c5f-2d1a0b9e8f7c")]
    for kind, limit in (("requests", 4000), ("tokens", 2_000_000), ("input-tokens", 1_600_000),
                        ("output-tokens", 400_000)):
        hs += [(f"anthropic-ratelimit-{kind}-limit", str(limit)),
               (f"anthropic-ratelimit-{kind}-remaining", str(limit - 1)),
               (f"anthropic-ratelimit-{kind}-reset", _reset_at(1))]
    hs += [("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
           ("x-envoy-upstream-service-time", str(rng.randint(200, 900))),
           ("via", "1.1 google"), ("cf-cache-status", "DYNAMIC"), ("x-robots-tag", "none"),
           ("server", "cloudflare"), ("cf-ray", random_chars("0123456789abcdef", 16) + "-SJC")]
    return hs


def openai_headers(content_type: str = "application/json") -> list[tuple[str, str]]:
    return [("content-type", content_type),
            ("x-request-id", openai_request_id()),
            ("openai-organization", "user-fake0rg1d2e3f4g5h6i7j8k"),
            ("openai-processing-ms", str(rng.randint(100, 900))),
            ("openai-project", "proj_" + random_chars(ALNUM, 24)),
            ("openai-version", "2020-10-01"),
            ("x-envoy-upstream-service-time", str(rng.randint(100, 900))),
            ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "29999990"),
            ("x-ratelimit-reset-requests", "6ms"), ("x-ratelimit-reset-tokens", "0s"),
            ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
            ("x-content-type-options", "nosniff"), ("cf-cache-status", "DYNAMIC"),
            ("server", "cloudflare"), ("cf-ray", random_chars("0123456789abcdef", 16) + "-SJC"),
            ("alt-svc", 'h3=":443"; ma=86400')]


def _headers(provider: str, content_type: str) -> list[tuple[str, str]]:
    return (anthropic_headers if provider == "anthropic" else openai_headers)(content_type)


def _json_reply(provider: str, obj: Any, status: int = 200, *, pretty: bool = False) -> Reply:
    text = json.dumps(obj, indent=2) + "\n" if pretty else COMPACT.dumps(obj)
    return Reply(status, _headers(provider, "application/json"), [text.encode()], chunked=False)


def _sse_reply(
    provider: str, events: list[bytes], deltas: set[int],
    gaps: float | list[float] | None, abort_after: int | None,
) -> Reply:
    """`gaps` list: gaps[i] is a Pause before event i; a float: a Pause before every delta."""
    body: list[bytes | Pause | Abort] = []
    for i, event in enumerate(events):
        if abort_after is not None and i >= abort_after:
            break
        if isinstance(gaps, list):
            gap = gaps[i] if i < len(gaps) else 0
        else:
            gap = gaps if gaps and i in deltas else 0
        if gap:
            body.append(Pause(gap))
        body.append(event)
    if abort_after is not None:
        body.append(Abort())
    return Reply(200, _headers(provider, "text/event-stream; charset=utf-8"), body)


def _sse(name: str | None, data: Any, style: JSONStyle = COMPACT) -> bytes:
    payload = data if isinstance(data, str) else style.dumps(data)
    return (f"event: {name}\n" if name else "").encode() + f"data: {payload}\n\n".encode()


def _anthropic_usage(inp: int, out: int, read: int, creation: int) -> dict[str, Any]:
    return {"input_tokens": inp, "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": creation,
                               "ephemeral_1h_input_tokens": 0},
            "output_tokens": out, "service_tier": "standard"}


def anthropic_sse(
    text_chunks: list[str] | None = None, *, model: str = ANTHROPIC_MODEL, input_tokens: int = 25,
    output_tokens: int | None = None, cache_read: int = 0, cache_creation: int = 0,
    gaps: float | list[float] | None = None, abort_after: int | None = None,
    stop_reason: str = "end_turn", msg_id: str | None = None, style: JSONStyle = COMPACT,
) -> Reply:
    """Events: message_start, content_block_start, ping, one content_block_delta per chunk,
    content_block_stop, message_delta, message_stop (3 + n + 3 events, one body chunk each)."""
    chunks = DEFAULT_TEXT if text_chunks is None else text_chunks
    out = max(1, len(chunks)) if output_tokens is None else output_tokens
    message = {"id": msg_id or "msg_01" + random_chars(B58, 22), "type": "message",
               "role": "assistant",
               "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": _anthropic_usage(input_tokens, 1, cache_read, cache_creation)}
    events = [_sse("message_start", {"type": "message_start", "message": message}, style),
              _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}, style),
              b'event: ping\ndata: {"type": "ping"}\n\n']
    events += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": c}}, style)
               for c in chunks]
    events += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}, style),
               _sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                      "usage": {"output_tokens": out}}, style),
               _sse("message_stop", {"type": "message_stop"}, style)]
    return _sse_reply("anthropic", events, set(range(3, 3 + len(chunks))), gaps, abort_after)


def anthropic_json(
    text: str = "Hello world", *, model: str = ANTHROPIC_MODEL, input_tokens: int = 25,
    output_tokens: int = 2, cache_read: int = 0, cache_creation: int = 0,
    stop_reason: str = "end_turn", msg_id: str | None = None,
) -> Reply:
    return _json_reply("anthropic", {
        "id": msg_id or "msg_01" + random_chars(B58, 22), "type": "message", "role": "assistant",
        "model": model, "content": [{"type": "text", "text": text}], "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, output_tokens, cache_read, cache_creation)})


def _chat_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def openai_chat_sse(
    text_chunks: list[str] | None = None, *, model: str = CHAT_MODEL, include_usage: bool = False,
    prompt_tokens: int = 12, completion_tokens: int | None = None, cached_tokens: int = 0,
    reasoning_tokens: int = 0, gaps: float | list[float] | None = None,
    abort_after: int | None = None, finish_reason: str = "stop", style: JSONStyle = COMPACT,
) -> Reply:
    """Chunks: role, one per text chunk, finish_reason, [usage chunk with choices: []], [DONE].
    With include_usage every earlier chunk carries "usage": null (as the real API does).
    ``style`` says how the JSON is written (whitespace, key order)."""
    chunks = DEFAULT_TEXT if text_chunks is None else text_chunks
    completion = max(1, len(chunks)) if completion_tokens is None else completion_tokens
    base = {"id": "chatcmpl-" + random_chars(ALNUM, 29), "object": "chat.completion.chunk",
            "created": 1760000000, "model": model, "service_tier": "default",
            "system_fingerprint": "fp_" + random_chars("0123456789abcdef", 10)}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}]}
        return _sse(None, {**c, "usage": None} if include_usage else c, style)

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": c}) for c in chunks]
    events.append(chunk({}, finish_reason))
    if include_usage:
        usage = _chat_usage(prompt_tokens, completion, cached_tokens, reasoning_tokens)
        events.append(_sse(None, {**base, "choices": [], "usage": usage}, style))
    events.append(b"data: [DONE]\n\n")
    return _sse_reply("openai", events, set(range(1, 1 + len(chunks))), gaps, abort_after)


def openai_chat_json(
    text: str = "Hello world", *, model: str = CHAT_MODEL, prompt_tokens: int = 12,
    completion_tokens: int = 2, cached_tokens: int = 0, reasoning_tokens: int = 0,
    finish_reason: str = "stop",
) -> Reply:
    return _json_reply("openai", {
        "id": "chatcmpl-" + random_chars(ALNUM, 29), "object": "chat.completion",
        "created": 1760000000,
        "model": model, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None, "finish_reason": finish_reason}],
        "usage": _chat_usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens),
        "service_tier": "default",
        "system_fingerprint": "fp_" + random_chars("0123456789abcdef", 10),
    }, pretty=True)


def _response_obj(model: str, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {"id": "", "object": "response", "created_at": 1760000000, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": None, "max_output_tokens": None, "model": model, "output": output,
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": "medium", "summary": None}, "store": True,
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": usage, "user": None, "metadata": {}}


def _responses_usage(inp: int, cached: int, out: int, reasoning: int) -> dict[str, Any]:
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {"id": item_id, "type": "message", "status": status,
            "content": [part] if status == "completed" else [], "role": "assistant"}


def openai_responses_sse(
    text_chunks: list[str] | None = None, *, model: str = RESPONSES_MODEL, input_tokens: int = 13,
    cached_tokens: int = 0, output_tokens: int | None = None, reasoning_tokens: int = 0,
    gaps: float | list[float] | None = None, abort_after: int | None = None,
    status: str = "completed", style: JSONStyle = COMPACT,
) -> Reply:
    """Events: created, in_progress, output_item.added, content_part.added, one
    output_text.delta per chunk, output_text.done, content_part.done, output_item.done, then
    response.completed (or response.failed / response.incomplete per `status`)."""
    chunks = DEFAULT_TEXT if text_chunks is None else text_chunks
    out = max(1, len(chunks)) if output_tokens is None else output_tokens
    rid, item_id, text = "resp_" + random_chars("0123456789abcdef", 48), "msg_" + random_chars(
        "0123456789abcdef", 48), "".join(chunks)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    payloads: list[dict[str, Any]] = [
        {"type": "response.created",
         "response": _response_obj(model, "in_progress", [], None)},
        {"type": "response.in_progress",
         "response": _response_obj(model, "in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0,
         "item": _message_item(item_id, "", "in_progress")},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}}]
    payloads += [{"type": "response.output_text.delta", **where, "delta": c, "logprobs": []}
                 for c in chunks]
    final = _response_obj(model, status, [_message_item(item_id, text, "completed")],
                          _responses_usage(input_tokens, cached_tokens, out, reasoning_tokens))
    if status == "failed":
        final["error"] = {"code": "server_error", "message": "The model failed to respond."}
    elif status == "incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    payloads += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0,
         "item": _message_item(item_id, text, "completed")},
        {"type": f"response.{status}", "response": final}]
    events = []
    for seq, p in enumerate(payloads):
        if "response" in p:
            p["response"]["id"] = rid
        events.append(_sse(p["type"], {"type": p["type"], "sequence_number": seq,
                                       **{k: v for k, v in p.items() if k != "type"}}, style))
    return _sse_reply("openai", events, set(range(4, 4 + len(chunks))), gaps, abort_after)


def openai_responses_json(
    text: str = "Hello world", *, model: str = RESPONSES_MODEL, input_tokens: int = 13,
    cached_tokens: int = 0, output_tokens: int = 2, reasoning_tokens: int = 0,
    status: str = "completed",
) -> Reply:
    obj = _response_obj(model, status, [_message_item("msg_" + random_chars("0123456789abcdef", 48),
                                                      text, "completed")],
                        _responses_usage(input_tokens, cached_tokens, output_tokens,
                                         reasoning_tokens))
    obj["id"] = "resp_" + random_chars("0123456789abcdef", 48)
    return _json_reply("openai", obj, pretty=True)


def error_reply(
    provider: str, status: int, type: str, message: str, retry_after: float | None = None,
    *, code: str | None = None,
) -> Reply:
    """Anthropic: {"type":"error","error":{...},"request_id":...}, `retry-after` (default 1)
    and `x-should-retry` on 429/529. OpenAI: {"error":{"message","type","param","code"}}."""
    if provider == "anthropic":
        headers = anthropic_headers()
        body = {"type": "error", "error": {"type": type, "message": message},
                "request_id": dict(headers)["request-id"]}
        reply = Reply(status, headers, [COMPACT.dumps(body).encode()], chunked=False)
        if retry_after is None and status in (429, 529):
            retry_after = 1
        if status in (429, 529) or status >= 500:
            reply.headers.append(("x-should-retry", "true"))
    else:
        reply = _json_reply("openai", {"error": {"message": message, "type": type,
                                                 "param": None, "code": code}},
                            status, pretty=True)
    if retry_after is not None:
        reply.headers.append(("retry-after", f"{retry_after:g}"))
    return reply


def models_list(provider: str) -> Reply:
    if provider == "anthropic":
        data = [{"type": "model", "id": m, "display_name": n, "created_at": c} for m, n, c in (
            (ANTHROPIC_MODEL, "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
            ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
            ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"))]
        return _json_reply("anthropic", {"data": data, "has_more": False,
                                         "first_id": data[0]["id"], "last_id": data[-1]["id"]})
    data = [{"id": m, "object": "model", "created": 1754425777, "owned_by": "system"}
            for m in ("gpt-5", RESPONSES_MODEL, "gpt-4o-mini", CHAT_MODEL)]
    return _json_reply("openai", {"object": "list", "data": data}, pretty=True)


def default_reply(req: RecordedRequest, *, style: JSONStyle = COMPACT) -> Reply:
    """The reply made when nothing is enqueued: chosen by method, path suffix and JSON body.
    ``style`` is how streamed events' JSON is written (e.g.
    ``FakeUpstream(default=functools.partial(default_reply, style=JSONStyle(spaced=True)))``)."""
    try:
        body = json.loads(req.body) if req.body else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    stream, model = body.get("stream") is True, body.get("model")
    tokens = max(1, len(req.body) // 4)
    p, post = req.path.rstrip("/"), req.method == "POST"
    if post and p.endswith("/v1/messages/count_tokens"):
        return _json_reply("anthropic", {"input_tokens": tokens})
    if post and p.endswith("/v1/messages"):
        kw = {"model": model or ANTHROPIC_MODEL, "input_tokens": tokens}
        return anthropic_sse(**kw, style=style) if stream else anthropic_json(**kw)
    if post and p.endswith("/v1/chat/completions"):
        kw = {"model": model or CHAT_MODEL, "prompt_tokens": tokens}
        if not stream:
            return openai_chat_json(**kw)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return openai_chat_sse(include_usage=usage, style=style, **kw)
    if post and p.endswith("/v1/responses"):
        kw = {"model": model or RESPONSES_MODEL, "input_tokens": tokens}
        return openai_responses_sse(**kw, style=style) if stream else openai_responses_json(**kw)
    if req.method == "GET" and p.endswith("/v1/models"):
        return models_list("anthropic" if req.header("x-api-key") else "openai")
    return error_reply("openai", 404, "invalid_request_error",
                       f"Invalid URL ({req.method} {req.path})")
