"""``python -m trioproxy.testing --port 9000``: serve the HTTP fake upstream until interrupted."""

from .http import main

main()
