"""What the end-to-end tests send: each provider's credential headers, a streamed Messages request,
and the bytes a scripted reply's body carries."""

from __future__ import annotations

import json

from trioproxy.testing import Reply

ANTHROPIC = [("x-api-key", "sk-ant-test-key-0001"), ("anthropic-version", "2023-06-01"),
             ("content-type", "application/json")]
OPENAI = [("authorization", "Bearer sk-test-key-0002"), ("content-type", "application/json")]
MESSAGES_STREAM = json.dumps(
    {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
     "messages": [{"role": "user", "content": "hi"}]}
).encode()


def body_bytes(reply: Reply) -> bytes:
    return b"".join(p for p in reply.body if isinstance(p, bytes | bytearray))
