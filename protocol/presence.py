"""The hub's signed online state: producing it (hub) and believing it (agents). No I/O.

Agents act on the hub state: a hub session they have not seen makes them send a birth
and every unacknowledged frame again. So the state is a signed ``hub_state`` frame like
every other, and an agent believes only what moves forward:

* Each broker connection of the hub is a *session*, named by the seq of its ``online``
  frame. The MQTT will is signed at connect time, before the online frame is published,
  as ``online = false`` naming that session (the agent's ``death`` works the same way),
  and a clean stop publishes the same kind of frame with a fresh seq.
* ``PresenceView.observe`` takes an online frame only for a session later than the one
  it knows (same hub epoch, or a newer epoch), an offline frame only for the session it
  knows or a later one; anything older is a ``Replay`` (or ``StaleEpoch``), refused.
  The retained copy delivered again on every subscribe is the known session: "same".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fieldtwin.protocol.errors import Replay, StaleEpoch
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.messages import HubState

Verdict = Literal["new_session", "same", "offline"]


class HubPresence:
    """The hub's side: signed ``hub_state`` frames for each broker connection.

    ``take_seq`` returns the next (epoch, seq) of the hub's own sequence (persisted by
    the caller), so state frames never reuse a seq of an ack or a command.
    """

    def __init__(
        self,
        signer: FrameSigner,
        instance: str,
        take_seq: Callable[[], tuple[int, int]],
        clock_ms: Callable[[], int],
    ) -> None:
        self.signer = signer
        self.instance = instance
        self.take_seq = take_seq
        self.clock_ms = clock_ms
        self.session = 0
        self.epoch = 0

    def connect(self) -> tuple[bytes, bytes]:
        """(will, online) for a new connection: pass the will to the MQTT client, publish
        the online frame retained once connected."""
        online = self.open()
        return self.offline("connection lost"), online

    def open(self) -> bytes:
        """The online frame of a new session (its seq names the session)."""
        epoch, seq = self.take_seq()
        self.epoch, self.session = epoch, seq
        return self.signer.encode(epoch, seq, self.clock_ms(), HubState(True, self.instance))

    def offline(self, reason: str) -> bytes:
        """An offline state naming the current session (the will, or a clean stop)."""
        epoch, seq = self.take_seq()
        body = HubState(False, self.instance, session=self.session, reason=reason)
        return self.signer.encode(epoch, seq, self.clock_ms(), body)


@dataclass(slots=True)
class PresenceView:
    """An agent's belief about the hub: the latest session seen and whether it is online."""

    epoch: int = 0
    session: int = 0
    online: bool | None = None
    instance: str = ""

    def observe(self, epoch: int, seq: int, body: HubState) -> Verdict:
        """Apply one verified ``hub_state`` frame or raise ``Replay``/``StaleEpoch``."""
        if self.online is not None and epoch < self.epoch:
            raise StaleEpoch(
                f"hub state of hub epoch {epoch}; the hub's current epoch is {self.epoch}"
            )
        newer_epoch = self.online is None or epoch > self.epoch
        session = body.session_seq(seq)
        if body.online:
            if not newer_epoch and session < self.session:
                raise Replay(
                    f"hub online state of session {session}; session {self.session} is newer"
                )
            if not newer_epoch and session == self.session:
                if not self.online:
                    raise Replay(f"hub online state of session {session}, which already ended")
                return "same"
            self.epoch, self.session, self.online = epoch, session, True
            self.instance = body.instance
            return "new_session"
        if not newer_epoch and session < self.session:
            raise Replay(f"hub offline state of session {session}; session {self.session} is newer")
        if not newer_epoch and session == self.session and self.online is False:
            return "same"
        self.epoch, self.session, self.online = epoch, session, False
        self.instance = body.instance
        return "offline"
