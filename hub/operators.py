"""Operators: who they are, what their roles allow, and how their requests are verified.

Pure (the clock is passed in): ``RequestGate.admit`` takes a raw message from the
operator channel and returns the verified request, or raises ``OperatorRefused`` with a
one-word ``code`` and a sentence for the operator. The checks, in order:

1. the topic is ``ft/v1/op/{operator}/req`` (``bad_topic``);
2. the frame decodes and its signature verifies against a key registered for that
   operator (``invalid``, ``unknown_operator``, ``bad_signature``);
3. it is an ``op_req`` signed by the operator the topic names (``topic_mismatch``);
4. it has not expired and does not claim an expiry further ahead than the hub accepts
   (``expired``; ``invalid``), and it was signed after this hub instance started
   (``expired``: a request captured before a restart cannot be replayed after it);
5. its ``req_id`` was not seen before (``replay``); ids are remembered until their
   request expires, and mutating ones are persisted so a restart forgets none;
6. the operator's roles allow the operation (``forbidden``).

Roles: ``viewer`` reads; ``operator`` also proposes and cancels commands and
acknowledges, shelves and unshelves alarms; ``approver`` reads, approves and rejects
commands; ``admin`` may do everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fieldtwin.hub.config import OperatorSpec
from fieldtwin.hub.errors import OperatorRefused
from fieldtwin.protocol.errors import (
    BadSignature,
    BadTopic,
    ProtocolError,
    UnknownKey,
)
from fieldtwin.protocol.frames import Frame, Limits, decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import OperatorRequest
from fieldtwin.protocol.topics import parse_operator_topic

READ = "read"
PERMISSIONS: Mapping[str, frozenset[str]] = {
    "viewer": frozenset({READ}),
    "operator": frozenset(
        {READ, "cmd.propose", "cmd.cancel", "alarm.ack", "alarm.shelve", "alarm.unshelve"}
    ),
    "approver": frozenset({READ, "cmd.approve", "cmd.reject"}),
}
ALL = "*"
MAX_AHEAD_MS = 10 * 60_000
"""A request may not claim to stay valid longer than this (it bounds the nonce memory)."""
CLOCK_SKEW_MS = 30_000
"""How far an operator's clock may run behind the hub's when signing ``sent_at``."""


def permissions(roles: Iterable[str]) -> frozenset[str]:
    granted: set[str] = set()
    for role in roles:
        if role == "admin":
            return frozenset({ALL})
        granted |= PERMISSIONS.get(role, frozenset())
    return frozenset(granted)


def allowed(roles: Iterable[str], permission: str) -> bool:
    granted = permissions(roles)
    return ALL in granted or permission in granted


def roles_allowing(permission: str) -> list[str]:
    return [role for role, granted in PERMISSIONS.items() if permission in granted] + ["admin"]


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """A request whose signature, freshness and uniqueness the hub checked."""

    operator: str
    roles: frozenset[str]
    request: OperatorRequest
    frame: Frame
    signature_ref: str
    """``req_id`` plus the first 16 hex digits of the SHA-256 of the raw frame: what audit
    records cite as the request that authorised a change."""

    @property
    def op(self) -> str:
        return self.request.op

    @property
    def req_id(self) -> str:
        return self.request.req_id


class RequestGate:
    """Verifies operator requests against the registry; remembers nonces until expiry."""

    def __init__(
        self,
        operators: Mapping[str, OperatorSpec],
        registry: KeyRegistry,
        *,
        started_ms: int,
        limits: Limits | None = None,
        max_nonces: int = 200_000,
    ) -> None:
        self.operators = operators
        self.registry = registry
        self.started_ms = started_ms
        self.limits = limits or Limits(max_frame_bytes=256 * 1024)
        self.max_nonces = max_nonces
        self._seen: dict[tuple[str, str], int] = {}

    def remember(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """Nonces persisted by an earlier run (operator, req_id, expires_at_ms)."""
        for operator, req_id, expires in entries:
            self._seen[(operator, req_id)] = expires

    def purge(self, now_ms: int) -> None:
        self._seen = {k: v for k, v in self._seen.items() if v >= now_ms}

    def topic_operator(self, topic: str) -> str | None:
        """The operator a request topic names, if it is one (for addressing refusals)."""
        try:
            operator, kind = parse_operator_topic(topic)
        except BadTopic:
            return None
        return operator if kind == "req" else None

    def admit(self, topic: str, payload: bytes, now_ms: int) -> VerifiedRequest:
        try:
            operator, kind = parse_operator_topic(topic)
        except BadTopic as exc:
            raise OperatorRefused(str(exc), code="bad_topic") from None
        if kind != "req":
            raise OperatorRefused(f"{topic} is not a request topic", code="bad_topic")
        spec = self.operators.get(operator)
        try:
            frame = decode_frame(payload, self.registry, self.limits)
        except UnknownKey as exc:
            raise OperatorRefused(
                f"{operator} is not a registered operator (or signed with an unknown key): {exc}",
                code="unknown_operator",
            ) from None
        except BadSignature as exc:
            raise OperatorRefused(
                f"the request's signature is invalid: {exc}", code="bad_signature"
            ) from None
        except ProtocolError as exc:
            raise OperatorRefused(f"malformed request: {exc}", code="invalid") from None
        if frame.sender != operator or not isinstance(frame.body, OperatorRequest):
            raise OperatorRefused(
                f"a {frame.kind} frame signed by {frame.sender} arrived on {operator}'s request "
                "topic",
                code="topic_mismatch",
            )
        if spec is None:  # pragma: no cover - the registry holds exactly the configured ids
            raise OperatorRefused(
                f"{operator} is not a registered operator", code="unknown_operator"
            )
        request = frame.body
        if request.expires_at_ms <= now_ms:
            raise OperatorRefused(
                f"request {request.req_id} expired {now_ms - request.expires_at_ms} ms ago "
                "(check the clocks of this machine and the hub)",
                code="expired",
            )
        if request.expires_at_ms > now_ms + MAX_AHEAD_MS:
            raise OperatorRefused(
                f"request {request.req_id} claims to stay valid for "
                f"{(request.expires_at_ms - now_ms) / 1000:.0f} s; the hub accepts at most "
                f"{MAX_AHEAD_MS // 1000} s",
                code="invalid",
            )
        if frame.sent_at_ms < self.started_ms - CLOCK_SKEW_MS:
            raise OperatorRefused(
                f"request {request.req_id} was signed before this hub started; send it again",
                code="expired",
            )
        key = (operator, request.req_id)
        if key in self._seen:
            raise OperatorRefused(
                f"request {request.req_id} was already received (a replay)", code="replay"
            )
        if len(self._seen) >= self.max_nonces:
            self.purge(now_ms)
            if len(self._seen) >= self.max_nonces:
                raise OperatorRefused("the hub is receiving too many requests", code="unavailable")
        self._seen[key] = request.expires_at_ms
        digest = hashlib.sha256(payload).hexdigest()[:16]
        return VerifiedRequest(operator, spec.roles, request, frame, f"{request.req_id}:{digest}")

    def authorize(self, request: VerifiedRequest, permission: str) -> None:
        if not allowed(request.roles, permission):
            roles = ", ".join(sorted(request.roles))
            need = " or ".join(roles_allowing(permission))
            raise OperatorRefused(
                f"{request.operator} ({roles}) may not {permission}: it needs the role {need}",
                code="forbidden",
            )
