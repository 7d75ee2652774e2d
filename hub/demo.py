"""``fieldtwin demo``: the whole pipeline on one machine, with one command.

It starts real components as subprocesses — an MQTT broker (amqtt, embedded, unless
``--broker URL``), the water-plant simulator (``fieldtwin sim run ... --ephemeral
--json``), one edge agent per device family (``fieldtwin agent run -c ...``, configs
made from examples/agents/*.toml with the simulator's endpoints) and the hub
(``fieldtwin hub run -c ...``, config made from examples/hub.toml) — so this module
imports neither agent nor simulator code. Keys, configs and databases live under
``--state-dir`` (default: ``$XDG_DATA_HOME/fieldtwin``); keys and databases are created
on the first run and reused afterwards, configs are rewritten on every run (the
simulator's ports change). Component logs go to ``STATE/logs/``.

Interactive, it opens the operator console (hub/console/) logged in as the demo
operator, and prints the simulator's control address and a fault to inject; quitting
the console (q) stops everything. ``--headless --duration S --report FILE`` runs
unattended, then writes the sync report (sync_report shape) and exits 1 if the
pipeline broke: a component died, a gateway delivered nothing, a declared entity
never reached the twin, or the twin does not match the simulator's ground truth within tolerance.

With ``--broker URL`` each component logs in with the password in
``STATE/keys/<user>.password`` when that file exists (users: ``hub`` and the gateway
ids), as a site Mosquitto with the project's ACL requires.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fieldtwin.hub.config import load_hub_config
from fieldtwin.hub.errors import DemoError, HubError
from fieldtwin.hub.paths import default_state_dir
from fieldtwin.hub.report import RunFacts, pipeline_problems, sync_report
from fieldtwin.protocol.aio import within
from fieldtwin.protocol.logfmt import fields

log = logging.getLogger("fieldtwin.hub.demo")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
FIELDTWIN = [sys.executable, "-m", "fieldtwin.protocol.cli"]


def examples_dir() -> Path:
    """The repository's examples/ folder (the demo runs from a source checkout)."""
    candidate = PACKAGE_ROOT / "examples"
    if not (candidate / "hub.toml").is_file():
        raise DemoError(
            f"cannot find the example configs in {candidate}; the demo runs from a source "
            "checkout installed with 'pip install -e .'"
        )
    return candidate


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- TOML writing ---------------------------------------------------------------------------


def toml_dumps(data: Mapping[str, Any]) -> str:
    """The configs the demo generates, written with tomli-w (a maintained TOML writer)."""
    import tomli_w

    return tomli_w.dumps(dict(data))


# -- the state folder -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    @property
    def hub_config(self) -> Path:
        return self.root / "hub.toml"

    @property
    def database(self) -> Path:
        return self.root / "hub.duckdb"

    def password_file(self, user: str) -> Path:
        return self.keys / f"{user}.password"

    def operator_profile(self, operator: str) -> Path:
        return self.root / "operators" / f"{operator}.toml"


