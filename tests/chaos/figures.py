"""Where a chaos run leaves its printed figures for the terminal summary (conftest.py)."""

from __future__ import annotations

import pytest

REPORTS = pytest.StashKey[list[str]]()


def add(config: pytest.Config, text: str) -> None:
    config.stash.setdefault(REPORTS, []).append(text)
