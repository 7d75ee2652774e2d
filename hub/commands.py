"""The command lifecycle: a pure state machine, in the style of the alarm book.

Operations take ``now`` (and what the caller verified) and return the transitions they
made; the service stores each transition and its audit record, and sends frames. The
book never touches the network, the database or a clock, so every path is tested with
plain values (tests/hub/test_commands.py, property tests included).

States (terminal ones in capitals in the diagram)::

    proposed ─policy─► REFUSED
        │ ok
        ▼
    awaiting_approval ─reject─► REJECTED      (cancel ─► CANCELLED, timeout ─► EXPIRED)
        │ enough distinct approvers (two-person rule: not the proposer)
        ▼
    approved ──select window passes unsent─► EXPIRED; policy fails at send ─► REFUSED
        │ hub-signed cmd published
        ▼
    sent ──cmd_result ok/duplicate─► executed
        │                              │ twin reports the target within tolerance
        │                              ▼
        │                           VERIFIED
        ├─ result failed / deadline passes without convergence ─► failed
        ▼
    failed ──rollback none, or no checkpoint─► FAILED
        │ rollback auto (original approvals) or propose (new approvals)
        ▼
    rolling_back ─ rollback command verified ─► ROLLED_BACK; otherwise ─► ROLLBACK_FAILED

A rollback is itself a command (id ``<parent>.rb``) through the same policy, writing the
parent's checkpoint value; it never rolls back itself. At most one command is in flight
(not terminal) per attribute, a parent and its own rollback excepted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fieldtwin.hub.config import AttributeSpec, CommandRule
from fieldtwin.hub.errors import CommandError
from fieldtwin.hub.policy import Verdict, within_tolerance
from fieldtwin.hub.state import CurrentValue
from fieldtwin.protocol.approvals import command_digest, rollback_id
from fieldtwin.protocol.messages import Approval, Value

ACTIVE = ("awaiting_approval", "approved", "sent", "executed", "failed", "rolling_back")
TERMINAL = (
    "refused",
    "rejected",
    "cancelled",
    "expired",
    "verified",
    "failed_final",
    "rolled_back",
    "rollback_failed",
)
STATES = ("proposed", *ACTIVE, *TERMINAL)
SUCCESS_RESULTS = ("ok", "duplicate")


@dataclass(slots=True)
class Checkpoint:
    """The restore point: the reported value before the command, and the twin's hash."""

    value: Value
    ts_ms: int
    quality: int
    twin_hash: str
    taken_ms: int


@dataclass(slots=True)
class ApprovalRecord:
    operator: str
    key_id: str
    signature: bytes
    at_ms: int
    request: str = ""

    def approval(self) -> Approval:
        return Approval(self.operator, self.key_id, self.signature)


@dataclass(slots=True)
class CommandRecord:
    id: str
    gateway: str
    entity: str
    attribute: str
    value: Value
    reason: str
    source: str
    """``operator``, ``reconciliation`` (an auto_correct proposal) or ``rollback``."""
    proposed_by: str
    proposed_ms: int
    state: str
    updated_ms: int
    approvals_required: int
    two_person: bool
    tolerance: float
    verify_timeout_ms: int
    select_window_ms: int
    expiry_ms: int
    rollback_mode: str
    approval_deadline_ms: int
    digest: str
    """Hex of the digest approvers sign (a rollback's is its parent's)."""
    checkpoint: Checkpoint | None = None
    policy: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[ApprovalRecord] = field(default_factory=list)
    approved_ms: int | None = None
    send_deadline_ms: int | None = None
    sent_ms: int | None = None
    expires_at_ms: int | None = None
    sends: int = 0
    result_status: str | None = None
    result_detail: str = ""
    result_readback: Value = None
    result_ms: int | None = None
    verify_deadline_ms: int | None = None
    verified_ms: int | None = None
    closed_ms: int | None = None
    outcome: str = ""
    alarm_id: str | None = None
    rollback_of: str | None = None
    rollback_id: str | None = None
    rollback_from: Value = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.entity, self.attribute)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def approvers(self) -> list[str]:
        return [a.operator for a in self.approvals]

    def row(self) -> dict[str, Any]:
        """Plain data (bytes as hex) for storage, the API and the operator channel."""
        data = asdict(self)
        data["approvals"] = [{**a, "signature": a["signature"].hex()} for a in data["approvals"]]
        data["state_label"] = label(self.state)
        return data

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CommandRecord:
        data = {k: v for k, v in row.items() if k in cls.__dataclass_fields__}
        checkpoint = data.get("checkpoint")
        data["checkpoint"] = Checkpoint(**checkpoint) if checkpoint else None
        data["approvals"] = [
            ApprovalRecord(**{**a, "signature": bytes.fromhex(a["signature"])})
            for a in data.get("approvals", [])
        ]
        return cls(**data)


