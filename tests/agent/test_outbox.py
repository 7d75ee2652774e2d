"""The DuckDB outbox, on real files: seq and epoch, acks, overflow, quarantine, commands."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from support.keys import gateway_key, registry

from fieldtwin.agent.errors import OutboxError
from fieldtwin.agent.outbox import Outbox, read_summary
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.messages import CommandResult, Data, Quality, Sample

SIGNER = FrameSigner("gw-01", gateway_key)


def samples(n: int, start: int = 0) -> list[Sample]:
    return [
        Sample("tank-1", "level", float(i), 1_000 + i, Quality.GOOD)
        for i in range(start, start + n)
    ]


def alarms(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``alarm=`` field of every captured logfmt line."""
    return [r.ft_fields["alarm"] for r in caplog.records if "alarm" in getattr(r, "ft_fields", {})]


def make(path: Path, **options: object) -> Outbox:
    outbox = Outbox(path, SIGNER, **options)  # type: ignore[arg-type]
    outbox.open()
    return outbox


def test_batches_become_signed_frames_with_consecutive_seqs(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb")
    committed = outbox.commit_data([samples(3), samples(2, 3), []])
    assert [(c.seq, c.samples) for c in committed] == [(1, 3), (2, 2)]
    frame = decode_frame(committed[1].frame, registry())
    assert (frame.kind, frame.sender, frame.epoch, frame.seq) == ("data", "gw-01", outbox.epoch, 2)
    assert isinstance(frame.body, Data)
    assert list(frame.body.samples) == samples(2, 3)
    assert outbox.low_water() == 1
    stats = outbox.stats()
    assert (stats.frames, stats.samples, stats.oldest_ts_ms) == (2, 5, 1_000)


def test_restart_continues_the_epoch_and_resends_identical_frames(tmp_path: Path) -> None:
    path = tmp_path / "o.duckdb"
    first = make(path)
    committed = first.commit_data([samples(4)])
    birth_seq = first.reserve_seq()
    epoch = first.epoch
    first.close()
    second = make(path)
    assert second.epoch == epoch
    assert second.next_seq == birth_seq + 1  # a reserved seq is never reused
    assert second.unacked() == [1]
    assert second.frames([1]) == [(1, committed[0].frame)]  # byte-identical retransmission
    assert second.commit_data([samples(1)])[0].seq == birth_seq + 1


def test_acks_remove_exactly_the_covered_frames(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb")
    outbox.commit_data([samples(1, i) for i in range(10)])
    assert outbox.ack([(2, 4), (7, 7), (50, 60)]) == (4, 4)
    assert outbox.unacked() == [1, 5, 6, 8, 9, 10]
    assert outbox.ack([(1, 10)]) == (6, 6)
    assert outbox.unacked() == []
    assert outbox.low_water() == outbox.next_seq == 11
    assert outbox.ack([(1, 10)]) == (0, 0)  # idempotent
    outbox.close()
    assert make(tmp_path / "o.duckdb").unacked() == []


def test_drop_oldest_makes_room_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = make(tmp_path / "o.duckdb", max_samples=1000)
    outbox.commit_data([samples(400), samples(400)])
    with caplog.at_level(logging.WARNING):
        committed = outbox.commit_data([samples(300)])
    assert [c.seq for c in committed] == [3]
    assert outbox.unacked() == [2, 3]
    assert outbox.counters.dropped_samples == 400
    assert outbox.counters.dropped_frames == 1
    assert "outbox_overflow" in alarms(caplog)
    assert outbox.low_water() == 2  # the hub learns seq 1 will never come
    outbox.close()
    reopened = make(tmp_path / "o.duckdb", max_samples=1000)
    assert reopened.counters.dropped_samples == 400  # counters survive restarts


def test_drop_newest_refuses_what_does_not_fit_without_burning_seqs(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb", max_samples=1000, overflow="drop_newest")
    outbox.commit_data([samples(900)])
    committed = outbox.commit_data([samples(200), samples(50)])
    assert [(c.seq, c.samples) for c in committed] == [(2, 50)]
    assert outbox.counters.dropped_samples == 200
    assert outbox.unacked() == [1, 2]
    assert outbox.next_seq == 3


def test_byte_cap_counts_too(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb", max_bytes=20_000)
    for i in range(20):
        outbox.commit_data([samples(50, i * 50)])
    assert outbox.stats().bytes <= 20_000
    assert outbox.counters.dropped_frames > 0


def test_cmd_results_are_durable_and_never_dropped(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb", max_samples=1000)
    outbox.command_begin("c-1")
    result = CommandResult("c-1", "ok", "", 1500, 123)
    stored = outbox.command_finish(result)
    assert stored.kind == "cmd_result"
    outbox.commit_data([samples(900), samples(900)])  # overflow drops data only
    assert stored.seq in outbox.unacked()
    outbox.close()
    reopened = make(tmp_path / "o.duckdb")
    record = reopened.command("c-1")
    assert record is not None
    assert (record.status, record.readback, record.readback_ts_ms) == ("ok", 1500, 123)
    assert reopened.row_kind(stored.seq) == "cmd_result"
    assert reopened.command("c-2") is None


def test_a_command_started_twice_is_refused_by_the_database(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb")
    outbox.command_begin("c-1")
    with pytest.raises(OutboxError):
        outbox.command_begin("c-1")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-header"])
def test_corrupt_file_is_quarantined_with_a_new_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "o.duckdb"
    first = make(path)
    first.commit_data([samples(10)])
    old_epoch = first.epoch
    first.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        path.write_bytes(data[:5000])
    else:
        path.write_bytes(b"\x00" * len(data))
    with caplog.at_level(logging.ERROR):
        second = make(path, clock=lambda: old_epoch + 1000)
    assert second.epoch == old_epoch + 1000 > old_epoch
    assert second.next_seq == 1
    assert second.counters.quarantined == 1
    assert second.quarantined_to is not None
    assert second.quarantined_to.exists()
    assert "outbox_quarantined" in alarms(caplog)
    assert second.commit_data([samples(1)])[0].seq == 1


def test_a_file_held_by_another_process_is_not_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "o.duckdb"
    make(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, sys, time
                db = duckdb.connect({str(path)!r})
                print("held", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        outbox = Outbox(path, SIGNER)
        with pytest.raises(OutboxError, match="another process"):
            outbox.open()
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        holder.communicate(b"", timeout=30)


def test_storage_failure_keeps_the_counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk cannot be provoked portably in a test; the fault is injected at the
    # one place DuckDB would raise it.
    outbox = make(tmp_path / "o.duckdb")
    outbox.commit_data([samples(1)])
    real = outbox._execute

    def failing(sql: str, params: object = None) -> object:
        if sql.startswith("INSERT INTO frames"):
            raise OutboxError("IO Error: No space left on device")
        return real(sql, params)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox, "_execute", failing)
    with pytest.raises(OutboxError, match="No space"):
        outbox.commit_data([samples(2)])
    assert outbox.counters.commit_failures == 1
    monkeypatch.undo()
    assert outbox.next_seq == 2
    assert outbox.commit_data([samples(2)])[0].seq == 2
    assert outbox.unacked() == [1, 2]


def test_the_connection_is_reopened_every_n_transactions(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb", reopen_every=3)
    first = outbox._db
    for i in range(4):  # commit + ack: 8 transactions, so two reopens
        committed = outbox.commit_data([samples(2, 2 * i)])
        if i % 2:
            outbox.ack([(committed[0].seq, committed[0].seq)])
    outbox.reserve_seq()
    assert outbox.counters.reopens == 2
    assert outbox._db is not first
    assert outbox.unacked() == [1, 3]
    assert [seq for seq, _ in outbox.frames([1, 3])] == [1, 3]
    outbox.close()
    again = make(tmp_path / "o.duckdb")
    assert again.unacked() == [1, 3]
    assert again.next_seq == 6


def test_a_failed_reopen_is_retried_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A reconnect failing (file descriptors exhausted, the disk gone) cannot be provoked
    # portably; the fault is injected where DuckDB would raise it.
    outbox = make(tmp_path / "o.duckdb", reopen_every=1)
    real = outbox._connect
    failures = iter([True, True, False])

    def connect() -> object:
        if next(failures, False):
            raise OutboxError("IO Error: Too many open files")
        return real()

    monkeypatch.setattr(outbox, "_connect", connect)
    outbox.commit_data([samples(1)])  # committed; the reopen after it fails
    assert outbox.counters.reopen_failures == 1
    assert outbox._db is None
    with pytest.raises(OutboxError, match="could not be reopened"):
        outbox.commit_data([samples(1, 1)])  # the retry fails too: a storage error
    assert outbox.next_seq == 2
    assert [c.seq for c in outbox.commit_data([samples(1, 1)])] == [2]  # reconnected
    assert outbox.counters.reopen_failures == 2
    assert outbox.unacked() == [1, 2]
    assert alarms(caplog).count("outbox_reopen_failed") == 1  # once a minute at most


def test_a_closed_buffer_is_not_reopened(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb")
    outbox.close()
    with pytest.raises(OutboxError, match="not open"):
        outbox.commit_data([samples(1)])


def test_read_summary_reads_a_free_file(tmp_path: Path) -> None:
    path = tmp_path / "o.duckdb"
    outbox = make(path)
    outbox.commit_data([samples(5), samples(5, 5)])
    outbox.ack([(1, 1)])
    outbox.close()
    summary = read_summary(path)
    assert summary["frames"] == 1
    assert summary["samples"] == 5
    assert summary["low_water"] == 2
    assert summary["oldest_ts_ms"] == 1_005


def test_memory_and_threads_are_capped(tmp_path: Path) -> None:
    outbox = make(tmp_path / "o.duckdb", memory_limit_mb=32, threads=1)
    db = outbox._db
    assert db.execute("SELECT current_setting('threads')").fetchone()[0] == 1
    limit = db.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.endswith("MiB")
    assert float(limit.split()[0]) <= 32
    assert isinstance(db, duckdb.DuckDBPyConnection)


def test_no_async_io_threads(tmp_path: Path) -> None:
    outbox = make(tmp_path / "buffer.duckdb")
    try:
        setting = outbox._execute("SELECT current_setting('async_threads')").fetchone()
        assert setting is not None
        assert int(setting[0]) == 0
    finally:
        outbox.close()


def test_duckdb_without_async_threads_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fieldtwin.agent.outbox as module

    real = module.duckdb_core()

    class OlderDuckDB:
        Error = real.Error
        InvalidInputException = real.InvalidInputException
        PermissionException = real.PermissionException

        @staticmethod
        def connect(path: str, config: dict[str, object]) -> object:
            if "async_threads" in config:
                raise real.InvalidInputException(
                    "Invalid Input Error: The following options were not recognized: async_threads"
                )
            return real.connect(path, config=config)

    monkeypatch.setattr(module, "duckdb_core", lambda: OlderDuckDB)
    outbox = make(tmp_path / "buffer.duckdb")
    try:
        assert outbox.quarantined_to is None
        assert [c.seq for c in outbox.commit_data([samples(3)])] == [1]
    finally:
        outbox.close()
