"""``fieldtwin cmd ...``: propose, approve and follow commands, as a signed operator.

Every action is a request signed with the operator's key and sent to the hub over the
broker (the operator channel), so it works from another machine than the hub's. The
hub checks the signature, the operator's role and the command policy, and audits it.

- ``cmd propose ENTITY.ATTRIBUTE VALUE --reason TEXT [--dry-run]``
- ``cmd list [--state STATE ...] [--all]``, ``cmd show ID`` (the timeline)
- ``cmd approve ID`` (signs the command's digest: what it writes and what it restores)
- ``cmd reject ID --reason TEXT``, ``cmd cancel ID --reason TEXT``

Identity: ``--profile FILE`` (or ``$FIELDTWIN_PROFILE``), else the hub config (``-c``,
or a demo's ``--state-dir``) for the broker and the hub's key, with ``--key FILE`` (or
``$FIELDTWIN_OPERATOR_KEY``) or ``--operator NAME`` for yours.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

from fieldtwin.hub.cli import _add_source, _config_path, _emit, add_identity

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    cmd = subparsers.add_parser(
        "cmd",
        help="propose, approve and follow commands to the plant (signed)",
        description=(
            "Commands to writable attributes: proposed by an operator, checked by the policy "
            "(limits, step, interlocks, gateway online), approved by approvers who sign with "
            "their own keys, sent, read back, verified against the twin and rolled back on "
            "failure. Every step is in the audit log. See docs/commands.md."
        ),
    )
    actions = cmd.add_subparsers(dest="cmd_command", metavar="ACTION", required=True)

    propose = actions.add_parser(
        "propose",
        help="propose writing VALUE to ENTITY.ATTRIBUTE",
        description="Propose a command; --dry-run shows the policy verdict and checkpoint only.",
    )
    propose.add_argument("target", help="ENTITY.ATTRIBUTE, e.g. pump-1.speed_sp")
    propose.add_argument("value", help="a number, true/false, or text")
    propose.add_argument("--reason", help="why (required unless --dry-run; it is audited)")
    propose.add_argument("--dry-run", action="store_true", help="only check; change nothing")
    _common(propose)
    propose.set_defaults(func=_propose)

    listing = actions.add_parser("list", help="commands, newest first")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        help="open, awaiting_approval, approved, sent, executed, verified, failed, rolled_back, "
        "rollback_failed, refused, rejected, cancelled, expired (repeatable; default: open)",
    )
    listing.add_argument("--all", action="store_true", help="every state")
    listing.add_argument("--limit", type=int, default=50, help="at most N (default 50)")
    _common(listing)
    listing.set_defaults(func=_list)

    show = actions.add_parser("show", help="one command with its timeline")
    show.add_argument("cmd_id", help="e.g. C-000012")
    _common(show)
    show.set_defaults(func=_show)

    approve = actions.add_parser(
        "approve",
        help="approve a command (signs its digest with your key)",
        description=(
            "Fetch the command, show it, check that the digest the hub shows is the digest of "
            "what it shows (point, value, restore value), sign it with your key and send the "
            "approval."
        ),
    )
    approve.add_argument("cmd_id")
    _common(approve)
    approve.set_defaults(func=_approve)

    for name, verb in (("reject", "reject"), ("cancel", "withdraw")):
        parser = actions.add_parser(name, help=f"{verb} a command that was not sent yet")
        parser.add_argument("cmd_id")
        parser.add_argument("--reason", required=True, help="why (audited)")
        _common(parser)
        parser.set_defaults(func=_decide, op=f"cmd.{name}")


def _common(parser: argparse.ArgumentParser) -> None:
    _add_source(parser)
    add_identity(parser)


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "on"):
        return True
    if lowered in ("false", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _client_call(args: argparse.Namespace, work: Any) -> Any:
    """Run ``work(client)`` on one connection; print refusals clearly."""
    from fieldtwin.hub.opclient import OperatorClient, OperatorError, profile_from

    async def run() -> Any:
        hub_config = None if args.profile is not None else _config_path(args)
        profile = profile_from(
            profile=args.profile,
            hub_config=hub_config,
            operator=args.operator,
            key=args.key,
            password_file=args.password_file,
            broker=args.broker,
        )
        if args.timeout is not None:
            profile = dataclasses.replace(profile, timeout_s=args.timeout)
        client = OperatorClient(profile)
        async with client.connected():
            return await work(client)

    try:
        return True, asyncio.run(run())
    except OperatorError as exc:
        print(f"fieldtwin: refused ({exc.code}): {exc}", file=sys.stderr)
        return False, None


def _propose(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import command_detail, verdict_text

    if not args.dry_run and not args.reason:
        print("fieldtwin: error: cmd propose needs --reason (or --dry-run)", file=sys.stderr)
        return EXIT_USAGE
    request = {"target": args.target, "value": parse_value(args.value)}

    async def work(client: Any) -> Any:
        if args.dry_run:
            return await client.request("cmd.dry_run", request)
        return await client.request("cmd.propose", {**request, "reason": args.reason})

    ok, result = _client_call(args, work)
    if not ok:
        return EXIT_FAILURE
    if args.dry_run:
        _emit(args, result, lambda: verdict_text(result))
        return EXIT_OK if result["allowed"] else EXIT_FAILURE
    _emit(args, result, lambda: command_detail(result))
    return EXIT_FAILURE if result["state"] == "refused" else EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import commands_table

    states = [] if args.all else (args.state or ["open"])

    async def work(client: Any) -> Any:
        return await client.request("cmd.list", {"states": states, "limit": args.limit})

    ok, result = _client_call(args, work)
    if not ok:
        return EXIT_FAILURE
    _emit(args, result, lambda: commands_table(result) if result else "no commands\n")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import command_detail

    async def work(client: Any) -> Any:
        return await client.request("cmd.show", {"cmd_id": args.cmd_id})

    ok, result = _client_call(args, work)
    if not ok:
        return EXIT_FAILURE
    _emit(args, result, lambda: command_detail(result))
    return EXIT_OK


def _approve(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import command_detail

    async def work(client: Any) -> Any:
        command = await client.request("cmd.show", {"cmd_id": args.cmd_id})
        approval = client.approval_for(command)
        await client.request("cmd.approve", approval)
        return await client.request("cmd.show", {"cmd_id": args.cmd_id})

    ok, result = _client_call(args, work)
    if not ok:
        return EXIT_FAILURE
    _emit(args, result, lambda: command_detail(result))
    return EXIT_OK


def _decide(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import command_detail

    async def work(client: Any) -> Any:
        return await client.request(args.op, {"cmd_id": args.cmd_id, "reason": args.reason})

    ok, result = _client_call(args, work)
    if not ok:
        return EXIT_FAILURE
    _emit(args, result, lambda: command_detail(result))
    return EXIT_OK
