"""The simulated Raft driver: a real `RaftCore` plus the I/O the real driver must do.

Per step (a message or a tick), in the order the core's `Ready` contract demands:

1. persist the hard state, the truncation, the new entries and any snapshot to the SimDisk,
   then fsync;
2. only then send the messages;
3. apply the committed entries (and an installed snapshot) to the node's `KvState`, in order,
   and resolve the client proposals waiting on them.

`KvState` is the replicated state machine of the simulation: commands `key=value` with the
key doubling as the idempotency key, so a retried write applies once and a second log entry
for the same key is answered with the first result.

Broken variants for "test the tester" are subclasses that break one of these duties (see
`LazyFsyncDriver` and `ForgetVoteDriver`); the scenarios must catch them.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from tests.sim.disk import RaftDurable

if TYPE_CHECKING:
    from tests.sim.cluster import RaftSim
    from tests.sim.process import Process


@dataclass(slots=True)
class KvState:
    """The replicated key-value state; keys are idempotency keys (first write wins)."""

    values: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    applied_index: int = 0

    def apply(self, index: int, data: bytes) -> None:
        key, _, value = data.decode().partition("=")
        if key in self.values:
            self.duplicates += 1
        else:
            self.values[key] = value
        self.applied_index = index

    def snapshot_data(self) -> bytes:
        return "\n".join(f"{k}={v}" for k, v in self.values.items()).encode()

    @classmethod
    def restore(cls, data: bytes, index: int) -> KvState:
        state = cls(applied_index=index)
        for line in data.decode().splitlines():
            key, _, value = line.partition("=")
            state.values[key] = value
        return state


@dataclass(slots=True)
class Read:
    """A client read waiting for its read-index round and for the apply to reach it."""

    request_id: str
    key: str = ""
    index: int | None = None
    value: str | None = None
    served_at: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    outcome: str = "pending"  # "ok" | "fail"


@dataclass(slots=True)
class Proposal:
    """A client write waiting for its entry to be applied (or replaced by another term)."""

    index: int
    term: int
    done: trio.Event = field(default_factory=trio.Event)
    outcome: str = "pending"  # "ok" | "lost"


class RaftDriver:
    """Drives one RaftCore under the simulator (see the module docstring)."""

    def __init__(self, proc: Process, sim: RaftSim) -> None:
        self.proc = proc
        self.name = proc.name
        self.sim = sim
        now = proc.now()
        durable = RaftDurable.replay(proc.disk.durable())
        self.log: list[Any] = list(durable.entries)
        self.snapshot = durable.snapshot
        self.kv = (
            KvState.restore(durable.snapshot.data, durable.snapshot.index)
            if durable.snapshot is not None
            else KvState()
        )
        rng = random.Random(f"{sim.seed}:raft:{self.name}:{proc.incarnation}")
        self.core = sim.make_core(
            node_id=self.name,
            rng=rng,
            now=now,
            hard_state=durable.hard_state,
            entries=tuple(durable.entries),
            snapshot=durable.snapshot,
            applied=self.kv.applied_index,
        )
        self.proposals: dict[int, Proposal] = {}
        self.reads: dict[str, Read] = {}
        self._reads_started = 0
        self.steps = 0
        sim.observer.on_start(self)

    @property
    def next_deadline(self) -> float:
        return float(self.core.next_deadline)

    def on_message(self, src: str, message: object, now: float) -> None:
        before = self.sim.observer.before_step(self, message)
        self.handle(self.core.step(message, now))
        self.after_step(before)

    def on_tick(self, now: float) -> None:
        before = self.sim.observer.before_step(self, None)
        self.handle(self.core.tick(now))
        self.after_step(before)

    def after_step(self, before: Any) -> None:
        """Report the step to the observer, unless the process crashed in the middle of it
        (between write and fsync: what it held in memory died unsent and unsynced, and a
        restart from an older durable term is then legitimate, not a term going back)."""
        if self.proc.driver is self:
            self.sim.observer.after_step(self, before)

    def propose(self, data: bytes) -> Proposal:
        """Hand a write to the core; raises the core's NotLeader error on a follower."""
        return self._proposal(lambda now: self.core.propose(data, now))

    def change_config(self, change: str, node_id: str) -> Proposal:
        """Start a configuration change: `change` is "add_learner", "promote" or
        "remove_node"; raises the core's NotLeader or ConfigChange error when refused."""
        method = getattr(self.core, change)
        return self._proposal(lambda now: method(node_id, now))

    def _proposal(self, call: Callable[[float], tuple[int, int, Any]]) -> Proposal:
        before = self.sim.observer.before_step(self, None)
        index, term, ready = call(self.proc.now())
        proposal = self.proposals[index] = Proposal(index, term)
        self.handle(ready)
        self.after_step(before)
        return proposal

    def read(self, key: str) -> Read:
        """Start a linearizable read of `key` (read-index); raises NotLeader on a follower."""
        self._reads_started += 1
        read = Read(request_id=f"{self.name}:{self.proc.incarnation}:{self._reads_started}")
        read.key = key
        self.reads[read.request_id] = read
        before = self.sim.observer.before_step(self, None)
        try:
            self.handle(self.core.read_index(read.request_id, self.proc.now()))
        except BaseException:
            del self.reads[read.request_id]
            raise
        self.after_step(before)
        return read

    def answer_reads(self, ready: Any) -> None:
        """Step 4 of the Ready contract: serve each confirmed read once applied; fail the
        reads of a leadership that ended."""
        for state in ready.read_states:
            read = self.reads.get(state.request_id)
            if read is not None:
                read.index = state.index
        for request_id in ready.failed_reads:
            read = self.reads.pop(request_id, None)
            if read is not None:
                read.outcome = "fail"
                read.done.set()
        for request_id, read in list(self.reads.items()):
            if read.index is not None and read.index <= self.kv.applied_index:
                del self.reads[request_id]
                read.value = self.kv.values.get(read.key)
                read.served_at = self.kv.applied_index
                read.outcome = "ok"
                read.done.set()

    def handle(self, ready: Any) -> None:
        """Do what a Ready asks, in the contract's order."""
        self.steps += 1
        self.persist(ready)
        if self.sim.crash_during_persist.pop(self.name, False):
            # A crash between write and fsync: the disk keeps what it keeps, nothing is sent.
            self.proc.crash()
            return
        self.sync()
        for to, message in ready.messages:
            self.proc.net.send(self.name, str(to), message)
        self.apply(ready)
        if self.reads:
            self.answer_reads(ready)

    def persist(self, ready: Any) -> None:
        """Buffer the Ready's durable parts in the contract's order (fsync comes after)."""
        disk = self.proc.disk
        if ready.snapshot is not None:
            disk.write(("snapshot", ready.snapshot))
            self.snapshot = ready.snapshot
            self.log = [e for e in self.log if e.index > ready.snapshot.index]
        if ready.truncate_from is not None:
            disk.write(("truncate", ready.truncate_from))
            self.log = [e for e in self.log if e.index < ready.truncate_from]
        if ready.entries:
            disk.write(("entries", tuple(ready.entries)))
            self.log.extend(ready.entries)
            self.sim.observer.on_append(self, ready.entries)
        if ready.hard_state is not None:
            disk.write(("hard_state", self.durable_hard_state(ready.hard_state)))

    def durable_hard_state(self, hard_state: Any) -> Any:
        """What reaches the disk for a hard state (a broken variant may lose a field)."""
        return hard_state

    def sync(self) -> None:
        self.proc.disk.fsync()

    def apply(self, ready: Any) -> None:
        if ready.snapshot is not None and ready.snapshot.index > self.kv.applied_index:
            self.kv = KvState.restore(ready.snapshot.data, ready.snapshot.index)
            self.sim.observer.on_restore(self, ready.snapshot)
        for entry in ready.committed:
            if entry.index <= self.kv.applied_index:
                continue
            if entry.kind == "command":
                self.kv.apply(entry.index, entry.data)
            else:
                self.kv.applied_index = entry.index
            self.sim.observer.on_apply(self, entry)
            self.resolve(entry)
        if self.core.wants_snapshot:
            self.take_snapshot()

    def take_snapshot(self) -> None:
        """Snapshot the applied state, make it durable, then let the core drop its prefix."""
        snapshot = self.core.make_snapshot(self.kv.applied_index, self.kv.snapshot_data())
        disk = self.proc.disk
        disk.write(("snapshot", snapshot))
        disk.fsync()
        self.core.compact(snapshot)
        self.snapshot = snapshot
        self.log = [e for e in self.log if e.index > snapshot.index]
        # Rewrite the record log as its compacted equivalent, as a real store would.
        durable = RaftDurable.replay(disk.durable())
        records: list[tuple[str, Any]] = [("snapshot", durable.snapshot)]
        if durable.entries:
            records.append(("entries", tuple(durable.entries)))
        if durable.hard_state is not None:
            records.append(("hard_state", durable.hard_state))
        disk.compact(records)

    def resolve(self, entry: Any) -> None:
        proposal = self.proposals.pop(entry.index, None)
        if proposal is not None:
            proposal.outcome = "ok" if entry.term == proposal.term else "lost"
            proposal.done.set()

    def entry_at(self, index: int) -> Any:
        """The log entry at `index`, or None (absent or covered by the snapshot)."""
        if not self.log or index < self.log[0].index or index > self.log[-1].index:
            return None
        return self.log[index - self.log[0].index]


class LazyFsyncDriver(RaftDriver):
    """BROKEN on purpose: sends first and fsyncs later (at the start of its next step), so a
    crash in between loses writes that its messages already vouched for."""

    def handle(self, ready: Any) -> None:
        self.proc.disk.fsync()  # the previous step's writes, too late
        super().handle(ready)

    def sync(self) -> None:
        if self.steps == 1:
            super().sync()  # the bootstrap step, so the cluster exists at all


class ForgetVoteDriver(RaftDriver):
    """BROKEN on purpose: persists the term but not voted_for."""

    def durable_hard_state(self, hard_state: Any) -> Any:
        return dataclasses.replace(hard_state, voted_for=None)


DriverFactory = Callable[["Process", "RaftSim"], RaftDriver]


class StaleReadDriver(RaftDriver):
    """BROKEN on purpose: answers a read from its own applied state at once, on any node,
    with no read-index round (a follower, or a deposed leader, serves stale data)."""

    def read(self, key: str) -> Read:
        read = Read(request_id=f"{self.name}:stale", key=key, outcome="ok")
        read.value = self.kv.values.get(key)
        read.served_at = self.kv.applied_index
        read.done.set()
        return read
