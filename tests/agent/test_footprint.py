"""The agent's allocator settings (agent/footprint.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fieldtwin.agent import footprint

glibc = pytest.mark.skipif(footprint._libc() is None, reason="not glibc")


def _tune(env: dict[str, str]) -> str:
    code = "from fieldtwin.agent.footprint import tune_malloc; print(sorted(tune_malloc()))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
    ).stdout.strip()


@glibc
def test_sets_threshold_and_arenas() -> None:
    assert _tune({}) == "['MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_']"


@glibc
def test_environment_wins() -> None:
    assert _tune({"MALLOC_ARENA_MAX": "4"}) == "['MALLOC_MMAP_THRESHOLD_']"
    assert _tune({"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "65536"}) == "[]"
