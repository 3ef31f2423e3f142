"""The upstream HTTP client: an h11-over-trio keep-alive pool."""

from .pool import UpstreamPool, UpstreamResponse, default_ssl_context

__all__ = ["UpstreamPool", "UpstreamResponse", "default_ssl_context"]
