"""The project's broker ACL, exercised on a real Mosquitto with real clients."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest
from support.broker import MosquittoBroker


def _client(broker: MosquittoBroker, user: str, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=broker.passwords[user],
        identifier=f"test-{user}",
        timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


async def _received(client: aiomqtt.Client, seconds: float) -> list[str]:
    topics: list[str] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                topics.append(str(message.topic))
    except TimeoutError:
        pass
    return topics


async def test_gateways_reach_only_their_own_topics(broker: MosquittoBroker) -> None:
    broker.add_user("gw-a")
    broker.add_user("gw-b")
    async with (
        _client(broker, "hub") as hub,
        _client(broker, "gw-a") as gw_a,
        _client(broker, "gw-b") as gw_b,
    ):
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        await gw_a.subscribe("ft/v1/gw-a/down/#", qos=1)
        await gw_a.subscribe("ft/v1/gw-b/down/#", qos=1)  # not allowed: nothing arrives
        await gw_a.publish("ft/v1/gw-a/up/data", b"own", qos=1)
        await gw_a.publish("ft/v1/gw-b/up/data", b"forged", qos=1)  # denied silently
        await gw_b.publish("ft/v1/gw-a/down/cmd", b"forged", qos=1)  # gateways cannot write down
        await hub.publish("ft/v1/gw-a/down/ack", b"ack", qos=1)
        await hub.publish("ft/v1/gw-b/down/ack", b"ack", qos=1)
        hub_seen = await _received(hub, 1.0)
        gw_a_seen = await _received(gw_a, 0.5)
    assert hub_seen == ["ft/v1/gw-a/up/data"]
    assert gw_a_seen == ["ft/v1/gw-a/down/ack"]


async def test_wrong_password_is_refused(broker: MosquittoBroker) -> None:
    client = aiomqtt.Client(broker.host, broker.port, username="hub", password="wrong", timeout=5)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_broker_restarts_on_the_same_port(broker: MosquittoBroker) -> None:
    port = broker.port
    broker.restart()
    assert broker.port == port
    async with _client(broker, "hub") as hub:
        await hub.publish("ft/v1/hub/state", b"online", qos=1, retain=True)
