"""``fieldtwin hub run`` and ``fieldtwin twin ...`` as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from support.broker import MosquittoBroker
from support.hub_env import (
    GatewaySigner,
    HubFiles,
    now_ms,
    point,
    register_operators,
    sample,
    wait_for,
    write_hub_config,
)

from fieldtwin.hub.api import Endpoint

FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]


def fieldtwin(
    *args: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``env`` adds to (or, with an empty value, removes from) the environment."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v}
    result = subprocess.run(
        [*FIELDTWIN, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fieldtwin {args} failed: {result.stdout}{result.stderr}")
    return result


async def cli(
    *args: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(fieldtwin, *args, check=check, env=env)


async def cli_json(*args: str | Path, env: dict[str, str] | None = None) -> Any:
    return json.loads((await cli(*args, "--format", "json", env=env)).stdout)


@pytest.fixture
def files(tmp_path: Path, broker: MosquittoBroker) -> HubFiles:
    files = write_hub_config(
        tmp_path,
        broker_url=broker.url,
        password=broker.passwords["hub"],
        client_id="ft-hub-cli",
        silent_s=300,  # the gateway sends once; its values must stay in force for the test
        missing_s=600,
        stale_s=600,  # (and fresh: tank-1.level is an interlock input)
    )
    register_operators(broker, files)
    return files


async def publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    password = broker.passwords.get("gw-01") or broker.add_user("gw-01")
    async with aiomqtt.Client(
        broker.host, broker.port, username="gw-01", password=password, timeout=10
    ) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


@contextlib.asynccontextmanager
async def running_hub(files: HubFiles) -> AsyncIterator[asyncio.subprocess.Process]:
    """``fieldtwin hub run`` until its API is up; on exit SIGTERM, and check it stopped
    cleanly (exit 0, no traceback, its endpoint file removed)."""
    endpoint_file = files.database.with_name("hub.duckdb.api.json")
    hub = await asyncio.create_subprocess_exec(
        *FIELDTWIN,
        "hub",
        "run",
        "-c",
        str(files.config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_for(endpoint_file.exists, within=30)
        yield hub
    finally:
        if hub.returncode is None:
            hub.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(hub.communicate(), 60)
    log = output.decode()
    assert hub.returncode == 0, log
    assert "hub stopped" in log
    assert "Traceback" not in log
    assert not endpoint_file.exists()


async def test_hub_run_and_twin_commands_live_and_offline(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    config = files.config
    endpoint_file = files.database.with_name("hub.duckdb.api.json")
    async with running_hub(files) as hub:
        gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
        t0 = now_ms()
        first = [sample("tank-1", "level", 2.0, t0), sample("pump-1", "running", True, t0)]
        await publish(
            broker,
            [
                gw.data(first),
                gw.birth([], first, state_seqs=[1, 1]),
                gw.data(
                    [sample("tank-1", "level", 4.7, t0 + 10), sample("pump-1", "speed", 900, t0)]
                ),
            ],
        )

        async def applied() -> bool:
            twin = await cli_json("twin", "show", "-c", config, "tank-1")
            return bool(twin) and twin[0]["attributes"]["level"]["value"] == 4.7

        await wait_for(applied, within=30, interval=0.5)
        table = (await cli("twin", "show", "-c", config)).stdout
        assert "live hub" in table
        assert "tank-1" in table
        assert "4.7 m" in table
        rows = await cli_json("twin", "query", "-c", config, "--where", "level>4.5")
        assert {(r["entity"], r["attribute"]) for r in rows} == {("tank-1", "level")}
        assert (
            await cli_json("twin", "query", "-c", config, "--type", "pump", "--where", "speed<100")
            == []
        )
        history = await cli_json("twin", "history", "-c", config, "tank-1", "level", "--from", "1h")
        assert [h["value"] for h in history] == [2.0, 4.7]
        changes = await cli_json("twin", "diff", "-c", config, "--from", str(t0 + 5), "--to", "now")
        assert {"entity": "tank-1", "attribute": "level", "before": 2.0, "after": 4.7}.items() <= (
            next(c for c in changes if c["attribute"] == "level").items()
        )
        past = await cli_json("twin", "show", "-c", config, "--at", str(t0 + 5))
        assert past["tank-1"]["level"]["value"] == 2.0
        exported = yaml.safe_load(
            (await cli("twin", "export", "-c", config, "--format", "yaml")).stdout
        )
        assert exported["digital_twin"]["id"] == "test-plant"
        assert exported["operations"]["last_query"] is not None
        # a running hub answers queries on its API and on the operator channel
        assert exported["operations"]["query_enabled"] is True
        api = f"http://127.0.0.1:{Endpoint.read(endpoint_file).port}/api"  # type: ignore[union-attr]
        assert exported["operations"]["query_endpoints"] == [api, f"{broker.url}/ft/v1/op/+/req"]
        (gateway,) = [
            s for s in exported["sync_configuration"]["data_sources"] if s["id"] == "gw-01"
        ]
        assert "type" not in gateway  # its birth announced no points: nothing to derive

        async def alarmed() -> list[Any]:
            alarms = await cli_json("twin", "alarms", "-c", config)
            return [a for a in alarms if a["rule"] == "threshold"]

        (alarm,) = await wait_for(alarmed, within=30, interval=0.5)
        assert alarm["state"] == "active"
        assert alarm["severity"] == "critical"
        ack = ("twin", "alarms", "ack", alarm["id"], "-c", config, "--operator", "olga")
        acked = await cli_json(*ack, "--reason", "seen it")
        assert acked["state"] == "acknowledged"
        assert acked["acked_by"] == "olga"  # the verified identity, not a claimed name
        unsigned = await cli(*ack, check=False)
        assert unsigned.returncode == 2
        assert "needs --reason" in unsigned.stderr
        again = await cli(*ack, "--reason", "twice", check=False)
        assert again.returncode == 1
        assert "only active or returned alarms" in again.stderr
        viewer = await cli(
            "twin",
            "alarms",
            "shelve",
            alarm["id"],
            "-c",
            config,
            "--operator",
            "vic",
            "--for",
            "10m",
            "--reason",
            "noisy",
            check=False,
        )
        assert viewer.returncode == 1
        assert "forbidden" in viewer.stderr
        assert "vic (viewer) may not alarm.shelve" in viewer.stderr
        shelved = await cli_json(
            "twin",
            "alarms",
            "shelve",
            alarm["id"],
            "-c",
            config,
            "--operator",
            "olga",
            "--for",
            "10m",
            "--reason",
            "sensor maintenance",
        )
        assert shelved["state"] == "shelved"
        assert shelved["shelve_reason"] == "sensor maintenance"
        audit = await cli_json("twin", "status", "-c", config)
        assert audit["audit_head"][0] > 0
        status = await cli_json("twin", "status", "-c", config)
        assert status["gateways"][0]["id"] == "gw-01"
        assert status["mqtt_connected"]
        endpoint = Endpoint.read(endpoint_file)
        assert endpoint is not None
        assert endpoint.pid == hub.pid
    # the hub is gone: the same commands read the database file
    offline = (await cli("twin", "show", "-c", config)).stdout
    assert "database (hub not running)" in offline
    assert "4.7 m" in offline
    alarms = await cli_json("twin", "alarms", "-c", config, "--all")
    assert [a["state"] for a in alarms if a["rule"] == "threshold"] == ["shelved"]
    refused = await cli(*ack, "--reason", "late", "--timeout", "2", check=False)
    assert refused.returncode == 1
    assert "did not answer" in refused.stderr
    exported = yaml.safe_load(
        (await cli("twin", "export", "-c", config, "--format", "yaml")).stdout
    )
    assert exported["operations"]["last_query"] is None
    assert exported["operations"]["query_enabled"] is False  # no hub answers


async def test_cmd_list_reject_cancel_with_the_key_from_a_file_or_the_environment(
    broker: MosquittoBroker, files: HubFiles
) -> None:
    config = files.config
    olga_key, piet_key = files.keys / "olga.key", files.keys / "piet.key"
    as_olga = {"FIELDTWIN_OPERATOR_KEY": str(olga_key)}
    no_key = {"FIELDTWIN_OPERATOR_KEY": "", "FIELDTWIN_PROFILE": ""}
    # who you are is checked before anything is sent: which key is missing or unknown
    nobody = await cli("cmd", "list", "-c", config, check=False, env=no_key)
    assert nobody.returncode == 1
    assert "no operator key: give --key FILE (or set $FIELDTWIN_OPERATOR_KEY)" in nobody.stderr
    stranger = await cli(
        "cmd", "list", "-c", config, "--key", files.keys / "gw-01.key", check=False, env=no_key
    )
    assert stranger.returncode == 1
    assert f"gw-01 (key {files.keys / 'gw-01.key'}) is not an operator of" in stranger.stderr
    async with running_hub(files):
        gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
        t0 = now_ms()
        state = [
            sample("pump-1", "speed_sp", 900, t0),
            sample("pump-1", "running", True, t0),
            sample("tank-1", "level", 2.5, t0),
        ]
        points = [
            point("pump-1", "speed_sp", "uint16", unit="rpm", writable=True, min=0, max=1800),
            point("pump-1", "running", "bool", writable=True),
            point("tank-1", "level", unit="m"),
        ]
        await publish(broker, [gw.data(state), gw.birth(points, state, state_seqs=[1, 1, 1])])
        propose = ("cmd", "propose", "-c", config)

        async def allowed() -> bool:
            out = await cli(
                *propose, "pump-1.speed_sp", "1000", "--dry-run", check=False, env=as_olga
            )
            return out.returncode == 0

        await wait_for(allowed, within=30, interval=0.5)  # the gateway's values arrived
        # --key FILE: the operator is the key's file name
        speed = await cli_json(
            *propose, "pump-1.speed_sp", "1000", "--reason", "more flow", "--key", olga_key
        )
        assert (speed["state"], speed["proposed_by"]) == ("awaiting_approval", "olga")
        # $FIELDTWIN_OPERATOR_KEY, with no --key or --operator
        stop = await cli_json(*propose, "pump-1.running", "false", "--reason", "idle", env=as_olga)
        assert (stop["state"], stop["proposed_by"]) == ("awaiting_approval", "olga")
        listed = await cli_json("cmd", "list", "-c", config, env=as_olga)
        assert {c["id"] for c in listed} == {speed["id"], stop["id"]}
        table = (await cli("cmd", "list", "-c", config, env=as_olga)).stdout
        assert speed["id"] in table
        assert "pump-1.running" in table
        # olga may cancel her own proposal, but not reject: that is an approver's
        not_hers = await cli(
            "cmd", "reject", speed["id"], "-c", config, "--reason", "no", check=False, env=as_olga
        )
        assert not_hers.returncode == 1
        assert "olga (operator) may not cmd.reject: it needs the role approver" in (not_hers.stderr)
        rejected = await cli_json(
            "cmd", "reject", speed["id"], "-c", config, "--key", piet_key, "--reason", "not now"
        )
        assert rejected["state"] == "rejected"
        piet_cancels = await cli(
            "cmd",
            "cancel",
            stop["id"],
            "-c",
            config,
            "--key",
            piet_key,
            "--reason",
            "x",
            check=False,
        )
        assert piet_cancels.returncode == 1
        assert "piet (approver) may not cmd.cancel: it needs the role operator or admin" in (
            piet_cancels.stderr
        )
        cancelled = await cli_json(
            "cmd", "cancel", stop["id"], "-c", config, "--reason", "changed my mind", env=as_olga
        )
        assert cancelled["state"] == "cancelled"
        assert await cli_json("cmd", "list", "-c", config, env=as_olga) == []  # none open
        closed = await cli_json(
            "cmd", "list", "-c", config, "--state", "rejected", "--state", "cancelled", env=as_olga
        )
        assert {(c["id"], c["state"]) for c in closed} == {
            (speed["id"], "rejected"),
            (stop["id"], "cancelled"),
        }


def test_clear_errors_without_a_hub(tmp_path: Path) -> None:
    missing = fieldtwin("twin", "show", "-c", tmp_path / "nope.toml", check=False)
    assert missing.returncode == 1
    assert "nope.toml: file does not exist" in missing.stderr
    no_demo = fieldtwin("twin", "show", "--state-dir", tmp_path, check=False)
    assert no_demo.returncode == 1
    assert "fieldtwin demo" in no_demo.stderr
    files = write_hub_config(tmp_path / "cfg")
    never_ran = fieldtwin("twin", "show", "-c", files.config, check=False)
    assert never_ran.returncode == 1
    assert "has this hub ever run" in never_ran.stderr
    checked = fieldtwin("hub", "check", "-c", files.config)
    assert "valid" in checked.stdout
    assert "gw-01" in checked.stdout
    os.chmod(files.config.parent / "keys" / "hub.key", 0o644)
    insecure = fieldtwin("hub", "run", "-c", files.config, check=False)
    assert insecure.returncode == 1
    assert "chmod 600" in insecure.stderr
