"""`trioproxy serve` as a process supervisor: a worker never dies with usage records in memory
because of a late SIGTERM, a crashed worker is replaced (not a reason to stop serving), and
workers never outlive their parent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from functools import partial

import httpx
import trio

from .process_guard import children
from .test_health_drain import AUTH, BIN, CHAT, Spawned, metric, server_env
from .test_store import count_rows
from .test_store_outage import TcpRelay, pg_url, relay, via  # noqa: F401 - fixtures

SERVE = [os.path.join(BIN, "trioproxy"), "serve", "--port", "0", "--drain-grace", "0",
         "--drain-notice", "0"]


async def post(url: str) -> int:
    async with httpx.AsyncClient() as client:
        resp = await client.post(url + "/v1/chat/completions", headers=dict(AUTH), content=CHAT)
    return resp.status_code


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_workers_exit_when_their_parent_is_killed(nursery, upstream) -> None:
    """SIGKILL (or the OOM killer) on the parent: its workers stop within a second or two
    and free the port, instead of lingering as orphans."""
    server = Spawned()
    await server.start(nursery, [*SERVE, "--workers", "2"], server_env(upstream), listeners=2)
    try:
        workers = list(children(server.proc.pid))
        assert len(workers) >= 2
        os.kill(server.proc.pid, signal.SIGKILL)
        with trio.fail_after(10):
            while any(alive(pid) for pid in workers):
                await trio.sleep(0.05)
        assert port_free(server.port)
    finally:
        await server.stop()


async def test_a_crashed_worker_is_restarted_and_counted(nursery, upstream) -> None:
    server = Spawned()
    await server.start(nursery, [*SERVE, "--workers", "2"], server_env(upstream), listeners=2)
    try:
        victim = next(pid for pid, cmd in sorted(children(server.proc.pid).items())
                      if "resource_tracker" not in cmd)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(20):
            while server.stderr.count(b"trioproxy ready") < 3:  # a third worker came up
                assert server.proc.returncode is None, server.stderr.decode(errors="replace")
                await trio.sleep(0.05)
            assert re.search(rf"worker {victim} died \(exit code -9\); starting a new one"
                             .encode(), server.stderr)
            for _ in range(6):  # fresh connections: both workers answer
                assert await post(server.url) == 200
            texts = []
            for _ in range(4):
                async with httpx.AsyncClient() as client:
                    texts.append((await client.get(server.url + "/metrics")).text)
        assert all(metric(t, "trioproxy_worker_restarts") == 1 for t in texts)
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await server.proc.wait() == 0
    finally:
        await server.stop()


async def test_sigterm_during_the_final_flush_does_not_lose_records(
    nursery, upstream, relay: TcpRelay, pg_url: str, tmp_path,  # noqa: F811 - fixtures
) -> None:
    """The drain is over, the worker is flushing records the (briefly unreachable) ledger has
    not taken yet, and the process group gets SIGTERM again (systemd's stop, a second Ctrl-C):
    the worker finishes the flush and every record lands."""
    relay.cut()
    server = Spawned()
    env = server_env(upstream, TRIOPROXY_ACCOUNTING="true", TRIOPROXY_DATA_HOME=str(tmp_path),
                     TRIOPROXY_DATABASE_URL=via(relay, pg_url), TRIOPROXY_STORE_TIMEOUT="2",
                     TRIOPROXY_USAGE_SPILL_AFTER="60", TRIOPROXY_FINGERPRINT_SECRET="s")
    await server.start(nursery, SERVE, env)
    try:
        with trio.fail_after(40):
            for _ in range(3):
                assert await post(server.url) == 200
            while b"usage store unavailable" not in server.stderr:
                await trio.sleep(0.05)
            os.killpg(server.proc.pid, signal.SIGTERM)
            while not re.search(rb"shutting down: \d+ requests in flight, 3 usage records",
                                server.stderr):
                await trio.sleep(0.02)
            os.killpg(server.proc.pid, signal.SIGTERM)  # while the writer still holds them
            await trio.sleep(0.5)
            relay.restore()
            assert await server.proc.wait() == 0, server.stderr.decode(errors="replace")
        assert count_rows(pg_url) == 3
        assert b"trioproxy stopped" in server.stderr
    finally:
        await server.stop()


async def test_a_worker_failing_at_start_up_stops_serve_instead_of_a_restart_loop(
    nursery, upstream
) -> None:
    server = Spawned()
    env = server_env(upstream, TRIOPROXY_EXTENSIONS="no_such_module_here:Extension")
    with trio.fail_after(30):
        proc = await nursery.start(partial(
            trio.run_process, [*SERVE, "--workers", "2"], env=env, stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, check=False, start_new_session=True))
        server.proc = proc
        try:
            err = b""
            async for chunk in proc.stderr:
                err += chunk
            assert await proc.wait() != 0
        finally:
            await server.stop()
    assert b"during start-up; stopping" in err
    assert b"starting a new one" not in err


def test_a_worker_starts_while_a_sibling_is_creating_its_metrics_file(
    tmp_path, monkeypatch
) -> None:
    """Workers start together: one may find another's multiprocess metrics file just created,
    still empty. That must not fail its start-up (it did, one start in a few dozen)."""
    from trioproxy.metrics import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "counter_999999.db").write_bytes(b"")  # a sibling's file, not written yet
    metrics = Metrics(multiprocess=True)  # raised struct.error reading the empty file
    (tmp_path / "counter_999999.db").unlink()  # by scrape time it is a real file (or gone)
    assert metrics.render()[1].startswith("text/plain")


def test_a_scrape_while_a_worker_is_creating_its_metrics_file_answers(
    tmp_path, monkeypatch
) -> None:
    """A restarted worker creates its files while another worker answers a scrape."""
    from trioproxy.metrics import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics(multiprocess=True)
    (tmp_path / "gauge_livesum_999998.db").write_bytes(b"")  # created, not yet sized
    assert metrics.render()[1].startswith("text/plain")  # raised struct.error
