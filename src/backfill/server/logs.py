"""Structured logs: one JSON object per line on stderr, with the job and user ids a line is about.

Callers pass ids as `extra={"job_id": ..., "user": ...}`; secrets are never passed. As a second line of
defence, API tokens and secret-looking query parameters are masked in every line, the access log included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("backfill.server")
_FIELDS = ("job_id", "user", "lane", "event", "status", "delivery", "url", "method", "path", "client")
# An API token (`bf_` and 43 URL-safe characters) wherever it appears.
_TOKEN = re.compile(r"bf_[A-Za-z0-9_-]{16,}")
# A query parameter whose name says it holds a secret: its value is never logged.
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&#]*(?:token|key|auth|pass|secret|sig|cred|session)[^=&#]*=)[^&#;\s]*")
MASK = "***"


def scrub(text: str) -> str:
    """The text with API tokens and the values of secret-named query parameters masked."""
    return _TOKEN.sub("bf_" + MASK, _SECRET_PARAM.sub(r"\1" + MASK, text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        elif record.stack_info:
            out["error"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(out, default=str)


class AccessFields(logging.Filter):
    """uvicorn's access lines as fields (method, path, status, client), the path's secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            path = scrub(str(path))
            record.args = (client, method, path, version, status)
            record.client, record.method, record.path, record.status = client, method, path, status
        return True


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("backfill").critical("uncaught error: %s", value, exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("backfill").critical(
        "uncaught error in thread %s: %s", getattr(args.thread, "name", "?"), args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure(level: str = "info") -> None:
    """Send every log line (backfill's, uvicorn's and its access log, libraries', warnings, uncaught
    errors) to stderr as one JSON object each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(AccessFields())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel("WARNING")  # libraries: warnings and errors only
    for name in ("backfill", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
