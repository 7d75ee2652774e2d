"""The hash-chained audit log finds any edit, insertion or deletion."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from fieldtwin.hub.audit import AuditChain, AuditEvent, verify_chain

events = st.lists(
    st.builds(
        AuditEvent,
        st.integers(0, 2**40),
        st.sampled_from(["hub", "gw-01", "olga"]),
        st.sampled_from(["birth", "frame_rejected", "alarm_raised"]),
        st.text(max_size=10),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    ),
    min_size=2,
    max_size=20,
)


def rows(records: list) -> list[tuple]:  # type: ignore[type-arg]
    return [
        (r.seq, r.ts_ms, r.actor, r.action, r.subject, r.detail, r.prev_hash, r.hash)
        for r in records
    ]


@given(events, st.data())
def test_chain_verifies_and_detects_tampering(items: list[AuditEvent], data: st.DataObject) -> None:
    chain = AuditChain()
    first = chain.chain(items[: len(items) // 2])
    chain.commit(first)
    second = chain.chain(items[len(items) // 2 :])
    chain.commit(second)
    records = first + second
    assert verify_chain(rows(records)).ok
    assert verify_chain(rows(records)).head_hash == chain.head_hash
    index = data.draw(st.integers(0, len(records) - 1))
    edited = list(records)
    edited[index] = replace(records[index], detail=records[index].detail + " ")
    check = verify_chain(rows(edited))
    assert not check.ok
    assert check.first_bad_seq == index + 1
    deleted = records[:index] + records[index + 1 :]
    if index < len(records) - 1:
        assert not verify_chain(rows(deleted)).ok


def test_uncommitted_records_do_not_move_the_head() -> None:
    chain = AuditChain()
    chain.chain([AuditEvent(1, "hub", "x", "y", {})])  # the write failed: never committed
    records = chain.chain([AuditEvent(2, "hub", "x", "y", {})])
    assert records[0].seq == 1
