"""The running hub against a real Mosquitto: acks, rebirths, state, API, metrics, restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from support.broker import MosquittoBroker
from support.hub_env import (
    GatewaySigner,
    HubFiles,
    now_ms,
    point,
    running_hub,
    sample,
    wait_for,
    write_hub_config,
)

from fieldtwin.hub.api import Endpoint
from fieldtwin.hub.runtime import Hub
from fieldtwin.protocol.frames import decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import Ack, Rebirth
from fieldtwin.protocol.topics import HUB_STATE_TOPIC, downlink_filter


class Gateway:
    """An MQTT session as gateway gw-01: publishes signed frames, collects downlink."""

    def __init__(self, broker: MosquittoBroker, files: HubFiles, name: str = "gw-01") -> None:
        self.broker = broker
        self.name = name
        self.signer = GatewaySigner(name, files.gateway_keys[name])
        self.hub_keys = KeyRegistry.of({"hub": files.hub_key.public})
        self.acks: list[Ack] = []
        self.rebirths: list[Rebirth] = []
        self.hub_states: list[dict[str, Any]] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gateway:
        password = self.broker.passwords.get(self.name) or self.broker.add_user(self.name)
        self._client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.name,
            password=password,
            identifier=f"test-{self.name}",
            timeout=10,
        )
        await self._client.__aenter__()
        await self._client.subscribe(downlink_filter(self.name), qos=1)
        await self._client.subscribe(HUB_STATE_TOPIC, qos=1)
        self._task = asyncio.create_task(self._receive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        assert self._client is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        await self._client.__aexit__(None, None, None)

    async def _receive(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = bytes(message.payload)  # type: ignore[arg-type]
            if str(message.topic) == HUB_STATE_TOPIC:
                self.hub_states.append(json.loads(payload))
                continue
            frame = decode_frame(payload, self.hub_keys)
            if isinstance(frame.body, Ack):
                self.acks.append(frame.body)
            elif isinstance(frame.body, Rebirth):
                self.rebirths.append(frame.body)

    async def send(self, message: tuple[str, bytes]) -> None:
        assert self._client is not None
        await self._client.publish(message[0], message[1], qos=1)

    def acked(self, seq: int) -> bool:
        return any(a.epoch == self.signer.epoch and a.covers(seq) for a in self.acks)


def _get(hub: Hub, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.api_port}{path}", timeout=10) as resp:
        body = resp.read()
        if resp.headers["Content-Type"].startswith("application/json"):
            return json.loads(body)
        return body.decode()


@pytest.fixture
def files(tmp_path: Path, broker: MosquittoBroker) -> HubFiles:
    return write_hub_config(
        tmp_path,
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id=f"ft-hub-{tmp_path.name[-12:]}",
    )


async def test_hub_acks_stores_and_serves_the_twin(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    async with running_hub(files.config) as hub, Gateway(broker, files) as gw:
        await wait_for(lambda: any(s.get("online") for s in gw.hub_states))
        assert gw.hub_states[-1]["instance"] == hub.instance
        t = now_ms()
        await gw.send(
            gw.signer.birth(
                [point("tank-1", "level", unit="m"), point("pump-1", "speed", unit="rpm")],
                [sample("tank-1", "level", 2.5, t), sample("pump-1", "speed", 900, t)],
            )
        )
        for i in range(1, 6):
            await gw.send(gw.signer.data([sample("tank-1", "level", 2.5 + i / 100, t + i)]))
        await wait_for(lambda: gw.acked(6))
        assert not gw.rebirths
        twin = await asyncio.to_thread(_get, hub, "/api/twin?type=tank")
        assert [e["physical_id"] for e in twin] == ["tank-1"]
        level = twin[0]["attributes"]["level"]
        assert level["value"] == pytest.approx(2.55)
        assert level["unit"] == "m"
        assert level["source"] == "gw-01"
        filtered = await asyncio.to_thread(_get, hub, "/api/twin?where=speed%3E800")
        assert [e["physical_id"] for e in filtered] == ["pump-1"]
        history = await asyncio.to_thread(
            _get, hub, "/api/history?entity=tank-1&attribute=level&from=1h"
        )
        assert [h["value"] for h in history][-2:] == [pytest.approx(2.54), pytest.approx(2.55)]
        assert history[-1]["frame"] == f"gw-01/{gw.signer.epoch}/6"
        metrics = await asyncio.to_thread(_get, hub, "/metrics")
        assert 'fieldtwin_hub_frames_accepted_total{gateway="gw-01",kind="data"} 5' in metrics
        assert "fieldtwin_hub_points_applied_total 7" in metrics
        assert 'fieldtwin_hub_frames_rejected_total{reason="replay"} 0' in metrics
        await wait_for(lambda: hub.last_report is not None)
        status = await asyncio.to_thread(_get, hub, "/api/status")
        assert status["gateways"][0]["id"] == "gw-01"
        assert status["gateways"][0]["up"]
        # replay through the broker: refused, counted, nothing applied twice
        await gw.send(gw.signer.data([sample("tank-1", "level", 9.9, t + 3)], seq=3))
        await wait_for(lambda: hub.metrics.frames_rejected["replay"] == 1)
        assert hub.service.ingest.state.current[("tank-1", "level")].value == pytest.approx(2.55)
    assert not files.config.parent.joinpath("state", "hub.duckdb.api.json").exists()


async def test_gap_leads_to_rebirth_and_birth_closes_it(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    async with running_hub(files.config) as hub, Gateway(broker, files) as gw:
        await gw.send(gw.signer.birth([], [sample("tank-1", "level", 2.0)]))
        gw.signer.seq += 2  # frames 2 and 3 were dropped by the agent's overflow policy
        await gw.send(gw.signer.data([sample("tank-1", "level", 2.1)]))
        await wait_for(lambda: gw.rebirths, within=20)
        assert "gap" in gw.rebirths[0].reason
        assert gw.rebirths[0].to == "gw-01"
        await gw.send(gw.signer.birth([], [], low_water=gw.signer.seq + 1))
        await wait_for(lambda: gw.acked(gw.signer.seq) and gw.acked(2))
        assert hub.service.ingest.tracker.gaps("gw-01") == []


async def test_death_makes_gateway_silent_and_raises_alarm(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    async with running_hub(files.config) as hub, Gateway(broker, files) as gw:
        t = now_ms()
        await gw.send(
            gw.signer.birth(
                [],
                [
                    sample("tank-1", "level", 2.0, t),
                    sample("tank-1", "temp", 20.0, t),
                    sample("pump-1", "speed", 900, t),
                    sample("pump-1", "speed_sp", 900, t),
                    sample("pump-1", "running", True, t),
                ],
            )
        )
        await wait_for(
            lambda: hub.last_report and hub.last_report.health.get("pump-1") == "healthy"
        )
        await gw.send(gw.signer.death(reason="connection lost"))

        def silent() -> bool:
            report = hub.last_report
            return bool(report and "gw-01" in report.silent_gateways)

        await wait_for(silent)
        report = hub.last_report
        assert report is not None
        assert report.health["tank-1"] == "stale"
        assert report.health["pump-1"] == "stale"
        rules = {f.rule for f in report.findings if f.entity == "gw-01"}
        assert rules == {"temporal.gateway_silent"}
        assert not [f for f in report.findings if f.rule == "temporal.sensor_stale"]
        alarms = await asyncio.to_thread(_get, hub, "/api/alarms?state=active")
        assert any(
            a["rule"] == "temporal.gateway_silent" and a["entity"] == "gw-01" for a in alarms
        )
        metrics = await asyncio.to_thread(_get, hub, "/metrics")
        assert 'fieldtwin_hub_gateway_up{gateway="gw-01"} 0' in metrics
        assert 'fieldtwin_hub_alarms_active{severity="critical"} 1' in metrics


async def test_hub_restart_mid_stream_applies_nothing_twice(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    sent = 0
    t = now_ms()
    async with Gateway(broker, files) as gw:
        async with running_hub(files.config) as hub:
            await gw.send(gw.signer.birth([], []))
            for i in range(20):
                await gw.send(gw.signer.data([sample("tank-1", "level", 2.0 + i / 100, t + i)]))
                sent += 1
            await wait_for(lambda: gw.acked(21))
            first_instance = hub.instance
        # hub down: the gateway keeps sending; the broker queues it (persistent session)
        for i in range(20, 40):
            await gw.send(gw.signer.data([sample("tank-1", "level", 2.0 + i / 100, t + i)]))
            sent += 1
        async with running_hub(files.config) as hub:
            assert hub.instance != first_instance
            await wait_for(lambda: gw.acked(41))
            # an agent that did not see an ack resends: all replays
            for seq in range(15, 25):
                value = 2.0 + (seq - 2) / 100
                await gw.send(
                    gw.signer.data([sample("tank-1", "level", value, t + seq - 2)], seq=seq)
                )
            await wait_for(lambda: hub.metrics.frames_rejected["replay"] == 10)
            rows = await hub.db(
                hub.service.store.query,
                "SELECT count(*), count(DISTINCT ts_ms) FROM history WHERE attribute = 'level'",
            )
            assert rows == [(sent, sent)]
            current = hub.service.ingest.state.current[("tank-1", "level")]
            assert current.value == pytest.approx(2.39)
            assert current.ts_ms == t + 39
            endpoint = Endpoint.read(files.config.parent / "state" / "hub.duckdb.api.json")
            assert endpoint is not None
            assert endpoint.instance == hub.instance


async def test_a_loop_stops_even_when_a_library_swallows_its_cancellation() -> None:
    from fieldtwin.hub.runtime import _stop_if_cancelled

    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            _stop_if_cancelled()
            turns += 1
            # what Python 3.11's wait_for (inside aiomqtt's publish) does when the
            # awaited call completes just as the task is cancelled: the request is lost
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.create_task(loop(), name="lossy-loop")
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the loop ran on after its cancellation was swallowed"
    assert task.cancelled()
    assert turns >= 2
