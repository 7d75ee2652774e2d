"""One water-plant simulator (a real subprocess) shared by the live tests of this folder.

It runs at ``--speed 10`` so the process moves quickly; every test that injects faults
or changes setpoints uses the ``plant`` fixture, which clears faults afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.sim import WATER_PLANT, SimulatorProcess


@pytest.fixture(scope="package")
def water_plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    folder = tmp_path_factory.mktemp("water-plant")
    sim = SimulatorProcess(
        WATER_PLANT,
        speed=10.0,
        truth=folder / "ground-truth.duckdb",
        stderr_path=folder / "sim.log",
        startup_timeout=90.0,
    )
    sim.start()
    try:
        yield sim
    finally:
        code = sim.stop(timeout=60)
        assert code == 0, sim.stderr
        assert "Traceback" not in sim.stderr, sim.stderr


@pytest.fixture
def plant(water_plant: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The shared simulator, with every fault cleared when the test ends."""
    yield water_plant
    water_plant.clear_faults()
