"""The twin's live state in memory, and the last-writer-wins merge that feeds it.

Pure: no I/O. Ingest computes a merge against this state, stores the result durably,
and only then folds it in, so memory never runs ahead of the database.

Last-writer-wins is decided per (entity, attribute) by the *source* timestamp. Ties on
the timestamp are broken by a total order on (quality, value) — a STALE verdict first
(it re-sends an aged reading with its original timestamp), then good quality, then
the value's kind and content — so the result never depends on arrival order:
the same set of samples always yields the same current state. Samples that lose go
to history only, which is how backfilled data lands without overwriting newer state.

Values are stored in DuckDB as (kind, num, txt) so one table holds bools, ints, floats
and text: kind 0 nil, 1 bool, 2 int (exact decimal in txt, approximate in num), 3 float,
4 text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from fieldtwin.protocol.messages import DeviceLink, Value

Key: TypeAlias = tuple[str, str]

KIND_NIL, KIND_BOOL, KIND_INT, KIND_FLOAT, KIND_TEXT = 0, 1, 2, 3, 4
QUALITY_NAMES = ("good", "uncertain", "bad", "stale")


def encode_value(value: Value) -> tuple[int, float | None, str | None]:
    kind = type(value)
    if kind is float:
        return KIND_FLOAT, value, None  # type: ignore[return-value]
    if kind is bool:
        return KIND_BOOL, 1.0 if value else 0.0, None
    if kind is int:
        return KIND_INT, float(value), str(value)  # type: ignore[arg-type]
    if kind is str:
        return KIND_TEXT, None, value  # type: ignore[return-value]
    return KIND_NIL, None, None


def encode_columns(
    values: Sequence[Value],
) -> tuple[list[int], list[float | None], list[str | None]]:
    """Column-wise ``encode_value``; the all-float case (most telemetry) skips the loop."""
    count = len(values)
    if count and set(map(type, values)) == {float}:
        return [KIND_FLOAT] * count, list(values), [None] * count  # type: ignore[arg-type]
    kinds: list[int] = []
    nums: list[float | None] = []
    txts: list[str | None] = []
    for value in values:
        kind, num, txt = encode_value(value)
        kinds.append(kind)
        nums.append(num)
        txts.append(txt)
    return kinds, nums, txts


def decode_value(kind: int, num: float | None, txt: str | None) -> Value:
    if kind == KIND_FLOAT:
        return num
    if kind == KIND_BOOL:
        return bool(num)
    if kind == KIND_INT:
        return int(txt) if txt is not None else None
    if kind == KIND_TEXT:
        return txt
    return None


def numeric(value: Value) -> float | None:
    """A value as a number for thresholds and rates (bools count as 0/1), else None."""
    kind = type(value)
    if kind is float or kind is int:
        return float(value)  # type: ignore[arg-type]
    if kind is bool:
        return 1.0 if value else 0.0
    return None


QUALITY_STALE = 3


def precedence(ts_ms: int, quality: int, value: Value) -> tuple[int, int, int, int, float, str]:
    """Total order used by last-writer-wins: newer source time; on the same source time
    a STALE verdict (an agent re-sends a reading that aged out with its ORIGINAL
    timestamp, so it is always later news about that reading), then better quality,
    then a deterministic order on the value itself."""
    kind, num, txt = encode_value(value)
    if kind == KIND_FLOAT:
        txt = repr(value)  # tells 0.0 from -0.0, which compare equal as numbers
    stale = 1 if quality == QUALITY_STALE else 0
    return (ts_ms, stale, -quality, kind, num if num is not None else 0.0, txt or "")


@dataclass(slots=True)
class CurrentValue:
    """The twin's view of one attribute: the latest sample by source time."""

    value: Value
    ts_ms: int
    quality: int
    gateway: str
    received_ms: int
    last_change_ms: int

    def wins_over(self, other: CurrentValue) -> bool:
        if self.ts_ms != other.ts_ms:
            return self.ts_ms > other.ts_ms
        return precedence(self.ts_ms, self.quality, self.value) > precedence(
            other.ts_ms, other.quality, other.value
        )


