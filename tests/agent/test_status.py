"""The status file: atomic writes, liveness, and what `agent status` prints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fieldtwin.agent.status import is_live, read_status, render_status, write_status

NOW = 1_800_000_000_000


def status(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "format": 1,
        "state": "running",
        "gateway": "gw-pumps",
        "pid": os.getpid(),
        "started_at_ms": NOW - 3_600_000,
        "written_at_ms": NOW - 2_000,
        "interval_s": 5,
        "epoch": 123,
        "broker_url": "mqtt://127.0.0.1:1883",
        "buffer": {
            "frames": 3,
            "samples": 1500,
            "bytes": 40_000,
            "oldest_ts_ms": NOW - 90_000,
            "max_samples": 5_000_000,
            "overflow": "drop_oldest",
            "counters": {"dropped_samples": 0, "quarantined": 0},
        },
        "uplink": {
            "connected": True,
            "last_connect_ms": NOW - 60_000,
            "hub_online": True,
            "hub_instance": "abc",
            "last_publish_ms": NOW - 500,
            "published_frames": 10,
            "published_samples": 2000,
            "backlog_frames": 0,
            "resent_frames": 0,
        },
        "sources": {
            "pump-station": {
                "protocol": "modbus-tcp",
                "points": 8,
                "latency_ms_avg": 2.5,
                "success_ratio": 0.995,
                "last_success_ms": NOW - 400,
                "last_failure_ms": NOW - 7_200_000,
                "last_error": "unit 1 did not answer within the timeout",
            }
        },
    }
    base.update(overrides)
    return base


def test_write_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state" / "status.json"
    write_status(path, status())
    assert read_status(path) == json.loads(json.dumps(status()))
    assert not [p for p in path.parent.iterdir() if p.name != "status.json"]  # no temp left
    path.write_text("{half a fi")
    assert read_status(path) is None
    assert read_status(tmp_path / "missing.json") is None


def test_liveness() -> None:
    assert is_live(status(), NOW)
    assert not is_live(status(written_at_ms=NOW - 60_000), NOW)  # stale file
    assert not is_live(status(state="stopped"), NOW)
    assert not is_live(status(pid=2**22 + 12345), NOW)  # no such process


def test_rendering_shows_what_an_operator_asks_for() -> None:
    text = render_status(status(), live=True, now_ms=NOW)
    assert "running, pid" in text
    assert "1,500 samples in 3 frames" in text
    assert "oldest   unacknowledged sample" in text
    assert "90 s ago" in text
    assert "publish  last" in text
    assert "0.5 s ago" in text
    line = next(row for row in text.splitlines() if row.startswith("pump-station"))
    assert "2.5 ms" in line
    assert "99.5%" in line
    assert "did not answer" in line
    down = render_status(
        status(
            uplink={"connected": False, "last_error": "Connection refused", "hub_online": None},
            buffer={"samples": 10, "frames": 1, "bytes": 10, "counters": {"dropped_samples": 7}},
        ),
        live=True,
        now_ms=NOW,
    )
    assert "DISCONNECTED" in down
    assert "Connection refused" in down
    assert "ALARM    7 samples dropped" in down


def test_rendering_names_implausible_points_and_a_gateway_id_conflict() -> None:
    text = render_status(
        status(
            implausible_points={"pump-1.speed": 120, "tank-1.level": 3},
            gateway_id_conflict_suspected=True,
            metrics_url="http://127.0.0.1:9471/metrics",
        ),
        live=True,
        now_ms=NOW,
    )
    assert "readings outside their valid range: pump-1.speed 120, tank-1.level 3" in text
    assert "probably another agent is running with gateway id 'gw-pumps'" in text
    assert "metrics  http://127.0.0.1:9471/metrics" in text
    quiet = render_status(status(), live=True, now_ms=NOW)
    assert "valid range" not in quiet
    assert "another agent" not in quiet
