"""Fixtures for the agent's integration tests: one simulator per module, running agents.

The simulator is a real subprocess (``fieldtwin sim run ... --ephemeral --json``); each
test that injects faults gets them cleared afterwards by the ``plant`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.sim import WATER_PLANT, SimProcess


@pytest.fixture(scope="module")
def water_plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    folder = tmp_path_factory.mktemp("water-plant")
    sim = SimProcess.start(
        WATER_PLANT,
        "--truth",
        str(folder / "truth.duckdb"),
        timeout=90,
        stderr_path=folder / "sim.log",
    )
    try:
        yield sim
    finally:
        code = sim.stop(timeout=60)
        assert code == 0, sim.log[-5000:]


@pytest.fixture
def plant(water_plant: SimProcess) -> Iterator[SimProcess]:
    """The module's simulator; faults are cleared when the test ends."""
    yield water_plant
    if water_plant.running:
        water_plant.clear_faults()
