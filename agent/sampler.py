"""Report by exception (sans-I/O): deadband, max-silence heartbeat, BAD and STALE.

Rules, per point (``now`` is the agent's wall clock in ms, ``ts`` the source timestamp):

* The first reading, and any reading whose quality differs from the last one sent,
  is reported.
* A numeric reading is reported when it moved by more than ``deadband`` from the
  last value sent (``deadband = 0``: any change); other types when they change.
* Otherwise it is reported as a heartbeat once ``max_silence`` passed since the last
  report, provided its source timestamp is newer than the one last sent.
* A reading whose source timestamp is older than ``max_silence`` is STALE: it keeps
  its value and ORIGINAL timestamp, and is reported once (quality change).
* ``tick`` finds points whose newest reading has aged past ``max_silence`` without a
  newer one (a quiet subscription, a sensor that stopped talking, a poll that stopped)
  and reports them STALE once, again with the original timestamp.
* ``fail`` (the device stopped answering) reports BAD with value ``None`` once; the
  timestamp is when the agent gave up on the device, since there is no source time.
* A numeric reading outside the point's valid range (``valid_min``/``valid_max``), or
  a non-zero one below ``tiny`` in magnitude, is implausible: it is counted, handed to
  ``on_implausible`` (the agent logs it, rate limited), and sent with the point's
  ``out_of_range`` quality: BAD without a value, or UNCERTAIN with it. A wrong byte
  order or a broken transmitter is then visible at the hub instead of arriving as good
  data.

A value is never re-stamped: every timestamp sent is either one a source gave or the
moment a failure was detected. ``max_silence = 0`` turns heartbeats and STALE off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fieldtwin.protocol.messages import Quality, Sample, Value

GOOD, UNCERTAIN, BAD, STALE = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.STALE
_NUMBERS = (int, float)


@dataclass(frozen=True, slots=True)
class FilterSpec:
    entity: str
    attribute: str
    deadband: float = 0.0
    max_silence_ms: int = 60_000
    valid_min: float | None = None
    valid_max: float | None = None
    out_of_range: Quality = BAD
    tiny: float = 0.0
    """A non-zero reading smaller than this in magnitude is implausible too (float
    registers with a range: a wrong byte order turns 2.5 m into 4e-20 m, which sits
    inside a 0..5 m range)."""


Implausible = Callable[[str, str, Value, int], None]
"""``(entity, attribute, value, ts_ms)`` of a reading outside its valid range."""


_NEG_INF = -math.inf  # one float object shared by every unbounded point
_POS_INF = math.inf


class _Point:
    __slots__ = (
        "attribute",
        "deadband",
        "entity",
        "implausible",
        "latest_quality",
        "latest_ts",
        "latest_value",
        "max_silence",
        "out_of_range",
        "ranged",
        "sent",
        "sent_at",
        "tiny",
        "valid_max",
        "valid_min",
    )

    def __init__(self, spec: FilterSpec) -> None:
        self.entity = spec.entity
        self.attribute = spec.attribute
        self.deadband = spec.deadband
        self.max_silence = spec.max_silence_ms
        self.sent: Sample | None = None
        self.sent_at = 0
        self.latest_value: Value = None
        self.latest_ts = -1
        self.latest_quality = BAD
        self.ranged = spec.valid_min is not None or spec.valid_max is not None
        self.valid_min = _NEG_INF if spec.valid_min is None else spec.valid_min
        self.valid_max = _POS_INF if spec.valid_max is None else spec.valid_max
        self.out_of_range = spec.out_of_range
        self.tiny = spec.tiny
        self.implausible = 0


@dataclass(slots=True)
class SamplerCounters:
    offered: int = 0
    reported: int = 0
    heartbeats: int = 0
    stale: int = 0
    bad: int = 0
    implausible: int = 0


class Sampler:
    """Turns readings into the samples worth sending; ``emit`` receives each one."""

    def __init__(
        self,
        specs: Sequence[FilterSpec],
        emit: Callable[[Sample], None],
        on_implausible: Implausible | None = None,
    ) -> None:
        self._points = [_Point(spec) for spec in specs]
        self._emit = emit
        self._on_implausible = on_implausible
        self.counters = SamplerCounters()

    def __len__(self) -> int:
        return len(self._points)

    def _send(self, point: _Point, value: Value, ts_ms: int, quality: Quality, now: int) -> None:
        sample = Sample(point.entity, point.attribute, value, ts_ms, quality)
        point.sent = sample
        point.sent_at = now
        self.counters.reported += 1
        self._emit(sample)

    def offer(self, index: int, value: Value, ts_ms: int, quality: Quality, now_ms: int) -> None:
        """A reading from a driver."""
        point = self._points[index]
        self.counters.offered += 1
        if value is None or quality == BAD:
            value, quality = None, BAD
        else:
            if (
                point.ranged
                and type(value) in _NUMBERS
                and (
                    not point.valid_min <= value <= point.valid_max  # type: ignore[operator]
                    or (value and abs(value) < point.tiny)  # type: ignore[arg-type]
                )
            ):
                point.implausible += 1
                self.counters.implausible += 1
                if self._on_implausible is not None:
                    self._on_implausible(point.entity, point.attribute, value, ts_ms)
                quality = point.out_of_range
                if quality == BAD:
                    value = None
            if quality != BAD and point.max_silence and now_ms - ts_ms > point.max_silence:
                quality = STALE
        point.latest_value, point.latest_ts, point.latest_quality = value, ts_ms, quality
        sent = point.sent
        if sent is None or sent.quality != quality:
            if quality == BAD:
                self.counters.bad += 1
            elif quality == STALE:
                self.counters.stale += 1
            self._send(point, value, ts_ms, quality, now_ms)
            return
        if quality == BAD:
            return
        last = sent.value
        if type(value) in _NUMBERS and type(last) in _NUMBERS:
            if abs(value - last) > point.deadband:  # type: ignore[operator]
                self._send(point, value, ts_ms, quality, now_ms)
                return
        elif value != last or type(value) is not type(last):
            self._send(point, value, ts_ms, quality, now_ms)
            return
        if (
            point.max_silence
            and quality != STALE
            and now_ms - point.sent_at >= point.max_silence
            and ts_ms > sent.ts_ms
        ):
            self.counters.heartbeats += 1
            self._send(point, value, ts_ms, quality, now_ms)

    def fail(self, index: int, now_ms: int) -> None:
        """The device stopped answering for this point: BAD once, no value."""
        point = self._points[index]
        point.latest_value, point.latest_quality = None, BAD
        if point.sent is not None and point.sent.quality == BAD:
            return
        self.counters.bad += 1
        self._send(point, None, now_ms, BAD, now_ms)

    def tick(self, now_ms: int) -> None:
        """Report STALE for points whose newest reading aged past max silence."""
        for point in self._points:
            silence = point.max_silence
            if (
                not silence
                or point.latest_ts < 0
                or now_ms - point.latest_ts <= silence
                or point.latest_quality in (BAD, STALE)
            ):
                continue
            point.latest_quality = STALE
            self.counters.stale += 1
            self._send(point, point.latest_value, point.latest_ts, STALE, now_ms)

    def state(self) -> list[Sample]:
        """The last sample sent for each point that has reported (for births)."""
        return [point.sent for point in self._points if point.sent is not None]

    def last_sent(self, index: int) -> Sample | None:
        return self._points[index].sent

    def implausible_counts(self) -> dict[int, int]:
        """Readings outside the valid range so far, by point index (only points with any)."""
        return {i: p.implausible for i, p in enumerate(self._points) if p.implausible}
