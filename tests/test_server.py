"""The app as users start it: `hypercorn trioproxy:app --worker-class trio`, the CLI, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from functools import partial

import httpx
import trio

from trioproxy import Settings, TrioProxy
from trioproxy.commands.cli import main as cli_main
from trioproxy.testing import FakeUpstream

HYPERCORN = os.path.join(os.path.dirname(sys.executable), "hypercorn")


async def _run_until_listening(cmd: list[str], env: dict[str, str], nursery: trio.Nursery):
    """Start a server process; return (process, base URL) once it prints where it listens."""
    proc = await nursery.start(
        partial(trio.run_process, cmd, env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, check=False, start_new_session=True)
    )
    seen = b""
    with trio.fail_after(30):
        async for chunk in proc.stderr:
            seen += chunk
            m = re.search(rb"Running on (https?://[\d.]+:\d+)", seen)
            if m:
                return proc, m.group(1).decode()
    raise AssertionError(f"server did not start: {seen.decode(errors='replace')}")


def _env(fake: FakeUpstream) -> dict[str, str]:
    """A server process's environment: both providers at the fake, no ledger."""
    return {**os.environ, "TRIOPROXY_ANTHROPIC_BASE_URL": fake.url,
            "TRIOPROXY_OPENAI_BASE_URL": fake.url, "TRIOPROXY_ACCOUNTING": "false"}


async def _stop(proc: trio.Process) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL if it lingers, each to the whole process
    group: no orphaned worker, even when the master is gone first."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with trio.move_on_after(10):
        await proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def test_hypercorn_command_as_written_serves_the_proxy(nursery: trio.Nursery) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    env = _env(fake)
    proc, url = await _run_until_listening(
        [HYPERCORN, "trioproxy:app", "--worker-class", "trio", "--bind", "127.0.0.1:0"], env, nursery
    )
    try:
        async with httpx.AsyncClient(timeout=20) as client:
            resp = await client.post(
                url + "/v1/chat/completions",
                headers={"authorization": "Bearer sk-test"},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert resp.status_code == 200
        assert resp.json()["object"] == "chat.completion"
        assert resp.headers["x-request-id"] and resp.headers["x-trioproxy-request-id"]
    finally:
        await _stop(proc)


async def test_non_trio_worker_refuses_to_start_with_instructions() -> None:
    messages: list[dict] = []
    incoming = [{"type": "lifespan.startup"}]

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        messages.append(message)

    def run_under_asyncio() -> None:
        asyncio.run(TrioProxy(Settings())({"type": "lifespan"}, receive, send))

    await trio.to_thread.run_sync(run_under_asyncio)
    assert messages[0]["type"] == "lifespan.startup.failed"
    assert "--worker-class trio" in messages[0]["message"]


def test_cli_help_answers_questions(capsys) -> None:
    try:
        cli_main(["serve", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for needle in ("--sse-keepalive", "--read-timeout", "TRIOPROXY_", "hypercorn trioproxy:app",
                   "--graceful-timeout", "TCP_USER_TIMEOUT"):
        assert needle in out


def test_cli_rejects_bad_configuration_before_starting(capsys) -> None:
    assert cli_main(["serve", "--openai-base-url", "not-a-url"]) == 2
    assert "TRIOPROXY_OPENAI_BASE_URL" in capsys.readouterr().err


async def test_serve_with_tls_speaks_http2_and_sends_usage_trailers(
    nursery: trio.Nursery, tmp_path
) -> None:
    import ssl

    import trustme

    from .h2client import h2_request

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    env = {**os.environ, "TRIOPROXY_DATABASE_URL": str(tmp_path / "usage.db")}
    trioproxy_bin = os.path.join(os.path.dirname(sys.executable), "trioproxy")
    proc, url = await _run_until_listening(
        [trioproxy_bin, "serve", "--port", "0", "--anthropic-base-url", fake.url,
         "--drain-grace", "0", "--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")],
        env, nursery,
    )
    try:
        assert url.startswith("https://")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        body = b'{"model":"claude-haiku-4-5","max_tokens":9,"stream":true,"messages":[]}'
        with trio.fail_after(20):
            resp = await h2_request(
                int(url.rsplit(":", 1)[1]), "POST", "/v1/messages",
                [("x-api-key", "sk-ant-x"), ("te", "trailers")], body, ssl_context=ctx,
            )
        assert resp.status == 200 and resp.ended
        assert resp.trailers and resp.trailers["x-usage-complete"] == "true"
    finally:
        await _stop(proc)


async def test_shutdown_is_logged_when_it_starts_and_when_it_ends(nursery: trio.Nursery) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    env = _env(fake)
    proc, _ = await _run_until_listening(
        [HYPERCORN, "trioproxy:app", "--worker-class", "trio", "--bind", "127.0.0.1:0"], env, nursery
    )
    proc.terminate()
    rest = b""
    try:
        with trio.fail_after(20):
            async for chunk in proc.stderr:
                rest += chunk
            await proc.wait()
    finally:
        await _stop(proc)
    text = rest.decode(errors="replace")
    assert re.search(r"trioproxy shutting down: \d+ requests in flight", text), text
    assert text.index("shutting down") < text.index("trioproxy stopped")
