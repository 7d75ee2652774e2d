"""Wire protocol shared by every fieldtwin part: frames, bodies, keys, topics, replay window.

Nothing here touches the network; the only I/O is reading and writing key files, so
each piece can be tested (and fuzzed) without sockets.
"""

from fieldtwin.protocol.errors import (
    BadSignature,
    BadTopic,
    FrameTooLarge,
    InsecureKeyFile,
    KeyFileError,
    NotMsgpack,
    ProtocolError,
    Replay,
    SchemaViolation,
    StaleEpoch,
    UnknownKey,
    UnsupportedVersion,
)

__all__ = [
    "BadSignature",
    "BadTopic",
    "FrameTooLarge",
    "InsecureKeyFile",
    "KeyFileError",
    "NotMsgpack",
    "ProtocolError",
    "Replay",
    "SchemaViolation",
    "StaleEpoch",
    "UnknownKey",
    "UnsupportedVersion",
]

PROTOCOL_VERSION = 1
