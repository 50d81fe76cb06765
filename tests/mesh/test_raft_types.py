"""Raft-lite values: timing profiles and their validation, durable-state checks on restart."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from spear.errors import ConfigError
from spear.mesh.raft import RaftCore
from spear.mesh.raft_messages import AppendEntries, AppendReply
from spear.mesh.raft_types import (
    LAN,
    LAN_FAST,
    LOOPBACK,
    PROFILES,
    SIM,
    Entry,
    HardState,
    RaftStateError,
)


def test_profiles_follow_the_timing_table() -> None:
    assert (LAN.heartbeat_interval_s, LAN.election_timeout_min_s, LAN.election_timeout_max_s) == (
        0.1,
        1.0,
        2.0,
    )
    assert (LAN_FAST.election_timeout_min_s, LAN_FAST.election_timeout_max_s) == (0.4, 0.8)
    assert (LOOPBACK.election_timeout_min_s, LOOPBACK.election_timeout_max_s) == (0.3, 0.6)
    assert SIM.max_entries_per_append == 8 and SIM.snapshot_threshold_entries == 64
    assert set(PROFILES) == {"lan", "lan-fast", "loopback", "sim"}
    for timings in PROFILES.values():
        # heartbeats at <= T/10 (rule 15), the append timeout shorter than an election
        assert timings.heartbeat_interval_s <= timings.election_timeout_min_s / 5
        assert timings.append_timeout_s < timings.election_timeout_min_s


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"heartbeat_interval_s": 0.0}, "raft.heartbeat_interval_s must be a finite number > 0"),
        ({"election_timeout_max_s": 1.0}, "must be greater than raft.election_timeout_min_s"),
        ({"heartbeat_interval_s": 0.6}, "must be at most half of raft.election_timeout_min_s"),
        ({"max_entries_per_append": -1}, "raft.max_entries_per_append must be"),
    ],
)
def test_bad_timings_name_the_setting(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(LAN, **change)


def core(**kwargs: object) -> RaftCore:
    return RaftCore(node_id="a", timings=SIM, rng=random.Random(0), now=0.0, **kwargs)  # type: ignore[arg-type]


def test_restart_refuses_a_log_with_a_gap_or_a_stale_term() -> None:
    one = Entry(index=1, term=1, kind="config", data=b'{"learners":[],"voters":["a"]}')
    three = Entry(index=3, term=1, kind="noop")
    with pytest.raises(RaftStateError, match="has a gap"):
        core(hard_state=HardState(term=1), entries=[one, three])
    with pytest.raises(RaftStateError, match="hard state in the store is stale"):
        core(hard_state=HardState(term=0), entries=[one])


def test_follower_persists_entries_in_the_ready_that_carries_its_ack() -> None:
    follower = RaftCore(node_id="b", timings=SIM, rng=random.Random(0), now=0.0)
    entries = (
        Entry(index=1, term=1, kind="config", data=b'{"learners":[],"voters":["a","b","c"]}'),
        Entry(index=2, term=2, kind="noop"),
    )
    ready = follower.step(
        AppendEntries(
            term=2, sender="a", prev_index=0, prev_term=0, entries=entries, commit_index=0
        ),
        now=0.0,
    )
    assert ready.entries == entries and ready.hard_state == HardState(term=2, voted_for=None)
    assert ready.messages == (("a", AppendReply(term=2, sender="b", success=True, match_index=2)),)
    assert follower.voters == ("a", "b", "c") and follower.leader_id == "a"
