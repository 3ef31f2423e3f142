"""Model aliasing: rewrite the request's ``model`` through a configured map.

Works for every payload kind: Anthropic Messages and count_tokens, OpenAI Chat Completions,
Responses over HTTP, and each ``response.create`` frame on the Responses WebSocket.

Enable it with ``TRIOPROXY_EXTENSIONS=trioproxy.contrib.model_alias:ModelAlias`` and
``TRIOPROXY_MODEL_ALIASES='{"fast": "claude-haiku-4-5", "gpt-4": "gpt-4.1"}'`` (JSON), or
construct ``ModelAlias({"fast": "claude-haiku-4-5"})`` yourself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..extensions import Extension, HookContext, MutableHeaders


class ModelAlias(Extension):
    name = "model_alias"

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        if aliases is None:
            raw = os.environ.get("TRIOPROXY_MODEL_ALIASES", "{}")
            try:
                aliases = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"TRIOPROXY_MODEL_ALIASES must be a JSON object: {exc}") from exc
        if not isinstance(aliases, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise ValueError("model aliases must map model names (str) to model names (str)")
        self.aliases = dict(aliases)

    async def on_payload(
        self, ctx: HookContext, payload: dict[str, Any], headers: MutableHeaders
    ) -> dict[str, Any] | None:
        model = payload.get("model")
        if isinstance(model, str) and model in self.aliases:
            payload["model"] = self.aliases[model]
            return payload
        return None
