"""Register ranges: one point entry for many registers, named by a pattern."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.agent_env import toml_dumps

from fieldtwin.agent.config import load_config
from fieldtwin.protocol.config import ConfigError


def config_with(tmp_path: Path, *points: dict[str, Any], protocol: str = "modbus-tcp") -> Path:
    device: dict[str, Any] = {"id": "plc", "protocol": protocol, "points": list(points)}
    if protocol == "modbus-tcp":
        device["host"] = "127.0.0.1"
    else:
        device["url"] = "opc.tcp://127.0.0.1:4840/x"
    path = tmp_path / "agent.toml"
    path.write_text(
        toml_dumps(
            {
                "gateway": "gw-range",
                "state_dir": str(tmp_path / "state"),
                "keys": {"private": "k", "hub_public": "h"},
                "devices": [device],
            }
        )
    )
    return path


def test_a_range_expands_into_named_points_at_their_addresses(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        {
            "entity": "plc-1",
            "attribute": "hr{address}",
            "table": "holding",
            "address": 100,
            "count": 100,
            "type": "uint16",
            "writable": True,
            "max": 500,
        },
        {
            "entity": "tank-{n:02}",
            "attribute": "level_{i}",
            "table": "input",
            "address": 0,
            "count": 10,
            "type": "float32",
            "unit": "m",
        },
        {"entity": "pump", "attribute": "speed", "table": "input", "address": 50, "type": "uint16"},
    )
    points = load_config(path).devices[0].points
    assert len(points) == 111
    first, last = points[0], points[99]
    assert (first.name, first.address, first.source) == ("plc-1.hr100", 100, "plc unit 1 hr 100")
    assert (last.name, last.address) == ("plc-1.hr199", 199)
    assert all(p.writable and p.max == 500 and p.dtype == "uint16" for p in points[:100])
    tanks = points[100:110]
    assert [p.name for p in tanks[:2]] == ["tank-01.level_0", "tank-02.level_1"]
    assert [p.address for p in tanks] == list(range(0, 20, 2))  # float32: stride 2
    assert tanks[-1].source == "plc unit 1 ir 18-19"
    assert points[-1].name == "pump.speed"


def test_a_20000_point_plc_is_twenty_entries(tmp_path: Path) -> None:
    entries = [
        {
            "entity": f"plc-{block}",
            "attribute": "r{i:04}",
            "table": "input",
            "address": 0,
            "count": 1000,
            "type": "uint16",
            "unit_id": block + 1,
        }
        for block in range(20)
    ]
    points = load_config(config_with(tmp_path, *entries)).devices[0].points
    assert len(points) == 20_000
    assert points[-1].name == "plc-19.r0999"
    assert points[-1].unit_id == 20


def test_an_explicit_stride(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        {
            "entity": "m",
            "attribute": "c{i}",
            "table": "coil",
            "address": 10,
            "count": 3,
            "stride": 8,
        },
    )
    assert [p.address for p in load_config(path).devices[0].points] == [10, 18, 26]


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        ({"attribute": "hr"}, "points[0].attribute", "needs {i}, {n} or {address}"),
        ({"attribute": "hr{x}"}, "points[0].attribute", "other braces are not allowed"),
        ({"count": 0}, "points[0].count", "out of range"),
        ({"address": 65500, "count": 100}, "points[0].count", "run past address 65535"),
        ({"type": "float32", "address": 65535, "count": 1}, "points[0].address", "past address"),
        ({"entity": "bad entity {i}"}, "points[0].entity", "an entity id"),
        ({"colour": "red"}, "points[0].colour", "unknown key"),
        ({"stride": 0}, "points[0].stride", "out of range"),
    ],
)
def test_range_errors_name_the_entry_and_the_fix(
    tmp_path: Path, changes: dict[str, Any], key: str, problem: str
) -> None:
    entry = {
        "entity": "plc",
        "attribute": "hr{address}",
        "table": "holding",
        "address": 0,
        "count": 10,
        "type": "uint16",
        **changes,
    }
    with pytest.raises(ConfigError) as caught:
        load_config(config_with(tmp_path, entry))
    assert caught.value.key == f"devices[0].{key}"
    assert problem in caught.value.problem


def test_ranges_are_for_modbus_only(tmp_path: Path) -> None:
    entry = {"entity": "b", "attribute": "t{i}", "node": "ns=2;s=T", "count": 3}
    with pytest.raises(ConfigError, match=r"count.*for Modbus points"):
        load_config(config_with(tmp_path, entry, protocol="opcua"))


def test_generated_names_clash_with_hand_written_ones(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        {
            "entity": "plc",
            "attribute": "hr{address}",
            "table": "holding",
            "address": 0,
            "count": 10,
            "type": "uint16",
        },
        {"entity": "plc", "attribute": "hr5", "table": "holding", "address": 5, "type": "uint16"},
    )
    with pytest.raises(ConfigError, match=r"plc\.hr5 is already read"):
        load_config(path)
