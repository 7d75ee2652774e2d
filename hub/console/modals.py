"""Modals: every action that changes the plant asks here first, on a frozen snapshot.

What a modal shows is copied when it opens and never updated while it is open, so the
operator confirms exactly what they read; the approve modal returns nothing but a yes,
and the caller signs the digest of the very row the modal showed
(``OperatorClient.approval_for``). Focus starts on Cancel for approve, reject, shelve and
cancel; Escape always cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static
from textual.widgets.button import ButtonVariant

from fieldtwin.hub.console import fmt
from fieldtwin.hub.console.model import Attr, AttrSpec
from fieldtwin.hub.opclient import OperatorError
from fieldtwin.hub.render import cell, check_text


def policy_text(checks: Sequence[Mapping[str, Any]]) -> Text:
    text = Text()
    for check in checks:
        ok = bool(check.get("ok"))
        text.append("  ✔ ok   " if ok else "  ✖ FAIL ", style="green" if ok else "bold red")
        text.append(f"{check_text(dict(check))}\n")
    return text


def prediction_text(prediction: Any) -> Text | None:
    """The predicted effect of a command (``cmd.dry_run`` may carry one), when present."""
    if not prediction:
        return None
    text = Text("predicted effect\n", style="bold")
    if isinstance(prediction, Mapping):
        for key, value in prediction.items():
            if isinstance(value, Mapping):
                inner = ", ".join(f"{k} {cell(v)}" for k, v in value.items())
                text.append(f"  {key}: {inner}\n")
            else:
                text.append(f"  {key}: {cell(value)}\n")
    else:
        text.append(f"  {prediction}\n")
    return text


class _Modal(ModalScreen[Any]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    _Modal { align: center middle; }
    _Modal > Vertical {
        width: 90%; max-width: 100; height: auto; max-height: 95%;
        border: thick $accent; background: $surface; padding: 0 1;
    }
    _Modal .title { text-style: bold; width: 100%; }
    _Modal VerticalScroll { height: auto; max-height: 10; }
    _Modal #verdict-box { max-height: 8; }
    _Modal .buttons { height: 1; align-horizontal: right; margin-top: 1; }
    _Modal Button { margin-left: 2; min-width: 12; }
    _Modal .field { height: 1; }
    _Modal .field Label { width: 10; }
    _Modal .field Input { width: 1fr; }
    _Modal .error { color: $error; height: auto; }
    _Modal #help VerticalScroll { max-height: 40; }
    """

    def action_cancel(self) -> None:
        self.dismiss(None)


class ApproveModal(_Modal):
    """Approve one command, as shown: target, restore point, proposer, policy verdict."""

    def __init__(self, command: Mapping[str, Any], live: Attr | None, operator: str) -> None:
        super().__init__()
        self.command = dict(command)  # frozen: what the operator approves
        self.live = live
        self.operator = operator

    def compose(self) -> ComposeResult:
        c = self.command
        checkpoint = c.get("checkpoint") or {}
        body = Text()
        body.append(f"{c['entity']}.{c['attribute']}", style="bold")
        body.append(f"  on {c.get('gateway') or '-'}\n")
        body.append("  now      ")
        body.append(
            cell(self.live.value) if self.live else "-",
            style="bold",
        )
        body.append(f"  ({self.live.quality})\n" if self.live else "\n")
        body.append("  set to   ")
        body.append(f"{cell(c['value'])}\n", style="bold cyan")
        body.append(f"  restore  {cell(checkpoint.get('value'))} (checkpoint)\n")
        body.append(f"  proposed by {c['proposed_by']}: {c.get('reason') or '-'}\n")
        approvals = c.get("approvals") or []
        names = ", ".join(a.get("operator", "?") for a in approvals) or "none yet"
        body.append(f"  approvals {len(approvals)}/{c.get('approvals_required')}: {names}")
        if c.get("two_person"):
            body.append("  (two-person rule)")
        body.append(f"\n  digest {fmt.short_hash(c.get('digest'), 32)}…\n")
        if c.get("rollback_of"):
            body.append(f"  rolls back {c['rollback_of']}\n", style="yellow")
        body.append("policy\n", style="bold")
        body.append_text(policy_text(c.get("policy") or []))
        prediction = prediction_text(c.get("prediction"))
        if prediction is not None:
            body.append_text(prediction)
        elif c.get("prediction_unavailable"):
            body.append(f"no predicted effect: {c['prediction_unavailable']}\n", style="dim")
        if c.get("two_person") and c.get("proposed_by") == self.operator:
            body.append(
                "You proposed this command: under the two-person rule your approval does "
                "not count.\n",
                style="bold yellow",
            )
        with Vertical():
            yield Label(f"Approve {c['id']}?", classes="title")
            body.rstrip()
            with VerticalScroll():
                yield Static(body)
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", variant="primary", compact=True)
                yield Button("Approve", id="approve", variant="warning", compact=True)

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#approve")
    def _approve(self) -> None:
        self.dismiss(True)


