from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import strategies as sx
from support.keys import gateway_key, hub_key, other_key, registry

from fieldtwin.protocol import (
    BadSignature,
    FrameTooLarge,
    NotMsgpack,
    ProtocolError,
    SchemaViolation,
    UnknownKey,
    UnsupportedVersion,
)
from fieldtwin.protocol.frames import (
    Frame,
    FrameSigner,
    Limits,
    decode_frame,
    encode_frame,
    encode_signed,
)
from fieldtwin.protocol.messages import (
    Ack,
    Birth,
    Command,
    CommandResult,
    Data,
    Death,
    Heartbeat,
    Quality,
    Rebirth,
    Sample,
    make_sample,
)

EMPTY: dict[str, list[object]] = {
    "entity": [],
    "attribute": [],
    "value": [],
    "ts_ms": [],
    "quality": [],
}


def _roundtrip(body: object, sender: str = "gw-01", seq: int = 7) -> Frame:
    key = hub_key if sender == "hub" else gateway_key
    raw = encode_frame(key, sender, 1_700_000_000_000, seq, 1_700_000_000_123, body)  # type: ignore[arg-type]
    return decode_frame(raw, registry())


@pytest.mark.parametrize(
    ("strategy", "sender"),
    [
        (sx.births, "gw-01"),
        (sx.birth_parts(), "gw-01"),
        (sx.datas, "gw-01"),
        (sx.command_results, "gw-01"),
        (sx.acks, "hub"),
        (sx.rebirths, "hub"),
        (sx.commands, "hub"),
        (sx.hub_states, "hub"),
    ],
    ids=["birth", "birth_part", "data", "cmd_result", "ack", "rebirth", "cmd", "hub_state"],
)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_kind_roundtrips(
    strategy: st.SearchStrategy[object], sender: str, data: st.DataObject
) -> None:
    body = data.draw(strategy)
    frame = _roundtrip(body, sender)
    assert frame.body == body
    assert frame.kind == type(body).KIND  # type: ignore[attr-defined]
    assert frame.sender == sender
    assert frame.epoch == 1_700_000_000_000
    assert frame.seq == 7
    assert frame.sent_at_ms == 1_700_000_000_123


@settings(max_examples=100, deadline=None)
@given(body=sx.deaths)
def test_death_roundtrips_with_seq_zero(body: Death) -> None:
    frame = _roundtrip(body, seq=0)
    assert frame.body == body
    assert frame.seq == 0


@settings(max_examples=100, deadline=None)
@given(body=sx.heartbeats)
def test_heartbeat_roundtrips_with_seq_zero(body: Heartbeat) -> None:
    frame = _roundtrip(body, seq=0)
    assert frame.body == body
    assert frame.seq == 0
    with pytest.raises(SchemaViolation, match="heartbeat frames carry seq 0"):
        _roundtrip(body, seq=3)


def test_sample_quality_is_an_enum_after_decoding() -> None:
    frame = _roundtrip(Data.of([Sample("tank-1", "level", 1.5, 5, Quality.STALE)]))
    assert isinstance(frame.body, Data)
    assert frame.body.samples[0].quality is Quality.STALE
    assert frame.body.samples == (Sample("tank-1", "level", 1.5, 5, Quality.STALE),)


def test_signer_refuses_an_invalid_sender_id() -> None:
    with pytest.raises(SchemaViolation, match="sender id"):
        FrameSigner("bad/id", gateway_key)


# -- each rejection reason ------------------------------------------------------------


def _valid_frame() -> bytes:
    return encode_frame(gateway_key, "gw-01", 1, 1, 0, Data.of([make_sample("t", "a", 1.0, 1)]))


def test_too_large_is_refused_before_parsing() -> None:
    raw = _valid_frame()
    with pytest.raises(FrameTooLarge, match="exceeds the limit"):
        decode_frame(raw, registry(), Limits(max_frame_bytes=len(raw) - 1))
    with pytest.raises(FrameTooLarge):
        decode_frame(b"\xc1" * (2 << 20), registry())


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x92\xc4",
        _valid_frame() + b"\x00",
        b"\xdd\xff\xff\xff\xff",
        msgpack.packb(msgpack.ExtType(5, b"x")),
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing-bytes", "huge-array", "ext-type"],
)
def test_not_msgpack(raw: bytes) -> None:
    with pytest.raises(NotMsgpack):
        decode_frame(raw, registry())


