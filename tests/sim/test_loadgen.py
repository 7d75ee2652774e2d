"""The load generator (``fieldtwin sim gateways``) against a real Mosquitto and a real hub.

What the generator sent (its ledger) must be exactly the hub's history: every frame
acknowledged, no sample lost, none stored twice, also when the hub restarts mid-run
and the generator has to resend what the first hub never acknowledged.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.broker import MosquittoBroker
from support.hub_env import HubFiles, running_hub, wait_for, write_hub_config

from fieldtwin.hub.config import load_hub_config
from fieldtwin.sim.errors import SimError
from fieldtwin.sim.loadgen import (
    FleetSpec,
    LoadGenerator,
    LoadOptions,
    expected_history,
    history_sql,
    init_fleet,
    load_fleet,
    value_of,
)

GATEWAYS = 20
POINTS = 10
FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]


def test_values_are_a_pure_function_exact_in_a_double() -> None:
    assert value_of(3, 7, 11) == value_of(3, 7, 11)
    assert value_of(3, 7, 11) != value_of(3, 7, 12)
    assert float(repr(value_of(999, 49, 86_400))) == value_of(999, 49, 86_400)


def test_fleet_names() -> None:
    spec = FleetSpec("gw-load", 1000, 50)
    assert spec.gateways[0] == "gw-load-0001"
    assert spec.gateways[-1] == "gw-load-1000"
    assert spec.attributes[0] == "p00"
    assert spec.attributes[-1] == "p49"
    assert spec.entity("gw-load-0001") == "gw-load-0001-dev"
    with pytest.raises(SimError):
        FleetSpec("bad/prefix", 2, 2)


def test_init_writes_keys_and_configs_a_hub_accepts(tmp_path: Path) -> None:
    init = ["sim", "gateways", "init", "--count", "3", "--points", "4", "--prefix", "lg"]
    result = subprocess.run(
        [*FIELDTWIN, *init, "--dir", str(tmp_path / "fleet")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    fleet = load_fleet(tmp_path / "fleet")
    assert sorted(fleet.keys) == ["lg-0001", "lg-0002", "lg-0003"]
    assert fleet.hub_key is not None
    assert (tmp_path / "fleet" / "keys" / "lg-0001.key").stat().st_mode & 0o777 == 0o600
    config = load_hub_config(tmp_path / "fleet" / "hub.toml")
    assert sorted(config.gateways) == sorted(fleet.keys)
    assert config.schema.entities["lg-0002-dev"].gateway == "lg-0002"
    assert sorted(config.schema.types["loadgen"].attributes) == ["p00", "p01", "p02", "p03"]
    # the fragment alone joins another hub config
    fragment = (tmp_path / "fleet" / "gateways.toml").read_text()
    other = write_hub_config(tmp_path / "hub", extra=fragment)
    assert "lg-0003" in load_hub_config(other.config).gateways


# -- against a broker and a hub ----------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path, broker: MosquittoBroker) -> tuple[HubFiles, Path, str]:
    """A hub config declaring a 20-gateway fleet, and the loadgen user's password."""
    spec = init_fleet(tmp_path / "fleet", GATEWAYS, POINTS, prefix="lg")
    fragment = (tmp_path / "fleet" / "gateways.toml").read_text()
    files = write_hub_config(
        tmp_path / "hub",
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id=f"ft-hub-{tmp_path.name[-12:]}",
        extra=fragment,
        silent_s=30.0,
    )
    for user in ("loadgen-a", "loadgen-b"):
        broker.roles[user] = "loadgen"
    password = broker.passwords.get("loadgen") or broker.add_user("loadgen", role="loadgen")
    assert spec.count == GATEWAYS
    return files, tmp_path / "fleet", password


def _generator(
    fleet_dir: Path, files: HubFiles, broker: MosquittoBroker, password: str, **kw: Any
) -> LoadGenerator:
    options = LoadOptions(
        password=password,
        ack_timeout_s=2.0,
        heartbeat_s=1.0,
        drain_s=20.0,
        **kw,
    )
    fleet = load_fleet(fleet_dir, files.keys / "hub.pub")
    return LoadGenerator(fleet, broker.url, options)


