"""A scriptable fake LLM upstream (Anthropic and OpenAI) for tests, the bench and demos.

``FakeUpstream`` is a raw h11-over-trio HTTP/1.1 server, so every byte and every connection is
under the test's control; it uses only trio primitives and ``trio.sleep`` (``autojump_clock``
safe). Every request is recorded (``requests``), every TCP connection too (``connections``).
Replies are scripted with ``enqueue(Reply(...))`` (FIFO, optionally per path); when nothing is
queued a default reply in the real wire shape is made from the request (``default_reply``).

    fake = FakeUpstream()
    await nursery.start(fake.serve)
    fake.enqueue(anthropic_sse(["Hel", "lo"], gaps=[0, 0, 0, 30], abort_after=5))

A ``Reply`` body is a list of ``bytes`` (one h11 ``Data`` each, i.e. one chunk), ``Pause(s)``
and ``Abort()`` (close the TCP connection right there: a truncated body). The builders return
replies with real-style provider headers; every reply also carries the hop-by-hop headers
``connection: keep-alive`` and ``keep-alive: timeout=30``. The upstream request id that was sent
is ``RecordedRequest.reply_request_id`` (and ``Reply.request_id``).

Run standalone: ``python -m trioproxy.testing --port 9000``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11
import trio

_rng = random.Random()
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_TEXT = ["Hello", " world"]
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
RESPONSES_MODEL = "gpt-5-2025-08-07"
HOP_BY_HOP = [("connection", "keep-alive"), ("keep-alive", "timeout=30")]


def _rand(alphabet: str, n: int) -> str:
    return "".join(_rng.choices(alphabet, k=n))


@dataclass(frozen=True)
class JSONStyle:
    """How the fake writes JSON in SSE events. Real upstreams differ: OpenAI writes compact
    JSON (``"choices":[]``); Python's ``json.dumps`` default and several OpenAI-compatible
    servers write ``"choices": []``. ``shuffled`` reorders the keys of every object (from
    ``seed``, else at random); ``ascii`` escapes non-ASCII as ``\\uXXXX``."""

    spaced: bool = False
    shuffled: bool = False
    ascii: bool = False
    seed: int | None = None

    def dumps(self, obj: Any) -> str:
        if self.shuffled:
            obj = _shuffle_keys(obj, random.Random(self.seed) if self.seed is not None else _rng)
        separators = (", ", ": ") if self.spaced else (",", ":")
        return json.dumps(obj, separators=separators, ensure_ascii=self.ascii)


COMPACT = JSONStyle()


def _shuffle_keys(obj: Any, rng: random.Random) -> Any:
    if isinstance(obj, dict):
        items = [(k, _shuffle_keys(v, rng)) for k, v in obj.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(obj, list):
        return [_shuffle_keys(v, rng) for v in obj]
    return obj


def anthropic_request_id() -> str:
    return "req_011C" + _rand(_B58, 20)


def openai_request_id() -> str:
    return "req_" + _rand("0123456789abcdef", 32)


# -- the script -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """Sleep (trio time) between body chunks."""

    seconds: float


@dataclass(frozen=True)
class Abort:
    """Close the TCP connection here: no terminating chunk, no EndOfMessage."""


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)  # extra / override headers
    body: list[bytes | Pause | Abort] = field(default_factory=list)
    chunked: bool = True  # False: content-length framing (the sum of all bytes parts)
    before_headers: float = 0  # sleep before the status line
    close_before_response: bool = False  # read the request, then close without a byte
    reset_before_response: bool = False  # read the request, then reset (TCP RST) without a byte
    keep_alive: bool = True  # False: `connection: close`, close after the response
    uses: int = field(default=0, init=False, compare=False)  # times sent; a re-send gets new ids

    @property
    def request_id(self) -> str | None:
        """The upstream request id header (`request-id` / `x-request-id`) this reply carries."""
        for k, v in self.headers:
            if k.lower() in ("request-id", "x-request-id"):
                return v
        return None

    @property
    def body_bytes(self) -> bytes:
        return b"".join(p for p in self.body if isinstance(p, bytes | bytearray))


def header_values(headers: list[tuple[bytes, bytes]], name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), decoded as latin-1."""
    key = name.lower().encode()
    return [v.decode("latin-1") for k, v in headers if k.lower() == key]


