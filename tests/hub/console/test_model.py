"""The console's live model (pure): snapshots, dense seqs, gaps, instances, filters."""

from __future__ import annotations

from typing import Any

from fieldtwin.hub.console.model import (
    APPLIED,
    GAP,
    NEW_INSTANCE,
    OLD,
    UNSYNCED,
    LiveModel,
    matches,
    sort_alarms,
)
from fieldtwin.hub.console.synthetic import SyntheticHub
from fieldtwin.hub.views import ALARM_COLS, ATTR_COLS, table
from fieldtwin.protocol.messages import View

NOW = 1_714_564_800_000


def loaded() -> tuple[LiveModel, SyntheticHub]:
    hub = SyntheticHub.water_plant(NOW)
    model = LiveModel()
    first = hub.op_view_snapshot({})
    parts = [first["tables"]] + [
        hub.op_view_snapshot({"part": i})["tables"] for i in range(1, first["parts"])
    ]
    model.load_snapshot(first, parts, NOW)
    return model, hub


def view(stream: str, seq: int, tables: dict[str, Any], instance: str = "synthetic") -> View:
    return View(stream, instance, seq, {"now_ms": NOW, "tables": tables})


def level(value: float) -> dict[str, Any]:
    return {"attrs": table(ATTR_COLS, [["tank-1", "level", value, NOW, "good", NOW]])}


def test_snapshot_then_dense_deltas_gap_and_new_instance() -> None:
    model, _ = loaded()
    assert model.synced
    assert len(model.entities) == 8
    assert model.entities["tank-1"].attrs["level"].value == 4.81
    assert model.apply_view(view("twin", 1, level(4.5)), NOW) == APPLIED
    assert model.entities["tank-1"].attrs["level"].value == 4.5
    # a repeat (or a frame the snapshot already held) changes nothing
    assert model.apply_view(view("twin", 1, level(9.9)), NOW) == OLD
    assert model.entities["tank-1"].attrs["level"].value == 4.5
    # seq 3 after 1: frames were lost; nothing applies until a new snapshot
    assert model.apply_view(view("twin", 3, level(1.0)), NOW) == GAP
    assert not model.synced
    assert model.apply_view(view("twin", 4, level(1.0)), NOW) == UNSYNCED
    assert model.entities["tank-1"].attrs["level"].value == 4.5
    model, _ = loaded()
    assert model.apply_view(view("twin", 1, level(1.0), instance="restarted"), NOW) == NEW_INSTANCE
    assert not model.synced


def test_streams_count_separately_and_dirty_sets_coalesce() -> None:
    model, _ = loaded()
    model.take_dirty()
    for seq, value in enumerate((1.0, 2.0, 3.0), start=1):
        assert model.apply_view(view("twin", seq, level(value)), NOW + seq) == APPLIED
    alarm = dict.fromkeys(ALARM_COLS)
    alarm.update(id="A-000007", entity="tank-1", attribute="level", state="cleared")
    assert (
        model.apply_view(
            view("alarms", 1, {"alarms": table(ALARM_COLS, [[alarm[c] for c in ALARM_COLS]])}), NOW
        )
        == APPLIED
    )
    entities, parts, stamps = model.take_dirty()
    assert entities == {"tank-1"}
    assert "alarms" in parts
    assert len(stamps) == 4
    assert "A-000007" not in model.alarms  # cleared alarms leave the list
    assert model.updates_applied >= 3


def test_filter_words_and_fields() -> None:
    model, _ = loaded()
    pump = model.entities["pump-1"]
    assert matches(pump, "pump")
    assert matches(pump, "type:pump health:healthy")
    assert not matches(pump, "type:tank")
    assert matches(model.entities["flowmeter-1"], "health:stale gw:gw-field")
    assert sum(matches(e, "gw-pumps") for e in model.entities.values()) == 4


def test_alarms_sort_by_severity_then_newest_and_flood() -> None:
    model, _ = loaded()
    order = [a["id"] for a in sort_alarms(model.alarms.values())]
    assert order == ["A-000007", "A-000006", "A-000005", "A-000004"]
    assert model.flood(NOW) == 0
    rows = []
    for i in range(11):
        alarm = dict.fromkeys(ALARM_COLS)
        alarm.update(
            id=f"A-1{i:05d}",
            entity="tank-1",
            attribute="",
            state="active",
            severity="warning",
            raised_ms=NOW - i * 1000,
            description="x",
        )
        rows.append([alarm[c] for c in ALARM_COLS])
    model.apply_view(view("alarms", 1, {"alarms": table(ALARM_COLS, rows)}), NOW)
    assert model.flood(NOW) >= 11
