"""Shared bench plumbing: processes, ports, readiness, affinity, CPU/RSS sampling, stats, results.

Every script in bench/ imports this module (they are run as ``python bench/<name>.py``, so
``bench/`` is on ``sys.path``). Nothing here measures anything by itself and nothing asserts.

Process hygiene: every child is started through :class:`Procs` in its own session (process
group) and killed when the ``with`` block ends, whatever the reason; a SIGTERM to the bench is
turned into ``SystemExit`` so the ``finally`` clauses run; ``atexit`` is the last resort.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
HOST = "127.0.0.1"

# Core layout on the 2-core machine: the proxy under test alone on one core, the upstream and
# the load generator (this process) on the other. On a 1-core box pinning is skipped.
LOAD_CORE = 0
PROXY_CORE = 1

# The five paths, in report order.
PATHS = ["direct", "trioproxy", "trioproxy_ka", "streaming", "buffering"]
PATH_LABEL = {
    "direct": "direct (no proxy)",
    "trioproxy": "trioproxy",
    "trioproxy_ka": "trioproxy + SSE keepalive",
    "streaming": "conventional streaming (Starlette/uvicorn/httpx)",
    "buffering": "conventional buffering (Starlette/uvicorn/httpx)",
}
PROXIES = [p for p in PATHS if p != "direct"]


# -- affinity, limits -------------------------------------------------------------------------

def can_pin() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2 and {LOAD_CORE, PROXY_CORE} <= os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False


_PINNING = {"done": False}


def pin_self(core: int = LOAD_CORE) -> str:
    """Pin the calling process (the load generator) to ``core``; returns a description."""
    if not can_pin():
        return "not pinned (fewer than 2 usable cores)"
    os.sched_setaffinity(0, {core})
    _PINNING["done"] = True
    return f"pinned to core {core}"


def raise_nofile(want: int = 20000) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (inherited by children) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def export_revision(rev: str) -> str:
    """A temp directory holding ``trioproxy/`` as of git revision ``rev`` (for PYTHONPATH)."""
    out = tempfile.mkdtemp(prefix=f"trioproxy-{rev.replace('/', '_')}-")
    subprocess.run(f"git -C {ROOT} archive {rev} trioproxy | tar -x -C {out}", shell=True,
                   check=True)
    return out


# -- ports and readiness ----------------------------------------------------------------------

def free_port() -> int:
    """A port the kernel picked from 127.0.0.1:0 (closed again; the tiny race is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_probe(port: int, timeout: float = 2.0) -> bool:
    """True once something on the port answers an HTTP request with a status line.
    (A TCP connect is not enough: hypercorn's master binds before its worker is up.)"""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /bench-ready HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        if http_probe(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answering HTTP on {HOST}:{port} after {timeout} s")


# -- processes --------------------------------------------------------------------------------

_LIVE: dict[int, subprocess.Popen] = {}


def _kill(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the child's own session: it and its workers
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # hypercorn's worker lives in the same process group; make sure nothing of it survives
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    _LIVE.pop(proc.pid, None)


def _kill_all_live() -> None:
    for proc in list(_LIVE.values()):
        _kill(proc, grace=1.0)


atexit.register(_kill_all_live)


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _sigterm)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def sampler(self) -> ProcSampler:
        return ProcSampler(self.pid)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Procs:
    """Owns every child process of a bench script: ``with Procs() as procs: procs.spawn(...)``."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
        self.datadir = self.logdir / "data"
        self.datadir.mkdir()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            _kill(p.popen)
        self.procs.clear()

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        """Stop one child gracefully (e.g. so cProfile writes its output), then make sure."""
        if proc.popen.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _kill(proc.popen)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def spawn(
        self, name: str, argv: list[str], *, port: int, env: dict[str, str] | None = None,
        core: int | None = None, ready_timeout: float = 30.0,
    ) -> Proc:
        full_env = {k: v for k, v in os.environ.items()  # loopback only: no outbound proxies
                    if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        full_env["NO_PROXY"] = full_env["no_proxy"] = "127.0.0.1,localhost"
        full_env.update({"PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": str(self.datadir),
                         "PYTHONDONTWRITEBYTECODE": "1"})
        full_env.update(env or {})
        log = self.logdir / f"{name}.log"
        pin = core if core is not None and (_PINNING["done"] or can_pin()) else None

        def preexec() -> None:
            if pin is not None:
                os.sched_setaffinity(0, {pin})

        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                argv, cwd=self.logdir, env=full_env, stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
            )
        _LIVE[popen.pid] = popen
        proc = Proc(name, popen, port, log)
        self.procs.append(proc)
        try:
            wait_port(port, popen, ready_timeout)
        except Exception:
            print(f"[{name}] failed to start; log tail:\n{proc.tail()}", file=sys.stderr)
            raise
        return proc

    # -- the processes of the bench ---------------------------------------------------------

    def upstream(self, core: int | None = LOAD_CORE) -> Proc:
        port = free_port()
        return self.spawn("upstream", [PY, str(BENCH / "upstream.py"), "--port", str(port)],
                          port=port, core=core)

    def proxy(
        self, path: str, upstream_port: int, *, keepalive: float = 15.0,
        core: int | None = PROXY_CORE, profile: str | None = None,
        trioproxy_env: dict[str, str] | None = None,
    ) -> Proc:
        """Start the proxy of ``path`` in front of the upstream on ``upstream_port``."""
        port = free_port()
        base = f"http://{HOST}:{upstream_port}"
        if path in ("trioproxy", "trioproxy_ka"):
            env = {
                "TRIOPROXY_ANTHROPIC_BASE_URL": base,
                "TRIOPROXY_OPENAI_BASE_URL": base,
                "TRIOPROXY_LOG_LEVEL": "WARNING",
                "TRIOPROXY_ACCOUNTING": "false",
            }
            env.update(trioproxy_env or {})
            if path == "trioproxy_ka":
                env["TRIOPROXY_SSE_KEEPALIVE"] = repr(keepalive)
            else:
                env["TRIOPROXY_SSE_KEEPALIVE"] = "off"
            hyper = ["-m", "hypercorn", "trioproxy:app", "--worker-class", "trio",
                     "--bind", f"{HOST}:{port}"]
            src = os.environ.get("BENCH_TRIOPROXY_SRC")
            if src:  # a snapshot of the source instead of the (editable) working tree
                env["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
            if profile is not None:  # in-process worker, so the profiler sees the relay
                argv = [PY, "-m", "cProfile", "-o", profile, *hyper, "--workers", "0"]
            else:
                argv = [PY, *hyper]
        elif path in ("streaming", "buffering"):
            env = {"UPSTREAM": base}
            argv = [PY, str(BENCH / "peers" / f"{path}_proxy.py"), "--port", str(port)]
        else:
            raise ValueError(path)
        return self.spawn(path, argv, port=port, env=env, core=core)


@dataclass
class Target:
    """Where the load generator sends requests for one path, and the process to sample."""

    path: str
    port: int
    proc: Proc | None  # None for direct

    def sampler(self) -> ProcSampler | None:
        return self.proc.sampler() if self.proc else None


def start_paths(procs: Procs, paths: list[str], *, keepalive: float = 15.0,
                trioproxy_env: dict[str, str] | None = None) -> tuple[Proc, dict[str, Target]]:
    """One upstream (core 0) and one proxy per path (core 1). Returns (upstream, targets)."""
    up = procs.upstream()
    targets: dict[str, Target] = {}
    for path in paths:
        if path == "direct":
            targets[path] = Target(path, up.port, None)
        else:
            proc = procs.proxy(path, up.port, keepalive=keepalive, trioproxy_env=trioproxy_env)
            targets[path] = Target(path, proc.port, proc)
    return up, targets


# -- CPU / RSS sampling -----------------------------------------------------------------------

class ProcSampler:
    """CPU seconds and RSS of a process tree (hypercorn's master + its spawned worker)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> float:
        """CPU seconds of the tree: from /proc/PID/task/*/schedstat (nanoseconds on CPU) where
        available, since psutil's cpu_times tick at 10 ms, too coarse for short turns."""
        total = 0.0
        for p in self._tree():
            try:
                total += _schedstat_seconds(p.pid)
            except OSError:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        return total

    def rss(self) -> int:
        """Summed RSS of the tree."""
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def worker_rss(self) -> int:
        """RSS of the biggest process in the tree (hypercorn's worker, uvicorn itself)."""
        best = 0
        for p in self._tree():
            try:
                best = max(best, p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        return best

    def fds(self) -> int:
        n = 0
        for p in self._tree():
            try:
                n += p.num_fds()
            except psutil.NoSuchProcess:
                pass
        return n


def _schedstat_seconds(pid: int) -> float:
    """Time on CPU of every thread of ``pid`` (exited threads are not counted)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def self_cpu() -> float:
    """CPU seconds of this process (the load generator)."""
    try:
        return _schedstat_seconds(os.getpid())
    except OSError:
        t = os.times()
        return t.user + t.system


# -- stats ------------------------------------------------------------------------------------

def percentile(values: list[float] | Any, q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a list; None when empty."""
    if not len(values):
        return None
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summarize(values: list[float]) -> dict[str, Any]:
    """n, mean, p50, p90, p99, p99.9, max of a list (already in the unit wanted)."""
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {
        "n": len(s),
        "mean": sum(s) / len(s),
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "p999": percentile(s, 99.9),
        "max": s[-1],
    }


CDF_QS = [q / 2 for q in range(0, 199)] + [99.5, 99.7, 99.9, 99.95, 99.99, 100.0]


def cdf_points(values: list[float]) -> list[list[float]]:
    """A compact CDF: [[q, value], ...] at fixed quantiles (for plots without raw samples)."""
    if not values:
        return []
    s = sorted(values)
    return [[q, percentile(s, q)] for q in CDF_QS]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table for the terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# -- results ----------------------------------------------------------------------------------

def result_path(name: str, quick: bool) -> Path:
    return RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")


def machine_info() -> dict[str, Any]:
    import platform

    import h11
    import hypercorn
    import trio

    try:
        import httpx
        import starlette
        import uvicorn
        peers = {"httpx": httpx.__version__, "starlette": starlette.__version__,
                 "uvicorn": uvicorn.__version__}
    except ImportError:
        peers = {}
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "pinning": (f"proxy on core {PROXY_CORE}; upstream + load generator on core {LOAD_CORE}"
                    if _PINNING["done"] else "none"),
        "loadavg_at_start": os.getloadavg(),
        "versions": {"trio": trio.__version__, "h11": h11.__version__,
                     "hypercorn": getattr(hypercorn, "__version__", None) or _dist_version("hypercorn"),
                     **peers},
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "trioproxy": _SOURCE.get("info") or trioproxy_source(),
    }


def trioproxy_source() -> dict[str, Any]:
    """Which trioproxy the bench ran: the working tree (git HEAD + local edits) or a snapshot."""
    src = os.environ.get("BENCH_TRIOPROXY_SRC")
    info: dict[str, Any] = {"source": src or str(ROOT / "trioproxy")}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "trioproxy"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        info["git_head"] = head
        info["working_tree_changes_in_trioproxy"] = len(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def check_trioproxy_imports() -> None:
    """Fail early and clearly if the trioproxy under test does not import (others edit it)."""
    env = dict(os.environ)
    src = os.environ.get("BENCH_TRIOPROXY_SRC")
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([PY, "-c", "import trioproxy"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise SystemExit("trioproxy does not import, so it cannot be benchmarked "
                         "(set BENCH_TRIOPROXY_SRC to a snapshot, see bench/README.md):\n"
                         + res.stderr[-2000:])


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_result(name: str, quick: bool, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, quick)
    data = {"scenario": name, "quick": quick, "machine": machine_info(), **data}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.decode("latin-1")
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(type(o))


def load_result(name: str, quick: bool) -> dict[str, Any] | None:
    path = result_path(name, quick)
    if not path.exists():
        return None
    return json.loads(path.read_text())


class Progress:
    """Prints one line at most every ``every`` seconds (and always when forced)."""

    def __init__(self, label: str, every: float = 5.0) -> None:
        self.label = label
        self.every = every
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, msg: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            print(f"[{self.label} {now - self.t0:6.1f}s] {msg}", flush=True)


_SOURCE: dict[str, Any] = {}


def banner(title: str, quick: bool) -> None:
    install_signal_handlers()
    _SOURCE["info"] = trioproxy_source()  # as the proxies start, not when results are written
    pin = pin_self(LOAD_CORE)
    soft, _ = raise_nofile()
    print(f"== {title}{' (quick)' if quick else ''}: load generator {pin}; "
          f"RLIMIT_NOFILE={soft}; loadavg={os.getloadavg()[0]:.2f}", flush=True)


@dataclass
class Timer:
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class CpuMeter:
    """CPU seconds used by the load generator, the upstream and the proxy over a window."""

    def __init__(self, upstream: Proc | None, proxy: Proc | None) -> None:
        self.s = {"loadgen": None, "upstream": upstream.sampler() if upstream else None,
                  "proxy": proxy.sampler() if proxy else None}
        self.t0 = self._snap()
        self.wall0 = time.monotonic()

    def _snap(self) -> dict[str, float | None]:
        return {"loadgen": self_cpu(),
                **{k: (v.cpu() if v is not None else None) for k, v in self.s.items() if k != "loadgen"}}

    def delta(self) -> dict[str, float | None]:
        t1 = self._snap()
        out: dict[str, float | None] = {
            k: (t1[k] - self.t0[k]) if t1[k] is not None and self.t0[k] is not None else None
            for k in t1
        }
        out["wall"] = time.monotonic() - self.wall0
        return out


def per_k(value: float | None, n: int, k: int = 1000) -> float | None:
    """``value`` per ``k`` units of ``n`` (e.g. CPU seconds per 1,000 events)."""
    if value is None or not n:
        return None
    return value / n * k


def ms(values: list[float]) -> list[float]:
    return [v * 1000.0 for v in values]
