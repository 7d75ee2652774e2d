"""Rate-limited logging: bounded lines, exact summaries."""

from __future__ import annotations

import io
import logging

from fieldtwin.protocol.logfmt import LogfmtFormatter, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger(f"test.ratelimit.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_a_flood_gives_a_burst_then_one_summary_per_key() -> None:
    logger, stream = capture()
    clock = Clock()
    limiter = RateLimitedLog(logger, "rejected (summary)", interval_s=60, burst=3, clock=clock)
    written = [
        limiter.log(("gw-01", "bad_signature"), logging.WARNING, "rejected") for _ in range(1000)
    ]
    assert written.count(True) == 3
    limiter.log(("gw-02", "schema"), logging.WARNING, "rejected")
    clock.now = 61
    assert limiter.flush() == 1  # gw-01 suppressed 997; gw-02 suppressed nothing
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5
    assert "sender=gw-01 reason=bad_signature" in lines[0]
    assert "further_lines=" in lines[2]
    assert "suppressed=997" in lines[-1]
    assert 'msg="rejected (summary)"' in lines[-1]
    assert limiter.suppressed == 997


def test_lines_are_bounded_however_many_senders_there_are() -> None:
    logger, stream = capture()
    clock = Clock()
    limiter = RateLimitedLog(logger, "summary", burst=2, max_keys=10, clock=clock)
    for i in range(10_000):
        limiter.log((f"gw-{i}", "schema"), logging.WARNING, "rejected")
    clock.now = 100
    limiter.flush()
    lines = stream.getvalue().splitlines()
    # 10 keys with a line each, then the shared overflow key ("*"): 2 lines and a summary
    assert len(lines) == 10 + 2 + 1
    assert "suppressed=9988" in lines[-1]
    assert "sender=*" in lines[-1]


def test_a_new_window_starts_after_the_interval_and_summarises_the_last() -> None:
    logger, stream = capture()
    clock = Clock()
    limiter = RateLimitedLog(logger, "summary", interval_s=10, burst=1, clock=clock)
    for _ in range(5):
        limiter.log(("hub", "replay"), logging.INFO, "rejected")
    clock.now = 11
    limiter.log(("hub", "replay"), logging.INFO, "rejected")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "level=info" in lines[1]
    assert "suppressed=4" in lines[1]
