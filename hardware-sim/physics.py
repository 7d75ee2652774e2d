"""The plant's process model: components stepped on a fixed tick (pure, sans-I/O).

Every component owns a few process variables named ``<component>.<variable>`` (for
example ``tank-1.level``). One tick reads a snapshot of *all* variables, lets every
component compute its new values from that snapshot, then commits them together
(explicit Euler over the whole state), so the file order of components never matters.
A component that depends on another sees the other's value from the previous tick —
at a 100 ms tick that lag is far below anything a sensor shows.

Randomness (the ambient sensor's weather) comes from one ``random.Random`` per
component seeded from the scenario seed and the component's name, so the same seed and
scenario give the same trajectory, and adding a component does not change the others.

Component types (parameters and variables are documented in docs/simulator.md):
``pump``, ``valve``, ``tank``, ``flow_meter``, ``pressure_transmitter``, ``boiler``,
``ambient``.

Process faults (a leak, a fouled heater) are impairments of a component: the simulation
hands each component the parameters of the process faults active on it
(``Component.impair``) before the tick's step, so the physics stays in one place and
the faulted trajectory is as deterministic as the healthy one.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fieldtwin.protocol.config import ConfigError, Section

State = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Writable:
    """A variable clients may set (a setpoint or a command), with its physical limits."""

    low: float
    high: float
    boolean: bool = False


class Component(ABC):
    kind: str = ""

    def __init__(self, name: str, section: Section, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        self.writable: dict[str, Writable] = {}
        self.read_params(section)

    @abstractmethod
    def read_params(self, section: Section) -> None:
        """Read this component's parameters; unknown keys are refused by the caller."""

    @abstractmethod
    def initial(self) -> dict[str, float]:
        """Initial values of this component's variables (short names)."""

    @abstractmethod
    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        """New values of this component's variables after ``dt`` seconds."""

    def references(self) -> dict[str, str]:
        """Parameter key -> full variable name this component reads from others."""
        return {}

    def impair(self, faults: list[tuple[str, Mapping[str, Any]]]) -> None:
        """Take the (kind, params) of every process fault now active on this component
        (an empty list when none is). Components that have no process faults ignore it."""
        return  # the default: nothing to impair

    def var(self, short: str) -> str:
        return f"{self.name}.{short}"


def _ref(section: Section, key: str, default: str | None = None) -> str:
    value = section.text(key) if default is None else section.text(key, default)
    if "." not in value:
        raise section.error(key, f"expected '<component>.<variable>', got {value!r}")
    return value


class Pump(Component):
    """Speed follows its setpoint with a first-order lag while running; flow ∝ speed."""

    kind = "pump"

    def read_params(self, section: Section) -> None:
        self.rated_speed = section.number("rated_speed", 1800.0, min=1.0)
        self.max_flow = section.number("max_flow", 40.0, min=0.0)
        self.tau = section.number("speed_time_constant", 3.0, min=0.0)
        self.idle_current = section.number("idle_current", 2.0, min=0.0)
        self.rated_current = section.number("rated_current", 15.0, min=0.0)
        self.speed_sp0 = section.number("speed_sp", 900.0, min=0.0, max=self.rated_speed)
        self.running0 = section.flag("running", True)
        self.writable = {
            "speed_sp": Writable(0.0, self.rated_speed),
            "running": Writable(0.0, 1.0, boolean=True),
        }

    def initial(self) -> dict[str, float]:
        speed = self.speed_sp0 if self.running0 else 0.0
        return {
            "speed_sp": self.speed_sp0,
            "running": 1.0 if self.running0 else 0.0,
            "speed": speed,
            "flow": self._flow(speed),
            "motor_current": self._current(speed, self.running0),
        }

    def _flow(self, speed: float) -> float:
        return self.max_flow * speed / self.rated_speed

    def _current(self, speed: float, running: bool) -> float:
        if not running:
            return 0.0
        ratio = speed / self.rated_speed
        return self.idle_current + (self.rated_current - self.idle_current) * ratio**3

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        running = state[self.var("running")] >= 0.5
        target = state[self.var("speed_sp")] if running else 0.0
        speed = state[self.var("speed")]
        speed = (
            target if self.tau == 0 else speed + (target - speed) * (1 - math.exp(-dt / self.tau))
        )
        if abs(speed - target) < 1e-9:
            speed = target
        return {
            "speed": speed,
            "flow": self._flow(speed),
            "motor_current": self._current(speed, running),
        }


