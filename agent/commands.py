"""Commands from the hub: the agent's own policy (sans-I/O) and the executor.

The hub has approved a command, but the gateway is the last line of defence in front
of the plant, so it checks again with its own configuration:

1. idempotency: a ``cmd_id`` seen before is answered ``duplicate`` with the original
   outcome, never executed twice (ids are persisted in the outbox file, and marked
   ``pending`` *before* the device is touched, so even a crash mid-write cannot lead
   to a second write);
2. expiry: ``expires_at_ms`` in the past → ``expired``;
3. allow-list: the point exists on this gateway and is ``writable = true``;
4. approvals (when ``[approvals]`` lists operators): at least ``required`` valid
   signatures of distinct listed operators over the command's digest, which covers the
   point, the value and the restore value (a rollback: the parent's digest, and its id
   must be ``<parent>.rb``, so one approval authorises one write and one restore). Points
   in ``unattended`` take commands without approvals. A compromised hub alone cannot
   actuate;
5. type and limits: a number for numeric points (whole for unscaled integers), true or
   false for bool points, text for string points; within ``min``/``max``.

Then the driver writes with the same codec it reads with and reads the value back;
``ok`` means the read-back value equals the written one (within the register's
resolution), ``failed`` that the write or the read-back did not work.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from fieldtwin.agent.codec import FLOAT_DTYPES, INTEGER_DTYPES
from fieldtwin.agent.config import PointConfig
from fieldtwin.agent.errors import AgentError, OutboxError
from fieldtwin.agent.outbox import AsyncOutbox, Committed
from fieldtwin.agent.util import now_ms, within
from fieldtwin.protocol.approvals import approval_digest, check_approvals, rollback_id
from fieldtwin.protocol.frames import Frame
from fieldtwin.protocol.keys import PublicKey
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import Command, CommandResult, Quality, Value

log = logging.getLogger("fieldtwin.agent.commands")


@dataclass(frozen=True, slots=True)
class Accept:
    point: PointConfig
    value: Value


@dataclass(frozen=True, slots=True)
class Refuse:
    status: str  # "rejected" or "expired"
    detail: str


@dataclass(frozen=True, slots=True)
class Approvers:
    """The operator keys this gateway trusts, loaded from ``[approvals]``."""

    keys: Mapping[str, tuple[PublicKey, ...]]
    required: int = 1
    unattended: frozenset[str] = frozenset()

    def check(self, command: Command) -> Refuse | None:
        point = f"{command.entity}.{command.attribute}"
        if point in self.unattended:
            return None
        if command.rollback_of and command.cmd_id != rollback_id(command.rollback_of):
            return Refuse(
                "rejected",
                f"a rollback of {command.rollback_of} must have id "
                f"{rollback_id(command.rollback_of)}, not {command.cmd_id}",
            )
        checked = check_approvals(command.approvals, self.keys, approval_digest(command))
        if len(checked.valid) >= self.required:
            return None
        problems = "; ".join(checked.problems) or "it carries none"
        return Refuse(
            "rejected",
            f"needs {self.required} valid operator approval(s), has {len(checked.valid)}: "
            f"{problems}",
        )


def check_command(
    command: Command,
    *,
    gateway: str,
    now_ms: int,
    points: Mapping[tuple[str, str], PointConfig],
    approvers: Approvers | None = None,
) -> Accept | Refuse:
    """The agent's policy for one command; pure, so it is tested exhaustively."""
    if command.to != gateway:
        return Refuse("rejected", f"command is addressed to {command.to!r}, not {gateway!r}")
    if command.expires_at_ms <= now_ms:
        late = now_ms - command.expires_at_ms
        return Refuse("expired", f"command expired {late} ms before it could run")
    point = points.get((command.entity, command.attribute))
    if point is None:
        return Refuse(
            "rejected", f"{command.entity}.{command.attribute} is not a point of this gateway"
        )
    if not point.writable:
        return Refuse("rejected", f"{point.name} is not writable on this gateway (allow-list)")
    if approvers is not None:
        refusal = approvers.check(command)
        if refusal is not None:
            return refusal
    value = command.value
    dtype = point.dtype
    if dtype == "bool":
        if not isinstance(value, bool):
            return Refuse("rejected", f"{point.name} takes true or false, got {value!r}")
        return Accept(point, value)
    if dtype == "string":
        if not isinstance(value, str):
            return Refuse("rejected", f"{point.name} takes text, got {value!r}")
        return Accept(point, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Refuse("rejected", f"{point.name} takes a number, got {value!r}")
    if not math.isfinite(value):
        return Refuse("rejected", f"{value!r} is not a finite number")
    if dtype in INTEGER_DTYPES and point.scale == 1 and point.offset == 0:
        if value != int(value):
            return Refuse("rejected", f"{point.name} is a whole number ({dtype}), got {value!r}")
        value = int(value)
    if point.min is not None and value < point.min:
        return Refuse("rejected", f"{value!r} is below the limit {point.min} of {point.name}")
    if point.max is not None and value > point.max:
        return Refuse("rejected", f"{value!r} is above the limit {point.max} of {point.name}")
    return Accept(point, value)


def readback_matches(point: PointConfig, written: Value, readback: Value) -> bool:
    """Equal within the resolution of the point's storage."""
    if isinstance(written, (bool, str)) or written is None:
        return type(readback) is type(written) and readback == written

    if isinstance(readback, bool) or not isinstance(readback, int | float):
        return False
    if point.dtype in INTEGER_DTYPES:
        tolerance = abs(point.scale) / 2 + 1e-9 * max(1.0, abs(written))
    elif point.dtype == "float32" or (point.dtype in FLOAT_DTYPES and point.table):
        tolerance = 1e-6 * max(1.0, abs(written))
    else:
        tolerance = 1e-9 * max(1.0, abs(written))
    return abs(readback - written) <= tolerance


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    value: Value
    ts_ms: int
    quality: Quality


Writer = Callable[[PointConfig, Value], Awaitable[WriteOutcome]]


class CommandExecutor:
    """Runs one command at a time: policy, durable idempotency, write, read back, answer."""

    def __init__(
        self,
        *,
        gateway: str,
        points: Mapping[tuple[str, str], PointConfig],
        outbox: AsyncOutbox,
        writer: Writer,
        deliver: Callable[[list[Committed]], None],
        write_timeout_s: float = 10.0,
        approvers: Approvers | None = None,
    ) -> None:
        self.gateway = gateway
        self.points = points
        self.outbox = outbox
        self.writer = writer
        self.deliver = deliver
        self.write_timeout_s = write_timeout_s
        self.approvers = approvers
        self._lock = asyncio.Lock()
        self.outcomes: dict[str, int] = {}

    async def handle(self, frame: Frame) -> None:
        command = frame.body
        if not isinstance(command, Command):
            return
        async with self._lock:
            try:
                result, record = await self._execute(command)
                committed = await self.outbox.call(
                    self.outbox.sync.command_finish, result, record=record
                )
            except OutboxError as exc:
                # Without the durable record the command must not run; the hub times
                # it out and the operator sees why in the agent's log.
                log.error(
                    "command not executed: buffer unavailable",
                    extra=fields(cmd_id=command.cmd_id, error=str(exc)),
                )
                return
        self.outcomes[result.status] = self.outcomes.get(result.status, 0) + 1
        log.info(
            "command handled",
            extra=fields(
                cmd_id=command.cmd_id,
                point=f"{command.entity}.{command.attribute}",
                value=command.value,
                status=result.status,
                detail=result.detail,
                approved_by=",".join(command.approved_by),
            ),
        )
        self.deliver([committed])

    async def _execute(self, command: Command) -> tuple[CommandResult, bool]:
        sync = self.outbox.sync
        previous = await self.outbox.call(sync.command, command.cmd_id)
        if previous is not None:
            detail = (
                "outcome unknown: the agent stopped while executing it"
                if previous.status == "pending"
                else f"already handled: {previous.status}"
                + (f" ({previous.detail})" if previous.detail else "")
            )
            return (
                CommandResult(
                    command.cmd_id,
                    "duplicate",
                    detail,
                    previous.readback,
                    previous.readback_ts_ms,
                ),
                False,
            )
        decision = check_command(
            command,
            gateway=self.gateway,
            now_ms=now_ms(),
            points=self.points,
            approvers=self.approvers,
        )
        if isinstance(decision, Refuse):
            return CommandResult(command.cmd_id, decision.status, decision.detail), True
        await self.outbox.call(sync.command_begin, command.cmd_id)
        try:
            outcome = await within(
                self.write_timeout_s, self.writer(decision.point, decision.value)
            )
        except TimeoutError:
            return CommandResult(
                command.cmd_id, "failed", "the device did not confirm in time"
            ), True
        except AgentError as exc:
            return CommandResult(command.cmd_id, "failed", str(exc)), True
        if outcome.quality not in (Quality.GOOD, Quality.UNCERTAIN):
            return (
                CommandResult(
                    command.cmd_id,
                    "failed",
                    "written, but the read-back was not good",
                    outcome.value,
                    outcome.ts_ms,
                ),
                True,
            )
        if not readback_matches(decision.point, decision.value, outcome.value):
            return (
                CommandResult(
                    command.cmd_id,
                    "failed",
                    f"wrote {decision.value!r} but read back {outcome.value!r}",
                    outcome.value,
                    outcome.ts_ms,
                ),
                True,
            )
        return (
            CommandResult(command.cmd_id, "ok", "", outcome.value, outcome.ts_ms),
            True,
        )
