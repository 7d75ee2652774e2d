"""Modbus register maps: the plant's points, and synthetic load devices.

Addressing rule (what a real PLC typically does): inside a table's *extent* — from the
lowest to the highest address any point of that unit uses — unmapped registers read as
0, so an agent may coalesce reads across small gaps; outside it every address is
illegal (exception 2). Writes must cover whole, writable points; a value outside the
point's limits gets exception 3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from fieldtwin.sim.context import SimContext
from fieldtwin.sim.errors import WriteRejected
from fieldtwin.sim.modbus import BIT_TABLES, ExceptionCode, ModbusException
from fieldtwin.sim.scenario import DeviceSpec, LoadSpec, PointSpec

Served = list[tuple[str, float]]


class RegisterMap(Protocol):
    unit_ids: list[int]

    def read(
        self, unit: int, table: str, address: int, count: int
    ) -> tuple[list[int] | list[bool], Served]:
        """Values for a read request and the (point, value) pairs it delivers."""
        ...

    def write(
        self, unit: int, table: str, address: int, values: tuple[int, ...] | tuple[bool, ...]
    ) -> None:
        """Apply a write request or raise ``ModbusException``."""
        ...


@dataclass(frozen=True, slots=True)
class _Slot:
    point: PointSpec
    offset: int  # register index within the point


class PlantRegisterMap:
    """Serves a scenario device's points from the simulation."""

    def __init__(self, device: DeviceSpec, ctx: SimContext) -> None:
        self.device = device
        self.ctx = ctx
        self.unit_ids = device.unit_ids
        self._slots: dict[tuple[int, str], dict[int, _Slot]] = {}
        self._extent: dict[tuple[int, str], tuple[int, int]] = {}
        for point in device.points:
            assert point.unit_id is not None
            assert point.table is not None
            assert point.address is not None
            key = (point.unit_id, point.table)
            slots = self._slots.setdefault(key, {})
            for offset in range(point.width):
                slots[point.address + offset] = _Slot(point, offset)
        for key, slots in self._slots.items():
            self._extent[key] = (min(slots), max(slots))

    def _check_range(self, unit: int, table: str, address: int, count: int) -> dict[int, _Slot]:
        extent = self._extent.get((unit, table))
        if extent is None or address < extent[0] or address + count - 1 > extent[1]:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS, f"{table} {address}+{count}")
        return self._slots[(unit, table)]

    def _point_exception(self, points: list[PointSpec]) -> None:
        book = self.ctx.sim.faults
        if not book.active:
            return
        for point in points:
            code = book.point_exception(point.name)
            if code is not None:
                raise ModbusException(code, f"fault on {point.name}")

    def read(
        self, unit: int, table: str, address: int, count: int
    ) -> tuple[list[int] | list[bool], Served]:
        slots = self._check_range(unit, table, address, count)
        sim = self.ctx.sim
        touched: dict[str, PointSpec] = {}
        for addr in range(address, address + count):
            slot = slots.get(addr)
            if slot is not None:
                touched[slot.point.name] = slot.point
        self._point_exception(list(touched.values()))
        served: Served = []
        if table in BIT_TABLES:
            bits: list[bool] = []
            for addr in range(address, address + count):
                slot = slots.get(addr)
                bit = slot is not None and sim.value(slot.point.name) >= 0.5
                bits.append(bit)
                if slot is not None:
                    served.append((slot.point.name, 1.0 if bit else 0.0))
            return bits, served
        words: list[int] = []
        encoded: dict[str, list[int]] = {}
        for addr in range(address, address + count):
            slot = slots.get(addr)
            if slot is None:
                words.append(0)
                continue
            point = slot.point
            regs = encoded.get(point.name)
            if regs is None:
                assert point.codec is not None
                regs = point.codec.encode(sim.value(point.name))
                encoded[point.name] = regs
                if (
                    point.address is not None
                    and point.address >= address
                    and (point.address + point.width <= address + count)
                ):
                    served.append((point.name, point.codec.decode(regs)))
            words.append(regs[slot.offset])
        return words, served

    def write(
        self, unit: int, table: str, address: int, values: tuple[int, ...] | tuple[bool, ...]
    ) -> None:
        count = len(values)
        slots = self._check_range(unit, table, address, count)
        updates: list[tuple[PointSpec, float]] = []
        addr = address
        while addr < address + count:
            slot = slots.get(addr)
            if slot is None or slot.offset != 0 or not slot.point.writable:
                raise ModbusException(
                    ExceptionCode.ILLEGAL_DATA_ADDRESS, f"{table} {addr} is not writable"
                )
            point = slot.point
            if addr + point.width > address + count:
                raise ModbusException(
                    ExceptionCode.ILLEGAL_DATA_ADDRESS, f"{point.name} written partially"
                )
            chunk = values[addr - address : addr - address + point.width]
            if table in BIT_TABLES:
                value = 1.0 if chunk[0] else 0.0
            else:
                assert point.codec is not None
                value = point.codec.decode([int(v) for v in chunk])
            updates.append((point, value))
            addr += point.width
        self._point_exception([p for p, _ in updates])
        device, protocol = self.device.id, self.device.protocol
        try:
            # all or nothing: every value is checked before any is applied
            for point, value in updates:
                self.ctx.check_write(point.name, value, device=device, protocol=protocol)
            for point, value in updates:
                self.ctx.write(point.name, value, device=device, protocol=protocol)
        except WriteRejected as exc:
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_VALUE, str(exc)) from None


