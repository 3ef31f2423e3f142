"""``trioproxy`` command line: ``serve`` (Hypercorn tuned for long streams), ``usage``,
``latency`` and ``fake-upstream`` (a paced calibration upstream)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence

from .. import __version__
from ..config.settings import CONFIG_ENV, SPECS, ConfigError, Settings
from ..config.spec import add_flags, flag_text, flags_as_environment, from_flags, markdown_table
from ..limits import raise_open_files
from ..log import setup_logging
from ..protocol.headers import hypercorn_head_limit
from .fake_upstream import add_fake_upstream_parser, run_fake_upstream

DESCRIPTION = """\
trioproxy: a streaming reverse proxy for the Anthropic and OpenAI APIs.

Point clients at it:  ANTHROPIC_BASE_URL=http://127.0.0.1:8080
                      OPENAI_BASE_URL=http://127.0.0.1:8080/v1
"""

SERVE_EPILOG = """\
Every setting has a flag, an environment variable (TRIOPROXY_<NAME>, shown in [brackets]) and a
key in the TOML file given by --config / TRIOPROXY_CONFIG; flags win over the environment, the
environment over the file. `trioproxy config --markdown` prints them all as a table.
`trioproxy serve` is `hypercorn trioproxy:app --worker-class trio` plus settings for long
agent streams:

  hypercorn -c hypercorn.toml trioproxy:app --worker-class trio
  with hypercorn.toml: bind = ["127.0.0.1:8080"], graceful_timeout = 600,
  keep_alive_timeout = 75, websocket_max_message_size = 67108864,
  h11_max_incomplete_size = 81920 (these last two have no Hypercorn flag).
  (Hypercorn's read_timeout stays unset: set, it cuts streams that are silent for long.)

TCP_USER_TIMEOUT (--tcp-user-timeout) is set on the listening socket, so a client that stops
reading is dropped by the kernel after that many seconds instead of pinning its request forever.
Plain `hypercorn` has no flag for this, nor for the request-head limit (--max-header-bytes sets
Hypercorn's h11_max_incomplete_size), nor a drain: on SIGTERM `trioproxy serve` fails readiness
at once but still serves new requests for --drain-grace seconds (a load balancer's health
check takes it out meanwhile), then answers them 503 (Connection: close, retry-after) for at
least --drain-notice seconds and until in-flight streams end (at most --graceful-timeout from
the signal), then stops; a second signal stops at once. A worker that dies is restarted.
--workers auto starts one worker per CPU this process may run on; with more than one, every
worker is counted once in GET /metrics. Use `trioproxy serve` in production.
"""

log = logging.getLogger("trioproxy")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the proxy (Hypercorn, Trio worker)",
        description="Run trioproxy under Hypercorn's Trio worker, tuned for long streams.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flag(p)
    add_flags(p, SPECS)


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML file of settings (keys as in this help, snake_case) [{CONFIG_ENV}]")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="check the configuration and print the settings in effect",
        description="Validate flags, TRIOPROXY_* variables and the config file together, as "
                    "`trioproxy serve` would, and print the settings in effect as TOML (secrets "
                    "hidden). Takes every flag `trioproxy serve` takes.",
    )
    _add_config_flag(p)
    p.add_argument("--markdown", action="store_true",
                   help="print the table of every setting (the README's) instead")
    add_flags(p, SPECS)


def settings_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Settings from flags > ``env`` > config file > defaults, and the flags as
    ``TRIOPROXY_*`` variables (worker processes read those). Raises ConfigError."""
    env = os.environ if env is None else env
    text = flag_text(SPECS, args)
    settings = Settings.from_sources(env, config=args.config, flags=from_flags(SPECS, text))
    exported = flags_as_environment(SPECS, text)
    if args.config:
        exported[CONFIG_ENV] = os.path.abspath(args.config)
    return settings, exported


try:
    from hypercorn.config import Config as _HypercornConfig
except ImportError:  # pragma: no cover - hypercorn is a dependency
    _HypercornConfig = object  # type: ignore[assignment,misc]


class TrioproxyConfig(_HypercornConfig):  # type: ignore[misc,valid-type]
    """Hypercorn config that also sets TCP_USER_TIMEOUT and keepalive on its sockets."""

    tcp_user_timeout_ms = 120_000

    def _create_sockets(self, binds, type_=socket.SOCK_STREAM):  # type: ignore[no-untyped-def]
        sockets = super()._create_sockets(binds, type_)
        for sock in sockets:
            if type_ == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
                set_stream_socket_options(sock, self.tcp_user_timeout_ms)
        return sockets


def build_config(settings: Settings) -> TrioproxyConfig:
    """The Hypercorn config ``trioproxy serve`` runs with."""
    config = TrioproxyConfig()
    config.tcp_user_timeout_ms = int(settings.tcp_user_timeout * 1000)
    config.application_path = "trioproxy:app"
    config.worker_class = "trio"
    config.workers = settings.workers
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.graceful_timeout
    config.backlog = settings.backlog
    config.keep_alive_timeout = settings.keep_alive
    config.read_timeout = None
    # Hypercorn refuses an oversized message with 1009 while it is still arriving: the same
    # limit as trioproxy's own, so nothing larger is ever buffered.
    config.websocket_max_message_size = settings.ws_max_message_size
    # The request-head limit, whatever the TCP segmentation (h11 counts buffered head bytes;
    # over it, 431). HTTP/2 keeps at least Hypercorn's default header-list limit, so the app's
    # own check (same setting) answers there.
    config.h11_max_incomplete_size = hypercorn_head_limit(settings.max_header_bytes)
    config.h2_max_header_list_size = max(
        settings.max_header_bytes, _HypercornConfig.h2_max_header_list_size
    )
    config.accesslog = None  # trioproxy writes its own structured access line
    # In JSON, Hypercorn's lines go through our handler (see log.setup_logging).
    config.errorlog = logging.getLogger("hypercorn.error") if settings.log_format == "json" else "-"
    if settings.certfile:
        config.certfile = settings.certfile
        config.keyfile = settings.keyfile
    return config


def set_stream_socket_options(sock: socket.socket, user_timeout_ms: int) -> None:
    """TCP_USER_TIMEOUT and keepalive; accepted sockets inherit them on Linux."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def run_serve(args: argparse.Namespace) -> int:
    files = raise_open_files()  # the workers inherit it; each reports it at start-up
    try:
        settings, exported = settings_from_args(args)  # fail fast, before any worker
    except ConfigError as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        return 2
    from .serve import run_workers

    for name in exported:  # a flag replaces its variable and the variable's _FILE twin
        os.environ.pop(name.removesuffix("_FILE") + "_FILE", None)
        os.environ.pop(name.removesuffix("_FILE"), None)
    os.environ.update(exported)  # workers are spawned processes: they read the environment
    setup_logging(settings.log_level, settings.log_format)
    if files.before != files.soft:
        log.info("open files limit raised from %d to %d for the workers", files.before,
                 files.soft)
    scheme = "https" if settings.certfile else "http"
    log.info(
        "trioproxy %s on %s://%s:%s, %d worker%s (anthropic -> %s, openai -> %s)", __version__,
        scheme, settings.host, settings.port, settings.workers,
        "" if settings.workers == 1 else "s", settings.anthropic_upstream,
        settings.openai_upstream,
    )
    return run_workers(build_config(settings), settings.workers)


def run_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table(SPECS))
        return 0
    try:
        settings = settings_from_args(args)[0]
    except ConfigError as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        return 2
    for spec in SPECS:
        value = getattr(settings, spec.name)
        if spec.secret and value is not None:
            print(f"{spec.name} = \"***\"  # set")
        elif value is not None:
            print(f"{spec.name} = {_toml_value(value)}")
    return 0


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trioproxy", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trioproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_config(sub)
    add_fake_upstream_parser(sub)
    try:
        from .latency_report import add_latency_parser, run_latency
        from .usage import add_usage_parser, run_usage
    except ImportError:  # accounting not installed in this build
        add_usage_parser = add_latency_parser = None  # type: ignore[assignment]
        run_usage = run_latency = None  # type: ignore[assignment]
    if add_usage_parser is not None and add_latency_parser is not None:
        add_usage_parser(sub)
        add_latency_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "config":
        return run_config(args)
    if args.command == "fake-upstream":
        return run_fake_upstream(args)
    if args.command == "usage" and run_usage is not None:
        return run_usage(args)
    if args.command == "latency" and run_latency is not None:
        return run_latency(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
