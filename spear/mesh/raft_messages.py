"""Raft-lite messages between voters and learners, and their append-only wire tags.

Every message is a frozen, slotted, keyword-only dataclass with `term` (the sender's term,
which fences everything) and `sender` (its node id). Fields are only ints, strs, bools,
bytes, None, tuples, or the nested value dataclasses `Entry` and `Snapshot`, so a generic
CBOR codec can carry them (`RAFT_VALUES` names the nested ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from spear.mesh.raft_types import Entry, Snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class PreVote:
    """Would you vote for me at `term` (= my term + 1)? Changes nobody's term."""

    term: int
    sender: str
    last_log_index: int
    last_log_term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PreVoteReply:
    """`term` is the asked term when granted, else the replier's own term."""

    term: int
    sender: str
    granted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVote:
    """A candidate's vote request; `transfer` marks a leadership transfer (ignores stickiness)."""

    term: int
    sender: str
    last_log_index: int
    last_log_term: int
    transfer: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteReply:
    """The replier's term and whether it voted for the sender in that term."""

    term: int
    sender: str
    granted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries:
    """Entries after (prev_index, prev_term); a heartbeat has none.

    `read_context` > 0 asks the follower to echo it (a read-index leadership round).
    """

    term: int
    sender: str
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit_index: int
    read_context: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendReply:
    """The follower's answer to one AppendEntries.

    On success `match_index` is the last index known to match the leader. On rejection
    `reject_index` is the rejected prev_index and (`conflict_index`, `conflict_term`) is a
    hint: the follower's term at prev_index (0 if its log is shorter) and the first index it
    holds of that term (or its last index + 1).
    """

    term: int
    sender: str
    success: bool
    match_index: int = 0
    reject_index: int = 0
    conflict_index: int = 0
    conflict_term: int = 0
    read_context: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot:
    """A snapshot sent whole in one message: no longer sent (a leader sends `SnapshotChunk`s,
    which fit the mesh's frame cap), still accepted from a leader that does."""

    term: int
    sender: str
    snapshot: Snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshotReply:
    """`match_index`: the follower now holds everything up to this index."""

    term: int
    sender: str
    match_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotChunk:
    """One piece of the leader's snapshot (Raft paper section 7, InstallSnapshot in chunks).

    `data` holds the snapshot's bytes from `offset`; `done` marks the last piece. Every piece
    repeats the snapshot's identity (`index`, `snapshot_term`, the configuration, `size` and
    the sha256 `checksum` of the whole data), so a follower tells a piece of another
    snapshot, or of another leader's transfer, from the next piece of the one it assembles.
    """

    term: int
    sender: str
    index: int
    snapshot_term: int
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    size: int
    checksum: bytes
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotChunkReply:
    """The follower's answer to one SnapshotChunk of the snapshot at `index`.

    `match_index` > 0: the follower holds everything up to it (the snapshot is installed, or
    it already had those entries). Otherwise `received` is how many bytes of the snapshot it
    holds in order: the offset of the piece it wants next (0 = start again).
    """

    term: int
    sender: str
    index: int
    received: int = 0
    match_index: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutNow:
    """Leadership transfer: campaign at once, skipping pre-vote and stickiness."""

    term: int
    sender: str


RaftMessage = (
    PreVote
    | PreVoteReply
    | RequestVote
    | VoteReply
    | AppendEntries
    | AppendReply
    | InstallSnapshot
    | InstallSnapshotReply
    | TimeoutNow
    | SnapshotChunk
    | SnapshotChunkReply
)

#: Wire tag -> message class. Append-only: never rename or reuse a tag.
RAFT_MESSAGES: dict[str, type[RaftMessage]] = {
    "raft.pre_vote": PreVote,
    "raft.pre_vote_reply": PreVoteReply,
    "raft.vote": RequestVote,
    "raft.vote_reply": VoteReply,
    "raft.append": AppendEntries,
    "raft.append_reply": AppendReply,
    "raft.snapshot": InstallSnapshot,
    "raft.snapshot_reply": InstallSnapshotReply,
    "raft.timeout_now": TimeoutNow,
    "raft.snapshot_chunk": SnapshotChunk,
    "raft.snapshot_chunk_reply": SnapshotChunkReply,
}

#: Tag -> nested value class carried inside messages (AppendEntries.entries, the snapshot).
RAFT_VALUES: dict[str, type[Entry | Snapshot]] = {
    "raft.entry": Entry,
    "raft.snapshot_data": Snapshot,
}