class Valve(Component):
    """Outflow of the upstream tank: ``cv · position/100 · √level`` (m³/h)."""

    kind = "valve"

    def read_params(self, section: Section) -> None:
        self.cv = section.number("cv", 25.0, min=0.0)
        self.position0 = section.number("position", 50.0, min=0.0, max=100.0)
        self.upstream = _ref(section, "upstream_level")
        self.writable = {"position": Writable(0.0, 100.0)}

    def references(self) -> dict[str, str]:
        return {"upstream_level": self.upstream}

    def initial(self) -> dict[str, float]:
        return {"position": self.position0, "flow": 0.0}

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        level = max(state[self.upstream], 0.0)
        return {"flow": self.cv * state[self.var("position")] / 100.0 * math.sqrt(level)}


class Tank(Component):
    """Level integrates (inflow - outflow - leak) / area, clamped to 0..max_level.

    A ``leak`` fault is a hole near the bottom: Torricelli's law gives an outflow
    ``cv · √level`` (m³/h), the same law as the valve's, so it grows with the head and
    stops when the tank is empty. It is not one of the declared outflows: no flow
    meter sees it, only the level does.
    """

    kind = "tank"

    def read_params(self, section: Section) -> None:
        self.area = section.number("area", 1.0, min=1e-6)
        self.max_level = section.number("max_level", 5.0, min=0.0)
        self.level0 = section.number("level", 2.5, min=0.0, max=self.max_level)
        self.high_level = section.number("high_level", 4.5, min=0.0)
        self.inflows = section.text_list("inflows", [])
        self.outflows = section.text_list("outflows", [])
        for key, refs in (("inflows", self.inflows), ("outflows", self.outflows)):
            for ref in refs:
                if "." not in ref:
                    raise section.error(key, f"expected '<component>.<variable>', got {ref!r}")
        self.leak_cv = 0.0

    def impair(self, faults: list[tuple[str, Mapping[str, Any]]]) -> None:
        self.leak_cv = sum(float(params["cv"]) for kind, params in faults if kind == "leak")

    def references(self) -> dict[str, str]:
        refs = {f"inflows[{i}]": r for i, r in enumerate(self.inflows)}
        refs.update({f"outflows[{i}]": r for i, r in enumerate(self.outflows)})
        return refs

    def initial(self) -> dict[str, float]:
        return {
            "level": self.level0,
            "inflow": 0.0,
            "outflow": 0.0,
            "leak": 0.0,
            "high_level": 1.0 if self.level0 > self.high_level else 0.0,
        }

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        inflow = sum(state[r] for r in self.inflows)
        outflow = sum(state[r] for r in self.outflows)
        level = state[self.var("level")]
        leak = self.leak_cv * math.sqrt(max(level, 0.0))
        level += (inflow - outflow - leak) / 3600.0 / self.area * dt
        level = min(max(level, 0.0), self.max_level)
        return {
            "level": level,
            "inflow": inflow,
            "outflow": outflow,
            "leak": leak,
            "high_level": 1.0 if level > self.high_level else 0.0,
        }


class FlowMeter(Component):
    """Measures a flow variable (m³/h) and totalises it (m³)."""

    kind = "flow_meter"

    def read_params(self, section: Section) -> None:
        self.measures = _ref(section, "measures")
        self.total0 = section.number("total", 0.0, min=0.0)

    def references(self) -> dict[str, str]:
        return {"measures": self.measures}

    def initial(self) -> dict[str, float]:
        return {"flow": 0.0, "total": self.total0}

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        flow = state[self.measures]
        return {"flow": flow, "total": state[self.var("total")] + flow / 3600.0 * dt}


