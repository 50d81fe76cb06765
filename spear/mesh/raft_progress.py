"""A Raft leader's bookkeeping: replication progress per follower and pending read-index
rounds. Pure data with small rules; the core decides when to use them."""

from __future__ import annotations

from dataclasses import dataclass, field

from spear.mesh.raft_types import ReadState, Snapshot


@dataclass(slots=True, kw_only=True)
class Progress:
    """What the leader knows of one follower or learner.

    No pipelining: at most one AppendEntries with entries (or one snapshot chunk) is in
    flight per follower, until its reply or `inflight_until`; heartbeats still go out.

    A snapshot transfer keeps the snapshot it started with (`snapshot`, its `snapshot_sum`)
    until the follower holds it, even if the leader compacts again meanwhile; it restarts
    with the leader's newest snapshot whenever it restarts from offset 0.
    """

    match_index: int = 0
    next_index: int = 1
    inflight_until: float = 0.0
    last_contact: float = 0.0
    snapshot: Snapshot | None = None
    snapshot_sum: bytes = b""
    snapshot_offset: int = 0

    def in_flight(self, now: float) -> bool:
        return now < self.inflight_until

    def on_success(self, match_index: int) -> bool:
        """Record a successful append up to `match_index`; True if it moved forward."""
        if match_index <= self.match_index:
            return False  # a heartbeat's or a duplicate's answer: the in-flight append waits
        self.inflight_until = 0.0
        self.match_index = match_index
        self.next_index = max(self.next_index, match_index + 1)
        if self.snapshot is not None and match_index >= self.snapshot.index:
            self.end_snapshot()
        return True

    def end_snapshot(self) -> None:
        """Forget the snapshot transfer (done, or to restart with a newer snapshot)."""
        self.snapshot, self.snapshot_sum, self.snapshot_offset = None, b"", 0

    def on_reject(self, next_index: int) -> None:
        """Back off to `next_index`, never below what is known to match."""
        self.inflight_until = 0.0
        self.next_index = max(self.match_index + 1, min(self.next_index - 1, next_index), 1)


@dataclass(slots=True, kw_only=True)
class _PendingRead:
    request_id: str
    index: int
    context: int
    acks: set[str] = field(default_factory=set)


class ReadTracker:
    """Read-index rounds (Raft thesis §6.4): a read waits for a quorum of voters to answer a
    heartbeat sent after the read arrived; then it may be served at the recorded index.

    An answer to a later round also confirms every earlier round.
    """

    def __init__(self) -> None:
        self._pending: list[_PendingRead] = []
        self._last_context = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def last_context(self) -> int:
        """The context of the latest round (0 before the first)."""
        return self._last_context

    def start(self, request_id: str, index: int, self_id: str) -> int:
        """Record a read at `index`; return the round's context for the heartbeat."""
        self._last_context += 1
        read = _PendingRead(request_id=request_id, index=index, context=self._last_context)
        read.acks.add(self_id)
        self._pending.append(read)
        return self._last_context

    def confirm(self, sender: str, context: int, voters: tuple[str, ...]) -> list[ReadState]:
        """Count `sender`'s answer to round `context`; return the reads now confirmed."""
        if sender not in voters:
            return []
        for read in self._pending:
            if read.context <= context:
                read.acks.add(sender)
        return self.release(voters)

    def release(self, voters: tuple[str, ...]) -> list[ReadState]:
        """Pop the leading reads acknowledged by a quorum of `voters`, in order."""
        quorum = len(voters) // 2 + 1
        done: list[ReadState] = []
        while self._pending and len(self._pending[0].acks & set(voters)) >= quorum:
            read = self._pending.pop(0)
            done.append(ReadState(request_id=read.request_id, index=read.index))
        return done

    def fail_all(self) -> list[str]:
        """Drop every pending read (the leader stepped down); return their request ids."""
        failed = [read.request_id for read in self._pending]
        self._pending.clear()
        return failed
