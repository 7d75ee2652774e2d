"""Plain-text tables: what an operator reads in ``fieldtwin twin alarms``."""

from __future__ import annotations

from fieldtwin.hub.alarms import AlarmBook
from fieldtwin.hub.drift import Finding
from fieldtwin.hub.render import alarms_table

RAISED = 1_800_000_000_000  # 2027-01-15 08:00:00 UTC


def _columns(table: str) -> dict[str, dict[str, str]]:
    """Each alarm's row as column name -> text (columns split on the header's offsets)."""
    header, *lines = table.splitlines()
    names = header.split()
    starts = [header.index(" " + n) + 1 if i else 0 for i, n in enumerate(names)]
    # multi-word headers ("SHELVED UNTIL") are one column
    merged = [(n, s) for n, s in zip(names, starts, strict=True) if n != "UNTIL"]
    out = {}
    for line in lines:
        cells = {}
        for i, (name, start) in enumerate(merged):
            end = merged[i + 1][1] if i + 1 < len(merged) else None
            cells[name.lower()] = line[start:end].strip()
        out[cells["id"]] = cells
    return out


def test_the_alarm_table_shows_raised_acked_and_shelved_until_times() -> None:
    book = AlarmBook()
    first = Finding("threshold", "tank-1", "level", "warning", "level high", RAISED, 4.2, "gw-01")
    second = Finding("threshold", "tank-2", "level", "warning", "level high", RAISED, 4.3, "gw-01")
    acked_id, shelved_id = (t.alarm.id for t in book.reconcile([first, second], RAISED + 5_000))
    book.acknowledge(acked_id, "olga", RAISED + 65_000, "seen")
    book.shelve(shelved_id, "olga", RAISED + 3_600_000, RAISED + 125_000, "maintenance")
    rows = _columns(alarms_table([a.row() for a in book.open.values()]))
    acked, shelved = rows[acked_id], rows[shelved_id]
    assert acked["raised"] == shelved["raised"] == "08:00:05"
    assert acked["acked"] == "08:01:05 olga"
    assert (acked["state"], acked["shelved"]) == ("acked", "-")
    assert shelved["acked"] == "-"
    assert (shelved["state"], shelved["shelved"]) == ("shelved", "09:00:00")
