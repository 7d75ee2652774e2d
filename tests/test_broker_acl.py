"""The generated broker config (``fieldtwin broker config``) on a real Mosquitto.

``site`` is a broker exactly as a site runs it (client ids bound to usernames, packet
limit, TLS with client certificates) with users hub, gateways gw-a/gw-b and operators
op-a/op-b. Denied publishes are dropped silently by Mosquitto (QoS 1 is still acked),
so every denial is checked by what a legitimate subscriber receives: the allowed
message sent after it arrives, the denied one never does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from support.broker import MosquittoBroker

SITE_GATEWAYS = ("gw-a", "gw-b")
SITE_OPERATORS = ("op-a", "op-b")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    instance = MosquittoBroker(
        tmp_path_factory.mktemp("site-broker"),
        tls=True,
        site=True,
        gateways=SITE_GATEWAYS,
        operators=SITE_OPERATORS,
    )
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def _client(
    broker: MosquittoBroker, user: str, identifier: str | None = None, **kwargs: object
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=broker.passwords[user],
        identifier=identifier or f"test-{user}",
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


async def _until(client: aiomqtt.Client, topic: str, seconds: float = 10.0) -> list[str]:
    """Everything received up to and including ``topic`` (the allowed marker)."""
    topics: list[str] = []
    async with asyncio.timeout(seconds):
        async for message in client.messages:
            topics.append(str(message.topic))
            if topics[-1] == topic:
                return topics
    return topics


def test_the_broker_starts_without_warnings(site: MosquittoBroker) -> None:
    log = site.log_file.read_text()
    warnings = [
        line
        for line in log.splitlines()
        if "Warning" in line and "should not be run as root" not in line
    ]
    assert warnings == []
    acl = site.acl_file.read_text().splitlines()
    assert not [line for line in acl if line.startswith("pattern")]


async def test_gateways_reach_only_their_own_topics(site: MosquittoBroker) -> None:
    async with (
        _client(site, "hub") as hub,
        _client(site, "gw-a") as gw_a,
        _client(site, "gw-b") as gw_b,
    ):
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        await gw_a.subscribe("ft/v1/gw-a/down/#", qos=1)
        await gw_a.subscribe("ft/v1/gw-b/down/#", qos=1)  # not allowed: nothing arrives
        await gw_a.subscribe("ft/v1/op/+/resp", qos=1)  # not allowed either
        await gw_a.publish("ft/v1/gw-b/up/data", b"forged", qos=1)  # denied silently
        await gw_a.publish("ft/v1/hub/state", b"forged", qos=1)  # only the hub writes it
        await gw_b.publish("ft/v1/gw-a/down/cmd", b"forged", qos=1)  # gateways cannot write down
        await gw_b.publish("ft/v1/op/op-a/req", b"forged", qos=1)
        await gw_a.publish("ft/v1/gw-a/up/data", b"own", qos=1)
        await hub.publish("ft/v1/gw-b/down/ack", b"ack", qos=1)
        await hub.publish("ft/v1/op/op-a/resp", b"resp", qos=1)
        await hub.publish("ft/v1/gw-a/down/ack", b"ack", qos=1)
        hub_seen = await _until(hub, "ft/v1/gw-a/up/data")
        gw_a_seen = await _until(gw_a, "ft/v1/gw-a/down/ack")
        hub_seen += await _received(hub, 0.3)
    assert hub_seen == ["ft/v1/gw-a/up/data"]
    assert gw_a_seen == ["ft/v1/gw-a/down/ack"]


async def test_a_loadgen_user_plays_every_gateway_but_not_the_hub(site: MosquittoBroker) -> None:
    """The benchmark-only role: every uplink and downlink, never a downlink write."""
    site.add_user("bench", role="loadgen")
    async with _client(site, "hub") as hub, _client(site, "bench") as bench:
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        await bench.subscribe("ft/v1/+/down/#", qos=1)
        await bench.subscribe("ft/v1/op/+/resp", qos=1)  # not allowed: nothing arrives
        await bench.publish("ft/v1/gw-b/down/ack", b"forged", qos=1)  # denied silently
        await bench.publish("ft/v1/hub/state", b"forged", qos=1)
        await bench.publish("ft/v1/op/op-a/req", b"forged", qos=1)
        await bench.publish("ft/v1/gw-a/up/data", b"a", qos=1)
        await bench.publish("ft/v1/gw-b/up/data", b"b", qos=1)
        await hub.publish("ft/v1/op/op-a/resp", b"resp", qos=1)
        await hub.publish("ft/v1/gw-a/down/ack", b"ack", qos=1)
        await hub.publish("ft/v1/gw-b/down/ack", b"ack", qos=1)
        hub_seen = await _until(hub, "ft/v1/gw-b/up/data")
        bench_seen = await _until(bench, "ft/v1/gw-b/down/ack")
        hub_seen += await _received(hub, 0.3)
    assert hub_seen == ["ft/v1/gw-a/up/data", "ft/v1/gw-b/up/data"]
    assert bench_seen == ["ft/v1/gw-a/down/ack", "ft/v1/gw-b/down/ack"]


async def test_an_operator_cannot_publish_on_another_operators_topic(
    site: MosquittoBroker,
) -> None:
    async with (
        _client(site, "hub") as hub,
        _client(site, "op-a") as op_a,
        _client(site, "op-b") as op_b,
    ):
        await hub.subscribe("ft/v1/op/+/req", qos=1)
        await op_b.subscribe("ft/v1/op/op-b/resp", qos=1)
        await op_a.subscribe("ft/v1/op/op-b/resp", qos=1)  # another's replies: nothing arrives
        await op_a.subscribe("ft/v1/hub/view/#", qos=1)
        await op_a.subscribe("ft/v1/op/op-a/resp", qos=1)
        await op_a.publish("ft/v1/op/op-b/req", b"forged", qos=1)  # denied by the broker
        await op_a.publish("ft/v1/gw-a/down/cmd", b"forged", qos=1)  # never a gateway's
        await op_a.publish("ft/v1/hub/view/twin", b"forged", qos=1)  # only the hub writes views
        await op_a.publish("ft/v1/op/op-a/req", b"own", qos=1)
        hub_seen = await _until(hub, "ft/v1/op/op-a/req")
        await hub.publish("ft/v1/op/op-b/resp", b"for b", qos=1)
        await hub.publish("ft/v1/hub/view/twin", b"view", qos=1)
        await hub.publish("ft/v1/op/op-a/resp", b"for a", qos=1)
        op_a_seen = await _until(op_a, "ft/v1/op/op-a/resp")
        op_b_seen = await _until(op_b, "ft/v1/op/op-b/resp")
        hub_seen += await _received(hub, 0.3)
    assert hub_seen == ["ft/v1/op/op-a/req"]
    assert op_a_seen == ["ft/v1/hub/view/twin", "ft/v1/op/op-a/resp"]
    assert op_b_seen == ["ft/v1/op/op-b/resp"]


async def _takeover(broker: MosquittoBroker, attacker: str, victim_id: str) -> bool:
    """Does ``attacker`` connecting with client id ``victim_id`` knock the hub off?"""
    async with _client(broker, "hub", identifier=victim_id) as hub:
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        async with _client(broker, attacker, identifier=victim_id) as intruder:
            await intruder.publish(f"ft/v1/{attacker}/up/data", b"x", qos=1)
            try:
                await _until(hub, f"ft/v1/{attacker}/up/data", 5)
                await hub.publish("ft/v1/hub/state", b"still here", qos=1, timeout=5)
            except (aiomqtt.MqttError, TimeoutError):
                return True
    return False


async def test_a_gateway_cannot_take_over_the_hubs_client_id(site: MosquittoBroker) -> None:
    assert not await _takeover(site, "gw-a", "hub")
    assert "as gw-a" in site.log_file.read_text()  # the broker renamed the intruder


async def test_a_gateway_cannot_take_over_another_gateway(site: MosquittoBroker) -> None:
    async with _client(site, "hub") as hub, _client(site, "gw-b", identifier="gw-b") as gw_b:
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        async with _client(site, "gw-a", identifier="gw-b") as intruder:
            await intruder.publish("ft/v1/gw-a/up/data", b"x", qos=1)
            await gw_b.publish("ft/v1/gw-b/up/data", b"still here", qos=1, timeout=5)
            seen = await _until(hub, "ft/v1/gw-b/up/data")
    assert "ft/v1/gw-b/up/data" in seen


async def test_without_the_binding_the_takeover_works(broker: MosquittoBroker) -> None:
    """The control: the shared test broker leaves client ids free, and there a
    gateway's credentials do knock the hub off. So the check above can fail."""
    broker.add_user("gw-a")
    assert await _takeover(broker, "gw-a", "victim-hub")


