"""Frame encoding, signing, verification and bounded decoding.

Frame = msgpack ``[signed: bin, sig: bin]`` where ``signed`` = msgpack
``[v, kind, sender, key_id, epoch, seq, sent_at_ms, body]``. The Ed25519 signature
covers the exact ``signed`` bytes, so there is no canonical form to agree on: the
receiver verifies the bytes it got, then decodes them.

Decoding is total: for any input, ``decode_frame`` returns a ``Frame`` or raises a
``ProtocolError`` subclass. Sizes are checked before parsing and msgpack runs with
explicit length limits, so hostile input cannot allocate without bound.

Sequence numbers: every frame a sender emits within an epoch takes the next ``seq``
(starting at 1), except the unsequenced kinds: ``death``, which is signed in advance as
the MQTT will, and ``heartbeat``, which is neither stored nor resent. They carry
``seq = 0``; their replay protection is the session (birth seq) their bodies name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from fieldtwin.protocol import PROTOCOL_VERSION
from fieldtwin.protocol.errors import (
    FrameTooLarge,
    NotMsgpack,
    ProtocolError,
    SchemaViolation,
    UnsupportedVersion,
)
from fieldtwin.protocol.keys import KeyPair, KeyRegistry, PublicKey
from fieldtwin.protocol.messages import (
    BODY_TYPES,
    ID_PATTERN,
    MAX_INT,
    UNSEQUENCED_KINDS,
    AnyBody,
    Birth,
    HubState,
)

DEFAULT_MAX_FRAME_BYTES = 1 << 20
SIGNATURE_BYTES = 64
_KEY_ID_CHARS = frozenset("0123456789abcdef")

KeyLookup = Callable[[str, str], PublicKey]
"""``(sender, key_id) → PublicKey`` or raise ``UnknownKey``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Decoder bounds. The defaults fit a 10,000-sample data frame with room to spare."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_str_len: int = 64 * 1024
    max_array_len: int = 200_000
    max_map_len: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Frame:
    """A verified, validated frame."""

    kind: str
    sender: str
    key_id: str
    epoch: int
    seq: int
    sent_at_ms: int
    body: AnyBody
    size: int = 0
    version: int = PROTOCOL_VERSION


def _reject_ext(code: int, data: bytes) -> Any:
    raise NotMsgpack(f"msgpack extension type {code} is not allowed in frames")


