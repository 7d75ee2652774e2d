"""How the console shows things: colour always paired with a symbol and a word.

Values follow hub/render.py (the CLI's formatting: 6 significant digits, ``-`` for
nothing, true/false); times are UTC like the CLI's (``14:02:11Z``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.text import Text

from fieldtwin.hub.render import cell

HEALTH_STYLE = {
    "healthy": ("✔", "green"),
    "degraded": ("▲", "bold yellow"),
    "stale": ("◷", "bold magenta"),
    "unknown": ("?", "dim"),
}
SEVERITY_STYLE = {"critical": ("✖", "bold red"), "warning": ("▲", "yellow")}
QUALITY_STYLE = {"good": "", "uncertain": "yellow", "bad": "bold red", "stale": "magenta"}
ALARM_STATE = {
    "active": ("ACTIVE", "bold"),
    "returned": ("RETURNED unacked", "bold"),
    "acknowledged": ("acked", "dim"),
    "shelved": ("shelved", "dim italic"),
}
COMMAND_STYLE = {
    "awaiting_approval": ("◇", "bold cyan"),
    "approved": ("◆", "cyan"),
    "sent": ("→", "cyan"),
    "executed": ("…", "cyan"),
    "failed": ("✖", "red"),
    "rolling_back": ("↺", "yellow"),
    "verified": ("✔", "green"),
    "rolled_back": ("↺", "yellow"),
    "rollback_failed": ("✖", "bold red"),
    "failed_final": ("✖", "bold red"),
    "refused": ("⊘", "red"),
    "rejected": ("⊘", "red"),
    "cancelled": ("⊘", "dim"),
    "expired": ("⌛", "dim"),
}


def health(word: str) -> Text:
    mark, style = HEALTH_STYLE.get(word, ("?", "dim"))
    return Text(f"{mark} {word}", style=style)


def severity(word: str) -> Text:
    mark, style = SEVERITY_STYLE.get(word, ("•", ""))
    return Text(f"{mark} {word}", style=style)


QUALITY_SHORT = {"uncertain": "uncert"}


def quality(word: str) -> Text:
    return Text(QUALITY_SHORT.get(word, word), style=QUALITY_STYLE.get(word, ""))


def value(raw: Any, unit: str = "") -> str:
    text = cell(raw)
    return f"{text} {unit}" if unit and raw is not None else text


def age(ts_ms: int | None, now_ms: int) -> str:
    """Compact age: 4s, 12m, 3h, 2d; ``-`` for never."""
    if not ts_ms:
        return "-"
    seconds = max(0, (now_ms - ts_ms) // 1000)
    if seconds < 100:
        return f"{seconds}s"
    if seconds < 6000:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def clock(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%H:%M:%SZ", time.gmtime(ms / 1000))


def stamp(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def link(row: Mapping[str, Any] | None, gateway: str) -> Text:
    if not gateway:
        return Text("-", style="dim")
    if row is None:
        return Text(f"? {gateway}", style="dim")
    if row["up"] and row["online"]:
        return Text(f"● {gateway}", style="green")
    if row["online"]:
        return Text(f"◌ {gateway} silent", style="bold yellow")
    return Text(f"✖ {gateway} DOWN", style="bold red")


def link_state(row: Mapping[str, Any] | None, gateway: str) -> Text:
    """The link of an entity's gateway in a word (the gateway has its own column)."""
    if not gateway:
        return Text("-", style="dim")
    if row is None:
        return Text("? never", style="dim")
    if row["up"] and row["online"]:
        return Text("● up", style="green")
    if row["online"]:
        return Text("◌ silent", style="bold yellow")
    return Text("✖ DOWN", style="bold red")


def link_word(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "never seen"
    if row["up"] and row["online"]:
        return "up"
    if row["online"]:
        return "silent"
    reason = f" ({row['death_reason']})" if row.get("death_reason") else ""
    return f"down{reason}"


def command_state(state: str, label: str | None = None) -> Text:
    mark, style = COMMAND_STYLE.get(state, ("•", ""))
    return Text(f"{mark} {label or state.replace('_', ' ')}", style=style)


def alarm_state(state: str) -> Text:
    word, style = ALARM_STATE.get(state, (state, ""))
    return Text(word, style=style)


def thresholds(spec: Any) -> str:
    """``L 0.5/0.2 H 4.2/4.7`` (warning/critical), or ``-``."""
    if spec is None:
        return "-"
    parts = []
    low = [v for v in (spec.low_warning, spec.low_critical) if v is not None]
    high = [v for v in (spec.high_warning, spec.high_critical) if v is not None]
    if low:
        parts.append("L " + "/".join(cell(v) for v in low))
    if high:
        parts.append("H " + "/".join(cell(v) for v in high))
    return " ".join(parts) or "-"


def limits(spec: Any) -> str:
    if spec is None:
        return "-"
    lo = "-" if spec.min is None else cell(spec.min)
    hi = "-" if spec.max is None else cell(spec.max)
    step = f", step ≤ {cell(spec.max_step)}" if spec.max_step is not None else ""
    return f"{lo} … {hi} {spec.unit}".rstrip() + step


def short_hash(digest: str | None, width: int = 16) -> str:
    return (digest or "-")[:width]
