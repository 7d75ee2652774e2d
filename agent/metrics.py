"""The agent's counters as Prometheus text, on an optional loopback endpoint.

``render`` is pure: it turns the same status dictionary the status file carries
(``Agent.status``) into the text exposition format 0.0.4, so ``agent status`` and a
scrape never disagree. ``MetricsServer`` serves it with aiohttp on ``GET /metrics``;
it is started only when the config has ``[metrics] listen``, and aiohttp is imported
only then (a gateway without it pays nothing).

The endpoint binds a loopback address only: it has no authentication, and a local
Prometheus agent, node_exporter's textfile-free setups or Telegraf's
``inputs.prometheus`` scrape it on the gateway itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fieldtwin.protocol.logfmt import fields

log = logging.getLogger("fieldtwin.agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float | int | bool | None]],
    ) -> None:
        rows = [(labels, value) for labels, value in samples if value is not None]
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | int | bool | None) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(status: Mapping[str, Any], *, now_ms: int) -> str:
    """The Prometheus page for one status dictionary (``Agent.status``)."""
    page = _Page()
    p = "fieldtwin_agent_"
    gateway = str(status.get("gateway", ""))
    page.family(
        p + "info",
        "gauge",
        "Always 1; the labels name the gateway, its buffer epoch and the agent version.",
        [
            (
                {
                    "gateway": gateway,
                    "epoch": str(status.get("epoch", "")),
                    "version": str(status.get("version", "")),
                },
                1,
            )
        ],
    )
    started = status.get("started_at_ms")
    page.one(
        p + "uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        None if started is None else round((now_ms - int(started)) / 1000, 3),
    )

    buffer = status.get("buffer", {})
    counters = buffer.get("counters", {})
    page.one(
        p + "buffer_samples",
        "gauge",
        "Samples stored in the buffer and not yet acknowledged by the hub.",
        buffer.get("samples"),
    )
    page.one(p + "buffer_frames", "gauge", "Frames held in the buffer.", buffer.get("frames"))
    page.one(
        p + "buffer_bytes", "gauge", "Bytes of frames held in the buffer.", buffer.get("bytes")
    )
    page.one(
        p + "buffer_capacity_samples",
        "gauge",
        "The buffer's cap in samples (buffer.max_samples).",
        buffer.get("max_samples"),
    )
    oldest = buffer.get("oldest_ts_ms")
    page.one(
        p + "buffer_oldest_age_seconds",
        "gauge",
        "Age of the oldest unacknowledged sample's source time (0 when the buffer is empty).",
        0 if oldest is None else round(max(0, now_ms - int(oldest)) / 1000, 3),
    )
    page.one(
        p + "buffer_pending_in_memory_samples",
        "gauge",
        "Samples read but not yet committed to the buffer.",
        buffer.get("pending_in_memory"),
    )
    page.one(
        p + "overflow_dropped_samples_total",
        "counter",
        "Samples dropped by the buffer's overflow policy (survives restarts).",
        counters.get("dropped_samples"),
    )
    page.one(
        p + "overflow_dropped_frames_total",
        "counter",
        "Frames dropped by the buffer's overflow policy (survives restarts).",
        counters.get("dropped_frames"),
    )
    page.one(
        p + "overflow_events_total",
        "counter",
        "Times the buffer was full (survives restarts).",
        counters.get("overflow_events"),
    )
    page.one(
        p + "memory_dropped_samples_total",
        "counter",
        "Samples dropped from memory because the buffer could not be written.",
        buffer.get("dropped_in_memory"),
    )
    page.one(
        p + "buffer_commit_failures_total",
        "counter",
        "Buffer transactions that failed (full disk, I/O error).",
        counters.get("commit_failures"),
    )
    page.one(
        p + "buffer_reopens_total",
        "counter",
        "Times the buffer's connection was closed and opened again to hand back memory.",
        counters.get("reopens"),
    )
    page.one(
        p + "buffer_reopen_failures_total",
        "counter",
        "Buffer reopens that failed (retried on the next write).",
        counters.get("reopen_failures"),
    )
    page.one(
        p + "committed_frames_total",
        "counter",
        "Frames committed to the buffer since start.",
        counters.get("committed_frames"),
    )

    uplink = status.get("uplink", {})
    page.one(
        p + "broker_connected",
        "gauge",
        "1 while connected to the MQTT broker.",
        bool(uplink.get("connected")),
    )
    page.one(
        p + "broker_connects_total",
        "counter",
        "Successful broker connections.",
        uplink.get("connects"),
    )
    page.one(
        p + "broker_connect_failures_total",
        "counter",
        "Failed broker connection attempts.",
        uplink.get("connect_failures"),
    )
    hub_online = uplink.get("hub_online")
    page.one(
        p + "hub_online",
        "gauge",
        "1 if the hub's retained state says online, 0 if offline (absent until known).",
        None if hub_online is None else bool(hub_online),
    )
    page.one(
        p + "frames_published_total",
        "counter",
        "Frames published (QoS 1 acknowledged by the broker), births and resends included.",
        uplink.get("published_frames"),
    )
    page.one(
        p + "samples_published_total",
        "counter",
        "Samples in published data frames.",
        uplink.get("published_samples"),
    )
    page.one(
        p + "backlog_frames_published_total",
        "counter",
        "Frames published from the backlog lane.",
        uplink.get("backlog_frames"),
    )
    page.one(
        p + "frames_resent_total",
        "counter",
        "Frames published again (rebirth, hub back online, ack timeout).",
        uplink.get("resent_frames"),
    )
    page.one(
        p + "frames_acked_total",
        "counter",
        "Frames the hub's signed acks removed from the buffer.",
        uplink.get("acked_frames"),
    )
    page.one(p + "acks_received_total", "counter", "Verified ack frames.", uplink.get("acks"))
    page.one(p + "births_total", "counter", "Births published.", uplink.get("births"))
    page.one(
        p + "rebirths_total",
        "counter",
        "Rebirth requests from the hub that were honoured.",
        uplink.get("rebirths"),
    )
    last_publish = uplink.get("last_publish_ms")
    page.one(
        p + "last_publish_timestamp_seconds",
        "gauge",
        "Wall-clock time of the last publish (absent before the first).",
        None if last_publish is None else round(int(last_publish) / 1000, 3),
    )
    page.family(
        p + "downlink_rejected_total",
        "counter",
        "Downlink frames refused, by reason.",
        (({"reason": reason}, n) for reason, n in sorted(uplink.get("rejected", {}).items())),
    )

    sampler = status.get("sampler", {})
    page.one(
        p + "readings_total",
        "counter",
        "Readings the drivers handed to the sampler.",
        sampler.get("offered"),
    )
    page.one(
        p + "samples_reported_total",
        "counter",
        "Samples the sampler reported (changes, heartbeats, quality changes).",
        sampler.get("reported"),
    )
    page.one(
        p + "stale_samples_total",
        "counter",
        "Samples reported STALE.",
        sampler.get("stale"),
    )
    page.one(p + "bad_samples_total", "counter", "Samples reported BAD.", sampler.get("bad"))
    page.family(
        p + "implausible_values_total",
        "counter",
        "Readings outside their point's valid range (valid_min/valid_max), by device.",
        (
            ({"device": device}, n)
            for device, n in sorted(status.get("implausible_by_device", {}).items())
        ),
    )

    sources = status.get("sources", {})
    rows = sorted(sources.items())

    def per_source(key: str, scale: float = 1.0) -> Iterable[tuple[dict[str, str], Any]]:
        for device, source in rows:
            value = source.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and scale != 1.0:
                value = round(value * scale, 6)
            yield {"device": device, "protocol": str(source.get("protocol", ""))}, value

    page.family(
        p + "source_requests_total",
        "counter",
        "Requests (polls, reads, lines) to each source.",
        per_source("requests"),
    )
    page.family(
        p + "source_failures_total",
        "counter",
        "Requests that failed (timeouts, refusals, lost connections).",
        per_source("failures"),
    )
    page.family(
        p + "source_success_ratio",
        "gauge",
        "Share of requests that succeeded since start (absent before the first).",
        per_source("success_ratio"),
    )
    page.family(
        p + "source_latency_seconds",
        "gauge",
        "Reply time, exponentially weighted average (weight 0.1 per reply).",
        per_source("latency_ms_avg", 0.001),
    )
    page.family(
        p + "source_latency_max_seconds",
        "gauge",
        "Longest reply time since start.",
        per_source("latency_ms_max", 0.001),
    )
    page.family(
        p + "source_connected",
        "gauge",
        "1 while the agent holds a connection (or open port) to the source.",
        ((labels, bool(value)) for labels, value in per_source("connected")),
    )
    page.family(
        p + "commands_total",
        "counter",
        "Commands from the hub by outcome.",
        (({"outcome": k}, n) for k, n in sorted(status.get("commands", {}).items())),
    )
    suspected = status.get("gateway_id_conflict_suspected")
    page.one(
        p + "gateway_id_conflict_suspected",
        "gauge",
        "1 while the broker keeps ending our sessions the way it does when a second agent "
        "uses this gateway id (see the gateway_id_conflict log line).",
        None if suspected is None else bool(suspected),
    )
    return page.text()


StatusSource = Callable[[], Awaitable[Mapping[str, Any]]]


class MetricsServer:
    """``GET /metrics`` on a loopback address, served by aiohttp."""

    def __init__(self, host: str, port: int, status: StatusSource, clock: Callable[[], int]):
        self.host = host
        self.port = port
        self._status = status
        self._clock = clock
        self._runner: Any = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen on {self.host}:{self.port} for metrics: {exc}") from exc
        self._runner = runner
        addresses = runner.addresses
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        log.info(
            "metrics endpoint listening",
            extra=fields(url=f"http://{self.host}:{self.bound_port}/metrics"),
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _index(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="fieldtwin agent: see /metrics\n")

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        try:
            status = await self._status()
        except Exception as exc:  # the buffer worker is stuck or closing
            log.warning("metrics scrape failed", extra=fields(error=str(exc)))
            return web.Response(status=503, text=f"status unavailable: {exc}\n")
        body = render(status, now_ms=self._clock())
        return web.Response(body=body.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})
