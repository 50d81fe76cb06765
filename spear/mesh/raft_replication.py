"""The log-replication half of the Raft core: leading (appends, commit, heartbeats,
check-quorum, read-index, transfer), following (accepting appends and snapshots), and the
assembly of each call's Ready.

`Replication` is the base class of `spear.mesh.raft.RaftCore`, which adds elections and the
public API; it is not used alone.
"""

from __future__ import annotations

import math
from typing import Literal

from spear.mesh.raft_config import Membership, quorum_index
from spear.mesh.raft_log import RaftLog
from spear.mesh.raft_messages import (
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    InstallSnapshotReply,
    RaftMessage,
    SnapshotChunk,
    SnapshotChunkReply,
    TimeoutNow,
)
from spear.mesh.raft_progress import Progress, ReadTracker
from spear.mesh.raft_snapshots import SnapshotAssembly, snapshot_checksum, snapshot_chunk
from spear.mesh.raft_types import (
    Entry,
    HardState,
    RaftStateError,
    RaftTimings,
    ReadState,
    Ready,
    Snapshot,
    SoftState,
)

State = Literal["follower", "pre-candidate", "candidate", "leader"]


class Replication:
    """Shared state plus log replication; see RaftCore for the contract."""

    _membership: Membership
    _commit: int
    _applied: int
    _voted_for: str | None
    _emitted_hard: HardState

    def __init__(
        self,
        *,
        node_id: str,
        timings: RaftTimings,
        log: RaftLog,
        term: int,
        max_payload_bytes: int,
    ) -> None:
        self.node_id = node_id
        self._t = timings
        self._max_payload = max_payload_bytes
        self._incoming: SnapshotAssembly | None = None
        self._log = log
        self._term = term
        self._state: State = "follower"
        self._leader_id: str | None = None
        self._leader_contact = -math.inf
        self._progress: dict[str, Progress] = {}
        self._reads = ReadTracker()
        self._waiting_reads: list[str] = []
        self._transfer: tuple[str, float] | None = None
        self._heartbeat_due = math.inf
        self._leader_since = 0.0
        # What the current call produced, turned into a Ready by _flush.
        self._persisted_last = log.last_index
        self._out_messages: list[tuple[str, RaftMessage]] = []
        self._out_truncate: int | None = None
        self._out_snapshot: Snapshot | None = None
        self._out_reads: list[ReadState] = []
        self._out_failed: list[str] = []
        self._emitted_soft: SoftState | None = None

    # Implemented by RaftCore.
    def _reset_election_timer(self, now: float) -> None:
        raise NotImplementedError

    def _become_follower(self, term: int, leader: str | None, now: float) -> None:
        raise NotImplementedError

    def _membership_from_log(self) -> Membership:
        raise NotImplementedError

    # --- Ready assembly ---------------------------------------------------------------------

    def _send(self, to: str, message: RaftMessage) -> None:
        self._out_messages.append((to, message))

    def _flush(self) -> Ready:
        hard = HardState(term=self._term, voted_for=self._voted_for)
        new_hard = hard if hard != self._emitted_hard else None
        self._emitted_hard = hard
        entries = tuple(self._log.slice(self._persisted_last + 1, self._log.last_index + 1))
        self._persisted_last = self._log.last_index
        committed: tuple[Entry, ...] = ()
        if self._commit > self._applied:
            committed = tuple(self._log.slice(self._applied + 1, self._commit + 1))
            self._applied = self._commit
        soft = SoftState(role=self.role, term=self._term, leader_id=self._leader_id)
        new_soft = soft if soft != self._emitted_soft else None
        self._emitted_soft = soft
        ready = Ready(
            hard_state=new_hard,
            snapshot=self._out_snapshot,
            truncate_from=self._out_truncate,
            entries=entries,
            messages=tuple(self._out_messages),
            committed=committed,
            read_states=tuple(self._out_reads),
            failed_reads=tuple(self._out_failed),
            soft_state=new_soft,
        )
        self._out_messages, self._out_reads, self._out_failed = [], [], []
        self._out_truncate = self._out_snapshot = None
        return ready

    @property
    def role(self) -> Literal["follower", "pre-candidate", "candidate", "leader", "learner"]:
        raise NotImplementedError

    # --- the local log ----------------------------------------------------------------------

    def _append_local(self, kind: str, data: bytes, now: float) -> Entry:
        entry = Entry(index=self._log.last_index + 1, term=self._term, kind=kind, data=data)
        self._append_entry(entry, now)
        return entry

    def _append_entry(self, entry: Entry, now: float) -> None:
        self._log.append(entry)
        if entry.kind == "config":
            self._set_membership(Membership.decode(entry.data), now)

    def _truncate(self, index: int, now: float) -> None:
        if index <= self._commit:
            raise RaftStateError(f"refusing to truncate committed entry {index}")
        self._log.truncate_from(index)
        if index <= self._persisted_last:
            self._persisted_last = index - 1
            current = self._out_truncate
            self._out_truncate = index if current is None else min(current, index)
        self._set_membership(self._membership_from_log(), now)

    def _set_membership(self, membership: Membership, now: float) -> None:
        was_voter = self.node_id in self._membership.voters
        self._membership = membership
        if self._state == "leader":
            for peer in membership.members:
                if peer != self.node_id and peer not in self._progress:
                    self._progress[peer] = self._new_progress(now)
            for peer in list(self._progress):
                if peer not in membership.members:
                    del self._progress[peer]
        elif (self.node_id in membership.voters) != was_voter:
            # A promoted learner starts its election timer; a removed voter stops campaigning.
            if self._state != "follower":
                self._become_follower(self._term, None, now)
            self._reset_election_timer(now)

    def _commit_to(self, index: int, now: float) -> None:
        if index <= self._commit:
            return
        self._commit = index
        if self._state != "leader":
            return
        if self._log.term_at(index) == self._term and self._waiting_reads:
            waiting, self._waiting_reads = self._waiting_reads, []
            for request_id in waiting:
                self._start_read(request_id, now, broadcast=False)
            if len(self._reads):
                self._broadcast(now)
        if self.node_id not in self._membership.voters:
            config = self._log.last_config_entry()
            if config is None or config.index <= self._commit:
                self._become_follower(self._term, None, now)

    # --- leading ----------------------------------------------------------------------------

    def _other_voters(self) -> list[str]:
        return [n for n in self._membership.voters if n != self.node_id]

    def _new_progress(self, now: float) -> Progress:
        return Progress(next_index=self._log.last_index + 1, last_contact=now)

    def _become_leader(self, now: float) -> None:
        self._state = "leader"
        self._leader_id = self.node_id
        self._leader_since = now
        self._progress = {
            peer: self._new_progress(now)
            for peer in self._membership.members
            if peer != self.node_id
        }
        self._append_local("noop", b"", now)
        self._maybe_commit(now)
        self._broadcast(now)

    def _stop_leading(self) -> None:
        """Leave leadership (if held): fail pending reads, forget replication state."""
        self._out_failed.extend(self._reads.fail_all())
        self._out_failed.extend(self._waiting_reads)
        self._waiting_reads = []
        self._progress = {}
        self._transfer = None
        self._heartbeat_due = math.inf

    def _leader_deadline(self) -> float:
        deadline = min(self._heartbeat_due, self._quorum_contact() + self._t.election_timeout_min_s)
        return min(deadline, self._transfer[1]) if self._transfer is not None else deadline

    def _quorum_contact(self) -> float:
        """The latest time by which a quorum of voters (this leader included) was heard."""
        contacts: list[float] = []
        for voter in self._membership.voters:
            pr = self._progress.get(voter)
            contacts.append(math.inf if voter == self.node_id else pr.last_contact if pr else 0.0)
        ordered = sorted(contacts, reverse=True)
        return ordered[self._membership.quorum - 1] if ordered else -math.inf

    def _tick_leader(self, now: float) -> None:
        # Compared exactly as next_deadline computes it, so a tick at that deadline acts.
        if now >= self._quorum_contact() + self._t.election_timeout_min_s:
            self._become_follower(self._term, None, now)  # check-quorum
            return
        if self._transfer is not None and now >= self._transfer[1]:
            self._transfer = None
        if now >= self._heartbeat_due:
            self._broadcast(now)

    def _broadcast(self, now: float) -> None:
        for peer in self._progress:
            self._send_append(peer, now)
        self._heartbeat_due = now + self._t.heartbeat_interval_s

    def _after_append(self, now: float) -> None:
        """A leader appended an entry: commit if alone, else ship it to idle followers."""
        self._maybe_commit(now)
        for peer, pr in self._progress.items():
            if not pr.in_flight(now):
                self._send_append(peer, now)

    def _send_append(self, peer: str, now: float) -> None:
        pr = self._progress[peer]
        prev = pr.next_index - 1
        prev_term = self._log.term_at(prev)
        if prev_term is None:
            self._send_snapshot(peer, pr, now)
            prev, prev_term = self._log.snapshot_index, self._log.snapshot_term
        entries: list[Entry] = []
        if not pr.in_flight(now):
            stop = prev + 1 + self._t.max_entries_per_append
            entries = _within(self._log.slice(prev + 1, stop), self._max_payload)
            if entries:
                pr.inflight_until = now + self._t.append_timeout_s
        message = AppendEntries(
            term=self._term,
            sender=self.node_id,
            prev_index=prev,
            prev_term=prev_term,
            entries=tuple(entries),
            commit_index=self._commit,
            read_context=self._reads_context,
        )
        self._send(peer, message)

    def _send_snapshot(self, peer: str, pr: Progress, now: float) -> None:
        """Send the next piece of the follower's snapshot transfer (see raft_snapshots)."""
        latest = self._log.snapshot
        if pr.in_flight(now) or (latest is None and pr.snapshot is None):
            return
        if pr.snapshot is None or (pr.snapshot_offset == 0 and latest is not None):
            # (Re)start with the newest snapshot; a transfer under way keeps its own.
            assert latest is not None
            if pr.snapshot is not latest:
                pr.snapshot, pr.snapshot_sum = latest, snapshot_checksum(latest)
        assert pr.snapshot is not None
        pr.inflight_until = now + self._t.append_timeout_s
        chunk = snapshot_chunk(
            pr.snapshot,
            pr.snapshot_sum,
            pr.snapshot_offset,
            self._max_payload,
            term=self._term,
            sender=self.node_id,
        )
        self._send(peer, chunk)

    @property
    def _reads_context(self) -> int:
        return self._reads.last_context if len(self._reads) else 0

    def _maybe_commit(self, now: float) -> None:
        if self._state != "leader":
            return
        matches = [
            self._log.last_index if voter == self.node_id else self._progress[voter].match_index
            for voter in self._membership.voters
            if voter == self.node_id or voter in self._progress
        ]
        index = quorum_index(matches, self._membership.quorum)
        # Only an entry of the leader's own term is committed by counting (Raft §5.4.2).
        if index > self._commit and self._log.term_at(index) == self._term:
            self._commit_to(index, now)

    def _handle_append_reply(self, message: AppendReply, now: float) -> None:
        pr = self._progress.get(message.sender)
        if self._state != "leader" or pr is None:
            return
        pr.last_contact = now
        if message.read_context:
            self._out_reads.extend(
                self._reads.confirm(message.sender, message.read_context, self._membership.voters)
            )
        if message.success:
            if pr.on_success(message.match_index):
                self._maybe_commit(now)
        elif message.reject_index == pr.next_index - 1:
            pr.on_reject(self._next_after_reject(message))
        else:
            return  # a stale rejection
        self._continue(message.sender, pr, now)

    def _next_after_reject(self, message: AppendReply) -> int:
        if message.conflict_term == 0:
            return message.conflict_index
        last = self._log.last_index_of_term(message.conflict_term)
        return last + 1 if last is not None else message.conflict_index

    def _handle_install_snapshot_reply(self, message: InstallSnapshotReply, now: float) -> None:
        pr = self._progress.get(message.sender)
        if self._state != "leader" or pr is None:
            return
        pr.last_contact = now
        if pr.on_success(message.match_index):
            self._maybe_commit(now)
        self._continue(message.sender, pr, now)

    def _handle_snapshot_chunk_reply(self, message: SnapshotChunkReply, now: float) -> None:
        pr = self._progress.get(message.sender)
        if self._state != "leader" or pr is None:
            return
        pr.last_contact = now
        if message.match_index:
            if pr.on_success(message.match_index):
                self._maybe_commit(now)
            self._continue(message.sender, pr, now)
            return
        if pr.snapshot is None or message.index != pr.snapshot.index:
            return  # about a transfer that ended
        pr.snapshot_offset = min(max(message.received, 0), len(pr.snapshot.data))
        pr.inflight_until = 0.0
        self._send_snapshot(message.sender, pr, now)

    def _continue(self, peer: str, pr: Progress, now: float) -> None:
        """Keep a follower streaming while it is behind; push a transfer along."""
        if self._state != "leader":
            return
        if pr.next_index <= self._log.last_index and not pr.in_flight(now):
            self._send_append(peer, now)
        if self._transfer is not None and self._transfer[0] == peer:
            self._continue_transfer(now)

    def _continue_transfer(self, now: float) -> None:
        assert self._transfer is not None
        target = self._transfer[0]
        pr = self._progress.get(target)
        if pr is None:
            self._transfer = None  # the target left the configuration meanwhile
        elif pr.match_index == self._log.last_index:
            self._send(target, TimeoutNow(term=self._term, sender=self.node_id))
        elif not pr.in_flight(now):
            self._send_append(target, now)

    def _start_read(self, request_id: str, now: float, *, broadcast: bool = True) -> None:
        self._reads.start(request_id, self._commit, self.node_id)
        self._out_reads.extend(self._reads.release(self._membership.voters))
        if broadcast and len(self._reads):
            self._broadcast(now)

    # --- following --------------------------------------------------------------------------

    def _follow(self, leader: str, now: float) -> None:
        if self._state == "leader":
            raise RaftStateError(
                f"two leaders in term {self._term}: {self.node_id} and {leader}; safety is broken"
            )
        if self._state != "follower":
            self._become_follower(self._term, leader, now)
        self._leader_id = leader
        self._leader_contact = now
        self._reset_election_timer(now)

    def _handle_append_entries(self, message: AppendEntries, now: float) -> None:
        self._follow(message.sender, now)
        reply = self._accept_append(message, now)
        self._send(message.sender, reply)

    def _accept_append(self, message: AppendEntries, now: float) -> AppendReply:
        prev, prev_term = message.prev_index, message.prev_term
        entries = message.entries
        if prev < self._commit:
            # Committed entries match in every leader's log: check from our commit on.
            entries = tuple(e for e in entries if e.index > self._commit)
            prev, prev_term = self._commit, self._log.term_at(self._commit) or 0
        elif not self._log.matches(prev, prev_term):
            conflict_index, conflict_term = self._log.conflict_hint(prev)
            return AppendReply(
                term=self._term,
                sender=self.node_id,
                success=False,
                reject_index=message.prev_index,
                conflict_index=conflict_index,
                conflict_term=conflict_term,
                read_context=message.read_context,
            )
        for entry in entries:
            held = self._log.term_at(entry.index)
            if held == entry.term:
                continue
            if held is not None:
                self._truncate(entry.index, now)
            self._append_entry(entry, now)
        last_new = prev + len(entries)
        self._commit_to(min(message.commit_index, last_new), now)
        return AppendReply(
            term=self._term,
            sender=self.node_id,
            success=True,
            match_index=last_new,
            read_context=message.read_context,
        )

    def _handle_install_snapshot(self, message: InstallSnapshot, now: float) -> None:
        self._follow(message.sender, now)
        self._install(message.snapshot, now)
        reply = InstallSnapshotReply(term=self._term, sender=self.node_id, match_index=self._commit)
        self._send(message.sender, reply)

    def _handle_snapshot_chunk(self, message: SnapshotChunk, now: float) -> None:
        self._follow(message.sender, now)
        received, match = self._accept_chunk(message, now)
        reply = SnapshotChunkReply(
            term=self._term,
            sender=self.node_id,
            index=message.index,
            received=received,
            match_index=match,
        )
        self._send(message.sender, reply)

    def _accept_chunk(self, message: SnapshotChunk, now: float) -> tuple[int, int]:
        """Add a piece to the snapshot being assembled; (bytes held, match index or 0)."""
        if message.index <= self._commit:
            self._incoming = None  # nothing to install: this node holds those entries
            return 0, self._commit
        incoming = self._incoming
        if incoming is None or not incoming.belongs(message):
            self._incoming = None
            if message.offset != 0:
                return 0, 0  # a later piece of a transfer this node does not hold: restart
            incoming = self._incoming = SnapshotAssembly(message)
        if not incoming.add(message) or not message.done:
            return incoming.received, 0
        self._incoming = None
        snapshot = incoming.finish()
        if snapshot is None:
            return 0, 0  # the whole does not match its size or checksum: restart
        self._install(snapshot, now)
        return 0, self._commit

    def _install(self, snapshot: Snapshot, now: float) -> None:
        if snapshot.index > self._commit:
            if self._log.matches(snapshot.index, snapshot.term):
                self._commit_to(snapshot.index, now)
            else:
                self._restore(snapshot, now)

    def _restore(self, snapshot: Snapshot, now: float) -> None:
        self._log.compact(snapshot)
        self._commit = self._applied = self._persisted_last = snapshot.index
        # Said twice on purpose: a driver that only drops the entries a snapshot covers
        # still drops the stale suffix too.
        self._out_truncate = snapshot.index + 1
        self._out_snapshot = snapshot
        self._set_membership(Membership(voters=snapshot.voters, learners=snapshot.learners), now)


def _within(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The leading entries whose data fits in `max_bytes` (always at least one)."""
    total = 0
    for count, entry in enumerate(entries):
        total += len(entry.data)
        if total > max_bytes and count > 0:
            return entries[:count]
    return entries
