"""Settings: one declaration gives flags, TRIOPROXY_* variables, TOML keys, --help and the
README's table; the three sources agree; the file is validated; ``trioproxy serve`` hands
Hypercorn the limits the settings name."""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import wsproto
from hypercorn.trio import serve
from wsproto.events import AcceptConnection, CloseConnection, Message, Request

from trioproxy import TrioProxy
from trioproxy.commands.cli import build_config, settings_from_args
from trioproxy.commands.cli import main as cli_main
from trioproxy.config import SPECS, ConfigError, Settings
from trioproxy.config.spec import Spec, markdown_table, read_config_file
from trioproxy.contrib.model_alias import ModelAlias
from trioproxy.extensions import load_spec
from trioproxy.log import LOGGERS, log_access, request_id_var, setup_logging
from trioproxy.protocol.headers import hypercorn_head_limit
from trioproxy.testing import FakeUpstream
from trioproxy.testing.websocket import FakeResponsesWS

ROOT = Path(__file__).resolve().parent.parent
SECRETS = [s for s in SPECS if s.secret]


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trioproxy")
    sub = parser.add_subparsers(dest="command")
    from trioproxy.commands.cli import _add_serve

    _add_serve(sub)
    return parser.parse_args(["serve", *argv])


def from_flags(*argv: str) -> Settings:
    return settings_from_args(_serve_args(*argv), env={})[0]


def from_file(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "trioproxy.toml"
    path.write_text(text)
    return Settings.from_env({"TRIOPROXY_CONFIG": str(path)})


def toml_literal(spec: Spec, text: str) -> str:
    if spec.kind == "mapping":
        return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}"
                               for k, v in json.loads(text).items()) + "}"
    if spec.kind in ("int", "float") or (spec.kind == "seconds_or_off" and text != "off"):
        return text
    if spec.kind == "bool":
        return text.lower()
    return json.dumps(text)


def flag_argv(spec: Spec, text: str) -> list[str]:
    if spec.kind == "bool":
        return [spec.flag if text == "true" else f"--no-{spec.flag[2:]}"]
    return [spec.flag, text]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_flag_environment_and_file_give_the_same_value(spec: Spec, tmp_path: Path) -> None:
    overrides = {"keyfile": "/k.pem"} if spec.name == "certfile" else \
        {"certfile": "/c.pem"} if spec.name == "keyfile" else \
        {"admin_token": "adm"} if spec.name == "metrics_require_token" else {}
    env_extra = {f"TRIOPROXY_{k.upper()}": v for k, v in overrides.items()}
    by_env = Settings.from_env({spec.env: spec.example, **env_extra})
    args = _serve_args(*flag_argv(spec, spec.example))
    by_flag = settings_from_args(args, env=env_extra)[0]
    path = tmp_path / "c.toml"
    path.write_text(f"{spec.name} = {toml_literal(spec, spec.example)}\n")
    by_file = Settings.from_env({"TRIOPROXY_CONFIG": str(path), **env_extra})
    value = getattr(by_env, spec.name)
    assert getattr(by_flag, spec.name) == value == getattr(by_file, spec.name)
    assert value != spec.default  # the example really exercises the source