def example_gateways(examples: Path) -> dict[str, Path]:
    """Gateway id → example agent config, one per device family."""
    out: dict[str, Path] = {}
    for path in sorted((examples / "agents").glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        out[str(data["gateway"])] = path
    if not out:
        raise DemoError(f"no agent configs in {examples / 'agents'}")
    return out


def ensure_keys(layout: Layout, names: Sequence[str]) -> list[str]:
    """Create the key pairs that do not exist yet; returns the names created."""
    from fieldtwin.protocol.keys import write_key_pair

    created = []
    for name in names:
        if not (layout.keys / f"{name}.key").exists():
            write_key_pair(layout.keys, name)
            created.append(name)
    return created


def agent_config(
    layout: Layout,
    example: Path,
    endpoints: Mapping[str, Any],
    broker_url: str,
    heartbeat_s: float | None = None,
    approvers: Sequence[str] = (),
) -> dict[str, Any]:
    """An example agent config pointed at this run's simulator, broker and keys.

    ``heartbeat_s`` caps each device's report-by-exception heartbeat (``max_silence_s``),
    so the hub tells a frozen sensor (fresh, unchanging) from a silent one in seconds.
    """
    data = tomllib.loads(example.read_text(encoding="utf-8"))
    gateway = str(data["gateway"])
    served = {d["id"]: d for d in endpoints.get("devices", [])}
    for device in data.get("devices", []):
        if heartbeat_s is not None:
            device["max_silence_s"] = min(float(device.get("max_silence_s", 60.0)), heartbeat_s)
        sim = served.get(device["id"])
        if sim is None:
            raise DemoError(f"the simulator serves no device {device['id']!r} ({example})")
        if device["protocol"] == "modbus-tcp":
            device["host"], device["port"] = sim["host"], sim["port"]
        elif device["protocol"] in ("modbus-rtu", "serial-line"):
            device["path"] = sim["path"]
        elif device["protocol"] == "opcua":
            device["url"] = sim["url"]
    data["state_dir"] = str(layout.agents / gateway)
    data["keys"] = {
        "private": str(layout.keys / f"{gateway}.key"),
        "hub_public": str(layout.keys / "hub.pub"),
    }
    broker = dict(data.get("broker", {}))
    broker["url"] = broker_url
    broker.pop("password_file", None)
    broker.pop("password", None)
    if layout.password_file(gateway).exists():
        broker["password_file"] = str(layout.password_file(gateway))
    broker.setdefault("reconnect_max_s", 5.0)
    data["broker"] = broker
    if approvers:
        # defence in depth: the gateway itself checks the operators' approvals
        data["approvals"] = {
            "operators": {name: str(layout.keys / f"{name}.pub") for name in approvers},
            "required": 1,
        }
    return data


def hub_config(
    layout: Layout,
    example: Path,
    broker_url: str,
    gateways: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """examples/hub.toml with this state folder's database, keys and broker."""
    data = tomllib.loads(example.read_text(encoding="utf-8"))
    data["hub"].update(
        {"database": str(layout.database), "key": str(layout.keys / "hub.key"), "api_port": 0}
    )
    broker: dict[str, Any] = {"url": broker_url, "username": "hub"}
    if layout.password_file("hub").exists():
        broker["password_file"] = str(layout.password_file("hub"))
    data["broker"] = broker
    declared = data.get("gateways", {})
    data["gateways"] = {
        gw: {**declared.get(gw, {}), "public_key": str(layout.keys / f"{gw}.pub")}
        for gw in gateways
    }
    for name, operator in data.get("operators", {}).items():
        operator["public_key"] = str(layout.keys / f"{name}.pub")
    _deep_merge(data, overrides or {})
    return data


def example_operators(examples: Path) -> dict[str, list[str]]:
    """Operator id → roles, as examples/hub.toml declares them (the demo's operators)."""
    data = tomllib.loads((examples / "hub.toml").read_text(encoding="utf-8"))
    return {name: list(spec.get("roles", [])) for name, spec in data.get("operators", {}).items()}


def write_operator_profiles(layout: Layout, operators: Sequence[str], broker_url: str) -> None:
    """``STATE/operators/NAME.toml`` for each demo operator (``fieldtwin cmd --profile``)."""
    from fieldtwin.hub.opclient import OperatorProfile, write_profile

    for name in operators:
        password_file = layout.password_file(name)
        write_profile(
            layout.operator_profile(name),
            OperatorProfile(
                operator=name,
                key_file=layout.keys / f"{name}.key",
                hub_key_file=layout.keys / "hub.pub",
                broker_url=broker_url,
                username=name,
            ),
            password_file if password_file.exists() else None,
        )


def _deep_merge(target: dict[str, Any], changes: Mapping[str, Any]) -> None:
    """Merge ``changes`` into ``target``: tables merge key by key, everything else
    (values, arrays of tables) replaces; a ``"+entities"`` key appends to that array."""
    for key, value in changes.items():
        if key.startswith("+"):
            target.setdefault(key[1:], []).extend(value)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


# -- processes ------------------------------------------------------------------------------


class Component:
    """One subprocess with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self.stopping = False

    async def start(self, *, stdout_pipe: bool = False) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(
            f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.argv)}\n".encode()
        )
        self._log.flush()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,  # Ctrl+C reaches the demo only; it stops the rest in order
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def read_json_line(self, timeout_s: float) -> dict[str, Any]:
        if self.process is None or self.process.stdout is None:
            raise DemoError(f"{self.name} was not started with a stdout pipe")
        try:
            line = await within(timeout_s, self.process.stdout.readline())
        except TimeoutError:
            raise DemoError(
                f"{self.name} printed nothing within {timeout_s:g} s; see {self.log_path}"
            ) from None
        if not line:
            await self.process.wait()
            raise DemoError(
                f"{self.name} exited with status {self.process.returncode} before it was ready; "
                f"see {self.log_path}"
            )
        try:
            data: dict[str, Any] = json.loads(line)
        except ValueError:
            raise DemoError(f"{self.name} printed {line[:200]!r}, not a JSON line") from None
        return data

    async def stop(self, signum: int = signal.SIGTERM, grace: float = 20.0) -> int | None:
        self.stopping = True
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            try:
                await within(grace, process.wait())
            except TimeoutError:
                log.warning("component did not stop; killing it", extra=fields(component=self.name))
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.stdout is not None:
            with contextlib.suppress(Exception):
                await process.stdout.read()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    async def kill(self) -> None:
        """SIGKILL: no clean shutdown (a gateway killed in the field)."""
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


# -- the plant ------------------------------------------------------------------------------


@dataclass
class PlantOptions:
    state_dir: Path
    broker_url: str | None = None
    speed: float = 1.0
    seed: int | None = None
    scenario: Path | None = None
    hub_overrides: dict[str, Any] = field(default_factory=dict)
    """Merged into the generated hub config (tests use it for faster limits)."""
    agent_edit: Callable[[str, dict[str, Any]], None] | None = None
    """Called with (gateway, config data) before each agent config is written."""
    heartbeat_s: float | None = 5.0
    """Agents' heartbeat (max_silence_s cap) and the hub's default expected interval."""
    gateways: Sequence[str] | None = None
    """Gateways to run agents for (default: every example config)."""


class Plant:
    """Broker, simulator, agents and hub as subprocesses; start, inspect, stop."""

    def __init__(self, options: PlantOptions) -> None:
        self.options = options
        self.examples = examples_dir()
        self.layout = Layout(options.state_dir.expanduser().resolve())
        self.broker: Component | None = None
        self.broker_url = options.broker_url or ""
        self.sim: Component | None = None
        self.endpoints: dict[str, Any] = {}
        self.hub: Component | None = None
        self.agents: dict[str, Component] = {}
        self.agent_configs: dict[str, Path] = {}
        self.started_ms = 0
        self.created_keys: list[str] = []
        self.all_gateways = example_gateways(self.examples)
        self.operators: dict[str, list[str]] = {}

    @property
    def components(self) -> list[Component]:
        parts = [self.broker, self.sim, self.hub, *self.agents.values()]
        return [c for c in parts if c is not None]

    def dead(self) -> list[Component]:
        """Components that exited without being asked to."""
        return [c for c in self.components if not c.alive and not c.stopping]

    async def start(self) -> None:
        layout = self.layout
        for folder in (layout.root, layout.keys, layout.logs, layout.agents):
            folder.mkdir(parents=True, exist_ok=True)
        gateways = list(self.options.gateways or self.all_gateways)
        self.operators = example_operators(self.examples)
        self.created_keys = ensure_keys(layout, ["hub", *self.all_gateways, *self.operators])
        self.started_ms = int(time.time() * 1000)
        if not self.broker_url:
            port = free_port()
            self.broker = Component(
                "broker",
                [sys.executable, "-m", "fieldtwin.hub.embedded_broker", "--port", str(port)],
                layout.logs / "broker.log",
            )
            await self.broker.start(stdout_pipe=True)
            self.broker_url = str((await self.broker.read_json_line(30))["url"])
        scenario = self.options.scenario or self.examples / "scenarios" / "water-plant.toml"
        argv = [*FIELDTWIN, "sim", "run", str(scenario), "--ephemeral", "--json"]
        argv += ["--speed", f"{self.options.speed:g}"]
        if self.options.seed is not None:
            argv += ["--seed", str(self.options.seed)]
        self.sim = Component("simulator", argv, layout.logs / "simulator.log")
        await self.sim.start(stdout_pipe=True)
        self.endpoints = await self.sim.read_json_line(90)
        heartbeat: dict[str, Any] = {}
        if self.options.heartbeat_s is not None:
            heartbeat["drift"] = {"default_interval_s": self.options.heartbeat_s}
        config = hub_config(
            layout, self.examples / "hub.toml", self.broker_url, list(self.all_gateways), heartbeat
        )
        _deep_merge(config, self.options.hub_overrides)
        layout.hub_config.write_text(toml_dumps(config), encoding="utf-8")
        write_operator_profiles(layout, list(self.operators), self.broker_url)
        self.hub = Component(
            "hub", [*FIELDTWIN, "hub", "run", "-c", str(layout.hub_config)], layout.logs / "hub.log"
        )
        await self.hub.start()
        await self.wait_for_hub()
        for gateway in gateways:
            data = agent_config(
                layout,
                self.all_gateways[gateway],
                self.endpoints,
                self.broker_url,
                self.options.heartbeat_s,
                [n for n, roles in self.operators.items() if {"approver", "admin"} & set(roles)],
            )
            if self.options.agent_edit is not None:
                self.options.agent_edit(gateway, data)
            path = layout.agents / f"{gateway}.toml"
            path.write_text(toml_dumps(data), encoding="utf-8")
            self.agent_configs[gateway] = path
            await self.start_agent(gateway)
        await self.wait_for_agents()

    async def wait_for_agents(self, within: float = 30.0) -> None:
        """Until every agent's gateway is online at the hub; an agent that exits first is
        an error naming its last log line (a buffer still held by an orphaned agent, a
        bad config), not a plant that looks up with silent gateways."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for agent in self.agents.values():
                if not agent.alive and not agent.stopping:
                    lines = [
                        line
                        for line in agent.log_path.read_text(errors="replace").splitlines()
                        if line.strip() and not line.startswith("---")
                    ]
                    raise DemoError(
                        f"agent {agent.name} exited with status {agent.returncode}: "
                        f"{lines[-1] if lines else 'no output'} (log {agent.log_path})"
                    )
            with contextlib.suppress(HubError):
                status = await self.call("/api/status")
                online = {g["id"] for g in status.get("gateways", []) if g.get("online")}
                if set(self.agents) <= online:
                    return
            await asyncio.sleep(0.25)

    async def start_agent(self, gateway: str) -> Component:
        agent = Component(
            gateway,
            [*FIELDTWIN, "agent", "run", "-c", str(self.agent_configs[gateway])],
            self.layout.logs / f"{gateway}.log",
        )
        await agent.start()
        self.agents[gateway] = agent
        return agent

    async def wait_for_hub(self, within: float = 60.0) -> None:
        from fieldtwin.hub.api import ApiClient, Endpoint

        deadline = time.monotonic() + within
        endpoint_file = self.layout.database.with_name(self.layout.database.name + ".api.json")
        while time.monotonic() < deadline:
            if self.hub is not None and not self.hub.alive:
                raise DemoError(
                    f"the hub exited with status {self.hub.returncode}; see {self.hub.log_path}"
                )
            endpoint = Endpoint.read(endpoint_file)
            process = self.hub.process if self.hub is not None else None
            if endpoint is not None and process is not None and endpoint.pid == process.pid:
                with contextlib.suppress(HubError):
                    status = await asyncio.to_thread(ApiClient(endpoint, 5).call, "/api/status")
                    if status.get("mqtt_connected"):
                        return
            await asyncio.sleep(0.2)
        raise DemoError(
            f"the hub did not come up within {within:g} s; see {self.layout.logs / 'hub.log'}"
        )

    def api(self) -> Any:
        from fieldtwin.hub.api import ApiClient, Endpoint

        endpoint = Endpoint.read(
            self.layout.database.with_name(self.layout.database.name + ".api.json")
        )
        if endpoint is None:
            raise DemoError("the hub's API endpoint file is missing")
        return ApiClient(endpoint, timeout=30)

    async def call(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        client = self.api()
        return await asyncio.to_thread(client.call, path, params)

    async def sim_call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """The simulator's loopback control interface (faults, truth)."""
        import urllib.request

        url = f"http://{self.endpoints['control']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")

        def go() -> Any:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        try:
            return await asyncio.to_thread(go)
        except OSError as exc:
            raise DemoError(f"the simulator's control interface {url} failed: {exc}") from None

    async def truth(self) -> dict[str, Any]:
        """The simulator's current true and reported value of every point it serves."""
        points: dict[str, Any] = (await self.sim_call("GET", "/truth")).get("points", {})
        return points

    async def stop(self) -> dict[str, int | None]:
        """Agents first (their last samples and planned-shutdown deaths reach the hub,
        which records but does not alarm a planned stop), then hub, simulator, broker."""
        codes: dict[str, int | None] = {}
        results = await asyncio.gather(*(a.stop(signal.SIGTERM) for a in self.agents.values()))
        codes.update(zip(self.agents, results, strict=True))
        if self.hub is not None:
            codes["hub"] = await self.hub.stop(signal.SIGTERM)
        if self.sim is not None:
            codes["simulator"] = await self.sim.stop(signal.SIGINT)
        if self.broker is not None:
            codes["broker"] = await self.broker.stop(signal.SIGTERM)
        return codes


# -- comparing the twin with the simulator's truth ------------------------------------------


def truth_tolerance(true_value: float, noise: float = 0.0) -> float:
    """How far a twin value may be from the truth: quantisation, report-by-exception
    deadbands and a second or two of transport lag (3 %, at least 0.05), or the
    sensor's own measurement noise where that is wider (4 sigma: a sample outside it
    happens once in ~16,000, so a mismatch means the twin is wrong, not unlucky)."""
    return max(0.05, 0.03 * abs(true_value), 4.0 * noise)


def compare_with_truth(
    entities: Sequence[Mapping[str, Any]],
    truth: Mapping[str, Mapping[str, Any]],
    since_ms: int = 0,
) -> tuple[list[str], list[str]]:
    """(matches, mismatches) of every twin attribute the simulator knows, as text.

    Only values received since ``since_ms`` (when this simulator started) are compared:
    a value from before is the previous simulator's, and a restarted device (a counter
    back at zero) has not necessarily reported yet."""
    matches: list[str] = []
    mismatches: list[str] = []
    for entity in entities:
        for name, attr in sorted(entity["attributes"].items()):
            point = f"{entity['physical_id']}.{name}"
            known = truth.get(point)
            if known is None or attr["quality"] != "good":
                continue
            if (attr.get("received_ms") or 0) < since_ms:
                continue
            expected, actual = known.get("true"), attr["value"]
            if isinstance(expected, bool) or isinstance(actual, bool):
                ok = bool(expected) == bool(actual)
                text = f"{point}: twin {actual} vs true {expected}"
            elif isinstance(expected, int | float) and isinstance(actual, int | float):
                tolerance = truth_tolerance(float(expected), float(known.get("noise") or 0.0))
                ok = abs(float(actual) - float(expected)) <= tolerance
                text = f"{point}: twin {actual:.4g} vs true {expected:.4g} (±{tolerance:.3g})"
            else:
                continue
            (matches if ok else mismatches).append(text)
    return matches, mismatches


# -- the sync report --------------------------------------------------------------------------


def _iso(ms: int) -> str:
    from fieldtwin.hub.queries import iso

    return iso(ms) or ""


# -- the command --------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the whole pipeline (broker, simulator, agents, hub) on this machine",
        description=(
            "Start an embedded MQTT broker (unless --broker), the water-plant simulator, "
            "one edge agent per device family and the hub, with keys, configs and "
            "databases under --state-dir (created on the first run, reused later), and "
            "open the operator console as the demo operator alice (q quits and stops "
            "everything; so does Ctrl+C). With --headless "
            "--duration S --report FILE it runs unattended, writes a JSON sync report and "
            "exits 1 if the pipeline broke."
        ),
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"keys, configs, databases and logs (default: {default_state_dir()})",
    )
    demo.add_argument(
        "--broker", help="use this broker (mqtt://HOST:PORT) instead of the embedded one"
    )
    demo.add_argument("--speed", type=float, default=1.0, help="simulation speed (default 1)")
    demo.add_argument("--seed", type=int, default=None, help="simulator seed")
    demo.add_argument("--headless", action="store_true", help="no console; needs --duration")
    demo.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    demo.add_argument("--report", type=Path, default=None, help="write the sync report (JSON) here")
    demo.add_argument(
        "--no-commands",
        action="store_true",
        help="headless: skip the operator scenario (propose, approve, refuse, roll back)",
    )
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.headless and args.duration is None:
        print("fieldtwin: error: --headless needs --duration SECONDS", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("fieldtwin: error: --duration must be positive", file=sys.stderr)
        return 2
    if args.broker:
        from fieldtwin.hub.config import parse_broker_url

        parse_broker_url(args.broker)
    options = PlantOptions(
        state_dir=args.state_dir or default_state_dir(),
        broker_url=args.broker,
        speed=args.speed,
        seed=args.seed,
    )
    try:
        return asyncio.run(run_demo(options, args))
    except DemoError as exc:
        print(f"fieldtwin: error: {exc}", file=sys.stderr)
        return 1


async def run_demo(options: PlantOptions, args: argparse.Namespace) -> int:
    plant = Plant(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a closed terminal stops the demo in order (its components run in
    # their own sessions and would otherwise outlive it)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    interactive = not args.headless
    if interactive:
        print(f"fieldtwin demo: starting in {plant.layout.root} (logs in {plant.layout.logs}) ...")
    problems: list[str] = []
    try:
        try:
            await plant.start()
        except DemoError:
            raise
        if interactive:
            print(f"broker {plant.broker_url}; hub, simulator and {len(plant.agents)} agents up")
        started = time.monotonic()
        deadline = started + args.duration if args.duration else None
        scenario: asyncio.Task[list[str]] | None = None
        if not interactive and not args.no_commands:
            scenario = asyncio.create_task(
                operator_scenario(plant, deadline), name="demo-operator-scenario"
            )
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if plant.dead():
                break
            if interactive:
                await console_view(plant, stop, deadline)
                break
            wait = 1.0  # headless: check the deadline and the components once a second
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await within(wait, stop.wait())
        steps: list[str] = []
        if scenario is not None:
            if not scenario.done():
                scenario.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                steps = await scenario
        facts = await gather_facts(plant, time.monotonic() - started)
        document = await plant.call("/api/export")
        commands = await plant.call("/api/commands", {"limit": 1000})
        config = load_hub_config(plant.layout.hub_config)
        report = sync_report(document, facts, commands, config, plant.layout.root)
        problems = pipeline_problems(facts)
        for step in steps:
            print(f"  {step}")
        if args.report is not None:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(
                json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8"
            )
        summary = (
            f"fieldtwin demo: {report['status']}; {len(document['digital_twin']['entities'])} "
            f"entities, {report['drift_report']['anomalies_detected']} drift issue(s), "
            f"verification {report['verification']['result']}"
            + (f"; report {args.report}" if args.report else "")
        )
        print(summary)
        for problem in problems:
            print(f"  problem: {problem}", file=sys.stderr)
    finally:
        codes = await plant.stop()
        if interactive:
            print("stopped: " + ", ".join(f"{k} {v}" for k, v in codes.items()))
    return 1 if problems else 0


async def operator_scenario(plant: Plant, deadline: float | None) -> list[str]:
    """What the headless demo does as its operators (alice proposes, bob approves):

    1. raise the pump's speed setpoint and see the device follow (verified);
    2. try to close the outlet valve while the pump runs (refused by an interlock);
    3. raise the setpoint again while the simulator's actuator ignores one write: the
       command fails verification and is rolled back to its checkpoint;
    4. put the setpoint back where the plant started.

    Returns one line per step. Each command goes through the real operator channel
    (signed requests over the broker), the policy, the gateway's approval check and the
    device; the report is then built from these records."""
    from fieldtwin.hub.opclient import OperatorClient, OperatorError, OperatorProfile

    log_lines: list[str] = []
    point = "pump-1.speed_sp"

    def left() -> float:
        return 60.0 if deadline is None else max(1.0, deadline - time.monotonic())

    async def wait_reported() -> Any:
        end = time.monotonic() + min(60.0, left())
        while time.monotonic() < end:
            twin = {e["physical_id"]: e for e in await plant.call("/api/twin")}
            attrs = twin.get("pump-1", {}).get("attributes", {})
            level = twin.get("tank-1", {}).get("attributes", {}).get("level")
            if "speed_sp" in attrs and level is not None and level["quality"] == "good":
                return attrs["speed_sp"]["value"]
            await asyncio.sleep(0.5)
        raise DemoError("the pump's setpoint never reached the twin")

    alice = OperatorClient(OperatorProfile.load(plant.layout.operator_profile("alice")))
    bob = OperatorClient(OperatorProfile.load(plant.layout.operator_profile("bob")))

    async def settle(command_id: str) -> dict[str, Any]:
        end = time.monotonic() + min(60.0, left())
        while True:
            row: dict[str, Any] = await bob.request("cmd.show", {"cmd_id": command_id})
            if row["closed_ms"] is not None or time.monotonic() > end:
                return row
            await asyncio.sleep(0.5)

    async def change(value: Any, reason: str) -> dict[str, Any]:
        proposed = await alice.request(
            "cmd.propose", {"target": point, "value": value, "reason": reason}
        )
        if proposed["state"] != "awaiting_approval":
            return dict(proposed)
        await bob.request("cmd.approve", bob.approval_for(proposed))
        return await settle(proposed["id"])

    def note(row: Mapping[str, Any], what: str) -> None:
        line = f"{what}: {row['id']} {row['state'].replace('_', ' ')} — {row.get('outcome', '')}"
        log_lines.append(line)
        log.info("demo operator scenario", extra=fields(step=line))

    try:
        async with alice.connected(), bob.connected():
            start = await wait_reported()
            target = 1200 if start != 1200 else 1000
            note(await change(target, "demo: raise inflow"), f"{point} {start} → {target}")
            refused = await alice.request(
                "cmd.propose",
                {"target": "valve-1.position", "value": 2.0, "reason": "demo: close outlet"},
            )
            note(refused, "valve-1.position → 2 % while the pump runs")
            await plant.sim_call(
                "POST",
                "/faults",
                {"kind": "ignore_writes", "point": point, "params": {"count": 1}},
            )
            note(
                await change(target + 300, "demo: raise inflow further"),
                f"{point} {target} → {target + 300} with an actuator that ignores the write",
            )
            await plant.sim_call("POST", "/faults/clear", {})
            note(await change(start, "demo: back to the starting setpoint"), f"{point} → {start}")
    except (OperatorError, DemoError) as exc:
        log_lines.append(f"operator scenario stopped: {exc}")
    return log_lines


async def gather_facts(plant: Plant, duration_s: float) -> RunFacts:
    status = await plant.call("/api/status")
    entities = await plant.call("/api/twin")
    audit = await plant.call("/api/audit", {"limit": 50})
    by_gateway = {g["id"]: g for g in status["gateways"]}
    silent = [gw for gw in plant.agents if not by_gateway.get(gw, {}).get("points")]
    missing = sorted(e["physical_id"] for e in entities if e["declared"] and not e["attributes"])
    truth: dict[str, Any] = {}
    truth_file = plant.endpoints.get("ground_truth")
    if plant.sim is not None and plant.sim.alive:
        with contextlib.suppress(DemoError):
            truth = await plant.truth()
    # fresh values only: a second read after the truth narrows the lag
    entities = await plant.call("/api/twin")
    matches, mismatches = compare_with_truth(entities, truth, plant.started_ms)
    risk: dict[str, Any] | None = None
    with contextlib.suppress(DemoError):
        risk = await plant.call("/api/risk")
    return RunFacts(
        broker_url=plant.broker_url,
        embedded_broker=plant.broker is not None,
        started_ms=plant.started_ms,
        duration_s=duration_s,
        dead=[c.name for c in plant.dead()],
        silent_gateways=silent,
        missing_entities=missing,
        truth_matches=matches,
        truth_mismatches=mismatches,
        truth_file=truth_file,
        status=status,
        audit=audit,
        risk=risk,
    )


DEMO_OPERATOR = "alice"
"""The interactive demo opens the console as this operator (examples/hub.toml)."""


def demo_hints(plant: Plant) -> list[str]:
    """What the demo prints and the console's help shows: how to poke this plant."""
    control = plant.endpoints.get("control", "127.0.0.1:17100")
    root = plant.layout.root
    return [
        f"state {root} (logs in {plant.layout.logs}); broker {plant.broker_url}",
        f"simulator control address: {control}",
        "inject a fault (in another terminal, with the virtualenv active):",
        f"  fieldtwin sim fault inject stuck --point tank-1.level --value 4.9 --control {control}",
        f"  fieldtwin sim fault clear --all --control {control}",
        "approve as the second person (two-person rule):",
        f"  fieldtwin console --state-dir {root} --operator bob",
    ]


async def console_view(plant: Plant, stop: asyncio.Event, deadline: float | None) -> None:
    """The interactive demo: the operator console, logged in as the demo operator, until
    the operator quits (q), the demo is stopped (SIGTERM) or ``--duration`` is over."""
    from fieldtwin.hub.console.app import ConsoleApp
    from fieldtwin.hub.opclient import OperatorClient, OperatorProfile

    hints = demo_hints(plant)
    for hint in hints:
        print(hint)
    profile = OperatorProfile.load(plant.layout.operator_profile(DEMO_OPERATOR))
    app = ConsoleApp(lambda: OperatorClient(profile), hints=hints)

    async def watch() -> None:
        reported: set[str] = set()
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            for component in plant.dead():
                if component.name not in reported:
                    reported.add(component.name)
                    app.notify(
                        f"{component.name} exited ({component.returncode}); see "
                        f"{component.log_path}",
                        title="demo component died",
                        severity="error",
                        timeout=30,
                    )
            with contextlib.suppress(TimeoutError):
                await within(1.0, stop.wait())
        app.exit()

    watcher = asyncio.create_task(watch(), name="demo-watch")
    try:
        await app.run_async()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    for hint in hints[1:5]:
        print(hint)
