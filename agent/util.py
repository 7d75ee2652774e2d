"""Small pieces of timing logic shared by the agent's loops (sans-I/O where possible)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.protocol.aio import within

__all__ = ["Backoff", "Throttle", "TokenBucket", "cancel_and_wait", "now_ms", "within"]


def now_ms() -> int:
    """Wall clock in ms since 1970 (source timestamps, frame stamps)."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Backoff:
    """Jittered exponential backoff ("full jitter"): a fleet of gateways that lost the
    same broker does not reconnect in lockstep."""

    minimum: float = 0.5
    maximum: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * 2**self.attempts)
        self.attempts += 1
        return self.minimum / 2 + self.rng.uniform(0, ceiling - self.minimum / 2)

    def reset(self) -> None:
        self.attempts = 0


@dataclass(slots=True)
class TokenBucket:
    """Bounds a rate (the backlog lane's samples/s) while allowing a burst of one second."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def delay_for(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens (going into debt if needed); returns how long to wait."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    async def take(self, amount: float) -> None:
        delay = self.delay_for(amount, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(slots=True)
class Throttle:
    """Lets an event through at most once per ``interval`` seconds (log lines, alarms)."""

    interval: float
    last: float = float("-inf")
    suppressed: int = 0

    def ready(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self.last >= self.interval:
            self.last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], deadline_s: float = 10.0
) -> set[asyncio.Task[Any]]:
    """Cancel tasks and wait for them, cancelling again every half second (a library
    may swallow one cancellation). Returns the tasks still running at the deadline."""
    pending = {task for task in tasks if not task.done()}
    end = time.monotonic() + deadline_s
    while pending and time.monotonic() < end:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    return pending