def test_non_bytes_input_is_a_protocol_error() -> None:
    with pytest.raises(NotMsgpack):
        decode_frame("text", registry())  # type: ignore[arg-type]


def test_bad_signature() -> None:
    signed = encode_signed("data", "gw-01", gateway_key.key_id, 1, 1, 0, EMPTY)
    forged = msgpack.packb([signed, other_key.sign(signed)])
    with pytest.raises(BadSignature):
        decode_frame(forged, registry())


def test_tampered_signed_bytes_fail_the_signature() -> None:
    raw = bytearray(_valid_frame())
    raw[-70] ^= 0x01  # inside the signed part, which precedes the 64-byte signature
    with pytest.raises(ProtocolError) as caught:
        decode_frame(bytes(raw), registry())
    assert isinstance(caught.value, BadSignature | NotMsgpack | SchemaViolation)


def test_unknown_sender() -> None:
    raw = encode_frame(other_key, "gw-99", 1, 1, 0, Data())
    with pytest.raises(UnknownKey, match="not registered"):
        decode_frame(raw, registry())


def test_gateway_cannot_sign_as_another_gateway() -> None:
    keys = registry()
    keys.add("gw-02", other_key.public)
    raw = encode_frame(gateway_key, "gw-02", 1, 1, 0, Data())
    with pytest.raises(UnknownKey, match="gw-02"):
        decode_frame(raw, keys)


def test_unsupported_version() -> None:
    signed = msgpack.packb([2, "data", "gw-01", gateway_key.key_id, 1, 1, 0, EMPTY])
    raw = msgpack.packb([signed, gateway_key.sign(signed)])
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_frame(raw, registry())


def _signed_frame(header_and_body: list[object]) -> bytes:
    signed = msgpack.packb(header_and_body)
    return msgpack.packb([signed, gateway_key.sign(signed)])


def _one(
    entity: object = "e",
    attribute: object = "a",
    value: object = 1,
    ts: object = 1,
    quality: object = 0,
) -> dict[str, list[object]]:
    """A one-sample data body with one field replaced."""
    return {
        "entity": [entity],
        "attribute": [attribute],
        "value": [value],
        "ts_ms": [ts],
        "quality": [quality],
    }


DATA = [1, "data", "gw-01", None, 1, 1, 0]
STATE = {"entity": [], "attribute": [], "value": [], "ts_ms": [], "quality": [], "seq": []}
BIRTH_BODY = {
    "points": [],
    "state": STATE,
    "low_water": 1,
    "info": {},
}


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        ([1, "gossip", "gw-01", None, 1, 1, 0, {}], "unknown frame kind"),
        ([1, "data", "gw/01", None, 1, 1, 0, {}], "sender"),
        ([1, "data", "gw-01", "XYZ", 1, 1, 0, {}], "key_id"),
        ([1, "data", "gw-01", None, -1, 1, 0, {}], "epoch"),
        ([1, "data", "gw-01", None, 1, 0, 0, EMPTY], "seq"),
        ([1, "death", "gw-01", None, 1, 5, 0, {"birth_seq": 1, "reason": ""}], "seq"),
        ([*DATA, {}], "body.entity: required"),
        ([*DATA, _one(quality=9)], r"body\.quality\[0\]"),
        ([*DATA, _one(quality=True)], "quality"),
        ([*DATA, _one(ts=-5)], r"body\.ts_ms\[0\]"),
        ([*DATA, _one(ts=1.5)], "ts_ms"),
        ([*DATA, _one(entity="")], r"body\.entity\[0\]"),
        ([*DATA, _one(attribute="x" * 129)], "attribute"),
        ([*DATA, _one(value=[1])], r"body\.value\[0\]"),
        ([*DATA, _one(value=float("nan"))], "finite"),
        ([*DATA, _one(value=float("-inf"))], "finite"),
        ([*DATA, _one(value="x" * 5000)], "at most 4096"),
        ([*DATA, {**_one(), "attribute": []}], "differ in length"),
        ([*DATA, {**_one(), "value": 3}], "array"),
        ([1, "cmd_result", "gw-01", None, 1, 1, 0, {"cmd_id": "c", "status": "maybe"}], "status"),
        ([*DATA], r"expected \[v, kind"),
        (
            [1, "birth", "gw-01", None, 1, 4, 0, {**BIRTH_BODY, "session": 5}],
            "body.session: names birth 5, later than",
        ),
        ([1, "birth", "gw-01", None, 1, 4, 0, {**BIRTH_BODY, "session": -1}], "body.session"),
        (
            [1, "birth", "gw-01", None, 1, 4, 0, {**BIRTH_BODY, "state": {**STATE, "seq": [1]}}],
            r"body\.state: sample columns differ in length \(seq=1",
        ),
    ],
)
def test_schema_violations_name_the_field(inner: list[object], message: str) -> None:
    inner = [
        gateway_key.key_id if item is None and i == 3 else item for i, item in enumerate(inner)
    ]
    with pytest.raises(SchemaViolation, match=message):
        decode_frame(_signed_frame(inner), registry())


