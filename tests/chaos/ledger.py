"""Match what the simulator served against what the hub stored (pure, no I/O).

Inputs are the simulator's ``served`` rows (every value a device answered, in the order
it answered them), the hub's ``history`` rows, and the lives of each agent process
(start, and the SIGKILL or clean stop that ended it). The rules the matching rests on,
all from the code, none from timing margins:

* One poll task per device asks, waits for the answer, stamps it (``ts_ms``) and only
  then asks again; the simulator records a value as served after sending it and before
  it reads the next request. So the sample of read *k* of a point has
  ``served[k-1].wall_ms <= ts_ms <= served[k+1].wall_ms``: with the value, that links
  every stored sample to the read it came from.
* With deadband 0 and no heartbeats, the agent reports every read whose value differs
  from the previous read (a *change*); it may report more (the first read after a
  start, the first good read after a BAD), never fewer.
* Samples are committed in the order they were read (one batcher, one buffer thread),
  and a committed sample reaches history. So a change lost before an agent SIGKILL is
  in the pre-commit window exactly when no sample of that gateway read *after* it, in
  the same process life, reached history.

Verdicts: ``duplicates`` (the same sample stored twice, or two stored samples claiming
one read), ``unmatched`` (a stored good sample no read explains), ``lost_in_window``
(lost, read but not committed before a SIGKILL: allowed), ``lost`` (any other loss: a
bug).
"""

from __future__ import annotations

import bisect
import math
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GOOD = 0
STALE = 3


@dataclass(frozen=True, slots=True)
class Read:
    point: str
    wall_ms: int
    value: float


@dataclass(frozen=True, slots=True)
class Stored:
    point: str
    gateway: str
    ts_ms: int
    value: Any
    quality: int


@dataclass(frozen=True, slots=True)
class Life:
    """One agent process: started at ``start_ms``; ``end_ms`` and how it ended."""

    gateway: str
    start_ms: int
    end_ms: int
    killed: bool


@dataclass
class Verdict:
    reads: int = 0
    changes: int = 0
    stored: int = 0
    stored_not_good: int = 0
    matched: int = 0
    duplicates: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lost_in_window: list[tuple[str, int]] = field(default_factory=list)
    """(description, ms from the read to the SIGKILL that lost it)."""

    @property
    def window_ms(self) -> int | None:
        return max((ms for _, ms in self.lost_in_window), default=None)

    def summary(self) -> dict[str, Any]:
        return {
            "served_reads": self.reads,
            "served_changes": self.changes,
            "stored_samples": self.stored,
            "stored_not_good": self.stored_not_good,
            "matched": self.matched,
            "duplicates": len(self.duplicates),
            "unmatched": len(self.unmatched),
            "lost_outside_window": len(self.lost),
            "lost_in_precommit_window": len(self.lost_in_window),
            "max_read_to_kill_ms_of_a_lost_read": self.window_ms,
        }


def same(a: Any, b: float) -> bool:
    """The same reading: equal, or the same float32 (the agent reports a float32 register
    as the shortest decimal of it, 2.5010474, where the simulator records the exact
    double, 2.501047372817993)."""
    if isinstance(a, bool):
        a = 1.0 if a else 0.0
    if not isinstance(a, int | float):
        return False
    if math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-9):
        return True
    try:
        return struct.pack("<f", float(a)) == struct.pack("<f", b)
    except OverflowError:
        return False


def reconcile(
    reads: Iterable[Read],
    stored: Iterable[Stored],
    lives: Sequence[Life],
    gateway_of: Mapping[str, str],
) -> Verdict:
    """Check every served change against history; see the module docstring."""
    verdict = Verdict()
    by_point: dict[str, list[Read]] = defaultdict(list)
    for read in reads:
        by_point[read.point].append(read)
    history: dict[str, list[Stored]] = defaultdict(list)
    everything = list(stored)
    verdict.stored = len(everything)
    verdict.stored_not_good = sum(1 for row in everything if row.quality != GOOD)
    for row in everything:
        history[row.point].append(row)
    for key, count in Counter(
        (r.point, r.ts_ms, repr(r.value), r.quality) for r in everything
    ).items():
        if count > 1:
            verdict.duplicates.append(f"{key[0]} ts={key[1]} value={key[2]} stored {count} times")
    lives_of: dict[str, list[Life]] = defaultdict(list)
    for life in sorted(lives, key=lambda x: x.start_ms):
        lives_of[life.gateway].append(life)
    # per gateway, the stored sample times (all points), to tell committed from not
    stamps: dict[str, list[int]] = defaultdict(list)
    for row in everything:
        if row.quality != STALE:  # a STALE sample keeps an old stamp; the rest are in read order
            stamps[row.gateway].append(row.ts_ms)
    for values in stamps.values():
        values.sort()

    for point in sorted(set(by_point) | set(history)):
        served = by_point.get(point, [])
        gateway = gateway_of.get(point) or history[point][0].gateway
        walls = [r.wall_ms for r in served]
        taken: dict[int, Stored] = {}
        for row in sorted(history.get(point, []), key=lambda r: r.ts_ms):
            if row.quality != GOOD:
                continue
            # reads k with walls[k-1] <= ts <= walls[k+1]
            first = max(0, bisect.bisect_left(walls, row.ts_ms) - 1)
            last = min(len(served) - 1, bisect.bisect_right(walls, row.ts_ms))
            candidates = [
                k
                for k in range(first, last + 1)
                if (k == 0 or walls[k - 1] <= row.ts_ms)
                and (k + 1 >= len(served) or row.ts_ms <= walls[k + 1])
                and same(row.value, served[k].value)
            ]
            free = [k for k in candidates if k not in taken]
            if free:
                taken[free[0]] = row
                verdict.matched += 1
            elif candidates:
                verdict.duplicates.append(
                    f"{point} ts={row.ts_ms} value={row.value!r}: a second sample of the read "
                    f"served at {walls[candidates[0]]}"
                )
            else:
                verdict.unmatched.append(
                    f"{point} ts={row.ts_ms} value={row.value!r}: no read of that value was "
                    "served around that time"
                )
        verdict.reads += len(served)
        for k, read in enumerate(served):
            if k > 0 and same(served[k - 1].value, read.value):
                continue
            verdict.changes += 1
            if k in taken:
                continue
            what = f"{point} value={read.value!r} served at {read.wall_ms}"
            life = _life_at(lives_of[gateway], read.wall_ms)
            if life is None or not life.killed:
                verdict.lost.append(what + _ended(life))
                continue
            # committed later? then this one was committed too, and must be in history
            later = walls[k + 1] if k + 1 < len(served) else None
            if later is not None and later < life.end_ms:
                times = stamps[gateway]
                i = bisect.bisect_right(times, later)
                if i < len(times) and times[i] < life.end_ms:
                    verdict.lost.append(
                        what + f": a sample of {gateway} read at {times[i]}, after it and "
                        f"before the SIGKILL at {life.end_ms}, was stored"
                    )
                    continue
            verdict.lost_in_window.append((what, life.end_ms - read.wall_ms))
    return verdict


def _life_at(lives: Sequence[Life], wall_ms: int) -> Life | None:
    """The process that read at ``wall_ms``: the last one started before it. A read
    served after its SIGKILL (the request was in flight) belongs to the killed one."""
    starts = [life.start_ms for life in lives]
    i = bisect.bisect_right(starts, wall_ms) - 1
    return lives[i] if i >= 0 else None


def _ended(life: Life | None) -> str:
    if life is None:
        return ": no agent process was running"
    return f": the agent life that read it ended cleanly at {life.end_ms}"
