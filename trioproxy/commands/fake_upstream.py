"""``trioproxy fake-upstream``: serve the calibration upstream (:mod:`trioproxy.testing.calibration`)
with the pacing given on the command line."""

from __future__ import annotations

import argparse
import random
import re
import sys
from typing import Any

import trio

from ..testing.calibration import CalibrationUpstream, Pacing, serve_fake_upstream

__all__ = ["add_fake_upstream_parser", "parse_duration", "parse_fraction", "run_fake_upstream"]

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds from ``300ms``, ``0.3s``, ``250us`` (a bare number is seconds)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 300ms, 0.3s)")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_fraction(text: str) -> float:
    """A fraction from ``10%`` or ``0.1``, in [0, 1)."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 1:
        raise ValueError(f"jitter must be in [0, 100%): {text!r}")
    return value


EPILOG = """\
Point trioproxy (or a client, directly) at it, e.g.:
  trioproxy fake-upstream --port 9000 --ttft 300ms --itl 20ms --tokens 200 --jitter 10%
  trioproxy serve --port 8080 --anthropic-upstream http://127.0.0.1:9000 \\
                  --openai-upstream http://127.0.0.1:9000
Streams send the first token after --ttft, then one token every --itl; each pause is drawn
uniformly within +-jitter. What a client reports above that is the rig's (client, proxy, network).
"""


def add_fake_upstream_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fake-upstream`` on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "fake-upstream", help="serve a paced fake Anthropic/OpenAI upstream (calibration)",
        description="A calibration upstream: Messages, Chat Completions and Responses (SSE, "
                    "JSON and the Responses WebSocket) with known pacing and real-shaped usage.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on (9000; 0: any)")
    p.add_argument("--ttft", type=parse_duration, default=0.3, metavar="DUR",
                   help="time to the first token (300ms)")
    p.add_argument("--itl", type=parse_duration, default=0.02, metavar="DUR",
                   help="time between tokens (20ms)")
    p.add_argument("--tokens", type=int, default=200, help="output tokens per response (200)")
    p.add_argument("--jitter", type=parse_fraction, default=0.1, metavar="PCT",
                   help="each pause uniform within +-PCT of its value (10%%)")
    p.add_argument("--seed", type=int, help="seed the jitter, for a repeatable run")
    return p


def run_fake_upstream(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        print("trioproxy fake-upstream: --tokens must be at least 1", file=sys.stderr)
        return 2
    pacing = Pacing(args.ttft, args.itl, args.tokens, args.jitter, random.Random(args.seed))
    upstream = CalibrationUpstream(pacing)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_fake_upstream, args.host, args.port, upstream)
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"fake upstream on http://{host}:{port} (ttft {args.ttft * 1000:g} ms, itl "
                  f"{args.itl * 1000:g} ms, {args.tokens} tokens, jitter "
                  f"{args.jitter * 100:g} %)", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    return 0
