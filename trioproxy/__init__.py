"""trioproxy: a streaming reverse proxy for LLM APIs on Trio.

``trioproxy:app`` is the raw ASGI application:

    hypercorn trioproxy:app --worker-class trio
"""

from .app import TrioProxy
from .config import Settings

__version__ = "0.1.0"

app = TrioProxy()

__all__ = ["Settings", "TrioProxy", "__version__", "app"]
