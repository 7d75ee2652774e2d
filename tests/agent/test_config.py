"""Agent config validation: every error names the file, the key and what would be valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from support.agent_env import EXAMPLES, devices_from_example, toml_dumps

from fieldtwin.agent.config import load_config
from fieldtwin.protocol.config import ConfigError


def base(tmp_path: Path) -> dict[str, Any]:
    return {
        "gateway": "gw-test",
        "state_dir": str(tmp_path / "state"),
        "keys": {"private": "keys/gw.key", "hub_public": "keys/hub.pub"},
        "devices": devices_from_example("pumps"),
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(toml_dumps(data))
    return path


@pytest.mark.parametrize("name", ["pumps", "field", "boiler"])
def test_examples_load(name: str) -> None:
    config = load_config(EXAMPLES / f"{name}.toml")
    assert config.gateway == f"gw-{name}"
    assert config.private_key == EXAMPLES / "keys" / f"gw-{name}.key"
    assert config.buffer.path.name == "outbox.duckdb"
    assert config.points()


def test_defaults_and_resolved_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base(tmp_path)))
    assert config.private_key == tmp_path / "keys" / "gw.key"  # relative to the config file
    assert config.buffer.path == tmp_path / "state" / "outbox.duckdb"
    assert config.status_file == tmp_path / "state" / "status.json"
    assert config.broker.username == "gw-test"
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("127.0.0.1", 1883, False)
    assert config.buffer.overflow == "drop_oldest"
    level = config.devices[0].points[0]
    assert (level.interval_ms, level.max_silence_ms, level.unit_id) == (1000, 60_000, 1)
    assert level.source == "pump-station unit 1 ir 0-1"


def test_state_directory_from_systemd_and_environment_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = base(tmp_path)
    del data["state_dir"]
    data["keys"]["private"] = "$CREDENTIALS_DIRECTORY/gateway.key"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd-state"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    config = load_config(write(tmp_path, data))
    assert config.state_dir == tmp_path / "systemd-state"
    assert config.private_key == tmp_path / "creds" / "gateway.key"
    assert load_config(write(tmp_path, data), state_dir=tmp_path / "x").state_dir == tmp_path / "x"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="environment variable that is not set"):
        load_config(write(tmp_path, data))


def test_broker_url_tls_and_password_file(tmp_path: Path) -> None:
    data = base(tmp_path)
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "pw").write_text("secret\n")
    data["broker"] = {"url": "mqtts://broker.site", "ca_file": "ca.pem", "password_file": "pw"}
    config = load_config(write(tmp_path, data))
    assert (config.broker.port, config.broker.tls, config.broker.password) == (8883, True, "secret")


def mutate(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value


DELETE = object()

CASES = [
    ("gateway", "hub", "gateway", "reserved"),
    ("gateway", "gw 1", "gateway", "letters, digits"),
    ("keys.private", DELETE, "keys.private", "required key is missing"),
    ("broker", {"url": "http://x"}, "broker.url", "mqtt://HOST:PORT"),
    ("broker", {"username": "someone"}, "broker.username", "must be the gateway id"),
    ("broker", {"password": "a", "password_file": "b"}, "broker.password", "not both"),
    ("broker", {"ca_file": "ca.pem"}, "broker.url", "use mqtts://"),
    ("broker", {"password_file": "nope"}, "broker.password_file", "cannot read"),
    ("buffer", {"overflow": "drop_random"}, "buffer.overflow", "drop_newest, drop_oldest"),
    ("buffer", {"max_samples": 10}, "buffer.max_samples", "at least 100"),
    ("buffer", {"batch_max_samples": 20_000}, "buffer.batch_max_samples", "between 1 and 10000"),
    ("devices.0.protocol", "modbus-udp", "devices[0].protocol", "modbus-rtu, modbus-tcp"),
    ("devices.0.port", 70000, "devices[0].port", "between 1 and 65535"),
    ("devices.0.prot", 1, "devices[0].prot", "did you mean 'port'"),
    ("devices.0.points.0.type", "float16", "devices[0].points[0].type", "float32"),
    ("devices.0.points.0.word_order", "middle", "devices[0].points[0].word_order", "big, little"),
    ("devices.0.points.0.table", "inputs", "devices[0].points[0].table", "coil, discrete"),
    ("devices.0.points.0.address", 65535, "devices[0].points[0].address", "past address 65535"),
    ("devices.0.points.0.scale", 0, "devices[0].points[0].scale", "must not be 0"),
    ("devices.0.points.0.writable", True, "devices[0].points[0].writable", "read-only table"),
    ("devices.0.points.0.length", 4, "devices[0].points[0].length", "only for string"),
    ("devices.0.points.0.attribute", "1st", "devices[0].points[0].attribute", "starts with"),
    ("devices.0.points.4.min", 2000, "devices[0].points[4].max", "below min"),
    ("devices.0.points.6.deadband", 1, "devices[0].points[6].deadband", "applies to numbers"),
    ("devices.0.points.7.type", "uint16", "devices[0].points[7].type", "not one of: bool"),
    ("devices.0.points.1.attribute", "level", "devices[0].points[1]", "exactly one source"),
    ("devices", [], "devices", "at least one"),
    ("devices.0.points.6.valid_min", 0, "devices[0].points[6].valid_min", "applies to numbers"),
    ("devices.0.points.2.out_of_range", "good", "devices[0].points[2].out_of_range", "bad"),
    ("metrics", {"listen": "0.0.0.0:9471"}, "metrics.listen", "not a loopback address"),
    ("metrics", {"listen": "9471"}, "metrics.listen", "not HOST:PORT"),
]


@pytest.mark.parametrize(("path", "value", "key", "words"), CASES)
def test_errors_name_file_key_and_fix(
    tmp_path: Path, path: str, value: Any, key: str, words: str
) -> None:
    data = copy.deepcopy(base(tmp_path))
    mutate(data, path, value)
    config = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert message.startswith(f"{config}: {key}"), message
    assert words in message, message


def test_two_devices_on_one_endpoint_are_refused(tmp_path: Path) -> None:
    data = base(tmp_path)
    twin = copy.deepcopy(data["devices"][0])
    twin["id"] = "pump-station-2"
    twin["points"] = [dict(twin["points"][0], entity="tank-2")]
    data["devices"].append(twin)
    with pytest.raises(ConfigError, match=r"devices\[1\]: 127.0.0.1:15020 is also used"):
        load_config(write(tmp_path, data))


def test_opcua_and_serial_specifics(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["devices"] = devices_from_example("boiler") + devices_from_example("field")[1:]
    config = load_config(write(tmp_path, data))
    boiler, ambient = config.devices
    assert boiler.mode == "subscribe"
    assert boiler.points[2].max_silence_ms == 600_000  # a point overrides its device
    assert ambient.sentence == "AMB"
    assert [p.field_index for p in ambient.points] == [1, 2]
    assert ambient.points[0].max_silence_ms == 10_000
    data["devices"][0]["points"][0]["node"] = "boiler-1.temperature"
    with pytest.raises(ConfigError, match="not a node id; use 'nsu=URI;s=NAME'"):
        load_config(write(tmp_path, data))
    data["devices"][0]["points"][0]["node"] = "ns=2;s=ok"
    data["devices"][1]["points"][0]["writable"] = True
    with pytest.raises(ConfigError, match=r"devices\[1\].points\[0\].writable: serial line"):
        load_config(write(tmp_path, data))


def test_state_dir_override_accepts_a_file_that_sets_state_dir(tmp_path: Path) -> None:
    data = base(tmp_path)  # has state_dir
    config = load_config(write(tmp_path, data), state_dir=tmp_path / "elsewhere")
    assert config.state_dir == tmp_path / "elsewhere"
    assert config.buffer.path == tmp_path / "elsewhere" / "outbox.duckdb"


def test_a_misspelt_required_key_is_named_as_the_typo(tmp_path: Path) -> None:
    data = base(tmp_path)
    point = data["devices"][0]["points"][2]
    point["adress"] = point.pop("address")
    config = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert message.startswith(f"{config}: devices[0].points[2].address: required key is missing")
    assert "unknown key 'adress'" in message


def test_valid_range_and_metrics_keys(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["devices"][0]["out_of_range"] = "uncertain"
    data["devices"][0]["points"][2].update(valid_min=0, valid_max=1800)
    data["devices"][0]["points"][0].update(valid_min=0, valid_max=5, out_of_range="bad")
    data["metrics"] = {"listen": "127.0.0.1:9471"}
    config = load_config(write(tmp_path, data))
    level, _, speed = config.devices[0].points[:3]
    assert (speed.valid_min, speed.valid_max, speed.out_of_range) == (0, 1800, "uncertain")
    assert (level.valid_max, level.out_of_range) == (5, "bad")
    assert config.devices[0].points[3].out_of_range == "uncertain"  # the device's default
    assert not config.devices[0].points[3].has_valid_range
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9471)
    data["metrics"] = {"listen": "[::1]:0"}
    assert load_config(write(tmp_path, data)).metrics_host == "::1"
    del data["metrics"]
    assert load_config(write(tmp_path, data)).metrics_host == ""
    data["devices"][0]["points"][2].update(valid_min=10, valid_max=5)
    with pytest.raises(ConfigError, match=r"points\[2\].valid_max: valid_max \(5.0\) is below"):
        load_config(write(tmp_path, data))
