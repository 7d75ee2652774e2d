"""``fieldtwin broker config``: what it writes, what it keeps, and the example it documents.

The generated files on a real Mosquitto (logins, ACL, client-id binding, packet limit,
TLS) are tested in tests/test_broker_acl.py; the chaos test runs on them too.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from support.hub_env import write_hub_config

from fieldtwin.hub.broker import (
    BrokerConfigError,
    BrokerOptions,
    acl_text,
    conf_text,
    generate,
    password_hash,
    registry_users,
    users_from_hub_config,
)
from fieldtwin.hub.config import load_hub_config

ROOT = Path(__file__).resolve().parents[2]
FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]

OPERATORS = """
[operators.alice]
public_key = "keys/gw-01.pub"
roles = ["operator"]
"""


def test_password_hash_is_mosquittos_pbkdf2_format() -> None:
    salt = b"0123456789ab"
    text = password_hash("secret", salt)
    _, kind, iterations, salt_b64, digest_b64 = text.split("$")
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(salt_b64) == salt
    expected = hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101)
    assert base64.b64decode(digest_b64) == expected
    assert password_hash("secret") != password_hash("secret")  # a fresh salt each time


def test_acl_is_explicit_per_user() -> None:
    users = registry_users(["gw-02", "gw-01"], ["alice"])
    assert [(u.name, u.role) for u in users] == [
        ("hub", "hub"),
        ("gw-01", "gateway"),
        ("gw-02", "gateway"),
        ("alice", "operator"),
    ]
    text = acl_text(users)
    blocks = {
        block.splitlines()[1].split()[1]: block.splitlines()[2:] for block in text.split("\n\n")[1:]
    }
    assert blocks["hub"] == [
        "topic read ft/v1/+/up/#",
        "topic write ft/v1/+/down/#",
        "topic read ft/v1/op/+/req",
        "topic write ft/v1/op/+/resp",
        "topic readwrite ft/v1/hub/#",
    ]
    assert blocks["gw-01"] == [
        "topic write ft/v1/gw-01/up/#",
        "topic read ft/v1/gw-01/down/#",
        "topic read ft/v1/hub/state",
    ]
    assert blocks["alice"] == [
        "topic write ft/v1/op/alice/req",
        "topic read ft/v1/op/alice/resp",
        "topic read ft/v1/hub/view/#",
        "topic read ft/v1/hub/state",
    ]
    assert not any(line.startswith("pattern") for line in text.splitlines())


def test_a_loadgen_user_writes_every_uplink_and_reads_every_downlink() -> None:
    users = registry_users(["gw-01"], [], ["bench"])
    assert [(u.name, u.role) for u in users][-1] == ("bench", "loadgen")
    block = acl_text(users).split("\n\n")[-1].splitlines()
    assert block == [
        "# loadgen",
        "user bench",
        "topic write ft/v1/+/up/#",
        "topic read ft/v1/+/down/#",
        "topic read ft/v1/hub/state",
    ]
    with pytest.raises(BrokerConfigError):
        registry_users(["gw-01"], [], ["gw-01"])  # a name is one user


LOADGEN = ("--loadgen-user", "bench")


def test_cli_adds_loadgen_users_only_when_asked(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path / "hub")
    out = tmp_path / "broker"
    result = subprocess.run(
        [*FIELDTWIN, "broker", "config", "-c", str(files.config), "--out", str(out), *LOADGEN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "loadgen   bench" in result.stdout
    assert (out / "passwords" / "bench.password").exists()
    assert "user bench\ntopic write ft/v1/+/up/#" in (out / "fieldtwin.acl").read_text()
    assert (
        users_from_hub_config(files.config)[0]
        == users_from_hub_config(files.config, ["bench"])[0][:-1]
    )


@pytest.mark.parametrize("name", ["hub", "op", "a b", "x/#", ""])
def test_bad_or_reserved_user_names_are_refused(name: str) -> None:
    with pytest.raises(BrokerConfigError):
        registry_users([name], [])


def test_packet_limit_follows_the_frame_limit() -> None:
    conf = conf_text(Path("/b"), BrokerOptions(max_frame_bytes=2 << 20), None)
    line = next(x for x in conf.splitlines() if x.startswith("max_packet_size"))
    limit = int(line.split()[1])
    assert 2 << 20 < limit <= (2 << 20) + (1 << 17)
    assert conf.count("use_username_as_clientid true") == 1  # one per listener


def test_secrets_are_kept_unless_forced(tmp_path: Path) -> None:
    users = registry_users(["gw-01"], ["alice"])
    first = generate(tmp_path / "b", users, BrokerOptions(tls=True, persistence_dir=None))
    for path in first.password_files.values():
        assert path.stat().st_mode & 0o777 == 0o600
    for _, key in first.client_certs.values():
        assert key.stat().st_mode & 0o077 == 0
    ca = (tmp_path / "b" / "tls" / "ca.key").read_bytes()
    more = registry_users(["gw-01", "gw-02"], ["alice"])
    second = generate(tmp_path / "b", more, BrokerOptions(tls=True, persistence_dir=None))
    assert {u: second.passwords[u] for u in first.passwords} == first.passwords
    assert "gw-02" in second.passwords
    assert "gw-02" in second.client_certs
    assert (tmp_path / "b" / "tls" / "ca.key").read_bytes() == ca
    assert "user gw-02" in second.acl.read_text()
    forced = generate(
        tmp_path / "b", more, BrokerOptions(tls=True, persistence_dir=None, force=True)
    )
    assert all(forced.passwords[u] != first.passwords[u] for u in first.passwords)
    assert (tmp_path / "b" / "tls" / "ca.key").read_bytes() != ca
    hashed = dict(line.split(":", 1) for line in forced.passwd.read_text().splitlines())
    assert set(hashed) == {"hub", "gw-01", "gw-02", "alice"}


def test_cli_generates_from_a_hub_config(tmp_path: Path) -> None:
    files = write_hub_config(tmp_path / "hub", extra=OPERATORS)
    out = tmp_path / "broker"
    result = subprocess.run(
        [*FIELDTWIN, "broker", "config", "-c", str(files.config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "gw-01" in result.stdout
    assert "alice" in result.stdout
    for name in ("hub", "gw-01", "gw-02", "alice"):
        assert (out / "passwords" / f"{name}.password").stat().st_mode & 0o777 == 0o600
    config = load_hub_config(files.config)
    assert "alice" in config.operators
    assert users_from_hub_config(files.config)[0] == registry_users(
        config.gateways, config.operators
    )
    for name in ("hub", *config.gateways, *config.operators):
        assert (out / "passwords" / f"{name}.password").exists()
    # a second run keeps every password and says so
    again = subprocess.run(
        [*FIELDTWIN, "broker", "config", "-c", str(files.config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0
    assert "(new)" not in again.stdout


def test_cli_names_a_bad_hub_config(tmp_path: Path) -> None:
    bad = tmp_path / "hub.toml"
    bad.write_text("[hub]\ntwin_id = 'x'\nkey = 'k'\n")
    result = subprocess.run(
        [*FIELDTWIN, "broker", "config", "-c", str(bad), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert str(bad) in result.stderr
    assert "gateways" in result.stderr
    assert not (tmp_path / "b").exists()


def test_the_example_files_are_the_generators_output() -> None:
    """examples/mosquitto/ is what docs/broker.md's command writes for examples/hub.toml."""
    users, max_frame = users_from_hub_config(ROOT / "examples" / "hub.toml")
    root = Path("/etc/mosquitto/fieldtwin")
    options = BrokerOptions(
        tls=True,
        hostnames=["broker.example.net"],
        max_frame_bytes=max_frame,
        log_file=Path("/var/log/mosquitto/fieldtwin.log"),
    )
    tls = {
        "ca": root / "tls/ca.crt",
        "cert": root / "tls/server.crt",
        "key": root / "tls/server.key",
    }
    example = ROOT / "examples" / "mosquitto"
    assert (example / "mosquitto.conf").read_text() == conf_text(root, options, tls)
    assert (example / "fieldtwin.acl").read_text() == acl_text(users)
