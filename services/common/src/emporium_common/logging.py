"""Structured logging: one JSON object per line on stdout, with the request id and trace id."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from .request_id import get_request_id

# Attributes every LogRecord has; anything else passed via ``extra=`` is logged as a field.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# Personal data that database errors echo: Postgres's "DETAIL:  Key (email)=(ada@example.com) already
# exists." and SQLAlchemy's "[parameters: (...)]" (the engine hides them; this also covers other engines).
_REDACTIONS = (
    (re.compile(r"(Key \((?:[^()]|\([^()]*\))*\)=\()(?:[^()]|\([^()]*\))*(\))"), r"\1<redacted>\2"),
    (re.compile(r"\[parameters: .*?\](?=\s*(?:\(Background|$))", re.S | re.M), "[parameters: <redacted>]"),
)


def redact(text: str) -> str:
    """Remove values that database errors copy into their messages (see _REDACTIONS)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _trace_ids() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": redact(record.getMessage()),
        }
        request_id = get_request_id()
        if request_id:
            entry["request_id"] = request_id
        trace_id, span_id = _trace_ids()
        if trace_id:
            entry["trace_id"], entry["span_id"] = trace_id, span_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (test runners swap it), not the one seen at setup."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str = "INFO", service: str = "emporium") -> None:
    """Route the root logger (and uvicorn's) to JSON lines on stdout. Safe to call more than once."""
    handler = _StdoutHandler()
    handler.setFormatter(JSONFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Our middleware logs every request with its id and duration; uvicorn's access log would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
