"""The README's ``trioproxy latency`` example: a paced fake upstream, trioproxy in front of it,
a few dozen streamed requests per API, then the report and the plot.

Run: ``python docs/latency_example.py [--requests 24] [--out docs/latency.png]`` (needs the
``plot`` extra for the PNG). Everything runs in this process on loopback; the usage database is
a temporary SQLite file. Real time: about 20 s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trioproxy import Settings, TrioProxy
from trioproxy.commands.cli import main as cli
from trioproxy.testing import (
    FakeUpstream,
    RecordedRequest,
    Reply,
    anthropic_sse,
    default_reply,
    openai_chat_sse,
    openai_responses_sse,
)

# model -> (head latency s, time to the first token after the head s, inter-token gap s, tokens)
PACE = {
    "claude-sonnet-4-5": (0.30, 0.35, 0.025, 40),
    "gpt-4o-mini": (0.15, 0.10, 0.012, 60),
    "gpt-5": (0.40, 0.90, 0.030, 30),
}
rng = random.Random(12)


def paced_reply(req: RecordedRequest) -> Reply:
    """A streamed answer paced like a real provider (jittered head, TTFT and gaps)."""
    try:
        model = json.loads(req.body).get("model")
    except ValueError:
        model = None
    if model not in PACE:
        return default_reply(req)
    head, first, gap, n = PACE[model]
    words = [f" w{i}" for i in range(n)]
    gaps = [rng.expovariate(1 / gap) for _ in range(n)]
    gaps[0] = first * rng.uniform(0.6, 1.8)
    if model == "claude-sonnet-4-5":
        reply = anthropic_sse(words, model=model, gaps=[0, 0, 0, *gaps])
    elif model == "gpt-4o-mini":
        reply = openai_chat_sse(words, model=model, include_usage=True, gaps=[0, *gaps])
    else:
        reply = openai_responses_sse(words, model=model, gaps=[0, 0, 0, 0, *gaps])
    reply.before_headers = head * rng.uniform(0.7, 1.5)
    return reply


REQUESTS = {
    "claude-sonnet-4-5": ("/v1/messages", {"x-api-key": "sk-ant-example", "anthropic-version":
                                           "2023-06-01"},
                          {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}),
    "gpt-4o-mini": ("/v1/chat/completions", {"authorization": "Bearer sk-example"},
                    {"messages": [{"role": "user", "content": "hi"}]}),
    "gpt-5": ("/v1/responses", {"authorization": "Bearer sk-example"}, {"input": "hi"}),
}


async def drive(url: str, per_model: int) -> None:
    limit = trio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one(model: str) -> None:
            path, headers, body = REQUESTS[model]
            async with limit:
                resp = await http.post(path, headers=headers,
                                       json={"model": model, "stream": True, **body})
                resp.raise_for_status()

        async with trio.open_nursery() as nursery:
            for _ in range(per_model):
                for model in PACE:
                    nursery.start_soon(one, model)
                    await trio.sleep(0.05)


async def run(db: Path, per_model: int) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeUpstream(default=paced_reply)
        await nursery.start(fake.serve)
        settings = Settings(anthropic_base_url=fake.url, openai_base_url=fake.url,
                            accounting=True, database_url=str(db))
        app = TrioProxy(settings, configure_logging=False)
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = config.errorlog = None
        stop, stopped = trio.Event(), trio.Event()

        async def proxy(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        binds = await nursery.start(proxy)
        await drive(binds[0], per_model)
        stop.set()  # the lifespan shutdown flushes the usage records
        with trio.move_on_after(15):
            await stopped.wait()
        nursery.cancel_scope.cancel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24, help="streamed requests per model")
    ap.add_argument("--out", default=str(Path(__file__).with_name("latency.png")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "usage.db"
        trio.run(run, db, args.requests)
        print("$ trioproxy latency --since 1h", flush=True)
        code = cli(["latency", "--database-url", str(db), "--since", "1h"])
        print(f"\n$ trioproxy latency --by api --since 1h --plot {Path(args.out).name}",
              flush=True)
        return code or cli(["latency", "--database-url", str(db), "--by", "api", "--since", "1h",
                            "--plot", args.out])


if __name__ == "__main__":
    sys.exit(main())
