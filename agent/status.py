"""How ``fieldtwin agent status`` sees a running agent: a status file.

A DuckDB file has one writing process and nobody else may open it meanwhile, so the
running agent writes ``status.json`` into its state directory every
``[status] interval_s`` seconds (write to a temporary file, fsync, rename: a reader
never sees half a file). ``agent status`` reads it; if the file is missing, stale or
its process is gone, it says the agent is not running and, the buffer being free,
reads the buffer file itself (read-only) to show what is still queued.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FORMAT = 1


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``status`` as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(status, indent=1, sort_keys=True, default=str).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == STATUS_FORMAT else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user (systemd DynamicUser)
    return True


def is_live(status: dict[str, Any], now_ms: int | None = None) -> bool:
    """Written recently by a process that still exists."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    interval_ms = float(status.get("interval_s", 5)) * 1000
    age = now - int(status.get("written_at_ms", 0))
    pid = int(status.get("pid", 0))
    if status.get("state") == "stopped":
        return False
    return pid > 0 and age <= 3 * interval_ms + 5000 and process_alive(pid)


# -- rendering ---------------------------------------------------------------------------


def _when(ms: int | None, now_ms: int) -> str:
    if not ms:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"
    return f"{stamp} ({_ago(now_ms - ms)})"


def _ago(delta_ms: int) -> str:
    seconds = max(0, delta_ms) / 1000
    if seconds < 120:
        return f"{seconds:.1f} s ago" if seconds < 10 else f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _acks_line(uplink: dict[str, Any], buffer: dict[str, Any], now: int) -> str:
    """Whether a hub acknowledges what this agent sends, and since when it does not."""
    since = uplink.get("no_ack_since_ms")
    last = uplink.get("last_ack_ms")
    if since:
        every = uplink.get("resend_interval_s") or 0
        return (
            f"acks     NO HUB HAS ACKNOWLEDGED since {_when(since, now)}; "
            f"{int(buffer.get('frames', 0)):,} frames waiting, resent after "
            f"{every:.0f} s without an ack (backing off)"
        )
    if last:
        return f"acks     last ack from the hub {_when(last, now)}"
    return "acks     no ack from a hub yet"


def render_status(status: dict[str, Any], *, live: bool, now_ms: int | None = None) -> str:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    lines: list[str] = []
    gateway = status.get("gateway", "?")
    if live:
        up = _ago(now - int(status.get("started_at_ms", now))).replace(" ago", "")
        age = _ago(now - int(status.get("written_at_ms", now)))
        lines.append(f"agent    running, pid {status.get('pid')}, up {up} (status written {age})")
    else:
        lines.append("agent    NOT RUNNING (figures below are from the buffer file)")
    lines.append(f"gateway  {gateway}   epoch {status.get('epoch', '-')}")
    uplink = status.get("uplink") or {}
    if uplink:
        if uplink.get("connected"):
            broker = f"connected to {status.get('broker_url', '?')} since " + _when(
                uplink.get("last_connect_ms"), now
            )
        else:
            broker = f"DISCONNECTED from {status.get('broker_url', '?')}"
            if uplink.get("last_error"):
                broker += f": {uplink['last_error']}"
        hub = {True: "online", False: "OFFLINE", None: "unknown"}[uplink.get("hub_online")]
        lines.append(f"broker   {broker}")
        lines.append(
            f"hub      {hub}"
            + (f" (instance {uplink['hub_instance']})" if uplink.get("hub_instance") else "")
        )
    buffer = status.get("buffer") or {}
    lines.append(
        f"buffer   {buffer.get('samples', 0):,} samples in {buffer.get('frames', 0):,} "
        f"frame{'' if buffer.get('frames', 0) == 1 else 's'} "
        f"({_size(int(buffer.get('bytes', 0)))}) waiting for the hub's ack; cap "
        f"{int(buffer.get('max_samples', 0)):,} samples, policy {buffer.get('overflow', '?')}"
    )
    lines.append(f"oldest   unacknowledged sample {_when(buffer.get('oldest_ts_ms'), now)}")
    counters = buffer.get("counters") or {}
    dropped = int(counters.get("dropped_samples", buffer.get("dropped_samples", 0)))
    if dropped or counters.get("quarantined"):
        lines.append(
            f"ALARM    {dropped:,} samples dropped by the overflow policy; "
            f"{counters.get('quarantined', 0)} corrupt buffer(s) quarantined"
        )
    if uplink:
        lines.append(
            f"publish  last {_when(uplink.get('last_publish_ms'), now)}; "
            f"{uplink.get('published_frames', 0):,} frames, "
            f"{uplink.get('published_samples', 0):,} samples, "
            f"{uplink.get('backlog_frames', 0):,} from backlog, "
            f"{uplink.get('resent_frames', 0):,} resent"
        )
        lines.append(_acks_line(uplink, buffer, now))
    implausible = status.get("implausible_points") or {}
    if implausible:
        worst = sorted(implausible.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {count:,}" for name, count in worst[:5])
        more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        lines.append(
            f"WARNING  readings outside their valid range: {shown}{more} "
            "(sent as out_of_range quality; `fieldtwin agent check` shows the byte orders)"
        )
    if status.get("gateway_id_conflict_suspected"):
        lines.append(
            "ALARM    the broker keeps ending this gateway's connections: probably another "
            f"agent is running with gateway id {gateway!r}"
        )
    metrics = status.get("metrics_url")
    if metrics:
        lines.append(f"metrics  {metrics}")
    sources = status.get("sources") or {}
    if sources:
        lines.append("")
        header = (
            f"{'SOURCE':<16} {'PROTOCOL':<12} {'POINTS':>6} {'LATENCY':>9} {'SUCCESS':>8}  "
            f"{'LAST SUCCESS':<32} {'LAST FAILURE':<32} LAST ERROR"
        )
        lines.append(header)
        for name, source in sources.items():
            ratio = source.get("success_ratio")
            latency = source.get("latency_ms_avg")
            lines.append(
                f"{name:<16} {source.get('protocol', ''):<12} {source.get('points', 0):>6} "
                f"{(f'{latency:.1f} ms' if latency else '-'):>9} "
                f"{(f'{100 * ratio:.1f}%' if ratio is not None else '-'):>8}  "
                f"{_when(source.get('last_success_ms'), now):<32} "
                f"{_when(source.get('last_failure_ms'), now):<32} "
                f"{source.get('last_error', '')[:80]}"
            )
    return "\n".join(lines)
