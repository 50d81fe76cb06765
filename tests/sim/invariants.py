"""The observer: global Raft invariants checked after every step of every node.

Numbering follows mesh.md §C:

- I1 election safety: at most one leader per term (over the whole run, restarts included);
  and what it rests on, checked on its own: a node grants at most one vote per term, across
  its restarts (a vote it forgot shows up as a second vote long before two leaders do);
- I2 log matching: two entries with the same (index, term) anywhere carry the same data and
  follow an entry of the same term, so by induction their whole prefixes are equal; checked
  incrementally on every append, never by comparing all pairs of logs;
- I3 state machine safety: every node applies the same entry at each index;
- I4 per process lifetime, the commit index and the applied index never go back; the term
  never goes back on a node even across restarts (it was fsynced before it mattered);
- I5 every acknowledged write is in the log (or snapshot) of every leader elected after the
  ack, and in the final state of every node;
- I7 fencing: an AppendEntries from a term older than the receiver's changes neither its log
  nor its commit index.

A violation raises `InvariantViolation` at once, naming the node, the virtual time and the
values, so the failing seed's replay stops at the first bad step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from tests.sim.raft_node import RaftDriver


class InvariantViolation(AssertionError):
    """A safety invariant of the cluster does not hold."""


class LivenessViolation(InvariantViolation):
    """The cluster did not make progress within a bound once faults were healed."""


@dataclass(frozen=True, slots=True)
class Ack:
    """A write acknowledged to a client: the entry it was acked at."""

    index: int
    term: int
    key: str
    value: str
    at: float


@dataclass(frozen=True, slots=True)
class _Before:
    term: int
    commit: int
    log_len: int
    last: tuple[int, int]
    stale_append: bool


@dataclass(slots=True)
class RaftObserver:
    """Checks I1-I7 (see the module docstring) as the drivers report their steps."""

    leaders: dict[int, str] = field(default_factory=dict)
    votes: dict[tuple[str, int], str] = field(default_factory=dict)
    entries: dict[tuple[int, int], tuple[bytes, str, int]] = field(default_factory=dict)
    applied: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    max_term: dict[str, int] = field(default_factory=dict)
    commit: dict[str, int] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    leader_changes: list[tuple[float, int, str]] = field(default_factory=list)
    steps: int = 0
    append_message_types: tuple[type, ...] = ()
    _changed: trio.Event | None = None

    async def wait_step(self) -> None:
        """Return after the next step of any node (a condition may have changed)."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    def fail(self, node: RaftDriver, rule: str, detail: str) -> None:
        raise InvariantViolation(
            f"{rule} broken on {node.name} at t={trio.current_time():.4f}: {detail}"
        )

    def on_start(self, node: RaftDriver) -> None:
        self.commit[node.name] = 0
        self.check_term(node)
        for entry in node.log:
            self.check_entry(node, entry)

    def before_step(self, node: RaftDriver, message: object) -> _Before:
        core = node.core
        stale = (
            isinstance(message, self.append_message_types)
            and getattr(message, "term", 0) < core.term
        )
        last = (node.log[-1].index, node.log[-1].term) if node.log else (0, 0)
        return _Before(core.term, core.commit_index, len(node.log), last, stale)

    def after_step(self, node: RaftDriver, before: _Before) -> None:
        self.steps += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        core = node.core
        self.check_term(node)
        if core.commit_index < before.commit:
            self.fail(node, "I4", f"commit index went back {before.commit} -> {core.commit_index}")
        self.commit[node.name] = core.commit_index
        if before.stale_append:
            last = (node.log[-1].index, node.log[-1].term) if node.log else (0, 0)
            if (len(node.log), last) != (before.log_len, before.last) or (
                core.commit_index != before.commit
            ):
                self.fail(node, "I7", f"accepted an append from a term below {before.term}")
        if core.role == "leader":
            self.check_leader(node)

    def check_term(self, node: RaftDriver) -> None:
        hard = node.core.hard_state
        term = hard.term
        seen = self.max_term.get(node.name, 0)
        if term < seen:
            self.fail(node, "I4", f"term went back {seen} -> {term} (lost a durable term?)")
        self.max_term[node.name] = term
        if hard.voted_for is not None:
            voted = self.votes.setdefault((node.name, term), hard.voted_for)
            if voted != hard.voted_for:
                self.fail(node, "I1", f"voted twice in term {term}: {voted} and {hard.voted_for}")

    def check_leader(self, node: RaftDriver) -> None:
        term = node.core.term
        holder = self.leaders.get(term)
        if holder is None:
            self.leaders[term] = node.name
            self.leader_changes.append((trio.current_time(), term, node.name))
            self.check_acks_in_log(node)
        elif holder != node.name:
            self.fail(node, "I1", f"two leaders in term {term}: {holder} and {node.name}")

    def check_acks_in_log(self, leader: RaftDriver, acks: list[Ack] | None = None) -> None:
        """Every ack in `acks` (default: all so far) is in `leader`'s log or snapshot."""
        snap_index = leader.snapshot.index if leader.snapshot is not None else 0
        for ack in self.acks if acks is None else acks:
            if ack.index <= snap_index:
                continue
            entry = leader.entry_at(ack.index)
            if entry is None or entry.term != ack.term:
                self.fail(
                    leader,
                    "I5",
                    f"leader of term {leader.core.term} lacks acked write {ack.key} "
                    f"at index {ack.index} term {ack.term} (has {entry!r})",
                )

    def on_append(self, node: RaftDriver, new_entries: Any) -> None:
        for entry in new_entries:
            self.check_entry(node, entry)

    def check_entry(self, node: RaftDriver, entry: Any) -> None:
        prev = node.entry_at(entry.index - 1)
        if prev is not None:
            prev_term = prev.term
        elif node.snapshot is not None and node.snapshot.index == entry.index - 1:
            prev_term = node.snapshot.term
        else:
            prev_term = -1  # unknown here (first entry after a gap): only data is compared
        key = (entry.index, entry.term)
        mine = (bytes(entry.data), str(entry.kind), prev_term)
        seen = self.entries.get(key)
        if seen is None:
            self.entries[key] = mine
            return
        same_prev = -1 in (seen[2], prev_term) or seen[2] == prev_term
        if seen[:2] != mine[:2] or not same_prev:
            self.fail(node, "I2", f"entry {key} differs from another node's: {seen} vs {mine}")
        if seen[2] == -1 and prev_term != -1:
            self.entries[key] = mine

    def on_apply(self, node: RaftDriver, entry: Any) -> None:
        mine = (entry.term, bytes(entry.data))
        seen = self.applied.setdefault(entry.index, mine)
        if seen != mine:
            self.fail(node, "I3", f"applied {mine} at index {entry.index}, others {seen}")

    def on_restore(self, node: RaftDriver, snapshot: Any) -> None:
        """A snapshot replaces applied state; its contents were checked where it was taken."""

    def record_ack(self, ack: Ack, leaders: list[RaftDriver]) -> None:
        """Remember an ack; leaders already elected in a later term must hold it too."""
        self.acks.append(ack)
        for leader in leaders:
            if leader.core.term > ack.term:
                self.check_acks_in_log(leader, [ack])

    def check_final_state(self, nodes: list[RaftDriver]) -> None:
        """I5 at the end: every acked write is in every live node's applied state."""
        for node in nodes:
            for ack in self.acks:
                value = node.kv.values.get(ack.key)
                if value != ack.value:
                    self.fail(node, "I5", f"acked write {ack.key}={ack.value} missing ({value!r})")