@dataclass(slots=True)
class RateEvent:
    """The latest rate of change that exceeded what is physically possible."""

    ts_ms: int
    rate: float
    previous: float
    value: float


@dataclass(slots=True)
class GatewayLink:
    """What the hub knows of one gateway's session (persisted in the ``gateways`` table)."""

    gateway: str
    epoch: int = 0
    birth_seq: int = 0
    online: bool = False
    last_frame_ms: int = 0
    last_birth_ms: int = 0
    death_ms: int = 0
    death_reason: str = ""
    frames: int = 0
    points: int = 0
    info: dict[str, str] = field(default_factory=dict)
    upto_frame: int = 0
    """The last frame id this link state includes (for replaying the frame journal)."""
    death_birth_seq: int = 0
    """The birth named by the last death applied (older deaths are replays)."""
    session: int = 0
    """The seq of the birth that opened the live connection (what its will names); 0 if
    unknown (a store from before births carried it)."""


@dataclass(slots=True)
class PointInfo:
    """Point metadata from a birth: what the gateway says it reports and how."""

    entity: str
    attribute: str
    gateway: str
    dtype: str
    unit: str
    writable: bool
    min: float | None
    max: float | None
    interval_ms: int
    source: str
    updated_ms: int
    device: str = ""
    """The agent device serving the point (from the birth; not persisted: the next birth
    after a hub restart brings it again)."""


@dataclass(frozen=True, slots=True)
class GatewayHeartbeat:
    """The latest accepted heartbeat of a gateway: its agent is alive, and which of its
    devices answer. In memory only; a restarted hub learns it from the next heartbeat."""

    received_ms: int
    epoch: int
    session: int
    beat: int
    interval_ms: int
    devices: tuple[DeviceLink, ...] = ()

    def down(self) -> dict[str, DeviceLink]:
        return {device.id: device for device in self.devices if not device.up}


@dataclass(slots=True)
class MergeResult:
    """Winners of one merge, not yet folded into the state."""

    winners: dict[Key, CurrentValue] = field(default_factory=dict)
    rate_events: dict[Key, RateEvent] = field(default_factory=dict)
    anchors: dict[Key, float] = field(default_factory=dict)
    considered: int = 0


RATE_TIME_BASE_MS = 1000
"""The shortest time a rate of change is measured over: two readings a few ms apart
(a subscription's notification next to a poll) would turn a sensor's noise into an
impossible rate (0.08 °C in 2 ms is 39 °C/s); a real jump beyond ``max_rate`` per
second is still one."""


@dataclass(frozen=True, slots=True)
class SemanticSpec:
    """The per-attribute knobs the merge needs (from the schema), kept flat for speed."""

    max_rate: float | None = None
    min_change: float = 0.0


