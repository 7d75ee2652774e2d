"""The demo's comparison of the twin with the simulator's ground truth (pure parts)."""

from __future__ import annotations

from typing import Any

from fieldtwin.hub.demo import compare_with_truth, truth_tolerance


def entity(physical_id: str, **attributes: Any) -> dict[str, Any]:
    return {
        "physical_id": physical_id,
        "attributes": {
            name: {"value": value, "quality": "good"} for name, value in attributes.items()
        },
    }


def test_tolerance_widens_with_the_sensors_noise_only() -> None:
    assert truth_tolerance(0.0) == 0.05
    assert truth_tolerance(100.0) == 3.0
    assert truth_tolerance(3.6, noise=0.05) == 0.2
    assert truth_tolerance(100.0, noise=0.05) == 3.0


def test_a_noisy_sample_is_not_a_mismatch_but_a_wrong_value_is() -> None:
    truth = {
        "pump-1.motor_current": {"true": 3.625, "reported": 3.5, "noise": 0.05},
        "tank-1.level": {"true": 2.0, "reported": 2.0, "noise": 0.0},
        "pump-1.running": {"true": 1.0, "reported": 1.0, "noise": 0.0},
    }
    twin = [
        entity("pump-1", motor_current=3.51, running=True),  # 2.3 sigma off: noise
        entity("tank-1", level=2.5),  # 0.5 m off a noiseless level: wrong
    ]
    matches, mismatches = compare_with_truth(twin, truth)
    assert len(matches) == 2
    assert mismatches == ["tank-1.level: twin 2.5 vs true 2 (±0.06)"]


def test_attributes_without_truth_or_of_bad_quality_are_not_compared() -> None:
    twin = [entity("pump-1", motor_current=99.0)]
    twin[0]["attributes"]["motor_current"]["quality"] = "bad"
    truth = {"pump-1.motor_current": {"true": 3.6, "noise": 0.05}}
    assert compare_with_truth(twin, truth) == ([], [])
    assert compare_with_truth([entity("mixer-1", speed=10)], truth) == ([], [])
