"""A hub store whose write-ahead log is damaged opens from its last checkpoint, loudly.

The WAL is made the way a crash makes it: a process writes ingest batches after a
checkpoint and dies without closing (``os._exit``), leaving them in the WAL. Then the
WAL is damaged (bytes flipped in the middle: a torn or bad sector) and the store, then
a whole hub, is opened on it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest
from support.hub_env import running_hub, write_hub_config

from fieldtwin.hub.errors import StoreError
from fieldtwin.hub.store import TwinStore

WRITER = r"""
import os, sys
from pathlib import Path
from fieldtwin.hub.store import FrameRow, IngestWrite, TwinStore

path, first, last, close = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = TwinStore.open(path, threads=1)
for seq in range(first, last + 1):
    store.write_ingest(IngestWrite(frames=[FrameRow(seq, "gw-01", "data", 1, seq, seq, seq, 0)]))
if close == "close":
    store.close()  # CHECKPOINT: everything so far is in the database file
else:
    os._exit(0)  # a crash: these frames live only in the WAL
"""


def write_frames(path: Path, first: int, last: int, *, crash: bool) -> None:
    mode = "crash" if crash else "close"
    subprocess.run(
        [sys.executable, "-c", WRITER, str(path), str(first), str(last), mode],
        check=True,
        timeout=60,
    )


def damage(wal: Path) -> None:
    """Flip 16 bytes a quarter into the WAL: inside an entry, whose checksum then fails.
    (A hit on an entry's length field instead reads as a torn tail: DuckDB then replays
    up to it without a word, a limit of DuckDB noted in docs/reliability.md.)"""
    data = bytearray(wal.read_bytes())
    middle = len(data) // 4
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    wal.write_bytes(bytes(data))


def crashed_store(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "hub.duckdb"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_frames(path, 1, 10, crash=False)
    write_frames(path, 11, 40, crash=True)
    wal = path.with_name("hub.duckdb.wal")
    assert wal.stat().st_size > 0
    return path


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def frame_ids(path: Path) -> list[int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [row[0] for row in con.execute("SELECT id FROM frames ORDER BY id").fetchall()]
    finally:
        con.close()


def test_an_intact_wal_is_replayed(tmp_path: Path) -> None:
    path = crashed_store(tmp_path)
    store = TwinStore.open(path, threads=1)
    try:
        assert store.recovery is None
        assert [r[0] for r in store.query("SELECT id FROM frames ORDER BY id")] == list(
            range(1, 41)
        )
    finally:
        store.close()


def test_a_damaged_wal_is_set_aside_and_the_checkpoint_opens(tmp_path: Path) -> None:
    path = crashed_store(tmp_path)
    wal = path.with_name("hub.duckdb.wal")
    damage(wal)
    with pytest.raises(duckdb.Error, match="WAL"):
        duckdb.connect(str(path)).close()  # what the hub met before: a crash loop
    store = TwinStore.open(path, threads=1)
    try:
        recovery = store.recovery
        assert recovery is not None
        assert recovery.moved_to.exists()
        assert recovery.moved_to.name.startswith("hub.duckdb.wal.damaged-")
        assert recovery.wal_bytes == recovery.moved_to.stat().st_size
        assert "missing from history" in recovery.describe()
        [event] = store.recovery_events(123)
        assert event.action == "store_wal_damaged"
        assert event.detail["moved_to"] == str(recovery.moved_to)
        ids = [r[0] for r in store.query("SELECT id FROM frames ORDER BY id")]
        assert ids == list(range(1, 11))  # the last checkpoint, nothing after it
    finally:
        store.close()
    # the next start is an ordinary one
    again = TwinStore.open(path, threads=1)
    try:
        assert again.recovery is None
    finally:
        again.close()


def test_read_only_readers_do_not_touch_a_damaged_wal(tmp_path: Path) -> None:
    path = crashed_store(tmp_path)
    wal = path.with_name("hub.duckdb.wal")
    damage(wal)
    with pytest.raises(StoreError):
        TwinStore.open(path, read_only=True, threads=1)
    assert wal.exists()


async def test_the_hub_starts_on_a_damaged_wal_with_an_alarm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_hub_config(tmp_path)
    write_frames(files.database, 1, 10, crash=False)
    write_frames(files.database, 11, 40, crash=True)
    damage(files.database.with_name("hub.duckdb.wal"))
    async with running_hub(files.config, mqtt=False) as hub:
        base = f"http://127.0.0.1:{hub.api_port}"
        metrics = (await asyncio.to_thread(get, f"{base}/metrics")).decode()
        audit = json.loads(await asyncio.to_thread(get, f"{base}/api/audit?limit=50"))
    assert "fieldtwin_hub_store_recoveries_total 1" in metrics
    [record] = [a for a in audit if a["action"] == "store_wal_damaged"]
    assert "missing from history" in record["detail"]["description"]
    assert "twin store opened from its last checkpoint" in caplog.text
    assert frame_ids(files.database) == list(range(1, 11))
