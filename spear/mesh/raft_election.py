"""The election half of the Raft core: timers, pre-vote, votes, terms, stickiness.

`Elections` sits between `Replication` (shared state, log replication, Ready assembly) and
`spear.mesh.raft.RaftCore` (the public API); it is not used alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

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


class Elections(Replication):
    """Role changes and the (pre-)vote protocol; see RaftCore for the contract."""

    _rng: random.Random
    _votes: set[str]
    _election_deadline: float

    def _reset_election_timer(self, now: float) -> None:
        if self.node_id in self._membership.voters:
            lo, hi = self._t.election_timeout_min_s, self._t.election_timeout_max_s
            self._election_deadline = now + self._rng.uniform(lo, hi)
        else:
            self._election_deadline = math.inf  # learners and non-members never campaign

    def _on_election_timeout(self, now: float) -> None:
        self._reset_election_timer(now)
        if self.node_id in self._membership.voters:
            self._become_pre_candidate(now)

    def _become_follower(self, term: int, leader: str | None, now: float) -> None:
        if term != self._term:
            self._term = term
            self._voted_for = None
        self._stop_leading()
        self._state = "follower"
        self._leader_id = leader
        self._reset_election_timer(now)

    def _become_pre_candidate(self, now: float) -> None:
        self._stop_leading()
        self._state = "pre-candidate"
        self._leader_id = None  # etcd #9586: a pre-candidate forgets its leader
        self._votes = {self.node_id}
        if self._campaign(now, lambda: self._become_candidate(now, transfer=False)):
            return
        for peer in self._other_voters():
            self._send(
                peer,
                PreVote(
                    term=self._term + 1,
                    sender=self.node_id,
                    last_log_index=self._log.last_index,
                    last_log_term=self._log.last_term,
                ),
            )

    def _become_candidate(self, now: float, *, transfer: bool) -> None:
        self._stop_leading()
        self._state = "candidate"
        self._term += 1
        self._voted_for = self.node_id
        self._leader_id = None
        self._votes = {self.node_id}
        self._reset_election_timer(now)
        if self._campaign(now, lambda: self._become_leader(now)):
            return
        for peer in self._other_voters():
            self._send(
                peer,
                RequestVote(
                    term=self._term,
                    sender=self.node_id,
                    last_log_index=self._log.last_index,
                    last_log_term=self._log.last_term,
                    transfer=transfer,
                ),
            )

    def _campaign(self, now: float, on_win: Callable[[], None]) -> bool:
        """Call `on_win` if the votes gathered reach a quorum; say whether it did."""
        if len(self._votes & set(self._membership.voters)) >= self._membership.quorum:
            on_win()
            return True
        return False

    def _in_lease(self, now: float) -> bool:
        if self._state == "leader":
            return True
        recent = now - self._leader_contact < self._t.election_timeout_min_s
        return self._leader_id is not None and recent

    def _adopts_term(self, message: RaftMessage, now: float) -> bool:
        """Whether a message of a higher term makes this node follow that term."""
        if isinstance(message, PreVote):
            return False
        if isinstance(message, PreVoteReply):
            return not message.granted
        if isinstance(message, RequestVote):
            return message.transfer or not self._in_lease(now)
        return True

    def _answer_stale(self, message: RaftMessage) -> None:
        """Tell the sender of a stale-term request our term; drop stale replies."""
        reply: RaftMessage
        if isinstance(message, PreVote):
            reply = PreVoteReply(term=self._term, sender=self.node_id, granted=False)
        elif isinstance(message, RequestVote):
            reply = VoteReply(term=self._term, sender=self.node_id, granted=False)
        elif isinstance(message, AppendEntries):
            reply = AppendReply(term=self._term, sender=self.node_id, success=False)
        elif isinstance(message, InstallSnapshot):
            reply = InstallSnapshotReply(term=self._term, sender=self.node_id, match_index=0)
        elif isinstance(message, SnapshotChunk):
            reply = SnapshotChunkReply(term=self._term, sender=self.node_id, index=message.index)
        else:
            return
        self._send(message.sender, reply)

    def _handle_pre_vote(self, message: PreVote, now: float) -> None:
        granted = (
            message.term > self._term
            and not self._in_lease(now)
            and self._log.is_up_to_date(message.last_log_index, message.last_log_term)
        )
        term = message.term if granted else self._term
        self._send(message.sender, PreVoteReply(term=term, sender=self.node_id, granted=granted))

    def _handle_pre_vote_reply(self, message: PreVoteReply, now: float) -> None:
        if self._state != "pre-candidate" or not message.granted:
            return
        if message.term == self._term + 1:
            self._votes.add(message.sender)
            self._campaign(now, lambda: self._become_candidate(now, transfer=False))

    def _handle_request_vote(self, message: RequestVote, now: float) -> None:
        granted = (
            message.term == self._term
            and (
                self._voted_for == message.sender
                or (self._voted_for is None and self._leader_id is None)
            )
            and self._log.is_up_to_date(message.last_log_index, message.last_log_term)
        )
        if granted:
            self._voted_for = message.sender
            self._reset_election_timer(now)
        self._send(message.sender, VoteReply(term=self._term, sender=self.node_id, granted=granted))

    def _handle_vote_reply(self, message: VoteReply, now: float) -> None:
        if self._state == "candidate" and message.granted and message.term == self._term:
            self._votes.add(message.sender)
            self._campaign(now, lambda: self._become_leader(now))

    def _handle_timeout_now(self, message: TimeoutNow, now: float) -> None:
        if self._state != "leader" and self.node_id in self._membership.voters:
            self._become_candidate(now, transfer=True)