def test_outer_structure_violations() -> None:
    with pytest.raises(SchemaViolation, match="signed, signature"):
        decode_frame(msgpack.packb([b"x"]), registry())
    with pytest.raises(SchemaViolation, match="binary"):
        decode_frame(msgpack.packb(["x", b"y" * 64]), registry())
    with pytest.raises(SchemaViolation, match="64"):
        decode_frame(msgpack.packb([b"x", b"y" * 10]), registry())


def test_body_is_validated_only_after_the_signature() -> None:
    """An unsigned malformed body must be reported as a signature problem, not parsed."""
    signed = msgpack.packb([1, "data", "gw-01", gateway_key.key_id, 1, 1, 0, {"entity": 5}])
    raw = msgpack.packb([signed, other_key.sign(signed)])
    with pytest.raises(BadSignature):
        decode_frame(raw, registry())


def test_unknown_body_fields_are_ignored_for_forward_compatibility() -> None:
    inner = [
        1,
        "rebirth",
        "hub",
        hub_key.key_id,
        1,
        1,
        0,
        {"to": "gw-01", "reason": "gap", "priority": 3},
    ]
    signed = msgpack.packb(inner)
    frame = decode_frame(msgpack.packb([signed, hub_key.sign(signed)]), registry())
    assert frame.body == Rebirth(to="gw-01", reason="gap")


def test_ack_covers() -> None:
    ack = Ack(to="gw-01", epoch=1, ranges=((1, 5), (9, 9)))
    assert [s for s in range(1, 12) if ack.covers(s)] == [1, 2, 3, 4, 5, 9]


def test_command_value_is_checked() -> None:
    body = {
        "to": "gw-01",
        "cmd_id": "c1",
        "entity": "e",
        "attribute": "a",
        "value": {"x": 1},
        "expires_at_ms": 5,
        "approvals": [],
        "reason": "",
        "restore_value": None,
        "rollback_of": "",
        "rollback_from": None,
    }
    with pytest.raises(SchemaViolation, match=r"body\.value"):
        Command.from_wire(body)


def test_birth_info_must_be_text() -> None:
    with pytest.raises(SchemaViolation, match="info"):
        Birth.from_wire({"points": [], "state": [], "low_water": 1, "info": {"a": 1}})


def test_command_result_readback_is_optional() -> None:
    result = CommandResult.from_wire({"cmd_id": "c", "status": "ok", "detail": ""})
    assert result.readback is None
    assert result.readback_ts_ms is None


def test_unencodable_bodies_are_a_schema_violation_at_the_sender() -> None:
    with pytest.raises(SchemaViolation, match="cannot be encoded"):
        encode_frame(gateway_key, "gw-01", 1, 1, 0, Data.of([Sample("e", "a", 2**64, 1, 0)]))  # type: ignore[arg-type]