async def _history(hub: Any, spec: FleetSpec) -> Counter[tuple[str, str, int, float]]:
    sql, params = history_sql(spec)
    rows = await hub.db(hub.service.store.query, sql, params)
    return Counter((e, a, int(ts), float(v)) for e, a, ts, v in rows)


async def test_every_frame_is_acked_and_history_is_exactly_the_ledger(
    broker: MosquittoBroker, rig: tuple[HubFiles, Path, str]
) -> None:
    files, fleet_dir, password = rig
    async with running_hub(files.config) as hub:
        # one connection per loadgen user, as a site broker that binds client ids needs
        gen = _generator(
            fleet_dir,
            files,
            broker,
            password,
            rate=2.0,
            duration_s=3.0,
            usernames=("loadgen-a", "loadgen-b"),
            password_dir=broker.workdir / "passwords",
        )
        stats = await gen.run()
        assert stats["connections"] == 2
        assert stats["in_flight"] == 0, stats
        assert stats["frames_sent"] == GATEWAYS * 6
        assert stats["frames_acked"] == stats["frames_sent"]
        assert stats["points_sent"] == GATEWAYS * 6 * POINTS
        assert stats["births"] == GATEWAYS
        assert stats["deaths"] == GATEWAYS
        assert stats["heartbeats"] >= GATEWAYS
        assert stats["rejected"] == {}
        assert stats["ack_latency_p99_ms"] is not None
        expected = expected_history(gen.ledger)
        assert len(expected) == gen.ledger.points() == GATEWAYS * 6 * POINTS
        assert await _history(hub, gen.fleet.spec) == expected

        async def all_offline() -> bool:
            rows = await hub.db(
                hub.service.store.query,
                "SELECT count(*) FROM gateways WHERE starts_with(gateway, 'lg-') AND NOT online",
            )
            return bool(rows[0][0] == GATEWAYS)

        await wait_for(all_offline, within=10)  # the clean stop's deaths were applied


async def test_a_hub_restart_mid_run_loses_and_duplicates_nothing(
    broker: MosquittoBroker, rig: tuple[HubFiles, Path, str]
) -> None:
    files, fleet_dir, password = rig
    gen = _generator(fleet_dir, files, broker, password, rate=2.0, duration_s=7.0, connections=3)
    async with running_hub(files.config):
        run = asyncio.create_task(gen.run(), name="test-loadgen")
        await wait_for(lambda: gen.stats.frames_acked >= GATEWAYS * 2, within=15)
    sent_while_away = gen.stats.frames_sent
    await asyncio.sleep(1.5)
    async with running_hub(files.config) as hub:
        stats = await run
        assert stats["in_flight"] == 0, stats
        assert gen.stats.frames_sent > sent_while_away  # data went on while no hub was there
        assert stats["hub_sessions"] >= 1  # the new hub's session was seen live
        assert stats["frames_resent"] > 0
        assert stats["frames_acked"] == stats["frames_sent"] == GATEWAYS * 14
        assert await _history(hub, gen.fleet.spec) == expected_history(gen.ledger)


async def test_a_connection_per_gateway_as_the_gateways_own_user(
    broker: MosquittoBroker, rig: tuple[HubFiles, Path, str]
) -> None:
    files, fleet_dir, password = rig
    for gateway in load_fleet(fleet_dir).spec.gateways:
        broker.roles[gateway] = "gateway"
    broker.add_user("hub")  # regenerates the files once for every user above
    gen = _generator(
        fleet_dir,
        files,
        broker,
        password,
        rate=2.0,
        duration_s=1.0,
        connection_per_gateway=True,
        password_dir=broker.workdir / "passwords",
    )
    async with running_hub(files.config) as hub:
        stats = await gen.run()
        assert stats["connections"] == GATEWAYS
        assert stats["in_flight"] == 0, stats
        assert stats["frames_acked"] == stats["frames_sent"] == GATEWAYS * 2
        assert await _history(hub, gen.fleet.spec) == expected_history(gen.ledger)
