"""A database URL (or any text quoting one) without its credentials, for logs. Pure.

Every form libpq accepts a password in is covered:
- URI userinfo: ``postgresql://user:password@host`` (several hosts too);
- URI query parameters ``password`` and ``sslpassword`` (names compared as libpq reads them:
  percent-decoded; any case, to be safe);
- keyword/value strings: ``host=db password=secret`` and ``password = 'quoted \\' value'``.
The value becomes ``***``; everything else (user, hosts, database, options) is kept.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["redact_dsn"]

MASK = "***"
_SECRET_KEYS = frozenset({"password", "sslpassword"})

# libpq ends the userinfo at the first "@" or "/" after "scheme://"; the password follows the
# first ":" in it.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<secret>[^@/\s]*)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<key>[^=&#\s]*)=)(?P<value>[^&#\s]*)")
# keyword/value form: a keyword not inside a URI query, "=", a quoted or bare value
_KEYWORD = re.compile(r"(?P<head>(?<![\w?&])(?i:(?:ssl)?password)\s*=\s*)"
                      r"(?P<value>'(?:[^'\\]|\\.)*'?|\S*)")


def redact_dsn(text: str) -> str:
    """``text`` with every password in a PostgreSQL URI or keyword/value string masked."""
    if "assword" not in text.lower() and "@" not in text and "%" not in text:
        return text  # nothing that could hold one (SQLite paths, most URLs)
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _QUERY_PARAM.sub(_query_param, text)
    return _KEYWORD.sub(lambda m: m["head"] + MASK, text)


def _query_param(m: re.Match[str]) -> str:
    if unquote(m["key"]).lower() in _SECRET_KEYS:
        return m["head"] + MASK
    return m[0]
