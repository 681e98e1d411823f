"""afterburner's logger: one handler on the ``afterburner`` logger, level from ``AFTERBURNER_LOG_LEVEL``
(default INFO). Engines configure their own loggers only, so without this our lines would be lost."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(levelname)s %(asctime)s [afterburner] %(message)s"


def get_logger(name: str = "afterburner") -> logging.Logger:
    root = logging.getLogger("afterburner")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("AFTERBURNER_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
