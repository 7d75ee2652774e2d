"""``fieldtwin sim``: run a scenario, inject faults into a running one, read its truth.

The fault, truth and status commands find the running simulator through ``--control
HOST:PORT``, which defaults to ``$FIELDTWIN_SIM_CONTROL`` and then to 127.0.0.1:17100
(the water-plant scenario's control address). A simulator started with ``--ephemeral``
prints its actual control address in the endpoints (``control`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fieldtwin.sim.errors import SimError
from fieldtwin.sim.faults import KINDS

EXIT_OK = 0
EXIT_FAILURE = 1
DEFAULT_CONTROL = "127.0.0.1:17100"

_PARAM_FLAGS = {
    "value": (
        "--value",
        float,
        "stuck: value to report (default: the last value); "
        "wrong_value: the value the actuator goes to",
    ),
    "rate": ("--rate", float, "drift: bias growth per simulated second (default 0.01)"),
    "offset": (
        "--offset",
        float,
        "drift: bias from the first tick (default 0); "
        "wrong_value: the actuator goes to the written value plus this",
    ),
    "magnitude": ("--magnitude", float, "spike: added to the value (default 10)"),
    "sigma": ("--sigma", float, "noise: standard deviation of the extra noise (default 1)"),
    "delay_ms": ("--delay-ms", float, "slow: wall-clock delay per answer (default 2000)"),
    "probability": ("--probability", float, "corrupt: share of frames corrupted (default 1)"),
    "code": ("--code", int, "exception: Modbus exception code (default 4)"),
    "status": ("--status", str, "bad_status: OPC-UA status name (default BadSensorFailure)"),
    "count": (
        "--count",
        int,
        "ignore_writes, wrong_value: only the first COUNT writes (default: every write)",
    ),
    "cv": ("--cv", float, "leak: leak flow in m3/h per sqrt(m) of level (default 2)"),
    "efficiency": (
        "--efficiency",
        float,
        "fouling: share of heater power reaching the water, 0-1 (default 0.5)",
    ),
}


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="hardware simulator: devices over Modbus TCP/RTU, serial and OPC-UA",
        description=(
            "Simulate a plant with physics and serve its devices over real protocols "
            "(Modbus TCP, Modbus RTU and a line-protocol sensor on pseudo-terminals, OPC-UA), "
            "with scheduled and injectable faults and a ground-truth record."
        ),
    )
    actions = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        help="run a scenario until Ctrl+C",
        description=(
            "Start every device of SCENARIO and print its endpoints (a table, or one JSON "
            "line with --json once every server listens; logs go to stderr). Runs until "
            "SIGINT/SIGTERM, then shuts down cleanly and closes the ground-truth file."
        ),
    )
    run.add_argument(
        "scenario", type=Path, help="scenario file, e.g. examples/scenarios/water-plant.toml"
    )
    run.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per wall second (default 1)"
    )
    run.add_argument("--seed", type=int, default=None, help="random seed (default: the scenario's)")
    run.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    run.add_argument(
        "--ephemeral",
        action="store_true",
        help="use free ports and put pty symlinks in a fresh temporary folder",
    )
    truth = run.add_mutually_exclusive_group()
    truth.add_argument(
        "--truth", type=Path, default=None, help="ground-truth DuckDB file (must not exist)"
    )
    truth.add_argument(
        "--no-truth", action="store_true", help="record no ground truth (load benchmarks)"
    )
    run.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many wall seconds",
    )
    run.set_defaults(func=_run)

    check = actions.add_parser("check", help="validate a scenario file and summarise it")
    check.add_argument("scenario", type=Path)
    check.set_defaults(func=_check)

    fault = actions.add_parser(
        "fault",
        help="inject, list or clear faults in a running simulator",
        description="Talk to a running simulator's control interface (see --control).",
    )
    fault_actions = fault.add_subparsers(dest="fault_command", metavar="ACTION", required=True)
    inject = fault_actions.add_parser(
        "inject",
        help="start a fault at the next tick",
        description=(
            "Kinds: stuck, drift, spike, noise (need --point); dropout, slow, disconnect, "
            "corrupt (RTU and serial), exception (Modbus), bad_status (OPC-UA) (need --device, "
            "or --point where the kind allows it); ignore_writes, wrong_value (need a writable "
            "--point); leak (a tank) and fouling (a boiler) (need --component). "
            "Durations are simulated seconds."
        ),
    )
    inject.add_argument("kind", metavar="KIND", choices=KINDS, help=f"one of: {', '.join(KINDS)}")
    inject.add_argument("--device", help="device id, e.g. pump-station")
    inject.add_argument("--point", help="point, e.g. tank-1.level")
    inject.add_argument("--unit-id", type=int, help="Modbus unit id (faults on one unit of a bus)")
    inject.add_argument(
        "--component", help="process component for leak and fouling, e.g. tank-1, boiler-1"
    )
    inject.add_argument("--duration", type=float, help="simulated seconds (default: until cleared)")
    for key, (flag, kind, text) in _PARAM_FLAGS.items():
        inject.add_argument(flag, dest=f"param_{key}", type=kind, metavar=key.upper(), help=text)
    _control_args(inject)
    inject.set_defaults(func=_fault_inject)

    listing = fault_actions.add_parser("list", help="list faults")
    _control_args(listing)
    listing.set_defaults(func=_fault_list)

    clear = fault_actions.add_parser("clear", help="end a fault (or all) at the next tick")
    clear.add_argument("id", nargs="?", type=int, help="fault id (see 'fault list')")
    clear.add_argument("--all", action="store_true", help="end every scheduled or active fault")
    _control_args(clear)
    clear.set_defaults(func=_fault_clear)

    truth_cmd = actions.add_parser(
        "truth",
        help="current true and reported values of a running simulator (or its recorded writes)",
        description=(
            "Without --writes: the current true and reported value of each point. With "
            "--writes: every client write the ground truth recorded, oldest first, with the "
            "value written, what the variable was before and what it became, and the "
            "outcome (applied, ignored or altered by an actuator fault, or rejected)."
        ),
    )
    truth_cmd.add_argument("--point", action="append", help="only this point (repeatable)")
    truth_cmd.add_argument(
        "--writes", action="store_true", help="list recorded client writes instead of values"
    )
    truth_cmd.add_argument(
        "--since-tick", type=int, default=None, metavar="N", help="--writes: from tick N on"
    )
    truth_cmd.add_argument(
        "--limit", type=int, default=None, metavar="M", help="--writes: at most M (10000)"
    )
    _control_args(truth_cmd)
    truth_cmd.set_defaults(func=_truth)

    _register_gateways(actions)

    status = actions.add_parser(
        "status", help="tick, counters and endpoints of a running simulator"
    )
    _control_args(status)
    status.set_defaults(func=_status)


def _control_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        default=os.environ.get("FIELDTWIN_SIM_CONTROL", DEFAULT_CONTROL),
        metavar="HOST:PORT",
        help=(
            "control address of the running simulator "
            "(default: $FIELDTWIN_SIM_CONTROL, else 127.0.0.1:17100)"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _fail(message: str) -> int:
    print(f"fieldtwin: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


# -- run / check --------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from fieldtwin.protocol import logfmt
    from fieldtwin.sim.runner import Runner, RunOptions
    from fieldtwin.sim.scenario import load_scenario

    logfmt.configure(getattr(args, "log_level", "info"), stream=sys.stderr)
    if not 0.01 <= args.speed <= 1000:
        return _fail(f"--speed {args.speed}: choose a factor between 0.01 and 1000")
    if args.stop_after is not None and args.stop_after <= 0:
        return _fail("--stop-after must be a positive number of seconds")
    scenario = load_scenario(args.scenario)
    options = RunOptions(
        speed=args.speed,
        seed=args.seed,
        ephemeral=args.ephemeral,
        truth_path=args.truth,
        record_truth=not args.no_truth,
        stop_after=args.stop_after,
    )

    def ready(endpoints: dict[str, Any]) -> None:
        if args.json:
            sys.stdout.write(json.dumps(endpoints) + "\n")
        else:
            sys.stdout.write(format_endpoints(endpoints))
        sys.stdout.flush()

    try:
        runner = Runner(scenario, options)
        asyncio.run(runner.run(ready))
    except SimError as exc:
        return _fail(str(exc))
    return EXIT_OK


def format_endpoints(endpoints: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    synthetic = [d for d in endpoints["devices"] if "synthetic" in d]
    for device in endpoints["devices"]:
        if "synthetic" in device:
            continue
        protocol = device["protocol"]
        units = ", ".join(str(u) for u in device.get("unit_ids", []))
        if protocol == "modbus-tcp":
            where = f"{device['host']}:{device['port']}"
        elif protocol in ("modbus-rtu", "serial-line"):
            where = f"{device['path']} -> {device['pty']} ({device['baudrate']} baud)"
        else:
            where = device["url"]
        rows.append((device["id"], protocol, where, units))
    if synthetic:
        first, last = synthetic[0], synthetic[-1]
        layout = first["synthetic"]
        ports = sorted(d["port"] for d in synthetic)
        rows.append(
            (
                f"{first['id']} .. {last['id']}",
                "modbus-tcp",
                f"{first['host']} ports {ports[0]}..{ports[-1]} ({len(synthetic)} devices)",
                f"1; {layout['registers']} {layout['table']} as {layout['type']}",
            )
        )
    rows.append(("control", "http", endpoints["control"], ""))
    rows.append(("ground truth", "duckdb", endpoints["ground_truth"] or "(not recorded)", ""))
    header = ("DEVICE", "PROTOCOL", "ENDPOINT", "UNIT IDS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        f"fieldtwin simulator: {endpoints['scenario']} "
        f"(seed {endpoints['seed']}, speed {endpoints['speed']:g}x)",
        "",
    ]
    for row in [header, *rows]:
        lines.append(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        )
    lines += ["", "Press Ctrl+C to stop.", ""]
    return "\n".join(line.rstrip() for line in lines)


def _check(args: argparse.Namespace) -> int:
    from fieldtwin.sim.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    print(
        f"{scenario.path}: scenario {scenario.name!r} is valid "
        f"(seed {scenario.seed}, tick {scenario.tick:g} s)"
    )
    for device in scenario.devices:
        where = device.link if device.link else f"{device.host}:{device.port}"
        print(f"  {device.id:<16} {device.protocol:<12} {where}  {len(device.points)} points")
    if scenario.load.devices:
        load = scenario.load
        print(
            f"  load: {load.devices} modbus-tcp devices x {load.registers_per_device} {load.table} "
            f"({load.point_type}), ports {load.base_port}..{load.base_port + load.devices - 1}"
        )
    for scheduled in scenario.faults:
        req = scheduled.request
        target = req.point or req.device
        until = "" if scheduled.duration is None else f" for {scheduled.duration:g} s"
        print(f"  fault: {req.kind} on {target} at {scheduled.at:g} s{until}")
    return EXIT_OK


# -- control clients ----------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from fieldtwin.sim.control import request

    return request(args.control, method, path, body)


def _describe(fault: dict[str, Any]) -> str:
    target = fault.get("point") or fault.get("device") or fault.get("component")
    if fault.get("unit_id") is not None:
        target = f"{target} unit {fault['unit_id']}"
    params = ", ".join(f"{k}={v}" for k, v in (fault.get("params") or {}).items())
    if "writes_affected" in fault:  # actuator faults
        params = ", ".join(p for p in (params, f"writes affected={fault['writes_affected']}") if p)
    end = "until cleared" if fault.get("end_tick") is None else f"to tick {fault['end_tick']}"
    return (
        f"{fault['id']:>4}  {fault['status']:<9} {fault['kind']:<13} {target}  "
        f"tick {fault['start_tick']} {end}  [{fault['source']}]{'  ' + params if params else ''}"
    )


def _fault_inject(args: argparse.Namespace) -> int:
    params = {
        key: getattr(args, f"param_{key}")
        for key in _PARAM_FLAGS
        if getattr(args, f"param_{key}") is not None
    }
    body = {
        "kind": args.kind,
        "device": args.device,
        "point": args.point,
        "unit_id": args.unit_id,
        "component": args.component,
        "duration": args.duration,
        "params": params,
    }
    try:
        fault = _call(args, "POST", "/faults", body)
    except SimError as exc:
        return _fail(str(exc))
    print(json.dumps(fault) if args.json else "injected " + _describe(fault).strip())
    return EXIT_OK


def _fault_list(args: argparse.Namespace) -> int:
    try:
        answer = _call(args, "GET", "/faults")
    except SimError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(answer))
    elif not answer["faults"]:
        print("no faults")
    else:
        for fault in answer["faults"]:
            print(_describe(fault))
    return EXIT_OK


def _fault_clear(args: argparse.Namespace) -> int:
    if (args.id is None) == (not args.all):
        return _fail("give a fault id or --all")
    try:
        if args.all:
            answer = _call(args, "POST", "/faults/clear", {})
            faults = answer["faults"]
        else:
            faults = [_call(args, "DELETE", f"/faults/{args.id}")]
    except SimError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"faults": faults}))
    else:
        print("\n".join("cleared " + _describe(f).strip() for f in faults) or "nothing to clear")
    return EXIT_OK


def _truth(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    if args.writes:
        return _writes(args)
    if args.since_tick is not None or args.limit is not None:
        return _fail("--since-tick and --limit go with --writes")
    query = "" if not args.point else "?" + urlencode([("point", p) for p in args.point])
    try:
        answer = _call(args, "GET", f"/truth{query}")
    except SimError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    print(f"tick {answer['tick']}  sim {answer['sim_s']:.1f} s")
    width = max((len(n) for n in answer["points"]), default=5)
    print(f"{'POINT':<{width}}  {'TRUE':>14}  {'REPORTED':>14}")
    for name, values in answer["points"].items():
        print(f"{name:<{width}}  {values['true']:>14.4f}  {values['reported']:>14.4f}")
    return EXIT_OK


def _writes(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    pairs: list[tuple[str, str | int]] = [("point", p) for p in args.point or []]
    if args.since_tick is not None:
        pairs.append(("since_tick", args.since_tick))
    if args.limit is not None:
        pairs.append(("limit", args.limit))
    query = "?" + urlencode(pairs) if pairs else ""
    try:
        answer = _call(args, "GET", f"/truth/writes{query}")
    except SimError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    writes = answer["writes"]
    if not writes:
        print("no writes recorded")
        return EXIT_OK
    width = max(len("POINT"), *(len(w["point"]) for w in writes))
    print(
        f"{'TICK':>8}  {'SIM S':>9}  {'POINT':<{width}}  {'STATUS':<8}  {'WRITTEN':>10}  "
        f"{'BEFORE':>10}  {'RESULT':>10}  {'FAULT':>5}  VIA"
    )

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    for w in writes:
        fault = "-" if w["fault_id"] is None else str(w["fault_id"])
        via = f"{w['protocol']} {w['device']}".strip()
        detail = f"  ({w['detail']})" if w["detail"] else ""
        print(
            f"{w['tick']:>8}  {w['sim_s']:>9.1f}  {w['point']:<{width}}  {w['status']:<8}  "
            f"{num(w['value']):>10}  {num(w['before']):>10}  {num(w['result']):>10}  "
            f"{fault:>5}  {via}{detail}"
        )
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    try:
        answer = _call(args, "GET", "/status")
    except SimError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    print(
        f"{answer['scenario']}: tick {answer['tick']} (sim {answer['sim_s']:.1f} s, "
        f"speed {answer['speed']:g}x, seed {answer['seed']}), "
        f"{answer['active_faults']} active faults"
    )
    for key, value in sorted(answer["counters"].items()):
        print(f"  {key:<28} {value}")
    return EXIT_OK


# -- gateways: the load generator ---------------------------------------------------------


def _register_gateways(actions: Any) -> None:
    gateways = actions.add_parser(
        "gateways",
        help="load generator: play N simulated gateways against a broker and a hub",
        description=(
            "Simulated gateways speaking the real protocol (signed births, data, heartbeats, "
            "deaths; acks, rebirths and hub sessions honoured), for benchmarks and tests. "
            "See docs/simulator.md, 'Load generator: simulated gateways'."
        ),
    )
    steps = gateways.add_subparsers(dest="gateways_command", metavar="STEP", required=True)
    init = steps.add_parser(
        "init",
        help="write keys, a hub config fragment and a hub config for N gateways",
        description=(
            "Write DIR/keys/GATEWAY.key|.pub per gateway (kept if present) and the hub's "
            "pair, DIR/gateways.toml (gateways, type and entities for any hub config), "
            "DIR/hub.toml (a complete hub config) and DIR/loadgen.json."
        ),
    )
    init.add_argument("--count", type=int, required=True, help="number of gateways")
    init.add_argument("--points", type=int, required=True, help="points per gateway")
    init.add_argument("--dir", type=Path, required=True, help="fleet folder")
    init.add_argument("--prefix", default="gw-load", help="gateway id prefix (default gw-load)")
    init.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        help="broker URL written into hub.toml (default mqtt://127.0.0.1:1883)",
    )
    init.set_defaults(func=_gateways_init)

    run = steps.add_parser(
        "run",
        help="play the fleet: one data frame per gateway per tick, acks honoured",
        description=(
            "Connect, publish a birth per gateway, then one data frame per gateway per tick "
            "(all its points) for --duration seconds, wait up to --drain seconds for the last "
            "acks, publish a death per gateway and print the statistics."
        ),
    )
    run.add_argument("--dir", type=Path, required=True, help="fleet folder (gateways init)")
    run.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    run.add_argument("--rate", type=float, default=1.0, help="frames per gateway per second")
    run.add_argument("--duration", type=float, default=10.0, help="seconds of data (default 10)")
    run.add_argument(
        "--hub-key", type=Path, default=None, help="hub public key (default DIR/keys/hub.pub)"
    )
    run.add_argument(
        "--username",
        action="append",
        default=[],
        help=(
            "broker user of the benchmark-only loadgen role (repeat: one connection each; "
            "default loadgen)"
        ),
    )
    run.add_argument(
        "--password-file", type=Path, default=None, help="the password of a single --username"
    )
    run.add_argument(
        "--connections",
        type=int,
        default=0,
        help="connections in the pool (default: one per user, 4 for a single user)",
    )
    run.add_argument(
        "--connection-per-gateway",
        action="store_true",
        help="one connection per gateway as its own broker user, with its will",
    )
    run.add_argument(
        "--password-dir",
        type=Path,
        default=None,
        help="USER.password files, e.g. broker/passwords/ (users, or gateways with "
        "--connection-per-gateway)",
    )
    run.add_argument("--window", type=int, default=256, help="publishes in flight per connection")
    run.add_argument("--ack-timeout", type=float, default=5.0, help="resend after (s)")
    run.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval (s; 0 off)")
    run.add_argument("--drain", type=float, default=15.0, help="wait for the last acks (s)")
    run.add_argument("--ledger", type=Path, default=None, help="write what was sent as CSV")
    run.add_argument("--json", action="store_true", help="print the statistics as JSON")
    run.set_defaults(func=_gateways_run)


def _gateways_init(args: argparse.Namespace) -> int:
    from fieldtwin.protocol.errors import ProtocolError
    from fieldtwin.sim.loadgen import init_fleet

    try:
        spec = init_fleet(args.dir, args.count, args.points, args.prefix, args.broker)
    except (SimError, ProtocolError, OSError) as exc:
        return _fail(str(exc))
    folder = args.dir.resolve()
    print(f"{spec.count} gateways x {spec.points} points in {folder}:")
    print(f"  keys/            one Ed25519 pair per gateway ({spec.gateway(0)} ...) and hub")
    print("  gateways.toml    [gateways.*], [types.loadgen], [[entities]] for a hub config")
    print("  hub.toml         a complete hub config (add the broker password)")
    return EXIT_OK


def _gateways_run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from fieldtwin.protocol import logfmt
    from fieldtwin.sim.loadgen import LoadGenerator, LoadOptions, load_fleet, summarize

    logfmt.configure(getattr(args, "log_level", "info"), stream=sys.stderr)
    try:
        password = None
        if args.password_file is not None:
            password = args.password_file.read_text().strip()
        options = LoadOptions(
            rate=args.rate,
            duration_s=args.duration,
            usernames=tuple(args.username or ["loadgen"]),
            password=password,
            connections=args.connections,
            connection_per_gateway=args.connection_per_gateway,
            password_dir=args.password_dir,
            window=args.window,
            ack_timeout_s=args.ack_timeout,
            heartbeat_s=args.heartbeat,
            drain_s=args.drain,
        )
        fleet = load_fleet(args.dir, args.hub_key)
    except (SimError, OSError) as exc:
        return _fail(str(exc))

    async def play() -> dict[str, Any]:
        generator = LoadGenerator(fleet, args.broker, options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, generator.stop)
        stats = await generator.run()
        if args.ledger is not None:
            generator.ledger.write_csv(args.ledger)
        return stats

    try:
        stats = asyncio.run(play())
    except (SimError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(stats))
    else:
        print(summarize(stats, fleet.spec, args.rate))
    return EXIT_OK if stats["in_flight"] == 0 else EXIT_FAILURE
