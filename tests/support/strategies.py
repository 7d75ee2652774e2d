"""Hypothesis strategies for protocol values, shared by every package's tests."""

from __future__ import annotations

from hypothesis import strategies as st

from fieldtwin.protocol.messages import (
    CMD_STATUSES,
    DTYPES,
    ID_PATTERN,
    MAX_NAME_LEN,
    Ack,
    Approval,
    Birth,
    Command,
    CommandResult,
    Data,
    Death,
    DeviceLink,
    Heartbeat,
    HubState,
    OperatorRequest,
    OperatorResponse,
    PointMeta,
    Quality,
    Rebirth,
    Sample,
    View,
)

# msgpack encodes str as UTF-8, so lone surrogates cannot exist on the wire.
_text_chars = st.characters(exclude_categories=("Cs",))
ids = st.from_regex(ID_PATTERN, fullmatch=True)
names = st.text(_text_chars, min_size=1, max_size=MAX_NAME_LEN)
texts = st.text(_text_chars, max_size=200)
ts_ms = st.integers(0, 2**63 - 1)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_text_chars, max_size=64),
)
qualities = st.sampled_from(list(Quality))
samples = st.builds(Sample, names, names, values, ts_ms, qualities)
numbers_or_none = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))

point_metas = st.builds(
    PointMeta,
    entity=names,
    attribute=names,
    dtype=st.sampled_from(sorted(DTYPES)),
    unit=st.text(_text_chars, max_size=32),
    writable=st.booleans(),
    min=numbers_or_none,
    max=numbers_or_none,
    interval_ms=st.integers(0, 86_400_000),
    source=texts,
    device=st.one_of(st.just(""), names),
)
births = st.builds(
    Birth,
    points=st.lists(point_metas, max_size=5).map(tuple),
    state=st.lists(samples, max_size=5).map(tuple),
    low_water=st.integers(1, 2**63 - 1),
    info=st.dictionaries(st.text(_text_chars, max_size=20), texts, max_size=4),
    # 0 (this birth opens the session) or an earlier birth; the tests encode at seq 7.
    session=st.integers(0, 7),
)


@st.composite
def birth_parts(draw: st.DrawFn) -> Birth:
    """A part of a birth in parts, as encoded at seq 7: part 0, or a later part naming
    part 0's earlier seq, and a session no later than that birth."""
    parts = draw(st.integers(1, 64))
    part = draw(st.integers(0, parts - 1))
    first = 0 if part == 0 else draw(st.integers(1, 6))
    base = draw(births)
    return Birth(
        base.points,
        base.state,
        base.low_water,
        base.info,
        session=draw(st.integers(0, first or 7)),
        state_seqs=base.state_seqs,
        part=part,
        parts=parts,
        first=first,
    )


device_links = st.builds(
    DeviceLink, id=names, up=st.booleans(), since_ms=ts_ms, error=st.text(_text_chars, max_size=80)
)
heartbeats = st.builds(
    Heartbeat,
    session=st.integers(1, 2**63 - 1),
    beat=st.integers(1, 2**63 - 1),
    interval_ms=st.integers(1, 86_400_000),
    devices=st.lists(device_links, max_size=5).map(tuple),
)
# Encoded at seq 7: an online state opens its session (0) or names an earlier one.
hub_states = st.one_of(
    st.builds(HubState, online=st.just(True), instance=ids, session=st.integers(0, 7)),
    st.builds(
        HubState,
        online=st.just(False),
        instance=ids,
        session=st.integers(1, 7),
        reason=texts,
    ),
)
datas = st.lists(samples, max_size=20).map(Data.of)
deaths = st.builds(Death, birth_seq=st.integers(1, 2**63 - 1), reason=texts)
ranges = st.tuples(st.integers(1, 2**40), st.integers(0, 2**20)).map(lambda r: (r[0], r[0] + r[1]))
acks = st.builds(
    Ack, to=ids, epoch=st.integers(0, 2**63 - 1), ranges=st.lists(ranges, max_size=8).map(tuple)
)
rebirths = st.builds(Rebirth, to=ids, reason=texts)
approvals = st.builds(
    Approval,
    operator=ids,
    key_id=st.text("0123456789abcdef", min_size=16, max_size=16),
    signature=st.binary(min_size=64, max_size=64),
)
commands = st.builds(
    Command,
    to=ids,
    cmd_id=st.text(_text_chars, min_size=1, max_size=64),
    entity=names,
    attribute=names,
    value=values,
    expires_at_ms=ts_ms,
    approvals=st.lists(approvals, max_size=3).map(tuple),
    reason=texts,
    restore_value=values,
    rollback_of=st.text(_text_chars, max_size=64),
    rollback_from=values,
)
command_results = st.builds(
    CommandResult,
    cmd_id=st.text(_text_chars, min_size=1, max_size=64),
    status=st.sampled_from(sorted(CMD_STATUSES)),
    detail=texts,
    readback=values,
    readback_ts_ms=st.one_of(st.none(), ts_ms),
)
plain_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
    st.binary(max_size=70),
)
plain = st.recursive(
    plain_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)),
    max_leaves=12,
)
req_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=16, max_size=64)
op_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8}){0,2}", fullmatch=True)
operator_requests = st.builds(
    OperatorRequest,
    req_id=req_ids,
    expires_at_ms=ts_ms,
    op=op_names,
    args=st.dictionaries(names, plain, max_size=6),
)
operator_responses = st.builds(
    OperatorResponse,
    to=ids,
    req_id=req_ids,
    ok=st.booleans(),
    code=st.text(_text_chars, max_size=32),
    error=texts,
    result=plain,
)
views = st.builds(
    View,
    stream=ids,
    instance=st.text(_text_chars, min_size=1, max_size=64),
    view_seq=st.integers(0, 2**63 - 1),
    data=st.dictionaries(names, plain, max_size=6),
)
bodies = st.one_of(
    births,
    datas,
    deaths,
    acks,
    rebirths,
    commands,
    command_results,
    operator_requests,
    operator_responses,
    views,
    heartbeats,
    hub_states,
)