async def test_packets_over_the_limit_are_refused_the_largest_frame_passes(
    site: MosquittoBroker,
) -> None:
    largest = site.options.max_frame_bytes
    topic = "ft/v1/gw-a/up/data"
    async with _client(site, "hub") as hub:
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        async with _client(site, "gw-a") as gw_a:
            await gw_a.publish(topic, b"\x01" * largest, qos=1, timeout=30)
            async with asyncio.timeout(30):
                async for message in hub.messages:
                    assert len(message.payload) == largest  # type: ignore[arg-type]
                    break
        with pytest.raises((aiomqtt.MqttError, TimeoutError)):  # noqa: PT012
            async with _client(site, "gw-a") as gw_a:
                await gw_a.publish(topic, b"\x02" * (16 << 20), qos=1, timeout=3)
                await gw_a.publish(topic, b"after", qos=1, timeout=2)
        assert await _received(hub, 1.0) == []


def _tls_client(broker: MosquittoBroker, user: str, context: ssl.SSLContext) -> aiomqtt.Client:
    assert broker.tls_port is not None
    return aiomqtt.Client(
        "localhost",
        broker.tls_port,
        username=user,
        password=broker.passwords[user],
        timeout=5,
        tls_context=context,
    )


async def test_tls_with_the_generated_ca_and_client_certificates(site: MosquittoBroker) -> None:
    ca = site.tls_files.ca_file
    with_cert = ssl.create_default_context(cafile=str(ca))
    with_cert.load_cert_chain(*(str(p) for p in site.client_cert("gw-b")))
    async with _client(site, "hub") as hub:
        await hub.subscribe("ft/v1/+/up/#", qos=1)
        async with _tls_client(site, "gw-b", with_cert) as gw_b:
            await gw_b.publish("ft/v1/gw-b/up/data", b"over tls", qos=1)
        assert await _until(hub, "ft/v1/gw-b/up/data") == ["ft/v1/gw-b/up/data"]
    without_cert = ssl.create_default_context(cafile=str(ca))
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with _tls_client(site, "gw-b", without_cert):
            pass


async def test_wrong_password_is_refused(site: MosquittoBroker) -> None:
    client = aiomqtt.Client(site.host, site.port, username="hub", password="wrong", timeout=5)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_a_user_added_later_can_log_in(site: MosquittoBroker) -> None:
    site.add_user("gw-late")
    async with _client(site, "gw-late") as late:
        await late.publish("ft/v1/gw-late/up/data", b"hello", qos=1)


async def test_broker_restarts_on_the_same_port(site: MosquittoBroker) -> None:
    port = site.port
    site.restart()
    assert site.port == port
    async with _client(site, "hub") as hub:
        await hub.publish("ft/v1/hub/state", b"online", qos=1, retain=True)


def test_files_the_broker_reads_are_private(site: MosquittoBroker) -> None:
    root: Path = site.workdir
    for secret in (root / "passwords").iterdir():
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert site.passwd_file.stat().st_mode & 0o007 == 0
    assert site.files.server_key is not None
    assert site.files.server_key.stat().st_mode & 0o007 == 0
