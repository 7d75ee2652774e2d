"""What a technician and a monitoring system see: implausible values, the Prometheus
endpoint of a running agent, two agents sharing a gateway id, and clear errors.

Real parts throughout: the simulator's devices, the session's Mosquitto, the hub peer,
agents running in this event loop and ``fieldtwin agent check`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.agent_env import AgentEnv, devices_from_example, running_agent, toml_dumps
from support.broker import MosquittoBroker
from support.hub_peer import HubPeer
from support.sim import SimProcess

from fieldtwin.protocol.messages import Quality

CLI = [sys.executable, "-c", "from fieldtwin.protocol.cli import main; raise SystemExit(main())"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def metric(page: str, name: str, **labels: str) -> float:
    """The value of one sample on a Prometheus text page (labels must match exactly)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
    for line in page.splitlines():
        found = re.match(pattern, line)
        if found:
            return float(found.group(1))
    raise AssertionError(f"{name}{{{wanted}}} not on the page:\n{page}")


def swapped_pumps(plant: SimProcess) -> list[dict[str, Any]]:
    """The pump station with two classic commissioning mistakes and valid ranges."""
    devices = devices_from_example("pumps", plant.endpoints)
    points = {p["attribute"]: p for p in devices[0]["points"]}
    # uint16 in the wrong byte order: ~898 rpm reads as ~33,000 rpm.
    points["speed"].update(byte_order="little", valid_min=0, valid_max=1800)
    # float32 in the wrong byte order (BADC): 2.5 m reads as ~4e-20 m, inside 0..5 m.
    points["level"].update(byte_order="little", valid_min=0, valid_max=5)
    # A range the real value is outside of, sent UNCERTAIN with its value.
    points["motor_current"].update(valid_max=0.5, out_of_range="uncertain")
    return devices


@pytest.fixture
def env(tmp_path: Path, broker: MosquittoBroker, request: pytest.FixtureRequest) -> AgentEnv:
    name = "gw-op-" + request.node.name.replace("test_", "")[:14].replace("_", "-").strip("-")
    return AgentEnv.create(tmp_path, name, broker)


async def scrape(port: int) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


async def test_implausible_values_are_flagged_counted_logged_and_scraped(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fieldtwin.agent")
    config_data = env.config(swapped_pumps(plant))
    config_data["metrics"] = {"listen": "127.0.0.1:0"}
    env.config_path.write_text(toml_dumps(config_data))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(env.config_path) as agent,
    ):
        view = hub.gateways[env.gateway]

        def arrived(attribute: str, quality: Quality) -> bool:
            return any(s.attribute == attribute and s.quality == quality for s in view.samples)

        await hub.wait_for(
            lambda: (
                arrived("speed", Quality.BAD)
                and arrived("level", Quality.BAD)
                and arrived("motor_current", Quality.UNCERTAIN)
                and arrived("position", Quality.GOOD)
            ),
            45,
            what="implausible readings flagged at the hub",
        )
        # Never sent as good data; BAD carries no value, UNCERTAIN keeps it.
        assert not any(
            s.quality == Quality.GOOD for s in view.samples if s.attribute in ("speed", "level")
        )
        assert all(s.value is None for s in view.values("pump-1", "speed"))
        current = view.values("pump-1", "motor_current")
        assert current
        assert all(s.quality == Quality.UNCERTAIN for s in current)
        assert all(isinstance(s.value, float) and s.value > 0.5 for s in current)
        counted = agent.sampler.counters.implausible
        assert counted >= 3
        # One log line per interval, not one per reading.
        lines = [r for r in caplog.records if "implausible value" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].ft_fields["alarm"] == "implausible_value"  # type: ignore[attr-defined]

        # The running agent's endpoint, scraped as Prometheus would.
        port = agent.metrics.bound_port
        await hub.wait_for(lambda: agent.uplink.stats.acked_frames > 0, 30, what="acks")
        status, content_type, page = await scrape(port)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert metric(page, "fieldtwin_agent_implausible_values_total", device="pump-station") >= (
            counted
        )
        assert metric(page, "fieldtwin_agent_broker_connected") == 1
        assert metric(page, "fieldtwin_agent_frames_published_total") > 0
        assert metric(page, "fieldtwin_agent_frames_acked_total") > 0
        assert metric(page, "fieldtwin_agent_buffer_samples") >= 0
        assert metric(page, "fieldtwin_agent_buffer_oldest_age_seconds") >= 0
        assert metric(page, "fieldtwin_agent_overflow_dropped_samples_total") == 0
        labels = {"device": "pump-station", "protocol": "modbus-tcp"}
        assert metric(page, "fieldtwin_agent_source_success_ratio", **labels) == 1.0
        assert 0 < metric(page, "fieldtwin_agent_source_latency_seconds", **labels) < 5
        assert metric(page, "fieldtwin_agent_source_requests_total", **labels) > 0
        assert metric(page, "fieldtwin_agent_rebirths_total") == 0
        assert (
            metric(
                page,
                "fieldtwin_agent_info",
                gateway=env.gateway,
                epoch=str(agent.outbox.sync.epoch),
                version=agent.status({})["version"],
            )
            == 1
        )
        # Counters move between scrapes.
        before = metric(page, "fieldtwin_agent_readings_total")
        await asyncio.sleep(1.5)
        _, _, later = await scrape(port)
        assert metric(later, "fieldtwin_agent_readings_total") > before
        # The status file carries the same counts.
        status_json = agent.status({})
        assert status_json["implausible_points"]["pump-1.speed"] >= 1
        assert status_json["implausible_by_device"]["pump-station"] >= counted
    # The endpoint goes away with the agent.
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(port)


