"""OPC-UA (asyncua): subscriptions with a polling fallback and session recovery.

* ``mode = "subscribe"`` (default): one subscription at ``publishing_interval_ms``,
  monitored items sampled at each point's ``interval_ms``. If the server refuses
  subscriptions, the driver falls back to polling and says so in the log.
  Points with a ``max_silence`` are re-read when no notification came for half of it,
  so a value that legitimately does not change still gets a heartbeat.
* ``mode = "poll"``: all nodes are read in one Read request every ``interval_ms``.
* Session recovery: the asyncua watchdog probes the server every second; when the
  connection is lost the driver reports every point BAD once, drops the session and
  reconnects with jittered exponential backoff, re-resolving namespace indexes (a
  restarted server may number its namespaces differently) and re-subscribing.
* Timestamps: the DataValue's SourceTimestamp, else its ServerTimestamp, else the
  agent's clock when the value arrived. Status codes map to GOOD / UNCERTAIN / BAD.
  A SourceTimestamp says when the value last *changed*; a server that answers a Read
  with a GOOD status vouches that the value still holds. So a GOOD value from a Read
  (poll mode, heartbeat re-reads) is stamped with the time the answer arrived when
  that is later: like a Modbus reading, which has no source time either. Without it a
  steady value (a setpoint, a heater at constant power) could never heartbeat and
  would turn STALE at the agent and at the hub although the server is fine.
  Subscription notifications keep their SourceTimestamp (they report a change), but
  for the first one per node of each subscription, which reports the current value.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Any

from fieldtwin.agent.commands import WriteOutcome
from fieldtwin.agent.config import DeviceConfig, PointConfig
from fieldtwin.agent.drivers.base import CheckRow, Driver, Sink, Timer, sleep_or
from fieldtwin.agent.errors import DeviceError, DeviceRejected, DeviceTimeout, DeviceUnavailable
from fieldtwin.agent.plausible import plausible
from fieldtwin.agent.util import Backoff, now_ms, within
from fieldtwin.protocol.logfmt import fields
from fieldtwin.protocol.messages import Quality, Value

log = logging.getLogger("fieldtwin.agent.opcua")

_VARIANT_TYPES = {
    "bool": "Boolean",
    "int16": "Int16",
    "uint16": "UInt16",
    "int32": "Int32",
    "uint32": "UInt32",
    "int64": "Int64",
    "uint64": "UInt64",
    "float32": "Float",
    "float64": "Double",
    "string": "String",
}


def _ms(stamp: Any) -> int | None:
    if not isinstance(stamp, dt.datetime):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    millis = int(stamp.timestamp() * 1000)
    return millis if millis > 0 else None


def _coerce(dtype: str, value: Any) -> Value:
    """The wire value for a node value, or None when it cannot be one."""
    try:
        if dtype in ("float32", "float64"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            number = float(value)
            return number if number == number and abs(number) != float("inf") else None
        if dtype == "bool":
            return value if isinstance(value, bool) else None
        if dtype == "string":
            return value if isinstance(value, str) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value) if float(value).is_integer() else None
    except (TypeError, ValueError, OverflowError):
        return None


def reading_of(dtype: str, data_value: Any, received_ms: int) -> tuple[Value, int, Quality]:
    """DataValue → (value, source timestamp ms, quality)."""
    status = data_value.StatusCode
    if status is None or status.is_good():
        quality = Quality.GOOD
    elif status.is_uncertain():
        quality = Quality.UNCERTAIN
    else:
        quality = Quality.BAD
    stamp = _ms(data_value.SourceTimestamp) or _ms(data_value.ServerTimestamp) or received_ms
    variant = data_value.Value
    raw = variant.Value if variant is not None else None
    value = _coerce(dtype, raw) if quality != Quality.BAD else None
    if value is None:
        quality = Quality.BAD
    return value, stamp, quality


class _Handler:
    """Subscription callback: runs in the event loop, hands readings to the sink."""

    def __init__(self, driver: OpcUaDriver, sink: Sink) -> None:
        self.driver = driver
        self.sink = sink
        self._reported: set[int] = set()

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        entry = self.driver._by_node.get(node.nodeid)
        if entry is None:
            return
        index, point = entry
        received = now_ms()
        value, stamp, quality = reading_of(point.dtype, data.monitored_item.Value, received)
        if index not in self._reported and quality == Quality.GOOD:
            # The first notification of a new subscription is the current value, not a
            # change: the server vouches for it now, like a Read (module docstring).
            stamp = max(stamp, received)
        self._reported.add(index)
        self.driver._last_update[index] = time.monotonic()
        self.driver.stats.success(0.0)
        self.sink.offer(index, value, stamp, quality)

    def status_change_notification(self, status: Any) -> None:
        self.driver._lost.set()


class OpcUaDriver(Driver):
    def __init__(self, device: DeviceConfig, points: Sequence[tuple[int, PointConfig]]) -> None:
        super().__init__(device, points)
        logging.getLogger("asyncua").setLevel(logging.CRITICAL)
        self._client: Any = None
        self._nodes: list[Any] = []
        self._by_node: dict[Any, tuple[int, PointConfig]] = {}
        self._node_of: dict[int, Any] = {}
        self._last_update: dict[int, float] = {}
        self._lost = asyncio.Event()
        self.stats.extra["mode"] = device.mode

    async def _connect(self) -> Any:
        from asyncua.client.client import Client

        client = Client(self.device.url, timeout=self.device.timeout_s, watchdog_intervall=1.0)
        if self.device.username:
            client.set_user(self.device.username)
            client.set_password(self.device.password)

        async def lost(exc: Exception) -> None:
            self._lost.set()

        client.connection_lost_callback = lost
        try:
            await within(self.device.timeout_s * 3 + 2, client.connect())
        except Exception as exc:
            with contextlib.suppress(Exception):
                await within(2, client.disconnect())
            raise DeviceUnavailable(f"cannot connect to {self.device.url}: {_text(exc)}") from None
        self._client = client
        self._lost.clear()
        try:
            await self._resolve(client)
        except Exception:
            await self._disconnect()
            raise
        self.stats.connected = True
        self.stats.reconnects += 1
        log.info("device connected", extra=fields(device=self.id, url=self.device.url))
        return client

    async def _resolve(self, client: Any) -> None:
        """Turn ``nsu=URI;...`` into this server's ``ns=N;...`` (indexes can change)."""
        from asyncua.ua.uaerrors import UaError

        indexes: dict[str, int] = {}
        self._nodes, self._by_node, self._node_of = [], {}, {}
        for index, point in self.points:
            text = point.node
            if text.startswith("nsu="):
                uri, _, rest = text[4:].partition(";")
                if uri not in indexes:
                    try:
                        indexes[uri] = await client.get_namespace_index(uri)
                    except (ValueError, UaError) as exc:
                        raise DeviceRejected(
                            f"{self.device.url} has no namespace {uri!r} ({_text(exc)})"
                        ) from None
                text = f"ns={indexes[uri]};{rest}"
            node = client.get_node(text)
            self._nodes.append(node)
            self._by_node[node.nodeid] = (index, point)
            self._node_of[index] = node

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self.stats.connected = False
        if client is not None:
            with contextlib.suppress(Exception):
                await within(3, client.disconnect())

    async def _read_all(self, sink: Sink, nodes: Sequence[Any] | None = None) -> None:
        client = self._client
        if client is None:
            raise DeviceUnavailable(f"{self.device.url}: not connected")
        chosen = list(nodes if nodes is not None else self._nodes)
        if not chosen:
            return
        timer = Timer()
        try:
            values = await within(self.device.timeout_s * 2 + 1, client.read_attributes(chosen))
        except TimeoutError:
            raise DeviceTimeout(f"{self.device.url} did not answer a read in time") from None
        self.stats.success(timer.elapsed())
        received = now_ms()
        mono = time.monotonic()
        for node, data_value in zip(chosen, values, strict=True):
            index, point = self._by_node[node.nodeid]
            value, stamp, quality = reading_of(point.dtype, data_value, received)
            if quality == Quality.GOOD:
                stamp = max(stamp, received)  # the server vouches for it now (see above)
            self._last_update[index] = mono
            sink.offer(index, value, stamp, quality)

    async def run(self, sink: Sink) -> None:
        backoff = Backoff(0.5, 30.0)
        failed = False
        while True:
            try:
                await self._connect()
                failed = False
                await self._serve(sink)
            except (DeviceError, OSError, TimeoutError, ConnectionError) as exc:
                error = _text(exc)
            except Exception as exc:  # asyncua raises many types; all mean "session broken"
                error = _text(exc)
            finally:
                await self._disconnect()
            self.stats.failure(error)
            if not failed:
                failed = True
                log.warning(
                    "OPC-UA session lost: points reported BAD",
                    extra=fields(device=self.id, url=self.device.url, error=error),
                )
                for index, _ in self.points:
                    sink.fail(index)
            await asyncio.sleep(backoff.next_delay())

    async def _serve(self, sink: Sink) -> None:
        client = self._client
        mode = self.device.mode
        subscription = None
        if mode == "subscribe":
            try:
                subscription = await within(
                    self.device.timeout_s * 2 + 1,
                    client.create_subscription(
                        self.device.publishing_interval_ms, _Handler(self, sink)
                    ),
                )
                min_interval = min(p.interval_ms for _, p in self.points)
                await within(
                    self.device.timeout_s * 2 + 1,
                    subscription.subscribe_data_change(
                        self._nodes, sampling_interval=float(min_interval)
                    ),
                )
            except (DeviceError, OSError, TimeoutError, ConnectionError):
                raise
            except Exception as exc:
                log.warning(
                    "subscription refused; polling instead",
                    extra=fields(device=self.id, error=_text(exc)),
                )
                subscription = None
                mode = "poll"
        self.stats.extra["mode"] = mode
        await self._read_all(sink)  # everything once, right away
        poll_s = min(p.interval_ms for _, p in self.points) / 1000
        while True:
            period = poll_s if mode == "poll" else 1.0
            if await sleep_or(self._lost, period):
                raise DeviceUnavailable(f"{self.device.url}: connection lost")
            if mode == "poll":
                await self._read_all(sink)
                continue
            quiet = self._quiet_nodes()
            if quiet:
                await self._read_all(sink, quiet)

    def _quiet_nodes(self) -> list[Any]:
        now = time.monotonic()
        quiet = []
        for index, point in self.points:
            if not point.max_silence_ms:
                continue
            if now - self._last_update.get(index, 0.0) >= point.max_silence_ms / 2000:
                quiet.append(self._node_of[index])
        return quiet

    async def write(self, point: PointConfig, value: Value) -> WriteOutcome:
        from asyncua import ua
        from asyncua.ua.uaerrors import UaStatusCodeError

        client = self._client
        index = next((i for i, p in self.points if p is point), None)
        if client is None or index is None:
            raise DeviceUnavailable(f"{self.device.url}: not connected")
        node = self._node_of[index]
        variant_type = getattr(ua.VariantType, _VARIANT_TYPES[point.dtype])
        try:
            await within(
                self.device.timeout_s * 2 + 1,
                node.write_value(ua.DataValue(ua.Variant(value, variant_type))),
            )
            data_value = await within(
                self.device.timeout_s * 2 + 1, node.read_data_value(raise_on_bad_status=False)
            )
        except TimeoutError:
            raise DeviceTimeout(f"{self.device.url} did not confirm the write in time") from None
        except UaStatusCodeError as exc:
            raise DeviceRejected(f"{self.device.url} refused the write: {_text(exc)}") from None
        except (OSError, ConnectionError) as exc:
            raise DeviceUnavailable(f"{self.device.url}: {_text(exc)}") from None
        readback, stamp, quality = reading_of(point.dtype, data_value, now_ms())
        return WriteOutcome(readback, stamp, quality)

    async def check(self) -> list[CheckRow]:
        rows: list[CheckRow] = []
        try:
            await self._connect()
        except DeviceError as exc:
            return [CheckRow(point, False, error=str(exc)) for _, point in self.points]
        try:
            timer = Timer()
            values = await within(
                self.device.timeout_s * 2 + 1, self._client.read_attributes(self._nodes)
            )
            self.stats.success(timer.elapsed())
            for (_, point), data_value in zip(self.points, values, strict=True):
                value, stamp, quality = reading_of(point.dtype, data_value, now_ms())
                variant = data_value.Value
                kind = variant.VariantType.name if variant is not None else "-"
                status = data_value.StatusCode.name if data_value.StatusCode else "Good"
                ok = quality != Quality.BAD and plausible(point, value)
                rows.append(
                    CheckRow(
                        point,
                        ok,
                        value,
                        quality,
                        raw=f"{kind} {status}",
                        implausible=[] if plausible(point, value) else ["value"],
                        error="" if ok else f"status {status}, value {value!r}",
                        ts_ms=stamp,
                    )
                )
        except Exception as exc:
            rows = [CheckRow(point, False, error=_text(exc)) for _, point in self.points]
        finally:
            await self._disconnect()
        return rows


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
