"""Where the usage ledger lives: database URLs, the default SQLite path, the files beside it,
and ``open_store(url)``.

Database URLs: a plain path, ``sqlite:///abs/path``, ``sqlite:relative/path``, or
``postgresql://…`` / ``postgres://…`` / a libpq keyword/value string (``host=… dbname=…``). The default is SQLite at ``<data home>/trioproxy/usage.db``,
where the data home is ``$XDG_DATA_HOME`` as read by the settings (``~/.local/share`` when unset).
Nothing here reads the environment. Back ends are imported when a store is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .store import SQLStore, Store

__all__ = [
    "data_dir",
    "default_database_url",
    "is_postgres_url",
    "open_store",
    "resolve_database_url",
    "secret_path_for",
    "spill_path_for",
    "sqlite_path",
    "sqlite_url",
]


def data_dir(data_home: str | os.PathLike[str] | None = None) -> Path:
    """``<data_home>/trioproxy``. ``data_home`` is ``$XDG_DATA_HOME`` as the settings read it;
    None or empty means ``~/.local/share``."""
    base = os.fspath(data_home) if data_home else os.path.join(
        os.path.expanduser("~"), ".local", "share")
    return Path(base) / "trioproxy"


def default_database_url(data_home: str | os.PathLike[str] | None = None) -> str:
    """SQLite at ``data_dir(data_home)/usage.db``."""
    return sqlite_url(data_dir(data_home) / "usage.db")


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """``sqlite:///abs/path`` (or ``sqlite:relative/path``) for a file path."""
    text = os.fspath(path)
    return f"sqlite://{text}" if text.startswith("/") else f"sqlite:{text}"


def resolve_database_url(
    url: str | None, data_home: str | os.PathLike[str] | None = None
) -> str:
    """``url`` itself, or :func:`default_database_url` when it is None or empty."""
    return url or default_database_url(data_home)


# A libpq keyword/value connection string starts with one of its keywords and "=" (a SQLite
# file path practically never does): such a string is PostgreSQL, never a file to create.
_KEYWORD_DSN = re.compile(
    r"\s*(?:host|hostaddr|port|dbname|user|password|passfile|service|sslmode|options|"
    r"application_name|connect_timeout|target_session_attrs|sslrootcert)\s*=")


def is_postgres_url(url: str) -> bool:
    """``postgresql://…``, ``postgres://…`` or a keyword/value string (``host=… dbname=…``)."""
    return url.startswith(("postgresql://", "postgres://")) or bool(_KEYWORD_DSN.match(url))


def sqlite_path(url: str) -> Path:
    """The file path of a SQLite database URL (or plain path)."""
    if is_postgres_url(url):
        raise ValueError("not a SQLite URL")
    if url.startswith("sqlite:"):
        url = url[len("sqlite:"):]
        if url.startswith("/"):  # sqlite:///abs/path (also sqlite:////abs/path) -> /abs/path
            url = "/" + url.lstrip("/")
    if not url or url == ":memory:":
        raise ValueError("a SQLite usage database needs a file path (several processes share it)")
    return Path(url).expanduser()


def _side_file(
    url: str, suffix: str, default_name: str, data_home: str | os.PathLike[str] | None
) -> Path:
    if is_postgres_url(url):
        return data_dir(data_home) / default_name
    db = sqlite_path(url)
    return db.with_name(db.name + suffix)


def spill_path_for(url: str, data_home: str | os.PathLike[str] | None = None) -> Path:
    """Where records wait when the store cannot take them: next to the SQLite file, or in the
    data dir (the quarantine file goes beside it, see :func:`.spill.quarantine_path_for`)."""
    return _side_file(url, ".spill.jsonl", "usage-spill.jsonl", data_home)


def secret_path_for(url: str, data_home: str | os.PathLike[str] | None = None) -> Path:
    """Where the fingerprint secret lives: next to the SQLite file, or in the data dir."""
    return _side_file(url, ".fingerprint-secret", "fingerprint-secret", data_home)


def open_store(
    url: str | None = None, *, data_home: str | os.PathLike[str] | None = None,
    timeout: float = 10.0, bound_reads: bool = False,
) -> Store:
    """A connected (not yet migrated) store for ``url`` (default: :func:`default_database_url`).

    ``timeout`` bounds every store call (SQLite busy timeout; PostgreSQL connect and statement
    timeouts plus a client-side deadline, so a server that hangs cannot pin the caller).
    ``bound_reads``: on SQLite, a read that runs longer than ``timeout`` is interrupted too (a
    progress handler; PostgreSQL's statement timeout does that already), for readers inside
    the server; the command-line reports leave it off and take the time they need.
    Raises the back end's connection error when the database cannot be reached.
    """
    url = resolve_database_url(url, data_home)
    if is_postgres_url(url):
        from .postgres import PostgresBackend

        return SQLStore(PostgresBackend(url, timeout=timeout))
    if "://" in url and not url.startswith("sqlite:"):
        raise ValueError(f"unsupported database URL scheme: {url.split('://', 1)[0]}")
    from .sqlite import SQLiteBackend

    return SQLStore(SQLiteBackend(sqlite_path(url), busy_timeout=timeout,
                                  read_timeout=timeout if bound_reads else None))
