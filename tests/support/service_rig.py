"""The hub service in process, as a test drives it: a controllable clock, signed frames
in, signed answers and commands out (decoded and verified as an operator or agent would)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from fieldtwin.hub.ingest import Inbound
from fieldtwin.hub.service import ALARM_TOPIC, Effects, HubService
from fieldtwin.hub.store import TwinStore
from fieldtwin.protocol.approvals import sign_approval
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import Command, CommandResult, OperatorRequest, OperatorResponse
from fieldtwin.protocol.topics import operator_request_topic, uplink_topic
from support.hub_env import GatewaySigner, HubFiles

T0 = 1_800_000_000_000


@dataclass
class Clock:
    now_ms: int = T0

    def __call__(self) -> float:
        return self.now_ms / 1000

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@dataclass
class Rig:
    files: HubFiles
    clock: Clock
    service: HubService
    gw: GatewaySigner
    hub_keys: KeyRegistry
    sent: list[Command] = field(default_factory=list)

    @property
    def store(self) -> TwinStore:
        return self.service.store

    def feed(self, *messages: tuple[str, bytes]) -> Effects:
        batch = [Inbound(t, p, self.clock.now_ms) for t, p in messages]
        outcome, effects = self.service.ingest_batch(batch)
        assert outcome.error is None
        self._collect(effects)
        return effects

    def ask(self, operator: str, op: str, args: dict[str, Any] | None = None) -> OperatorResponse:
        body = OperatorRequest(secrets.token_hex(12), self.clock.now_ms + 30_000, op, args or {})
        payload = FrameSigner(operator, self.files.operator_keys[operator]).encode(
            1, 1, self.clock.now_ms, body
        )
        effects = self.service.handle_request(operator_request_topic(operator), payload)
        answers = self._collect(effects)
        assert len(answers) == 1, answers
        assert answers[0].to == operator
        return answers[0]

    def ok(self, operator: str, op: str, args: dict[str, Any] | None = None) -> Any:
        answer = self.ask(operator, op, args)
        assert answer.ok, (answer.code, answer.error)
        return answer.result

    def approve(self, operator: str, command_id: str) -> Any:
        row = self.ok(operator, "cmd.show", {"cmd_id": command_id})
        digest = bytes.fromhex(row["digest"])
        approval = sign_approval(operator, self.files.operator_keys[operator], digest)
        return self.ask(
            operator,
            "cmd.approve",
            {"cmd_id": command_id, "signature": approval.signature, "key_id": approval.key_id},
        )

    def tick(self, ms: int = 0) -> Effects:
        self.clock.advance(ms)
        effects = self.service.command_tick()
        self._collect(effects)
        return effects

    def result(self, command: Command, status: str, readback: Any) -> Effects:
        body = CommandResult(command.cmd_id, status, "", readback, self.clock.now_ms)
        frame = self.gw.signer.encode(self.gw.epoch, self.gw.next_seq(), self.clock.now_ms, body)
        return self.feed((uplink_topic("gw-01", "cmd_result"), frame))

    def _collect(self, effects: Effects) -> list[OperatorResponse]:
        answers = []
        for item in effects.publish:
            if item.topic == ALARM_TOPIC:
                continue  # JSON for dashboards, not a signed frame
            frame = decode_frame(item.payload, self.hub_keys)
            if isinstance(frame.body, OperatorResponse):
                answers.append(frame.body)
            elif isinstance(frame.body, Command):
                assert item.topic == "ft/v1/gw-01/down/cmd"
                self.sent.append(frame.body)
        return answers

    def audit_actions(self) -> list[str]:
        return [row[0] for row in self.store.query("SELECT action FROM audit ORDER BY seq")]