class PressureTransmitter(Component):
    """Outlet pressure (bar): static head of the tank plus the pump's head ∝ speed²."""

    kind = "pressure_transmitter"

    def read_params(self, section: Section) -> None:
        self.level = _ref(section, "level")
        self.pump_speed = _ref(section, "pump_speed")
        self.rated_speed = section.number("rated_speed", 1800.0, min=1.0)
        self.pump_head = section.number("pump_head", 3.0, min=0.0)
        self.fluid_temperature = section.number("fluid_temperature", 12.0)

    def references(self) -> dict[str, str]:
        return {"level": self.level, "pump_speed": self.pump_speed}

    def initial(self) -> dict[str, float]:
        return {"pressure": 0.0, "temperature": self.fluid_temperature}

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        ratio = state[self.pump_speed] / self.rated_speed
        pressure = max(state[self.level], 0.0) * 0.0981 + self.pump_head * ratio * ratio
        return {"pressure": pressure, "temperature": self.fluid_temperature}


def saturation_pressure_bar(celsius: float) -> float:
    """Water's vapour pressure (Antoine equation, two ranges), in bar absolute."""
    if celsius <= 100.0:
        a, b, c = 8.07131, 1730.63, 233.426
    else:
        a, b, c = 8.14019, 1810.94, 244.485
    celsius = min(max(celsius, 1.0), 374.0)
    return 10 ** (a - b / (c + celsius)) * 0.00133322


class Boiler(Component):
    """Heater power follows its setpoint; temperature lags power; pressure follows temperature.

    ``heat_input`` is the power that reaches the water: ``efficiency · heater_power``.
    Efficiency is 1 until a ``fouling`` fault (scale on the element) lowers it: the
    heater still draws its power (the power reading stays true), but the water warms
    more slowly and settles lower, at ``ambient + gain · heat_input``.
    """

    kind = "boiler"

    def read_params(self, section: Section) -> None:
        self.ambient = section.number("ambient_temperature", 20.0)
        self.gain = section.number("gain", 3.0, min=0.0)
        self.tau = section.number("time_constant", 120.0, min=1e-3)
        self.heater_tau = section.number("heater_time_constant", 2.0, min=0.0)
        self.max_power = section.number("max_power", 50.0, min=0.0)
        self.power0 = section.number("heater_power_sp", 30.0, min=0.0, max=self.max_power)
        steady = self.ambient + self.gain * self.power0
        self.temperature0 = section.number("temperature", steady)
        self.writable = {"heater_power_sp": Writable(0.0, self.max_power)}
        self.efficiency = 1.0

    def impair(self, faults: list[tuple[str, Mapping[str, Any]]]) -> None:
        self.efficiency = math.prod(
            float(params["efficiency"]) for kind, params in faults if kind == "fouling"
        )

    def initial(self) -> dict[str, float]:
        return {
            "heater_power_sp": self.power0,
            "heater_power": self.power0,
            "heat_input": self.power0,
            "temperature": self.temperature0,
            "pressure": max(1.01325, saturation_pressure_bar(self.temperature0)),
        }

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        sp = state[self.var("heater_power_sp")]
        power = state[self.var("heater_power")]
        if self.heater_tau == 0:
            power = sp
        else:
            power += (sp - power) * (1 - math.exp(-dt / self.heater_tau))
        temperature = state[self.var("temperature")]
        heat_input = self.efficiency * power
        target = self.ambient + self.gain * heat_input
        temperature += (target - temperature) * (1 - math.exp(-dt / self.tau))
        return {
            "heater_power": power,
            "heat_input": heat_input,
            "temperature": temperature,
            "pressure": max(1.01325, saturation_pressure_bar(temperature)),
        }


