"""A whole site as real processes, a seeded schedule of kills, and the reckoning.

``ChaosSite`` starts the water-plant simulator (recording ground truth), a Mosquitto on
the files ``fieldtwin broker config`` generates from the hub config (client ids bound,
packet limit, explicit ACL), the hub (``fieldtwin hub run``) and one agent per gateway
(``fieldtwin agent run``), every one a subprocess. ``Schedule.seeded`` draws broker
SIGKILLs, agent SIGKILLs and hub SIGTERM/SIGKILLs; ``ChaosSite.play`` carries them out
(each kill is followed by a restart after a short seeded pause) while a sampler records
the RSS of the hub and the agents. ``ChaosSite.settle`` ends the run so that everything
read was either delivered or lost to a SIGKILL: the simulator's devices stop answering
(a ``dropout`` fault), every agent's buffer drains to the hub, the agents and the hub
stop cleanly. ``ChaosSite.reckon`` then reads the truth and the hub's store and applies
tests/chaos/ledger.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import duckdb
from support.agent_env import AgentEnv, devices_from_example, toml_dumps
from support.broker import MosquittoBroker
from support.sim import SimProcess

from chaos.ledger import Life, Read, Stored, Verdict, reconcile
from fieldtwin.agent.status import read_status
from fieldtwin.hub.api import ApiClient, Endpoint
from fieldtwin.hub.broker import users_from_hub_config
from fieldtwin.hub.state import decode_value
from fieldtwin.protocol.keys import write_key_pair

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]

# gateway → the example agent config it runs. Only its request/response devices (Modbus
# TCP and RTU): the simulator records a pushed serial line as served when it writes it to
# the pty, read or not, so those lines are no ground truth of what an agent received.
GATEWAYS = {"gw-pumps": "pumps", "gw-field": "field"}
JUDGED_PROTOCOLS = ("modbus-tcp", "modbus-rtu")
POLL_MS = 250
FLUSH_MS = 100  # the agent's default group-commit window


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ChaosError(AssertionError):
    """The site did not reach the state a step of the run needs."""


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise ChaosError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(0.2)


class Proc:
    """One restartable subprocess with an appending log file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._handle: IO[bytes] | None = None

    def start(self) -> None:
        self._handle = self.log.open("ab")
        self._handle.write(f"\n--- {time.strftime('%H:%M:%S')} start\n".encode())
        self._handle.flush()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._handle,
            stderr=self._handle,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive and self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int, wait: float = 60.0) -> int:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)
        try:
            code = self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise ChaosError(
                f"{self.name} did not exit within {wait:g} s of signal {signum}"
            ) from None
        finally:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        return code


@dataclass
class Event:
    at_s: float
    kind: str  # broker_kill, agent_kill, hub_term, hub_kill
    target: str
    down_s: float


@dataclass
class Schedule:
    seed: int
    duration_s: float
    events: list[Event]

    @classmethod
    def seeded(
        cls,
        seed: int,
        duration_s: float,
        counts: dict[str, int],
        gateways: list[str],
        *,
        spare: set[str] | None = None,
    ) -> Schedule:
        """``counts`` of each kind, spread over the run at least 4 s apart; agents in
        ``spare`` are never killed (the soak keeps one agent for its memory figures)."""
        rng = random.Random(seed)
        kinds = [kind for kind, n in counts.items() for _ in range(n)]
        rng.shuffle(kinds)
        slots = len(kinds)
        span = duration_s / max(slots, 1)
        victims = [g for g in gateways if g not in (spare or set())]
        events = []
        for i, kind in enumerate(kinds):
            at = i * span + rng.uniform(0.25, 0.75) * max(span - 4.0, 0.5) + 2.0
            target = rng.choice(victims) if kind == "agent_kill" else kind.split("_")[0]
            events.append(Event(round(at, 2), kind, target, round(rng.uniform(0.5, 3.0), 2)))
        return cls(seed, duration_s, events)


@dataclass
class RssSample:
    t_s: float
    role: str
    pid: int
    rss_kib: int


