"""Fake upstreams for tests, the bench and demos; nothing here runs in the proxy.

- :mod:`.http`: ``FakeUpstream``, a scriptable HTTP/1.1 Anthropic and OpenAI upstream;
- :mod:`.script`: a reply's script (``Reply``, ``Pause``, ``Abort``) and the request it answers;
- :mod:`.replies`: the replies it sends, in each provider's real wire shape;
- :mod:`.websocket`: ``FakeResponsesWS``, the OpenAI Responses WebSocket;
- :mod:`.calibration`: the paced upstream of ``trioproxy fake-upstream``, which a benchmark
  client's figures are held against.

``from trioproxy.testing import FakeUpstream, anthropic_sse`` is the public way in. Run the
HTTP fake standalone with ``python -m trioproxy.testing --port 9000``.
"""

from .http import ConnInfo, FakeUpstream
from .replies import (
    anthropic_json,
    anthropic_sse,
    default_reply,
    error_reply,
    models_list,
    openai_chat_json,
    openai_chat_sse,
    openai_responses_json,
    openai_responses_sse,
)
from .script import COMPACT, Abort, JSONStyle, Pause, RecordedRequest, Reply, header_values

__all__ = [
    "COMPACT", "Abort", "ConnInfo", "FakeUpstream", "JSONStyle", "Pause", "RecordedRequest",
    "Reply", "anthropic_json", "anthropic_sse", "default_reply", "error_reply", "header_values",
    "models_list", "openai_chat_json", "openai_chat_sse", "openai_responses_json",
    "openai_responses_sse",
]
