"""MQTT topic names: ``ft/v1/{gateway}/up/{kind}``, ``ft/v1/{gateway}/down/{kind}``.

The hub's online state is a retained message on ``ft/v1/hub/state``, which is why
``hub`` can never be a gateway id. Broker ACLs give each gateway write access to its
own ``up/`` and read access to its own ``down/`` only; the topic is therefore a
routing hint, and receivers still check that the signed sender matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fieldtwin.protocol.errors import BadTopic
from fieldtwin.protocol.messages import DOWNLINK_KINDS, ID_PATTERN, UPLINK_KINDS

PREFIX = "ft/v1"
HUB_STATE_TOPIC = f"{PREFIX}/hub/state"
RESERVED_IDS = frozenset({"hub", "op"})
HUB_UPLINK_FILTER = f"{PREFIX}/+/up/+"
"""What the hub subscribes to: every gateway's uplink."""
OPERATOR_REQUEST_FILTER = f"{PREFIX}/op/+/req"
"""What the hub subscribes to: every operator's requests."""
VIEW_PREFIX = f"{PREFIX}/hub/view"
"""Where the hub publishes signed views for consoles (``ft/v1/hub/view/{stream}``)."""

Direction = Literal["up", "down"]


def check_gateway_id(gateway: str) -> str:
    if ID_PATTERN.fullmatch(gateway) is None:
        raise BadTopic(
            f"gateway id {gateway!r} must be 1-64 characters of letters, digits, '_', '.' "
            "or '-', starting with a letter or digit"
        )
    if gateway in RESERVED_IDS:
        raise BadTopic(f"gateway id {gateway!r} is reserved; choose another name")
    return gateway


def uplink_topic(gateway: str, kind: str) -> str:
    if kind not in UPLINK_KINDS:
        raise BadTopic(f"{kind!r} is not an uplink kind ({', '.join(sorted(UPLINK_KINDS))})")
    return f"{PREFIX}/{check_gateway_id(gateway)}/up/{kind}"


def downlink_topic(gateway: str, kind: str) -> str:
    if kind not in DOWNLINK_KINDS:
        raise BadTopic(f"{kind!r} is not a downlink kind ({', '.join(sorted(DOWNLINK_KINDS))})")
    return f"{PREFIX}/{check_gateway_id(gateway)}/down/{kind}"


def downlink_filter(gateway: str) -> str:
    """What an agent subscribes to."""
    return f"{PREFIX}/{check_gateway_id(gateway)}/down/+"


def operator_request_topic(operator: str) -> str:
    """Where an operator's client publishes its signed requests (only it may write here)."""
    return f"{PREFIX}/op/{_operator_id(operator)}/req"


def operator_response_topic(operator: str) -> str:
    """Where the hub answers an operator (only that operator may read here)."""
    return f"{PREFIX}/op/{_operator_id(operator)}/resp"


def parse_operator_topic(topic: str) -> tuple[str, str]:
    """``ft/v1/op/{operator}/{req|resp}`` → (operator, "req" or "resp")."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "op":
        raise BadTopic(f"topic {topic!r} is not ft/v1/op/<operator>/<req|resp>")
    if parts[4] not in ("req", "resp"):
        raise BadTopic(f"topic {topic!r}: expected req or resp, got {parts[4]!r}")
    return _operator_id(parts[3]), parts[4]


def view_topic(stream: str) -> str:
    if ID_PATTERN.fullmatch(stream) is None:
        raise BadTopic(f"view stream {stream!r} is not a valid name")
    return f"{VIEW_PREFIX}/{stream}"


def _operator_id(operator: str) -> str:
    if ID_PATTERN.fullmatch(operator) is None or operator in RESERVED_IDS:
        raise BadTopic(f"operator id {operator!r} is not valid")
    return operator


@dataclass(frozen=True, slots=True)
class Topic:
    gateway: str
    direction: Direction
    kind: str


def parse_topic(topic: str) -> Topic:
    """Split a gateway topic, refusing anything outside the scheme."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise BadTopic(f"topic {topic!r} is not ft/v1/<gateway>/<up|down>/<kind>")
    _, _, gateway, direction, kind = parts
    check_gateway_id(gateway)
    if direction == "up":
        if kind not in UPLINK_KINDS:
            raise BadTopic(f"topic {topic!r}: {kind!r} is not an uplink kind")
        return Topic(gateway, "up", kind)
    if direction == "down":
        if kind not in DOWNLINK_KINDS:
            raise BadTopic(f"topic {topic!r}: {kind!r} is not a downlink kind")
        return Topic(gateway, "down", kind)
    raise BadTopic(f"topic {topic!r}: direction must be 'up' or 'down', got {direction!r}")
