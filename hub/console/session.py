"""The console's link to the hub: connect, snapshot, follow deltas, reconnect.

The transport is anything shaped like ``OperatorClient`` (hub/opclient.py): the real
one talks to the broker with the operator's key and pins the hub's key, so every frame
the console applies was verified against it; ``synthetic.SyntheticHub`` plays a recorded
or generated hub for snapshot tests and the benchmark.

The loop (``Session.run``), until cancelled:

1. connect to the broker (subscribed to the views), ask ``hub.whoami`` (roles and the
   operations this operator may use) and a snapshot (every part);
2. apply deltas as they come; a gap or a new hub instance means a fresh snapshot;
3. when the broker connection drops, reconnect with jittered backoff (0.5 s … 10 s);
   when the hub goes quiet (no frame for ``HUB_SILENT_MS``) the header says since when,
   and the next frame of a hub that came back triggers a snapshot.

Frames wait in a bounded queue while a snapshot is fetched; past ``QUEUE_MAX`` they are
dropped (counted), which the sequence check turns into another snapshot: memory stays
bounded whatever the hub sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from fieldtwin.hub.console.model import APPLIED, GAP, NEW_INSTANCE, UNSYNCED, LiveModel, local_ms
from fieldtwin.hub.opclient import OperatorError
from fieldtwin.protocol.aio import within
from fieldtwin.protocol.messages import View

log = logging.getLogger("fieldtwin.hub.console")

HUB_SILENT_MS = 3500
"""No frame (the hub heartbeats every second) for this long: the hub is unreachable."""
QUEUE_MAX = 20_000
SNAPSHOT_RETRY_S = 3.0
REQUEST_TIMEOUT_S = 10.0


class Transport(Protocol):
    """What the console needs of an operator client (``OperatorClient`` has it all)."""

    @property
    def link_error(self) -> str | None: ...

    def connected(self, *, views: bool = False) -> AbstractAsyncContextManager[Any]: ...

    async def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any: ...

    def views(self) -> AsyncIterator[View]: ...

    def approval_for(self, command: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(slots=True)
class Link:
    """The console's view of its link to the hub, for the header."""

    broker: bool = False
    broker_error: str = "connecting"
    down_since_ms: int = 0
    """Local time the link went down (0 while up)."""


