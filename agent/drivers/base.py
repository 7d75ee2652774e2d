"""What every driver shares: the sink it feeds, its statistics, the check rows it returns.

A driver owns one endpoint (a TCP device, a serial bus, an OPC-UA server): it is the
only task that talks to it, so reads, writes and reconnects never race. It turns device
answers into readings for the sampler (``Sink.offer``) and reports a device that
stopped answering (``Sink.fail``) instead of inventing values.
"""

from __future__ import annotations

import abc
import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fieldtwin.agent.commands import WriteOutcome
from fieldtwin.agent.config import DeviceConfig, PointConfig
from fieldtwin.agent.util import now_ms, within
from fieldtwin.protocol.messages import Quality, Value


class Sink(Protocol):
    """Where readings go (the sampler, through the agent)."""

    def offer(self, index: int, value: Value, ts_ms: int, quality: Quality) -> None: ...

    def fail(self, index: int) -> None: ...


@dataclass(slots=True)
class SourceStats:
    """Per-device counters an operator looks at in ``fieldtwin agent status``."""

    requests: int = 0
    failures: int = 0
    latency_ms_avg: float = 0.0
    latency_ms_max: float = 0.0
    last_success_ms: int | None = None
    last_failure_ms: int | None = None
    last_error: str = ""
    connected: bool = False
    reconnects: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def success(self, latency_s: float) -> None:
        latency_ms = latency_s * 1000
        self.requests += 1
        # Exponentially weighted: recent latency matters, one slow reply does not dominate.
        self.latency_ms_avg = (
            latency_ms if self.requests == 1 else 0.9 * self.latency_ms_avg + 0.1 * latency_ms
        )
        self.latency_ms_max = max(self.latency_ms_max, latency_ms)
        self.last_success_ms = now_ms()

    def failure(self, error: str) -> None:
        self.requests += 1
        self.failures += 1
        self.last_failure_ms = now_ms()
        self.last_error = error

    @property
    def success_ratio(self) -> float | None:
        return None if not self.requests else (self.requests - self.failures) / self.requests

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "success_ratio": self.success_ratio,
            "latency_ms_avg": round(self.latency_ms_avg, 2),
            "latency_ms_max": round(self.latency_ms_max, 2),
            "last_success_ms": self.last_success_ms,
            "last_failure_ms": self.last_failure_ms,
            "last_error": self.last_error,
            "connected": self.connected,
            "reconnects": self.reconnects,
            **self.extra,
        }


@dataclass(slots=True)
class CheckRow:
    """One point's line in ``fieldtwin agent check``."""

    point: PointConfig
    ok: bool
    value: Value = None
    quality: Quality = Quality.BAD
    raw: str = ""
    """The raw material: registers in hex, the OPC-UA variant type, the sensor line."""
    alternatives: dict[str, Value] = field(default_factory=dict)
    """Value under each byte/word order (registers) — empty for other protocols."""
    implausible: list[str] = field(default_factory=list)
    """Order names whose value looks implausible (configured order included)."""
    error: str = ""
    ts_ms: int | None = None


class Driver(abc.ABC):
    """Owner of one endpoint. ``points`` pairs each point with its sampler index."""

    def __init__(self, device: DeviceConfig, points: Sequence[tuple[int, PointConfig]]) -> None:
        self.device = device
        self.points = list(points)
        self.stats = SourceStats()

    @property
    def id(self) -> str:
        return self.device.id

    @abc.abstractmethod
    async def run(self, sink: Sink) -> None:
        """Read forever; never raises for device trouble (it reports and retries)."""

    @abc.abstractmethod
    async def write(self, point: PointConfig, value: Value) -> WriteOutcome:
        """Write through the owner task, then read the point back."""

    @abc.abstractmethod
    async def check(self) -> list[CheckRow]:
        """Connect, read every point once, and describe what came back."""

    def status(self) -> dict[str, Any]:
        return self.stats.as_dict()


class Timer:
    """Measures one request for the statistics."""

    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


async def sleep_or(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; returns True early if ``event`` is set."""
    if seconds <= 0:
        return event.is_set()
    try:
        await within(seconds, event.wait())
    except TimeoutError:
        return False
    return True


def serial_port_problem(path: str) -> str:
    """Why a serial port cannot be opened, in words a technician can act on ("" if it
    looks usable). pymodbus reports a missing port only as a failed connect, which
    reads like a refused TCP connection."""
    if not os.path.exists(path):
        if os.path.islink(path):
            return f"serial port {path} is a link to a device that does not exist"
        return (
            f"serial port {path} does not exist (adapter unplugged? see /dev/serial/by-id/ "
            "for stable names)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no permission to open serial port {path} (add the agent's user to the port's "
            "group, usually dialout)"
        )
    return ""
