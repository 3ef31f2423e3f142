"""The upstream HTTP client: an HTTP/1.1-over-trio keep-alive pool."""

from .connection import UpstreamResponse, build_request, default_ssl_context
from .pool import UpstreamPool, UpstreamRequest

__all__ = ["UpstreamPool", "UpstreamRequest", "UpstreamResponse", "build_request",
           "default_ssl_context"]