@dataclass
class RecordedRequest:
    method: str
    target: bytes  # raw request-target, byte-exact (query included)
    path: str  # percent-decoded path, without the query
    query: bytes
    headers: list[tuple[bytes, bytes]]  # lower-cased names (h11), order kept
    body: bytes
    conn_id: int
    received_at: float = 0.0  # trio.current_time() when the body was complete
    reply: Reply | None = None
    reply_request_id: str | None = None  # the `request-id`/`x-request-id` sent back

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return header_values(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ConnInfo:
    conn_id: int
    opened_at: float
    closed_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    requests: int = 0
    close_reason: str | None = None  # "peer", "abort", "close_before_response",
    # "reset_before_response", "idle_timeout", "close", "error"


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
           ("x-envoy-upstream-service-time", str(_rng.randint(200, 900))),
           ("via", "1.1 google"), ("cf-cache-status", "DYNAMIC"), ("x-robots-tag", "none"),
           ("server", "cloudflare"), ("cf-ray", _rand("0123456789abcdef", 16) + "-SJC")]
    return hs


def openai_headers(content_type: str = "application/json") -> list[tuple[str, str]]:
    return [("content-type", content_type),
            ("x-request-id", openai_request_id()),
            ("openai-organization", "user-fake0rg1d2e3f4g5h6i7j8k"),
            ("openai-processing-ms", str(_rng.randint(100, 900))),
            ("openai-project", "proj_" + _rand(_ALNUM, 24)),
            ("openai-version", "2020-10-01"),
            ("x-envoy-upstream-service-time", str(_rng.randint(100, 900))),
            ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "29999990"),
            ("x-ratelimit-reset-requests", "6ms"), ("x-ratelimit-reset-tokens", "0s"),
            ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
            ("x-content-type-options", "nosniff"), ("cf-cache-status", "DYNAMIC"),
            ("server", "cloudflare"), ("cf-ray", _rand("0123456789abcdef", 16) + "-SJC"),
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
    message = {"id": msg_id or "msg_01" + _rand(_B58, 22), "type": "message", "role": "assistant",
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
        "id": msg_id or "msg_01" + _rand(_B58, 22), "type": "message", "role": "assistant",
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
    base = {"id": "chatcmpl-" + _rand(_ALNUM, 29), "object": "chat.completion.chunk",
            "created": 1760000000, "model": model, "service_tier": "default",
            "system_fingerprint": "fp_" + _rand("0123456789abcdef", 10)}

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
        "id": "chatcmpl-" + _rand(_ALNUM, 29), "object": "chat.completion", "created": 1760000000,
        "model": model, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None, "finish_reason": finish_reason}],
        "usage": _chat_usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens),
        "service_tier": "default", "system_fingerprint": "fp_" + _rand("0123456789abcdef", 10),
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
    rid, item_id, text = "resp_" + _rand("0123456789abcdef", 48), "msg_" + _rand(
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
    obj = _response_obj(model, status, [_message_item("msg_" + _rand("0123456789abcdef", 48),
                                                      text, "completed")],
                        _responses_usage(input_tokens, cached_tokens, output_tokens,
                                         reasoning_tokens))
    obj["id"] = "resp_" + _rand("0123456789abcdef", 48)
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


# -- the server -------------------------------------------------------------------------------


class _Closed(Exception):
    """End this connection (reason in args[0])."""


class FakeUpstream:
    """``idle_timeout``: close a connection whose next request has not arrived within this long
    (trio time), as servers and load balancers do with idle keep-alive connections (None: never).
    It may be set on a running fake; it applies from the next wait on."""

    def __init__(self, *, tls: ssl.SSLContext | None = None,
                 default: Callable[[RecordedRequest], Reply] = default_reply,
                 idle_timeout: float | None = None) -> None:
        self.tls = tls
        self.default = default
        self.idle_timeout = idle_timeout
        self.port = 0
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.connections: list[ConnInfo] = []
        self.errors: list[BaseException] = []  # unexpected exceptions in connection handlers
        self._queue: list[tuple[str | None, Reply]] = []
        self._changed = trio.Event()

    def enqueue(self, reply: Reply, *, path: str | None = None) -> None:
        """Queue a reply (FIFO); with `path`, only for requests whose path ends with it."""
        self._queue.append((path, reply))

    async def wait_for_requests(self, n: int) -> None:
        while len(self.requests) < n:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _pick(self, req: RecordedRequest) -> Reply:
        for i, (path, reply) in enumerate(self._queue):
            if path is None or req.path.endswith(path):
                del self._queue[i]
                return reply
        return self.default(req)

    async def serve(self, *, host: str = "127.0.0.1", port: int = 0,
                    task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[Any] = list(await trio.open_tcp_listeners(port, host=host))
        self.port = listeners[0].socket.getsockname()[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"{'https' if self.tls else 'http'}://{shown}:{self.port}"
        if self.tls is not None:
            listeners = [trio.SSLListener(ln, self.tls, https_compatible=True) for ln in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        info = ConnInfo(len(self.connections) + 1, trio.current_time())
        self.connections.append(info)
        self._notify()
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                idle = math.inf if self.idle_timeout is None else self.idle_timeout
                with trio.move_on_after(idle) as waiting:
                    req = await self._read_request(stream, conn, info)
                if waiting.cancelled_caught:
                    raise _Closed("idle_timeout")
                reply = req.reply = self._pick(req)
                if reply.reset_before_response:
                    _linger_zero(stream)
                    raise _Closed("reset_before_response")
                if reply.close_before_response:
                    raise _Closed("close_before_response")
                await self._respond(stream, conn, reply, req)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    raise _Closed("close")
                conn.start_next_cycle()
        except _Closed as exc:
            info.close_reason = exc.args[0]
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            info.close_reason = "peer"
        except Exception as exc:  # noqa: BLE001  # never crash the serve loop; see .errors
            info.close_reason = "error"
            self.errors.append(exc)
        finally:
            await trio.aclose_forcefully(stream)
            info.closed_at = trio.current_time()
            info.closed.set()

    async def _next_event(self, stream: trio.abc.Stream, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
            conn.receive_data(await stream.receive_some(65536))

    async def _read_request(self, stream: trio.abc.Stream, conn: h11.Connection,
                            info: ConnInfo) -> RecordedRequest:
        event = await self._next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            raise _Closed("peer")
        assert isinstance(event, h11.Request), event
        body = bytearray()
        while not isinstance(part := await self._next_event(stream, conn), h11.EndOfMessage):
            if isinstance(part, h11.ConnectionClosed):
                raise _Closed("peer")
            body += part.data
        raw_path, _, query = bytes(event.target).partition(b"?")
        req = RecordedRequest(
            event.method.decode(), bytes(event.target),
            urllib.parse.unquote(raw_path.decode("latin-1")), query, list(event.headers),
            bytes(body), info.conn_id, trio.current_time())
        info.requests += 1
        self.requests.append(req)
        self._notify()
        return req

    async def _respond(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply,
                       req: RecordedRequest) -> None:
        """Write the reply while watching the socket: a peer that goes away ends it at once."""
        gone, failure = False, None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                try:
                    while data := await stream.receive_some(65536):
                        conn.receive_data(data)  # pipelined bytes: kept for the next cycle
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await self._write(stream, conn, reply, req)
            except Exception as exc:  # noqa: BLE001  # re-raised below, unwrapped
                failure = exc
            nursery.cancel_scope.cancel()
        if gone:
            raise _Closed("peer")
        if failure is not None:
            raise failure

    async def _write(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply,
                     req: RecordedRequest) -> None:
        if reply.before_headers:
            await trio.sleep(reply.before_headers)
        headers = self._response_headers(reply)
        req.reply_request_id = next((v for k, v in headers if k in ("request-id", "x-request-id")),
                                    None)
        try:
            reason = HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b"Overloaded" if reply.status == 529 else b""
        await stream.send_all(conn.send(h11.Response(
            status_code=reply.status, headers=headers, reason=reason)))
        for part in reply.body if req.method != "HEAD" else []:
            if isinstance(part, Pause):
                await trio.sleep(part.seconds)
            elif isinstance(part, Abort):
                raise _Closed("abort")
            elif part:
                await stream.send_all(conn.send(h11.Data(data=part)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _response_headers(self, reply: Reply) -> list[tuple[str, str]]:
        extra = [(k.lower(), v) for k, v in reply.headers]
        if reply.uses:  # a re-sent Reply object: keep request ids unique per request
            fresh = {"request-id": anthropic_request_id, "x-request-id": openai_request_id}
            extra = [(k, fresh[k]() if k in fresh else v) for k, v in extra]
        reply.uses += 1
        base = [("date", formatdate(time.time(), usegmt=True))]
        if reply.keep_alive:
            base += HOP_BY_HOP
        else:
            base.append(("connection", "close"))
        if reply.chunked:
            base.append(("transfer-encoding", "chunked"))
        else:
            base.append(("content-length", str(len(reply.body_bytes))))
        names = {k for k, _ in extra}
        return [(k, v) for k, v in base if k not in names] + extra


def _linger_zero(stream: trio.abc.Stream) -> None:
    """Make the coming close a TCP reset (RST) instead of an orderly FIN."""
    sock = getattr(stream, "transport_stream", stream).socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _main(host: str, port: int) -> None:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(fake.serve, host=host, port=port))
        print(f"fake LLM upstream listening on {fake.url}", flush=True)
        seen = 0
        while True:
            await fake.wait_for_requests(seen + 1)
            for req in fake.requests[seen:]:
                print(f"conn {req.conn_id}: {req.method} {req.target.decode('latin-1')} "
                      f"({len(req.body)} bytes)", flush=True)
            seen = len(fake.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trioproxy.testing",
        description="Serve a fake Anthropic/OpenAI upstream (default replies) until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    try:
        trio.run(_main, args.host, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
