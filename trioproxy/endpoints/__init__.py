"""The proxy's own endpoints, answered here and never forwarded upstream: health and readiness,
``/metrics``, the usage page, ``GET /v1/usage/{id}``, the draining 503, and who may read them."""
