"""Client-controlled text (model names from request bodies, session ids and keys' last digits
from headers) made safe to print: every human-readable output of the CLI goes through here.

- :func:`for_terminal`: control characters (C0, DEL, C1: ESC, OSC 52 clipboard writes, CSI
  sequences), format characters (bidirectional overrides, zero-width characters) and line or
  paragraph separators are shown as Python-style escapes (``\\x1b``, ``\\u202e``), never passed
  through and never dropped; a backslash is doubled, so an escape can be told from text.
- :func:`for_csv`: the same, and a cell that a spreadsheet would read as a formula (starting
  with ``=``, ``+``, ``-`` or ``@``; a leading tab or CR is already escaped) gets a leading
  ``'``, as OWASP advises for CSV injection.

JSON output needs neither: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import unicodedata

__all__ = ["for_csv", "for_terminal"]

_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp"})
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if unicodedata.category(ch) not in _UNSAFE:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def for_terminal(text: str) -> str:
    """``text`` with every character that could act on a terminal shown escaped."""
    if text.isprintable() and "\\" not in text:
        return text  # the usual case: nothing to look at twice
    return "".join(map(_escape, text))


def for_csv(text: str) -> str:
    """A CSV cell of ``text``: escaped as for a terminal, and never a formula."""
    cell = for_terminal(text)
    return "'" + cell if cell.startswith(_FORMULA) else cell
