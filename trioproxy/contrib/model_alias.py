"""Model aliasing: rewrite the request's ``model`` through a configured map.

Works for every payload kind: Anthropic Messages and count_tokens, OpenAI Chat Completions,
Responses over HTTP, and each ``response.create`` frame on the Responses WebSocket.

Enable it with ``TRIOPROXY_EXTENSIONS=trioproxy.contrib.model_alias:ModelAlias`` and the
``model_aliases`` setting (``TRIOPROXY_MODEL_ALIASES='{"fast": "claude-haiku-4-5"}'``, or a
``[model_aliases]`` table in the config file), or construct
``ModelAlias({"fast": "claude-haiku-4-5"})`` yourself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import Settings
from ..extensions import Extension, HookContext, MutableHeaders


class ModelAlias(Extension):
    name = "model_alias"

    def __init__(self, aliases: Mapping[str, str]) -> None:
        """Loaded by name as an extension, it is built with :meth:`from_settings`."""
        if not isinstance(aliases, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise ValueError("model aliases must map model names (str) to model names (str)")
        self.aliases = dict(aliases)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelAlias:
        return cls(settings.model_aliases)

    async def on_payload(
        self, ctx: HookContext, payload: dict[str, Any], headers: MutableHeaders
    ) -> dict[str, Any] | None:
        model = payload.get("model")
        if isinstance(model, str) and model in self.aliases:
            payload["model"] = self.aliases[model]
            return payload
        return None
