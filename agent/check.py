"""``fieldtwin agent check``: the commissioning check a technician runs on site.

It validates the config, loads the keys, checks the state directory is writable,
connects to every device, reads every point once and prints one table per device:
the raw registers, the value under the configured byte/word order, and the value under
each of ABCD / CDAB / BADC / DCBA with implausible ones marked ``!``, so a wrong order
is obvious. Finally it logs in to the broker (unless ``--skip-broker``). The exit
status is 0 only if everything worked and every configured value is plausible.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Sequence
from typing import TextIO

from fieldtwin.agent.codec import ORDER_NAMES
from fieldtwin.agent.config import AgentConfig
from fieldtwin.agent.drivers import CheckRow, make_driver
from fieldtwin.agent.errors import AgentError
from fieldtwin.protocol.errors import ProtocolError
from fieldtwin.protocol.keys import load_private_key, load_public_key
from fieldtwin.protocol.messages import Value

ORDERS = list(ORDER_NAMES.values())


def _fmt(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.6g}"
        return text
    return str(value)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _hint(row: CheckRow) -> str:
    if row.ok or not row.alternatives:
        return ""
    good = [name for name in ORDERS if name in row.alternatives and name not in row.implausible]
    if len(good) == 1:
        byte_order, word_order = next(k for k, v in ORDER_NAMES.items() if v == good[0])
        if row.point.register_count == 1:
            return f" (only {good[0]} looks plausible: byte_order={byte_order!r})"
        return (
            f" (only {good[0]} looks plausible: "
            f"byte_order={byte_order!r}, word_order={word_order!r})"
        )
    if good:
        return f" (plausible under {', '.join(good)})"
    return ""


def render_rows(rows: Sequence[CheckRow]) -> list[str]:
    registers = any(row.point.table for row in rows)
    header = ["POINT", "SOURCE", "TYPE", "RAW", "VALUE"]
    if registers:
        header += ORDERS
    header.append("RESULT")
    table = [header]
    for row in rows:
        point = row.point
        where = point.source.split(" ", 1)[1] if " " in point.source else point.source
        value = _fmt(row.value) + (f" {point.unit}" if point.unit and row.value is not None else "")
        cells = [point.name, where, point.dtype, row.raw or "-", value]
        if registers:
            for name in ORDERS:
                if name in row.alternatives:
                    mark = "!" if name in row.implausible else ""
                    chosen = "*" if point.table and point.codec().order_name == name else ""
                    cells.append(f"{_fmt(row.alternatives[name])}{mark}{chosen}")
                else:
                    cells.append("")
        result = "ok" if row.ok else f"FAIL: {row.error}{_hint(row)}"
        cells.append(result)
        table.append(cells)
    return _table(table)


async def _check_broker(config: AgentConfig) -> str:
    """Log in (with a client id of its own, so a running agent is not kicked off)."""
    import aiomqtt

    broker = config.broker
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=broker.password,
        identifier=f"ft-check-{config.gateway}-{os.getpid()}",
        timeout=broker.connect_timeout_s,
        tls_context=_tls(config),
    )
    try:
        async with asyncio.timeout(broker.connect_timeout_s + 5):
            async with client:
                pass
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def _tls(config: AgentConfig) -> ssl.SSLContext | None:
    broker = config.broker
    if not broker.tls:
        return None
    context = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
    if broker.cert_file and broker.key_file:
        context.load_cert_chain(str(broker.cert_file), str(broker.key_file))
    return context


async def run_check(
    config: AgentConfig, out: TextIO, *, skip_broker: bool = False, device: str | None = None
) -> int:
    failures = 0
    print(
        f"config   {config.file}: ok ({len(config.devices)} devices, "
        f"{sum(len(d.points) for d in config.devices)} points)",
        file=out,
    )
    for label, loader, path in (
        ("key", load_private_key, config.private_key),
        ("hub key", load_public_key, config.hub_public_key),
    ):
        try:
            loaded = loader(path)
            key_id = loaded.key_id
            print(f"{label:<8} {path}: ok (key id {key_id})", file=out)
        except ProtocolError as exc:
            failures += 1
            print(f"{label:<8} FAIL: {exc}", file=out)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=config.state_dir, prefix=".check-"):
            pass
        print(f"state    {config.state_dir}: writable", file=out)
    except OSError as exc:
        failures += 1
        print(f"state    FAIL: {config.state_dir} is not writable: {exc}", file=out)
    index = 0
    for dev in config.devices:
        indexed = []
        for point in dev.points:
            indexed.append((index, point))
            index += 1
        if device is not None and dev.id != device:
            continue
        print(f"\ndevice   {dev.id} ({dev.protocol} {dev.endpoint})", file=out)
        driver = make_driver(dev, indexed)
        try:
            rows = await driver.check()
        except AgentError as exc:
            rows = [CheckRow(point, False, error=str(exc)) for _, point in indexed]
        for line in render_rows(rows):
            print(line, file=out)
        failed = sum(1 for row in rows if not row.ok)
        failures += failed
        latency = driver.stats.latency_ms_avg
        print(
            f"  {len(rows) - failed}/{len(rows)} points ok"
            + (f", average reply {latency:.1f} ms" if driver.stats.requests else ""),
            file=out,
        )
    if not skip_broker:
        error = await _check_broker(config)
        if error:
            failures += 1
            print(
                f"\nbroker   FAIL: {config.broker.url} as {config.broker.username}: {error}",
                file=out,
            )
        else:
            print(f"\nbroker   {config.broker.url} as {config.broker.username}: login ok", file=out)
    print(f"\nresult   {'OK' if not failures else f'{failures} problem(s)'}", file=out)
    return 0 if not failures else 1
