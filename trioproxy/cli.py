"""``trioproxy`` command line: ``serve`` (Hypercorn tuned for long streams) and ``usage``."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, Settings

DESCRIPTION = """\
trioproxy: a streaming reverse proxy for the Anthropic and OpenAI APIs.

Point clients at it:  ANTHROPIC_BASE_URL=http://127.0.0.1:8080
                      OPENAI_BASE_URL=http://127.0.0.1:8080/v1
"""

SERVE_EPILOG = """\
Every flag has an environment variable (TRIOPROXY_<NAME>); flags win. `trioproxy serve` is
`hypercorn trioproxy:app --worker-class trio` plus settings for long agent streams:

  hypercorn trioproxy:app --worker-class trio --bind 127.0.0.1:8080 \\
      --graceful-timeout 600 --keep-alive 75 --websocket-max-message-size 68157440
  (Hypercorn's read_timeout stays unset: set, it cuts streams that are silent for long.)

TCP_USER_TIMEOUT (--tcp-user-timeout) is set on the listening socket, so a client that stops
reading is dropped by the kernel after that many seconds instead of pinning its request forever.
Plain `hypercorn` has no flag for this; use `trioproxy serve` in production.
"""

# flag -> Settings field, for the flags that map one-to-one onto a setting
_SETTING_FLAGS = {
    "anthropic_base_url": "TRIOPROXY_ANTHROPIC_BASE_URL",
    "openai_base_url": "TRIOPROXY_OPENAI_BASE_URL",
    "connect_timeout": "TRIOPROXY_CONNECT_TIMEOUT",
    "read_timeout": "TRIOPROXY_READ_TIMEOUT",
    "write_timeout": "TRIOPROXY_WRITE_TIMEOUT",
    "pool_timeout": "TRIOPROXY_POOL_TIMEOUT",
    "max_connections": "TRIOPROXY_MAX_CONNECTIONS",
    "max_body_bytes": "TRIOPROXY_MAX_BODY_BYTES",
    "request_id_header": "TRIOPROXY_REQUEST_ID_HEADER",
    "sse_keepalive": "TRIOPROXY_SSE_KEEPALIVE",
    "database_url": "TRIOPROXY_DATABASE_URL",
    "log_level": "TRIOPROXY_LOG_LEVEL",
    "ws_max_message_size": "TRIOPROXY_WS_MAX_MESSAGE_SIZE",
    "ws_ping_interval": "TRIOPROXY_WS_PING_INTERVAL",
}


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the proxy (Hypercorn, Trio worker)",
        description="Run trioproxy under Hypercorn's Trio worker, tuned for long streams.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings()
    p.add_argument("--host", default=os.environ.get("TRIOPROXY_HOST", "127.0.0.1"),
                   help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("TRIOPROXY_PORT", "8080")),
                   help="port to listen on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (default: 1)")
    p.add_argument("--anthropic-base-url", help=f"Anthropic upstream (default: {d.anthropic_base_url})")
    p.add_argument("--openai-base-url", help=f"OpenAI upstream (default: {d.openai_base_url})")
    p.add_argument("--connect-timeout", type=float, help=f"seconds (default: {d.connect_timeout:g})")
    p.add_argument("--read-timeout", type=float,
                   help=f"seconds per upstream read; no total cap (default: {d.read_timeout:g})")
    p.add_argument("--write-timeout", type=float, help=f"seconds (default: {d.write_timeout:g})")
    p.add_argument("--pool-timeout", type=float,
                   help=f"seconds to wait for a free upstream connection (default: {d.pool_timeout:g})")
    p.add_argument("--max-connections", type=int,
                   help=f"per upstream origin (default: {d.max_connections})")
    p.add_argument("--max-body-bytes", type=int,
                   help=f"request body limit, 413 above it (default: {d.max_body_bytes})")
    p.add_argument("--request-id-header",
                   help=f"inbound header whose id is adopted (default: {d.request_id_header})")
    p.add_argument("--sse-keepalive", type=float, metavar="SECONDS",
                   help="send ': keepalive' after this much upstream SSE silence (default: off)")
    p.add_argument("--database-url", help="usage store: SQLite path/URL or postgresql:// URL")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: INFO)")
    p.add_argument("--extension", action="append", metavar="MODULE:ATTR",
                   help="load an extension (repeatable; after entry points and "
                        "TRIOPROXY_EXTENSIONS)")
    p.add_argument("--graceful-timeout", type=float, default=600.0,
                   help="seconds in-flight streams may finish after shutdown starts (default: 600)")
    p.add_argument("--keep-alive", type=float, default=75.0,
                   help="client keep-alive idle timeout between requests (default: 75)")
    p.add_argument("--tcp-user-timeout", type=float, default=120.0,
                   help="drop clients whose sent data stays unacknowledged this long (default: 120)")
    p.add_argument("--certfile", help="TLS certificate (enables HTTPS and HTTP/2 via ALPN)")
    p.add_argument("--keyfile", help="TLS private key")
    p.add_argument("--ws-max-message-size", type=int,
                   help=f"WebSocket message limit in bytes, both legs (default: {d.ws_max_message_size})")
    p.add_argument("--ws-ping-interval", type=float,
                   help=f"seconds between upstream WebSocket pings (default: {d.ws_ping_interval:g})")


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


def build_config(args: argparse.Namespace, settings: Settings | None = None) -> TrioproxyConfig:
    """The Hypercorn config ``trioproxy serve`` runs with."""
    settings = settings or Settings()
    config = TrioproxyConfig()
    config.tcp_user_timeout_ms = int(args.tcp_user_timeout * 1000)
    config.application_path = "trioproxy:app"
    config.worker_class = "trio"
    config.workers = args.workers
    host = f"[{args.host}]" if ":" in args.host else args.host
    config.bind = [f"{host}:{args.port}"]
    config.graceful_timeout = args.graceful_timeout
    config.keep_alive_timeout = args.keep_alive
    config.read_timeout = None
    # A little above our own limit, so oversize frames reach trioproxy (which closes with 1009
    # and logs it) instead of being dropped by Hypercorn with only a 1006 to show for it.
    config.websocket_max_message_size = settings.ws_max_message_size + 1024 * 1024
    config.accesslog = None  # trioproxy writes its own structured access line
    config.errorlog = "-"
    if args.certfile:
        config.certfile = args.certfile
        config.keyfile = args.keyfile
    return config


def set_stream_socket_options(sock: socket.socket, user_timeout_ms: int) -> None:
    """TCP_USER_TIMEOUT and keepalive; accepted sockets inherit them on Linux."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def run_serve(args: argparse.Namespace) -> int:
    updates = {
        env: str(getattr(args, name))
        for name, env in _SETTING_FLAGS.items()
        if getattr(args, name, None) is not None
    }
    if args.extension:
        current = os.environ.get("TRIOPROXY_EXTENSIONS", "")
        updates["TRIOPROXY_EXTENSIONS"] = ",".join(filter(None, [current, *args.extension]))
    try:
        settings = Settings.from_env({**os.environ, **updates})  # fail fast, before any worker
    except ConfigError as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        return 2
    if bool(args.certfile) != bool(args.keyfile):
        print("trioproxy: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    from hypercorn.run import run

    os.environ.update(updates)  # workers are spawned processes: they read the environment
    scheme = "https" if args.certfile else "http"
    print(
        f"trioproxy {__version__} on {scheme}://{args.host}:{args.port} "
        f"(anthropic -> {settings.anthropic_upstream}, openai -> {settings.openai_upstream})",
        file=sys.stderr,
    )
    return run(build_config(args, settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trioproxy", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trioproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    try:
        from .usage_cli import add_usage_parser, run_usage
    except ImportError:  # accounting not installed in this build
        add_usage_parser = run_usage = None  # type: ignore[assignment]
    if add_usage_parser is not None:
        add_usage_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "usage" and run_usage is not None:
        return run_usage(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