class ReasonModal(_Modal):
    """An action that needs a reason (and for shelving, a duration)."""

    def __init__(
        self,
        title: str,
        body: Text | str,
        action: str,
        *,
        reason: str = "",
        duration: str | None = None,
        focus_cancel: bool = True,
        variant: ButtonVariant = "warning",
    ) -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.action_label = action
        self.reason = reason
        self.duration = duration
        self.focus_cancel = focus_cancel
        self.variant = variant

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            body = Text(self.body) if isinstance(self.body, str) else self.body.copy()
            body.rstrip()
            yield Static(body)
            if self.duration is not None:
                with Horizontal(classes="field"):
                    yield Label("duration")
                    yield Input(
                        self.duration, id="duration", compact=True, placeholder="e.g. 30m, 2h"
                    )
            with Horizontal(classes="field"):
                yield Label("reason")
                yield Input(
                    self.reason, id="reason", placeholder="why (required, audited)", compact=True
                )
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", variant="primary", compact=True)
                yield Button(
                    self.action_label,
                    id="ok",
                    variant=self.variant,
                    compact=True,
                )

    def on_mount(self) -> None:
        if self.focus_cancel:
            self.query_one("#cancel", Button).focus()
        else:
            self.query_one("#reason", Input).focus()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        reason = self.query_one("#reason", Input).value.strip()
        if not reason:
            self.query_one("#error", Label).update("a reason is required")
            self.query_one("#reason", Input).focus()
            return
        result: dict[str, str] = {"reason": reason}
        if self.duration is not None:
            duration = self.query_one("#duration", Input).value.strip()
            if not duration:
                self.query_one("#error", Label).update("a duration is required")
                return
            result["duration"] = duration
        self.dismiss(result)


