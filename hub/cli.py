"""``fieldtwin hub ...`` and ``fieldtwin twin ...``.

``hub run -c FILE`` runs the hub in the foreground (logs to stdout as logfmt; SIGINT
or SIGTERM stop it cleanly). ``hub check -c FILE`` validates a config and its keys.

``twin`` commands read the twin of the hub configured by ``-c FILE`` (or of the demo
under ``--state-dir DIR``): through the running hub's loopback API when it runs,
from its database file (read-only) when it does not. Every command takes
``--format table|json|yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fieldtwin.hub.config import HubConfig

EXIT_OK = 0
EXIT_FAILURE = 1
FORMATS = ("table", "json", "yaml")


def _add_source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", type=Path, help="the hub's config file (hub.toml)")
    group.add_argument(
        "--state-dir",
        type=Path,
        help="a demo's state folder (uses DIR/hub.toml); default: the demo's default folder",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default: table)"
    )


def register_hub(subparsers: Any) -> None:
    hub = subparsers.add_parser(
        "hub",
        help="run the hub that holds the authoritative twin",
        description=(
            "The hub verifies and stores what gateways send, keeps the twin current, "
            "detects drift, raises alarms and reconciles. See docs/hub.md."
        ),
    )
    actions = hub.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run",
        help="run the hub in the foreground",
        description=(
            "Run the hub until SIGINT/SIGTERM. Logs go to stdout as logfmt. The loopback "
            "API (JSON queries and Prometheus /metrics) listens on 127.0.0.1."
        ),
    )
    run.add_argument("-c", "--config", type=Path, required=True, help="hub config (TOML)")
    run.set_defaults(func=_hub_run)
    check = actions.add_parser(
        "check",
        help="validate a hub config and its key files, then exit",
        description="Load the config, every gateway public key and the hub key; report.",
    )
    check.add_argument("-c", "--config", type=Path, required=True, help="hub config (TOML)")
    check.set_defaults(func=_hub_check)


def register_twin(subparsers: Any) -> None:
    twin = subparsers.add_parser(
        "twin",
        help="query the twin: show, query, history, diff, export, alarms, predict, simulate",
        description=(
            "Read the twin of a hub (-c FILE) or of the demo (--state-dir DIR). While the "
            "hub runs, the query goes through its loopback API; otherwise the database "
            "file is opened read-only. Times: now, 30s/5m/2h/1d (ago), epoch ms or ISO "
            "8601 (UTC when no offset is given)."
        ),
    )
    actions = twin.add_subparsers(dest="twin_command", metavar="ACTION", required=True)

    show = actions.add_parser(
        "show",
        help="entities with their current (or past, --at) state",
        description="Show entities and their attributes; --at shows the twin as of a time.",
    )
    show.add_argument("entities", nargs="*", help="physical or twin ids (default: all)")
    show.add_argument("--at", help="show the whole twin as of this time instead of now")
    _add_filters(show)
    _add_source(show)
    show.set_defaults(func=_twin_show)

    query = actions.add_parser(
        "query",
        help="current attributes filtered by type, health and predicates",
        description=(
            "One row per attribute of every entity that passes all filters. Predicates: "
            "ATTRIBUTE OP VALUE with OP one of = != < <= > >=, e.g. --where 'level>4.5'."
        ),
    )
    _add_filters(query)
    _add_source(query)
    query.set_defaults(func=_twin_query)

    hist = actions.add_parser(
        "history",
        help="one attribute's samples in a time window",
        description=(
            "Samples by source time, with the frame (gateway/epoch/seq) that delivered each."
        ),
    )
    hist.add_argument("entity")
    hist.add_argument("attribute")
    hist.add_argument("--from", dest="start", default="1h", help="window start (default: 1h ago)")
    hist.add_argument("--to", dest="end", default="now", help="window end (default: now)")
    hist.add_argument("--limit", type=int, default=1000, help="newest N samples (default 1000)")
    _add_source(hist)
    hist.set_defaults(func=_twin_history)

    diff = actions.add_parser(
        "diff",
        help="what changed between two times",
        description="Attributes added, removed or changed between --from and --to.",
    )
    diff.add_argument("--from", dest="start", required=True, help="earlier time, e.g. 5m")
    diff.add_argument("--to", dest="end", default="now", help="later time (default: now)")
    _add_source(diff)
    diff.set_defaults(func=_twin_diff)

    export = actions.add_parser(
        "export",
        help="the whole twin in the digital_twin shape",
        description=(
            "Write the digital_twin export (entities, relationships, sync_configuration, "
            "drift_detection, current_drift, reconciliation, operations). --format yaml "
            "(or json) gives the document; table prints a summary."
        ),
    )
    export.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    _add_source(export)
    export.set_defaults(func=_twin_export)

    alarms = actions.add_parser(
        "alarms",
        help="list alarms; ack, shelve or unshelve one (signed)",
        description=(
            "Without an action: alarms, oldest first (default: not cleared). With ack, "
            "shelve or unshelve ALARM_ID: a request signed with your operator key, sent to the "
            "hub over the broker, with a mandatory --reason (shelve also needs --for). "
            "Identity: --profile FILE, or the hub config (-c / --state-dir) with --key FILE or "
            "--operator NAME (see 'fieldtwin cmd --help')."
        ),
    )
    alarms.add_argument(
        "action", nargs="?", default="list", choices=("list", "ack", "shelve", "unshelve")
    )
    alarms.add_argument("alarm_id", nargs="?", help="e.g. A-000012 (for ack/shelve/unshelve)")
    alarms.add_argument(
        "--state",
        action="append",
        choices=("active", "acknowledged", "returned", "shelved", "cleared"),
        help="only alarms in this state (repeatable)",
    )
    alarms.add_argument("--all", action="store_true", help="include cleared alarms")
    alarms.add_argument("--reason", help="why (required for ack, shelve, unshelve)")
    alarms.add_argument("--for", dest="duration", help="shelve for this long, e.g. 30m or 2h")
    _add_source(alarms)
    add_identity(alarms)
    alarms.set_defaults(func=_twin_alarms)

    predict = actions.add_parser(
        "predict",
        help="forecast an attribute with 80/95 %% intervals and the limits it may cross",
        description=(
            "Forecast ENTITY.ATTRIBUTE from its learned model (docs/prediction.md): the "
            "expected value with 80 % and 95 % intervals, and when it is likely to cross "
            "each threshold. --at TIME forecasts from a past time with a model fitted only "
            "on history before it, and compares the forecast with what devices reported."
        ),
    )
    predict.add_argument("target", help="ENTITY.ATTRIBUTE, e.g. tank-1.level")
    predict.add_argument("--horizon", default="", help="how far ahead, e.g. 10m (default: config)")
    predict.add_argument("--at", default="", help="forecast from this past time and compare")
    _add_source(predict)
    predict.set_defaults(func=_twin_predict)

    simulate = actions.add_parser(
        "simulate",
        help="what-if: predicted effect of holding values, without touching any device",
        description=(
            "Hold each --set ENTITY.ATTRIBUTE=VALUE from now and run the learned models: "
            "the predicted trajectories of the attributes they influence, the thresholds "
            "they would cross, and (live hub) the interlock verdict a command would get. "
            "Nothing is sent to any device."
        ),
    )
    simulate.add_argument(
        "--set",
        dest="sets",
        action="append",
        required=True,
        metavar="ENTITY.ATTRIBUTE=VALUE",
        help="a value to hold (repeatable), e.g. pump-1.speed_sp=1200",
    )
    simulate.add_argument("--horizon", default="", help="how far ahead, e.g. 10m")
    _add_source(simulate)
    simulate.set_defaults(func=_twin_simulate)

    models = actions.add_parser(
        "models",
        help="the learned models with their fit quality",
        description="Every model the hub fitted: structure, dead time, R², σ, samples, when.",
    )
    _add_source(models)
    models.set_defaults(func=_twin_models)

    status = actions.add_parser(
        "status", help="hub and gateway link status", description="Hub status and gateway links."
    )
    _add_source(status)
    status.set_defaults(func=_twin_status)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", action="append", default=[], help="entity type (repeatable)")
    parser.add_argument(
        "--health",
        action="append",
        default=[],
        choices=("healthy", "degraded", "stale", "unknown"),
        help="entity health (repeatable)",
    )
    parser.add_argument(
        "--where", action="append", default=[], help="attribute predicate, e.g. 'level>4.5'"
    )


# -- hub ---------------------------------------------------------------------------------


def _hub_run(args: argparse.Namespace) -> int:
    import asyncio

    from fieldtwin.hub.config import load_hub_config
    from fieldtwin.hub.errors import HubError
    from fieldtwin.hub.runtime import run_hub

    config = load_hub_config(args.config)
    try:
        asyncio.run(_until_signal(run_hub(config)))
    except HubError as exc:
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _until_signal(coro: Any) -> None:
    """Run ``coro``; SIGINT/SIGTERM cancel it so it can shut down cleanly."""
    import asyncio
    import logging
    import signal

    from fieldtwin.protocol.aio import recancel_stuck
    from fieldtwin.protocol.logfmt import fields

    log = logging.getLogger("fieldtwin.hub")
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()

    def nudge() -> None:
        # A task whose cancellation a library swallowed would keep the hub alive.
        if task.done():
            return
        stuck = recancel_stuck("hub-")
        if stuck:
            log.warning(
                "hub tasks did not stop; cancelling them again",
                extra=fields(tasks=",".join(stuck)),
            )
        loop.call_later(1.0, nudge)

    def stop() -> None:
        task.cancel()
        loop.call_later(3.0, nudge)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    # SIGUSR1: print every asyncio task's stack, for a hub that seems stuck.
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(signum)


def _dump_tasks() -> None:
    import asyncio

    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stdout)
    sys.stdout.flush()


def _store_line(config: HubConfig) -> str:
    """The store a check names: a PostgreSQL URL (no password) or the DuckDB file."""
    if config.store_url:
        from fieldtwin.hub.store_pg import redact

        return f"PostgreSQL {redact(config.store_url)}"
    return f"DuckDB {config.database}"


def _hub_check(args: argparse.Namespace) -> int:
    from fieldtwin.hub.config import load_hub_config

    config = load_hub_config(args.config)
    registry = config.registry()
    key = config.load_key()
    schema = config.schema
    print(f"config    {config.file}: valid")
    print(f"twin      {config.twin_id} ({config.domain}, fidelity {config.fidelity})")
    print(f"hub key   {key.key_id}  ({config.key_file})")
    print(f"broker    {config.broker.url} as {config.broker.username}")
    print(f"store     {_store_line(config)}")
    for gateway in registry.senders():
        print(f"gateway   {gateway}")
    print(
        f"schema    {len(schema.types)} types, {len(schema.entities)} entities, "
        f"{len(schema.declared_points())} attributes, {len(schema.relationships)} "
        f"relationships, {len(schema.structural)} structural rules"
    )
    print(
        f"physics   {len(schema.physical)} physical ranges, "
        f"{len(schema.plausibility)} plausibility checks, {len(schema.interlocks)} interlocks"
    )
    return EXIT_OK


# -- twin --------------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        path: Path = args.config
        return path
    from fieldtwin.hub.paths import default_state_dir

    state_dir = args.state_dir if args.state_dir is not None else default_state_dir()
    return Path(state_dir) / "hub.toml"


def _with_reader(args: argparse.Namespace, action: Any) -> int:
    from fieldtwin.hub.config import load_hub_config
    from fieldtwin.hub.errors import HubError
    from fieldtwin.hub.reader import open_reader

    path = _config_path(args)
    if args.config is None and not path.exists():
        print(
            f"fieldtwin: error: {path} does not exist; give -c HUB.toml, or run "
            "'fieldtwin demo' first to create the demo's state",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        config = load_hub_config(path)
        reader = open_reader(config)
        try:
            result: int = action(reader, config)
        finally:
            reader.close()
    except HubError as exc:
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return result


def _emit(args: argparse.Namespace, value: Any, table: Any, out: Any = None) -> None:
    stream = out or sys.stdout
    if args.format == "json":
        stream.write(json.dumps(value, indent=2, default=str) + "\n")
    elif args.format == "yaml":
        import yaml

        stream.write(yaml.safe_dump(_plain(value), sort_keys=False, allow_unicode=True))
    else:
        stream.write(table())


def _plain(value: Any) -> Any:
    """JSON round trip: tuples to lists, odd types to text, so YAML stays plain."""
    return json.loads(json.dumps(value, default=str))


def _twin_show(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import cell, entities_table, render_table

    def action(reader: Any, config: Any) -> int:
        now = int(time.time() * 1000)
        if args.at:
            snapshot = reader.as_of(args.at)
            if args.entities:
                snapshot = {k: v for k, v in snapshot.items() if k in set(args.entities)}

            def past_table() -> str:
                rows = [
                    [entity, name, cell(a["value"]), a["quality"], a["ts"]]
                    for entity, attrs in sorted(snapshot.items())
                    for name, a in sorted(attrs.items())
                ]
                return f"twin as of {args.at}\n" + render_table(
                    ["entity", "attribute", "value", "quality", "source time"], rows
                )

            _emit(args, snapshot, past_table)
            return EXIT_OK
        entities = reader.entities(
            types=args.type, health=args.health, where=args.where, ids=args.entities
        )

        def table() -> str:
            source = "live hub" if reader.live else "database (hub not running)"
            return f"twin {config.twin_id} ({source})\n" + entities_table(entities, now)

        _emit(args, entities, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_query(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import entities_table

    def action(reader: Any, config: Any) -> int:
        now = int(time.time() * 1000)
        entities = reader.entities(types=args.type, health=args.health, where=args.where)
        rows = [
            {
                "entity": e["physical_id"],
                "twin_id": e["twin_id"],
                "type": e["type"],
                "health": e["health"],
                "attribute": name,
                "value": a["value"],
                "unit": a.get("unit", ""),
                "quality": a["quality"],
                "ts": a["ts"],
                "source": a.get("source"),
            }
            for e in entities
            for name, a in sorted(e["attributes"].items())
        ]
        _emit(args, rows, lambda: entities_table(entities, now))
        return EXIT_OK

    return _with_reader(args, action)


def _twin_history(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import cell, render_table

    def action(reader: Any, config: Any) -> int:
        samples = reader.history(args.entity, args.attribute, args.start, args.end, args.limit)

        def table() -> str:
            rows = [[s["ts"], cell(s["value"]), s["quality"], s["frame"]] for s in samples]
            return render_table(["source time", "value", "quality", "frame"], rows)

        _emit(args, samples, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_diff(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import cell, render_table

    def action(reader: Any, config: Any) -> int:
        changes = reader.diff(args.start, args.end)

        def table() -> str:
            rows = [
                [c["entity"], c["attribute"], c["change"], cell(c["before"]), cell(c["after"])]
                for c in changes
            ]
            return f"changes from {args.start} to {args.end}: {len(changes)}\n" + render_table(
                ["entity", "attribute", "change", "before", "after"], rows
            )

        _emit(args, changes, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_export(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import render_table

    def action(reader: Any, config: Any) -> int:
        document = reader.export()
        fmt = args.format

        def table() -> str:
            twin = document["digital_twin"]
            rows = [
                [e["physical_id"], e["twin_id"], e["type"], e["health"], e["last_updated"]]
                for e in twin["entities"]
            ]
            drift = document["current_drift"]
            issues = [
                [i["entity_id"], i["type"], i["severity"], i["description"]]
                for i in drift["issues"]
            ]
            text = (
                f"twin {twin['id']} ({twin['domain']}), last sync {twin['last_sync']}, "
                f"confidence {document['confidence']}\n"
                + render_table(["entity", "twin id", "type", "health", "last updated"], rows)
            )
            if issues:
                text += "\n" + render_table(["entity", "drift", "severity", "description"], issues)
            return text

        if args.output is not None:
            with args.output.open("w", encoding="utf-8") as handle:
                _emit(args, document, table, handle)
            print(f"wrote {args.output} ({fmt})", file=sys.stderr)
        else:
            _emit(args, document, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_alarms(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import alarms_table

    if args.action != "list":
        return _alarm_op(args)

    def action(reader: Any, config: Any) -> int:
        states = args.state or (
            [] if args.all else ["active", "acknowledged", "returned", "shelved"]
        )
        alarms = reader.alarms(states)
        _emit(args, alarms, lambda: alarms_table(alarms))
        return EXIT_OK

    return _with_reader(args, action)


def _alarm_op(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import alarms_table

    if not args.alarm_id:
        print(f"fieldtwin: error: twin alarms {args.action} needs ALARM_ID", file=sys.stderr)
        return 2
    if not args.reason:
        print(
            f"fieldtwin: error: twin alarms {args.action} needs --reason (it is audited)",
            file=sys.stderr,
        )
        return 2
    request: dict[str, Any] = {"alarm_id": args.alarm_id, "reason": args.reason}
    if args.action == "shelve":
        if not args.duration:
            print("fieldtwin: error: shelve needs --for DURATION (e.g. 30m)", file=sys.stderr)
            return 2
        request["duration"] = args.duration
    result = operator_call(args, f"alarm.{args.action}", request)
    if result is None:
        return EXIT_FAILURE
    _emit(args, result, lambda: alarms_table([result]))
    return EXIT_OK


def add_identity(parser: argparse.ArgumentParser) -> None:
    """Options that say which operator signs (shared by ``cmd`` and ``twin alarms``)."""
    group = parser.add_argument_group("operator identity")
    group.add_argument(
        "--profile", type=Path, help="operator profile (TOML); or $FIELDTWIN_PROFILE"
    )
    group.add_argument("--key", type=Path, help="your private key file; or $FIELDTWIN_OPERATOR_KEY")
    group.add_argument("--operator", help="your operator id (default: the key file's name)")
    group.add_argument("--password-file", type=Path, help="your broker password file")
    group.add_argument("--broker", help="broker URL (default: the hub config's)")
    group.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the hub (default 15)"
    )


def operator_call(args: argparse.Namespace, op: str, request: dict[str, Any]) -> Any:
    """Send one signed request; print a clear error and return None when refused."""
    import asyncio
    import dataclasses

    from fieldtwin.hub.opclient import OperatorError, call, profile_from

    try:
        hub_config = None
        if getattr(args, "profile", None) is None:
            hub_config = _config_path(args)
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
        return asyncio.run(call(profile, op, request))
    except OperatorError as exc:
        print(f"fieldtwin: refused ({exc.code}): {exc}", file=sys.stderr)
        return None


def _number(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


def _band(pair: Any) -> str:
    return f"{pair[0]:.4g} … {pair[1]:.4g}"


def _forecast_lines(result: Any, unit: str, compare: bool = False) -> list[str]:
    from fieldtwin.hub.render import render_table

    held = any("held" in row for row in result)
    headers = ["in", "time", "expected", "80 %", "95 %"] + (["inputs held"] if held else [])
    headers += ["reported"] if compare else []
    rows = []
    for row in result:
        line = [
            f"{row['in_s']:g} s" if row["in_s"] < 90 else f"{row['in_s'] / 60:.3g} min",
            row["ts"],
            _number(row["mean"], unit),
            _band(row["p80"]),
            _band(row["p95"]),
        ]
        if held:
            line.append(_number(row.get("held"), unit))
        if compare:
            line.append(_number(row.get("actual"), unit))
        rows.append(line)
    return render_table(headers, rows).rstrip("\n").split("\n")


def _twin_predict(args: argparse.Namespace) -> int:
    def action(reader: Any, config: Any) -> int:
        result = reader.predict(args.target, args.horizon, args.at)

        def table() -> str:
            unit = result.get("unit", "")
            model = result.get("model") or {}
            lines = [
                f"{result['point']} = {_number(result['current'], unit)} at {result['from']}; "
                f"forecast {result['horizon_s'] / 60:g} min ahead",
                f"model: {model.get('description') or model.get('error') or 'none'}"
                + (f" (fitted {model['fitted']})" if model.get("fitted") else ""),
            ]
            if result.get("untrusted"):
                lines.append(f"CAUTION: {result['untrusted']}")
            if result.get("basis"):
                lines.append(f"basis: {result['basis']}")
            comparison = result.get("comparison")
            lines += _forecast_lines(
                result["forecast"] if not comparison else comparison.get("rows", []),
                unit,
                bool(comparison),
            )
            crossings = result.get("crossings") or []
            lines.append("limits:" if crossings else "limits: none likely within the horizon")
            lines += [f"  {c['text']}" for c in crossings]
            if comparison:
                if "error" in comparison:
                    lines.append(f"comparison: {comparison['error']}")
                else:
                    lines.append(
                        f"compared with {comparison['samples']} reported steps until "
                        f"{comparison['until']}: MAE {_number(comparison['mae'], unit)} "
                        f"(last value held: {_number(comparison['naive_mae'], unit)}), "
                        f"inside 80 %: {comparison['coverage_80']:.0%}, "
                        f"inside 95 %: {comparison['coverage_95']:.0%}"
                    )
            return "\n".join(lines) + "\n"

        _emit(args, result, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_simulate(args: argparse.Namespace) -> int:
    from fieldtwin.hub.api import parse_sets

    def action(reader: Any, config: Any) -> int:
        result = reader.simulate(parse_sets(args.sets), args.horizon)

        def table() -> str:
            sets = ", ".join(f"{k} = {v:g}" for k, v in result["set"].items())
            lines = [
                f"what if {sets} from {result['from']} "
                f"({result['horizon_s'] / 60:g} min; nothing is sent to any device)"
            ]
            for point, verdict in (result.get("policy") or {}).items():
                word = "ALLOWED" if verdict["allowed"] else "REFUSED"
                lines.append(f"command {point}: {word}: {verdict['summary']}")
            if not result.get("policy"):
                lines.append("interlock verdict: only from a running hub (live freshness)")
            for effect in result["effects"]:
                if "error" in effect:
                    lines.append(f"{effect['point']}: no prediction ({effect['error']})")
                    continue
                unit = effect.get("unit", "")
                if effect.get("untrusted"):
                    lines.append(f"{effect['point']}: CAUTION: {effect['untrusted']}")
                lines.append(
                    f"{effect['point']}: now {_number(effect['current'], unit)}, expected "
                    f"{_number(effect['expected'], unit)} (95 % {_band(effect['p95'])}); "
                    f"without the change {_number(effect['without_change'], unit)}"
                )
                lines += ["  " + line for line in _forecast_lines(effect["forecast"], unit)]
                for crossing in effect["crossings"]:
                    lines.append(f"  would cross: {crossing['text']}")
            return "\n".join(lines) + "\n"

        _emit(args, result, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_models(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import render_table

    def action(reader: Any, config: Any) -> int:
        rows = reader.models()

        def table() -> str:
            body = [
                [
                    r.get("target"),
                    r.get("structure", "-"),
                    ", ".join(r.get("inputs") or []) or "-",
                    r.get("r2"),
                    r.get("sigma"),
                    r.get("samples"),
                    r.get("fitted") or r.get("error"),
                ]
                for r in rows
            ]
            return render_table(
                ["target", "structure", "inputs", "R²", "σ", "samples", "fitted / why not"], body
            )

        _emit(args, rows, table)
        return EXIT_OK

    return _with_reader(args, action)


def _twin_status(args: argparse.Namespace) -> int:
    from fieldtwin.hub.render import render_table

    def action(reader: Any, config: Any) -> int:
        status = reader.status()

        def table() -> str:
            running = "running" if reader.live else "not running"
            head = f"hub {status['twin_id']}: {running}; database {status['database']}\n"
            rows = [
                [
                    g["id"],
                    "up" if g.get("up", g.get("online")) else "down",
                    g.get("epoch"),
                    g.get("frames"),
                    g.get("last_frame"),
                    g.get("last_heartbeat") or "-",
                    ", ".join(
                        f"{d['id']} {'up' if d['up'] else 'DOWN: ' + (d['error'] or '?')}"
                        for d in g.get("devices") or []
                    )
                    or "-",
                ]
                for g in status["gateways"]
            ]
            return head + render_table(
                ["gateway", "link", "epoch", "frames", "last frame", "heartbeat", "devices"], rows
            )

        _emit(args, status, table)
        return EXIT_OK

    return _with_reader(args, action)
