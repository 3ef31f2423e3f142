"""The recorded provider responses in tests/data, the usage each must give, and the ways a test
feeds them to a parser: whole, byte by byte, or split at given points."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from trioproxy.providers import Usage, make_parser

DATA = Path(__file__).parent / "data"
POINTS = st.lists(st.integers(min_value=0, max_value=100_000), max_size=30)

# fixture -> (api, expected fields); streaming is the file suffix.
EXPECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "anthropic_stream.sse": ("anthropic.messages", {
        "model": "claude-sonnet-4-5-20250929", "response_id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "input_tokens": 12 + 1500 + 20480, "output_tokens": 87, "cache_read_tokens": 20480,
        "cache_write_tokens": 1500, "stop_reason": "tool_use", "complete": True, "known": True,
        "error": None,
    }),
    "anthropic_stream_legacy.sse": ("anthropic.messages", {
        "response_id": "msg_01Legacy", "input_tokens": 25, "output_tokens": 15,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "stop_reason": "end_turn",
        "complete": True, "known": True,
    }),
    "anthropic_stream_error.sse": ("anthropic.messages", {
        "response_id": "msg_01Err", "input_tokens": 3410, "output_tokens": 3,
        "cache_read_tokens": 3000, "stop_reason": None, "complete": False, "known": True,
        "error": "overloaded_error: Overloaded",
    }),
    "anthropic_message.json": ("anthropic.messages", {
        "model": "claude-opus-4-1-20250805", "response_id": "msg_01JSON", "input_tokens": 2095,
        "output_tokens": 503, "cache_read_tokens": 0, "stop_reason": "max_tokens",
        "complete": True, "known": True,
    }),
    "anthropic_error.json": ("anthropic.messages", {
        "known": False, "complete": True, "input_tokens": None,
        "error": "rate_limit_error: Number of request tokens has exceeded your per-minute"
        " rate limit",
    }),
    "chat_stream_usage.sse": ("openai.chat", {
        "model": "gpt-4o-mini-2024-07-18", "response_id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "input_tokens": 1117, "output_tokens": 46, "cache_read_tokens": 1024,
        "audio_input_tokens": 0, "reasoning_tokens": 0, "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0, "stop_reason": "tool_calls", "complete": True,
        "known": True,
    }),
    "chat_stream_no_usage.sse": ("openai.chat", {
        "model": "gpt-4.1-2025-04-14", "response_id": "chatcmpl-NoUsage", "input_tokens": None,
        "output_tokens": None, "stop_reason": "length", "complete": True, "known": False,
        "raw_usage": None,
    }),
    "chat_stream_azure.sse": ("openai.chat", {
        "model": "gpt-4o-2024-11-20", "response_id": "chatcmpl-Azure1", "input_tokens": 9,
        "output_tokens": 2, "cache_read_tokens": None, "stop_reason": "stop", "complete": True,
        "known": True,
    }),
    "chat_stream_error.sse": ("openai.chat", {
        "response_id": "chatcmpl-Err", "known": False, "complete": False,
        "error": "server_error: The server had an error while processing your request.",
    }),
    "chat_completion.json": ("openai.chat", {
        "model": "gpt-4o-audio-preview-2024-12-17", "response_id": "chatcmpl-JSON1",
        "input_tokens": 300, "output_tokens": 120, "cache_read_tokens": 128,
        "audio_input_tokens": 40, "audio_output_tokens": 50, "reasoning_tokens": 32,
        "accepted_prediction_tokens": 7, "rejected_prediction_tokens": 3, "stop_reason": "stop",
        "complete": True, "known": True,
    }),
    "responses_stream.sse": ("openai.responses", {
        "model": "gpt-5-codex",
        "response_id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "input_tokens": 9120, "output_tokens": 412, "cache_read_tokens": 8064,
        "reasoning_tokens": 256, "stop_reason": "completed", "complete": True, "known": True,
        "error": None,
    }),
    "responses_incomplete.sse": ("openai.responses", {
        "response_id": "resp_incomplete", "input_tokens": 500, "output_tokens": 64,
        "reasoning_tokens": 60, "stop_reason": "max_output_tokens", "complete": True,
        "known": True,
    }),
    "responses_failed.sse": ("openai.responses", {
        "response_id": "resp_failed", "known": False, "complete": True, "stop_reason": "failed",
        "error": "server_error: The model failed to generate a response.",
    }),
    "responses_error.sse": ("openai.responses", {
        "response_id": "resp_err", "model": "gpt-5-codex", "known": False, "complete": False,
        "error": "rate_limit_exceeded: Rate limit reached for gpt-5-codex",
    }),
    "responses.json": ("openai.responses", {
        "model": "o4-mini-2025-04-16", "response_id": "resp_json", "input_tokens": 36,
        "output_tokens": 87, "cache_read_tokens": 0, "reasoning_tokens": 64,
        "stop_reason": "completed", "complete": True, "known": True,
    }),
}
SSE_FIXTURES = [name for name in EXPECTED if name.endswith(".sse")]


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def run(name: str, chunks: list[bytes], encoding: str | None = None) -> Usage:
    api, _ = EXPECTED[name]
    parser = make_parser(api, streaming=name.endswith(".sse"), content_encoding=encoding)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.close()


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]
