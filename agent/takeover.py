"""Is another agent using our gateway id? (sans-I/O, fed from the uplink's counters).

Two agents configured with one gateway id log in with the same MQTT client id (the
gateway id, which is also its MQTT username). The broker keeps one connection per client
id and closes the older one whenever the other connects, so both agents flap: connect,
birth, kicked off,
reconnect after the backoff, kick the other off... Over MQTT 3.1.1 the kicked client
is just disconnected, without a reason. What the agent can observe:

* connections that the broker ends shortly after they were established (sessions of
  less than ``short_s``), several within ``window_s``; a flaky network looks the same,
  so the log line says "probable";
* acks for another epoch on our downlink topic: the hub acknowledging frames of a
  second agent with its own buffer file (a strong sign, logged at once).

``observe`` is called about once a second with the uplink's counters and returns the
text of a log line when one is due (at most one per ``log_interval_s``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Suspicion:
    """Why we think another agent shares the gateway id, for one log line."""

    short_sessions: int
    window_s: float
    foreign_acks: int


class TakeoverDetector:
    def __init__(
        self,
        *,
        short_s: float = 60.0,
        count: int = 3,
        window_s: float = 600.0,
        log_interval_s: float = 300.0,
    ) -> None:
        self.short_s = short_s
        self.count = count
        self.window_s = window_s
        self.log_interval_s = log_interval_s
        self._short_ends: deque[float] = deque()
        self._completed = 0
        self._connected = False
        self._session_start_s: float | None = None
        self._foreign_acks = 0
        self._last_log_s = float("-inf")
        self.suspected_at_s: float | None = None
        """When the pattern was last seen (monotonic seconds), for the status file."""

    def observe(
        self, now_s: float, *, connects: int, connected: bool, foreign_acks: int
    ) -> Suspicion | None:
        """Feed the uplink counters (``connects`` ever made, ``connected`` now, acks
        rejected as ``other_epoch``); returns a Suspicion when a log line is due."""
        completed = connects - (1 if connected else 0)
        ended = completed - self._completed
        if ended > 0:
            # The oldest ended session may have started before the previous call; any
            # later ones started and ended between two calls, so they were short.
            first_short = (
                self._session_start_s is None or now_s - self._session_start_s < self.short_s
            )
            shorts = ended - 1 + (1 if first_short else 0)
            self._short_ends.extend([now_s] * shorts)
        if connected and (ended > 0 or not self._connected):
            self._session_start_s = now_s
        elif not connected:
            self._session_start_s = None
        self._completed = completed
        self._connected = connected
        while self._short_ends and now_s - self._short_ends[0] > self.window_s:
            self._short_ends.popleft()
        new_foreign = foreign_acks - self._foreign_acks
        self._foreign_acks = foreign_acks
        if len(self._short_ends) < self.count and new_foreign <= 0:
            return None
        self.suspected_at_s = now_s
        if now_s - self._last_log_s < self.log_interval_s:
            return None
        self._last_log_s = now_s
        return Suspicion(len(self._short_ends), self.window_s, foreign_acks)
