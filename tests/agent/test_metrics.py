"""The Prometheus page is derived from the status dictionary, value by value."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.agent.metrics import render

NOW = 1_800_000_000_000


def status(**overrides: object) -> dict[str, object]:
    """A status dictionary as ``Agent.status`` writes it."""
    base: dict[str, object] = {
        "gateway": "gw-pumps",
        "version": "0.1.0",
        "started_at_ms": NOW - 3_600_000,
        "epoch": 123,
        "buffer": {
            "frames": 3,
            "samples": 1500,
            "bytes": 40_000,
            "oldest_ts_ms": NOW - 90_000,
            "max_samples": 5_000_000,
            "counters": {"dropped_samples": 0, "dropped_frames": 0, "overflow_events": 0},
            "pending_in_memory": 0,
            "dropped_in_memory": 0,
        },
        "uplink": {
            "connected": True,
            "connects": 1,
            "hub_online": True,
            "last_publish_ms": NOW - 500,
            "published_frames": 10,
            "published_samples": 2000,
            "acked_frames": 9,
            "rejected": {},
        },
        "sources": {
            "pump-station": {
                "protocol": "modbus-tcp",
                "requests": 200,
                "failures": 1,
                "latency_ms_avg": 2.5,
                "latency_ms_max": 30.0,
                "success_ratio": 0.995,
                "connected": True,
            }
        },
    }
    base.update(overrides)
    return base


SAMPLE_LINE = re.compile(r'^[a-z_:][a-z0-9_:]*(\{([a-z_][a-z0-9_]*="([^"\\]|\\.)*",?)*\})? \S+$')


def page_of(**overrides: object) -> dict[str, float]:
    text = render(status(**overrides), now_ms=NOW)
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE_LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_every_figure_comes_from_the_status() -> None:
    values = page_of(
        implausible_by_device={"pump-station": 7},
        commands={"ok": 2, "rejected": 1},
        sampler={"offered": 900, "reported": 300, "stale": 1, "bad": 2, "implausible": 7},
    )
    assert values["fieldtwin_agent_buffer_samples"] == 1500
    assert values["fieldtwin_agent_buffer_frames"] == 3
    assert values["fieldtwin_agent_buffer_oldest_age_seconds"] == 90.0
    assert values["fieldtwin_agent_frames_published_total"] == 10
    assert values["fieldtwin_agent_samples_published_total"] == 2000
    assert values["fieldtwin_agent_broker_connected"] == 1
    assert values["fieldtwin_agent_hub_online"] == 1
    assert values["fieldtwin_agent_uptime_seconds"] == 3600.0
    labels = '{device="pump-station",protocol="modbus-tcp"}'
    assert values[f"fieldtwin_agent_source_success_ratio{labels}"] == 0.995
    assert values[f"fieldtwin_agent_source_latency_seconds{labels}"] == 0.0025
    assert values['fieldtwin_agent_implausible_values_total{device="pump-station"}'] == 7
    assert values['fieldtwin_agent_commands_total{outcome="rejected"}'] == 1
    assert values["fieldtwin_agent_readings_total"] == 900
    assert values["fieldtwin_agent_overflow_dropped_samples_total"] == 0


def test_unknown_figures_are_left_out_not_invented() -> None:
    values = page_of(
        uplink={"connected": False, "hub_online": None},
        buffer={"samples": 0, "frames": 0, "bytes": 0, "oldest_ts_ms": None, "counters": {}},
        sources={"bus": {"protocol": "modbus-rtu", "requests": 0, "success_ratio": None}},
    )
    assert "fieldtwin_agent_hub_online" not in values
    assert "fieldtwin_agent_last_publish_timestamp_seconds" not in values
    assert 'fieldtwin_agent_source_success_ratio{device="bus",protocol="modbus-rtu"}' not in values
    assert values["fieldtwin_agent_buffer_oldest_age_seconds"] == 0
    assert values["fieldtwin_agent_broker_connected"] == 0


@given(st.text(min_size=1, max_size=30))
def test_label_values_are_escaped(name: str) -> None:
    source = {"protocol": "serial-line", "requests": 1, "failures": 0}
    text = render(status(sources={name: source}), now_ms=NOW)
    for line in text.split("\n"):  # the exposition format ends lines with \n only
        if line.startswith("fieldtwin_agent_source_requests_total"):
            assert SAMPLE_LINE.match(line), line
