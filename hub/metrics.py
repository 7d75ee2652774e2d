"""Operator-facing counters and their Prometheus text rendering.

Plain integers and floats updated in place by the ingest and drift code (one event
loop, one DB thread: increments are simple attribute updates, no locks needed for
monotonic counters read by a scraper). Rendered on ``GET /metrics`` of the hub's
loopback API in the Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fieldtwin.protocol.errors import REJECTION_REASONS

HUB_REJECTION_REASONS = (*REJECTION_REASONS, "topic_mismatch", "stale_death", "stale_heartbeat")


@dataclass(slots=True)
class HubMetrics:
    frames_accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    frames_rejected: Counter[str] = field(default_factory=Counter)
    points_applied: int = 0
    points_stored: int = 0
    batches: int = 0
    store_errors: int = 0
    store_recoveries: int = 0
    acks_sent: int = 0
    rebirths_sent: Counter[str] = field(default_factory=Counter)
    alarms_published: int = 0
    ingest_lag_s: float = 0.0
    ingest_queue: int = 0
    batch_seconds: float = 0.0
    mqtt_connected: bool = False
    mqtt_connects: int = 0
    drift_checks: int = 0
    drift_seconds: float = 0.0
    started_s: float = field(default_factory=time.time)
    operator_requests: Counter[str] = field(default_factory=Counter)
    """Accepted mutating operator requests, by operation."""
    operator_refused: Counter[str] = field(default_factory=Counter)
    """Refused operator requests, by reason code."""
    ingest_paused: int = 0
    loop_failures: Counter[str] = field(default_factory=Counter)
    """Failed cycles of the hub's periodic loops (drift, flush, commands, models, ...),
    by loop: a store that cannot write shows here although only a few lines are logged."""
    """Times the broker reader paused because the ingest queue was full."""


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + inner + "}"


def render(
    metrics: HubMetrics,
    *,
    alarms_by_severity: Mapping[str, int],
    gateways: Iterable[tuple[str, bool, float]],
    entities_by_health: Mapping[str, int],
    findings_by_type: Mapping[str, int],
    commands_by_state: Mapping[str, int] | None = None,
) -> str:
    """The Prometheus text page. ``gateways`` yields (id, up, seconds since last frame)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = repr(float(value)) if isinstance(value, float) else str(value)
            lines.append(f"{name}{labels} {shown}")

    family(
        "fieldtwin_hub_frames_accepted_total",
        "counter",
        "Frames verified, de-duplicated and durably stored, by gateway and kind.",
        (
            (_labels(gateway=gw, kind=kind), n)
            for (gw, kind), n in sorted(metrics.frames_accepted.items())
        ),
    )
    reasons = sorted(set(HUB_REJECTION_REASONS) | set(metrics.frames_rejected))
    family(
        "fieldtwin_hub_frames_rejected_total",
        "counter",
        "Frames refused (and audited), by reason.",
        ((_labels(reason=r), metrics.frames_rejected.get(r, 0)) for r in reasons),
    )
    family(
        "fieldtwin_hub_points_applied_total",
        "counter",
        "Samples that became current state (won last-writer-wins).",
        [("", metrics.points_applied)],
    )
    family(
        "fieldtwin_hub_points_stored_total",
        "counter",
        "Samples written to history.",
        [("", metrics.points_stored)],
    )
    family(
        "fieldtwin_hub_ingest_lag_seconds",
        "gauge",
        "Latest batch: time from the oldest frame's send time to its commit in the twin.",
        [("", metrics.ingest_lag_s)],
    )
    family(
        "fieldtwin_hub_ingest_queue_frames",
        "gauge",
        "Frames received and waiting to be stored.",
        [("", metrics.ingest_queue)],
    )
    family(
        "fieldtwin_hub_ingest_batches_total",
        "counter",
        "Ingest transactions committed.",
        [("", metrics.batches)],
    )
    family(
        "fieldtwin_hub_store_errors_total",
        "counter",
        "Ingest batches the twin store failed to write (not acknowledged; senders resend).",
        [("", metrics.store_errors)],
    )
    family(
        "fieldtwin_hub_loop_failures_total",
        "counter",
        "Failed cycles of the hub's periodic loops (drift, flush, commands, models, views, "
        "leases), by loop; logged a few times a minute at most.",
        [(_labels(loop=loop), count) for loop, count in sorted(metrics.loop_failures.items())],
    )
    family(
        "fieldtwin_hub_store_recoveries_total",
        "counter",
        "Starts that found the store's write-ahead log damaged and opened it from its last "
        "checkpoint (audited as store_wal_damaged; history after that checkpoint is missing).",
        [("", metrics.store_recoveries)],
    )
    family(
        "fieldtwin_hub_acks_sent_total", "counter", "Ack frames sent.", [("", metrics.acks_sent)]
    )
    family(
        "fieldtwin_hub_rebirths_sent_total",
        "counter",
        "Rebirth requests sent, by gateway.",
        ((_labels(gateway=gw), n) for gw, n in sorted(metrics.rebirths_sent.items())),
    )
    family(
        "fieldtwin_hub_alarms_active",
        "gauge",
        "Alarms not cleared (active, acknowledged or shelved), by severity.",
        ((_labels(severity=s), alarms_by_severity.get(s, 0)) for s in ("warning", "critical")),
    )
    family(
        "fieldtwin_hub_drift_findings",
        "gauge",
        "Active drift findings by type.",
        (
            (_labels(type=t), findings_by_type.get(t, 0))
            for t in ("threshold", "temporal", "structural", "semantic")
        ),
    )
    family(
        "fieldtwin_hub_entities",
        "gauge",
        "Twin entities by health.",
        (
            (_labels(health=h), entities_by_health.get(h, 0))
            for h in ("healthy", "degraded", "stale", "unknown")
        ),
    )
    links = list(gateways)
    family(
        "fieldtwin_hub_gateway_up",
        "gauge",
        "1 if the gateway's link is up (frames within the silence limit, no death), else 0.",
        ((_labels(gateway=gw), 1 if up else 0) for gw, up, _ in links),
    )
    family(
        "fieldtwin_hub_gateway_last_frame_age_seconds",
        "gauge",
        "Seconds since the last frame from the gateway (-1: never).",
        ((_labels(gateway=gw), round(age, 3)) for gw, _, age in links),
    )
    family(
        "fieldtwin_hub_mqtt_connected",
        "gauge",
        "1 while the hub is connected to the broker.",
        [("", 1 if metrics.mqtt_connected else 0)],
    )
    family(
        "fieldtwin_hub_drift_checks_total",
        "counter",
        "Drift evaluations run.",
        [("", metrics.drift_checks)],
    )
    family(
        "fieldtwin_hub_commands_in_flight",
        "gauge",
        "Commands not yet settled, by state.",
        (
            (_labels(state=state), (commands_by_state or {}).get(state, 0))
            for state in ("awaiting_approval", "approved", "sent", "executed", "rolling_back")
        ),
    )
    family(
        "fieldtwin_hub_operator_requests_total",
        "counter",
        "Operator actions accepted (signed, verified, authorised), by operation.",
        ((_labels(op=op), n) for op, n in sorted(metrics.operator_requests.items())),
    )
    family(
        "fieldtwin_hub_operator_refused_total",
        "counter",
        "Operator requests refused, by reason.",
        ((_labels(code=code), n) for code, n in sorted(metrics.operator_refused.items())),
    )
    family(
        "fieldtwin_hub_ingest_paused_total",
        "counter",
        "Times the hub stopped reading from the broker because its ingest queue was full.",
        [("", metrics.ingest_paused)],
    )
    family(
        "fieldtwin_hub_uptime_seconds",
        "gauge",
        "Seconds since the hub started.",
        [("", round(time.time() - metrics.started_s, 3))],
    )
    return "\n".join(lines) + "\n"