class ProposeModal(_Modal):
    """Propose a change to a writable attribute: limits, current value, and the policy's
    dry-run verdict for the value typed, before anything is submitted."""

    DRY_RUN_DELAY_S = 0.3

    def __init__(
        self,
        entity: str,
        attribute: str,
        spec: AttrSpec | None,
        current: Attr | None,
        unit: str,
        dry_run: Any,
    ) -> None:
        super().__init__()
        self.entity = entity
        self.attribute = attribute
        self.spec = spec
        self.current = current
        self.unit = unit
        self._dry_run = dry_run
        self.verdict: Mapping[str, Any] | None = None
        self.checked_value: Any = None
        self._pending: asyncio.TimerHandle | None = None

    def compose(self) -> ComposeResult:
        body = Text()
        body.append(f"{self.entity}.{self.attribute}\n", style="bold")
        current = self.current
        body.append("  now     ")
        body.append(fmt.value(current.value, self.unit) if current else "-", style="bold")
        body.append(f"  ({current.quality})\n" if current else "\n")
        body.append(f"  limits  {fmt.limits(self.spec)}\n")
        if self.spec is not None and self.spec.approvals is not None:
            body.append(
                f"  needs {self.spec.approvals} approval(s)"
                + (" from someone else (two-person rule)" if self.spec.two_person else "")
                + "\n"
            )
        with Vertical():
            yield Label("Propose a change", classes="title")
            body.rstrip()
            yield Static(body)
            with Horizontal(classes="field"):
                yield Label("new value")
                yield Input(id="value", placeholder="e.g. 1200, true, text", compact=True)
            with Horizontal(classes="field"):
                yield Label("reason")
                yield Input(id="reason", placeholder="why (required, audited)", compact=True)
            with VerticalScroll(id="verdict-box"):
                yield Static("type a value: the policy is checked before you submit", id="verdict")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", variant="primary", compact=True)
                yield Button("Propose", id="ok", variant="warning", disabled=True, compact=True)

    def on_mount(self) -> None:
        self.query_one("#value", Input).focus()

    def parsed(self) -> Any:
        raw = self.query_one("#value", Input).value.strip()
        if not raw:
            return None
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        try:
            number = float(raw)
        except ValueError:
            return raw
        return int(number) if number.is_integer() and "." not in raw else number

    @on(Input.Changed, "#value")
    def _value_changed(self) -> None:
        self.query_one("#ok", Button).disabled = True
        self.verdict = None
        self.run_worker(self._check(), exclusive=True, group="dry-run")

    async def _check(self) -> None:
        await asyncio.sleep(self.DRY_RUN_DELAY_S)  # debounce typing
        value = self.parsed()
        verdict_view = self.query_one("#verdict", Static)
        if value is None:
            verdict_view.update("type a value: the policy is checked before you submit")
            return
        verdict_view.update("checking …")
        try:
            result = await self._dry_run(self.entity, self.attribute, value)
        except OperatorError as exc:
            verdict_view.update(Text(f"dry run failed: {exc}", style="bold red"))
            return
        self.verdict = result
        self.checked_value = value
        text = Text()
        allowed = bool(result.get("allowed"))
        text.append(
            "ALLOWED" if allowed else "REFUSED",
            style="bold green" if allowed else "bold white on red",
        )
        text.append(f"  {self.entity}.{self.attribute} := {cell(value)}\n")
        text.append_text(policy_text(result.get("policy") or []))
        checkpoint = result.get("checkpoint")
        if checkpoint:
            text.append(f"  restore point {cell(checkpoint.get('value'))}\n")
        prediction = prediction_text(result.get("prediction"))
        if prediction is not None:
            text.append_text(prediction)
        verdict_view.update(text)
        self.query_one("#ok", Button).disabled = not allowed

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#reason")
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        if self.query_one("#ok", Button).disabled:
            return
        reason = self.query_one("#reason", Input).value.strip()
        value = self.parsed()
        if not reason:
            self.query_one("#verdict", Static).update(
                Text("a reason is required (it is audited)", style="bold red")
            )
            self.query_one("#reason", Input).focus()
            return
        if value != self.checked_value or self.verdict is None:
            return
        self.dismiss({"value": value, "reason": reason})


class HelpModal(_Modal):
    """``?``: the keys that work here (from the live bindings) and how to poke the plant."""

    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("question_mark", "cancel", "Close", show=False),
    ]

    def __init__(
        self, sections: Sequence[tuple[str, Sequence[tuple[str, str]]]], hints: Sequence[str]
    ) -> None:
        super().__init__()
        self.sections = list(sections)
        self.hints = list(hints)

    def compose(self) -> ComposeResult:
        text = Text()
        sections = list(self.sections)

        def section(title: str, rows: Sequence[tuple[str, str]]) -> None:
            if not rows:
                return
            text.append(f"{title}\n", style="bold underline")
            for key, description in rows:
                text.append(f"  {key:<12}", style="bold")
                text.append(f"{description}\n")

        if sections:
            section(*sections[0])
        if self.hints:
            text.append("This plant\n", style="bold underline")
            for hint in self.hints:
                text.append(f"{hint}\n", style="bold" if hint.startswith(" ") else "")
        for title, rows in sections[1:]:
            section(title, rows)
        with Vertical(id="help"):
            yield Label("Help (Esc closes)", classes="title")
            with VerticalScroll():
                yield Static(text)
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close", variant="primary", compact=True)

    def on_mount(self) -> None:
        with contextlib.suppress(Exception):
            self.query_one("#close", Button).focus()

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)
