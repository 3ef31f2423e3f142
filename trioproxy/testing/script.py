"""The script of a fake upstream's reply (``Reply``: a status, headers and a body of chunks,
``Pause`` and ``Abort``), the request it answers (``RecordedRequest``), request ids, and the JSON
style knob that varies whitespace and key order like real upstreams.

Import them from :mod:`trioproxy.testing`, which serves them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

rng = random.Random()
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_TEXT = ["Hello", " world"]
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
RESPONSES_MODEL = "gpt-5-2025-08-07"
HOP_BY_HOP = [("connection", "keep-alive"), ("keep-alive", "timeout=30")]


def random_chars(alphabet: str, n: int) -> str:
    return "".join(rng.choices(alphabet, k=n))


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
            obj = _shuffle_keys(obj, random.Random(self.seed) if self.seed is not None else rng)
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
    return "req_011C" + random_chars(B58, 20)


def openai_request_id() -> str:
    return "req_" + random_chars("0123456789abcdef", 32)


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
    # True: each Pause ends at a fixed time from the request's arrival (the sum of the pauses
    # so far), so late wake-ups do not add up: a calibration upstream's known schedule
    scheduled: bool = False
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
