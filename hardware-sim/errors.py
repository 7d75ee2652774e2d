"""Everything the simulator raises on purpose.

Scenario files are checked with ``fieldtwin.protocol.config`` and fail with its
``ConfigError`` (file, key, fix). Everything else the simulator refuses at run time is a
``SimError`` subclass, so the CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations


class SimError(Exception):
    """Base of every error the simulator raises deliberately."""

    reason = "sim_error"


class FaultError(SimError):
    """A fault request names an unknown device or point, or a kind the device cannot show."""

    reason = "fault"

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class UnknownFault(FaultError):
    """A request names a fault id the simulator does not have (HTTP 404, not 400)."""

    reason = "unknown_fault"

    def __init__(self, fault_id: int) -> None:
        super().__init__("id", f"no fault with id {fault_id}")


class WriteRejected(SimError):
    """A client write is outside the point's limits or targets a read-only point."""

    reason = "write_rejected"

    def __init__(self, point: str, problem: str) -> None:
        self.point = point
        self.problem = problem
        super().__init__(f"{point}: {problem}")


class EndpointError(SimError):
    """A device endpoint cannot be opened (port in use, pty or symlink not creatable)."""

    reason = "endpoint"


class ControlError(SimError):
    """The control interface of a running simulator is unreachable or refused a request."""

    reason = "control"


class GroundTruthError(SimError):
    """The ground-truth file cannot be created or written."""

    reason = "ground_truth"


class NoGroundTruth(SimError):
    """A query needs the ground-truth file, but this run records none (``--no-truth``)."""

    reason = "no_ground_truth"