def _unpack(data: bytes, limits: Limits, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_frame_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises ValueError, ExtraData, StackError, TypeError...
        detail = str(exc) or type(exc).__name__
        raise NotMsgpack(f"{what} is not valid msgpack: {detail}") from None


def encode_signed(
    kind: str,
    sender: str,
    key_id: str,
    epoch: int,
    seq: int,
    sent_at_ms: int,
    body_wire: dict[str, Any],
) -> bytes:
    try:
        signed: bytes = msgpack.packb(
            [PROTOCOL_VERSION, kind, sender, key_id, epoch, seq, sent_at_ms, body_wire],
            use_bin_type=True,
        )
    except (OverflowError, TypeError, ValueError) as exc:
        raise SchemaViolation(f"{kind} frame cannot be encoded: {exc}") from None
    return signed


def encode_frame(
    key: KeyPair, sender: str, epoch: int, seq: int, sent_at_ms: int, body: AnyBody
) -> bytes:
    """Sign and encode one frame. The caller owns epoch and seq (they are persisted)."""
    signed = encode_signed(body.KIND, sender, key.key_id, epoch, seq, sent_at_ms, body.to_wire())
    frame: bytes = msgpack.packb([signed, key.sign(signed)], use_bin_type=True)
    return frame


@dataclass(slots=True)
class FrameSigner:
    """A sender's identity and key: the only thing needed to produce frames."""

    sender: str
    key: KeyPair

    def __post_init__(self) -> None:
        if ID_PATTERN.fullmatch(self.sender) is None:
            raise SchemaViolation(
                f"sender id {self.sender!r} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"
            )

    def encode(self, epoch: int, seq: int, sent_at_ms: int, body: AnyBody) -> bytes:
        return encode_frame(self.key, self.sender, epoch, seq, sent_at_ms, body)


def decode_frame(
    data: bytes | bytearray | memoryview,
    keys: KeyRegistry | KeyLookup,
    limits: Limits = DEFAULT_LIMITS,
) -> Frame:
    """Verify and decode one frame, or raise the ``ProtocolError`` that says why not.

    The order matters: size first (nothing parsed), then structure, then the
    signature over the exact signed bytes, and only then the body schema, so
    unauthenticated input never reaches body construction.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise NotMsgpack(f"a frame is bytes, got {type(data).__name__}")
    size = len(data)
    if size > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {limits.max_frame_bytes}")
    outer = _unpack(bytes(data), limits, "frame")
    if type(outer) is not list or len(outer) != 2:
        raise SchemaViolation("frame: expected [signed, signature]")
    signed, signature = outer
    if type(signed) is not bytes or type(signature) is not bytes:
        raise SchemaViolation("frame: signed part and signature must both be binary")
    if len(signature) != SIGNATURE_BYTES:
        raise SchemaViolation(f"frame: signature is {len(signature)} bytes, expected 64")
    inner = _unpack(signed, limits, "signed part")
    if type(inner) is not list or len(inner) != 8:
        raise SchemaViolation(
            "signed part: expected [v, kind, sender, key_id, epoch, seq, sent_at_ms, body]"
        )
    version, kind, sender, key_id, epoch, seq, sent_at_ms, body_obj = inner
    if type(version) is not int:
        raise SchemaViolation(f"header.v: expected an integer, got {version!r}")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"header.v: protocol version {version} is not supported (this build speaks "
            f"{PROTOCOL_VERSION})"
        )
    body_type = BODY_TYPES.get(kind) if type(kind) is str else None
    if body_type is None:
        raise SchemaViolation(f"header.kind: unknown frame kind {kind!r}")
    if type(sender) is not str or ID_PATTERN.fullmatch(sender) is None:
        raise SchemaViolation(f"header.sender: not a valid sender id: {sender!r}")
    if type(key_id) is not str or len(key_id) != 16 or not _KEY_ID_CHARS.issuperset(key_id):
        raise SchemaViolation(f"header.key_id: expected 16 lowercase hex digits, got {key_id!r}")
    for name, number in (("epoch", epoch), ("seq", seq), ("sent_at_ms", sent_at_ms)):
        if type(number) is not int or not 0 <= number <= MAX_INT:
            raise SchemaViolation(
                f"header.{name}: expected an integer in [0, 2^63), got {number!r}"
            )
    unsequenced = kind in UNSEQUENCED_KINDS
    if (seq == 0) != unsequenced:
        raise SchemaViolation(
            f"header.seq: {kind} frames carry seq {'0' if unsequenced else '>= 1'}, got {seq}"
        )
    lookup = keys.lookup if isinstance(keys, KeyRegistry) else keys
    lookup(sender, key_id).verify(signature, signed)
    body = body_type.from_wire(body_obj)
    if isinstance(body, Birth):
        if body.first >= seq:
            raise SchemaViolation(
                f"body.first: part {body.part} names part 0 seq {body.first}, not earlier than "
                f"its own seq {seq}"
            )
        if body.session > body.birth_id(seq):
            raise SchemaViolation(
                f"body.session: names birth {body.session}, later than this birth "
                f"{body.birth_id(seq)}"
            )
    elif isinstance(body, HubState) and body.session > seq:
        raise SchemaViolation(
            f"body.session: names session {body.session}, later than this frame's seq {seq}"
        )
    return Frame(
        kind=kind,
        sender=sender,
        key_id=key_id,
        epoch=epoch,
        seq=seq,
        sent_at_ms=sent_at_ms,
        body=body,
        size=size,
        version=version,
    )
