"""``fieldtwin demo`` as a new user runs it: one command, embedded broker, real parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]

SYNC_REPORT_FIELDS = yaml.safe_load(
    """
workflow_id: s
world_id: s
sync_timestamp: s
status: s
twin_snapshot: {version: s, state: o, hash: s, evidence_anchors: a}
drift_report: {anomalies_detected: i, severity: s, triggers: a, evidence_anchors: a}
risk_assessment: {current_risk: n, forecasted_risk: n, risk_factors: a, evidence_anchors: a}
actions: {executed: b, plan_summary: s, changes: a, safety_gates_passed: b, evidence_anchors: a}
verification: {result: s, criteria_met: a, evidence_anchors: a}
audit: {log_path: s, provenance_chain: a, evidence_anchors: a}
rollback: {available: b, executed: b, restore_point: s, command: s}
next_sync: {recommended_interval: s, triggers: a}
confidence: n
evidence_anchors: a
assumptions: a
"""
)


def demo(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_DATA_HOME=str(state / "xdg"))
    return subprocess.run(
        [*FIELDTWIN, "demo", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )


def history(state: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [
            *FIELDTWIN,
            "twin",
            "history",
            "--state-dir",
            str(state),
            "tank-1",
            "level",
            "--from",
            "1h",
            "--limit",
            "100000",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    samples: list[dict[str, object]] = json.loads(result.stdout)
    return samples


def running_with(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


def test_headless_demo_writes_a_sync_report_and_reuses_its_state(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    report_path = tmp_path / "report.json"
    first = demo(
        state, "--headless", "--duration", "45", "--report", str(report_path), "--speed", "2"
    )
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(report_path.read_text())
    for key, sub in SYNC_REPORT_FIELDS.items():
        assert key in report, key
        if isinstance(sub, dict):
            assert set(sub) <= set(report[key]), (key, set(sub) - set(report[key]))
    assert report["world_id"] == "water-plant"
    # the operator scenario: a verified change, an interlock refusal, a rollback
    changes = report["actions"]["changes"]
    assert any("pump-1.speed_sp 900 → 1200: verified" in c for c in changes), changes
    assert any("valve-1.position" in c and "refused" in c and "interlock" in c for c in changes)
    assert any(": rolled back" in c for c in changes), changes
    assert report["status"] == "rolled_back"
    assert report["actions"]["executed"] is True
    assert report["actions"]["safety_gates_passed"] is True
    assert report["rollback"]["executed"] is True
    assert report["rollback"]["command"].endswith("(rolled back C-000003)")
    assert report["verification"]["result"] == "PASS", report["verification"]
    assert any("verified" in c for c in report["verification"]["criteria_met"])
    assert report["twin_snapshot"]["hash"].startswith("sha256:")
    assert set(report["twin_snapshot"]["state"]) >= {
        "water-plant/tank-1",
        "water-plant/pump-1",
        "water-plant/boiler-1",
    }
    assert "every gateway delivered data to the twin" in report["verification"]["criteria_met"]
    assert report["audit"]["log_path"].endswith("hub.duckdb#audit")
    key_file = state / "keys" / "hub.key"
    created = key_file.stat().st_mtime_ns
    before = history(state)
    # a second run reuses keys and database; the twin keeps its history
    second = demo(state, "--headless", "--duration", "15", "--no-commands")
    assert second.returncode == 0, second.stdout + second.stderr
    assert key_file.stat().st_mtime_ns == created
    after = history(state)
    assert after[: len(before)] == before
    assert len(after) > len(before)
    assert running_with(state) == []
    for log in (state / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.name


def test_demo_exits_non_zero_when_a_component_dies(tmp_path: Path) -> None:
    state = tmp_path / "broken"
    (state / "keys").mkdir(parents=True)
    from fieldtwin.protocol.keys import write_key_pair

    key, _, _ = write_key_pair(state / "keys", "hub")
    key.chmod(0o644)  # the hub refuses a private key others can read, and exits
    result = demo(state, "--headless", "--duration", "5")
    assert result.returncode == 1
    assert "the hub exited" in result.stderr
    assert "hub.log" in result.stderr
    assert "chmod 600" in (state / "logs" / "hub.log").read_text()
    assert running_with(state) == []  # broker and simulator were stopped again
