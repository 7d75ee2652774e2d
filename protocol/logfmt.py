"""Structured log lines (logfmt) for journald and grep.

Every line is ``ts=... level=... logger=... msg="..." key=value ...``. Call sites pass
fields with ``log.info("published", extra=fields(gateway=gw, frames=n))`` so the
message stays constant and searchable while the values vary.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

_FIELDS_ATTR = "ft_fields"


def fields(**values: Any) -> dict[str, Any]:
    """Wrap key/value pairs for the ``extra=`` argument of a logging call."""
    return {_FIELDS_ATTR: values}


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        extra = getattr(record, _FIELDS_ATTR, None)
        if isinstance(extra, dict):
            parts.extend(f"{key}={_quote(value)}" for key, value in extra.items())
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send fieldtwin's logs to stdout as logfmt (journald adds its own timestamp too)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Third-party libraries are chatty at INFO; their warnings still come through.
    for noisy in ("asyncua", "pymodbus", "amqtt", "transitions", "aiomqtt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
