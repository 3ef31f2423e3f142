"""Settings: read once from ``TRIOPROXY_*`` environment variables, validated at start-up.

``trioproxy serve`` has flags for the common settings (they override the environment); the
README's configuration table lists every variable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the variable."""


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
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"{name} must not have a query or fragment, got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ConfigError(f"{name} has an invalid port: {url!r}") from exc
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


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _float_or_none(value: str, name: str) -> float | None:
    v = value.strip().lower()
    if v in ("", "0", "off", "none", "false"):
        return None
    try:
        f = float(v)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number of seconds or 'off', got {value!r}") from exc
    if f < 0:
        raise ConfigError(f"{name} must not be negative, got {value!r}")
    return f


@dataclass(frozen=True, slots=True)
class Settings:
    """All runtime settings. Field ``x`` is read from ``TRIOPROXY_X``."""

    anthropic_base_url: str = "https://api.anthropic.com"
    openai_base_url: str = "https://api.openai.com"
    connect_timeout: float = 10.0
    read_timeout: float = 600.0  # per read; there is no total-duration cap
    write_timeout: float = 60.0
    write_stall_timeout: float = 60.0  # a client that reads nothing this long ends its stream
    pool_timeout: float = 30.0
    max_connections: int = 200  # per upstream origin
    keepalive_expiry: float = 30.0  # idle upstream connections older than this are closed
    max_body_bytes: int = 32 * MiB
    request_id_header: str = "x-trioproxy-request-id"
    sse_keepalive: float | None = None  # seconds of upstream silence before a ": keepalive"
    database_url: str | None = None  # None: SQLite at the per-user data path
    data_home: str | None = None  # XDG_DATA_HOME; None: ~/.local/share
    store_timeout: float = 10.0  # bounds every store call (connect, statement)
    usage_max_pending: int = 10_000  # records held in memory; more go to the spill file
    usage_lookup_timeout: float = 15.0  # GET /v1/usage/{id} answers 503 past this
    accounting: bool = True
    log_level: str = "INFO"
    channel_size: int = 16  # chunks buffered between upstream reader and client writer
    admin_token: str | None = None  # may read every usage record via GET /v1/usage/{id}
    extensions: str = ""  # "module:attr,module:attr" loaded after the entry points
    extensions_fail_closed: bool = False
    bypass_headers: str = "x-trioproxy-bypass"  # comma list; "true" in any of them = bypass
    include_usage: bool = True  # inject stream_options.include_usage for Chat streams
    ws_max_message_size: int = 64 * MiB
    ws_ping_interval: float | None = 20.0
    # Parsed once here, not on every request:
    anthropic_upstream: UpstreamURL = field(init=False, repr=False, compare=False)
    openai_upstream: UpstreamURL = field(init=False, repr=False, compare=False)
    bypass_header_names: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parse = UpstreamURL.parse
        object.__setattr__(self, "anthropic_upstream",
                           parse(self.anthropic_base_url, name="TRIOPROXY_ANTHROPIC_BASE_URL"))
        object.__setattr__(self, "openai_upstream",
                           parse(self.openai_base_url, name="TRIOPROXY_OPENAI_BASE_URL"))
        object.__setattr__(self, "bypass_header_names", tuple(
            n.strip().lower().encode() for n in self.bypass_headers.split(",") if n.strip()
        ))
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout",
                     "write_stall_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TRIOPROXY_{name.upper()} must be > 0")
        if self.max_body_bytes <= 0 or self.max_connections <= 0 or self.channel_size <= 0:
            raise ConfigError("sizes and limits must be positive")
        if self.ws_max_message_size <= 0:
            raise ConfigError("TRIOPROXY_WS_MAX_MESSAGE_SIZE must be > 0")
        if self.ws_ping_interval is not None and self.ws_ping_interval <= 0:
            raise ConfigError("TRIOPROXY_WS_PING_INTERVAL must be > 0 or 'off'")
        if not self.request_id_header or self.request_id_header != self.request_id_header.lower():
            raise ConfigError("TRIOPROXY_REQUEST_ID_HEADER must be a lower-case header name")

    @property
    def extension_specs(self) -> list[str]:
        return [s.strip() for s in self.extensions.split(",") if s.strip()]

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``TRIOPROXY_*`` variables; ``overrides`` (e.g. CLI flags) win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            key = f"TRIOPROXY_{f.name.upper()}"
            if not f.init or key not in env:
                continue
            values[f.name] = _convert(f.name, env[key], key)
        if env.get("XDG_DATA_HOME"):
            values["data_home"] = env["XDG_DATA_HOME"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


_DEFAULTS = Settings.__dataclass_fields__


def _convert(name: str, raw: str, key: str) -> object:
    default = _DEFAULTS[name].default
    if name in ("sse_keepalive", "ws_ping_interval"):
        return _float_or_none(raw, key)
    if name in ("database_url", "admin_token", "data_home"):
        return raw or None
    if isinstance(default, bool):
        return _bool(raw, key)
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"{key} must be an integer, got {raw!r}") from exc
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError as exc:
            raise ConfigError(f"{key} must be a number, got {raw!r}") from exc
    if name == "request_id_header":
        return raw.strip().lower()
    return raw
