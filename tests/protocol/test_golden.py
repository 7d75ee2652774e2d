"""Committed wire vectors: an accidental change to the encoding fails here.

Ed25519 signatures are deterministic, so a fixed key and fixed inputs give fixed bytes.
If a wire change is intended, bump the protocol version and regenerate with
``PYTHONPATH=tests python tests/protocol/test_golden.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.keys import GATEWAY_SEED, HUB_SEED, key_for, registry

from fieldtwin.protocol.frames import decode_frame, encode_frame
from fieldtwin.protocol.messages import (
    Ack,
    AnyBody,
    Approval,
    Birth,
    Command,
    CommandResult,
    Data,
    Death,
    DeviceLink,
    Heartbeat,
    HubState,
    OperatorRequest,
    OperatorResponse,
    PointMeta,
    Quality,
    Rebirth,
    Sample,
    View,
)

GOLDEN_FILE = Path(__file__).with_name("golden_frames.json")
EPOCH = 1_763_700_000_000
SENT_AT = 1_763_700_001_234

VECTORS: dict[str, tuple[str, int, AnyBody]] = {
    "birth": (
        "gw-01",
        5,
        Birth(
            points=(
                PointMeta(
                    "tank-1",
                    "level",
                    "float32",
                    "m",
                    False,
                    0.0,
                    5.0,
                    1000,
                    "modbus-tcp://10.0.0.5:502/1/hr/0",
                    "plc-1",
                ),
                PointMeta(
                    "pump-1",
                    "speed_sp",
                    "uint16",
                    "rpm",
                    True,
                    0.0,
                    1800.0,
                    1000,
                    "modbus-tcp://10.0.0.5:502/1/hr/10",
                ),
            ),
            state=(Sample("tank-1", "level", 2.5, SENT_AT - 10, Quality.GOOD),),
            low_water=3,
            info={"agent": "fieldtwin 0.1.0"},
            state_seqs=(4,),
        ),
    ),
    "birth_part": (
        "gw-01",
        7,
        Birth(
            points=(PointMeta("tank-2", "level", "float32", "m", device="plc-1"),),
            state=(Sample("tank-2", "level", 1.25, SENT_AT - 10, Quality.GOOD),),
            low_water=3,
            info={"agent": "fieldtwin 0.1.0"},
            session=1,
            state_seqs=(4,),
            part=1,
            parts=2,
            first=5,
        ),
    ),
    "heartbeat": (
        "gw-01",
        0,
        Heartbeat(
            session=1,
            beat=42,
            interval_ms=5000,
            devices=(
                DeviceLink("plc-1", True, SENT_AT - 60_000),
                DeviceLink("boiler", False, SENT_AT - 20_000, "connection refused"),
            ),
        ),
    ),
    "hub_state": ("hub", 13, HubState(True, "a1b2c3d4e5f6")),
    "hub_state_will": ("hub", 14, HubState(False, "a1b2c3d4e5f6", 13, "connection lost")),
    "data": (
        "gw-01",
        2,
        Data.of(
            (
                Sample("tank-1", "level", 2.625, SENT_AT - 5, Quality.GOOD),
                Sample("pump-1", "running", True, SENT_AT - 5, Quality.GOOD),
                Sample("pump-1", "speed", 1450, SENT_AT - 4, Quality.UNCERTAIN),
                Sample("meter-1", "flow", None, SENT_AT - 3, Quality.BAD),
                Sample("ambient", "label", "north", SENT_AT - 2, Quality.STALE),
            )
        ),
    ),
    "death": ("gw-01", 0, Death(birth_seq=1, reason="connection lost")),
    "cmd_result": (
        "gw-01",
        3,
        CommandResult("cmd-0001", "ok", "written and read back", 1200, SENT_AT),
    ),
    "ack": ("hub", 10, Ack(to="gw-01", epoch=EPOCH, ranges=((1, 2), (4, 9)))),
    "rebirth": ("hub", 11, Rebirth(to="gw-01", reason="gap 3-3")),
    "cmd": (
        "hub",
        12,
        Command(
            "gw-01",
            "cmd-0001",
            "pump-1",
            "speed_sp",
            1200,
            SENT_AT + 30_000,
            (Approval("alice", "0123456789abcdef", bytes(range(64))),),
            "raise inflow",
            restore_value=900,
        ),
    ),
    "op_req": (
        "alice",
        3,
        OperatorRequest(
            "r0123456789abcdef",
            SENT_AT + 30_000,
            "cmd.approve",
            {"cmd_id": "C-000007", "approval": bytes(range(64)), "reason": "shift plan"},
        ),
    ),
    "op_resp": (
        "hub",
        13,
        OperatorResponse(
            "alice", "r0123456789abcdef", False, "forbidden", "alice lacks role approver", None
        ),
    ),
    "view": (
        "hub",
        14,
        View("twin", "a1b2c3d4e5f6", 42, {"entities": {"tank-1": {"level": [2.5, 0, 1]}}}),
    ),
}


REJECTED: dict[str, tuple[str, int, AnyBody, str]] = {
    "data_int_2_63": (
        "gw-01",
        20,
        Data.of((Sample("meter-1", "count", 2**63, SENT_AT, Quality.GOOD),)),
        "schema",
    ),
    "data_int_2_64_minus_1": (
        "gw-01",
        21,
        Data.of((Sample("meter-1", "count", 2**64 - 1, SENT_AT, Quality.GOOD),)),
        "schema",
    ),
}
"""Frames a receiver must refuse, with the reason (signed correctly; the body is wrong)."""


def _encode(name: str) -> bytes:
    sender, seq, body = VECTORS[name]
    return encode_frame(key_for(sender), sender, EPOCH, seq, SENT_AT, body)


def _encode_rejected(name: str) -> bytes:
    sender, seq, body, _ = REJECTED[name]
    return encode_frame(key_for(sender), sender, EPOCH, seq, SENT_AT, body)


def _load_rejected() -> dict[str, str]:
    frames: dict[str, str] = json.loads(GOLDEN_FILE.read_text())["rejected"]
    return frames


def _load() -> dict[str, str]:
    data = json.loads(GOLDEN_FILE.read_text())
    assert data["gateway_seed"] == GATEWAY_SEED.hex()
    assert data["hub_seed"] == HUB_SEED.hex()
    frames: dict[str, str] = data["frames"]
    return frames


def regenerate() -> None:
    GOLDEN_FILE.write_text(
        json.dumps(
            {
                "comment": "fieldtwin wire v1 test vectors; the key seeds are public",
                "gateway_seed": GATEWAY_SEED.hex(),
                "hub_seed": HUB_SEED.hex(),
                "epoch": EPOCH,
                "sent_at_ms": SENT_AT,
                "frames": {name: _encode(name).hex() for name in VECTORS},
                "rejected": {name: _encode_rejected(name).hex() for name in REJECTED},
            },
            indent=2,
        )
        + "\n"
    )


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_encoding_matches_the_committed_bytes(name: str) -> None:
    assert _encode(name).hex() == _load()[name]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_committed_bytes_decode_to_the_same_message(name: str) -> None:
    sender, seq, body = VECTORS[name]
    frame = decode_frame(bytes.fromhex(_load()[name]), registry())
    assert (frame.sender, frame.seq, frame.epoch, frame.sent_at_ms) == (sender, seq, EPOCH, SENT_AT)
    assert frame.body == body


def test_every_kind_has_a_vector() -> None:
    from fieldtwin.protocol.messages import KINDS

    assert set(_load()) == set(VECTORS)
    assert {body.KIND for _, _, body in VECTORS.values()} == set(KINDS)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_committed_invalid_frames_are_refused(name: str) -> None:
    """Integers outside signed 64 bits are refused: 2^63 and 2^64-1, which msgpack can
    carry as uint64 (docs/protocol.md, "Values"; msgpack cannot encode below -2^63)."""
    from fieldtwin.protocol.errors import ProtocolError

    data = bytes.fromhex(_load_rejected()[name])
    assert _encode_rejected(name) == data
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data, registry())
    assert caught.value.reason == REJECTED[name][3]
    assert "signed 64-bit integer" in str(caught.value)


if __name__ == "__main__":
    regenerate()
    print(f"wrote {GOLDEN_FILE}")
