"""Operator approvals of a command: the digest they sign and how it is verified.

An approval is an operator's Ed25519 signature over a command's digest. The digest
covers what the command does and what undoes it — its id, the gateway, the point, the
value and the restore value (the checkpoint) — so an approval authorises exactly one
write and exactly one rollback of it, and a hub that alters any of them invalidates it.
The signed bytes carry a context prefix, so an approval can never be mistaken for (or
replayed as) a frame signature.

Both ends use this module: the hub and the operator's client compute the digest the
operator signs; the agent recomputes it from the ``cmd`` it receives and checks every
approval against the operator keys it was configured with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgpack

from fieldtwin.protocol.errors import BadSignature, SchemaViolation, UnknownKey
from fieldtwin.protocol.keys import KeyPair, PublicKey
from fieldtwin.protocol.messages import Approval, Command, Value

APPROVAL_CONTEXT = b"fieldtwin approval v1\n"


def command_digest(
    cmd_id: str,
    gateway: str,
    entity: str,
    attribute: str,
    value: Value,
    restore_value: Value,
) -> bytes:
    """SHA-256 of the canonical msgpack of what the command writes and restores."""
    try:
        packed: bytes = msgpack.packb(
            ["cmd", cmd_id, gateway, entity, attribute, value, restore_value], use_bin_type=True
        )
    except (OverflowError, TypeError, ValueError) as exc:
        raise SchemaViolation(f"command {cmd_id} cannot be digested: {exc}") from None
    return hashlib.sha256(packed).digest()


def approval_digest(command: Command) -> bytes:
    """The digest a ``cmd``'s approvals must sign: its own, or its parent's for a rollback."""
    if command.rollback_of:
        return command_digest(
            command.rollback_of,
            command.to,
            command.entity,
            command.attribute,
            command.rollback_from,
            command.value,
        )
    return command_digest(
        command.cmd_id,
        command.to,
        command.entity,
        command.attribute,
        command.value,
        command.restore_value,
    )


def rollback_id(parent_cmd_id: str) -> str:
    """The one id a rollback of ``parent_cmd_id`` may have (so it runs at most once)."""
    return f"{parent_cmd_id}.rb"


def sign_approval(operator: str, key: KeyPair, digest: bytes) -> Approval:
    return Approval(operator, key.key_id, key.sign(APPROVAL_CONTEXT + digest))


def verify_approval(approval: Approval, key: PublicKey, digest: bytes) -> None:
    """Raise ``BadSignature`` unless ``approval`` signs ``digest`` with ``key``."""
    if approval.key_id != key.key_id:
        raise BadSignature(
            f"approval by {approval.operator} names key {approval.key_id}, not {key.key_id}"
        )
    key.verify(approval.signature, APPROVAL_CONTEXT + digest)


@dataclass(frozen=True, slots=True)
class ApprovalCheck:
    valid: tuple[str, ...]
    """Distinct operators whose approval verified."""
    problems: tuple[str, ...]
    """Why each other approval did not count."""


def check_approvals(
    approvals: Iterable[Approval],
    keys: Mapping[str, Iterable[PublicKey]],
    digest: bytes,
    *,
    exclude: Iterable[str] = (),
) -> ApprovalCheck:
    """Which approvals verify against ``keys`` (operator → public keys), once per operator."""
    excluded = set(exclude)
    valid: list[str] = []
    problems: list[str] = []
    for approval in approvals:
        if approval.operator in valid:
            problems.append(f"{approval.operator} approved twice; counted once")
            continue
        if approval.operator in excluded:
            problems.append(f"{approval.operator} proposed it and cannot approve it too")
            continue
        candidates = {k.key_id: k for k in keys.get(approval.operator, ())}
        try:
            key = candidates.get(approval.key_id)
            if key is None:
                raise UnknownKey(
                    f"{approval.operator} with key {approval.key_id} is not a known approver"
                )
            verify_approval(approval, key, digest)
        except (UnknownKey, BadSignature) as exc:
            problems.append(str(exc))
            continue
        valid.append(approval.operator)
    return ApprovalCheck(tuple(valid), tuple(problems))
