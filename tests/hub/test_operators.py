"""Operator request verification (pure gate): every refusal, with its code and reason."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from support.keys import gateway_key, operator_key, other_key

from fieldtwin.hub.config import OperatorSpec
from fieldtwin.hub.errors import OperatorRefused
from fieldtwin.hub.operators import RequestGate, allowed, permissions, roles_allowing
from fieldtwin.protocol.frames import FrameSigner
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import Data, OperatorRequest
from fieldtwin.protocol.topics import operator_request_topic

NOW = 1_800_000_000_000
ALICE = OperatorSpec("alice", (Path("alice.pub"),), frozenset({"operator"}))
VIC = OperatorSpec("vic", (Path("vic.pub"),), frozenset({"viewer"}))


def gate() -> RequestGate:
    registry = KeyRegistry.of({"alice": operator_key.public, "vic": other_key.public})
    return RequestGate({"alice": ALICE, "vic": VIC}, registry, started_ms=NOW - 60_000)


def request(
    op: str = "alarm.ack",
    *,
    req_id: str = "r" * 24,
    expires: int = NOW + 30_000,
    sender: str = "alice",
    key: object = operator_key,
    sent_at: int = NOW,
) -> bytes:
    body = OperatorRequest(req_id, expires, op, {"alarm_id": "A-000001", "reason": "seen"})
    return FrameSigner(sender, key).encode(1, 1, sent_at, body)  # type: ignore[arg-type]


def refused(topic: str, payload: bytes, the_gate: RequestGate | None = None) -> tuple[str, str]:
    with pytest.raises(OperatorRefused) as info:
        (the_gate or gate()).admit(topic, payload, NOW)
    return info.value.code, str(info.value)


TOPIC = operator_request_topic("alice")


def test_a_valid_request_is_admitted_with_its_signature_reference() -> None:
    verified = gate().admit(TOPIC, request(), NOW)
    assert (verified.operator, verified.op, verified.roles) == ("alice", "alarm.ack", ALICE.roles)
    assert verified.signature_ref.startswith("r" * 24 + ":")


def test_every_refusal_has_a_code_and_says_why() -> None:
    assert refused("ft/v1/op/alice/resp", request())[0] == "bad_topic"
    assert refused("ft/v1/gw-01/up/data", request())[0] == "bad_topic"
    assert refused(TOPIC, b"\x00not a frame")[0] == "invalid"
    code, text = refused(operator_request_topic("mallory"), request(sender="mallory"))
    assert code == "unknown_operator"
    assert "mallory is not a registered operator" in text
    code, _ = refused(TOPIC, request(key=gateway_key))
    assert code == "unknown_operator"  # alice's name, someone else's key
    tampered = bytearray(request())
    tampered[-5] ^= 0xFF
    assert refused(TOPIC, bytes(tampered))[0] == "bad_signature"
    # vic signs a request and posts it on alice's topic (the broker ACL forbids that too)
    assert refused(TOPIC, request(sender="vic", key=other_key))[0] == "topic_mismatch"
    data = FrameSigner("alice", operator_key).encode(1, 1, NOW, Data())
    assert refused(TOPIC, data)[0] == "topic_mismatch"
    code, text = refused(TOPIC, request(expires=NOW - 1500))
    assert code == "expired"
    assert "expired 1500 ms ago" in text
    code, text = refused(TOPIC, request(expires=NOW + 3_600_000))
    assert code == "invalid"
    assert "accepts at most 600 s" in text
    code, text = refused(TOPIC, request(sent_at=NOW - 3_600_000))
    assert code == "expired"
    assert "signed before this hub started" in text


def test_a_replayed_request_is_refused_until_and_after_a_restart() -> None:
    first = gate()
    payload = request()
    first.admit(TOPIC, payload, NOW)
    code, text = refused(TOPIC, payload, first)
    assert code == "replay"
    assert "already received" in text
    # a restarted hub remembers the persisted nonces of unexpired mutating requests
    second = gate()
    second.remember([("alice", "r" * 24, NOW + 30_000)])
    assert refused(TOPIC, payload, second)[0] == "replay"


def test_roles_and_permissions() -> None:
    assert allowed({"viewer"}, "read")
    assert not allowed({"viewer"}, "cmd.propose")
    assert allowed({"operator"}, "cmd.propose")
    assert not allowed({"operator"}, "cmd.approve")
    assert allowed({"approver"}, "cmd.approve")
    assert not allowed({"approver"}, "alarm.ack")
    assert allowed({"operator", "approver"}, "cmd.approve")
    assert allowed({"admin"}, "anything.at.all")
    assert permissions({"admin"}) == frozenset({"*"})
    assert roles_allowing("cmd.approve") == ["approver", "admin"]
    verified = gate().admit(
        operator_request_topic("vic"), request("cmd.propose", sender="vic", key=other_key), NOW
    )
    with pytest.raises(OperatorRefused) as info:
        gate().authorize(verified, "cmd.propose")
    assert info.value.code == "forbidden"
    assert (
        str(info.value) == "vic (viewer) may not cmd.propose: it needs the role operator or admin"
    )


def test_garbage_never_escapes_as_an_unexpected_exception() -> None:
    the_gate = gate()
    for payload in (b"", msgpack.packb([b"x", b"y"]), msgpack.packb({"a": 1}), b"\xc1" * 100):
        with pytest.raises(OperatorRefused):
            the_gate.admit(TOPIC, payload, NOW)
