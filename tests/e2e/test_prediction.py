"""The predictive twin live: simulator (speed 10) → agents → Mosquitto → hub. The hub
fits its models from the twin's own history on its model loop; a leak injected in the
simulator (a hole no flow meter sees) makes the tank level fall faster than pump and
valve explain, and the hub raises "behaviour does not match model" while the
rate-of-change rule stays quiet (the leak is slow; only the model can tell)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from support.broker import MosquittoBroker
from support.e2e import find_drift, wait_for
from support.plant import plant_logins

from fieldtwin.hub.demo import Plant, PlantOptions

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

HUB_OVERRIDES: dict[str, Any] = {
    "drift": {"interval_s": 0.5},
    "prediction": {
        "step_s": 0.5,
        "refit_s": 10.0,
        "horizon_s": 60.0,
        "residual_window_s": 6.0,
        "residual_k": 4.0,
        "residual_hold_s": 2.0,
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Plant]:
    state = tmp_path_factory.mktemp("prediction")
    plant_logins(broker, state)
    plant = Plant(
        PlantOptions(
            state_dir=state,
            broker_url=broker.url,
            speed=10.0,
            hub_overrides=HUB_OVERRIDES,
            gateways=("gw-pumps", "gw-field"),
        )
    )
    try:
        await plant.start()
        yield plant
    finally:
        codes = await plant.stop()
        assert codes.get("hub") == 0, (plant.layout.logs / "hub.log").read_text()[-3000:]


async def test_models_are_fitted_and_a_leak_is_model_drift_not_rate_drift(
    plant: Plant,
) -> None:
    async def level_model() -> Any:
        rows = await plant.call("/api/models")
        return next((r for r in rows if r.get("target") == "tank-1.level" and "a" in r), None)

    model = await wait_for(level_model, 90, "a model of tank-1.level")
    assert model["inputs"] == ["pump-1.speed", "valve-1.position"]
    assert model["samples"] >= 30
    forecast = await plant.call("/api/predict", {"target": "tank-1.level", "horizon": "30s"})
    assert forecast["forecast"][-1]["in_s"] == 30
    assert forecast["model"]["structure"] == model["structure"]
    document = await plant.call("/api/export")
    assert document["operations"]["prediction_enabled"] is True
    assert document["operations"]["models_fitted"] >= 1

    drift = await plant.call("/api/drift")
    assert not [d for d in drift if d["rule"] == "semantic.model"], drift
    await plant.sim_call(
        "POST", "/faults", {"kind": "leak", "component": "tank-1", "params": {"cv": 15.0}}
    )

    async def mismatch() -> Any:
        rows = await plant.call("/api/drift")
        return next(
            (
                d
                for d in rows
                if d["rule"] == "semantic.model"
                and (d["entity"], d["attribute"]) == ("tank-1", "level")
            ),
            None,
        )

    finding = await wait_for(mismatch, 40, "semantic.model on tank-1.level")
    assert (finding["entity"], finding["attribute"]) == ("tank-1", "level")
    assert "does not behave as its model predicts" in finding["description"]
    assert "observed" in finding["description"]
    assert "inputs pump-1.speed=" in finding["description"]
    faults = (await plant.sim_call("GET", "/faults"))["faults"]
    assert [(f["kind"], f["status"]) for f in faults] == [("leak", "active")]
    # The rate rule cannot see a leak: the level falls far slower than max_rate allows
    # (the point: only the model can tell). Never raised since the start, so
    # neither open now nor among the alarms (every finding that alerts leaves one).
    assert find_drift(await plant.call("/api/drift"), "semantic.rate", "tank-1", "level") is None
    alarms = await plant.call("/api/alarms")
    assert not [a for a in alarms if (a["rule"], a["entity"]) == ("semantic.rate", "tank-1")], (
        alarms
    )