def label(state: str) -> str:
    return {"failed_final": "failed", "awaiting_approval": "awaiting approval"}.get(
        state, state.replace("_", " ")
    )


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of one command, with a copy of the command after it."""

    change: str
    command: CommandRecord
    at_ms: int
    before: str
    actor: str = "hub"
    request: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def after(self) -> str:
        return self.command.state


@dataclass(slots=True)
class Outcome:
    """What an operation did: transitions to store, and rollbacks the caller must plan
    (a rollback needs a fresh policy verdict, which only the caller can compute)."""

    transitions: list[Transition] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    """Commands that became approved and should be sent now."""

    def extend(self, other: Outcome) -> None:
        self.transitions.extend(other.transitions)
        self.rollbacks.extend(other.rollbacks)
        self.send.extend(other.send)


@dataclass(frozen=True, slots=True)
class RuleParams:
    """A ``CommandRule`` resolved to what one command needs (milliseconds, tolerance)."""

    approvals: int
    two_person: bool
    tolerance: float
    verify_timeout_ms: int
    select_window_ms: int
    approval_timeout_ms: int
    expiry_ms: int
    rollback: str

    @classmethod
    def of(cls, spec: AttributeSpec) -> RuleParams:
        rule = spec.command or CommandRule()
        return cls(
            approvals=rule.approvals,
            two_person=rule.two_person,
            tolerance=rule.tolerance_for(spec),
            verify_timeout_ms=int(rule.verify_timeout_s * 1000),
            select_window_ms=int(rule.select_window_s * 1000),
            approval_timeout_ms=int(rule.approval_timeout_s * 1000),
            expiry_ms=int(rule.expiry_s * 1000),
            rollback=rule.rollback,
        )


class CommandBook:
    """Commands by id with the operations that move them through their lifecycle."""

    def __init__(self, commands: Iterable[CommandRecord] = (), next_number: int = 1) -> None:
        self.commands: dict[str, CommandRecord] = {c.id: c for c in commands}
        self.next_number = next_number

    # -- queries ---------------------------------------------------------------------------

    def get(self, command_id: str) -> CommandRecord:
        command = self.commands.get(command_id)
        if command is None:
            raise CommandError(f"no command {command_id}", code="not_found")
        return command

    def in_flight(self) -> dict[tuple[str, str], str]:
        """Attribute → "C-000012 (awaiting approval)" for every command not yet settled."""
        out: dict[tuple[str, str], str] = {}
        for command in sorted(self.commands.values(), key=lambda c: c.id):
            if not command.terminal:
                out.setdefault(command.key, f"{command.id} ({label(command.state)})")
        return out

    def active(self) -> list[CommandRecord]:
        return [c for c in self.commands.values() if not c.terminal]

    def adopt(self, commands: Iterable[CommandRecord], gateways: Container[str]) -> None:
        """Replace the commands of ``gateways`` with ``commands`` (as stored by the
        worker that ran them before): a worker taking partitions over goes on with them."""
        self.drop(gateways)
        for command in commands:
            self.commands[command.id] = command

    def drop(self, gateways: Container[str]) -> None:
        """Forget the commands of ``gateways`` (a worker that lost their partitions)."""
        for command_id, command in list(self.commands.items()):
            if command.gateway in gateways:
                del self.commands[command_id]

    def forget_settled(self, keep: int = 200) -> None:
        """Drop settled commands from memory beyond the newest ``keep`` (the store has them)."""
        settled = sorted((c for c in self.commands.values() if c.terminal), key=lambda c: c.id)
        for command in settled[:-keep] if keep else settled:
            del self.commands[command.id]

    # -- helpers ---------------------------------------------------------------------------

    def _new_id(self) -> str:
        number = self.next_number
        self.next_number += 1
        return f"C-{number:06d}"

    def _move(
        self,
        command: CommandRecord,
        state: str,
        change: str,
        now_ms: int,
        out: Outcome,
        *,
        actor: str = "hub",
        request: str = "",
        **detail: Any,
    ) -> None:
        before = command.state
        command.state = state
        command.updated_ms = now_ms
        if state in TERMINAL and command.closed_ms is None:
            command.closed_ms = now_ms
        out.transitions.append(
            Transition(change, copy.deepcopy(command), now_ms, before, actor, request, detail)
        )

    # -- proposing -------------------------------------------------------------------------

    def propose(
        self,
        *,
        gateway: str,
        entity: str,
        attribute: str,
        value: Value,
        reason: str,
        actor: str,
        source: str,
        params: RuleParams,
        verdict: Verdict,
        checkpoint: Checkpoint | None,
        now_ms: int,
        request: str = "",
        alarm_id: str | None = None,
    ) -> Outcome:
        """A new command, checked by ``verdict``: refused, awaiting approval, or (when its
        rule needs no approver) approved at once."""
        command_id = self._new_id()
        restore = checkpoint.value if checkpoint is not None else None
        command = CommandRecord(
            id=command_id,
            gateway=gateway,
            entity=entity,
            attribute=attribute,
            value=value,
            reason=reason,
            source=source,
            proposed_by=actor,
            proposed_ms=now_ms,
            state="proposed",
            updated_ms=now_ms,
            approvals_required=params.approvals,
            two_person=params.two_person,
            tolerance=params.tolerance,
            verify_timeout_ms=params.verify_timeout_ms,
            select_window_ms=params.select_window_ms,
            expiry_ms=params.expiry_ms,
            rollback_mode=params.rollback,
            approval_deadline_ms=now_ms + params.approval_timeout_ms,
            digest=command_digest(command_id, gateway, entity, attribute, value, restore).hex(),
            checkpoint=checkpoint,
            policy=verdict.rows(),
            alarm_id=alarm_id,
        )
        self.commands[command_id] = command
        out = Outcome()
        out.transitions.append(
            Transition(
                "proposed",
                copy.deepcopy(command),
                now_ms,
                "none",
                actor,
                request,
                {"value": value, "reason": reason, "source": source},
            )
        )
        self._checked(command, verdict, now_ms, out, actor=actor, request=request)
        return out

    def _checked(
        self,
        command: CommandRecord,
        verdict: Verdict,
        now_ms: int,
        out: Outcome,
        *,
        actor: str,
        request: str,
        inherited: bool = False,
    ) -> None:
        if not verdict.ok:
            command.outcome = "; ".join(verdict.refusals)
            self._move(
                command,
                "refused",
                "refused",
                now_ms,
                out,
                actor=actor,
                request=request,
                refusals=verdict.refusals,
            )
            self._settle_parent(command, now_ms, out)
            return
        if command.approvals_required == 0 or inherited:
            self._approved(command, now_ms, out, actor=actor, request=request)
            return
        self._move(
            command,
            "awaiting_approval",
            "policy_passed",
            now_ms,
            out,
            actor=actor,
            request=request,
            approvals_required=command.approvals_required,
            two_person=command.two_person,
        )

    def _approved(
        self, command: CommandRecord, now_ms: int, out: Outcome, *, actor: str, request: str
    ) -> None:
        command.approved_ms = now_ms
        command.send_deadline_ms = now_ms + command.select_window_ms
        self._move(
            command,
            "approved",
            "approved",
            now_ms,
            out,
            actor=actor,
            request=request,
            approvers=command.approvers,
        )
        out.send.append(command.id)

    # -- operators -------------------------------------------------------------------------

    def approve(
        self,
        command_id: str,
        operator: str,
        approval: ApprovalRecord,
        now_ms: int,
        request: str = "",
    ) -> Outcome:
        """Add one verified approval (the caller checked the signature over ``digest``)."""
        command = self.get(command_id)
        if command.state != "awaiting_approval":
            raise CommandError(
                f"{command_id} is {label(command.state)}; only commands awaiting approval can "
                "be approved",
                code="conflict",
            )
        if command.two_person and operator == command.proposed_by:
            raise CommandError(
                f"two-person rule: {command_id} was proposed by {operator}; another approver "
                "must approve it",
                code="forbidden",
            )
        if operator in command.approvers:
            raise CommandError(f"{operator} has already approved {command_id}", code="conflict")
        command.approvals.append(approval)
        out = Outcome()
        self._move(
            command,
            "awaiting_approval",
            "approval_added",
            now_ms,
            out,
            actor=operator,
            request=request,
            approvals=len(command.approvals),
            required=command.approvals_required,
        )
        if len(command.approvals) >= command.approvals_required:
            self._approved(command, now_ms, out, actor=operator, request=request)
        return out

    def reject(
        self, command_id: str, operator: str, reason: str, now_ms: int, request: str = ""
    ) -> Outcome:
        command = self.get(command_id)
        if command.state != "awaiting_approval":
            raise CommandError(
                f"{command_id} is {label(command.state)}; only commands awaiting approval can "
                "be rejected",
                code="conflict",
            )
        command.outcome = f"rejected by {operator}: {reason}"
        out = Outcome()
        self._move(
            command,
            "rejected",
            "rejected",
            now_ms,
            out,
            actor=operator,
            request=request,
            reason=reason,
        )
        self._settle_parent(command, now_ms, out)
        return out

    def cancel(
        self, command_id: str, operator: str, reason: str, now_ms: int, request: str = ""
    ) -> Outcome:
        command = self.get(command_id)
        if command.state not in ("awaiting_approval", "approved"):
            raise CommandError(
                f"{command_id} is {label(command.state)}; only commands not yet sent can be "
                "cancelled",
                code="conflict",
            )
        command.outcome = f"cancelled by {operator}: {reason}"
        out = Outcome()
        self._move(
            command,
            "cancelled",
            "cancelled",
            now_ms,
            out,
            actor=operator,
            request=request,
            reason=reason,
        )
        self._settle_parent(command, now_ms, out)
        return out

    # -- sending ---------------------------------------------------------------------------

    def due(self) -> list[CommandRecord]:
        """Approved commands waiting to be sent."""
        return sorted(
            (c for c in self.commands.values() if c.state == "approved"), key=lambda c: c.id
        )

    def sent(self, command_id: str, expires_at_ms: int, now_ms: int) -> Outcome:
        command = self.get(command_id)
        if command.state != "approved":
            raise CommandError(f"{command_id} is {label(command.state)}, not approved")
        command.sent_ms = now_ms
        command.expires_at_ms = expires_at_ms
        command.verify_deadline_ms = now_ms + command.verify_timeout_ms
        command.sends += 1
        out = Outcome()
        self._move(
            command, "sent", "sent", now_ms, out, expires_at_ms=expires_at_ms, value=command.value
        )
        return out

    def resent(self, command_id: str, now_ms: int) -> None:
        """The same signed frame went out again (the gateway came back); no new state."""
        command = self.get(command_id)
        command.sends += 1
        command.updated_ms = now_ms

    def send_refused(self, command_id: str, verdict: Verdict, now_ms: int) -> Outcome:
        """The policy refused at send time what it allowed at proposal (select-before-operate)."""
        command = self.get(command_id)
        command.policy = verdict.rows()
        command.outcome = "refused at send: " + "; ".join(verdict.refusals)
        out = Outcome()
        self._move(command, "refused", "refused", now_ms, out, at="send", refusals=verdict.refusals)
        self._settle_parent(command, now_ms, out)
        return out

    # -- results and verification ----------------------------------------------------------

    def result(
        self,
        command_id: str,
        status: str,
        detail: str,
        readback: Value,
        now_ms: int,
        gateway: str,
    ) -> Outcome:
        """A ``cmd_result`` from the gateway. Unknown ids raise ``CommandError``."""
        command = self.get(command_id)
        out = Outcome()
        if gateway != command.gateway:
            raise CommandError(
                f"result for {command_id} came from {gateway}, not {command.gateway}"
            )
        if command.state not in ("sent", "executed"):
            # A late or repeated answer (e.g. "duplicate" after a resend): keep it on record.
            command.result_detail = command.result_detail or detail
            return out
        command.result_status, command.result_detail = status, detail
        command.result_readback, command.result_ms = readback, now_ms
        if status in SUCCESS_RESULTS:
            self._move(
                command,
                "executed",
                "result",
                now_ms,
                out,
                actor=gateway,
                status=status,
                detail=detail,
                readback=readback,
            )
        else:
            self._fail(command, f"gateway answered {status}: {detail}", now_ms, out, actor=gateway)
        return out

    def tick(self, now_ms: int, observe: Callable[[str, str], CurrentValue | None]) -> Outcome:
        """Expiries, verification against the twin, and deadlines, as of ``now_ms``."""
        out = Outcome()
        for command in sorted(self.active(), key=lambda c: c.id):
            state = command.state
            if state == "awaiting_approval" and now_ms >= command.approval_deadline_ms:
                waited = (command.approval_deadline_ms - command.proposed_ms) / 1000
                command.outcome = (
                    f"not approved within {waited:g} s ({len(command.approvals)} of "
                    f"{command.approvals_required} approvals)"
                )
                self._move(command, "expired", "expired", now_ms, out, waited="approval")
                self._settle_parent(command, now_ms, out)
            elif state == "approved" and now_ms >= (command.send_deadline_ms or now_ms):
                blocking = [c["text"] for c in command.policy if not c.get("ok", True)]
                command.outcome = (
                    f"approved but not sent within its select window of "
                    f"{command.select_window_ms / 1000:g} s"
                    + (f" ({'; '.join(blocking)})" if blocking else "")
                )
                self._move(command, "expired", "expired", now_ms, out, waited="send")
                self._settle_parent(command, now_ms, out)
            elif state in ("sent", "executed"):
                current = observe(command.entity, command.attribute)
                if self._converged(command, current):
                    assert current is not None
                    command.verified_ms = now_ms
                    command.outcome = (
                        f"reported {current.value!r} (target {command.value!r}, tolerance "
                        f"{command.tolerance:g})"
                    )
                    self._move(
                        command,
                        "verified",
                        "verified",
                        now_ms,
                        out,
                        reported=current.value,
                        reported_ts_ms=current.ts_ms,
                    )
                    self._settle_parent(command, now_ms, out)
                elif now_ms >= (command.verify_deadline_ms or now_ms):
                    seen = "nothing" if current is None else repr(current.value)
                    why = (
                        "no result from the gateway"
                        if command.result_status is None
                        else f"gateway answered {command.result_status}"
                    )
                    self._fail(
                        command,
                        f"did not converge within {command.verify_timeout_ms / 1000:g} s: "
                        f"reported {seen}, target {command.value!r} ({why})",
                        now_ms,
                        out,
                    )
        return out

    @staticmethod
    def _converged(command: CommandRecord, current: CurrentValue | None) -> bool:
        if current is None or current.quality != 0 or command.sent_ms is None:
            return False
        if not within_tolerance(current.value, command.value, command.tolerance):
            return False
        # Evidence from after the write: a sample received since it was sent, or the
        # gateway's own read-back of the target (report by exception stays quiet when a
        # setpoint is written to the value it already had).
        readback_ok = command.result_status in SUCCESS_RESULTS and within_tolerance(
            command.result_readback, command.value, command.tolerance
        )
        return current.received_ms >= command.sent_ms or readback_ok

    def _fail(
        self, command: CommandRecord, why: str, now_ms: int, out: Outcome, *, actor: str = "hub"
    ) -> None:
        command.outcome = why
        if (
            command.rollback_of is not None
            or command.rollback_mode == "none"
            or (command.checkpoint is None)
        ):
            # A rollback never rolls back itself; without a mode or a checkpoint it ends here.
            self._move(command, "failed_final", "failed", now_ms, out, actor=actor, reason=why)
            self._settle_parent(command, now_ms, out)
            return
        self._move(command, "failed", "failed", now_ms, out, actor=actor, reason=why)
        out.rollbacks.append(command.id)

    # -- rollback --------------------------------------------------------------------------

    def propose_rollback(
        self, parent_id: str, verdict: Verdict, now_ms: int, params: RuleParams
    ) -> Outcome:
        """The rollback of a failed command, to its checkpoint, through the same policy.

        ``auto``: approved at once under the parent's approvals (which signed a digest
        covering this restore); ``propose``: awaits new approvals of the same digest.
        """
        parent = self.get(parent_id)
        out = Outcome()
        if parent.state != "failed" or parent.checkpoint is None:
            raise CommandError(f"{parent_id} is {label(parent.state)}; nothing to roll back")
        child_id = rollback_id(parent.id)
        child = CommandRecord(
            id=child_id,
            gateway=parent.gateway,
            entity=parent.entity,
            attribute=parent.attribute,
            value=parent.checkpoint.value,
            reason=f"rollback of {parent.id}: {parent.outcome}",
            source="rollback",
            proposed_by="hub",
            proposed_ms=now_ms,
            state="proposed",
            updated_ms=now_ms,
            approvals_required=parent.approvals_required,
            two_person=False,
            tolerance=parent.tolerance,
            verify_timeout_ms=params.verify_timeout_ms,
            select_window_ms=params.select_window_ms,
            expiry_ms=params.expiry_ms,
            rollback_mode="none",
            approval_deadline_ms=now_ms + params.approval_timeout_ms,
            digest=parent.digest,
            checkpoint=None,
            policy=verdict.rows(),
            rollback_of=parent.id,
            rollback_from=parent.value,
        )
        auto = parent.rollback_mode == "auto"
        if auto:
            child.approvals = [copy.deepcopy(a) for a in parent.approvals]
        self.commands[child_id] = child
        parent.rollback_id = child_id
        self._move(
            parent,
            "rolling_back",
            "rollback_started",
            now_ms,
            out,
            rollback=child_id,
            mode=parent.rollback_mode,
            to=parent.checkpoint.value,
        )
        out.transitions.append(
            Transition(
                "proposed",
                copy.deepcopy(child),
                now_ms,
                "none",
                "hub",
                "",
                {"value": child.value, "reason": child.reason, "source": "rollback"},
            )
        )
        self._checked(child, verdict, now_ms, out, actor="hub", request="", inherited=auto)
        return out

    def _settle_parent(self, child: CommandRecord, now_ms: int, out: Outcome) -> None:
        """A rollback reached a terminal state: its parent settles with it."""
        if child.rollback_of is None or not child.terminal:
            return
        parent = self.commands.get(child.rollback_of)
        if parent is None or parent.state != "rolling_back":
            return
        if child.state == "verified":
            parent.outcome = f"rolled back to {child.value!r} by {child.id} after: {parent.outcome}"
            self._move(parent, "rolled_back", "rolled_back", now_ms, out, rollback=child.id)
        else:
            parent.outcome = (
                f"rollback {child.id} {label(child.state)} ({child.outcome}) after: "
                f"{parent.outcome}"
            )
            self._move(parent, "rollback_failed", "rollback_failed", now_ms, out, rollback=child.id)
