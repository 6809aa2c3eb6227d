"""Console logging for the command-line tools: this project's messages at INFO, libraries' at WARNING.

orbax and absl log every checkpoint step at INFO; letting them through buries the lines a user needs.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(*names: str) -> None:
    """Root logger at WARNING; ``fairdiff_jax`` (and the extra logger ``names``, e.g. a script's) at INFO."""
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    for name in ("fairdiff_jax", *names):
        logging.getLogger(name).setLevel(logging.INFO)
