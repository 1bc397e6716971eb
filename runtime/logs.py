"""How vnodes' processes log: plain lines, or JSON lines that carry the job, the membership epoch
and the step (``vnodes --log-format json``, or ``VNODES_LOG_FORMAT=json`` in the environment).

One JSON object per line::

    {"time": "2026-12-03T18:41:40.031Z", "level": "WARNING", "logger": "vnodes.runtime.agent",
     "message": "step 52: reduction failed (...); reporting it", "job": "train.py:spec",
     "worker": "7af7eda5b926", "membership_epoch": 5, "step": 52}

The master and the worker agent keep the context current (``set_log_context``): one job per
process, so the context is the process's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Optional, Union

LOG_FORMAT_ENV = "VNODES_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_context: dict[str, Any] = {}
_lock = threading.Lock()


def set_log_context(**fields: Any) -> None:
    """Set fields every later record carries (None removes one)."""
    with _lock:
        for key, value in fields.items():
            if value is None:
                _context.pop(key, None)
            else:
                _context[key] = value


def log_context() -> dict[str, Any]:
    with _lock:
        return dict(_context)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time (UTC, ISO 8601), level, logger, message, the context, and
    the exception's traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"time": stamp, "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               **log_context()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_format_from_env() -> str:
    value = os.environ.get(LOG_FORMAT_ENV, "text") or "text"
    if value not in LOG_FORMATS:
        from .errors import VnodesError

        raise VnodesError(f"{LOG_FORMAT_ENV}={value!r} is not a log format; use one of {', '.join(LOG_FORMATS)}")
    return value


def configure_logging(level: Union[int, str], log_format: Optional[str] = None) -> None:
    """The root logger's handler on stderr, in ``log_format`` (default: ``VNODES_LOG_FORMAT``, else text)."""
    handler = logging.StreamHandler()
    fmt = log_format or log_format_from_env()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
