"""The hub's signed online state: what the hub signs, what an agent believes."""

from __future__ import annotations

import itertools

import pytest
from support.keys import hub_key, registry

from fieldtwin.protocol.errors import Replay, StaleEpoch
from fieldtwin.protocol.frames import FrameSigner, decode_frame
from fieldtwin.protocol.messages import HubState
from fieldtwin.protocol.presence import HubPresence, PresenceView


def presence(epoch: int = 100) -> HubPresence:
    counter = itertools.count(1)
    return HubPresence(
        FrameSigner("hub", hub_key), "inst-1", lambda: (epoch, next(counter)), lambda: 5
    )


def decoded(raw: bytes) -> tuple[int, int, HubState]:
    frame = decode_frame(raw, registry())
    assert frame.kind == "hub_state"
    assert frame.sender == "hub"
    assert isinstance(frame.body, HubState)
    return frame.epoch, frame.seq, frame.body


def test_each_connection_signs_an_online_state_and_a_will_naming_it() -> None:
    hub = presence()
    will, online = hub.connect()
    epoch, seq, body = decoded(online)
    assert (body.online, body.instance, body.session, body.session_seq(seq)) == (
        True,
        "inst-1",
        0,
        seq,
    )
    will_epoch, will_seq, will_body = decoded(will)
    assert (will_body.online, will_body.session, will_body.reason) == (
        False,
        seq,
        "connection lost",
    )
    assert will_epoch == epoch
    assert will_seq > seq
    stop = decoded(hub.offline("shutdown"))[2]
    assert (stop.online, stop.session, stop.reason) == (False, seq, "shutdown")


def test_an_agent_follows_sessions_forward_and_refuses_replays() -> None:
    hub = presence()
    view = PresenceView()
    will1, online1 = hub.connect()
    assert view.observe(*decoded(online1)) == "new_session"
    assert view.online is True
    assert view.observe(*decoded(online1)) == "same"  # the retained copy, again
    will2, online2 = hub.connect()  # the hub reconnected
    assert view.observe(*decoded(online2)) == "new_session"
    with pytest.raises(Replay):
        view.observe(*decoded(online1))  # an old online state replayed
    with pytest.raises(Replay):
        view.observe(*decoded(will1))  # the will of the old connection, late
    assert view.online is True
    assert view.observe(*decoded(will2)) == "offline"
    assert view.online is False
    assert view.observe(*decoded(will2)) == "same"
    with pytest.raises(Replay):
        view.observe(*decoded(online2))  # the ended session cannot come back
    _, online3 = hub.connect()
    assert view.observe(*decoded(online3)) == "new_session"


def test_a_new_hub_epoch_wins_and_an_old_one_is_stale() -> None:
    old, new = presence(epoch=100), presence(epoch=200)
    view = PresenceView()
    _, old_online = old.connect()
    _, new_online = new.connect()  # seq 1 again, but a later epoch (a new database)
    assert view.observe(*decoded(old_online)) == "new_session"
    assert view.observe(*decoded(new_online)) == "new_session"
    with pytest.raises(StaleEpoch):
        view.observe(*decoded(old_online))


def test_an_agent_that_starts_while_the_hub_is_down_believes_the_will() -> None:
    hub = presence()
    will, online = hub.connect()
    view = PresenceView()
    assert view.observe(*decoded(will)) == "offline"
    with pytest.raises(Replay):
        view.observe(*decoded(online))
    _, later = hub.connect()
    assert view.observe(*decoded(later)) == "new_session"
