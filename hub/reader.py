"""How tools read a hub's twin: ask the running hub, or open its file when none runs.

A DuckDB file can be open in one writing process only, and no other process may open
it at the same time. ``open_reader`` therefore looks for the endpoint file the hub
writes next to its database (``<database>.api.json``): if the hub answers on the
loopback API, every query goes through it; if there is no endpoint file, or its
process is gone, the database is opened read-only. If a live process holds the file
but its API does not answer, the reader says so rather than guessing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fieldtwin.hub import queries
from fieldtwin.hub.api import ApiClient, Endpoint, pid_alive
from fieldtwin.hub.config import HubConfig
from fieldtwin.hub.errors import HubUnreachable, StoreLocked
from fieldtwin.hub.export import twin_document
from fieldtwin.hub.storage import TwinStorePort, open_store


class TwinReader(Protocol):
    live: bool

    def entities(
        self,
        *,
        types: Sequence[str] = (),
        health: Sequence[str] = (),
        where: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> list[dict[str, Any]]: ...

    def history(
        self, entity: str, attribute: str, start: str, end: str, limit: int
    ) -> list[dict[str, Any]]: ...

    def as_of(self, at: str) -> dict[str, dict[str, dict[str, Any]]]: ...

    def diff(self, start: str, end: str) -> list[dict[str, Any]]: ...

    def export(self) -> dict[str, Any]: ...

    def alarms(self, states: Sequence[str] = ()) -> list[dict[str, Any]]: ...

    def drift(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def predict(self, target: str, horizon: str, at: str) -> dict[str, Any]: ...

    def simulate(self, sets: Mapping[str, float], horizon: str) -> dict[str, Any]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class LiveReader:
    """Queries through a running hub's loopback API."""

    live = True

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def entities(
        self,
        *,
        types: Sequence[str] = (),
        health: Sequence[str] = (),
        where: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        for predicate in where:
            queries.Predicate.parse(predicate)  # fail here with the same message
        result: list[dict[str, Any]] = self.client.call(
            "/api/twin",
            {
                "type": list(types),
                "health": list(health),
                "where": list(where),
                "entity": list(ids),
            },
        )
        return result

    def history(
        self, entity: str, attribute: str, start: str, end: str, limit: int
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.call(
            "/api/history",
            {"entity": entity, "attribute": attribute, "from": start, "to": end, "limit": limit},
        )
        return result

    def as_of(self, at: str) -> dict[str, dict[str, dict[str, Any]]]:
        result: dict[str, dict[str, dict[str, Any]]] = self.client.call("/api/asof", {"at": at})
        return result

    def diff(self, start: str, end: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.call("/api/diff", {"from": start, "to": end})
        return result

    def export(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("/api/export")
        return result

    def alarms(self, states: Sequence[str] = ()) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.call("/api/alarms", {"state": list(states)})
        return result

    def drift(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.call("/api/drift")
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("/api/status")
        return result

    def predict(self, target: str, horizon: str, at: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call(
            "/api/predict", {"target": target, "horizon": horizon or None, "at": at or None}
        )
        return result

    def simulate(self, sets: Mapping[str, float], horizon: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call(
            "/api/simulate",
            {"set": [f"{k}={v!r}" for k, v in sets.items()], "horizon": horizon or None},
        )
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.client.call("/api/models")
        return result

    def close(self) -> None:
        return None


class FileReader:
    """Queries on the database file, read-only, while no hub runs."""

    live = False

    def __init__(self, store: TwinStorePort, config: HubConfig) -> None:
        self.store = store
        self.config = config

    @staticmethod
    def _now() -> int:
        return int(time.time() * 1000)

    def entities(
        self,
        *,
        types: Sequence[str] = (),
        health: Sequence[str] = (),
        where: Sequence[str] = (),
        ids: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        return queries.current_entities(
            self.store,
            self.config,
            types=types,
            health=health,
            where=[queries.Predicate.parse(p) for p in where],
            entities=ids,
        )

    def history(
        self, entity: str, attribute: str, start: str, end: str, limit: int
    ) -> list[dict[str, Any]]:
        now = self._now()
        return queries.history(
            self.store,
            entity,
            attribute,
            queries.parse_time(start, now),
            queries.parse_time(end, now),
            limit,
        )

    def as_of(self, at: str) -> dict[str, dict[str, dict[str, Any]]]:
        return queries.as_of(self.store, queries.parse_time(at, self._now()))

    def diff(self, start: str, end: str) -> list[dict[str, Any]]:
        now = self._now()
        return queries.diff(
            self.store, queries.parse_time(start, now), queries.parse_time(end, now)
        )

    def export(self) -> dict[str, Any]:
        return twin_document(self.store, self.config)

    def alarms(self, states: Sequence[str] = ()) -> list[dict[str, Any]]:
        return queries.alarms(self.store, states)

    def drift(self) -> list[dict[str, Any]]:
        return queries.open_drift(self.store)

    def status(self) -> dict[str, Any]:
        gateways = [
            {
                "id": gateway,
                "online": bool(online),
                "epoch": epoch,
                "frames": frames,
                "last_frame": queries.iso(last_frame_ms),
            }
            for gateway, epoch, online, last_frame_ms, _, frames in self.store.gateway_rows()
        ]
        return {
            "twin_id": self.config.twin_id,
            "running": False,
            "database": self.store.location,
            "config": str(self.config.file),
            "gateways": gateways,
            "last_check": queries.iso(self.store.last_check_ms()),
            "audit_head": self.store.audit_head(),
        }

    def _bank(self) -> Any:
        from fieldtwin.hub.predict import ModelBank

        bank = ModelBank(self.config)
        bank.restore(self.store.load_models())
        return bank

    def _context(self) -> Any:
        from fieldtwin.hub.predict import Context

        return Context(self.store, self.config, self._now())

    def _horizon_ms(self, horizon: str) -> int:
        if horizon:
            return queries.parse_duration_ms(horizon)
        return round(self.config.prediction.horizon_s * 1000)

    def predict(self, target: str, horizon: str, at: str) -> dict[str, Any]:
        from fieldtwin.hub.predict import forecast

        now = self._now()
        at_ms = queries.parse_time(at, now) if at else None
        return forecast(self._bank(), self._context(), target, self._horizon_ms(horizon), at_ms)

    def simulate(self, sets: Mapping[str, float], horizon: str) -> dict[str, Any]:
        """What-if on the stored models (no interlock verdict: that needs the live twin's
        gateway links and freshness, so it is left out rather than guessed)."""
        from fieldtwin.hub.predict import simulate

        return simulate(self._bank(), self._context(), sets, self._horizon_ms(horizon))

    def models(self) -> list[dict[str, Any]]:
        from fieldtwin.hub.predict import model_rows

        return model_rows(self._bank())

    def close(self) -> None:
        self.store.close()


def open_reader(config: HubConfig, timeout: float = 30.0) -> TwinReader:
    endpoint = Endpoint.read(config.endpoint_file)
    if endpoint is not None:
        client = ApiClient(endpoint, timeout=timeout)
        try:
            status = client.call("/api/status")
        except HubUnreachable:
            status = None
        if isinstance(status, dict) and status.get("instance") == endpoint.instance:
            return LiveReader(client)
    try:
        store = open_store(config, read_only=True, threads=1)
    except StoreLocked:
        if endpoint is not None and pid_alive(endpoint.pid):
            raise HubUnreachable(
                f"the hub (pid {endpoint.pid}) holds {config.database} but its API on "
                f"127.0.0.1:{endpoint.port} does not answer; is it starting or stuck?"
            ) from None
        raise
    return FileReader(store, config)
