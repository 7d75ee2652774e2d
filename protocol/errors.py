"""Every way a frame, a key file or a sequence number can be refused.

Each subclass carries a short machine-readable ``reason`` so receivers can count
rejections by cause (the hub exports those counters) without parsing messages.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of everything the protocol package raises."""

    reason = "protocol_error"


class FrameTooLarge(ProtocolError):
    """The frame exceeds the receiver's size limit; it was not parsed at all."""

    reason = "too_large"


class NotMsgpack(ProtocolError):
    """The bytes are not a well-formed msgpack value within the decoder's bounds."""

    reason = "not_msgpack"


class SchemaViolation(ProtocolError):
    """Well-formed msgpack, but not a valid frame or body; the message names the field."""

    reason = "schema"


class UnsupportedVersion(SchemaViolation):
    """The frame declares a protocol version this build does not speak."""

    reason = "unsupported_version"


class UnknownKey(ProtocolError):
    """The sender or its key id is not in the receiver's key registry."""

    reason = "unknown_key"


class BadSignature(ProtocolError):
    """The Ed25519 signature does not match the signed bytes and the sender's key."""

    reason = "bad_signature"


class Replay(ProtocolError):
    """This (sender, epoch, seq) was already delivered."""

    reason = "replay"


class StaleEpoch(ProtocolError):
    """The sender has since started a newer epoch; frames of the old one are refused."""

    reason = "stale_epoch"


class BadTopic(ProtocolError):
    """An MQTT topic outside the ``ft/v1/...`` scheme, or one naming a reserved id."""

    reason = "bad_topic"


class KeyFileError(ProtocolError):
    """A key file is missing, unreadable, malformed or would be overwritten."""

    reason = "key_file"


class InsecureKeyFile(KeyFileError):
    """A private key file is readable by group or others."""

    reason = "insecure_key_file"


REJECTION_REASONS: tuple[str, ...] = (
    FrameTooLarge.reason,
    NotMsgpack.reason,
    SchemaViolation.reason,
    UnsupportedVersion.reason,
    UnknownKey.reason,
    BadSignature.reason,
    Replay.reason,
    StaleEpoch.reason,
    BadTopic.reason,
)
"""Reasons a receiver may reject an incoming frame, in a stable order for counters."""
