"""Helpers shared by the end-to-end tests on a running ``fieldtwin.hub.demo.Plant``:
polling for a condition, the hub's open drift, and simulator faults."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fieldtwin.hub.demo import Plant, PlantOptions
from support.broker import MosquittoBroker
from support.plant import plant_logins


async def wait_for(check: Any, within: float = 60.0, what: str = "condition") -> Any:
    """Poll the async ``check`` every 0.5 s until it returns something true."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def running_plant(
    broker: MosquittoBroker,
    state: Path,
    ready: Callable[[Plant], Awaitable[Any]],
    *,
    operators: bool = True,
    **options: Any,
) -> AsyncIterator[Plant]:
    """The demo's plant on the test session's broker (logins registered), yielded once
    ``ready`` holds; on exit the hub must have stopped cleanly (its log tail if not)."""
    plant_logins(broker, state, operators=operators)
    plant = Plant(PlantOptions(state_dir=state, broker_url=broker.url, **options))
    try:
        await plant.start()
        await wait_for(lambda: ready(plant), within=90, what="the plant reporting")
        yield plant
    finally:
        codes = await plant.stop()
        assert codes.get("hub") == 0, (plant.layout.logs / "hub.log").read_text()[-3000:]


def find_drift(
    drift: list[dict[str, Any]], rule: str, entity: str, attribute: str = ""
) -> dict[str, Any] | None:
    for item in drift:
        if item["rule"] == rule and item["entity"] == entity and item["attribute"] == attribute:
            return item
    return None


async def drift_on(plant: Plant, rule: str, entity: str, attribute: str = "") -> Any:
    """The hub's open finding of ``rule`` on ``entity.attribute``, else None."""
    return find_drift(await plant.call("/api/drift"), rule, entity, attribute)


async def inject(plant: Plant, kind: str, **target: Any) -> tuple[int, dict[str, Any]]:
    """Inject a simulator fault; returns (wall ms just before the request, the fault)."""
    params = target.pop("params", {})
    started = int(time.time() * 1000)
    fault = await plant.sim_call("POST", "/faults", {"kind": kind, **target, "params": params})
    return started, fault


async def clear_faults(plant: Plant) -> None:
    await plant.sim_call("POST", "/faults/clear", {})


async def cleared(
    plant: Plant, rule: str, entity: str, attribute: str = "", within: float = 60.0
) -> None:
    async def gone() -> bool:
        return await drift_on(plant, rule, entity, attribute) is None

    await wait_for(gone, within=within, what=f"{rule} on {entity} to clear")
