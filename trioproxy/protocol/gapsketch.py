"""A compact, mergeable summary of a response's inter-token gaps (a DDSketch). Pure.

Each gap (in milliseconds) is counted in a logarithmic bucket: bucket ``k`` holds the gaps in
(γ^(k-1), γ^k] with γ = (1 + α) / (1 - α), α = :data:`RELATIVE_ACCURACY` (1 %), and stands for
them as 2 γ^k / (γ + 1), which is within α of every gap in it. Gaps under :data:`MIN_MS` (events
that arrived in the same chunk: 0) are counted apart and stand as 0. Adding two sketches adds
their counts, so sketches of many responses merge into the sketch of all their gaps, and any
rank of the pooled gaps reads back within 1 % of the exact gap at that rank (Masson, Rim and
Lee, *DDSketch*, VLDB 2019). :meth:`GapSketch.percentile` interpolates between the two ranks
around a percentile as :func:`trioproxy.protocol.latency.percentile` (numpy's default) does, so
it too is within 1 % of the exact percentile of all the gaps.

Stored as text (the usage record's ``itl_sketch`` column), e.g. ``"1;2;150:23,19,4,3:1"``:

- ``1``: the format version;
- ``2``: the number of gaps under :data:`MIN_MS`;
- then the buckets in ascending key order, comma-separated: ``d:c`` is the bucket ``d`` keys
  above the previous one (the first is relative to 0, so it is the key itself) with ``c`` gaps;
  a bare ``c`` is the next key (previous + 1). So the text above is bucket 150 (23 gaps), 151
  (19), 152 (4) and 155 (1), plus 2 zero gaps. An empty body means no bucket.

A response of 200 tokens paced at 20 ms ± 10 % fills about ten buckets (~40 bytes).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["GAMMA", "MIN_MS", "RELATIVE_ACCURACY", "GapSketch", "merge_sketches"]

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
MIN_MS = 0.001  # 1 µs: gaps below it count as 0
_LOG_GAMMA = math.log(GAMMA)
_VERSION = "1"


def _key(ms: float) -> int:
    return math.ceil(math.log(ms) / _LOG_GAMMA)


def _value(key: int) -> float:
    return 2.0 * GAMMA**key / (GAMMA + 1.0)


class GapSketch:
    """Counts of gaps (milliseconds) per logarithmic bucket; see the module docs."""

    __slots__ = ("buckets", "zeros")

    def __init__(self) -> None:
        self.zeros = 0
        self.buckets: dict[int, int] = {}

    @property
    def count(self) -> int:
        """The number of gaps counted."""
        return self.zeros + sum(self.buckets.values())

    def __bool__(self) -> bool:
        return bool(self.zeros or self.buckets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GapSketch):
            return NotImplemented
        return self.zeros == other.zeros and self.buckets == other.buckets

    def __repr__(self) -> str:
        return f"GapSketch.decode({self.encode()!r})"

    def add(self, ms: float) -> None:
        """Count one gap of ``ms`` milliseconds."""
        if ms < MIN_MS:
            self.zeros += 1
            return
        if not math.isfinite(ms):  # NaN or infinite: not a gap
            return
        key = _key(ms)
        self.buckets[key] = self.buckets.get(key, 0) + 1

    def add_sorted_seconds(self, gaps: Sequence[float]) -> None:
        """Count ``gaps`` given in seconds and sorted ascending: one logarithm and one binary
        search per bucket rather than work per gap (the relay's per-response cost)."""
        buckets = self.buckets
        n = len(gaps)
        i = bisect_left(gaps, MIN_MS / 1000.0)
        self.zeros += i
        while i < n:
            ms = gaps[i] * 1000.0
            if not math.isfinite(ms):  # NaN or infinite (sorted last): not gaps
                break
            key = _key(ms)
            j = bisect_right(gaps, GAMMA**key / 1000.0, i + 1)  # past the bucket's top
            buckets[key] = buckets.get(key, 0) + (j - i)
            i = j

    def merge(self, other: GapSketch) -> GapSketch:
        """Add ``other``'s counts to this sketch (in place); returns self."""
        self.zeros += other.zeros
        buckets = self.buckets
        for key, n in other.buckets.items():
            buckets[key] = buckets.get(key, 0) + n
        return self

    def items(self) -> list[tuple[float, int]]:
        """(value in ms, count) per non-empty bucket, ascending; the zero gaps first as 0.0.
        For CDFs, histograms or a weighted bootstrap."""
        out = [(0.0, self.zeros)] if self.zeros else []
        out += [(_value(k), self.buckets[k]) for k in sorted(self.buckets)]
        return out

    def values(self) -> Iterator[float]:
        """Every gap's stand-in value (ms), ascending (``count`` values)."""
        for value, n in self.items():
            for _ in range(n):
                yield value

    def percentiles(self, qs: Sequence[float]) -> list[float | None]:
        """Percentiles (``qs`` in [0, 100], any order) in ms, each within 1 % of the exact
        percentile (linear interpolation between closest ranks) of the gaps counted; None
        for every q when the sketch is empty."""
        n = self.count
        if n == 0:
            return [None] * len(qs)
        wanted: set[int] = set()
        spots = []
        for q in qs:
            pos = (n - 1) * min(max(float(q), 0.0), 100.0) / 100.0
            lo = math.floor(pos)
            hi = min(lo + 1, n - 1)
            spots.append((lo, hi, pos - lo))
            wanted.update((lo, hi))
        at = self._ranks(sorted(wanted))
        return [at[lo] + (at[hi] - at[lo]) * frac for lo, hi, frac in spots]

    def percentile(self, q: float) -> float | None:
        """One percentile (see :meth:`percentiles`)."""
        return self.percentiles((q,))[0]

    def _ranks(self, ranks: list[int]) -> dict[int, float]:
        """The stand-in value of the gap at each 0-based rank in ``ranks`` (ascending)."""
        out: dict[int, float] = {}
        it = iter(ranks)
        rank = next(it, None)
        seen = 0
        for value, n in self.items():
            seen += n
            while rank is not None and rank < seen:
                out[rank] = value
                rank = next(it, None)
            if rank is None:
                break
        return out

    def encode(self) -> str:
        """The stored text (see the module docs)."""
        parts = []
        prev = 0
        for key in sorted(self.buckets):
            n = self.buckets[key]
            parts.append(str(n) if key - prev == 1 and parts else f"{key - prev}:{n}")
            prev = key
        return f"{_VERSION};{self.zeros};{','.join(parts)}"

    @classmethod
    def decode(cls, text: str) -> GapSketch:
        """The sketch of :meth:`encode`'s text; ValueError when it is not one."""
        version, zeros, body = text.split(";")
        if version != _VERSION:
            raise ValueError(f"unknown gap sketch version {version!r}")
        sketch = cls()
        sketch.zeros = _count(zeros, allow_zero=True)
        prev = 0
        first = True
        for part in body.split(",") if body else ():
            delta_text, sep, n_text = part.rpartition(":")
            delta = int(delta_text) if sep else 1
            if not first and delta < 1:
                raise ValueError("gap sketch keys must ascend")
            if first and not sep:
                raise ValueError("gap sketch's first bucket needs its key")
            prev += delta
            sketch.buckets[prev] = _count(n_text)
            first = False
        return sketch

    @classmethod
    def from_ms(cls, gaps: Iterable[float]) -> GapSketch:
        """A sketch of ``gaps`` in ms (any order)."""
        sketch = cls()
        for gap in gaps:
            sketch.add(gap)
        return sketch


def _count(text: str, *, allow_zero: bool = False) -> int:
    n = int(text)
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError(f"bad gap sketch count {text!r}")
    return n


def merge_sketches(sketches: Iterable[GapSketch | str | None]) -> GapSketch:
    """One sketch of all the gaps of ``sketches`` (sketches or their stored text; None and
    text that does not decode are skipped)."""
    out = GapSketch()
    for item in sketches:
        if item is None:
            continue
        if isinstance(item, str):
            try:
                item = GapSketch.decode(item)
            except ValueError:
                continue
        out.merge(item)
    return out
