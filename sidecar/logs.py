"""Structured JSON logs: one object per line, never a token, cookie or secret.

Records carry only what the code puts in them; messages from our modules
never include token values, and the access line holds the route, not the query.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

ACCESS = logging.getLogger("sidecar.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, separators=(",", ":"), default=str)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True


def access(fields: dict[str, Any]) -> None:
    ACCESS.info("request", extra={"fields": fields})
