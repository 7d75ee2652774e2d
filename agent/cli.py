"""``fieldtwin agent run | check | status`` (registered through the entry-point group).

Heavy modules (duckdb, pymodbus, asyncua, aiomqtt) are imported inside the handlers,
so ``fieldtwin --help`` stays fast.

Exit status: 0 success; 1 a failure (bad config, unreadable key, a check that failed);
3 from ``status`` when no agent is running on that config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOT_RUNNING = 3


def register(subparsers: Any) -> None:
    agent = subparsers.add_parser(
        "agent",
        help="run, check or inspect an edge agent",
        description=(
            "The edge agent reads devices (Modbus TCP/RTU, OPC-UA, serial line sensors), "
            "buffers every sample in a local DuckDB file and streams signed batches to the "
            "hub over MQTT. See docs/agent.md for the configuration reference."
        ),
    )
    actions = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-c", "--config", type=Path, required=True, help="agent config file (TOML)"
        )
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="override the config's state directory (buffer and status file)",
        )

    run = actions.add_parser(
        "run",
        help="run the agent until SIGTERM/SIGINT",
        description="Run the agent in the foreground (systemd: Type=notify with watchdog).",
    )
    common(run)
    run.set_defaults(func=_run)

    check = actions.add_parser(
        "check",
        help="commissioning check: read every point once and show how it decodes",
        description=(
            "Validate the config, load the keys, connect to each device, read each point "
            "once and print the raw registers and the value under each byte/word order "
            "(implausible values marked '!', the configured order '*'), then log in to the "
            "broker. Exits non-zero on any failure."
        ),
    )
    common(check)
    check.add_argument("--device", help="check only this device id")
    check.add_argument("--skip-broker", action="store_true", help="do not try the broker login")
    check.set_defaults(func=_check)

    status = actions.add_parser(
        "status",
        help="buffer depth, oldest unacknowledged sample, last publish, per-source statistics",
        description=(
            "Show what the running agent reports in its status file; if no agent is "
            "running, show what its buffer file still holds. Exit status 3 when not running."
        ),
    )
    common(status)
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.set_defaults(func=_status)


def _logs_to_stderr() -> None:
    """``check`` and ``status`` print tables on stdout; their log lines go to stderr."""
    import logging

    from fieldtwin.protocol import logfmt

    logfmt.configure(logging.getLogger().level, stream=sys.stderr)


def _load(args: argparse.Namespace) -> Any:
    from fieldtwin.agent.config import load_config

    return load_config(args.config, state_dir=args.state_dir)


def _run(args: argparse.Namespace) -> int:
    from fieldtwin.agent.footprint import tune_malloc

    tune_malloc()  # before the heavy imports and DuckDB allocate (agent/footprint.py)

    from fieldtwin.agent.errors import AgentError
    from fieldtwin.agent.runtime import Agent

    config = _load(args)

    async def main() -> int:
        return await Agent(config).run()

    try:
        return asyncio.run(main())
    except AgentError as exc:
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _check(args: argparse.Namespace) -> int:
    from fieldtwin.agent.check import run_check

    _logs_to_stderr()
    config = _load(args)
    return asyncio.run(
        run_check(config, sys.stdout, skip_broker=args.skip_broker, device=args.device)
    )


def _status(args: argparse.Namespace) -> int:
    from fieldtwin.agent.errors import OutboxError
    from fieldtwin.agent.outbox import read_summary
    from fieldtwin.agent.status import is_live, read_status, render_status

    _logs_to_stderr()
    config = _load(args)
    status = read_status(config.status_file)
    if status is not None and is_live(status):
        if args.json:
            print(json.dumps(status, indent=1, sort_keys=True))
        else:
            print(render_status(status, live=True))
        return EXIT_OK
    snapshot: dict[str, Any] = {"gateway": config.gateway, "running": False}
    if status is not None:
        snapshot.update(status)
        snapshot["running"] = False
    if config.buffer.path.exists():
        try:
            summary = read_summary(config.buffer.path)
        except OutboxError as exc:
            print(f"fieldtwin: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        snapshot["epoch"] = summary["epoch"]
        snapshot["buffer"] = {
            **summary,
            "max_samples": config.buffer.max_samples,
            "overflow": config.buffer.overflow,
        }
    if args.json:
        print(json.dumps(snapshot, indent=1, sort_keys=True))
    else:
        print(render_status(snapshot, live=False))
        if not config.buffer.path.exists():
            print(f"(no buffer file at {config.buffer.path})")
    return EXIT_NOT_RUNNING
