"""Hub config: the example loads; mistakes name the file, the key and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.hub_env import write_hub_config

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
