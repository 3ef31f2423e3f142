"""The calibration upstream (``trioproxy fake-upstream``): known pacing, real-shaped usage.

It serves the three generation APIs (Anthropic Messages, OpenAI Chat Completions and OpenAI
Responses, streamed as SSE or answered as JSON, and the Responses WebSocket) on one port, built
from the project's own fakes (:mod:`.http`, :mod:`.websocket`). Every
streamed response sends its first content delta ``ttft`` after the request, then ``tokens - 1``
more deltas ``itl`` apart, one token each; each pause is drawn uniformly within ``± jitter`` of
its nominal value. Usage is real-shaped: the output tokens are ``tokens``, the input tokens about
a quarter of the request body's bytes. A JSON (non-streamed) answer comes after the whole
generation time (``ttft + (tokens - 1) * itl``). ``GET /health`` answers 200, ``GET /v1/models``
the model list, so clients can point at it directly to measure themselves.

Measure a rig (client + proxy + network) against this known truth before measuring a provider:
what a client reports above ``ttft`` / ``itl`` is the rig's. See the README's
"Calibrating a benchmark rig" section.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from ..upstream.connect_proxy import PrefixedStream
from .http import FakeUpstream
from .replies import (
    anthropic_json,
    anthropic_sse,
    default_reply,
    openai_chat_json,
    openai_chat_sse,
    openai_headers,
    openai_responses_json,
    openai_responses_sse,
)
from .script import RecordedRequest, Reply
from .websocket import FakeResponsesWS, Turn

__all__ = ["CalibrationUpstream", "OneOrigin", "Pacing", "paced_reply", "serve_fake_upstream"]

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " again")
_HEAD_LIMIT = 65536


@dataclass
class Pacing:
    """The known truth: first content after ``ttft``, then ``tokens - 1`` gaps of ``itl``
    (seconds), each pause uniform within ± ``jitter`` (a fraction) of its nominal value."""

    ttft: float = 0.3
    itl: float = 0.02
    tokens: int = 200
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)

    def _draw(self, nominal: float) -> float:
        return nominal * (1 + self.rng.uniform(-self.jitter, self.jitter)) if self.jitter else nominal

    def pauses(self) -> list[float]:
        """Pause before each delta: the first is the TTFT, the others the gaps."""
        return [self._draw(self.ttft)] + [self._draw(self.itl) for _ in range(self.tokens - 1)]

    def text(self) -> list[str]:
        return [WORDS[i % len(WORDS)] for i in range(self.tokens)]


def _event_gaps(pauses: list[float], before: int, after: int) -> list[float]:
    return [0.0] * before + pauses + [0.0] * after


def paced_reply(req: RecordedRequest, pacing: Pacing) -> Reply:
    """The reply to one HTTP request: paced for the generation APIs, else the fake's default.
    Paced replies keep a schedule from the request's arrival (``Reply.scheduled``): token k
    is sent at TTFT + the first k - 1 gaps, however late the previous one went out."""
    reply = _paced_reply(req, pacing)
    reply.scheduled = True
    return reply


def _paced_reply(req: RecordedRequest, pacing: Pacing) -> Reply:
    p, post = req.path.rstrip("/"), req.method == "POST"
    if req.method == "GET" and p == "/health":
        return Reply(200, openai_headers(), [b'{"status":"ok"}'], chunked=False)
    try:
        body = json.loads(req.body) if req.body else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    generation = post and p.endswith(("/v1/messages", "/v1/chat/completions", "/v1/responses"))
    if not generation:
        return default_reply(req)
    pauses, text, model = pacing.pauses(), pacing.text(), body.get("model")
    inp, n = max(1, len(req.body) // 4), pacing.tokens
    if body.get("stream") is not True:  # JSON, after the whole generation time
        reply = _json_answer(p, "".join(text), model, inp, n)
        reply.before_headers = sum(pauses)
        return reply
    if p.endswith("/v1/messages"):  # message_start, block start, ping | deltas | 3 events
        return anthropic_sse(text, model=model or "claude-sonnet-4-5", input_tokens=inp,
                             output_tokens=n, gaps=_event_gaps(pauses, 3, 3))
    if p.endswith("/v1/chat/completions"):
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        # the role chunk comes with the first token (as OpenAI sends it), then the deltas
        gaps = [pauses[0], 0.0, *pauses[1:]]
        return openai_chat_sse(text, model=model or "gpt-4o-mini", include_usage=usage,
                               prompt_tokens=inp, completion_tokens=n, gaps=gaps)
    return openai_responses_sse(text, model=model or "gpt-5", input_tokens=inp,
                                output_tokens=n, gaps=_event_gaps(pauses, 4, 4))


def _json_answer(path: str, text: str, model: Any, inp: int, n: int) -> Reply:
    if path.endswith("/v1/messages"):
        return anthropic_json(text, model=model or "claude-sonnet-4-5", input_tokens=inp,
                              output_tokens=n)
    if path.endswith("/v1/chat/completions"):
        return openai_chat_json(text, model=model or "gpt-4o-mini", prompt_tokens=inp,
                                completion_tokens=n)
    return openai_responses_json(text, model=model or "gpt-5", input_tokens=inp,
                                 output_tokens=n)


def paced_turn(frame: dict[str, Any], pacing: Pacing) -> Turn:
    """The Responses WebSocket answer to one ``response.create`` frame."""
    pauses, n = pacing.pauses(), pacing.tokens
    inp = max(1, len(json.dumps(frame)) // 4)
    usage = {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": inp + n}
    return Turn(deltas=tuple(pacing.text()), gaps=pauses, usage=usage, scheduled=True)


def _is_upgrade(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class OneOrigin:
    """An HTTP fake and a Responses WebSocket fake behind one listener: a WebSocket upgrade
    goes to ``ws``, every other request to ``http``, so one base URL serves all three APIs."""

    def __init__(self, http: FakeUpstream, ws: FakeResponsesWS) -> None:
        self.http, self.ws, self.port = http, ws, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (``url``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.abc.Stream) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                data = await stream.receive_some(_HEAD_LIMIT)
                if not data:
                    break
                head += data
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(stream)
            return
        self.received(head)
        wrapped = PrefixedStream(stream, head)
        if not _is_upgrade(head.partition(b"\r\n\r\n")[0]):
            await self.http.handle(wrapped)
            return
        try:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(
                    nursery, wrapped, max_message_size=self.ws.max_message_size)
                await self.ws.handle(request)
                nursery.cancel_scope.cancel()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            await trio.aclose_forcefully(wrapped)

    def received(self, head: bytes) -> None:
        """Called with each connection's first bytes, before it is dispatched."""


class CalibrationUpstream(OneOrigin):
    """The paced HTTP fake and WebSocket fake behind one listener."""

    def __init__(self, pacing: Pacing) -> None:
        self.pacing = pacing
        super().__init__(
            FakeUpstream(default=functools.partial(paced_reply, pacing=pacing)),
            FakeResponsesWS(turn_factory=functools.partial(paced_turn, pacing=pacing)))

    def received(self, head: bytes) -> None:
        """A calibration run may last long: keep only the fakes' recent bookkeeping."""
        for log in (self.http.requests, self.http.connections, self.ws.sockets):
            if len(log) > 1000:
                del log[:-100]


async def serve_fake_upstream(
    host: str, port: int, upstream: CalibrationUpstream,
    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``upstream`` on host:port until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, upstream.handle, listeners)
        task_status.started(bound)
