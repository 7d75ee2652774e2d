"""Device drivers. Each is imported only when a configured device needs it, so a
gateway with only Modbus devices never pays for asyncua's import (~50 MB of RSS)."""

from __future__ import annotations

from collections.abc import Sequence

from fieldtwin.agent.config import DeviceConfig, PointConfig
from fieldtwin.agent.drivers.base import CheckRow, Driver, Sink, SourceStats

__all__ = ["CheckRow", "Driver", "Sink", "SourceStats", "make_driver"]


def make_driver(device: DeviceConfig, points: Sequence[tuple[int, PointConfig]]) -> Driver:
    if device.protocol in ("modbus-tcp", "modbus-rtu"):
        from fieldtwin.agent.drivers.modbus import ModbusDriver

        return ModbusDriver(device, points)
    if device.protocol == "opcua":
        from fieldtwin.agent.drivers.opcua import OpcUaDriver

        return OpcUaDriver(device, points)
    from fieldtwin.agent.drivers.serial_line import SerialLineDriver

    return SerialLineDriver(device, points)
