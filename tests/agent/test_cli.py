"""``fieldtwin agent check`` and friends, as a technician runs them (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.agent_env import AgentEnv, devices_from_example, toml_dumps
from support.broker import MosquittoBroker
from support.sim import SimProcess

CLI = [sys.executable, "-c", "from fieldtwin.protocol.cli import main; raise SystemExit(main())"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def env(tmp_path: Path, broker: MosquittoBroker) -> AgentEnv:
    return AgentEnv.create(tmp_path, "gw-check", broker)


@pytest.mark.parametrize("example", ["pumps", "field", "boiler"])
def test_check_passes_on_each_example_config(
    env: AgentEnv, plant: SimProcess, example: str
) -> None:
    config = env.write_config(devices_from_example(example, plant.endpoints))
    result = run("agent", "check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result   OK" in result.stdout
    assert "login ok" in result.stdout
    points = sum(len(d["points"]) for d in devices_from_example(example))
    assert result.stdout.count(" ok\n") + result.stdout.count(" ok ") >= points


def test_check_shows_a_wrong_word_order_and_fails(env: AgentEnv, plant: SimProcess) -> None:
    devices = devices_from_example("pumps", plant.endpoints)
    level = devices[0]["points"][0]
    assert level["attribute"] == "level"
    level["word_order"] = "little"  # the device uses big (ABCD)
    level.update(min=0.5, max=5.0)  # the tank's real range: a swapped word rarely lands in it
    config = env.write_config(devices)
    # The level is live and noisy, so its swapped decode is random; once in a few hundred
    # reads it lands in the range. Such a read is not a finding; read again.
    for _ in range(3):
        result = run("agent", "check", "-c", str(config), "--skip-broker")
        if result.returncode == 1:
            break
    assert result.returncode == 1, result.stdout
    line = next(row for row in result.stdout.splitlines() if "tank-1.level " in row)
    assert "FAIL" in line
    hint = line.split("FAIL:", 1)[1]
    assert "ABCD" in hint  # the order the device really uses is offered as plausible
    assert "CDAB" not in hint
    assert "!*" in line  # the configured order's value is marked implausible
    assert "ts=" not in result.stdout  # log lines go to stderr


def test_check_reports_an_unreachable_device_and_a_refused_login(
    env: AgentEnv, tmp_path: Path
) -> None:
    device = devices_from_example("pumps")[0]
    device.update(host="127.0.0.1", port=1, timeout_s=0.5)
    config = env.config([device])
    config["broker"]["password_file"] = str(tmp_path / "wrong.password")
    (tmp_path / "wrong.password").write_text("not-the-password")
    path = tmp_path / "bad.toml"
    path.write_text(toml_dumps(config))
    result = run("agent", "check", "-c", str(path))
    assert result.returncode == 1
    assert "cannot connect to 127.0.0.1:1" in result.stdout
    assert "0/8 points ok" in result.stdout
    assert "broker   FAIL" in result.stdout


def test_a_bad_config_names_file_key_and_fix(env: AgentEnv, tmp_path: Path) -> None:
    device = devices_from_example("pumps")[0]
    device["points"][2]["type"] = "uint17"
    path = tmp_path / "typo.toml"
    path.write_text(toml_dumps(env.config([device])))
    for action in ("run", "check", "status"):
        result = run("agent", action, "-c", str(path))
        assert result.returncode == 1
        assert f"{path}: devices[0].points[2].type: 'uint17' is not one of:" in result.stderr
        assert "uint16" in result.stderr


def test_run_refuses_a_private_key_others_can_read(env: AgentEnv) -> None:
    env.gateway_key_path.chmod(0o644)
    config = env.write_config(devices_from_example("pumps"))
    result = run("agent", "run", "-c", str(config), timeout=60)
    assert result.returncode == 1
    assert "chmod 600" in result.stderr


def test_status_without_an_agent_or_buffer(env: AgentEnv) -> None:
    config = env.write_config(devices_from_example("pumps"))
    result = run("agent", "status", "-c", str(config))
    assert result.returncode == 3
    assert "NOT RUNNING" in result.stdout
    assert "no buffer file" in result.stdout


def test_run_explains_an_unusable_state_directory(env: AgentEnv, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    config = env.config(devices_from_example("pumps"))
    config["state_dir"] = str(blocker / "state")
    path = tmp_path / "agent.toml"
    path.write_text(toml_dumps(config))
    result = run("agent", "run", "-c", str(path), timeout=60)
    assert result.returncode == 1
    assert "cannot create the state directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_commands_load_no_hub_or_simulator_code(tmp_path: Path) -> None:
    """A gateway runs ``fieldtwin agent run`` for months: the root command registers
    only the subcommand it was given, so the hub's and simulator's CLIs stay unloaded."""
    script = (
        "import sys\n"
        "from fieldtwin.protocol.cli import main\n"
        f"code = main(['--log-level', 'warning', 'agent', 'status', '-c', {str(tmp_path)!r}])\n"
        "others = ('fieldtwin.hub', 'fieldtwin.sim')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(others))\n"
        "print(code, loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "1 []", result.stdout + result.stderr
    # The full tree is still there for help and for a mistyped command.
    typo = run("agnet", "status")
    assert typo.returncode == 2
    assert "choose from" in typo.stderr
    assert "'hub'" in typo.stderr
