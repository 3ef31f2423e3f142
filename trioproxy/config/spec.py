"""The machinery behind :class:`trioproxy.config.Settings`: one declaration per setting, read
from flags, ``TRIOPROXY_*`` variables and a TOML file, and rendered as ``--help`` and as the
README's table.

A setting is a ``Settings`` field declared with :func:`setting`. Its name is its TOML key, its
environment variable is ``TRIOPROXY_<NAME>``, its flag ``--<name-with-dashes>``; its kind comes
from the field's annotation. Secrets may also come from a file: ``TRIOPROXY_<NAME>_FILE``,
``--<name>-file``, ``<name>_file = "…"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]  # None if fine, else what is wrong ("must be > 0")

KINDS = {  # annotation -> kind
    "str": "str", "str | None": "optional_str", "int": "int", "float": "float",
    "float | None": "seconds_or_off", "bool": "bool", "dict[str, str]": "mapping",
}
_ALLOWED = {
    "str": "a string", "optional_str": "a string", "int": "an integer",
    "float": "a number", "seconds_or_off": "a number of seconds or 'off'",
    "bool": "true or false", "mapping": "a JSON object of strings",
}
_OFF = ("", "0", "off", "none", "false")
CONFIG_ENV = "TRIOPROXY_CONFIG"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names where it came from."""


def setting(
    default: Any, help: str, *, example: str, check: Check | None = None,
    choices: tuple[str, ...] = (), secret: bool = False, metavar: str | None = None,
    shown_default: str | None = None, flag: str | None = None, repeatable: bool = False,
    normalize: Callable[[str], str] | None = None, auto: Callable[[], Any] | None = None,
) -> Any:
    """Declare a ``Settings`` field. ``example`` is a valid non-default value, as text (it is
    what the tests feed through every source). With ``auto``, the text ``auto`` (flag,
    variable or TOML string) is also accepted and resolved at parse time to ``auto()``."""
    meta = {"help": help, "example": example, "check": check, "choices": choices,
            "secret": secret, "metavar": metavar, "shown_default": shown_default,
            "flag": flag, "repeatable": repeatable, "normalize": normalize, "auto": auto}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, hash=False, metadata=meta)
    return dataclasses.field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """One setting, as the sources and the documentation see it."""

    name: str
    kind: str
    default: Any
    help: str
    example: str
    check: Check | None
    choices: tuple[str, ...]
    secret: bool
    metavar: str | None
    shown_default: str | None
    flag: str
    repeatable: bool
    normalize: Callable[[str], str] | None
    auto: Callable[[], Any] | None = None

    @property
    def env(self) -> str:
        return f"TRIOPROXY_{self.name.upper()}"

    def problem(self, value: Any) -> str | None:
        """What is wrong with a typed value, or None."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        return self.check(value) if self.check is not None and value is not None else None

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        d = self.default
        if d is None or d == {}:
            return "unset"
        if isinstance(d, bool):
            return "true" if d else "false"
        if isinstance(d, float):
            return f"{d:g}"
        return str(d) if d != "" else "empty"


def specs_of(cls: type) -> tuple[Spec, ...]:
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        m = f.metadata
        default = {} if f.default_factory is dict else f.default  # type: ignore[comparison-overlap]
        out.append(Spec(
            f.name, KINDS[str(f.type)], default, m["help"], m["example"], m["check"],
            m["choices"], m["secret"], m["metavar"], m["shown_default"],
            m["flag"] or "--" + f.name.replace("_", "-"), m["repeatable"], m["normalize"],
            m["auto"],
        ))
    return tuple(out)


# -- values from text (environment variables, flags) ------------------------------------------


def _allowed(spec: Spec) -> str:
    """What a value of ``spec`` may be, for error messages."""
    if spec.auto is not None:  # ``auto`` is for counts (workers): int settings, positive
        return "a positive integer or auto"
    return _ALLOWED[spec.kind]


def _is_auto(spec: Spec, value: object) -> bool:
    return spec.auto is not None and isinstance(value, str) and value.strip().lower() == "auto"


def _bad(spec: Spec, where: str, raw: object, problem: str) -> ConfigError:
    shown = "" if spec.secret else f", got {raw!r}"
    return ConfigError(f"{where} {problem}{shown}")


def parse_text(spec: Spec, raw: str, where: str) -> Any:
    """The typed value of ``raw`` (an environment variable's or a flag's text)."""
    kind, text = spec.kind, raw.strip()
    if _is_auto(spec, text):
        return _checked(spec, spec.auto(), where, raw)  # type: ignore[misc]
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                value: Any = True
            elif text.lower() in ("0", "false", "no", "off", ""):
                value = False
            else:
                raise ValueError
        elif kind == "int":
            value = int(text)
        elif kind == "float":
            value = float(text)
        elif kind == "seconds_or_off":
            value = None if text.lower() in _OFF else float(text)
        elif kind == "mapping":
            value = json.loads(text or "{}")
            _check_mapping(value)
        elif kind == "optional_str":
            value = raw or None
        else:
            value = raw
    except ValueError:
        raise _bad(spec, where, raw, f"must be {_allowed(spec)}") from None
    return _checked(spec, value, where, raw)


def _check_mapping(value: object) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("not a mapping of strings")


def _checked(spec: Spec, value: Any, where: str, raw: object) -> Any:
    if isinstance(value, str) and spec.normalize is not None:
        value = spec.normalize(value)
    problem = spec.problem(value)
    if problem:
        raise _bad(spec, where, raw, problem)
    return value


def read_secret_file(path: str, where: str) -> str:
    """A secret kept in a file (e.g. a systemd credential): its text minus the final newline."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "surrogateescape").rstrip("\r\n")


