"""Settings: declared once in :class:`Settings`, read once at start-up from flags, the
``TRIOPROXY_*`` environment, a TOML file (``--config`` / ``TRIOPROXY_CONFIG``) and defaults,
in that order of precedence, and validated before anything starts.

``trioproxy serve --help`` and the README's configuration table (``trioproxy config
--markdown``) are generated from the same declaration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..limits import current_streams_allowed
from .spec import (
    CONFIG_ENV,
    ConfigError,
    from_environment,
    read_config_file,
    setting,
    specs_of,
)

__all__ = ["CONFIG_ENV", "SPECS", "ConfigError", "Settings", "UpstreamURL"]

MiB = 1024 * 1024


def _without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if sep and "@" in netloc:
        return f"{scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"
    return url


@dataclass(frozen=True, slots=True)
class UpstreamURL:
    """An upstream base: origin plus optional path prefix (no query, no fragment)."""

    scheme: str
    host: str
    port: int
    prefix: bytes  # b"" or b"/some/prefix" without a trailing slash

    @classmethod
    def parse(cls, url: str, *, name: str = "base URL") -> UpstreamURL:
        parts = urlsplit(url)
        shown = _without_credentials(url)  # error messages never echo a password
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name} must be an http:// or https:// URL, got {shown!r}")
        if "@" in parts.netloc:
            raise ConfigError(f"{name} must not carry credentials (user:password@), got "
                              f"{shown!r}: clients send their own keys")
        if parts.query or parts.fragment:
            raise ConfigError(f"{name} must not have a query or fragment, got {shown!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ConfigError(f"{name} has an invalid port: {shown!r}") from exc
        prefix = parts.path.rstrip("/").encode("ascii")
        return cls(parts.scheme, parts.hostname, port, prefix)

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.default_port else f"{host}:{self.port}").encode("ascii")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header.decode()}{self.prefix.decode()}"


def _positive(value: float) -> str | None:
    return "must be > 0" if value <= 0 else None


def _count(value: int) -> str | None:
    return "must be a positive integer or auto" if value <= 0 else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), else
    the machine's count: what ``workers = "auto"`` resolves to."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _non_negative(value: float) -> str | None:
    return "must be >= 0" if value < 0 else None


def _port(value: int) -> str | None:
    return "must be a port number, 0-65535" if not 0 <= value <= 65535 else None


def _upstream(value: str) -> str | None:
    try:
        UpstreamURL.parse(value)
    except ConfigError as exc:
        return str(exc).removeprefix("base URL ")
    return None


def _header_name(value: str) -> str | None:
    ok = value and value == value.strip().lower() and " " not in value
    return None if ok else "must be a lower-case header name"


def _lower(text: str) -> str:
    return text.strip().lower()


def _upper(text: str) -> str:
    return text.strip().upper()


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level(value: str) -> str | None:
    return None if value.upper() in LEVELS else f"must be one of {', '.join(LEVELS)}"


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings, one declaration each: ``TRIOPROXY_<NAME>``, ``--<name>``, TOML key ``name``.

    ``Settings.from_env()`` applies flags (``overrides``) > environment > config file > defaults.
    """

    # -- serving (``trioproxy serve``; plain Hypercorn has its own flags for these) -----------
    host: str = setting("127.0.0.1", "interface to listen on (trioproxy serve)",
                        example="0.0.0.0")
    port: int = setting(8080, "port to listen on (trioproxy serve; plain Hypercorn: 8000)",
                        example="9090", check=_port)
    workers: int = setting(1, "worker processes sharing the port; 'auto': one per CPU this "
                           "process may run on (trioproxy serve)", example="3", check=_count,
                           auto=usable_cpus)
    graceful_timeout: float = setting(
        600.0, "seconds in-flight streams may finish after shutdown starts (trioproxy serve)",
        example="30", check=_non_negative)
    drain_grace: float = setting(
        15.0, "seconds after SIGTERM during which readiness fails but new requests are still "
        "served, so a load balancer's health check takes the instance out before any request "
        "is refused (Envoy's drain time, a Kubernetes preStop sleep; trioproxy serve)",
        example="4", check=_non_negative, metavar="SECONDS")
    drain_notice: float = setting(
        5.0, "seconds a draining server keeps answering new requests with 503 after the grace "
        "period, before it stops accepting, even when nothing is in flight (trioproxy serve)",
        example="15", check=_non_negative, metavar="SECONDS")
    keep_alive: float = setting(
        75.0, "seconds an idle client connection stays open between requests (trioproxy serve)",
        example="5", check=_positive)
    tcp_user_timeout: float = setting(
        120.0, "drop clients whose sent data stays unacknowledged this many seconds "
        "(TCP_USER_TIMEOUT; trioproxy serve)", example="45", check=_positive)
    backlog: int = setting(
        2048, "connections the kernel queues for accept (listen backlog; the kernel caps it "
        "at net.core.somaxconn; trioproxy serve)", example="512", check=_positive)
    certfile: str | None = setting(
        None, "TLS certificate (PEM): serve HTTPS, HTTP/2 via ALPN (trioproxy serve)",
        example="/etc/trioproxy/cert.pem", metavar="FILE")
    keyfile: str | None = setting(None, "TLS private key (PEM), with certfile (trioproxy serve)",
                                  example="/etc/trioproxy/key.pem", metavar="FILE")
    max_header_bytes: int = setting(
        16384, "largest request head (request line + headers) accepted; larger heads get 431",
        example="32768", check=_positive)
    # -- upstreams -----------------------------------------------------------------------------
    anthropic_base_url: str = setting(
        "https://api.anthropic.com", "Anthropic upstream (origin + optional path prefix)",
        example="http://127.0.0.1:9000/anthropic", check=_upstream, metavar="URL")
    openai_base_url: str = setting("https://api.openai.com", "OpenAI upstream",
                                   example="http://127.0.0.1:9001", check=_upstream,
                                   metavar="URL")
    connect_timeout: float = setting(10.0, "seconds to connect upstream (TCP + TLS + CONNECT)",
                                     example="3", check=_positive, metavar="SECONDS")
    read_timeout: float = setting(600.0, "seconds per upstream read; no total-duration cap",
                                  example="120", check=_positive, metavar="SECONDS")
    write_timeout: float = setting(60.0, "seconds to send the request upstream",
                                   example="20", check=_positive, metavar="SECONDS")
    write_stall_timeout: float = setting(
        60.0, "seconds a client may read nothing while its stream waits; then the stream ends "
        "(client_stalled) and its upstream connection is freed", example="120", check=_positive,
        metavar="SECONDS")
    pool_timeout: float = setting(30.0, "seconds to wait for a free upstream connection",
                                  example="5", check=_positive, metavar="SECONDS")
    max_connections: int = setting(
        "auto", "upstream connections per origin and worker; a request over it waits "
        "pool_timeout for one, then 504. 'auto': as many streams as the worker's open-files "
        "limit allows (two descriptors each)", example="50", check=_count,
        auto=current_streams_allowed, shown_default="auto")
    keepalive_expiry: float = setting(30.0, "idle upstream connections older than this many "
                                      "seconds are not reused", example="10",
                                      check=_non_negative, metavar="SECONDS")
    # -- requests ------------------------------------------------------------------------------
    max_body_bytes: int = setting(32 * MiB, "request body limit in bytes; 413 above it",
                                  example="1048576", check=_positive)
    request_id_header: str = setting(
        "x-trioproxy-request-id", "inbound header whose request id is adopted",
        example="X-Api-Request-Log-Id", check=_header_name, metavar="NAME", normalize=_lower)
    sse_keepalive: float | None = setting(
        None, "seconds of upstream SSE silence before a ': keepalive' comment ('off': never)",
        example="15", shown_default="off", metavar="SECONDS")
    stream_buffer: int = setting(
        256 * 1024, "bytes of a streamed body held between its upstream reader and the client "
        "writer; when full the upstream read waits (backpressure)", example="65536",
        check=_positive)
    include_usage: bool = setting(True, "inject stream_options.include_usage into streamed "
                                  "Chat Completions requests", example="false")
    bypass_headers: str = setting("x-trioproxy-bypass", "comma list of header names whose "
                                  "value 'true' requests the bypass", example="x-a,x-b",
                                  metavar="NAMES")
    # -- WebSocket -----------------------------------------------------------------------------
    ws_max_message_size: int = setting(64 * MiB, "WebSocket message limit in bytes, both legs; "
                                       "larger messages close with 1009", example="1048576",
                                       check=_positive)
    ws_ping_interval: float | None = setting(20.0, "seconds between pings on the upstream "
                                             "WebSocket leg ('off': none)", example="off",
                                             metavar="SECONDS")
    # -- accounting ----------------------------------------------------------------------------
    accounting: bool = setting(True, "record usage at all", example="false")
    database_url: str | None = setting(
        None, "usage store: SQLite path/URL or postgresql://… URL", example="/tmp/usage.db",
        secret=True, shown_default="SQLite in $XDG_DATA_HOME/trioproxy", metavar="URL")
    data_home: str | None = setting(
        None, "directory for the default SQLite ledger, spill and secret files (else "
        "$XDG_DATA_HOME, else ~/.local/share)", example="/var/lib", metavar="DIR",
        shown_default="$XDG_DATA_HOME")
    store_timeout: float = setting(10.0, "seconds any usage-store call may take (connect, "
                                   "statement) before it counts as an outage", example="5",
                                   check=_positive, metavar="SECONDS")
    usage_max_pending: int = setting(10_000, "usage records held in memory while the store is "
                                     "down; more go to the spill file", example="1000",
                                     check=_positive)
    usage_spill_after: float = setting(
        5.0, "seconds of usage-store outage after which records go to the spill file instead "
        "of waiting in memory (bounds what a SIGKILL or an OOM kill can lose)", example="30",
        check=_non_negative, metavar="SECONDS")
    usage_lookup_timeout: float = setting(15.0, "seconds GET /v1/usage/{id} waits for the store "
                                          "before answering 503", example="5", check=_positive,
                                          metavar="SECONDS")
    fingerprint_secret: str | None = setting(
        None, "HMAC secret for API key fingerprints (the same on every host sharing a store)",
        example="shared-secret", secret=True, shown_default="generated once",
        metavar="SECRET")
    admin_token: str | None = setting(
        None, "token that may read every record via GET /v1/usage/{id}", example="admin-token",
        secret=True, metavar="TOKEN")
    # -- operating -----------------------------------------------------------------------------
    metrics: bool = setting(True, "serve Prometheus metrics at GET /metrics", example="false")
    dashboard: bool = setting(True, "serve the usage page at /_trioproxy/ (admin_token, or "
                              "loopback clients only when none is set)", example="false")
    metrics_require_token: bool = setting(
        False, "GET /metrics needs admin_token (x-trioproxy-admin-token or Authorization: "
        "Bearer); off: any client whose Host names this proxy", example="true")
    allowed_hosts: str = setting(
        "", "comma list of extra Host names the usage page and /metrics answer without a token "
        "(besides loopback addresses, localhost, the host setting); '*': any",
        example="devbox.lan", metavar="NAMES")
    # -- extensions ----------------------------------------------------------------------------
    extensions: str = setting(
        "", "extensions module:attr, loaded after the entry points (comma list)",
        example="trioproxy.contrib.model_alias:ModelAlias", flag="--extension",
        repeatable=True, metavar="MODULE:ATTR")
    extensions_fail_closed: bool = setting(False, "500 instead of fail-open when a hook fails",
                                           example="true")
    model_aliases: dict[str, str] = setting(  # noqa: RUF009 - a field(default_factory=dict)
        {}, "model renames for trioproxy.contrib.model_alias (JSON object / TOML table)",
        example='{"fast": "claude-haiku-4-5"}', metavar="JSON")
    # -- logging -------------------------------------------------------------------------------
    log_level: str = setting("INFO", "log level (DEBUG, INFO, WARNING, ERROR)", example="DEBUG",
                             check=_level, metavar="LEVEL", normalize=_upper)
    log_probes: bool = setting(
        False, "write an access line for health and readiness probes (/_trioproxy/healthz, "
        "/_trioproxy/readyz) too", example="true")
    log_format: str = setting("text", "log line format: text, or one JSON object per line",
                              example="json", choices=("text", "json"), normalize=_lower)
    # Parsed once here, not on every request:
    anthropic_upstream: UpstreamURL = field(init=False, repr=False, compare=False)
    openai_upstream: UpstreamURL = field(init=False, repr=False, compare=False)
    bypass_header_names: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for spec in SPECS:
            value = getattr(self, spec.name)
            if spec.auto is not None and str(value).strip().lower() == "auto":  # typed callers
                value = spec.auto()
                object.__setattr__(self, spec.name, value)
            problem = spec.problem(value)
            if problem:
                shown = "" if spec.secret or ", got " in problem else f", got {value!r}"
                raise ConfigError(f"{spec.env} {problem}{shown}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("certfile and keyfile (TRIOPROXY_CERTFILE, TRIOPROXY_KEYFILE) "
                              "go together")
        if self.metrics_require_token and not self.admin_token:
            raise ConfigError("metrics_require_token (TRIOPROXY_METRICS_REQUIRE_TOKEN) needs "
                              "admin_token (TRIOPROXY_ADMIN_TOKEN)")
        set_ = object.__setattr__
        set_(self, "log_level", self.log_level.upper())
        set_(self, "anthropic_upstream", UpstreamURL.parse(self.anthropic_base_url))
        set_(self, "openai_upstream", UpstreamURL.parse(self.openai_base_url))
        set_(self, "bypass_header_names", tuple(
            n.strip().lower().encode() for n in self.bypass_headers.split(",") if n.strip()
        ))

    @property
    def extension_specs(self) -> list[str]:
        return [s.strip() for s in self.extensions.split(",") if s.strip()]

    def upstream_for(self, provider: str) -> UpstreamURL:
        """The configured base URL of ``provider`` ("anthropic" or "openai")."""
        return self.anthropic_upstream if provider == "anthropic" else self.openai_upstream

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, config: str | None = None,
        **overrides: object,
    ) -> Settings:
        """Settings from, in order of precedence: ``overrides`` (typed values; None means not
        given), ``TRIOPROXY_*`` variables in ``env`` (default ``os.environ``), the TOML file
        ``config`` (default ``$TRIOPROXY_CONFIG``), the defaults."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_sources(env, config=config, flags=given)

    @classmethod
    def from_sources(
        cls, env: Mapping[str, str] | None = None, *, config: str | None = None,
        flags: Mapping[str, object] | None = None,
    ) -> Settings:
        """Like :meth:`from_env`, with ``flags`` whose None values are given values
        (``--sse-keepalive off``)."""
        env = os.environ if env is None else env
        path = config or env.get(CONFIG_ENV)
        values = read_config_file(SPECS, path) if path else {}
        values.update(from_environment(SPECS, env))
        if "data_home" not in values and env.get("XDG_DATA_HOME"):
            values["data_home"] = env["XDG_DATA_HOME"]  # the standard's own variable, below ours
        unknown = set(flags or {}) - {s.name for s in SPECS}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        values.update(flags or {})
        return cls(**values)  # type: ignore[arg-type]


SPECS = specs_of(Settings)
