"""Options of the chaos run, and where its figures are printed.

    pytest tests/chaos                       # the short CI schedule (about two minutes)
    pytest tests/chaos --soak 60             # a 60-minute release soak with memory growth
    pytest tests/chaos --chaos-seed 7        # another seeded schedule

(The options belong to this folder: pass tests/chaos on the command line to use them.)
Every run prints its figures as a block and one JSON line in pytest's terminal summary,
whatever the capture mode, so they can be copied into docs/reliability.md as measured.
"""

from __future__ import annotations

from typing import Any

import pytest

from chaos.figures import REPORTS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "chaos and soak runs (tests/chaos)")
    group.addoption(
        "--soak",
        type=float,
        default=None,
        metavar="MINUTES",
        help="run the long chaos schedule for MINUTES and report memory growth per hour",
    )
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the kill schedule (default: the fixed CI seed)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = config.getoption("--soak", default=None)
    limit = int(soak * 60) + 900 if soak else 900
    for item in items:
        if item.get_closest_marker("chaos_run") is not None:
            item.add_marker(pytest.mark.timeout(limit))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos_run: the chaos schedule (its timeout follows --soak)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in terminalreporter.config.stash.get(REPORTS, []):
        terminalreporter.write_sep("=", "chaos run figures")
        terminalreporter.write_line(report)
