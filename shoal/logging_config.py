"""Log lines as text or JSON (`--log-format`), the same for shoal's, uvicorn's and the engine core's loggers.

Standard library only (no torch, no server stack), so that the engine core process, which imports no
server module, formats its lines the same way: `shoal serve` exports the choice in SHOAL_LOG_FORMAT and
the spawned core reads it back.

A record may carry structured fields (`logger.info(msg, extra={"fields": {...}})`, as the access log
does): JSON lines hold them as top-level keys, text lines append them as `key=value`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "SHOAL_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the record's fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        fields = getattr(record, "fields", None)
        line = super().formatMessage(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={_text(value)}" for key, value in fields.items())


def _text(value: object) -> str:
    # Strings (prompts, finish reasons) are quoted so that a space inside one cannot shift the columns.
    return (
        json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (str, list)) else str(value)
    )


def configure_logging(level: str, log_format: str = "text") -> None:
    """Route every logger (shoal, uvicorn, warnings) through one stderr handler in `log_format`.

    uvicorn is then run with log_config=None, so that its loggers propagate here instead of to its own
    handlers (https://www.uvicorn.org/settings/#logging)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warnings.warn becomes a log line in the same format
