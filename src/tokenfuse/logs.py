"""One structured style for every log line tokenfuse writes: a JSON object with an ``event`` key.

Operators grep and ship these lines (Loki, Elasticsearch); a free-text message goes under ``message``. A leaf module
that every layer may import.
"""

from __future__ import annotations

import json
import logging

__all__ = ["log_event"]


def log_event(logger: logging.Logger, level: int, event: str, /, *, exc_info: bool = False, **fields: object) -> None:
    """Write one JSON line ``{"event": event, **fields}`` (values that are not JSON are written as text).

    Args:
        logger: where to log.
        level: ``logging.INFO``, ``logging.WARNING``, …
        event: stable snake_case name of what happened.
        exc_info: append the current exception's traceback (unexpected errors only).
        fields: the details.
    """
    if logger.isEnabledFor(level):
        logger.log(level, json.dumps({"event": event, **fields}, default=str), exc_info=exc_info)
