"""Hub config: the example loads; mistakes name the file, the key and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.hub_env import write_hub_config
from support.plausibility import write_plausible_config

from fieldtwin.hub.config import load_hub_config
from fieldtwin.protocol.config import ConfigError
from fieldtwin.protocol.keys import write_key_pair

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_describes_the_water_plant(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "hub.toml", tmp_path / "hub.toml")
    for name in ("hub", "gw-pumps", "gw-field", "gw-boiler"):
        write_key_pair(tmp_path / "agents" / "keys", name)
    config = load_hub_config(tmp_path / "hub.toml")
    assert set(config.schema.entities) == {
        "tank-1",
        "pump-1",
        "valve-1",
        "flowmeter-1",
        "pt-1",
        "ambient-1",
        "boiler-1",
    }
    assert config.registry().senders() == ["gw-boiler", "gw-field", "gw-pumps"]
    assert config.schema.spec("tank-1", "level").high.critical == 4.7  # type: ignore[union-attr]
    assert config.reconciliation.resolve("threshold", "tank", "tank-1", "high_level") == (
        "ignore",
        None,
    )
    assert config.reconciliation.resolve("threshold", "pump", "pump-1", "speed") == (
        "auto_correct",
        "critical",
    )
    assert config.reconciliation.resolve("semantic.rate", "boiler", "boiler-1", "x")[0] == "alert"
    assert config.database == tmp_path / "state" / "hub.duckdb"


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        ('type = "tank"\ngateway', 'type = "tnak"\ngateway', "entities[0].type", "not one of"),
        (
            "deadband = 0.1",
            "deadbnd = 0.1",
            "types.tank.attributes.level.deadbnd",
            "did you mean 'deadband'",
        ),
        (
            "high = { warning = 4.0, critical = 4.5 }",
            "high = { warning = 4.0, critical = 3.5 }",
            "types.tank.attributes.level.high.critical",
            ">= the warning limit",
        ),
        (
            "desired = { speed_sp = 900 }",
            "desired = { speed_sp = 9000 }",
            "entities[1].desired.speed_sp",
            "outside the writable limits",
        ),
        (
            "desired = { speed_sp = 900 }",
            "desired = { speed = 900 }",
            "entities[1].desired.speed",
            "not a writable attribute",
        ),
        (
            'source = "pump-1"\ntarget = "tank-1"',
            'source = "pump-9"\ntarget = "tank-1"',
            "relationships[0].source",
            "not one of",
        ),
        (
            'drift = "temporal.sensor_stale"',
            'drift = "temporal.sensorstale"',
            "reconciliation.rules[0].drift",
            "matches no drift check",
        ),
        (
            'strategy = "auto_correct"',
            'strategy = "autocorrect"',
            "reconciliation.rules[0].strategy",
            "not one of",
        ),
        (
            'public_key = "keys/gw-02.pub"',
            'public_key = "keys/gw-03.pub"',
            "gateways.gw-02.public_key",
            "does not exist",
        ),
        (
            'url = "mqtt://127.0.0.1:1"',
            'url = "http://127.0.0.1:1"',
            "broker.url",
            "mqtt://HOST:PORT",
        ),
    ],
)
def test_mistakes_name_file_key_and_fix(
    tmp_path: Path, old: str, new: str, key: str, hint: str
) -> None:
    files = write_hub_config(tmp_path)
    text = files.config.read_text()
    assert old in text
    files.config.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_hub_config(files.config).registry()
    message = str(caught.value)
    assert str(files.config) in message
    assert key in message
    assert hint in message


# -- physical plausibility ---------------------------------------------------------------


def test_example_config_declares_physical_ranges_and_cross_checks(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "hub.toml", tmp_path / "hub.toml")
    for name in ("hub", "gw-pumps", "gw-field", "gw-boiler"):
        write_key_pair(tmp_path / "agents" / "keys", name)
    schema = load_hub_config(tmp_path / "hub.toml").schema
    assert schema.physical[("tank-1", "level_raw")].high == 5.0
    level = schema.physical[("tank-1", "level")]
    assert (level.low, level.high, level.margin) == (0.0, 5.0, 0.05)
    assert level.high_source == "static.height_m"
    speed = schema.physical[("pump-1", "speed")]
    assert speed.high == 1800.0  # static.rated_speed_rpm of pump-1
    assert schema.physical[("boiler-1", "temperature")].high == 200.0
    checks = {check.id: check for check in schema.plausibility}
    assert str(checks["level-vs-switch"].when) == "tank-1.level > 4.6"
    assert checks["level-vs-switch"].require.value is True
    config = load_hub_config(tmp_path / "hub.toml")
    assert config.reconciliation.resolve("semantic.implausible", "tank", "tank-1", "level") == (
        "investigate",
        None,
    )


def test_static_references_resolve_per_entity(tmp_path: Path) -> None:
    files = write_plausible_config(tmp_path)
    text = files.config.read_text().replace(
        "physical_min = 0\n", 'physical_min = "static.floor_m"\n', 1
    )
    text += (
        '\n[[entities]]\nid = "tank-2"\ntype = "tank"\ngateway = "gw-02"\n'
        "static = { height_m = 12.5, floor_m = -1 }\n"
    )
    files.config.write_text(text.replace("height_m = 5.0 }", "height_m = 5.0, floor_m = 0.5 }"))
    schema = load_hub_config(files.config).schema
    assert (
        schema.physical[("tank-1", "level")].low,
        schema.physical[("tank-1", "level")].high,
    ) == (
        0.5,
        5.0,
    )
    assert (
        schema.physical[("tank-2", "level")].low,
        schema.physical[("tank-2", "level")].high,
    ) == (
        -1.0,
        12.5,
    )
    assert ("tank-1", "temp") not in schema.physical


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        (
            "height_m = 5.0 }",
            "heigth_m = 5.0 }",
            "types.tank.attributes.level.physical_max",
            "entity 'tank-1' (type tank) has no static attribute 'height_m'",
        ),
        (
            "height_m = 5.0 }",
            'height_m = "tall" }',
            "types.tank.attributes.level.physical_max",
            "not a number",
        ),
        (
            'physical_max = "static.height_m"',
            'physical_max = "height_m"',
            "types.tank.attributes.level.physical_max",
            'expected a number or "static.KEY"',
        ),
        (
            "physical_min = 0\n",
            "physical_min = 6\n",
            "types.tank.attributes.level.physical_max",
            "physical_max (5) is below physical_min (6)",
        ),
        (
            "physical_margin = 0.05",
            "physical_margin = -0.05",
            "types.tank.attributes.level.physical_margin",
            "",
        ),
        (
            'require = "tank-1.high_level == true"',
            'require = "tank-1.hihg_level == true"',
            "plausibility[0].require",
            "'hihg_level' is not an attribute of tank-1",
        ),
        (
            'when = "tank-1.level > 4.6"',
            'when = "tank-9.level > 4.6"',
            "plausibility[0].when",
            "'tank-9' is not a declared entity",
        ),
        (
            'when = "tank-1.level > 4.6"',
            'when = "level > 4.6"',
            "plausibility[0].when",
            "expected ENTITY.ATTRIBUTE",
        ),
        (
            'id = "switch-vs-level"',
            'id = "level-vs-switch"',
            "plausibility[1].id",
            "declared twice",
        ),
    ],
)
def test_plausibility_mistakes_name_file_key_and_fix(
    tmp_path: Path, old: str, new: str, key: str, hint: str
) -> None:
    files = write_plausible_config(tmp_path)
    text = files.config.read_text()
    assert old in text
    files.config.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_hub_config(files.config)
    message = str(caught.value)
    assert str(files.config) in message
    assert key in message
    assert hint in message
