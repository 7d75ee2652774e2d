"""Everything the hub raises on purpose, under one base class.

Library errors (duckdb, aiomqtt, OS errors) are translated into these at the boundary,
so callers (the CLI, the runtime) can tell an expected failure, reported in one clear
line, from a bug.
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub raises deliberately."""


class HubConfigError(HubError):
    """The hub configuration is inconsistent in a way a TOML reader cannot see."""


class StoreError(HubError):
    """The twin store (DuckDB) could not be opened, read or written."""


class StoreLocked(StoreError):
    """Another process (normally a running hub) holds the twin store open for writing."""


class StoreSchemaError(StoreError):
    """The database file was written by an incompatible version of the hub."""


class HubUnreachable(HubError):
    """A running hub was expected, but its loopback API did not answer."""


class QueryError(HubError):
    """A twin query is malformed (bad predicate, unknown entity, bad time)."""


class AlarmError(HubError):
    """An alarm operation is not allowed in the alarm's current state."""


class BrokerUnavailable(HubError):
    """The MQTT broker refused or dropped the hub's connection."""


class DemoError(HubError):
    """The demo could not start a component, or a component died."""


class CommandError(HubError):
    """A command operation is not allowed (unknown id, wrong state, two-person rule...).

    ``code`` is the operator channel's refusal code (``not_found``, ``conflict``,
    ``forbidden``, ``invalid``, ``refused``)."""

    def __init__(self, message: str, *, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


class OperatorRefused(HubError):
    """An operator request was refused before it reached an operation (identity, expiry,
    replay, role); ``code`` says why in one word, the message says it for a person."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
