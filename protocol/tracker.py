"""Delivered sequence ranges per (sender, epoch): the receiver's replay window.

Backfill and live data travel interleaved, so a high-water mark is not enough: seq
90 may arrive after seq 120 and is still new. The tracker keeps, for each sender,
its current epoch and a sorted list of disjoint, non-adjacent inclusive ranges of
delivered seqs. A newer epoch replaces the old one (the sender lost its durable
state); frames of an older epoch are refused as stale.

``check`` and ``record`` are separate so a receiver can refuse a replay before doing
work, yet record delivery only once the frame is durably stored.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fieldtwin.protocol.errors import NotMsgpack, Replay, SchemaViolation, StaleEpoch

_FORMAT_VERSION = 1


@dataclass(slots=True)
class _SenderWindow:
    epoch: int
    firsts: list[int] = field(default_factory=list)
    lasts: list[int] = field(default_factory=list)

    def find(self, seq: int) -> int:
        """Index of the range containing seq, or -1."""
        index = bisect_right(self.firsts, seq) - 1
        if index >= 0 and self.lasts[index] >= seq:
            return index
        return -1

    def add(self, first: int, last: int) -> None:
        firsts, lasts = self.firsts, self.lasts
        # Ranges that overlap or touch [first, last] are merged into it.
        lo = bisect_right(lasts, first - 2)
        hi = bisect_right(firsts, last + 1)
        if lo < hi:
            first = min(first, firsts[lo])
            last = max(last, lasts[hi - 1])
        firsts[lo:hi] = [first]
        lasts[lo:hi] = [last]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.firsts, self.lasts, strict=True))


class DeliveryTracker:
    """Which (sender, epoch, seq) have been delivered; replays and stale epochs refused."""

    def __init__(self) -> None:
        self._windows: dict[str, _SenderWindow] = {}

    # -- queries ------------------------------------------------------------------

    def epoch_of(self, sender: str) -> int | None:
        window = self._windows.get(sender)
        return None if window is None else window.epoch

    def ranges(self, sender: str, epoch: int | None = None) -> list[tuple[int, int]]:
        window = self._windows.get(sender)
        if window is None or (epoch is not None and window.epoch != epoch):
            return []
        return window.ranges()

    def gaps(self, sender: str) -> list[tuple[int, int]]:
        """Seqs below the highest delivered one that have not arrived (yet)."""
        window = self._windows.get(sender)
        if window is None or not window.firsts:
            return []
        holes: list[tuple[int, int]] = []
        expected = 1
        for first, last in zip(window.firsts, window.lasts, strict=True):
            if first > expected:
                holes.append((expected, first - 1))
            expected = last + 1
        return holes

    def delivered(self, sender: str, epoch: int, seq: int) -> bool:
        """Whether ``seq`` of ``epoch`` was delivered (False for any other epoch)."""
        window = self._windows.get(sender)
        return window is not None and window.epoch == epoch and window.find(seq) >= 0

    def highest(self, sender: str) -> int:
        window = self._windows.get(sender)
        return window.lasts[-1] if window is not None and window.lasts else 0

    def senders(self) -> list[str]:
        return sorted(self._windows)

    def snapshot(self) -> dict[str, tuple[int, tuple[tuple[int, int], ...]]]:
        """Comparable view of the whole state (used by tests and diagnostics)."""
        return {s: (w.epoch, tuple(w.ranges())) for s, w in sorted(self._windows.items())}

    # -- updates ------------------------------------------------------------------

    def check(self, sender: str, epoch: int, seq: int) -> None:
        """Raise ``Replay`` or ``StaleEpoch`` if the frame must be refused; change nothing."""
        if seq < 1:
            raise SchemaViolation(f"seq {seq} is not tracked (sequenced frames start at 1)")
        window = self._windows.get(sender)
        if window is None or epoch > window.epoch:
            return
        if epoch < window.epoch:
            raise StaleEpoch(
                f"{sender}: epoch {epoch} is older than the current epoch {window.epoch}"
            )
        if window.find(seq) >= 0:
            raise Replay(f"{sender}: seq {seq} of epoch {epoch} was already delivered")

    def record(self, sender: str, epoch: int, seq: int) -> bool:
        """Mark one seq delivered. Idempotent; returns False if it was already recorded."""
        return self.record_range(sender, epoch, seq, seq)

    def record_range(self, sender: str, epoch: int, first: int, last: int) -> bool:
        if not 1 <= first <= last:
            raise SchemaViolation(f"invalid seq range [{first}, {last}]")
        window = self._window_for(sender, epoch)
        index = window.find(first)
        if index >= 0 and window.lasts[index] >= last:
            return False
        window.add(first, last)
        return True

    def accept(self, sender: str, epoch: int, seq: int) -> None:
        """``check`` then ``record``, for receivers whose storage is not separate."""
        self.check(sender, epoch, seq)
        self.record(sender, epoch, seq)

    def close_below(self, sender: str, epoch: int, low_water: int) -> None:
        """The sender says every seq below ``low_water`` is settled (acked or dropped)."""
        if low_water > 1:
            self.record_range(sender, epoch, 1, low_water - 1)

    def forget(self, sender: str) -> None:
        self._windows.pop(sender, None)

    def _window_for(self, sender: str, epoch: int) -> _SenderWindow:
        window = self._windows.get(sender)
        if window is None or epoch > window.epoch:
            window = _SenderWindow(epoch)
            self._windows[sender] = window
        elif epoch < window.epoch:
            raise StaleEpoch(
                f"{sender}: epoch {epoch} is older than the current epoch {window.epoch}"
            )
        return window

    # -- persistence --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "senders": {
                sender: {"epoch": w.epoch, "ranges": [list(r) for r in w.ranges()]}
                for sender, w in self._windows.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> DeliveryTracker:
        try:
            if data["format"] != _FORMAT_VERSION:
                raise SchemaViolation(f"tracker state format {data['format']!r} is not supported")
            tracker = cls()
            for sender, entry in data["senders"].items():
                epoch = entry["epoch"]
                if type(sender) is not str or type(epoch) is not int:
                    raise SchemaViolation("tracker state: bad sender or epoch")
                window = _SenderWindow(epoch)
                for first, last in entry["ranges"]:
                    if type(first) is not int or type(last) is not int or not 1 <= first <= last:
                        raise SchemaViolation(f"tracker state: bad range {first!r}-{last!r}")
                    window.add(first, last)
                tracker._windows[sender] = window
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SchemaViolation(f"tracker state is malformed: {exc!r}") from None
        return tracker

    def dumps(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_dict(), use_bin_type=True)
        return packed

    @classmethod
    def loads(cls, data: bytes) -> DeliveryTracker:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise NotMsgpack(f"tracker state is not valid msgpack: {exc}") from None
        return cls.from_dict(obj)