def from_strings(
    specs: Iterable[Spec], raw: Mapping[str, str], *, key: Callable[[Spec], str],
    where: Callable[[Spec], str], file_where: Callable[[Spec], str], file_suffix: str,
) -> dict[str, Any]:
    """Typed values from a mapping of text, ``key(spec)`` naming each setting's entry.

    A secret may come from ``key(spec) + file_suffix`` instead (one of the two, not both)."""
    values: dict[str, Any] = {}
    for spec in specs:
        name = key(spec)
        if spec.secret and name + file_suffix in raw:
            file_name = name + file_suffix
            if name in raw:
                raise ConfigError(f"give {where(spec)} or {file_where(spec)}, not both")
            text = read_secret_file(raw[file_name], file_where(spec))
            values[spec.name] = parse_text(spec, text, where(spec))
        elif name in raw:
            values[spec.name] = parse_text(spec, raw[name], where(spec))
    return values


def from_environment(specs: Iterable[Spec], env: Mapping[str, str]) -> dict[str, Any]:
    return from_strings(specs, env, key=lambda s: s.env, where=lambda s: s.env,
                        file_where=lambda s: s.env + "_FILE", file_suffix="_FILE")


# -- values from the TOML file ----------------------------------------------------------------


def read_config_file(specs: Iterable[Spec], path: str) -> dict[str, Any]:
    """Typed values from a TOML file whose keys are setting names; errors name file and key."""
    specs = {s.name: s for s in specs}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key[:-5] if key.endswith("_file") and key[:-5] in specs else key
        spec = specs.get(name)
        where = f"config file {path}: {key}"
        if spec is None or (name != key and not spec.secret):
            close = difflib.get_close_matches(key, list(specs), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint} "
                              f"(`trioproxy config --markdown` lists them)")
        if name in values:
            raise ConfigError(f"config file {path}: give {name} or {name}_file, not both")
        if name != key:
            if not isinstance(value, str):
                raise ConfigError(f"{where} must be a file path (a string)")
            value = read_secret_file(value, where)
            values[name] = parse_text(spec, value, f"config file {path}: {name}")
        else:
            values[name] = _from_toml(spec, value, where)
    return values


