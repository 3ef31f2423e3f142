"""Settings: each declared once (``spec``) and read in one place (``settings``).

``Settings.from_env()`` reads ``TRIOPROXY_*`` and the TOML file it names; ``trioproxy serve``
reads its flags too. Every setting's flag, environment variable, TOML key and default are in
``spec.SPECS``; ``trioproxy config --markdown`` prints them as the README's table.
"""

from .settings import CONFIG_ENV, SPECS, ConfigError, Settings, UpstreamURL

__all__ = ["CONFIG_ENV", "SPECS", "ConfigError", "Settings", "UpstreamURL"]
