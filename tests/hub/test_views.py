"""The console feed (hub/views.py): snapshots in parts, dense signed deltas of what changed.

A real ``HubService`` on a DuckDB file, fed real signed gateway frames (no broker):
what consoles receive is decoded and verified with the hub's public key, as the
console's ``OperatorClient`` does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from support.hub_env import GatewaySigner, HubFiles, point, sample, write_hub_config

from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.ingest import Inbound
from fieldtwin.hub.metrics import HubMetrics
from fieldtwin.hub.service import HubService
from fieldtwin.hub.state import CurrentValue
from fieldtwin.hub.store import TwinStore
from fieldtwin.hub.views import PART_BYTES, split_tables
from fieldtwin.protocol.frames import decode_frame
from fieldtwin.protocol.keys import KeyRegistry
from fieldtwin.protocol.messages import View


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[HubService, HubFiles]]:
    files = write_hub_config(tmp_path / "hub")
    config = load_hub_config(files.config)
    store = TwinStore.open(config.database, memory_limit="256MB", threads=1)
    service = HubService(config, store, instance="test-instance", metrics=HubMetrics())
    try:
        yield service, files
    finally:
        service.close()


def feed(service: HubService, *messages: tuple[str, bytes]) -> None:
    now = int(time.time() * 1000)
    outcome, _ = service.ingest_batch([Inbound(t, p, now) for t, p in messages])
    assert outcome.error is None
    assert not outcome.rejected, outcome.rejected


def views(service: HubService, files: HubFiles) -> list[View]:
    registry = KeyRegistry.of({"hub": files.hub_key.public})
    out = []
    for frame in service.view_tick():
        decoded = decode_frame(frame.payload, registry)
        assert isinstance(decoded.body, View)
        assert frame.topic == f"ft/v1/hub/view/{decoded.body.stream}"
        out.append(decoded.body)
    return out


def rows(view: View, name: str) -> list[dict[str, Any]]:
    table = view.data["tables"].get(name)
    if table is None:
        return []
    return [dict(zip(table["cols"], row, strict=True)) for row in table["rows"]]


def test_deltas_carry_only_what_changed_with_dense_seqs(
    hub: tuple[HubService, HubFiles],
) -> None:
    service, files = hub
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    service.view_feed()  # primed before anything arrives
    feed(
        service,
        gw.birth(
            [point("tank-1", "level", unit="m"), point("pump-1", "speed", unit="rpm")],
            [sample("tank-1", "level", 2.0), sample("pump-1", "speed", 900.0)],
        ),
    )
    first = {v.stream: v for v in views(service, files)}
    assert first["twin"].view_seq == 1
    assert first["twin"].instance == "test-instance"
    attrs = {(r["entity"], r["attribute"]): r for r in rows(first["twin"], "attrs")}
    assert attrs[("tank-1", "level")]["value"] == 2.0
    assert attrs[("tank-1", "level")]["quality"] == "good"
    assert {r["attribute"] for r in rows(first["twin"], "points")} == {"level", "speed"}
    assert first["hub"].view_seq == 1  # the heartbeat

    feed(service, gw.data([sample("tank-1", "level", 2.5)]))
    second = {v.stream: v for v in views(service, files)}
    assert second["twin"].view_seq == 2
    changed = rows(second["twin"], "attrs")
    assert [(r["entity"], r["attribute"], r["value"]) for r in changed] == [
        ("tank-1", "level", 2.5)
    ]
    assert "points" not in second["twin"].data["tables"]
    # nothing changed: no twin frame at all (and the heartbeat waits its second)
    assert [v.stream for v in views(service, files)] == []


def test_alarm_changes_stream_in_order(hub: tuple[HubService, HubFiles]) -> None:
    service, files = hub
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    service.view_feed()
    feed(service, gw.birth([point("tank-1", "level")], [sample("tank-1", "level", 4.9)]))
    now = service.now_ms()
    service.sync_cycle(now + 1)  # threshold drift: critical above 4.5
    service.sync_cycle(now + 2)
    alarm_views = [v for v in views(service, files) if v.stream == "alarms"]
    assert alarm_views
    assert alarm_views[0].view_seq == 1
    raised = [r for r in rows(alarm_views[0], "alarms") if r["entity"] == "tank-1"]
    assert raised
    assert raised[0]["state"] == "active"
    # the value returns to normal: the alarm stays "returned" until acknowledged
    feed(service, gw.data([sample("tank-1", "level", 2.0)]))
    for step in range(3, 12):
        service.sync_cycle(now + step * 1000)
    later = [v for v in views(service, files) if v.stream == "alarms"]
    assert later[0].view_seq == 2
    level = [r for r in rows(later[0], "alarms") if r["rule"] == "threshold"]
    assert [r["state"] for r in level] == ["returned"]


def test_snapshot_parts_reassemble_the_whole_view(hub: tuple[HubService, HubFiles]) -> None:
    service, files = hub
    gw = GatewaySigner("gw-01", files.gateway_keys["gw-01"])
    feed(service, gw.data([sample("tank-1", "level", 2.0)]))
    # 3,000 more entities x 4 attributes, far more than one frame holds, put straight into
    # the twin's memory (storing 3,000 new entities through ingest takes minutes here)
    state = service.ingest.state
    now = service.now_ms()
    for i in range(3000):
        for name in ("a", "b", "c", "temperature_long_attribute_name"):
            state.current[(f"sensor-{i:05d}", name)] = CurrentValue(
                float(i), now, 0, "gw-01", now, now
            )
    service.view_feed()
    first = service.view_feed().snapshot("olga", {}, service.now_ms())
    assert first["parts"] > 1
    assert first["instance"] == "test-instance"
    parts = [first]
    for number in range(1, first["parts"]):
        part = service.view_feed().snapshot(
            "olga", {"snapshot": first["snapshot"], "part": number}, service.now_ms()
        )
        parts.append(part)
    for part in parts:
        assert len(msgpack.packb(part, use_bin_type=True)) < 1 << 20
    attrs = [row for p in parts for row in p["tables"].get("attrs", {}).get("rows", [])]
    assert len(attrs) == 12_001
    entities = [row for p in parts for row in p["tables"].get("entities", {}).get("rows", [])]
    assert len(entities) == 3002  # + the declared tank-1 and pump-1
    # another operator cannot read this snapshot
    from fieldtwin.hub.errors import QueryError

    with pytest.raises(QueryError):
        service.view_feed().snapshot("vic", {"snapshot": first["snapshot"], "part": 1}, 0)


def test_split_tables_keeps_every_row_under_the_limit() -> None:
    tables = {
        "small": {"cols": ["a"], "rows": [[1], [2]]},
        "big": {"cols": ["k", "v"], "rows": [[f"key-{i}", "x" * 100] for i in range(20_000)]},
    }
    parts = split_tables(tables, PART_BYTES)
    assert len(parts) > 1
    assert [r for p in parts for r in p.get("big", {}).get("rows", [])] == tables["big"]["rows"]
    assert parts[0]["small"]["rows"] == [[1], [2]]
    for part in parts:
        assert len(msgpack.packb(part, use_bin_type=True)) <= PART_BYTES + 1024