class Ambient(Component):
    """A diurnal sine plus mean-reverting random weather (Ornstein-Uhlenbeck)."""

    kind = "ambient"

    def read_params(self, section: Section) -> None:
        self.t_mean = section.number("temperature_mean", 18.0)
        self.t_amp = section.number("temperature_amplitude", 6.0, min=0.0)
        self.h_mean = section.number("humidity_mean", 55.0, min=0.0, max=100.0)
        self.h_amp = section.number("humidity_amplitude", 15.0, min=0.0)
        self.period = section.number("period", 86400.0, min=1.0)
        self.phase = section.number("phase", 0.0)
        self.sigma = section.number("weather_sigma", 0.05, min=0.0)
        self.weather_tau = section.number("weather_time_constant", 600.0, min=1e-3)
        self.dev_t = 0.0
        self.dev_h = 0.0

    def initial(self) -> dict[str, float]:
        return self._values(0.0)

    def _values(self, t: float) -> dict[str, float]:
        wave = math.sin(2 * math.pi * (t + self.phase) / self.period)
        humidity = self.h_mean - self.h_amp * wave + 4.0 * self.dev_h
        return {
            "temperature": self.t_mean + self.t_amp * wave + self.dev_t,
            "humidity": min(max(humidity, 0.0), 100.0),
        }

    def step(self, dt: float, t: float, state: State) -> dict[str, float]:
        decay = math.exp(-dt / self.weather_tau)
        spread = self.sigma * math.sqrt(dt)
        self.dev_t = self.dev_t * decay + self.rng.gauss(0.0, spread)
        self.dev_h = self.dev_h * decay + self.rng.gauss(0.0, spread)
        return self._values(t + dt)


COMPONENT_TYPES: dict[str, type[Component]] = {
    cls.kind: cls for cls in (Pump, Valve, Tank, FlowMeter, PressureTransmitter, Boiler, Ambient)
}


def build_component(name: str, section: Section, seed: int) -> Component:
    kind = section.text("type", choices=COMPONENT_TYPES)
    rng = random.Random(f"{seed}:process:{name}")
    component = COMPONENT_TYPES[kind](name, section, rng)
    section.finish()
    return component


class Plant:
    """All components and the current value of every process variable."""

    def __init__(self, components: list[Component]) -> None:
        self.components = components
        self.state: dict[str, float] = {}
        self.writable: dict[str, Writable] = {}
        self.t = 0.0
        for component in components:
            for short, value in component.initial().items():
                self.state[component.var(short)] = float(value)
            for short, limits in component.writable.items():
                self.writable[component.var(short)] = limits

    def settle(self) -> None:
        """Bring derived variables (flows, pressures) in line with the initial state.

        Zero-length steps change no integrated state; three of them let a chain such as
        valve flow -> tank outflow -> flow meter settle.
        """
        for _ in range(3):
            self.step(0.0)

    def check_references(self, file: str) -> None:
        for component in self.components:
            for key, ref in component.references().items():
                if ref not in self.state:
                    raise ConfigError(
                        file,
                        f"process.{component.name}.{key}",
                        f"{ref!r} is not a process variable (known: "
                        f"{', '.join(sorted(self.state))})",
                    )

    def set(self, variable: str, value: float) -> None:
        """Apply a client write (a setpoint or command); limits were checked by the caller."""
        self.state[variable] = float(value)

    def impair(self, faults: Mapping[str, list[tuple[str, Mapping[str, Any]]]]) -> None:
        """Set every component's process faults: component name -> [(kind, params)]."""
        for component in self.components:
            component.impair(faults.get(component.name, []))

    def step(self, dt: float) -> None:
        snapshot = dict(self.state)
        updates: dict[str, float] = {}
        for component in self.components:
            for short, value in component.step(dt, self.t, snapshot).items():
                updates[component.var(short)] = value
        self.state.update(updates)
        self.t += dt
