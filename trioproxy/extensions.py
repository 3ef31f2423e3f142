"""The extension API: async hooks at three stages of every proxied payload.

Stages, in the order they run for one request:

1. ``on_payload(ctx, payload, headers)`` before the request goes upstream. ``payload`` is the
   decoded JSON body (Anthropic Messages and count_tokens, OpenAI Chat Completions, OpenAI
   Responses over HTTP, and each ``response.create`` frame on the Responses WebSocket).
   ``headers`` is the outbound header list, a :class:`MutableHeaders`. Return the payload
   (the same object mutated, or a new one) if you changed it, ``None`` if not; a payload
   mutated in place is noticed too. If no hook changed the payload the original request bytes
   go upstream verbatim. Header changes are re-checked against the header policy (hop-by-hop
   and ``x-trioproxy-*`` headers never go upstream; ``content-length`` is the proxy's).
2. ``on_response_start(ctx, status, headers)`` sees the status and response headers before
   they reach the client and may change the headers in place.
3. ``on_complete(ctx, record)`` receives the final usage record (read-only) after
   finalisation, exactly once per request (or per WebSocket response).

Extensions run in registration order: entry points of the group ``trioproxy.extensions``
sorted by entry-point name, then ``TRIOPROXY_EXTENSIONS=module:attr,...`` in the order given.
Each stage runs the extensions in that order. A hook that raises or exceeds its ``timeout`` is
logged with its name and the request id; the request continues with the payload as it was
before that hook (fail-open), or gets a 500 in the provider's error shape when the manager is
configured fail-closed. ``Cancelled`` always propagates. Requests carrying the bypass header
get no payload or response-start hooks; the complete hook still fires.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import trio

log = logging.getLogger("trioproxy.extensions")

ENTRY_POINT_GROUP = "trioproxy.extensions"


@dataclass(frozen=True, slots=True)
class HookContext:
    """What a hook knows about the request it is looking at."""

    request_id: str
    api: str  # "anthropic.messages", "openai.chat", "openai.responses", ...
    provider: str  # "anthropic" | "openai"
    transport: str  # "http" | "websocket"
    path: str
    model: str | None
    stream: bool
    bypass: bool


class MutableHeaders:
    """A case-insensitive, order-keeping header list that notes whether it changed."""

    def __init__(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        self._items = [(k.lower(), v) for k, v in items]
        self.changed = False

    def get(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self._items:
            if k == key:
                return v.decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self._items if k == key]

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        self.changed = True

    def remove(self, name: str) -> None:
        key = name.lower().encode()
        kept = [(k, v) for k, v in self._items if k != key]
        if len(kept) != len(self._items):
            self._items = kept
            self.changed = True

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def raw(self) -> list[tuple[bytes, bytes]]:
        return list(self._items)


class Extension:
    """Base class: override the hooks you need. ``name`` appears in logs."""

    name: str = "extension"
    timeout: float = 5.0  # seconds per hook call

    async def on_payload(
        self, ctx: HookContext, payload: dict[str, Any], headers: MutableHeaders
    ) -> dict[str, Any] | None:
        return None

    async def on_response_start(
        self, ctx: HookContext, status: int, headers: MutableHeaders
    ) -> None:
        return None

    async def on_complete(self, ctx: HookContext, record: Any) -> None:
        return None


class ExtensionFailed(Exception):
    """Raised (fail-closed only) when a hook raised or timed out."""

    def __init__(self, name: str, stage: str, cause: str) -> None:
        super().__init__(f"extension {name!r} failed in {stage}: {cause}")
        self.extension = name
        self.stage = stage


def _overrides(ext: Extension, method: str) -> bool:
    return getattr(type(ext), method, None) is not getattr(Extension, method)


@dataclass(slots=True)
class PayloadResult:
    payload: dict[str, Any]
    changed_by: list[str]


class ExtensionManager:
    """Runs the hooks of a fixed, ordered list of extensions."""

    def __init__(self, extensions: Sequence[Extension] = (), *, fail_closed: bool = False) -> None:
        self.extensions = list(extensions)
        self.fail_closed = fail_closed
        self._payload = [e for e in self.extensions if _overrides(e, "on_payload")]
        self._start = [e for e in self.extensions if _overrides(e, "on_response_start")]
        self._complete = [e for e in self.extensions if _overrides(e, "on_complete")]

    @property
    def has_payload_hooks(self) -> bool:
        return bool(self._payload)

    @property
    def has_response_start_hooks(self) -> bool:
        return bool(self._start)

    @property
    def has_complete_hooks(self) -> bool:
        return bool(self._complete)

    async def _call(self, ext: Extension, stage: str, fn: Any, *args: Any) -> tuple[bool, Any]:
        """(ok, result). Never swallows Cancelled: only Exception and our own timeout."""
        try:
            with trio.fail_after(ext.timeout):
                return True, await fn(*args)
        except trio.TooSlowError:
            cause = f"exceeded its {ext.timeout:g}s budget"
        except Exception as exc:  # noqa: BLE001 - an extension bug must not take the request down
            cause = f"{type(exc).__name__}: {exc}"
        log.error("extension %s failed in %s: %s", ext.name, stage, cause)
        if self.fail_closed:
            raise ExtensionFailed(ext.name, stage, cause)
        return False, None

    async def run_payload(
        self, ctx: HookContext, payload: dict[str, Any], headers: MutableHeaders
    ) -> PayloadResult:
        changed_by: list[str] = []
        for ext in self._payload:
            before = copy.deepcopy(payload)
            headers_before = headers.raw(), headers.changed
            ok, result = await self._call(ext, "payload", ext.on_payload, ctx, payload, headers)
            if not ok:
                payload = before  # fail-open: as it was before this hook
                headers._items, headers.changed = headers_before
                continue
            if result is not None:
                payload = result
            if result is not None or payload != before:  # returned, or mutated in place
                changed_by.append(ext.name)
        return PayloadResult(payload, changed_by)

    async def run_response_start(self, ctx: HookContext, status: int, headers: MutableHeaders) -> None:
        for ext in self._start:
            before = headers.raw(), headers.changed
            ok, _ = await self._call(ext, "response_start", ext.on_response_start, ctx, status, headers)
            if not ok:
                headers._items, headers.changed = before

    async def run_complete(self, ctx: HookContext, record: Any) -> None:
        for ext in self._complete:
            try:
                await self._call(ext, "complete", ext.on_complete, ctx, record)
            except ExtensionFailed:
                pass  # the response is already over: nothing to fail closed


def _instantiate(obj: Any, name: str, settings: Any = None) -> Extension:
    """An extension from a class (built with ``from_settings(settings)`` when it has one),
    a factory or an instance."""
    if isinstance(obj, type):
        from_settings = getattr(obj, "from_settings", None)
        obj = from_settings(settings) if settings is not None and from_settings else obj()
    elif callable(obj) and not isinstance(obj, Extension):
        obj = obj()  # a factory
    if not isinstance(obj, Extension):
        raise TypeError(f"{name} is not a trioproxy.extensions.Extension")
    if obj.name == Extension.name:
        obj.name = name
    return obj


def load_spec(spec: str, settings: Any = None) -> Extension:
    """Load ``module:attr`` (a class, a factory or an instance)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"extension spec must look like module:attr, got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return _instantiate(obj, spec, settings)


def load_extensions(specs: Sequence[str] = (), *, use_entry_points: bool = True,
                    settings: Any = None) -> list[Extension]:
    """Entry points (sorted by name) first, then ``specs`` in the given order. Classes with a
    ``from_settings`` class method are built from ``settings`` (a trioproxy Settings)."""
    found: list[Extension] = []
    if use_entry_points:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            found.append(_instantiate(ep.load(), ep.name, settings))
    found.extend(load_spec(s.strip(), settings) for s in specs if s.strip())
    return found
