"""API keys: extraction from request headers, and keyed fingerprints (the key is never stored).

A record stores ``HMAC-SHA256(secret, key)`` truncated to 16 hex digits and the key's last four
characters. The secret is the ``fingerprint_secret`` setting (``TRIOPROXY_FINGERPRINT_SECRET``
or ``…_FILE``) or a random 32-byte file created once (mode 0600) next to the SQLite database /
in the data directory.

With a PostgreSQL store shared by several hosts, set the same ``fingerprint_secret`` on every
host: otherwise each host fingerprints the same key differently, and ``GET
/v1/usage/{id}`` and ``trioproxy usage --by key`` cannot match records across hosts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ..protocol.headers import connection_tokens

__all__ = ["extract_api_key", "fingerprint", "load_or_create_secret"]

SECRET_BYTES = 32
FINGERPRINT_HEX = 16
_MIN_LAST4_KEY = 12  # shorter keys would be mostly revealed by their last four characters


def extract_api_key(
    headers: list[tuple[bytes, bytes]], provider: str | None = None
) -> str | None:
    """The API key of a request as the upstream sees it: ``x-api-key``, else
    ``authorization: Bearer …`` (for ``provider="openai"``, which ignores ``x-api-key``, the
    bearer token first).

    ``headers`` are ASGI-style (lower-case names, bytes). A header the client named in
    ``Connection`` is hop-by-hop: it never reaches the upstream, so it is not the key billed.
    Returns None when absent or empty.
    """
    hop = connection_tokens(headers)
    api_key: str | None = None
    bearer: str | None = None
    for name, value in headers:
        if name in hop:
            continue
        if name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip() or None
        elif name == b"authorization" and bearer is None:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
    if provider == "openai":
        return bearer or api_key
    return api_key or bearer


def fingerprint(key: str, secret: bytes) -> tuple[str, str]:
    """(keyed fingerprint, last four characters) of an API key.

    The fingerprint is HMAC-SHA256 under ``secret``, truncated to 16 hex digits: stable per
    secret, useless without it. Keys shorter than 12 characters get an empty ``last4``.
    """
    found = _FINGERPRINTS.get((secret, key))
    if found is None:
        digest = hmac.new(secret, key.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).hexdigest()
        found = digest[:FINGERPRINT_HEX], key[-4:] if len(key) >= _MIN_LAST4_KEY else ""
        if len(_FINGERPRINTS) >= FINGERPRINT_CACHE:  # the oldest goes first
            _FINGERPRINTS.pop(next(iter(_FINGERPRINTS), None), None)
        _FINGERPRINTS[(secret, key)] = found
    return found


# Fingerprints of recently seen keys (one HMAC per key, not per request). In memory only, never
# logged or stored; bounded.
FINGERPRINT_CACHE = 1024
_FINGERPRINTS: dict[tuple[bytes, str], tuple[str, str]] = {}


def load_or_create_secret(
    path: str | os.PathLike[str], configured: str | None = None
) -> bytes:
    """The fingerprint secret: ``configured`` (the ``fingerprint_secret`` setting) if set,
    else the file at ``path``, created with 32 random bytes (mode 0600) if missing.

    Creation is atomic: the secret is written to a private temporary file that is then
    hard-linked into place, which fails if another process got there first; the loser reads
    the winner's file. So worker processes starting at once all agree.
    """
    if configured:
        return configured.encode("utf-8", "surrogateescape")
    target = Path(path)
    try:
        return _read_secret(target)
    except FileNotFoundError:
        pass
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass  # another process won the race: use its secret
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(target)


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(
            f"fingerprint secret {path} is too short ({len(data)} bytes): delete it to "
            "regenerate, or set TRIOPROXY_FINGERPRINT_SECRET(_FILE)"
        )
    return data