def test_check_flags_a_byte_swapped_uint16_when_a_range_is_given(
    env: AgentEnv, plant: SimProcess
) -> None:
    devices = devices_from_example("pumps", plant.endpoints)
    speed = next(p for p in devices[0]["points"] if p["attribute"] == "speed")
    speed["byte_order"] = "little"
    config = env.write_config(devices)
    # Without a range, a swapped uint16 is just a number: nothing to judge it by.
    result = run("agent", "check", "-c", str(config), "--skip-broker")
    line = next(row for row in result.stdout.splitlines() if "pump-1.speed " in row)
    assert line.rstrip().endswith("ok"), result.stdout
    speed.update(valid_min=0, valid_max=1800)
    config = env.write_config(devices)
    result = run("agent", "check", "-c", str(config), "--skip-broker")
    assert result.returncode == 1, result.stdout
    line = next(row for row in result.stdout.splitlines() if "pump-1.speed " in row)
    assert "is outside the valid range 0..1800" in line
    assert "only ABCD looks plausible: byte_order='big'" in line
    assert "!*" in line  # the configured (swapped) order's value, marked implausible


def test_a_missing_rtu_port_is_named_not_called_a_refused_connection(env: AgentEnv) -> None:
    devices = devices_from_example("field")
    devices = [d for d in devices if d["protocol"] == "modbus-rtu"]
    devices[0]["path"] = str(env.root / "ttyUSB-not-plugged-in")
    config = env.write_config(devices)
    result = run("agent", "check", "-c", str(config), "--skip-broker")
    assert result.returncode == 1
    assert "ttyUSB-not-plugged-in does not exist" in result.stdout
    assert "refused" not in result.stdout


def test_state_dir_flag_with_state_dir_in_the_file(env: AgentEnv, tmp_path: Path) -> None:
    config = env.write_config(devices_from_example("pumps"))
    other = tmp_path / "other-state"
    result = run("agent", "status", "-c", str(config), "--state-dir", str(other))
    assert result.returncode == 3, result.stderr  # not running: no error about the key
    assert "unknown key" not in result.stderr
    assert str(other / "outbox.duckdb") in result.stdout


async def test_two_agents_with_one_gateway_id_are_told_why_they_flap(
    env: AgentEnv, broker: MosquittoBroker, plant: SimProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fieldtwin.agent")
    devices = devices_from_example("pumps", plant.endpoints)
    first = env.write_config(devices)
    # A copy of the same gateway's config on "another host": same id, key and login,
    # its own state directory (and so its own buffer and epoch).
    data = env.config(devices)
    data["state_dir"] = str(env.root / "second-state")
    second = env.root / "copy.toml"
    second.write_text(toml_dumps(data))
    async with (
        HubPeer(broker, {env.gateway: env.gateway_public}, env.hub_key) as hub,
        running_agent(first) as one,
        running_agent(second) as two,
    ):

        def warned() -> bool:
            return any(
                "another agent is running with the same gateway id" in r.getMessage()
                for r in caplog.records
            )

        await hub.wait_for(warned, 90, what="the gateway-id conflict to be named")
        record = next(r for r in caplog.records if "same gateway id" in r.getMessage())
        extra = record.ft_fields  # type: ignore[attr-defined]
        assert extra["alarm"] == "gateway_id_conflict"
        assert extra["client_id"] == env.gateway
        assert env.gateway in extra["fix"]
        flagged = [a for a in (one, two) if a.status({})["gateway_id_conflict_suspected"]]
        assert flagged


async def test_a_metrics_port_in_use_is_a_clear_startup_error(env: AgentEnv) -> None:
    import socket

    from fieldtwin.agent.config import load_config
    from fieldtwin.agent.errors import AgentError
    from fieldtwin.agent.runtime import Agent

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = env.config(devices_from_example("pumps"))
        data["metrics"] = {"listen": f"127.0.0.1:{port}"}
        env.config_path.write_text(toml_dumps(data))
        agent = Agent(load_config(env.config_path))
        with pytest.raises(AgentError, match=rf"metrics.listen: cannot listen on 127.0.0.1:{port}"):
            await agent.run()
