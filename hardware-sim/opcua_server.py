"""An OPC-UA device (asyncua server) behind a fault relay.

Address space: namespace ``device.namespace``; one object ``Objects/<object>`` with
string node id ``s=<object>``; one Double (or Boolean) variable per point with string
node id ``s=<node_id>`` and browse name ``<browse_name>``, both in that namespace.
Security: None only (a simulator on loopback).

Values are published into the address space after each batch of ticks, at most every
``PUBLISH_INTERVAL_S`` of wall time and only when a value or its status changed, so
subscriptions see changes and reads see the latest tick. The source timestamp is the
tick's nominal wall-clock time. A ``bad_status`` fault publishes the point with that
status and no value.

Client writes go through a guard in front of asyncua's attribute service: a write to a
writable point must carry the point's type and lie within its limits (else
``BadTypeMismatch`` / ``BadOutOfRange``); an accepted write reaches the process at the
next tick and shows in the node at once. Under an actuator fault the write is answered
Good too, but the node shows what the actuator did: its old value (``ignore_writes``)
or the other value (``wrong_value``), never the value written. ``dropout``, ``slow``
and ``disconnect`` are played by the relay in front of the server
(fieldtwin.sim.relay).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from typing import Any

from fieldtwin.protocol.logfmt import fields
from fieldtwin.sim.context import DisconnectFollower, SimContext, wall_ms
from fieldtwin.sim.engine import AppliedWrite
from fieldtwin.sim.errors import EndpointError, WriteRejected
from fieldtwin.sim.faults import LinkFaults
from fieldtwin.sim.relay import TcpRelay
from fieldtwin.sim.scenario import DeviceSpec, PointSpec

log = logging.getLogger("fieldtwin.sim.opcua")

PUBLISH_INTERVAL_S = 0.05


class OpcUaDevice:
    def __init__(self, device: DeviceSpec, ctx: SimContext, *, port: int) -> None:
        self.device = device
        self.device_id = device.id
        self.ctx = ctx
        self.relay = TcpRelay(device.id, device.host, port)
        self.server: Any = None
        self.namespace_index = 0
        self._nodes: dict[str, Any] = {}  # point name -> NodeId
        self._by_node: dict[Any, PointSpec] = {}
        self._published: dict[str, tuple[float | None, str]] = {}
        self._changed = asyncio.Event()
        self.link = DisconnectFollower(
            ctx,
            device.id,
            self.relay.stop_listening,
            self.relay.start,
            on_change=self._relay_faults,
        )
        self._last_publish = 0.0
        self._tick_wall_ms = wall_ms()

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.device.host}:{self.relay.port}{self.device.path}"

    async def start(self) -> None:
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.server.server import Server

        # NoSecurity is deliberate on a loopback simulator; asyncua warns about it twice.
        logging.getLogger("asyncua.server.server").setLevel(logging.ERROR)
        await self.relay.start()
        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        server.socket_address = ("127.0.0.1", 0)  # private; clients come through the relay
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_server_name(f"fieldtwin simulator: {self.device.id}")
        await server.set_application_uri(f"urn:fieldtwin:sim:{self.device.id}")
        idx = await server.register_namespace(self.device.namespace)
        self.namespace_index = idx
        obj = await server.nodes.objects.add_object(
            ua.NodeId(ua.String(self.device.object_name), ua.Int16(idx)),
            ua.QualifiedName(self.device.object_name, idx),
        )
        sim = self.ctx.sim
        for point in self.device.points:
            assert point.node_id is not None
            assert point.browse_name is not None
            node_id = ua.NodeId(ua.String(point.node_id), ua.Int16(idx))
            if point.boolean:
                initial: Any = sim.value(point.name) >= 0.5
                vtype = ua.VariantType.Boolean
            else:
                initial = float(sim.value(point.name))
                vtype = ua.VariantType.Double
            node = await obj.add_variable(
                node_id, ua.QualifiedName(point.browse_name, idx), initial, vtype
            )
            if point.writable:
                await node.set_writable(True)
            self._nodes[point.name] = node_id
            self._by_node[node_id] = point
        self._guard_writes(server)
        server.subscribe_server_callback(CallbackType.PostRead, self._after_read)
        try:
            await server.start()
        except OSError as exc:
            raise EndpointError(f"{self.device.id}: OPC-UA server cannot start: {exc}") from None
        self.server = server
        assert server.bserver is not None
        self.relay.target = ("127.0.0.1", server.bserver.port)
        log.info("opcua listening", extra=fields(device=self.device.id, url=self.url))

    # -- writes ------------------------------------------------------------------------

    def _guard_writes(self, server: Any) -> None:
        from asyncua import ua
        from asyncua.ua.attribute_ids import AttributeIds

        service = server.iserver.attribute_service
        original = service.write

        async def guarded_write(params: Any, user: Any = None) -> list[Any]:
            results: list[Any] = [None] * len(params.NodesToWrite)
            passed: list[int] = []
            for i, item in enumerate(params.NodesToWrite):
                point = self._by_node.get(item.NodeId)
                if point is None or item.AttributeId != AttributeIds.Value:
                    passed.append(i)
                    continue
                status, write = self._check_write(point, item.Value)
                if status is not None:
                    results[i] = status
                elif write is not None and write.outcome != "applied":
                    # The actuator did something else: acknowledge, show what it did.
                    results[i] = ua.StatusCode()  # Good
                    if write.moves:
                        await self._show(point, write.target)
                else:
                    passed.append(i)
            if passed:
                subset = ua.WriteParameters(NodesToWrite=[params.NodesToWrite[i] for i in passed])
                kwargs = {} if user is None else {"user": user}
                for i, status in zip(passed, await original(subset, **kwargs), strict=True):
                    results[i] = status
            return results

        service.write = guarded_write

    def _check_write(self, point: PointSpec, data_value: Any) -> tuple[Any, AppliedWrite | None]:
        """(bad status, None) for a refused write, else (None, the accepted write)."""
        from asyncua import ua
        from asyncua.ua.status_codes import StatusCodes

        def bad(name: str) -> tuple[Any, None]:
            return ua.StatusCode(getattr(StatusCodes, name)), None

        if not point.writable:
            return bad("BadNotWritable")
        variant = data_value.Value
        want = ua.VariantType.Boolean if point.boolean else ua.VariantType.Double
        if variant is None or variant.VariantType != want:
            return bad("BadTypeMismatch")
        try:
            write = self.ctx.write(
                point.name, float(variant.Value), device=self.device.id, protocol="opcua"
            )
        except WriteRejected:
            return bad("BadOutOfRange")
        return None, write

    async def _show(self, point: PointSpec, value: float) -> None:
        """Put the value the actuator took into the node now (the publisher would only
        catch up after the next tick)."""
        from asyncua import ua

        if point.boolean:
            variant = ua.Variant(value >= 0.5, ua.VariantType.Boolean)
        else:
            variant = ua.Variant(float(value), ua.VariantType.Double)
        stamp = ua.DateTime.now(UTC)
        await self.server.write_attribute_value(
            self._nodes[point.name],
            ua.DataValue(Value=variant, SourceTimestamp=stamp, ServerTimestamp=stamp),
        )
        shown = (1.0 if value >= 0.5 else 0.0) if point.boolean else float(value)
        self._published[point.name] = (shown, "Good")
        self.ctx.served(self.device.id, "opcua", point.name, shown, "good", "publish")

    # -- values ------------------------------------------------------------------------

    async def _after_read(self, event: Any, _dispatcher: Any) -> None:
        from asyncua.ua.attribute_ids import AttributeIds

        request = event.request_params
        results = event.response_params
        if request is None or results is None:
            return
        for item, result in zip(request.NodesToRead, results, strict=False):
            point = self._by_node.get(item.NodeId)
            if point is None or item.AttributeId != AttributeIds.Value:
                continue
            status = result.StatusCode.name if result.StatusCode is not None else "Good"
            value = None
            if result.Value is not None and result.Value.Value is not None:
                value = float(result.Value.Value)
            self.ctx.served(
                self.device.id, "opcua", point.name, value, "good" if status == "Good" else status
            )

    def ticked(self, tick_wall_ms: int) -> None:
        """Called after each batch of ticks; wakes the publisher."""
        self._tick_wall_ms = tick_wall_ms
        self._changed.set()

    def faults_changed(self) -> None:
        self._changed.set()  # statuses may change
        self.link.notify()

    async def supervise(self) -> None:
        """Follow link faults: the relay drops, delays or refuses connections."""
        await self.link.run()

    async def _relay_faults(self, link: LinkFaults) -> None:
        await self.relay.set_dropout(link.dropout)
        self.relay.delay_ms = link.delay_ms

    async def publish(self) -> None:
        """Push changed values (and statuses) into the address space."""
        from asyncua import ua
        from asyncua.ua.status_codes import StatusCodes

        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            self._changed.clear()
            wait = self._last_publish + PUBLISH_INTERVAL_S - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_publish = loop.time()
            sim = self.ctx.sim
            stamp = ua.DateTime.fromtimestamp(self._tick_wall_ms / 1000.0, UTC)
            now = ua.DateTime.now(UTC)
            for point in self.device.points:
                status = (
                    sim.faults.point_status(self.device.id, point.name)
                    if sim.faults.active
                    else None
                )
                value: float | None = None if status else sim.value(point.name)
                if point.boolean and value is not None:
                    value = 1.0 if value >= 0.5 else 0.0
                key = (value, status or "Good")
                if self._published.get(point.name) == key:
                    continue
                self._published[point.name] = key
                if status:
                    dv = ua.DataValue(
                        Value=ua.Variant(None, ua.VariantType.Null),
                        StatusCode=ua.StatusCode(getattr(StatusCodes, status)),
                        SourceTimestamp=stamp,
                        ServerTimestamp=now,
                    )
                elif point.boolean:
                    dv = ua.DataValue(
                        Value=ua.Variant(bool(value), ua.VariantType.Boolean),
                        SourceTimestamp=stamp,
                        ServerTimestamp=now,
                    )
                else:
                    dv = ua.DataValue(
                        Value=ua.Variant(value, ua.VariantType.Double),
                        SourceTimestamp=stamp,
                        ServerTimestamp=now,
                    )
                await self.server.write_attribute_value(self._nodes[point.name], dv)
                self.ctx.served(
                    self.device.id,
                    "opcua",
                    point.name,
                    value,
                    status or "good",
                    "publish",
                )

    async def close(self) -> None:
        await self.relay.close()
        if self.server is not None:
            await self.server.stop()
            self.server = None
