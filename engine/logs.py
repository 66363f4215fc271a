"""Logging set-up for the command-line entry points (never called at import time)."""

from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool = False) -> None:
    # TensorFlow and absl are chatty on stderr; keep the user's terminal readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
