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


class RateLimitedLog:
    """Log lines keyed by (sender, reason) and bounded per key, with a summary line.

    A flood of bad frames must not flood the journal: each key gets at most ``burst``
    lines per ``interval_s`` window; what it suppresses is counted and reported in one
    summary line when the window closes (on the next line for that key, or when
    ``flush`` runs, which the owner calls periodically). At most ``max_keys`` keys are
    tracked per window; further senders share the key ``("*", reason)``, so the lines
    per window are bounded by ``(max_keys + reasons) * (burst + 1)`` whatever the input.
    Counting the events themselves is the caller's job: this only decides about lines.
    """

    def __init__(
        self,
        logger: logging.Logger,
        summary: str,
        *,
        key_names: tuple[str, str] = ("sender", "reason"),
        interval_s: float = 60.0,
        burst: int = 3,
        max_keys: int = 64,
        clock: Any = time.monotonic,
    ) -> None:
        self.logger = logger
        self.summary = summary
        self.key_names = key_names
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple[str, str], list[Any]] = {}
        """key → [window start, lines written, lines suppressed, level]."""
        self.lines = 0
        self.suppressed = 0

    def log(self, key: tuple[str, str], level: int, msg: str, **values: Any) -> bool:
        """Write the line unless its key used up its burst; returns whether it was written."""
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] >= self.interval_s:
            self._close(key, window)
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys and key[0] != "*":
                return self.log(("*", key[1]), level, msg, **values, **{self.key_names[0]: key[0]})
            window = self._windows[key] = [now, 0, 0, level]
        window[3] = max(window[3], level)
        if window[1] >= self.burst:
            window[2] += 1
            self.suppressed += 1
            return False
        window[1] += 1
        self.lines += 1
        named = {self.key_names[0]: key[0], self.key_names[1]: key[1]}
        if window[1] == self.burst:
            named["further_lines"] = f"suppressed for {self.interval_s:g} s, then summarised"
        self.logger.log(level, msg, extra=fields(**{**named, **values}))
        return True

    def flush(self) -> int:
        """Close every window that has ended; returns the summary lines written."""
        now = self.clock()
        written = 0
        for key, window in list(self._windows.items()):
            if now - window[0] >= self.interval_s:
                written += self._close(key, window)
        return written

    def _close(self, key: tuple[str, str], window: list[Any]) -> int:
        del self._windows[key]
        if not window[2]:
            return 0
        self.lines += 1
        self.logger.log(
            window[3],
            self.summary,
            extra=fields(
                **{self.key_names[0]: key[0], self.key_names[1]: key[1]},
                suppressed=window[2],
                window_s=round(self.clock() - window[0], 1),
            ),
        )
        return 1
