"""A hub played from data: the console's transport for snapshot tests and the benchmark.

``SyntheticHub`` speaks the console's side of the operator channel without a broker:
it answers requests from tables it holds and yields ``View`` frames that it signs with
its own key and verifies again on the way out (exactly the work ``OperatorClient`` does
for a real hub), in the wire format hub/views.py publishes. Two plants come with it:

- ``water_plant(now_ms)``: the demo's seven entities with alarms in every state,
  commands awaiting approval and settled, a silent gateway and an audit tail, all at
  fixed times (deterministic screenshots);
- ``large(entities, attributes)``: N entities of M attributes for the benchmark, with
  ``delta(rows)`` producing the hub's next ``twin`` frame of changed values.

It is not a mock of the hub's logic: requests that would change the plant are only
recorded (``requests``), so tests see what the console sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fieldtwin.hub.opclient import OperatorError
from fieldtwin.hub.views import (
    ALARM_COLS,
    ATTR_COLS,
    COMMAND_COLS,
    ENTITY_COLS,
    HEALTH_COLS,
    HUB_COLS,
    LINK_COLS,
    POINT_COLS,
    RELATIONSHIP_COLS,
    SCHEMA_COLS,
    split_tables,
    table,
)
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.keys import KeyPair, KeyRegistry
from fieldtwin.protocol.messages import View
from fieldtwin.protocol.topics import view_topic

PART_BYTES = 600 * 1024
ALL_OPS = (
    "alarm.ack",
    "alarm.list",
    "alarm.shelve",
    "alarm.unshelve",
    "audit.tail",
    "audit.verify",
    "cmd.approve",
    "cmd.cancel",
    "cmd.dry_run",
    "cmd.list",
    "cmd.propose",
    "cmd.reject",
    "cmd.show",
    "hub.status",
    "hub.whoami",
    "twin.entities",
    "twin.history",
    "view.history",
    "view.snapshot",
)
READ_OPS = tuple(
    op
    for op in ALL_OPS
    if not op.startswith(("alarm.", "cmd.")) or op.endswith((".list", ".show", ".dry_run"))
)
ROLE_OPS = {
    "viewer": READ_OPS,
    "operator": (
        *READ_OPS,
        "cmd.propose",
        "cmd.cancel",
        "alarm.ack",
        "alarm.shelve",
        "alarm.unshelve",
    ),
    "approver": (*READ_OPS, "cmd.approve", "cmd.reject"),
    "admin": ALL_OPS,
}


def _schema_row(type_name: str, attribute: str, order: int, **kw: Any) -> list[Any]:
    row = dict.fromkeys(SCHEMA_COLS)
    row.update(
        type=type_name, attribute=attribute, order=order, unit="", description="", writable=False
    )
    row.update(kw)
    return [row[c] for c in SCHEMA_COLS]


class SyntheticHub:
    """The console's transport, played from tables (no broker, no hub process)."""

    def __init__(
        self,
        tables: Mapping[str, dict[str, Any]],
        *,
        operator: str = "alice",
        roles: Sequence[str] = ("operator",),
        now_ms: int = 0,
        instance: str = "synthetic",
    ) -> None:
        self.tables = {
            name: {"cols": list(t["cols"]), "rows": [list(r) for r in t["rows"]]}
            for name, t in tables.items()
        }
        self.operator = operator
        self.roles = list(roles)
        self.now_ms = now_ms
        self.instance = instance
        self.key = KeyPair.generate()
        self.signer = FrameSigner("hub", self.key)
        self.registry = KeyRegistry.of({"hub": self.key.public})
        self.seq: dict[str, int] = {"twin": 0, "alarms": 0, "commands": 0, "hub": 0}
        self.frame_seq = 0
        self.queue: asyncio.Queue[View] = asyncio.Queue()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.history: dict[tuple[str, str], dict[str, Any]] = {}
        self.timelines: dict[str, list[dict[str, Any]]] = {}
        self.audit: list[dict[str, Any]] = []
        self.up = True

    # -- the transport ---------------------------------------------------------------------

    @property
    def link_error(self) -> str | None:
        return None if self.up else "synthetic hub stopped"

    @contextlib.asynccontextmanager
    async def connected(self, *, views: bool = False) -> AsyncIterator[SyntheticHub]:
        if not self.up:
            raise OperatorError("cannot reach the synthetic broker", code="unavailable")
        yield self

    async def views(self) -> AsyncIterator[View]:
        while True:
            yield await self.queue.get()

    def approval_for(self, command: Mapping[str, Any]) -> dict[str, Any]:
        return {"cmd_id": command["id"], "signature": b"\0" * 64, "key_id": "0" * 16}

    async def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        args = dict(args or {})
        self.requests.append((op, args))
        if not self.up:
            raise OperatorError("the hub did not answer", code="unavailable")
        allowed = {op for role in self.roles for op in ROLE_OPS.get(role, ())}
        if op not in allowed:
            raise OperatorError(f"{self.operator} may not {op}", code="forbidden")
        handler = getattr(self, "op_" + op.replace(".", "_"), None)
        if handler is None:
            return {}
        return handler(args)

    # -- answers ---------------------------------------------------------------------------

    def op_hub_whoami(self, args: Mapping[str, Any]) -> Any:
        ops = sorted({op for role in self.roles for op in ROLE_OPS.get(role, ())})
        return {
            "operator": self.operator,
            "name": self.operator,
            "roles": self.roles,
            "operations": ops,
            "hub": {"twin_id": "water-plant", "instance": self.instance},
        }

    def op_view_snapshot(self, args: Mapping[str, Any]) -> Any:
        parts = split_tables(self.tables, PART_BYTES)
        part = int(args.get("part", 0))
        return {
            "snapshot": "synthetic",
            "instance": self.instance,
            "seq": dict(self.seq),
            "now_ms": self.now_ms,
            "part": part,
            "parts": len(parts),
            "tables": parts[part],
        }

    def op_view_history(self, args: Mapping[str, Any]) -> Any:
        key = (str(args["entity"]), str(args["attribute"]))
        series = self.history.get(key)
        start, end = int(args["from"]), int(args["to"])
        if series is None:
            return {
                "ts_ms": [],
                "mean": [],
                "min": [],
                "max": [],
                "samples": 0,
                "bucket_ms": 1,
                "from_ms": start,
                "to_ms": end,
            }
        return series

    def op_cmd_show(self, args: Mapping[str, Any]) -> Any:
        rows = self.tables["commands"]
        for row in rows["rows"]:
            data = dict(zip(rows["cols"], row, strict=True))
            if data["id"] == args.get("cmd_id"):
                data["timeline"] = self.timelines.get(data["id"], [])
                return data
        raise OperatorError(f"no command {args.get('cmd_id')}", code="not_found")

    def op_cmd_dry_run(self, args: Mapping[str, Any]) -> Any:
        target = str(args["target"])
        entity, _, attribute = target.rpartition(".")
        value = args.get("value")
        ok = isinstance(value, int | float) and 0 <= value <= 1800
        return {
            "entity": entity,
            "attribute": attribute,
            "value": value,
            "allowed": ok,
            "policy": [
                {"check": "limits", "ok": ok, "text": f"{value} within 0 … 1800 rpm"},
                {"check": "gateway", "ok": True, "text": "gw-pumps is online"},
            ],
            "checkpoint": {"value": 900},
        }

    def op_audit_tail(self, args: Mapping[str, Any]) -> Any:
        return self.audit[-int(args.get("limit", 50)) :]

    def op_audit_verify(self, args: Mapping[str, Any]) -> Any:
        head = self.audit[-1] if self.audit else {"seq": 0, "hash": ""}
        return {
            "ok": True,
            "records": len(self.audit),
            "head_hash": head["hash"],
            "first_bad_seq": None,
            "problem": "",
            "head_seq": head["seq"],
        }

    def op_alarm_ack(self, args: Mapping[str, Any]) -> Any:
        return {"id": args["alarm_id"], "state": "acknowledged"}

    # -- frames ------------------------------------------------------------------------------

    def frame(self, stream: str, tables: Mapping[str, Any], now_ms: int | None = None) -> View:
        """Sign a view frame as the hub would, and verify it as the client would."""
        self.seq[stream] += 1
        self.frame_seq += 1
        body = View(
            stream=stream,
            instance=self.instance,
            view_seq=self.seq[stream],
            data={"now_ms": self.now_ms if now_ms is None else now_ms, "tables": dict(tables)},
        )
        assert view_topic(stream)
        payload = self.signer.encode(1, self.frame_seq, body.data["now_ms"], body)
        decoded = decode_frame(payload, self.registry).body
        assert isinstance(decoded, View)
        return decoded

    def publish(self, stream: str, tables: Mapping[str, Any], now_ms: int | None = None) -> None:
        self.queue.put_nowait(self.frame(stream, tables, now_ms))

    # -- plants ------------------------------------------------------------------------------

    @classmethod
    def water_plant(cls, now_ms: int, **kw: Any) -> SyntheticHub:
        """The demo's plant at a fixed moment, with something in every state."""
        s = 1000
        schema = [
            _schema_row(
                "tank",
                "level",
                0,
                unit="m",
                high_warning=4.2,
                high_critical=4.7,
                low_warning=0.5,
                low_critical=0.2,
                stale_after_s=10.0,
            ),
            _schema_row("tank", "level_raw", 1, unit="m"),
            _schema_row("tank", "high_level", 2, high_warning=1),
            _schema_row("pump", "speed", 0, unit="rpm", high_critical=1850),
            _schema_row(
                "pump", "motor_current", 1, unit="A", high_warning=16.0, high_critical=18.0
            ),
            _schema_row(
                "pump",
                "speed_sp",
                2,
                unit="rpm",
                writable=True,
                min=0,
                max=1800,
                max_step=600,
                approvals=1,
                two_person=True,
            ),
            _schema_row("pump", "running", 3, writable=True, approvals=1, two_person=True),
            _schema_row(
                "valve",
                "position",
                0,
                unit="%",
                writable=True,
                min=0,
                max=100,
                max_step=50,
                approvals=1,
                two_person=True,
            ),
            _schema_row(
                "flow_meter", "flow", 0, unit="m³/h", high_warning=45.0, high_critical=55.0
            ),
            _schema_row("flow_meter", "total", 1, unit="m³"),
            _schema_row(
                "pressure_transmitter",
                "pressure",
                0,
                unit="bar",
                high_warning=3.5,
                high_critical=4.0,
            ),
            _schema_row("pressure_transmitter", "temperature", 1, unit="°C"),
            _schema_row(
                "ambient_sensor",
                "temperature",
                0,
                unit="°C",
                high_warning=35.0,
                high_critical=40.0,
                low_warning=2.0,
                low_critical=-5.0,
            ),
            _schema_row(
                "ambient_sensor", "humidity", 1, unit="%RH", high_warning=85.0, high_critical=95.0
            ),
            _schema_row(
                "boiler", "temperature", 0, unit="°C", high_warning=130.0, high_critical=150.0
            ),
            _schema_row("boiler", "pressure", 1, unit="bar", high_warning=3.0, high_critical=4.0),
            _schema_row(
                "boiler",
                "heater_power_sp",
                2,
                unit="kW",
                writable=True,
                min=0,
                max=50,
                max_step=20,
                approvals=1,
                two_person=True,
            ),
            _schema_row("boiler", "heater_power", 3, unit="kW"),
        ]
        entities = [
            [
                "tank-1",
                "water-plant/tank-1",
                "tank",
                "gw-pumps",
                "raw water tank",
                True,
                {"area_m2": 1.0, "height_m": 5.0},
            ],
            [
                "pump-1",
                "water-plant/pump-1",
                "pump",
                "gw-pumps",
                "feed pump",
                True,
                {"rated_speed_rpm": 1800},
            ],
            [
                "valve-1",
                "water-plant/valve-1",
                "valve",
                "gw-pumps",
                "tank outlet valve",
                True,
                {"cv": 25.0},
            ],
            [
                "flowmeter-1",
                "water-plant/flowmeter-1",
                "flow_meter",
                "gw-field",
                "outlet flow meter",
                True,
                {"modbus_unit": 1},
            ],
            [
                "pt-1",
                "water-plant/pt-1",
                "pressure_transmitter",
                "gw-field",
                "outlet pressure",
                True,
                {"modbus_unit": 2},
            ],
            [
                "ambient-1",
                "water-plant/ambient-1",
                "ambient_sensor",
                "gw-field",
                "plant room ambient",
                True,
                {},
            ],
            [
                "boiler-1",
                "water-plant/boiler-1",
                "boiler",
                "gw-boiler",
                "process water boiler",
                True,
                {"max_power_kw": 50.0},
            ],
            ["mixer-1", "water-plant/mixer-1", "undeclared", "gw-pumps", "", False, {}],
        ]
        t = now_ms
        attrs = [
            ["tank-1", "level", 4.81, t - 2 * s, "good", t - 2 * s],
            ["tank-1", "level_raw", 4.81, t - 2 * s, "good", t - 2 * s],
            ["tank-1", "high_level", True, t - 40 * s, "good", t - 40 * s],
            ["pump-1", "speed", 1198.0, t - 1 * s, "good", t - 1 * s],
            ["pump-1", "motor_current", 11.42, t - 1 * s, "good", t - 1 * s],
            ["pump-1", "speed_sp", 1200, t - 3 * s, "good", t - 3 * s],
            ["pump-1", "running", True, t - 3 * s, "good", t - 3 * s],
            ["valve-1", "position", 50.0, t - 4 * s, "good", t - 4 * s],
            ["flowmeter-1", "flow", 18.3, t - 95 * s, "stale", t - 64 * s],
            ["flowmeter-1", "total", 1532.7, t - 95 * s, "stale", t - 64 * s],
            ["pt-1", "pressure", 2.41, t - 95 * s, "stale", t - 64 * s],
            ["pt-1", "temperature", 19.5, t - 95 * s, "stale", t - 64 * s],
            ["ambient-1", "temperature", 21.8, t - 95 * s, "stale", t - 64 * s],
            ["ambient-1", "humidity", 48.0, t - 95 * s, "stale", t - 64 * s],
            ["boiler-1", "temperature", 88.4, t - 1 * s, "good", t - 1 * s],
            ["boiler-1", "pressure", 1.92, t - 1 * s, "uncertain", t - 1 * s],
            ["boiler-1", "heater_power_sp", 30.0, t - 500 * s, "good", t - 500 * s],
            ["boiler-1", "heater_power", 29.6, t - 1 * s, "good", t - 1 * s],
            ["mixer-1", "speed", 0, t - 6 * s, "good", t - 6 * s],
        ]
        points = [
            [e, a, "", src, gw, "float32", w, None, None]
            for e, a, gw, src, w in (
                ("tank-1", "level", "gw-pumps", "pump-station ir0", False),
                ("pump-1", "speed_sp", "gw-pumps", "pump-station hr0", True),
                ("pump-1", "speed", "gw-pumps", "pump-station ir4", False),
                ("boiler-1", "heater_power_sp", "gw-boiler", "ns=2;s=Boiler.Power.SP", True),
                ("mixer-1", "speed", "gw-pumps", "pump-station ir4", False),
            )
        ]
        health = [
            ["tank-1", "degraded"],
            ["pump-1", "healthy"],
            ["valve-1", "healthy"],
            ["flowmeter-1", "stale"],
            ["pt-1", "stale"],
            ["ambient-1", "stale"],
            ["boiler-1", "healthy"],
            ["mixer-1", "unknown"],
        ]
        links = [
            ["gw-pumps", True, True, True, t - 1 * s, t - 3600 * s, 0, "", 1, 5400, 41000],
            ["gw-field", True, True, False, t - 64 * s, t - 3600 * s, 0, "", 1, 2100, 9000],
            ["gw-boiler", True, True, True, t - 1 * s, t - 3600 * s, 0, "", 1, 3600, 14400],
        ]

        def alarm(
            i: int,
            rule: str,
            dtype: str,
            entity: str,
            attribute: str,
            severity: str,
            state: str,
            description: str,
            value: str,
            gw: str,
            raised: int,
            **kw: Any,
        ) -> list[Any]:
            row = dict.fromkeys(ALARM_COLS)
            row.update(
                id=f"A-{i:06d}",
                rule=rule,
                drift_type=dtype,
                entity=entity,
                attribute=attribute,
                severity=severity,
                state=state,
                strategy="alert",
                description=description,
                value=value,
                gateway=gw,
                raised_ms=t - raised * s,
                updated_ms=t - raised * s,
            )
            row.update(kw)
            return [row[c] for c in ALARM_COLS]

        alarms = [
            alarm(
                7,
                "threshold",
                "threshold",
                "tank-1",
                "level",
                "critical",
                "active",
                "tank-1.level 4.81 m above critical 4.7 m",
                "4.81",
                "gw-pumps",
                30,
            ),
            alarm(
                6,
                "temporal.gateway_silent",
                "temporal",
                "gw-field",
                "",
                "critical",
                "acknowledged",
                "gateway gw-field silent for 64 s",
                "",
                "gw-field",
                60,
                acked_by="bob",
                acked_ms=t - 50 * s,
            ),
            alarm(
                5,
                "temporal.sensor_stale",
                "temporal",
                "flowmeter-1",
                "flow",
                "warning",
                "returned",
                "flowmeter-1.flow stale for 30 s",
                "",
                "gw-field",
                600,
            ),
            alarm(
                4,
                "structural.undeclared",
                "structural",
                "mixer-1",
                "",
                "warning",
                "shelved",
                "mixer-1 reported but not declared",
                "",
                "gw-pumps",
                900,
                shelved_by="bob",
                shelved_until_ms=t + 3000 * s,
                shelve_reason="commissioning the mixer",
            ),
        ]

        def command(
            cid: str,
            state: str,
            label: str,
            entity: str,
            attribute: str,
            value: Any,
            by: str,
            proposed: int,
            restore: Any,
            reason: str,
            approvals: list[Any],
            **kw: Any,
        ) -> list[Any]:
            row = dict.fromkeys(COMMAND_COLS)
            row.update(
                id=cid,
                state=state,
                state_label=label,
                gateway="gw-pumps",
                entity=entity,
                attribute=attribute,
                value=value,
                reason=reason,
                source="operator",
                proposed_by=by,
                proposed_ms=t - proposed * s,
                updated_ms=t - proposed * s,
                approvals_required=1,
                two_person=True,
                digest="9f" * 32,
                checkpoint={
                    "value": restore,
                    "ts_ms": t - proposed * s,
                    "quality": "good",
                    "twin_hash": "ab" * 32,
                    "taken_ms": t - proposed * s,
                },
                policy=[
                    {"check": "writable", "ok": True, "text": f"{entity}.{attribute} is writable"},
                    {"check": "limits", "ok": True, "text": f"{value} within 0 … 1800 rpm"},
                    {
                        "check": "interlock pump-needs-water",
                        "ok": True,
                        "text": "tank-1.level 4.81 > 0.3 (fresh, good)",
                    },
                    {"check": "gateway", "ok": True, "text": "gw-pumps is online"},
                ],
                approvals=approvals,
                approval_deadline_ms=t + 600 * s,
                outcome="",
                result_detail="",
            )
            row.update(kw)
            return [row[c] for c in COMMAND_COLS]

        commands = [
            command(
                "C-000003",
                "awaiting_approval",
                "awaiting approval",
                "pump-1",
                "speed_sp",
                1500,
                "alice",
                20,
                1200,
                "raise the feed for the evening demand",
                [],
            ),
            command(
                "C-000002",
                "verified",
                "verified",
                "pump-1",
                "speed_sp",
                1200,
                "alice",
                900,
                900,
                "morning ramp",
                [{"operator": "bob", "key_id": "0" * 16, "at_ms": t - 880 * s}],
                outcome="verified: pump-1.speed_sp reported 1200 within ±5",
                verified_ms=t - 860 * s,
            ),
            command(
                "C-000001",
                "rejected",
                "rejected",
                "valve-1",
                "position",
                5.0,
                "alice",
                1800,
                50.0,
                "test the interlock",
                [],
                outcome="rejected by bob: not while pumping",
            ),
        ]
        hub_row = ["water-plant", 1234, "7c" * 32, 181_000, 11_100, 0.012, 1, 4, 250, 1000]
        tables = {
            "hub": table(HUB_COLS, [hub_row]),
            "schema": table(SCHEMA_COLS, schema),
            "relationships": table(
                RELATIONSHIP_COLS,
                [
                    ["pump-1", "tank-1", "feeds"],
                    ["tank-1", "valve-1", "drains_through"],
                    ["flowmeter-1", "valve-1", "measures"],
                ],
            ),
            "entities": table(ENTITY_COLS, entities),
            "points": table(POINT_COLS, points),
            "health": table(HEALTH_COLS, health),
            "links": table(LINK_COLS, links),
            "alarms": table(ALARM_COLS, alarms),
            "commands": table(COMMAND_COLS, commands),
            "attrs": table(ATTR_COLS, attrs),
        }
        hub = cls(tables, now_ms=now_ms, **kw)
        level = [4.1 + 0.7 * min(1.0, i / 80) for i in range(120)]
        hub.history[("tank-1", "level")] = {
            "entity": "tank-1",
            "attribute": "level",
            "from_ms": t - 900 * s,
            "to_ms": t,
            "bucket_ms": 7500,
            "ts_ms": [t - 900 * s + i * 7500 for i in range(120)],
            "mean": level,
            "min": [v - 0.01 for v in level],
            "max": [v + 0.01 for v in level],
            "last": level,
            "samples": 900,
        }
        hub.timelines["C-000002"] = [
            {
                "command": "C-000002",
                "at_ms": t - 900 * s,
                "change": "proposed",
                "before": "none",
                "after": "awaiting_approval",
                "actor": "alice",
                "detail": {"reason": "morning ramp"},
            },
            {
                "command": "C-000002",
                "at_ms": t - 880 * s,
                "change": "approved",
                "before": "awaiting_approval",
                "after": "approved",
                "actor": "bob",
                "detail": {},
            },
            {
                "command": "C-000002",
                "at_ms": t - 880 * s,
                "change": "sent",
                "before": "approved",
                "after": "sent",
                "actor": "hub",
                "detail": {},
            },
            {
                "command": "C-000002",
                "at_ms": t - 878 * s,
                "change": "result",
                "before": "sent",
                "after": "executed",
                "actor": "gw-pumps",
                "detail": {"detail": "written and read back"},
            },
            {
                "command": "C-000002",
                "at_ms": t - 860 * s,
                "change": "verified",
                "before": "executed",
                "after": "verified",
                "actor": "hub",
                "detail": {},
            },
        ]
        actions = (
            "birth",
            "health_changed",
            "alarm_raised",
            "operator_request",
            "command_proposed",
            "alarm_acknowledged",
        )
        hub.audit = [
            {
                "seq": 1230 + i,
                "ts": f"2024-05-01T12:0{i}:00.000Z",
                "actor": "hub" if i % 2 else "alice",
                "action": actions[i % len(actions)],
                "subject": "tank-1",
                "detail": {"n": i},
                "hash": f"{i:02d}" * 32,
            }
            for i in range(5)
        ]
        return hub

    @classmethod
    def large(
        cls, entities: int, attributes: int, now_ms: int, *, seed: int = 1, **kw: Any
    ) -> SyntheticHub:
        """``entities`` sensors of ``attributes`` attributes each (for the benchmark)."""
        rng = random.Random(seed)
        names = [f"a{i}" for i in range(attributes)]
        schema = [
            _schema_row("sensor", name, i, unit="u", high_warning=90.0, high_critical=95.0)
            for i, name in enumerate(names)
        ]
        gateways = [f"gw-{i:02d}" for i in range(10)]
        ents = [
            [f"s-{i:05d}", f"plant/s-{i:05d}", "sensor", gateways[i % 10], f"sensor {i}", True, {}]
            for i in range(entities)
        ]
        attrs = [
            [f"s-{i:05d}", name, round(rng.uniform(0, 100), 3), now_ms, "good", now_ms]
            for i in range(entities)
            for name in names
        ]
        links = [[g, True, True, True, now_ms, now_ms, 0, "", 1, 0, 0] for g in gateways]
        tables = {
            "hub": table(HUB_COLS, [["plant", 1, "00" * 32, 0, 0, 0.0, 0, 0, 250, 1000]]),
            "schema": table(SCHEMA_COLS, schema),
            "relationships": table(RELATIONSHIP_COLS, []),
            "entities": table(ENTITY_COLS, ents),
            "points": table(POINT_COLS, []),
            "health": table(HEALTH_COLS, [[e[0], "healthy"] for e in ents]),
            "links": table(LINK_COLS, links),
            "alarms": table(ALARM_COLS, []),
            "commands": table(COMMAND_COLS, []),
            "attrs": table(ATTR_COLS, attrs),
        }
        hub = cls(tables, now_ms=now_ms, **kw)
        hub._rng = rng  # type: ignore[attr-defined]
        hub._names = names  # type: ignore[attr-defined]
        hub._entities = entities  # type: ignore[attr-defined]
        return hub

    def delta_rows(self, count: int, now_ms: int) -> list[list[Any]]:
        """``count`` changed attribute values (random entities and attributes)."""
        rng: random.Random = self._rng  # type: ignore[attr-defined]
        names: list[str] = self._names  # type: ignore[attr-defined]
        entities: int = self._entities  # type: ignore[attr-defined]
        return [
            [
                f"s-{rng.randrange(entities):05d}",
                rng.choice(names),
                round(rng.uniform(0, 100), 3),
                now_ms,
                "good",
                now_ms,
            ]
            for _ in range(count)
        ]
