"""Plain-text rendering shared by the CLI, the demo and anything else that prints tables.

Columns are sized to their content; values are shown the same way everywhere (numbers
to 6 significant digits, ``-`` for nothing, true/false for booleans, ages as "4.2s ago").
Health is always a word next to a mark, so it reads without colour.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = ["  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(text.ljust(widths[i]) for i, text in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def age(ms: int | None, now_ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


HEALTH_MARK = {"healthy": "ok", "degraded": "!", "stale": "~", "unknown": "?"}


def entities_table(entities: Sequence[dict[str, Any]], now_ms: int) -> str:
    rows = []
    for entity in entities:
        attrs = entity["attributes"]
        health = entity["health"]
        first = True
        if not attrs:
            rows.append(
                [
                    entity["physical_id"],
                    entity["type"],
                    f"{HEALTH_MARK[health]} {health}",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            )
        for name, attr in sorted(attrs.items()):
            value = cell(attr["value"]) + (f" {attr['unit']}" if attr.get("unit") else "")
            rows.append(
                [
                    entity["physical_id"] if first else "",
                    entity["type"] if first else "",
                    f"{HEALTH_MARK[health]} {health}" if first else "",
                    name,
                    value,
                    attr["quality"],
                    age(attr["ts_ms"], now_ms),
                ]
            )
            first = False
    return render_table(
        ["entity", "type", "health", "attribute", "value", "quality", "updated"], rows
    )


def clock(ms: int | None) -> str:
    """A wall-clock time (UTC) to the second, or ``-``."""
    if not ms:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000))


ALARM_STATE_TEXT = {
    "active": "ACTIVE",
    "acknowledged": "acked",
    "returned": "RETURNED unacked",
    "shelved": "shelved",
    "cleared": "cleared",
}


def alarms_table(alarms: Sequence[dict[str, Any]]) -> str:
    """Alarms with their times: raised, acknowledged (by whom), shelved until (UTC)."""
    rows = [
        [
            a["id"],
            ALARM_STATE_TEXT.get(a["state"], a["state"]),
            a["severity"],
            a["entity"] + (f".{a['attribute']}" if a["attribute"] else ""),
            clock(a.get("raised_ms")),
            (
                f"{clock(a['acked_ms'])} {a.get('acked_by') or ''}".strip()
                if a.get("acked_ms")
                else "-"
            ),
            clock(a.get("shelved_until_ms")) if a["state"] == "shelved" else "-",
            a["description"],
        ]
        for a in alarms
    ]
    return render_table(
        ["id", "state", "severity", "subject", "raised", "acked", "shelved until", "description"],
        rows,
    )


COMMAND_STATE_TEXT = {
    "awaiting_approval": "awaiting approval",
    "failed_final": "FAILED",
    "rollback_failed": "ROLLBACK FAILED",
    "refused": "refused",
}


def commands_table(commands: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            c["id"],
            COMMAND_STATE_TEXT.get(c["state"], c["state"].replace("_", " ")),
            f"{c['entity']}.{c['attribute']}",
            cell(c["value"]),
            cell((c.get("checkpoint") or {}).get("value")),
            c["proposed_by"],
            f"{len(c.get('approvals', []))}/{c['approvals_required']}",
            clock(c.get("proposed_ms")),
            (c.get("outcome") or c.get("reason") or "")[:80],
        ]
        for c in commands
    ]
    return render_table(
        ["id", "state", "point", "target", "restore", "by", "approvals", "proposed", "note"], rows
    )


def command_detail(command: dict[str, Any]) -> str:
    """One command: what, who, the policy verdict, the checkpoint, then its timeline."""
    checkpoint = command.get("checkpoint") or {}
    lines = [
        f"command {command['id']}  {COMMAND_STATE_TEXT.get(command['state'], command['state'])}",
        f"  point       {command['entity']}.{command['attribute']} on gateway "
        f"{command['gateway'] or '-'}",
        f"  target      {cell(command['value'])}",
        f"  restore     {cell(checkpoint.get('value'))} (reported {checkpoint.get('ts') or '-'}, "
        f"twin {str(checkpoint.get('twin_hash') or '-')[:23]})",
        f"  proposed    {command.get('proposed')} by {command['proposed_by']} "
        f"({command['source']}): {command['reason']}",
        f"  approvals   {len(command.get('approvals', []))} of {command['approvals_required']}"
        + (" (two-person rule)" if command.get("two_person") else "")
        + "".join(f"; {a['operator']} at {a.get('at')}" for a in command.get("approvals", [])),
        f"  digest      {command['digest']}",
    ]
    if command.get("rollback_of"):
        lines.append(f"  rolls back  {command['rollback_of']}")
    if command.get("rollback_id"):
        lines.append(f"  rollback    {command['rollback_id']}")
    if command.get("outcome"):
        lines.append(f"  outcome     {command['outcome']}")
    lines.append("  policy")
    for check in command.get("policy", []):
        lines.append(f"    {'ok  ' if check['ok'] else 'FAIL'} {check_text(check)}")
    lines += prediction_lines(command)
    if command.get("timeline"):
        lines.append("  timeline")
        for event in command["timeline"]:
            who = event["actor"]
            mark = f" ({event['command']})" if event["command"] != command["id"] else ""
            extra = event["detail"].get("reason") or event["detail"].get("detail") or ""
            lines.append(
                f"    {event['at']}  {event['change']:<17} {event['before']} -> {event['after']}"
                f"  by {who}{mark}" + (f": {extra}" if extra else "")
            )
    return "\n".join(lines) + "\n"


def check_text(check: dict[str, Any]) -> str:
    """``name: text``, unless the text already names the check (interlocks do)."""
    text = str(check["text"])
    return text if text.startswith(str(check["check"])) else f"{check['check']}: {text}"


def verdict_text(result: dict[str, Any]) -> str:
    """A dry run: the verdict, each check, and the checkpoint."""
    head = "ALLOWED" if result["allowed"] else "REFUSED"
    lines = [
        f"{head}: {result['entity']}.{result['attribute']} := {cell(result['value'])} "
        f"(gateway {result.get('gateway') or '-'})"
    ]
    for check in result["policy"]:
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'} {check_text(check)}")
    checkpoint = result.get("checkpoint")
    if checkpoint:
        lines.append(
            f"  restore point: {cell(checkpoint['value'])} reported {checkpoint['ts']}, twin "
            f"{checkpoint['twin_hash'][:23]}"
        )
    if result.get("approvals_required") is not None:
        lines.append(
            f"  needs {result['approvals_required']} approval(s)"
            + (" from someone other than the proposer" if result.get("two_person") else "")
        )
    lines += prediction_lines(result)
    return "\n".join(lines) + "\n"


def prediction_lines(result: dict[str, Any]) -> list[str]:
    """The predicted effect a dry run or a pending command carries (docs/prediction.md)."""
    prediction = result.get("prediction")
    lines: list[str] = []
    if prediction:
        lines.append("  predicted effect (learned models; nothing sent):")
        for point, facts in prediction.items():
            shown = ", ".join(f"{k} {v}" for k, v in facts.items() if k != "crosses")
            lines.append(f"    {point}: {shown}")
            if facts.get("crosses"):
                lines.append(f"      would cross {facts['crosses']}")
    elif result.get("prediction_unavailable"):
        lines.append(f"  no predicted effect: {result['prediction_unavailable']}")
    return lines
