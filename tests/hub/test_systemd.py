"""The hub under systemd: notify protocol, watchdog, credentials paths."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.broker import MosquittoBroker
from support.hub_env import write_hub_config

from fieldtwin.hub.config import load_hub_config
from fieldtwin.protocol.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_notify_ready_watchdog_and_stopping(tmp_path: Path, broker: MosquittoBroker) -> None:
    files = write_hub_config(
        tmp_path, broker_url=broker.url, password=broker.passwords["hub"], client_id="ft-hub-sd"
    )
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(1.0)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000", PYTHONFAULTHANDLER="1")
    hub = subprocess.Popen(
        [sys.executable, "-m", "fieldtwin.protocol.cli", "hub", "run", "-c", str(files.config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {"READY=1", "WATCHDOG=1"} <= set(seen):
            try:
                seen.append(sock.recv(256).decode())
            except TimeoutError:
                assert hub.poll() is None, hub.stdout.read().decode() if hub.stdout else ""
        assert seen[0] == "READY=1"
        assert "WATCHDOG=1" in seen
        hub.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen and time.monotonic() < deadline:
            try:
                seen.append(sock.recv(256).decode())
            except TimeoutError:
                pass
        try:
            code = hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.send_signal(signal.SIGUSR1)  # the hub prints every asyncio task's stack
            time.sleep(1)
            hub.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
            out = hub.communicate(timeout=10)[0].decode(errors="replace")
            raise AssertionError(f"the hub did not stop within 60 s of SIGTERM:\n{out}") from None
        assert code == 0
        assert "STOPPING=1" in seen
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()
        if hub.stdout:
            hub.stdout.close()
        sock.close()


def test_config_paths_expand_systemd_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_hub_config(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (tmp_path / "keys" / "hub.key").rename(creds / "hub.key")
    text = files.config.read_text().replace(
        'key = "keys/hub.key"', 'key = "$CREDENTIALS_DIRECTORY/hub.key"'
    )
    files.config.write_text(text)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_hub_config(files.config)
    assert config.key_file == creds / "hub.key"
    assert config.load_key().key_id == files.hub_key.key_id
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="environment variable that is not set"):
        load_hub_config(files.config)


def test_unit_file_runs_the_hub_as_notify_service() -> None:
    unit = (ROOT / "systemd" / "fieldtwin-hub.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=60",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "LoadCredential=hub.key:/etc/fieldtwin/keys/hub.key",
    ):
        assert line in unit.splitlines()
    assert "fieldtwin hub run -c /etc/fieldtwin/hub.toml" in unit
