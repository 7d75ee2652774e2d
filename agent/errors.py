"""Every way the agent can fail, under one base class.

Library errors (pymodbus, asyncua, pyserial, duckdb, aiomqtt) are translated into these
at the boundary where they are raised, so the rest of the agent (and its tests) only
ever sees ``AgentError`` subclasses with a message a technician can act on.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of everything the agent raises on purpose."""

    reason = "agent_error"


class DeviceError(AgentError):
    """A device did not answer, answered with an error, or its connection failed."""

    reason = "device"


class DeviceTimeout(DeviceError):
    """The device did not answer within the configured timeout."""

    reason = "timeout"


class DeviceRejected(DeviceError):
    """The device answered with an exception (illegal address, bad value, busy...)."""

    reason = "rejected"


class DeviceUnavailable(DeviceError):
    """The endpoint cannot be reached or the circuit breaker holds the unit off."""

    reason = "unavailable"


class CodecError(AgentError):
    """A value cannot be encoded into (or decoded from) the point's registers."""

    reason = "codec"


class LineError(AgentError):
    """A serial sensor line is malformed or fails its checksum."""

    reason = "line"


class OutboxError(AgentError):
    """The durable buffer cannot be opened, written or read."""

    reason = "outbox"


class OutboxCorrupt(OutboxError):
    """The buffer file is not a usable database; it is quarantined, never reused."""

    reason = "outbox_corrupt"


class UplinkError(AgentError):
    """The broker cannot be reached, refused the login, or a publish failed."""

    reason = "uplink"


class CommandRejected(AgentError):
    """A command fails the agent's own policy (allow-list, limits, type, expiry)."""

    reason = "command_rejected"
