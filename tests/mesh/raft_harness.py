"""A pure in-memory Raft cluster for unit tests: no trio, no sockets.

Each node is a real `RaftCore` plus a dict "disk" and a list state machine, driven exactly as
the `Ready` contract says (persist, then send, then apply). Messages sit in one list until a
test delivers, drops or duplicates them; `advance` moves virtual time, ticking nodes whose
deadlines pass and (by default) delivering everything in between. Invariants (one leader per
term, log matching, leader completeness, state machine safety, monotone commit/apply) are
checked after every event by `check`.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from spear.mesh.raft import DEFAULT_MAX_PAYLOAD_BYTES, RaftCore
from spear.mesh.raft_messages import RaftMessage
from spear.mesh.raft_types import SIM, Entry, HardState, RaftTimings, ReadState, Ready, Snapshot

Envelope = tuple[str, str, RaftMessage]


@dataclass(slots=True)
class Disk:
    """What survives a crash: the durable state the Ready asked to persist."""

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None

    def persist(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self.snapshot = ready.snapshot
            self.entries = []
        if ready.truncate_from is not None:
            self.entries = [e for e in self.entries if e.index < ready.truncate_from]
        self.entries.extend(ready.entries)
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state


@dataclass(slots=True)
class Node:
    """A core and what its driver keeps: the state machine (applied entries by index)."""

    core: RaftCore
    disk: Disk
    applied: dict[int, Entry] = field(default_factory=dict)
    read_states: list[ReadState] = field(default_factory=list)
    failed_reads: list[str] = field(default_factory=list)


def snapshot_data(applied: dict[int, Entry], upto: int) -> bytes:
    doc = [[e.index, e.term, e.kind, e.data.hex()] for i, e in sorted(applied.items()) if i <= upto]
    return json.dumps(doc).encode()


def restore_data(data: bytes) -> dict[int, Entry]:
    return {
        index: Entry(index=index, term=term, kind=kind, data=bytes.fromhex(hexdata))
        for index, term, kind, hexdata in json.loads(data)
    }


class Cluster:
    """Nodes, a message pool and a clock. See the module docstring."""

    def __init__(
        self,
        ids: Iterable[str],
        *,
        timings: RaftTimings = SIM,
        seed: int = 0,
        bootstrap: bool = True,
        auto_compact: bool = False,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.timings = timings
        self.max_payload_bytes = max_payload_bytes
        self.seed = seed
        self.now = 0.0
        self.auto_compact = auto_compact
        self.nodes: dict[str, Node] = {}
        self.down: set[str] = set()
        self.disks: dict[str, Disk] = {}
        self.pool: list[Envelope] = []
        self.blocked: set[tuple[str, str]] = set()
        self.restarts = 0
        # Observer state for the invariants.
        self.leaders_by_term: dict[int, str] = {}
        self.committed: dict[int, Entry] = {}
        self.last_commit: dict[str, int] = {}
        self.last_applied: dict[str, int] = {}
        for node_id in ids:
            self.add_node(node_id)
        if bootstrap:
            voters = tuple(self.nodes)
            for node_id in voters:
                self.handle(node_id, self.nodes[node_id].core.bootstrap(voters, self.now))

    # --- nodes ------------------------------------------------------------------------------

    def add_node(self, node_id: str) -> Node:
        self.disks[node_id] = Disk()
        self.nodes[node_id] = self._boot(node_id)
        return self.nodes[node_id]

    def _boot(self, node_id: str) -> Node:
        disk = self.disks[node_id]
        rng = random.Random(f"{self.seed}:{node_id}:{self.restarts}")
        core = RaftCore(
            node_id=node_id,
            timings=self.timings,
            rng=rng,
            now=self.now,
            hard_state=disk.hard_state,
            entries=list(disk.entries),
            snapshot=disk.snapshot,
            applied=disk.snapshot.index if disk.snapshot else 0,
            max_payload_bytes=self.max_payload_bytes,
        )
        applied = restore_data(disk.snapshot.data) if disk.snapshot else {}
        return Node(core=core, disk=disk, applied=applied)

    def crash(self, node_id: str) -> None:
        """Lose the volatile state and the messages in flight to this node."""
        self.down.add(node_id)
        self.pool = [env for env in self.pool if env[1] != node_id]
        self.last_commit.pop(node_id, None)
        self.last_applied.pop(node_id, None)

    def restart(self, node_id: str) -> Node:
        self.restarts += 1
        self.down.discard(node_id)
        self.nodes[node_id] = self._boot(node_id)
        self.check()
        return self.nodes[node_id]

    def core(self, node_id: str) -> RaftCore:
        return self.nodes[node_id].core

    def up(self) -> list[str]:
        return [n for n in self.nodes if n not in self.down]

    def leader(self) -> str | None:
        """The up leader with the highest term, if any."""
        leaders = [n for n in self.up() if self.core(n).role == "leader"]
        return max(leaders, key=lambda n: self.core(n).term) if leaders else None

    # --- the driver -------------------------------------------------------------------------

    def handle(self, node_id: str, ready: Ready) -> None:
        """Do what a Ready says, in its order, then check the invariants."""
        node = self.nodes[node_id]
        node.disk.persist(ready)
        for to, message in ready.messages:
            self.pool.append((node_id, to, message))
        if ready.snapshot is not None:
            node.applied = restore_data(ready.snapshot.data)
        for entry in ready.committed:
            node.applied[entry.index] = entry
        node.read_states.extend(ready.read_states)
        node.failed_reads.extend(ready.failed_reads)
        if self.auto_compact and node.core.wants_snapshot:
            self.compact(node_id)
        self.check()

    def compact(self, node_id: str) -> Snapshot:
        node = self.nodes[node_id]
        index = node.core.applied_index
        snapshot = node.core.make_snapshot(index, snapshot_data(node.applied, index))
        node.disk.snapshot = snapshot
        node.disk.entries = [e for e in node.disk.entries if e.index > index]
        node.core.compact(snapshot)
        return snapshot

    def propose(self, node_id: str, data: bytes) -> tuple[int, int]:
        index, term, ready = self.core(node_id).propose(data, self.now)
        self.handle(node_id, ready)
        return index, term

    def tick(self, node_id: str) -> None:
        self.handle(node_id, self.core(node_id).tick(self.now))

    # --- the network ------------------------------------------------------------------------

    def deliver(self, position: int = 0) -> Envelope | None:
        """Deliver the message at `position` of the pool (dropped if its link is blocked)."""
        if not self.pool:
            return None
        env = self.pool.pop(position % len(self.pool))
        src, dst, message = env
        if dst in self.down or (src, dst) in self.blocked:
            return env
        self.handle(dst, self.core(dst).step(message, self.now))
        return env

    def deliver_all(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.pool:
                return
            self.deliver()
        raise AssertionError("messages kept flowing: a livelock")

    def deliver_where(self, keep: Callable[[Envelope], bool]) -> None:
        """Deliver every message `keep` accepts (repeatedly); drop the others."""
        while self.pool:
            env = self.pool.pop(0)
            if keep(env) and env[1] not in self.down and (env[0], env[1]) not in self.blocked:
                self.handle(env[1], self.core(env[1]).step(env[2], self.now))

    def isolate(self, node_id: str) -> None:
        for other in self.nodes:
            if other != node_id:
                self.blocked |= {(node_id, other), (other, node_id)}

    def partition(self, *groups: Iterable[str]) -> None:
        sets = [set(g) for g in groups]
        for a in sets:
            for b in sets:
                if a is not b:
                    self.blocked |= {(x, y) for x in a for y in b}

    def heal(self) -> None:
        self.blocked.clear()

    def advance(self, seconds: float, *, deliver: bool = True) -> None:
        """Move time forward, ticking due nodes in deadline order (delivering between)."""
        target = self.now + seconds
        while True:
            due = [(self.core(n).next_deadline, n) for n in self.up()]
            when, node_id = min(due) if due else (float("inf"), "")
            if when > target:
                break
            self.now = max(self.now, when)
            self.tick(node_id)
            if deliver:
                self.deliver_all()
        self.now = target

    def run_until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Advance in small steps until `condition()` holds; fail after `timeout` seconds."""
        deadline = self.now + timeout
        while not condition():
            if self.now >= deadline:
                raise AssertionError(f"condition not reached within {timeout} s")
            self.advance(self.timings.heartbeat_interval_s / 2)

    def elect(self, timeout: float = 30.0, *, other_than: str | None = None) -> str:
        """Run until an up leader (other than `other_than`) exists; return it."""
        self.run_until(lambda: self.leader() not in (None, other_than), timeout)
        leader = self.leader()
        assert leader is not None
        return leader

    # --- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the Raft safety properties over every up node."""
        up = [self.nodes[n] for n in self.up()]
        for node_id in self.up():
            core = self.core(node_id)
            if core.role == "leader":
                holder = self.leaders_by_term.setdefault(core.term, node_id)
                assert holder == node_id, f"two leaders in term {core.term}: {holder}, {node_id}"
                self._check_completeness(node_id)
            assert core.commit_index >= self.last_commit.get(node_id, 0), "commit went back"
            assert core.applied_index >= self.last_applied.get(node_id, 0), "apply went back"
            assert core.applied_index <= core.commit_index, "applied beyond the commit index"
            self.last_commit[node_id] = core.commit_index
            self.last_applied[node_id] = core.applied_index
        for node in up:
            for index, entry in node.applied.items():
                first = self.committed.setdefault(index, entry)
                assert first == entry, f"index {index} applied as {first} and as {entry}"
        self._check_log_matching([n.core for n in up])

    def _check_completeness(self, leader: str) -> None:
        core = self.core(leader)
        log = core._log
        for index, entry in self.committed.items():
            if index <= log.snapshot_index:
                continue
            assert log.term_at(index) == entry.term, (
                f"leader {leader} of term {core.term} lacks committed entry {index}"
            )

    @staticmethod
    def _check_log_matching(cores: list[RaftCore]) -> None:
        """Two logs holding an entry of the same index and term agree up to it."""
        for a, b in itertools.combinations([c._log for c in cores], 2):
            lo = max(a.first_index, b.first_index)
            agree = False
            for index in range(min(a.last_index, b.last_index), lo - 1, -1):
                same = a.entry(index) == b.entry(index)
                if agree:
                    assert same, f"logs agree at a later index but differ at {index}"
                elif a.term_at(index) == b.term_at(index):
                    assert same, f"entries of the same term differ at {index}"
                    agree = True
