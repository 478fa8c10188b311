"""Logging for the long-running commands (``edge-node``, ``edgesplit controller``).

edgesplit's own INFO lines (start-up, plan changes, warnings about what is served) reach
stderr; other libraries' only from WARNING (torch's tracer logs at INFO).
"""

from __future__ import annotations

import logging


def log_to_stderr() -> None:
    """Send log records to stderr with a timestamp: edgesplit's from INFO, the rest from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("edgesplit").setLevel(logging.INFO)
