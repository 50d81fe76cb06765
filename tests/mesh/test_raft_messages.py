"""Raft-lite messages: their shape rules and a round trip through the mesh codec."""

from __future__ import annotations

import dataclasses

import pytest

from spear.mesh.codec import MessageCodec
from spear.mesh.raft_messages import (
    RAFT_MESSAGES,
    RAFT_VALUES,
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    InstallSnapshotReply,
    PreVote,
    PreVoteReply,
    RaftMessage,
    RequestVote,
    SnapshotChunk,
    SnapshotChunkReply,
    TimeoutNow,
    VoteReply,
)
from spear.mesh.raft_types import Entry, Snapshot

SAMPLES: list[RaftMessage] = [
    PreVote(term=3, sender="a", last_log_index=7, last_log_term=2),
    PreVoteReply(term=3, sender="b", granted=True),
    RequestVote(term=3, sender="a", last_log_index=7, last_log_term=2, transfer=True),
    VoteReply(term=3, sender="b", granted=False),
    AppendEntries(
        term=3,
        sender="a",
        prev_index=6,
        prev_term=2,
        entries=(
            Entry(index=7, term=3, kind="noop"),
            Entry(index=8, term=3, kind="command", data=b"\x00\xff"),
        ),
        commit_index=6,
        read_context=4,
    ),
    AppendReply(
        term=3,
        sender="b",
        success=False,
        reject_index=6,
        conflict_index=4,
        conflict_term=2,
        read_context=4,
    ),
    InstallSnapshot(
        term=3,
        sender="a",
        snapshot=Snapshot(index=9, term=3, voters=("a", "b"), learners=("c",), data=b"s"),
    ),
    InstallSnapshotReply(term=3, sender="c", match_index=9),
    TimeoutNow(term=3, sender="a"),
    SnapshotChunk(
        term=3,
        sender="a",
        index=9,
        snapshot_term=3,
        voters=("a", "b"),
        learners=("c",),
        size=5,
        checksum=b"\x01" * 32,
        offset=2,
        data=b"\x00\xff",
        done=False,
    ),
    SnapshotChunkReply(term=3, sender="c", index=9, received=4),
    SnapshotChunkReply(term=3, sender="c", index=9, match_index=9),
]


def test_every_message_is_registered_once_with_a_raft_tag() -> None:
    assert {type(m) for m in SAMPLES} == set(RAFT_MESSAGES.values())
    assert all(tag.startswith("raft.") for tag in [*RAFT_MESSAGES, *RAFT_VALUES])
    assert len(set(RAFT_MESSAGES.values())) == len(RAFT_MESSAGES)


@pytest.mark.parametrize("cls", [*RAFT_MESSAGES.values(), *RAFT_VALUES.values()])
def test_messages_are_frozen_slotted_keyword_only(cls: type) -> None:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen and hasattr(cls, "__slots__")
    assert all(f.kw_only for f in dataclasses.fields(cls))
    if cls in RAFT_MESSAGES.values():
        assert {"term", "sender"} <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_the_mesh_codec(message: RaftMessage) -> None:
    codec = MessageCodec({**RAFT_MESSAGES, **RAFT_VALUES})
    decoded = codec.decode(codec.encode(message, id=1, sender=message.sender))
    assert decoded.message == message
