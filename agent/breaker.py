"""Circuit breaker per Modbus unit id (sans-I/O; the caller passes the clock).

On a shared bus every request to a dead unit costs a full timeout, and the bus can
carry only one request at a time, so one dead slave would stretch every other unit's
poll cycle. The breaker bounds that cost:

* ``closed``: requests pass. A failure opens the breaker at once, so the unit's other
  blocks due in the same cycle are skipped: a cycle pays at most one timeout per unit.
* ``open``: requests are refused until the cooldown ends. The cooldown starts at
  ``cooldown_s`` and doubles with each consecutive failure up to ``max_cooldown_s``.
* ``half_open``: after the cooldown one probe request passes; success closes the
  breaker, failure opens it again with a longer cooldown.

``down`` turns true after ``threshold`` consecutive failures: that is when the unit is
declared "not answering" and its points are reported BAD (once). A single lost reply
therefore costs one skipped cycle, not a BAD sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    threshold: int = 3
    cooldown_s: float = 1.0
    max_cooldown_s: float = 60.0
    state: str = CLOSED
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    opened_count: int = field(default=0)
    """How many times the breaker opened (an operator counter)."""

    def allow(self, now: float) -> bool:
        """May a request go out now? In half-open state only the first caller probes."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now < self.open_until:
                return False
            self.state = HALF_OPEN
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> bool:
        """Record an answer; returns True if the unit was declared down until now."""
        was_down = self.down
        self.state = CLOSED
        self.failures = 0
        self.probing = False
        return was_down

    def failure(self, now: float) -> bool:
        """Record a missing answer; returns True when this failure declares the unit down."""
        was_down = self.down
        self.failures += 1
        self.probing = False
        if self.state != OPEN:
            self.opened_count += 1
        self.state = OPEN
        cooldown = min(self.cooldown_s * 2 ** (self.failures - 1), self.max_cooldown_s)
        self.open_until = now + cooldown
        return self.down and not was_down

    @property
    def down(self) -> bool:
        return self.failures >= self.threshold

    def retry_at(self) -> float:
        """When the next request may pass (``0`` when closed)."""
        return self.open_until if self.state == OPEN else 0.0