@pytest.mark.parametrize("spec", SECRETS, ids=lambda s: s.name)
def test_secrets_come_from_files_in_every_source(spec: Spec, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(spec.example + "\n")
    by_env = Settings.from_env({spec.env + "_FILE": str(secret)})
    by_flag = from_flags(spec.flag + "-file", str(secret))
    by_file = from_file(tmp_path, f"{spec.name}_file = {json.dumps(str(secret))}\n")
    assert getattr(by_env, spec.name) == getattr(by_flag, spec.name) == \
        getattr(by_file, spec.name) == spec.example
    assert spec.example not in repr(by_env)  # secrets stay out of reprs (and so of logs)


def test_a_secret_and_its_file_variant_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    with pytest.raises(ConfigError, match="TRIOPROXY_ADMIN_TOKEN or TRIOPROXY_ADMIN_TOKEN_FILE"):
        Settings.from_env({"TRIOPROXY_ADMIN_TOKEN": "a",
                           "TRIOPROXY_ADMIN_TOKEN_FILE": str(tmp_path / "t")})
    with pytest.raises(ConfigError, match="TRIOPROXY_ADMIN_TOKEN_FILE: cannot read"):
        Settings.from_env({"TRIOPROXY_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("connect_timeout = 3\nread_timeout = 4\nwrite_timeout = 5\n")
    env = {"TRIOPROXY_CONFIG": str(path), "TRIOPROXY_CONNECT_TIMEOUT": "13",
           "TRIOPROXY_READ_TIMEOUT": "14"}
    settings, exported = settings_from_args(_serve_args("--connect-timeout", "23"), env=env)
    assert (settings.connect_timeout, settings.read_timeout, settings.write_timeout,
            settings.pool_timeout) == (23.0, 14.0, 5.0, Settings().pool_timeout)
    assert exported == {"TRIOPROXY_CONNECT_TIMEOUT": "23"}  # what worker processes read


def test_every_setting_has_a_variable_a_flag_in_help_and_a_readme_row(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    for spec in SPECS:
        assert spec.env == f"TRIOPROXY_{spec.name.upper()}"
        assert re.search(rf"{re.escape(spec.flag)}\b.*?\[{spec.env}[;\]]", help_text), spec.name
        assert f"| `{spec.name}` | `{spec.env}` |" in readme
    assert "--config FILE" in help_text and "[TRIOPROXY_CONFIG]" in help_text


def test_readme_table_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    """Regenerate with `trioproxy config --markdown` between the README's markers."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings:start -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert cli_main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == table.strip() == markdown_table(SPECS)


@pytest.mark.parametrize(("text", "needles"), [
    ("conect_timeout = 3\n", ["unknown key 'conect_timeout'", "did you mean connect_timeout"]),
    ("port = \"80\"\n", ["port must be an integer, got '80'"]),
    ("port = 70000\n", ["port must be a port number"]),
    ("log_format = \"yaml\"\n", ["log_format must be one of text, json"]),
    ("openai_base_url = \"api.openai.com\"\n", ["openai_base_url must be an http"]),
    ("model_aliases = [1]\n", ["model_aliases must be a table of strings"]),
    ("host_file = \"/x\"\n", ["unknown key 'host_file'"]),
    ("port = \n", ["not valid TOML"]),
])
def test_config_file_errors_name_the_file_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        from_file(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"config file {tmp_path / 'trioproxy.toml'}")
    for needle in needles:
        assert needle in message


def test_serve_refuses_a_bad_file_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.toml").write_text("workers = 0\n")
    assert cli_main(["serve", "--config", str(tmp_path / "c.toml")]) == 2
    assert "workers must be a positive integer or auto, got 0" in capsys.readouterr().err


@pytest.fixture
def five_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process may run on 5 CPUs (of however many the machine has)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 5, 7}, raising=False)


def test_workers_auto_is_one_per_cpu_this_process_may_run_on_from_every_source(
    tmp_path: Path, five_cpus: None
) -> None:
    by_flag, exported = settings_from_args(_serve_args("--workers", "auto"), env={})
    by_env = Settings.from_env({"TRIOPROXY_WORKERS": "auto"})
    by_file = from_file(tmp_path, 'workers = "auto"\n')
    assert by_flag.workers == by_env.workers == by_file.workers == 5
    assert Settings.from_env(workers="AUTO").workers == 5  # typed callers too
    assert build_config(by_flag.replace(port=0)).workers == 5  # Hypercorn gets the number
    assert exported == {"TRIOPROXY_WORKERS": "auto"}


def test_workers_auto_without_an_affinity_mask_is_the_cpu_count(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert Settings.from_env({"TRIOPROXY_WORKERS": "auto"}).workers == 3


@pytest.mark.parametrize("bad", ["0", "-2", "many", "2.5", ""])
def test_a_bad_workers_value_names_the_setting_and_what_is_allowed(
    tmp_path: Path, bad: str
) -> None:
    allowed = "must be a positive integer or auto"
    with pytest.raises(ConfigError, match=f"TRIOPROXY_WORKERS {allowed}, got {bad!r}"):
        Settings.from_env({"TRIOPROXY_WORKERS": bad})
    with pytest.raises(ConfigError, match=f"--workers \\(TRIOPROXY_WORKERS\\) {allowed}"):
        from_flags("--workers", bad)
    literal = json.dumps(bad) if not bad.lstrip("-").isdigit() else bad
    with pytest.raises(ConfigError, match=f"trioproxy.toml: workers {allowed}"):
        from_file(tmp_path, f"workers = {literal}\n")


def test_config_command_prints_the_settings_in_effect_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text('admin_token = "hunter2"\nport = 9000\n')
    monkeypatch.setenv("TRIOPROXY_LOG_FORMAT", "json")
    assert cli_main(["config", "--config", str(tmp_path / "c.toml")]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and 'admin_token = "***"' in out
    printed = read_config_file(SPECS, _write(tmp_path / "out.toml", out.replace('"***"', '"x"')))
    assert printed["port"] == 9000 and printed["log_format"] == "json"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_shipped_example_config_is_valid() -> None:
    values = read_config_file(SPECS, str(ROOT / "contrib" / "trioproxy.toml"))
    assert values["log_format"] == "json" and values["workers"] == 2


def test_model_aliases_come_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text('[model_aliases]\nfast = "claude-haiku-4-5"\n')
    monkeypatch.setenv("TRIOPROXY_CONFIG", str(tmp_path / "c.toml"))
    loaded = load_spec("trioproxy.contrib.model_alias:ModelAlias", Settings.from_env())
    assert isinstance(loaded, ModelAlias) and loaded.aliases == {"fast": "claude-haiku-4-5"}
    assert ModelAlias.from_settings(Settings(model_aliases={"a": "b"})).aliases == {"a": "b"}


def test_serve_hands_hypercorn_the_limits_and_socket_options() -> None:
    settings = Settings(port=0, tcp_user_timeout=45, ws_max_message_size=1000,
                        max_header_bytes=70000, workers=3, keep_alive=5)
    config = build_config(settings)
    sockets = config.create_sockets()
    try:
        (sock,) = sockets.insecure_sockets
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 45_000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
    assert config.read_timeout is None and config.graceful_timeout == 600.0
    assert config.worker_class == "trio" and config.application_path == "trioproxy:app"
    assert (config.workers, config.keep_alive_timeout) == (3, 5)
    assert config.websocket_max_message_size == 1000
    assert config.h2_max_header_list_size == 70000
    assert config.h11_max_incomplete_size == hypercorn_head_limit(70000)


# -- end to end: the Hypercorn config `trioproxy serve` builds, on loopback ---------------------


async def _serve(nursery: trio.Nursery, settings: Settings,
                 app: TrioProxy | None = None) -> tuple[int, Callable[[], None]]:
    app = app or TrioProxy(settings, configure_logging=False)
    config = build_config(settings.replace(host="127.0.0.1", port=0))
    config.errorlog = None
    config.graceful_timeout = 1.0
    stop = trio.Event()
    binds = await nursery.start(lambda task_status: serve(
        app, config, shutdown_trigger=stop.wait, task_status=task_status))
    return int(binds[0].rsplit(":", 1)[1]), stop.set


async def _head_status(port: int, head: bytes, write_size: int) -> int | None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    try:
        for i in range(0, len(head), write_size):
            await stream.send_all(head[i:i + write_size])
            await trio.sleep(0.01)  # separate TCP segments
    except trio.BrokenResourceError:
        pass
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        await stream.aclose()
        return event.status_code if isinstance(event, h11.Response) else None


def _head(size: int) -> bytes:
    start = b"GET /v1/models HTTP/1.1\r\nhost: proxy.test\r\n"
    filler = b"x-filler: " + b"a" * (size - len(start) - 14) + b"\r\n"
    return start + filler + b"\r\n"


async def test_request_head_limit_holds_whatever_the_segmentation(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    with trio.fail_after(20):
        settings = Settings(anthropic_base_url=upstream.url, openai_base_url=upstream.url,
                            accounting=False, max_header_bytes=8192)
        port, stop = await _serve(nursery, settings)
        assert await _head_status(port, _head(12000), 1024) == 431
        assert await _head_status(port, _head(6000), 1024) != 431
        stop()


async def test_oversized_websocket_message_is_refused_with_1009_while_it_arrives(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(20):
        fake = await nursery.start(FakeResponsesWS().serve)
        settings = Settings(openai_base_url=fake.base_url, accounting=False,
                            ws_max_message_size=64 * 1024)
        port, stop = await _serve(nursery, settings)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(
            host="proxy.test", target="/v1/responses",
            extra_headers=[(b"authorization", b"Bearer sk-test-ws")])))
        events: list[Any] = []
        while not any(isinstance(e, AcceptConnection) for e in events):
            ws.receive_data(await stream.receive_some(65536))
            events.extend(ws.events())
        # 96 KiB of one message, never finished: the close must come before the message ends
        for _ in range(6):
            await stream.send_all(ws.send(Message(data="x" * 16384, message_finished=False)))
        closes: list[CloseConnection] = []
        while not closes:
            data = await stream.receive_some(65536)
            assert data, "connection dropped without a close frame"
            ws.receive_data(data)
            closes = [e for e in ws.events() if isinstance(e, CloseConnection)]
        assert closes[0].code == 1009
        await stream.aclose()
        stop()


async def test_plain_hypercorn_reads_the_config_file_named_in_the_environment(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(20):
        (tmp_path / "c.toml").write_text(
            f'anthropic_base_url = "{upstream.url}/from-file"\naccounting = false\n')
        monkeypatch.setenv("TRIOPROXY_CONFIG", str(tmp_path / "c.toml"))
        port, stop = await _serve(nursery, Settings(), TrioProxy(configure_logging=False))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        body = b'{"model":"m","max_tokens":1,"messages":[]}'
        await stream.send_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: p\r\nx-api-key: k\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await stream.receive_some(65536)
        await stream.aclose()
        assert upstream.requests[-1].path.startswith("/from-file/v1/messages")
        stop()


# -- log format ------------------------------------------------------------------------------


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate,
                    logging.getLogger(name).level) for name in LOGGERS}
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def test_json_log_format_makes_every_line_one_json_object(
    capsys: pytest.CaptureFixture[str], restore_loggers: None
) -> None:
    setup_logging("INFO", "json")
    setup_logging("INFO")  # what the app calls at start-up: keeps the process's format
    token = request_id_var.set("tp_123")
    try:
        log_access({"id": "tp_123", "method": "POST", "status": 200, "end": "complete"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("trioproxy.relay").exception("proxy fault")
    finally:
        request_id_var.reset(token)
    logging.getLogger("hypercorn.error").info("Running on http://127.0.0.1:8080")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 3
    access, fault, server = lines
    assert access["logger"] == "trioproxy.access" and access["request_id"] == "tp_123"
    assert (access["method"], access["status"], access["end"]) == ("POST", 200, "complete")
    assert fault["level"] == "ERROR" and "ValueError: boom" in fault["exc"]
    assert server["logger"] == "hypercorn.error" and server["message"].startswith("Running on")
    assert all(line["ts"].endswith("Z") for line in lines)


def test_text_log_format_keeps_the_readable_access_line(
    capsys: pytest.CaptureFixture[str], restore_loggers: None
) -> None:
    setup_logging("INFO", "text")
    log_access({"id": "tp_1", "status": 200})
    (line,) = capsys.readouterr().err.splitlines()
    prefix, _, fields = line.partition(" access ")
    assert "INFO trioproxy.access" in prefix and json.loads(fields) == {"id": "tp_1",
                                                                        "status": 200}


def test_serve_routes_hypercorn_lines_through_the_json_handler() -> None:
    assert build_config(Settings(log_format="json")).errorlog is logging.getLogger(
        "hypercorn.error")
    assert build_config(Settings()).errorlog == "-"


def test_a_base_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(openai_base_url="https://user:hunter2secret@api.example.test/v1")
    assert "credentials" in str(caught.value) and "hunter2secret" not in str(caught.value)