class TwinState:
    """Current values, gateway links and point metadata of the whole twin."""

    def __init__(self) -> None:
        self.current: dict[Key, CurrentValue] = {}
        self.gateways: dict[str, GatewayLink] = {}
        self.points: dict[Key, PointInfo] = {}
        self.rate_events: dict[Key, RateEvent] = {}
        self.anchors: dict[Key, float] = {}
        """Per attribute with a ``min_change``, the value at its last change: a change is
        a move beyond ``min_change`` from there, so a value creeping in steps each below it
        still changes (compared sample to sample it would look frozen). In memory only:
        after a restart the first value seen is the anchor."""
        self.first_seen: dict[str, int] = {}
        self.persisted: set[Key] = set()
        """Keys that have a row in the store's ``current`` table."""
        self.unflushed: set[Key] = set()
        """Keys whose value (loaded from the frame journal) the ``current`` table lacks."""
        self.heartbeats: dict[str, GatewayHeartbeat] = {}
        """The latest heartbeat of each gateway (liveness that does not need device data)."""

    def link(self, gateway: str) -> GatewayLink:
        link = self.gateways.get(gateway)
        if link is None:
            link = self.gateways[gateway] = GatewayLink(gateway)
        return link

    def entities(self) -> set[str]:
        return {entity for entity, _ in self.current} | {entity for entity, _ in self.points}

    def merge(
        self,
        entities: Sequence[str],
        attributes: Sequence[str],
        values: Sequence[Value],
        stamps: Sequence[int],
        qualities: Sequence[int],
        gateway: str,
        received_ms: int,
        semantics: Mapping[Key, SemanticSpec],
        into: MergeResult | None = None,
    ) -> MergeResult:
        """Decide which samples become current, against the state plus ``into``'s winners.

        Nothing in ``self`` changes; ``apply`` folds the result in after it is stored.
        """
        result = into if into is not None else MergeResult()
        winners = result.winners
        current = self.current
        default = _NO_SEMANTICS
        for entity, attribute, value, ts_ms, quality in zip(
            entities, attributes, values, stamps, qualities, strict=True
        ):
            key = (entity, attribute)
            previous = winners.get(key) or current.get(key)
            if previous is not None:
                if ts_ms < previous.ts_ms:
                    continue
                if ts_ms == previous.ts_ms and precedence(ts_ms, quality, value) <= precedence(
                    previous.ts_ms, previous.quality, previous.value
                ):
                    continue
                spec = semantics.get(key, default)
                last_change = previous.last_change_ms
                if value != previous.value or type(value) is not type(previous.value):
                    new_num = numeric(value)
                    old_num = numeric(previous.value)
                    if new_num is None or old_num is None:
                        last_change = ts_ms
                    else:
                        if spec.min_change <= 0:
                            if new_num != old_num:
                                last_change = ts_ms
                        else:
                            anchor = result.anchors.get(key)
                            if anchor is None:
                                anchor = self.anchors.get(key, old_num)
                            if abs(new_num - anchor) > spec.min_change:
                                last_change = ts_ms
                                anchor = new_num
                            result.anchors[key] = anchor
                        if (
                            spec.max_rate is not None
                            and ts_ms > previous.ts_ms
                            and quality == 0
                            and previous.quality == 0
                        ):
                            elapsed = max(ts_ms - previous.ts_ms, RATE_TIME_BASE_MS)
                            rate = abs(new_num - old_num) * 1000.0 / elapsed
                            if rate > spec.max_rate:
                                result.rate_events[key] = RateEvent(ts_ms, rate, old_num, new_num)
            else:
                last_change = ts_ms
            winners[key] = CurrentValue(value, ts_ms, quality, gateway, received_ms, last_change)
            result.considered += 1
        return result

    def apply(self, result: MergeResult) -> None:
        self.current.update(result.winners)
        self.rate_events.update(result.rate_events)
        self.anchors.update(result.anchors)
        for entity, _ in result.winners:
            self.first_seen.setdefault(entity, result.winners[(entity, _)].received_ms)

    def snapshot_values(self) -> dict[str, dict[str, Value]]:
        """entity → attribute → value, for hashes and diffs."""
        out: dict[str, dict[str, Value]] = {}
        for (entity, attribute), current in sorted(self.current.items()):
            out.setdefault(entity, {})[attribute] = current.value
        return out


_NO_SEMANTICS = SemanticSpec()


def lww_fold(
    samples: Iterable[tuple[str, str, Value, int, int]],
) -> dict[Key, tuple[Value, int, int]]:
    """Reference last-writer-wins over plain tuples (used to test ``TwinState.merge``)."""
    best: dict[Key, tuple[Value, int, int]] = {}
    for entity, attribute, value, ts_ms, quality in samples:
        key = (entity, attribute)
        held = best.get(key)
        if held is None or precedence(ts_ms, quality, value) > precedence(
            held[1], held[2], held[0]
        ):
            best[key] = (value, ts_ms, quality)
    return best
