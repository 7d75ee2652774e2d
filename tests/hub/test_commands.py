"""The command lifecycle (pure): every path, and property tests of its invariants."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from fieldtwin.hub.commands import (
    ApprovalRecord,
    Checkpoint,
    CommandBook,
    Outcome,
    RuleParams,
)
from fieldtwin.hub.errors import CommandError
from fieldtwin.hub.policy import Check, Verdict
from fieldtwin.hub.state import CurrentValue
from fieldtwin.protocol.approvals import command_digest

ALLOW = Verdict((Check("limits", True, "ok"),))
DENY = Verdict((Check("interlock x", False, "interlock x refused: level too low"),))


def params(**changes: Any) -> RuleParams:
    base: dict[str, Any] = {
        "approvals": 1,
        "two_person": True,
        "tolerance": 5.0,
        "verify_timeout_ms": 10_000,
        "select_window_ms": 30_000,
        "approval_timeout_ms": 60_000,
        "expiry_ms": 5_000,
        "rollback": "auto",
    }
    base.update(changes)
    return RuleParams(**base)


def checkpoint(value: float = 900.0) -> Checkpoint:
    return Checkpoint(value, 1, 0, "sha256:x", 1)


def propose(
    book: CommandBook,
    *,
    value: float = 1200.0,
    verdict: Verdict = ALLOW,
    rule: RuleParams | None = None,
    now: int = 1000,
    attribute: str = "speed_sp",
    actor: str = "olga",
) -> Outcome:
    return book.propose(
        gateway="gw-01",
        entity="pump-1",
        attribute=attribute,
        value=value,
        reason="raise inflow",
        actor=actor,
        source="operator",
        params=rule or params(),
        verdict=verdict,
        checkpoint=checkpoint(),
        now_ms=now,
    )


def approval(operator: str, at: int = 0) -> ApprovalRecord:
    return ApprovalRecord(operator, "0123456789abcdef", bytes(64), at)


def reported(value: Any, received_ms: int, quality: int = 0) -> CurrentValue:
    return CurrentValue(value, received_ms, quality, "gw-01", received_ms, received_ms)


def changes(outcome: Outcome) -> list[str]:
    return [t.change for t in outcome.transitions]


def test_happy_path_with_two_person_rule_and_readback_verification() -> None:
    book = CommandBook()
    proposed = propose(book)
    command = proposed.transitions[-1].command
    assert command.id == "C-000001"
    assert changes(proposed) == ["proposed", "policy_passed"]
    assert command.state == "awaiting_approval"
    assert (
        command.digest
        == command_digest("C-000001", "gw-01", "pump-1", "speed_sp", 1200.0, 900.0).hex()
    )
    with pytest.raises(CommandError, match="two-person rule"):
        book.approve(command.id, "olga", approval("olga"), 1100)
    approved = book.approve(command.id, "piet", approval("piet"), 1200)
    assert changes(approved) == ["approval_added", "approved"]
    assert approved.send == [command.id]
    sent = book.sent(command.id, 6200, 1300)
    assert changes(sent) == ["sent"]
    assert book.commands[command.id].verify_deadline_ms == 11_300
    result = book.result(command.id, "ok", "", 1200, 1400, "gw-01")
    assert changes(result) == ["result"]
    assert book.commands[command.id].state == "executed"
    # the twin still shows the old value: not verified yet
    assert book.tick(1500, lambda e, a: reported(900.0, 1450)).transitions == []
    verified = book.tick(1600, lambda e, a: reported(1203.0, 1550))
    assert changes(verified) == ["verified"]
    assert book.commands[command.id].state == "verified"
    assert book.commands[command.id].closed_ms == 1600


def test_refused_by_policy_is_final_and_explains_why() -> None:
    book = CommandBook()
    refused = propose(book, verdict=DENY)
    command = refused.transitions[-1].command
    assert changes(refused) == ["proposed", "refused"]
    assert command.state == "refused"
    assert "level too low" in command.outcome
    with pytest.raises(CommandError):
        book.approve(command.id, "piet", approval("piet"), 2000)


def test_never_two_in_flight_is_the_policys_job_and_the_book_reports_in_flight() -> None:
    book = CommandBook()
    first = propose(book).transitions[-1].command
    assert book.in_flight() == {("pump-1", "speed_sp"): f"{first.id} (awaiting approval)"}
    book.cancel(first.id, "olga", "changed my mind", 1500)
    assert book.in_flight() == {}


def test_expiries_of_approval_and_select_window() -> None:
    book = CommandBook()
    waiting = propose(book, now=0).transitions[-1].command
    expired = book.tick(60_000, lambda e, a: None)
    assert changes(expired) == ["expired"]
    assert "not approved within 60 s" in book.commands[waiting.id].outcome
    approved = propose(book, now=70_000).transitions[-1].command
    book.approve(approved.id, "piet", approval("piet"), 70_100)
    # never sent (gateway offline all along): the approval lapses after the select window
    assert book.tick(100_000, lambda e, a: None).transitions == []
    lapsed = book.tick(100_100, lambda e, a: None)
    assert changes(lapsed) == ["expired"]
    assert "select window" in book.commands[approved.id].outcome


def test_failed_result_rolls_back_automatically_under_the_original_approvals() -> None:
    book = CommandBook()
    command = propose(book).transitions[-1].command
    book.approve(command.id, "piet", approval("piet"), 1100)
    book.sent(command.id, 6000, 1200)
    failed = book.result(command.id, "failed", "wrote 1200 but read back 900", 900, 1300, "gw-01")
    assert changes(failed) == ["failed"]
    assert failed.rollbacks == [command.id]
    plan = book.propose_rollback(command.id, ALLOW, 1300, params())
    assert changes(plan) == ["rollback_started", "proposed", "approved"]
    child = book.commands[f"{command.id}.rb"]
    assert child.value == 900.0
    assert child.rollback_of == command.id
    assert child.rollback_from == 1200.0
    assert child.digest == command.digest  # the same approvals authorise it
    assert [a.operator for a in child.approvals] == ["piet"]
    assert plan.send == [child.id]
    book.sent(child.id, 7000, 1400)
    book.result(child.id, "ok", "", 900, 1450, "gw-01")
    done = book.tick(1500, lambda e, a: reported(900.0, 1480))
    assert changes(done) == ["verified", "rolled_back"]
    assert book.commands[command.id].state == "rolled_back"
    assert "rolled back to 900.0" in book.commands[command.id].outcome


def test_no_convergence_before_the_deadline_fails_and_a_failed_rollback_is_reported() -> None:
    book = CommandBook()
    command = propose(book).transitions[-1].command
    book.approve(command.id, "piet", approval("piet"), 1100)
    book.sent(command.id, 6000, 1200)
    book.result(command.id, "ok", "", 1200, 1300, "gw-01")
    stuck = book.tick(11_200, lambda e, a: reported(1000.0, 11_000))
    assert changes(stuck) == ["failed"]
    assert "did not converge within 10 s" in book.commands[command.id].outcome
    book.propose_rollback(command.id, DENY, 11_200, params())
    child = book.commands[f"{command.id}.rb"]
    assert child.state == "refused"
    assert book.commands[command.id].state == "rollback_failed"
    assert "refused" in book.commands[command.id].outcome


def test_propose_mode_rollback_waits_for_approval_and_no_mode_just_fails() -> None:
    book = CommandBook()
    command = propose(book, rule=params(rollback="propose")).transitions[-1].command
    book.approve(command.id, "piet", approval("piet"), 1100)
    book.sent(command.id, 6000, 1200)
    book.result(command.id, "rejected", "not writable here", None, 1300, "gw-01")
    plan = book.propose_rollback(command.id, ALLOW, 1300, params(rollback="propose"))
    child = book.commands[f"{command.id}.rb"]
    assert changes(plan)[-1] == "policy_passed"
    assert child.state == "awaiting_approval"
    assert child.approvals == []
    book.approve(child.id, "olga", approval("olga"), 1400)  # no two-person rule on a restore
    assert child.state == "approved"
    other = propose(book, rule=params(rollback="none"), attribute="running").transitions[-1].command
    book.approve(other.id, "piet", approval("piet"), 2000)
    book.sent(other.id, 7000, 2100)
    final = book.result(other.id, "failed", "device error", None, 2200, "gw-01")
    assert changes(final) == ["failed"]
    assert final.rollbacks == []
    assert book.commands[other.id].state == "failed_final"


def test_results_from_the_wrong_gateway_or_unknown_ids_are_errors() -> None:
    book = CommandBook()
    command = propose(book).transitions[-1].command
    with pytest.raises(CommandError):
        book.result("C-999999", "ok", "", 1, 1000, "gw-01")
    with pytest.raises(CommandError, match="came from gw-02"):
        book.result(command.id, "ok", "", 1, 1000, "gw-02")


def test_rows_round_trip() -> None:
    from fieldtwin.hub.commands import CommandRecord

    book = CommandBook()
    command = propose(book).transitions[-1].command
    book.approve(command.id, "piet", approval("piet", 1100), 1100)
    row = book.commands[command.id].row()
    assert CommandRecord.from_row(row) == book.commands[command.id]


# -- property tests ---------------------------------------------------------------------------


class Lifecycle(RuleBasedStateMachine):
    """Random operations on a book, in any order; the invariants hold after each."""

    commands = Bundle("commands")

    def __init__(self) -> None:
        super().__init__()
        self.book = CommandBook()
        self.now = 0
        self.rule = params()
        self.audited: dict[str, list[str]] = {}

    @initialize(required=st.integers(1, 2), two_person=st.booleans())
    def setup(self, required: int, two_person: bool) -> None:
        self.rule = params(approvals=required, two_person=two_person)

    def record(self, outcome: Outcome) -> None:
        for transition in outcome.transitions:
            self.audited.setdefault(transition.command.id, []).append(transition.after)
        for parent in outcome.rollbacks:
            self.record(self.book.propose_rollback(parent, ALLOW, self.now, self.rule))

    def step(self, ms: int = 500) -> int:
        self.now += ms
        return self.now

    @rule(
        target=commands, allowed=st.booleans(), attribute=st.sampled_from(["speed_sp", "running"])
    )
    def propose(self, allowed: bool, attribute: str) -> str:
        busy = ("pump-1", attribute) in self.book.in_flight()
        verdict = ALLOW if allowed and not busy else DENY  # the policy refuses a second
        outcome = propose(
            self.book, verdict=verdict, rule=self.rule, now=self.step(), attribute=attribute
        )
        self.record(outcome)
        return outcome.transitions[0].command.id

    @rule(command=commands, operator=st.sampled_from(["olga", "piet", "ada"]))
    def approve(self, command: str, operator: str) -> None:
        with contextlib.suppress(CommandError):
            self.record(
                self.book.approve(command, operator, approval(operator, self.now), self.step())
            )

    @rule(command=commands, operator=st.sampled_from(["olga", "piet"]))
    def reject_or_cancel(self, command: str, operator: str) -> None:
        with contextlib.suppress(CommandError):
            if operator == "piet":
                self.record(self.book.reject(command, operator, "no", self.step()))
            else:
                self.record(self.book.cancel(command, operator, "no", self.step()))

    @rule(command=commands)
    def send(self, command: str) -> None:
        with contextlib.suppress(CommandError):
            self.record(self.book.sent(command, self.now + 5000, self.step()))

    @rule(command=commands, status=st.sampled_from(["ok", "failed", "duplicate", "rejected"]))
    def result(self, command: str, status: str) -> None:
        with contextlib.suppress(CommandError):
            self.record(self.book.result(command, status, "", 1200.0, self.step(), "gw-01"))

    @rule(seen=st.sampled_from(["old", "target", "none"]), ms=st.integers(1, 40_000))
    def tick(self, seen: str, ms: int) -> None:
        now = self.step(ms)
        value = {"old": 900.0, "target": 1200.0, "none": None}[seen]
        self.record(
            self.book.tick(now, lambda e, a: None if value is None else reported(value, now - 1))
        )

    @invariant()
    def nothing_is_sent_without_its_approvals(self) -> None:
        for command in self.book.commands.values():
            if command.sent_ms is None or command.rollback_of is not None:
                continue
            approvers = set(command.approvers)
            if command.two_person:
                approvers.discard(command.proposed_by)
            assert len(approvers) >= command.approvals_required, command

    @invariant()
    def one_in_flight_per_attribute(self) -> None:
        roots: dict[tuple[str, str], set[str]] = {}
        for command in self.book.commands.values():
            if not command.terminal:
                roots.setdefault(command.key, set()).add(command.rollback_of or command.id)
        assert all(len(r) <= 1 for r in roots.values()), roots

    @invariant()
    def every_state_change_is_a_transition(self) -> None:
        for command in self.book.commands.values():
            assert self.audited.get(command.id, ["?"])[-1] == command.state
            assert (command.closed_ms is not None) == command.terminal


Lifecycle.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_lifecycle_invariants = Lifecycle.TestCase
