"""The ``trioproxy`` command and its sub-commands: ``serve`` (the tuned way to run the proxy),
``usage``, ``latency`` (report and ``--compare``), ``config`` and ``fake-upstream``. Nothing here
runs inside a request."""
