"""Lint, format and type checks run as part of the test suite, so CI has one command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"protocol": "protocol", "agent": "agent", "hub": "hub", "sim": "hardware-sim"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def test_ruff_check() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy(tmp_path: Path) -> None:
    # setuptools maps protocol/ to fieldtwin.protocol (and so on); mypy cannot follow
    # that mapping, so give it a tree where the folders sit under their real names.
    tree = tmp_path / "fieldtwin"
    tree.mkdir()
    targets: list[str] = []
    for name, folder in PACKAGES.items():
        if (ROOT / folder / "__init__.py").exists():
            (tree / name).symlink_to(ROOT / folder)
            targets += ["-p", f"fieldtwin.{name}"]
    bench = sorted(str(p) for p in (ROOT / "bench").glob("*.py"))
    env = dict(os.environ, MYPYPATH=str(tmp_path))
    cache = ROOT / ".mypy_cache"
    result = _run("mypy", "--cache-dir", str(cache), *targets, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    if bench:
        result = _run("mypy", "--cache-dir", str(cache), *bench, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
