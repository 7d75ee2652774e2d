from __future__ import annotations

import pytest
from hypothesis import given
from support.strategies import ids

from fieldtwin.protocol import BadTopic
from fieldtwin.protocol.messages import DOWNLINK_KINDS, UPLINK_KINDS
from fieldtwin.protocol.topics import (
    HUB_STATE_TOPIC,
    Topic,
    downlink_filter,
    downlink_topic,
    parse_topic,
    uplink_topic,
)


@given(ids)
def test_build_and_parse_roundtrip(gateway: str) -> None:
    if gateway == "hub":
        return
    for kind in UPLINK_KINDS:
        assert parse_topic(uplink_topic(gateway, kind)) == Topic(gateway, "up", kind)
    for kind in DOWNLINK_KINDS:
        assert parse_topic(downlink_topic(gateway, kind)) == Topic(gateway, "down", kind)


def test_shapes() -> None:
    assert uplink_topic("gw-01", "data") == "ft/v1/gw-01/up/data"
    assert downlink_topic("gw-01", "cmd") == "ft/v1/gw-01/down/cmd"
    assert downlink_filter("gw-01") == "ft/v1/gw-01/down/+"
    assert HUB_STATE_TOPIC == "ft/v1/hub/state"


@pytest.mark.parametrize(
    "topic",
    [
        "ft/v1/gw/up",
        "ft/v2/gw/up/data",
        "ft/v1/gw/sideways/data",
        "ft/v1/gw/up/cmd",
        "ft/v1/gw/down/data",
        "ft/v1/hub/up/data",
        "ft/v1/g+w/up/data",
        "ft/v1//up/data",
        "ft/v1/gw/up/data/extra",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(BadTopic):
        parse_topic(topic)


def test_builders_refuse_wrong_direction_and_reserved_ids() -> None:
    with pytest.raises(BadTopic):
        uplink_topic("gw", "cmd")
    with pytest.raises(BadTopic):
        downlink_topic("gw", "data")
    with pytest.raises(BadTopic, match="reserved"):
        uplink_topic("hub", "data")
    with pytest.raises(BadTopic):
        uplink_topic("a/b", "data")