class RssSampler(threading.Thread):
    """Samples VmRSS of the hub and agent processes every ``interval`` seconds."""

    def __init__(self, site: ChaosSite, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.site = site
        self.interval = interval
        self.samples: list[RssSample] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            for role, proc in [("hub", self.site.hub), *self.site.agents.items()]:
                pid = proc.pid if proc is not None else None
                rss = _rss_kib(pid) if pid else None
                if pid and rss:
                    self.samples.append(RssSample(time.monotonic() - self._t0, role, pid, rss))

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(10)


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def memory_growth(samples: list[RssSample], warmup_s: float = 60.0) -> dict[str, Any]:
    """Per role, the least-squares RSS slope (MiB per hour) of its longest-lived
    process, after ``warmup_s`` of that process's life (caches filling are not a leak)."""
    out: dict[str, Any] = {}
    roles = {s.role for s in samples}
    for role in sorted(roles):
        lives: dict[int, list[RssSample]] = {}
        for s in samples:
            if s.role == role:
                lives.setdefault(s.pid, []).append(s)
        life = max(lives.values(), key=lambda one: one[-1].t_s - one[0].t_s)
        span = life[-1].t_s - life[0].t_s
        steady = [s for s in life if s.t_s - life[0].t_s >= min(warmup_s, span / 2)]
        entry: dict[str, Any] = {
            "processes": len(lives),
            "longest_life_s": round(span, 1),
            "rss_mib_start": round(life[0].rss_kib / 1024, 1),
            "rss_mib_end": round(life[-1].rss_kib / 1024, 1),
            "rss_mib_max": round(max(s.rss_kib for s in life) / 1024, 1),
        }
        if len(steady) >= 3 and steady[-1].t_s - steady[0].t_s > 0:
            xs = [s.t_s for s in steady]
            ys = [s.rss_kib / 1024 for s in steady]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
            entry["growth_mib_per_hour"] = round(slope * 3600, 1)
            entry["fitted_over_s"] = round(xs[-1] - xs[0], 1)
        out[role] = entry
    return out


@dataclass
class ChaosSite:
    root: Path
    seed: int
    broker: MosquittoBroker = field(init=False)
    sim: SimProcess = field(init=False)
    hub: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    envs: dict[str, AgentEnv] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    """simulator device → the gateway that reads it"""
    lives: list[Life] = field(default_factory=list)
    starts: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    hub_config: Path = field(init=False)
    database: Path = field(init=False)
    truth_file: Path = field(init=False)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        root = self.root
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.truth_file = root / "truth.duckdb"
        self.sim = SimProcess.start(
            EXAMPLES / "scenarios" / "water-plant.toml",
            "--truth",
            str(self.truth_file),
            "--seed",
            str(self.seed),
            stderr_path=root / "logs" / "simulator.log",
        )
        self.hub_config = self._write_hub_config()
        users, max_frame = users_from_hub_config(self.hub_config)
        self.broker = MosquittoBroker(
            root / "broker",
            site=True,
            max_frame_bytes=max_frame,
            gateways=tuple(u.name for u in users if u.role == "gateway"),
            operators=tuple(u.name for u in users if u.role == "operator"),
        )
        self.broker.start()
        (root / "keys" / "hub.password").write_text(self.broker.passwords["hub"])
        (root / "keys" / "hub.password").chmod(0o600)
        for gateway, example in GATEWAYS.items():
            self._write_agent_config(gateway, example)
        self.hub = Proc(
            "hub", [*FIELDTWIN, "hub", "run", "-c", str(self.hub_config)], root / "logs" / "hub.log"
        )
        self.start_hub()
        for gateway in GATEWAYS:
            self.start_agent(gateway)
        wait_until(self._all_reporting, 90, "every gateway's samples in the hub")

    def _write_hub_config(self) -> Path:
        root = self.root
        keys = root / "keys"
        data = tomllib.loads((EXAMPLES / "hub.toml").read_text(encoding="utf-8"))
        write_key_pair(keys, "hub")
        for gateway in data["gateways"]:
            if gateway not in GATEWAYS:
                write_key_pair(keys, gateway)
            data["gateways"][gateway]["public_key"] = str(keys / f"{gateway}.pub")
        for operator in data.get("operators", {}).values():
            operator["public_key"] = str(keys / "hub.pub")  # registered, never used here
            operator.pop("public_keys", None)
        self.database = root / "state" / "hub.duckdb"
        data["hub"].update(
            {"database": str(self.database), "key": str(keys / "hub.key"), "api_port": 0}
        )
        # rewritten by start_hub once the broker (generated from this registry) runs
        data["broker"] = {"url": "mqtt://127.0.0.1:1", "username": "hub"}
        path = root / "hub.toml"
        path.write_text(toml_dumps(data), encoding="utf-8")
        # the broker is generated from this registry; its port is known afterwards
        self._hub_data = data
        return path

    def _write_agent_config(self, gateway: str, example: str) -> None:
        from fieldtwin.protocol.keys import KeyPair, load_private_key

        hub_key: KeyPair = load_private_key(self.root / "keys" / "hub.key")
        env = AgentEnv.create(self.root / "agents" / gateway, gateway, self.broker, hub_key)
        (self.root / "keys" / f"{gateway}.pub").write_bytes(env.gateway_public.pem())
        devices = [
            spec
            for spec in devices_from_example(example, self.sim.endpoints)
            if spec["protocol"] in JUDGED_PROTOCOLS
        ]
        for spec in devices:
            self.devices[spec["id"]] = gateway
            spec["interval_ms"] = POLL_MS
            spec["max_silence_s"] = 0  # no heartbeats: every stored sample is a read change
            for point in spec["points"]:
                point["deadband"] = 0
        env.write_config(
            devices,
            buffer={"flush_ms": FLUSH_MS, "ack_timeout_s": 10},
            status={"interval_s": 0.5},
        )
        self.envs[gateway] = env
        self.agents[gateway] = Proc(
            gateway,
            [*FIELDTWIN, "agent", "run", "-c", str(env.config_path)],
            self.root / "logs" / f"{gateway}.log",
        )

    # -- components ------------------------------------------------------------------------

    def start_hub(self) -> None:
        self._hub_data["broker"]["url"] = self.broker.url
        self._hub_data["broker"]["password_file"] = str(self.root / "keys" / "hub.password")
        self.hub_config.write_text(toml_dumps(self._hub_data), encoding="utf-8")
        assert self.hub is not None
        self.hub.start()
        wait_until(self._hub_connected, 60, "the hub connected to the broker")

    def _api(self) -> ApiClient:
        endpoint = Endpoint.read(self.database.with_name(self.database.name + ".api.json"))
        assert self.hub is not None
        if endpoint is None or endpoint.pid != self.hub.pid:
            raise ChaosError("the hub's API endpoint is not (yet) this hub's")
        return ApiClient(endpoint, timeout=30)

    def _hub_connected(self) -> bool:
        return bool(self._api().call("/api/status").get("mqtt_connected"))

    def _all_reporting(self) -> bool:
        twin = {e["physical_id"]: e for e in self._api().call("/api/twin")}
        return all(name in twin and twin[name]["attributes"] for name in ("tank-1", "pt-1"))

    def start_agent(self, gateway: str) -> None:
        self.starts[gateway] = now_ms()
        self.agents[gateway].start()

    def end_life(self, gateway: str, *, killed: bool) -> None:
        self.lives.append(Life(gateway, self.starts.pop(gateway), now_ms(), killed))

    def note(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    # -- the schedule ------------------------------------------------------------------------

    def play(self, schedule: Schedule) -> dict[str, int]:
        started = time.monotonic()
        done: dict[str, int] = {}
        for event in schedule.events:
            delay = event.at_s - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            self.note(f"{event.kind} {event.target} (down {event.down_s} s)")
            if event.kind == "broker_kill":
                self.broker.kill()
                time.sleep(event.down_s)
                self.broker.start()
            elif event.kind == "agent_kill":
                proc = self.agents[event.target]
                self.end_life(event.target, killed=True)
                assert proc.signal(signal.SIGKILL) == -signal.SIGKILL
                time.sleep(event.down_s)
                self.start_agent(event.target)
            elif event.kind in ("hub_term", "hub_kill"):
                assert self.hub is not None
                signum = signal.SIGTERM if event.kind == "hub_term" else signal.SIGKILL
                code = self.hub.signal(signum)
                if signum == signal.SIGTERM and code != 0:
                    raise ChaosError(f"the hub exited {code} on SIGTERM; see {self.hub.log}")
                time.sleep(event.down_s)
                self.start_hub()
            done[event.kind] = done.get(event.kind, 0) + 1
            for name, proc in [("hub", self.hub), *self.agents.items()]:
                if proc is not None and not proc.alive:
                    raise ChaosError(f"{name} died on its own; see {proc.log}")
        rest = schedule.duration_s - (time.monotonic() - started)
        if rest > 0:
            time.sleep(rest)
        return done

    # -- the end -----------------------------------------------------------------------------

    def settle(self) -> dict[str, Any]:
        """Stop the reads, drain every buffer to the hub, stop everything cleanly."""
        for device in self.devices:
            self.sim.inject("dropout", device=device)
        time.sleep(1.0)  # a request in flight is answered (and recorded) or never
        self.note("devices stopped answering")

        def drained(gateway: str) -> bool:
            env = self.envs[gateway]
            status = read_status(env.state_dir / "status.json")
            proc = self.agents[gateway]
            return bool(
                status
                and status.get("pid") == proc.pid
                and status["buffer"]["frames"] == 0
                and status["buffer"]["pending_in_memory"] == 0
                and status["uplink"]["connected"]
            )

        for gateway in self.agents:
            wait_until(lambda g=gateway: drained(g), 180, f"{gateway}'s buffer acknowledged")
        self.note("every buffer acknowledged")
        for gateway, proc in self.agents.items():
            self.end_life(gateway, killed=False)
            code = proc.signal(signal.SIGTERM)
            if code != 0:
                raise ChaosError(f"{gateway} exited {code} on SIGTERM; see {proc.log}")
        time.sleep(1.0)
        twin = self._api().call("/api/twin")
        status = self._api().call("/api/status")
        assert self.hub is not None
        code = self.hub.signal(signal.SIGTERM)
        if code != 0:
            raise ChaosError(f"the hub exited {code} on SIGTERM; see {self.hub.log}")
        served_dropped = int(self.sim.status().get("served_rows_dropped", 0))
        sim_code = self.sim.stop()
        self.broker.stop()
        if sim_code != 0:
            raise ChaosError(f"the simulator exited {sim_code}: {self.sim.log[-2000:]}")
        return {"twin": twin, "status": status, "served_rows_dropped": served_dropped}

    def stop_all(self) -> None:
        """Best-effort cleanup after a failure."""
        for proc in [*self.agents.values(), self.hub]:
            if proc is not None and proc.alive:
                with contextlib.suppress(Exception):
                    proc.signal(signal.SIGKILL, wait=10)
        with contextlib.suppress(Exception):
            self.sim.stop()
        with contextlib.suppress(Exception):
            self.broker.stop()

    def reckon(self, twin: list[dict[str, Any]]) -> tuple[Verdict, list[str]]:
        """The ledger over truth and history, and the current-state check."""
        devices = self.devices
        truth = duckdb.connect(str(self.truth_file), read_only=True)
        try:
            rows = truth.execute(
                "SELECT point, device, wall_ms, value FROM served "
                "WHERE status = 'good' AND list_contains(?, device) ORDER BY rowid",
                [list(devices)],
            ).fetchall()
        finally:
            truth.close()
        gateway_of = {point: devices[device] for point, device, _, _ in rows}
        reads = [Read(point, int(wall), float(value)) for point, _, wall, value in rows]
        store = duckdb.connect(str(self.database), read_only=True)
        try:
            history = store.execute(
                "SELECT h.entity || '.' || h.attribute, f.gateway, h.ts_ms, h.kind, h.num, "
                "h.txt, h.quality FROM history h JOIN frames f ON f.id = h.frame_id "
                "WHERE list_contains(?, f.gateway)",
                [list(GATEWAYS)],
            ).fetchall()
            newest = store.execute(
                "SELECT entity || '.' || attribute, ts_ms, kind, num, txt FROM history "
                "QUALIFY row_number() OVER (PARTITION BY entity, attribute ORDER BY ts_ms DESC, "
                "(quality = 3) DESC, quality ASC, kind DESC, coalesce(num, 0) DESC, "
                "coalesce(txt, '') DESC) = 1"
            ).fetchall()
        finally:
            store.close()
        stored = [
            Stored(point, gateway, int(ts), decode_value(kind, num, txt), int(quality))
            for point, gateway, ts, kind, num, txt, quality in history
        ]
        verdict = reconcile(reads, stored, self.lives, gateway_of)
        state_problems = []
        current = {
            f"{e['physical_id']}.{name}": attr
            for e in twin
            for name, attr in e["attributes"].items()
        }
        for point, ts, kind, num, txt in newest:
            value = decode_value(kind, num, txt)
            held = current.get(point)
            if held is None:
                state_problems.append(f"{point}: in history, not in the twin")
            elif held["ts_ms"] != ts or held["value"] != value:
                state_problems.append(
                    f"{point}: twin {held['value']!r} at {held['ts_ms']}, newest history "
                    f"{value!r} at {ts}"
                )
        return verdict, state_problems


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def report_json(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)
