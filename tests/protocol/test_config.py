from __future__ import annotations

from pathlib import Path

import pytest

from fieldtwin.protocol.config import ConfigError, load_toml


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_typed_reads_and_relative_paths(tmp_path: Path) -> None:
    root = load_toml(
        _write(
            tmp_path,
            'name = "gw"\nport = 502\nrate = 1\nkey = "k/gw.key"\n[[devices]]\nid = "d1"\n',
        )
    )
    assert root.text("name") == "gw"
    assert root.integer("port", min=1, max=65535) == 502
    assert root.number("rate") == 1.0
    assert root.path("key") == tmp_path / "k" / "gw.key"
    assert root.flag("tls", False) is False
    [device] = root.sections("devices")
    assert device.text("id") == "d1"
    device.finish()
    root.finish()


def test_errors_name_file_key_and_fix(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = "x"\n[[devices]]\nprot = 1\n')
    root = load_toml(path)
    with pytest.raises(ConfigError) as caught:
        root.integer("port")
    assert str(caught.value) == f"{path}: port: expected an integer, got 'x'"
    device = root.sections("devices")[0]
    device.integer("port", 502)
    with pytest.raises(ConfigError, match=r"devices\[0\]\.prot: unknown key; did you mean 'port'"):
        device.finish()


def test_range_choices_and_missing(tmp_path: Path) -> None:
    root = load_toml(_write(tmp_path, 'port = 70000\nmode = "fast"\n'))
    with pytest.raises(ConfigError, match="between 1 and 65535"):
        root.integer("port", min=1, max=65535)
    with pytest.raises(ConfigError, match="'fast' is not one of: drop_oldest, refuse_new"):
        root.text("mode", choices=["drop_oldest", "refuse_new"])
    with pytest.raises(ConfigError, match="gateway: required key is missing"):
        root.text("gateway")


def test_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(_write(tmp_path, "a = [1,\n"))
    with pytest.raises(ConfigError, match="file does not exist"):
        load_toml(tmp_path / "none.toml")


def test_paths_expand_environment_variables_and_secret_files_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "broker.password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    root = load_toml(
        _write(
            tmp_path,
            'password_file = "$CREDENTIALS_DIRECTORY/broker.password"\n'
            'missing = "$NOT_SET_ANYWHERE/x"\nunreadable = "creds/none"\n',
        )
    )
    assert root.path("password_file") == creds / "broker.password"
    assert root.secret_file("password_file") == "s3cret"
    assert root.secret_file("absent") is None
    with pytest.raises(ConfigError, match=r"missing: .*environment variable that is not set"):
        root.path("missing")
    with pytest.raises(ConfigError, match=r"unreadable: cannot read .*creds/none"):
        root.secret_file("unreadable")


def test_a_missing_key_names_a_look_alike_unknown_key(tmp_path: Path) -> None:
    root = load_toml(_write(tmp_path, "adress = 3\nunit = 1\n"))
    assert root.integer("unit") == 1
    with pytest.raises(ConfigError) as caught:
        root.integer("address")
    assert str(caught.value).endswith(
        "address: required key is missing; this table has an unknown key 'adress': "
        "a typo of 'address'?"
    )
    # A key already read, or one that looks nothing alike, is not offered.
    other = load_toml(_write(tmp_path, 'unit = 1\ncolour = "red"\n'))
    other.integer("unit")
    with pytest.raises(ConfigError, match=r"address: required key is missing$"):
        other.integer("address")