class SyntheticRegisterMap:
    """A load-mode device: ``registers_per_device`` registers computed from the tick.

    uint16 point k of device d holds ``(d * 1000 + k + tick) mod 65536``; float32 point k
    holds ``d * 1000 + k + sim_s`` (big-endian words, registers 2k and 2k+1). Values are
    computed only when read, so 50 x 200 registers cost nothing between polls.
    """

    def __init__(self, index: int, spec: LoadSpec, ctx: SimContext) -> None:
        self.index = index
        self.spec = spec
        self.ctx = ctx
        self.unit_ids = [1]
        self.device_id = spec.device_id(index)

    def value(self, k: int) -> float:
        sim = self.ctx.sim
        if self.spec.point_type == "uint16":
            return float((self.index * 1000 + k + sim.tick) % 65536)
        return float(struct.unpack(">f", struct.pack(">f", self.index * 1000 + k + sim.sim_s))[0])

    def read(
        self, unit: int, table: str, address: int, count: int
    ) -> tuple[list[int] | list[bool], Served]:
        if (
            unit != 1
            or table != self.spec.table
            or address + count > self.spec.registers_per_device
        ):
            raise ModbusException(ExceptionCode.ILLEGAL_DATA_ADDRESS, f"{table} {address}+{count}")
        book = self.ctx.sim.faults
        if book.active:
            link = book.link(self.device_id, unit)
            if link.exception is not None:
                raise ModbusException(link.exception)
        served: Served = []
        prefix = f"{self.device_id}.p"
        if self.spec.point_type == "uint16":
            words = [int(self.value(k)) for k in range(address, address + count)]
            if self.ctx.record_served and self.spec.record_served:
                served = [
                    (f"{prefix}{k}", float(w))
                    for k, w in zip(range(address, address + count), words, strict=True)
                ]
            return words, served
        words = []
        for addr in range(address, address + count):
            k, half = divmod(addr, 2)
            hi, lo = struct.unpack(">HH", struct.pack(">f", self.value(k)))
            words.append(hi if half == 0 else lo)
            if (
                half == 1
                and addr - 1 >= address
                and self.ctx.record_served
                and self.spec.record_served
            ):
                served.append((f"{prefix}{k}", self.value(k)))
        return words, served

    def write(
        self, unit: int, table: str, address: int, values: tuple[int, ...] | tuple[bool, ...]
    ) -> None:
        raise ModbusException(
            ExceptionCode.ILLEGAL_DATA_ADDRESS, "synthetic load devices are read-only"
        )
