"""Run the hardware simulator as a real subprocess for integration tests.

``SimProcess`` starts ``fieldtwin sim run SCENARIO --ephemeral --json``, waits
for the one endpoints-JSON line on stdout (docs/water-plant.md, "Simulator endpoints
JSON"), and stops the process cleanly (SIGINT, then SIGKILL after a grace period).
It talks to the simulator's loopback control interface over plain HTTP (status,
faults, truth), so tests never need simulator code: the simulator is a device.

    sim = SimProcess.start(WATER_PLANT, "--speed", "10", "--truth", str(tmp / "t.duckdb"))
    sim.device("pump-station")["port"]
    sim.inject("dropout", device="field-bus", unit_id=2)
    sim.truth("tank-1.level")["points"]["tank-1.level"]["true"]
    sim.inject("wrong_value", point="valve-1.position", params={"offset": -20.0, "count": 1})
    sim.writes("valve-1.position")   # [{"value": written, "result": became, "status", ...}]
    assert sim.stop() == 0, sim.log

``SimulatorProcess(scenario, speed=..., truth=..., stderr_path=...)`` with ``.start()``
is the same thing with keyword options; ``wait_until`` / ``wait_for`` poll a condition.

Used by tests/sim (simulator tests) and tests/agent (agent integration tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
WATER_PLANT = ROOT / "examples" / "scenarios" / "water-plant.toml"


class SimulatorError(RuntimeError):
    pass


class SimProcess:
    """One simulator process. Create it with ``SimProcess.start(scenario, *args)``."""

    def __init__(
        self,
        scenario: Path | str = WATER_PLANT,
        extra_args: Sequence[str] = (),
        *,
        startup_timeout: float = 60.0,
        stderr_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.scenario = Path(scenario)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.stderr_path = stderr_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}
        self._stderr_file: IO[bytes] | None = None

    @classmethod
    def start(
        cls,
        scenario: Path | str = WATER_PLANT,
        *extra: str,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        stderr_path: Path | None = None,
    ) -> SimProcess:
        """Start ``sim run SCENARIO --ephemeral --json *extra`` and wait for its endpoints."""
        sim = cls(scenario, extra, startup_timeout=timeout, stderr_path=stderr_path, env=env)
        sim.launch()
        return sim

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            "from fieldtwin.protocol.cli import main; raise SystemExit(main())",
            "sim",
            "run",
            str(self.scenario),
            "--ephemeral",
            "--json",
            *self.extra_args,
        ]

    def launch(self) -> dict[str, Any]:
        """Start the process and return its endpoints once every server listens."""
        if self.stderr_path is None:
            handle, name = tempfile.mkstemp(prefix="fieldtwin-sim-", suffix=".log")
            os.close(handle)
            self.stderr_path = Path(name)
        self._stderr_file = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            cwd=ROOT,
            env={**os.environ, **(self.env or {})},
        )
        stdout = self.process.stdout
        assert stdout is not None
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.startup_timeout)
        if not line or not line[0].strip():
            code = self.stop()
            raise SimulatorError(
                f"simulator printed no endpoints within {self.startup_timeout}s "
                f"(exit {code}): {self.log[-3000:]}"
            )
        try:
            self.endpoints = json.loads(line[0])
        except ValueError as exc:
            self.stop()
            raise SimulatorError(f"simulator printed {line[0][:200]!r}, not JSON: {exc}") from None
        return self.endpoints

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        """Everything the simulator wrote to stderr (its logfmt log)."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_bytes().decode(errors="replace")

    stderr = log

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, wait, SIGKILL if needed; returns the exit status."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        return process.returncode

    def kill(self) -> None:
        """SIGKILL: the devices vanish without goodbye (ptys close, sockets reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> SimProcess:
        if self.process is None:
            self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- endpoints and control --------------------------------------------------------

    def device(self, device_id: str) -> dict[str, Any]:
        for device in self.endpoints.get("devices", []):
            if device["id"] == device_id:
                return dict(device)
        raise KeyError(f"simulator has no device {device_id!r}")

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """One request to the control interface; returns the decoded JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://{self.endpoints['control']}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise SimulatorError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    control = request

    def status(self) -> Any:
        return self.request("GET", "/status")

    def truth(self, *points: str) -> Any:
        query = urllib.parse.urlencode([("point", p) for p in points])
        return self.request("GET", "/truth" + (f"?{query}" if query else ""))

    def writes(self, *points: str, since_tick: int | None = None) -> list[dict[str, Any]]:
        """Client writes the ground truth recorded (every point, or these), oldest first:
        ``value`` written, ``before``, ``result`` (what the variable became), ``status``
        (applied, ignored, altered, rejected), ``fault_id``, ``tick``, ``wall_ms``...
        A write shows from the tick it took effect (a rejected one at once)."""
        pairs: list[tuple[str, Any]] = [("point", p) for p in points]
        if since_tick is not None:
            pairs.append(("since_tick", since_tick))
        query = urllib.parse.urlencode(pairs)
        answer = self.request("GET", "/truth/writes" + (f"?{query}" if query else ""))
        return list(answer["writes"])

    def inject(self, kind: str, **target: Any) -> Any:
        """Start a fault: ``inject("dropout", device="field-bus", unit_id=2)``,
        ``inject("leak", component="tank-1", params={"cv": 2.0})``."""
        params = target.pop("params", {})
        return self.request("POST", "/faults", {"kind": kind, **target, "params": params})

    def clear_faults(self) -> Any:
        return self.request("POST", "/faults/clear", {})


def wait_for(
    condition: Callable[[], bool],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll ``condition`` until true; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {message}")
        time.sleep(interval)


class SimulatorProcess(SimProcess):
    """The same process, configured with keywords and started with ``.start()``."""

    def __init__(
        self,
        scenario: Path | str = WATER_PLANT,
        *,
        speed: float | None = None,
        truth: Path | None = None,
        stderr_path: Path | None = None,
        seed: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        args = list(extra_args)
        if speed is not None:
            args += ["--speed", str(speed)]
        if seed is not None:
            args += ["--seed", str(seed)]
        if truth is not None:
            args += ["--truth", str(truth)]
        super().__init__(scenario, args, startup_timeout=startup_timeout, stderr_path=stderr_path)

    def start(self) -> dict[str, Any]:  # type: ignore[override]
        return self.launch()


def wait_until(
    condition: Callable[[], bool], deadline_s: float = 30.0, what: str = "condition"
) -> None:
    """Synchronous polling helper: ``wait_until(lambda: x > 1, 30, what="x grows")``."""
    wait_for(condition, timeout=deadline_s, message=what)
