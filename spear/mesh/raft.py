"""Raft-lite: a sans-I/O Raft core in the style of etcd-io/raft (step / tick / Ready).

The core never does I/O and never reads a clock: the driver passes `now` (seconds, any
monotonic origin) and a seeded `random.Random`, and carries out the returned `Ready`.

API (stable; re-exported from spear.mesh):

    core = RaftCore(node_id=..., timings=LAN, rng=random.Random(seed), now=now,
                    hard_state=HardState(...) | None, entries=(...), snapshot=None, applied=0)
    core.bootstrap(voters, now) -> Ready            # empty state only; config entry at index 1
    core.tick(now) -> Ready                          # call when now >= core.next_deadline
    core.step(message, now) -> Ready                 # a RaftMessage arrived from message.sender
    core.propose(data, now) -> (index, term, Ready)  # NotLeaderError(leader_id) if not leader
    core.read_index(request_id, now) -> Ready        # ReadState(request_id, index) comes later
    core.add_learner(node_id, now) / promote(node_id, now) / demote(node_id, now)
        / remove_node(node_id, now) -> (index, term, Ready)   # one config change at a time
    core.transfer_leadership(target, now) -> Ready   # TimeoutNow once the target caught up
    core.make_snapshot(index, data) -> Snapshot; core.compact(snapshot) -> None
    core.next_deadline, role, term, leader_id, commit_index, applied_index, last_index,
    voters, learners, membership, hard_state, wants_snapshot; core.status() -> dict
    choose_bootstrap_voters(candidates, expect) -> tuple[node_id, ...] | None

Driver contract (the order in `Ready`'s docstring): fsync the snapshot, truncation, entries
and hard state BEFORE sending the messages; then apply the snapshot and `committed` entries
in order; then answer reads. A proposal at (index, term) succeeded once an entry with that
index *and term* is committed; if another term's entry is committed at that index, the
proposal was lost and the client must be told so (it may retry with its idempotency key).

Rules kept (research/mesh.md §A 12-25): term/vote/log persisted before answering;
election timeouts drawn per election from [min, max); pre-vote; leader stickiness (a node
that heard from a leader within election_timeout_min rejects (pre-)votes, except for a
transfer); check-quorum (a leader without contact from a quorum of voters within
election_timeout_min steps down and fails its pending reads); the up-to-date-log vote rule;
a no-op on election; commit only by counting a current-term entry; commit and applied never
go back; a (pre-)vote request is always answered with the replier's term; learners and
non-members never campaign; a message from a stale term is rejected and the reply tells the
sender the newer term; conflicting follower suffixes are truncated (with a conflict hint).

Configuration: a node uses the latest "config" entry in its log, committed or not (Raft
thesis §4.1, single-server changes). A leader starts a change only when no config entry is
uncommitted and it has committed an entry of its own term. A change of the voters is refused
if it would leave no voter, or fewer voters that answered the leader within
election_timeout_min than the new configuration's quorum. A leader removed from the voters
keeps leading without counting itself until the change commits, then steps down.

Snapshots travel in pieces of at most `max_payload_bytes` (spear.mesh.raft_snapshots), and
AppendEntries carry at most that much entry data, so no message outgrows the frame cap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from spear.mesh.raft_config import BootstrapCandidate, Membership, choose_bootstrap_voters
from spear.mesh.raft_election import Elections
from spear.mesh.raft_log import RaftLog
from spear.mesh.raft_messages import (
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
from spear.mesh.raft_replication import Replication
from spear.mesh.raft_types import (
    BootstrapError,
    ConfigChangeError,
    Entry,
    HardState,
    NotLeaderError,
    RaftStateError,
    RaftTimings,
    Ready,
    Role,
    Snapshot,
    SoftState,
)

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "BootstrapCandidate", "RaftCore", "choose_bootstrap_voters"]

#: entry data per AppendEntries and bytes per snapshot piece unless the driver says otherwise
#: (well under the mesh's default 16 MiB frame cap)
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


class RaftCore(Elections):
    """One node's Raft state machine. See the module docstring for the API and rules.

    Args:
        node_id: this node's permanent id.
        timings: the timer profile (LAN, LAN_FAST, LOOPBACK, SIM or a custom one).
        rng: the only source of randomness (election timeouts).
        now: the current time, to arm the first election timer.
        hard_state: the durable term and vote (None = brand-new node).
        entries: the durable log entries after the snapshot, in order.
        snapshot: the durable snapshot, if any.
        applied: the index the driver's state machine already reflects (at least the
            snapshot's); entries up to it are not handed out again.
        max_payload_bytes: the most entry data one AppendEntries carries (one larger entry
            still goes alone) and the size of each snapshot piece; the driver derives it
            from its transport's frame cap.

    Raises:
        RaftStateError: the durable state is inconsistent.
        ValueError: max_payload_bytes < 1.
    """

    def __init__(
        self,
        *,
        node_id: str,
        timings: RaftTimings,
        rng: random.Random,
        now: float,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
        applied: int = 0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes must be >= 1, got {max_payload_bytes}")
        hard = hard_state or HardState()
        log = RaftLog(snapshot, entries)
        if log.last_term > hard.term:
            raise RaftStateError(
                f"raft log term {log.last_term} is above the stored term {hard.term};"
                " the raft hard state in the store is stale"
            )
        super().__init__(
            node_id=node_id,
            timings=timings,
            log=log,
            term=hard.term,
            max_payload_bytes=max_payload_bytes,
        )
        self._rng = rng
        self._voted_for = hard.voted_for
        self._commit = max(log.snapshot_index, min(applied, log.last_index))
        self._applied = self._commit
        self._membership = self._membership_from_log()
        self._votes: set[str] = set()
        self._election_deadline = math.inf
        self._reset_election_timer(now)
        if self._membership.voters == (node_id,):
            # The only voter of its cluster restarts: nobody else can lead, so waiting out an
            # election timeout would only delay the API. Campaign at the first tick.
            self._election_deadline = now
        self._emitted_hard = HardState(term=self._term, voted_for=self._voted_for)
        self._emitted_soft = SoftState(role=self.role, term=self._term, leader_id=None)

    # --- properties -----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        if self._state == "follower" and self.node_id in self._membership.learners:
            return "learner"
        return self._state

    @property
    def term(self) -> int:
        return self._term

    @property
    def leader_id(self) -> str | None:
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def membership(self) -> Membership:
        return self._membership

    @property
    def voters(self) -> tuple[str, ...]:
        return self._membership.voters

    @property
    def learners(self) -> tuple[str, ...]:
        return self._membership.learners

    @property
    def timings(self) -> RaftTimings:
        return self._t

    @property
    def hard_state(self) -> HardState:
        return HardState(term=self._term, voted_for=self._voted_for)

    @property
    def wants_snapshot(self) -> bool:
        """Whether applied entries past the snapshot reached the snapshot threshold."""
        return self._applied - self._log.snapshot_index >= self._t.snapshot_threshold_entries

    @property
    def next_deadline(self) -> float:
        """When `tick` must next be called (math.inf: only a message can wake this node)."""
        if self._state == "leader":
            return self._leader_deadline()
        return self._election_deadline

    def learner_behind(self, node_id: str) -> bool:
        """Whether this node leads and `node_id` is a learner that has not yet matched the
        commit index (promote would refuse it for now)."""
        if self._state != "leader" or node_id not in self._membership.learners:
            return False
        pr = self._progress.get(node_id)
        return pr is not None and pr.match_index < self._commit

    def holds_quorum_contact(self, now: float) -> bool:
        """Whether this node leads and heard from a quorum of voters within the check-quorum
        window: false in the moment after a long pause, before a tick lets it step down."""
        if self._state != "leader":
            return False
        return now < self._quorum_contact() + self._t.election_timeout_min_s

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for /api/v1/cluster and debugging."""
        doc: dict[str, Any] = {
            "node_id": self.node_id,
            "role": self.role,
            "term": self._term,
            "voted_for": self._voted_for,
            "leader_id": self._leader_id,
            "commit_index": self._commit,
            "applied_index": self._applied,
            "last_index": self._log.last_index,
            "last_term": self._log.last_term,
            "snapshot_index": self._log.snapshot_index,
            "snapshot_bytes": len(self._log.snapshot.data) if self._log.snapshot else 0,
            "voters": list(self.voters),
            "learners": list(self.learners),
        }
        if self._state == "leader":
            doc["progress"] = {
                peer: {"match_index": pr.match_index, "next_index": pr.next_index}
                for peer, pr in sorted(self._progress.items())
            }
        return doc

    # --- driver entry points ----------------------------------------------------------------

    def bootstrap(self, voters: Sequence[str], now: float) -> Ready:
        """Write the initial configuration at index 1 (term 1) on a brand-new node.

        Every initial voter calls this with the same voters, so all write the same entry. A
        lone voter elects itself at once and commits.

        Raises:
            BootstrapError: this node has Raft state already, or is not among `voters`.
        """
        if self._term != 0 or self._log.last_index != 0:
            raise BootstrapError(
                f"node {self.node_id} already has raft state (term {self._term}, last index"
                f" {self._log.last_index}); bootstrap only a brand-new data dir"
            )
        unique = tuple(sorted(set(voters)))
        if self.node_id not in unique:
            raise BootstrapError(
                f"node {self.node_id} is not among the bootstrap voters {list(unique)};"
                " only the chosen voters bootstrap"
            )
        self._term = 1
        self._append_local("config", Membership(voters=unique).encode(), now)
        self._reset_election_timer(now)
        if unique == (self.node_id,):
            self._become_candidate(now, transfer=False)
        return self._flush()

    def tick(self, now: float) -> Ready:
        """Run the timers due at `now` (elections, heartbeats, check-quorum, transfers)."""
        if self._state == "leader":
            self._tick_leader(now)
        elif now >= self._election_deadline:
            self._on_election_timeout(now)
        return self._flush()

    def step(self, message: RaftMessage, now: float) -> Ready:
        """Handle one message from `message.sender`."""
        if message.term > self._term and self._adopts_term(message, now):
            leader = (
                message.sender
                if isinstance(message, AppendEntries | InstallSnapshot | SnapshotChunk)
                else None
            )
            self._become_follower(message.term, leader, now)
        elif message.term < self._term:
            self._answer_stale(message)
            return self._flush()
        self._HANDLERS[type(message)](self, message, now)
        return self._flush()

    def propose(self, data: bytes, now: float) -> tuple[int, int, Ready]:
        """Append a command; it is done once an entry at (index, term) is committed.

        Raises:
            NotLeaderError: this node is not the leader (or is handing leadership over).
        """
        self._require_leader()
        entry = self._append_local("command", data, now)
        self._after_append(now)
        return entry.index, entry.term, self._flush()

    def read_index(self, request_id: str, now: float) -> Ready:
        """Start a linearizable read; a later Ready carries ReadState(request_id, index), or
        lists request_id in `failed_reads` if this node stops leading first.

        Raises:
            NotLeaderError: this node is not the leader.
        """
        self._require_leader()
        if self._log.term_at(self._commit) != self._term:
            self._waiting_reads.append(request_id)  # until the no-op of this term commits
        else:
            self._start_read(request_id, now)
        return self._flush()

    def add_learner(self, node_id: str, now: float) -> tuple[int, int, Ready]:
        """Add a non-voting member that receives the log."""
        self._require_leader()
        if node_id in self._membership.members:
            raise ConfigChangeError(f"node {node_id} is already a member; nothing to add")
        return self._change_config(self._membership.with_learner(node_id), now)

    def promote(self, node_id: str, now: float) -> tuple[int, int, Ready]:
        """Make a caught-up learner (match index >= commit index) a voter."""
        self._require_leader()
        if node_id in self._membership.voters:
            raise ConfigChangeError(f"node {node_id} is not a learner: it is a voter already")
        if node_id not in self._membership.learners:
            raise ConfigChangeError(
                f"node {node_id} is not a learner (not in the raft configuration); add it as"
                " one first"
            )
        match = self._progress[node_id].match_index
        if match < self._commit:
            raise ConfigChangeError(
                f"learner {node_id} has matched index {match}, behind the commit index"
                f" {self._commit}; promote it once it caught up"
            )
        return self._change_voters(self._membership.with_voter(node_id), node_id, now)

    def demote(self, node_id: str, now: float) -> tuple[int, int, Ready]:
        """Make a voter a learner: it keeps receiving the log but no longer votes or counts
        (the leader itself included: it steps down once the change commits)."""
        self._require_leader()
        if node_id not in self._membership.voters:
            raise ConfigChangeError(f"node {node_id} is not a voter; nothing to demote")
        return self._change_voters(self._membership.with_demoted(node_id), node_id, now)

    def remove_node(self, node_id: str, now: float) -> tuple[int, int, Ready]:
        """Remove a voter or learner (the leader itself included: it steps down on commit)."""
        self._require_leader()
        if node_id not in self._membership.members:
            raise ConfigChangeError(f"node {node_id} is not a member; nothing to remove")
        return self._change_voters(self._membership.without(node_id), node_id, now)

    def transfer_leadership(self, target: str, now: float) -> Ready:
        """Hand leadership to voter `target`: catch it up, then send TimeoutNow. Proposals
        are refused meanwhile; the attempt ends after election_timeout_min."""
        self._require_leader()
        if target == self.node_id or target not in self._membership.voters:
            raise ConfigChangeError(f"cannot transfer leadership to {target}: not another voter")
        self._transfer = (target, now + self._t.election_timeout_min_s)
        self._continue_transfer(now)
        return self._flush()

    def make_snapshot(self, index: int, data: bytes) -> Snapshot:
        """Describe the driver's state machine at applied `index` as a Snapshot to store."""
        if not self._log.snapshot_index <= index <= self._applied:
            raise ValueError(
                f"snapshot index {index} must lie between the current snapshot"
                f" {self._log.snapshot_index} and the applied index {self._applied}"
            )
        term = self._log.term_at(index)
        assert term is not None
        config = self._log.last_config_entry(upto=index)
        m = Membership.decode(config.data) if config is not None else self._snapshot_membership()
        return Snapshot(index=index, term=term, voters=m.voters, learners=m.learners, data=data)

    def compact(self, snapshot: Snapshot) -> None:
        """The driver stored `snapshot` (from make_snapshot); drop the log entries it covers."""
        if snapshot.index > self._applied or not self._log.matches(snapshot.index, snapshot.term):
            raise ValueError(f"snapshot at {snapshot.index} is not of this node's applied log")
        self._log.compact(snapshot)

    # --- configuration ----------------------------------------------------------------------

    def _snapshot_membership(self) -> Membership:
        snap = self._log.snapshot
        if snap is None:
            return Membership()
        return Membership(voters=snap.voters, learners=snap.learners)

    def _membership_from_log(self) -> Membership:
        entry = self._log.last_config_entry()
        return Membership.decode(entry.data) if entry is not None else self._snapshot_membership()

    def _change_voters(self, new: Membership, node_id: str, now: float) -> tuple[int, int, Ready]:
        """A change of the voters, refused when the new voters could not commit: none left,
        or fewer than their quorum answered this leader lately (etcd's strict
        reconfiguration check: a change must not cost the cluster its quorum)."""
        if not new.voters:
            raise ConfigChangeError(
                f"changing {node_id} would leave no voter; promote another node first"
            )
        window = self._t.election_timeout_min_s
        active = [voter for voter in new.voters if self._answered_within(voter, window, now)]
        if len(active) < new.quorum:
            raise ConfigChangeError(
                f"changing {node_id} would leave {len(new.voters)} voter(s) of which"
                f" {len(active)} answered within the last {window:g} s, fewer than their"
                f" quorum of {new.quorum}; bring the missing voters back, or remove them first"
            )
        return self._change_config(new, now)

    def _answered_within(self, node_id: str, window_s: float, now: float) -> bool:
        if node_id == self.node_id:
            return True
        pr = self._progress.get(node_id)
        return pr is not None and now - pr.last_contact < window_s

    def _change_config(self, new: Membership, now: float) -> tuple[int, int, Ready]:
        self._require_leader()
        if self._log.term_at(self._commit) != self._term:
            raise ConfigChangeError(
                f"leader of term {self._term} has not committed an entry of its term yet;"
                " retry the config change shortly"
            )
        pending = self._log.last_config_entry()
        if pending is not None and pending.index > self._commit:
            raise ConfigChangeError(
                f"config entry {pending.index} is not committed yet; one change at a time"
            )
        entry = self._append_local("config", new.encode(), now)
        self._after_append(now)
        return entry.index, entry.term, self._flush()

    def _require_leader(self) -> None:
        if self._state != "leader" or self._transfer is not None:
            leader = None if self._state == "leader" else self._leader_id
            raise NotLeaderError(
                f"node {self.node_id} is not the leader of term {self._term}"
                f" (leader: {leader or 'unknown'}); send the request to the leader",
                leader_id=leader,
            )

    _HANDLERS: dict[type[Any], Callable[[Any, Any, float], None]] = {
        PreVote: Elections._handle_pre_vote,
        PreVoteReply: Elections._handle_pre_vote_reply,
        RequestVote: Elections._handle_request_vote,
        VoteReply: Elections._handle_vote_reply,
        AppendEntries: Replication._handle_append_entries,
        AppendReply: Replication._handle_append_reply,
        InstallSnapshot: Replication._handle_install_snapshot,
        InstallSnapshotReply: Replication._handle_install_snapshot_reply,
        TimeoutNow: Elections._handle_timeout_now,
        SnapshotChunk: Replication._handle_snapshot_chunk,
        SnapshotChunkReply: Replication._handle_snapshot_chunk_reply,
    }
