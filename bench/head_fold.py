"""Response-head parsing cost with obsolete line folding, against an unfolded head of the same
size and against h11, in one run (pure CPU, no network, ~5 s).

A hostile upstream can send a head of up to 256 KiB (``http11.MAX_HEAD``) made of one field
folded over thousands of continuation lines. Joining them by appending to a growing ``bytes``
is quadratic; the parser joins each field's pieces once. The figure to read is the ratio
folded ÷ flat (same bytes, no folding): about 1 when the join is linear, growing with the size
when it is not. The same ratio for h11 (which joins in a ``bytearray``) is the reference.
A second table times the join alone against the append-to-``bytes`` join used before.

Run: ``python bench/head_fold.py [--repeat 7]``. Prints medians and ratios; the machine may be
shared, so only ratios taken in the same run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import h11

from trioproxy.upstream.http11 import _unfold, parse_response_head


def folded_head(size: int) -> bytes:
    lines = (size - 40) // 4
    return b"HTTP/1.1 200 OK\r\nx: a\r\n" + b" b\r\n" * lines + b"\r\n"


def flat_head(size: int) -> bytes:
    lines = (size - 20) // 6
    return b"HTTP/1.1 200 OK\r\n" + b"x: b\r\n" * lines + b"\r\n"


def ours(raw: bytes) -> None:
    assert parse_response_head(raw) is not None


def with_h11(raw: bytes) -> None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(raw) + 1)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    assert type(conn.next_event()) is h11.Response


def median_time(fn: Callable[[bytes], object], raw: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(raw)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def append_join(lines: list[bytes]) -> list[bytes]:
    """The join trioproxy used before: each continuation appended to a growing ``bytes``."""
    folded: list[bytes] = []
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            folded[-1] += b" " + line.lstrip(b" \t")
        else:
            folded.append(line)
    return folded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"{'head':>8} {'parser':>10} {'folded ms':>10} {'flat ms':>9} {'folded/flat':>12}")
    for kib in (16, 64, 255):
        size = kib * 1024
        folded, flat = folded_head(size), flat_head(size)
        for name, fn in (("trioproxy", ours), ("h11", with_h11)):
            a = median_time(fn, folded, args.repeat)  # interleaved: folded, flat, per parser
            b = median_time(fn, flat, args.repeat)
            print(f"{kib:>5}KiB {name:>10} {a * 1e3:>10.2f} {b * 1e3:>9.2f} {a / b:>12.2f}")
    print(f"\n{'head':>8} {'unfold ms':>10} {'append ms':>10} {'append/unfold':>14}  (join only)")
    for kib in (16, 64, 255):
        lines = folded_head(kib * 1024).split(b"\n")[1:-2]
        a = median_time(_unfold, lines, args.repeat)  # type: ignore[arg-type]
        b = median_time(append_join, lines, args.repeat)  # type: ignore[arg-type]
        assert _unfold(lines) == append_join(lines)
        print(f"{kib:>5}KiB {a * 1e3:>10.2f} {b * 1e3:>10.2f} {b / a:>14.1f}")


if __name__ == "__main__":
    main()