def _from_toml(spec: Spec, value: Any, where: str) -> Any:
    kind, ok = spec.kind, False
    if _is_auto(spec, value):
        return _checked(spec, spec.auto(), where, value)  # type: ignore[misc]
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "seconds_or_off":
        if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
            value, ok = None, True
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
    elif kind == "mapping":
        try:
            _check_mapping(value)
            ok = True
        except ValueError:
            pass
    elif spec.repeatable and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value, ok = ",".join(value), True
    else:
        ok = isinstance(value, str)
        if ok and kind == "optional_str":
            value = value or None
    if not ok:
        allowed = "a table of strings" if kind == "mapping" else _allowed(spec)
        if spec.repeatable:
            allowed += " or a list of strings"
        raise _bad(spec, where, value, f"must be {allowed}")
    return _checked(spec, value, where, value)


# -- flags --------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, specs: Iterable[Spec]) -> None:
    """One flag per setting (``--x-file`` too for secrets); every flag is optional, default None."""
    for spec in specs:
        shown = spec.default_text()
        help = f"{spec.help} [{spec.env}; default: {shown}]".replace("%", "%%")
        if spec.kind == "bool":
            parser.add_argument(spec.flag, dest=spec.name, default=None, help=help,
                                action=argparse.BooleanOptionalAction)
        elif spec.repeatable:
            parser.add_argument(spec.flag, dest=spec.name, action="append", help=help,
                                metavar=spec.metavar)
        else:
            parser.add_argument(spec.flag, dest=spec.name, help=help, metavar=_metavar(spec))
        if spec.secret:
            parser.add_argument(spec.flag + "-file", dest=spec.name + "_file", metavar="FILE",
                                help=f"read {spec.flag[2:]} from FILE [{spec.env}_FILE]")


def _metavar(spec: Spec) -> str:
    if spec.metavar:
        return spec.metavar
    if spec.choices:
        return "{" + ",".join(spec.choices) + "}"
    if spec.auto is not None:
        return "{N,auto}"
    return {"int": "N", "float": "SECONDS"}.get(spec.kind, spec.name.upper())


def flag_text(specs: Iterable[Spec], args: argparse.Namespace) -> dict[str, str]:
    """The flags given on the command line, as text keyed by setting name (``x_file`` too)."""
    out: dict[str, str] = {}
    for spec in specs:
        value = getattr(args, spec.name, None)
        if isinstance(value, bool):
            out[spec.name] = "true" if value else "false"
        elif isinstance(value, list):
            out[spec.name] = ",".join(value)
        elif value is not None:
            out[spec.name] = value
        if spec.secret and getattr(args, spec.name + "_file", None) is not None:
            out[spec.name + "_file"] = getattr(args, spec.name + "_file")
    return out


def from_flags(specs: Iterable[Spec], text: Mapping[str, str]) -> dict[str, Any]:
    return from_strings(specs, text, key=lambda s: s.name, where=lambda s: f"{s.flag} ({s.env})",
                        file_where=lambda s: f"{s.flag}-file", file_suffix="_file")


def flags_as_environment(specs: Iterable[Spec], text: Mapping[str, str]) -> dict[str, str]:
    """``flag_text`` output as ``TRIOPROXY_*`` variables (for worker processes)."""
    out: dict[str, str] = {}
    for spec in specs:
        if spec.name in text:
            out[spec.env] = text[spec.name]
        if spec.name + "_file" in text:
            out[spec.env + "_FILE"] = text[spec.name + "_file"]
    return out


# -- documentation --------------------------------------------------------------------------


def markdown_table(specs: Iterable[Spec]) -> str:
    """The README's configuration table."""
    rows = [
        "| file key | environment | flag | default | meaning |",
        "|---|---|---|---|---|",
        f"| – | `{CONFIG_ENV}` | `--config` | unset | the TOML file these keys are read from |",
    ]
    for s in specs:
        meaning = s.help
        if s.choices:
            meaning += f" ({', '.join(s.choices)})"
        if s.secret:
            meaning += f"; or from a file: `{s.env}_FILE`, `{s.flag}-file`, `{s.name}_file`"
        flag = f"{s.flag}/--no-{s.flag[2:]}" if s.kind == "bool" else s.flag
        if s.repeatable:
            flag += " (repeatable)"
        rows.append(f"| `{s.name}` | `{s.env}` | `{flag}` | `{s.default_text()}` | {meaning} |")
    return "\n".join(rows)