class Session:
    """Runs the transport for the app; the app reads ``model``, ``link`` and ``whoami``."""

    def __init__(
        self,
        connect: Callable[[], Transport],
        model: LiveModel,
        *,
        clock: Callable[[], int] = local_ms,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._connect = connect
        self.model = model
        self.clock = clock
        self.on_change = on_change
        self.transport: Transport | None = None
        self.whoami: dict[str, Any] = {}
        self.link = Link(down_since_ms=clock())
        self.dropped = 0
        self.snapshot_error = ""
        self._queue: asyncio.Queue[View] = asyncio.Queue(QUEUE_MAX)
        self._need_snapshot = True
        self._snapshot_due = 0.0

    # -- for the app -----------------------------------------------------------------------

    @property
    def operator(self) -> str:
        return str(self.whoami.get("operator", ""))

    def allowed(self, op: str) -> bool:
        return op in self.whoami.get("operations", ())

    def hub_up(self, now_ms: int | None = None) -> bool:
        now = self.clock() if now_ms is None else now_ms
        return (
            self.link.broker and self.model.synced and now - self.model.last_view_ms < HUB_SILENT_MS
        )

    def down_since(self, now_ms: int) -> int:
        """Local time since when the hub is unreachable (0 if it is reachable): the last
        frame heard from it, else when the broker link went down."""
        if self.hub_up(now_ms):
            return 0
        return self.model.last_view_ms or self.link.down_since_ms or now_ms

    def why_down(self) -> str:
        if not self.link.broker:
            return f"broker unreachable: {self.link.broker_error}"
        if self.snapshot_error:
            return self.snapshot_error
        return "no frames from the hub"

    async def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        transport = self.transport
        if transport is None:
            raise OperatorError(
                f"not connected ({self.link.broker_error}); try again when the hub link is up",
                code="unavailable",
            )
        return await transport.request(op, args, timeout_s=timeout_s or REQUEST_TIMEOUT_S)

    def approval_for(self, command: Mapping[str, Any]) -> dict[str, Any]:
        if self.transport is None:
            raise OperatorError("not connected", code="unavailable")
        return self.transport.approval_for(command)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.5
        while True:
            transport = self._connect()
            try:
                async with transport.connected(views=True):
                    self.transport = transport
                    self.link.broker = True
                    self.link.broker_error = ""
                    backoff = 0.5
                    self.on_change()
                    await self._follow(transport)
            except OperatorError as exc:
                self._down(str(exc))
            finally:
                self.transport = None
            self.on_change()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 10.0)

    def _down(self, why: str) -> None:
        if self.link.broker or not self.link.down_since_ms:
            self.link.down_since_ms = self.clock()
        self.link.broker = False
        self.link.broker_error = why
        self.model.unsync()
        self._need_snapshot = True

    async def _follow(self, transport: Transport) -> None:
        pump = asyncio.create_task(self._pump(transport), name="console-views")
        loop = asyncio.get_running_loop()
        self._snapshot_due = loop.time()
        try:
            while True:
                error = transport.link_error
                if error is not None:
                    raise OperatorError(f"broker connection lost: {error}", code="unavailable")
                if pump.done():
                    pump.result()
                    raise OperatorError("the view stream ended", code="unavailable")
                due = self._need_snapshot and loop.time() >= self._snapshot_due
                if due and not await self._snapshot(transport):
                    self._snapshot_due = loop.time() + SNAPSHOT_RETRY_S
                try:
                    view = await within(0.5, self._queue.get())
                except TimeoutError:
                    self._mark_silence()
                    continue
                self._apply(view, loop.time())
                # drain what is already queued without waking the loop per frame
                while not self._queue.empty():
                    self._apply(self._queue.get_nowait(), loop.time())
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OperatorError, Exception):
                await pump

    def _apply(self, view: View, now: float) -> None:
        verdict = self.model.apply_view(view, self.clock())
        if verdict in (GAP, NEW_INSTANCE):
            if not self._need_snapshot:
                log.info("view %s: taking a fresh snapshot", verdict)
                self._snapshot_due = now
            self._need_snapshot = True
        elif verdict == UNSYNCED and view.stream == "hub" and self.snapshot_error:
            # a hub that did not answer is (back) online: try again within a second
            self._snapshot_due = min(self._snapshot_due, now + 1.0)
        if verdict == APPLIED:
            self.link.down_since_ms = 0

    def _mark_silence(self) -> None:
        """No frame for a while: let the app say so (the header shows since when)."""
        if not self.hub_up():
            self.on_change()

    async def _pump(self, transport: Transport) -> None:
        async for view in transport.views():
            try:
                self._queue.put_nowait(view)
            except asyncio.QueueFull:
                self.dropped += 1
                self.model.unsync()
                self._need_snapshot = True

    async def _snapshot(self, transport: Transport) -> bool:
        """whoami, then every part of a fresh snapshot; frames queued meanwhile follow."""
        try:
            self.whoami = dict(
                await transport.request("hub.whoami", timeout_s=REQUEST_TIMEOUT_S) or {}
            )
            first = await transport.request("view.snapshot", {}, timeout_s=REQUEST_TIMEOUT_S)
            parts = [first["tables"]]
            for number in range(1, int(first["parts"])):
                answer = await transport.request(
                    "view.snapshot",
                    {"snapshot": first["snapshot"], "part": number},
                    timeout_s=REQUEST_TIMEOUT_S,
                )
                parts.append(answer["tables"])
        except OperatorError as exc:
            self.snapshot_error = str(exc)
            if exc.code != "unavailable":
                log.warning("snapshot refused: %s", exc)
            self.on_change()
            return False
        self.model.load_snapshot(first, parts, self.clock())
        self._need_snapshot = False
        self.snapshot_error = ""
        self.link.down_since_ms = 0
        self.on_change()
        return True
