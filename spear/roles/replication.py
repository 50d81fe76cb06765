"""The Raft driver: runs one node's RaftCore and makes the SMS state a replicated state machine.

The Replicator is the only caller of its core. Each call's Ready is carried out in the order
the core demands: persist (synced, in a worker thread) before any message leaves, then send,
then apply committed commands to the SmsState, then answer reads. Calls are serialized by
one lock, so Readies are handled strictly in the order the core produced them.

A write is acknowledged only once committed and applied (DESIGN.md section 3): `commit`
proposes the command and waits until the entry at that (index, term) is applied, returning
the apply's own outcome (a refused command raises the same error on the leader that a
single node would). If another term's entry lands at that index the proposal was lost and
`commit` says so; if the outcome cannot be known within the caller's time it says that too.
Either way the client may retry with its idempotency key.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from spear.errors import SpearError, UnavailableError
from spear.mesh import Entry, RaftCore, RaftMessage, Ready, SoftState
from spear.roles.raft_storage import RaftStorage
from spear.roles.state import Command, SmsState, decode_command, encode_command

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: how many inbound Raft messages may wait for the driver; more are dropped (Raft resends)
INBOX_SIZE = 1024


class WriteLostError(UnavailableError):
    """The write was not committed (leadership changed first); retrying it is safe."""

    code = "write_lost"


class WriteUnknownError(UnavailableError):
    """The write's fate is unknown (no quorum answered in time); retry it with the same
    idempotency key to learn it without applying it twice."""

    code = "write_outcome_unknown"


@dataclass(slots=True)
class _Proposal:
    term: int
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass(slots=True)
class _Read:
    done: trio.Event = field(default_factory=trio.Event)
    index: int | None = None
    failed: bool = False


class Replicator:
    """One node's Raft driver; start `serve` in the node's nursery before using it."""

    def __init__(
        self,
        *,
        core: RaftCore,
        storage: RaftStorage,
        state: SmsState,
        send: Callable[[str, RaftMessage], None],
        blocking_in_thread: bool = True,
    ) -> None:
        """
        Args:
            core: the Raft core, restored from `storage.load()`.
            send: best-effort delivery of a message to a node id (never blocks).
            blocking_in_thread: run store writes in a worker thread (False only for the
                in-memory store, e.g. in tests under trio's mock clock).
        """
        self._core = core
        self._storage = storage
        self._state = state
        self._send = send
        self._lock = trio.Lock()
        self._inbox_send, self._inbox = trio.open_memory_channel[RaftMessage | None](INBOX_SIZE)
        self._proposals: dict[int, _Proposal] = {}
        self._reads: dict[str, _Read] = {}
        self._read_ids = itertools.count(1)
        self._soft = SoftState(role=core.role, term=core.term, leader_id=core.leader_id)
        self._changed = trio.Event()
        self._applied_changed = trio.Event()
        self._in_thread = blocking_in_thread
        self._stepped: trio.Event | None = None  # made only while someone waits for a step
        self.dropped_messages = 0

    # --- what others read -----------------------------------------------------------------

    @property
    def soft_state(self) -> SoftState:
        """The role, term and leader as of the last handled Ready."""
        return self._soft

    @property
    def core(self) -> RaftCore:
        """The core, for status documents only (never call its methods from outside)."""
        return self._core

    def leads_now(self) -> bool:
        """Whether this node leads and a quorum of voters answered it within the check-quorum
        window (a cheap guard against answering from a deposed leader's state)."""
        return self._core.holds_quorum_contact(trio.current_time())

    async def wait_applied(self, index: int) -> None:
        """Wait until this node has applied the log up to `index`."""
        while self._core.applied_index < index:
            await self._applied_changed.wait()

    async def wait_soft_state_change(self) -> SoftState:
        """Wait until role, term or leader changes; return the new soft state."""
        await self._changed.wait()
        return self._soft

    # --- inputs ---------------------------------------------------------------------------

    def deliver(self, message: RaftMessage) -> None:
        """Queue a message that arrived from the mesh; dropped if the inbox is full."""
        try:
            self._inbox_send.send_nowait(message)
        except trio.WouldBlock:
            self.dropped_messages += 1

    async def bootstrap(self, voters: tuple[str, ...]) -> None:
        """Write the initial configuration (a brand-new node only; raises BootstrapError)."""
        await self._run(lambda now: self._core.bootstrap(voters, now))

    async def commit(self, command: Command) -> None:
        """Replicate `command`; return once it is committed and applied here.

        The caller owns the timeout (trio.fail_after / move_on_after around this call);
        a cancelled wait raises WriteUnknownError unless cancelled from outside that scope.

        Raises:
            NotLeaderError: this node is not the leader.
            WriteLostError: leadership changed before the command was committed.
            SpearError: the command was committed but refused by the state machine (e.g.
                ConflictError for a taken task name), as on every replica.
        """
        data = encode_command(command)
        await self._propose_and_wait(lambda now: self._core.propose(data, now))

    async def add_learner(self, node_id: str) -> None:
        """Add a non-voting member that receives the log (leader only).

        Raises:
            NotLeaderError: this node is not the leader.
            ConfigChangeError: a change is pending or the node is already a member.
            WriteLostError: leadership changed before the change was committed.
        """
        await self._propose_and_wait(lambda now: self._core.add_learner(node_id, now))

    async def promote(self, node_id: str, *, catch_up_s: float = 0.0) -> None:
        """Make a caught-up learner a voter; return once the change is committed here.

        A learner still behind the commit index is given up to `catch_up_s` to catch up
        (its replies arrive with every append) before the core refuses it.

        Raises:
            NotLeaderError: this node is not the leader.
            ConfigChangeError: not a learner, not caught up, a change is pending, or the new
                voters could not reach their quorum.
            WriteLostError, WriteUnknownError: as for `commit`.
        """
        with trio.move_on_after(catch_up_s):
            while self._core.learner_behind(node_id):
                await self._wait_step()
        await self._propose_and_wait(lambda now: self._core.promote(node_id, now))

    async def demote(self, node_id: str) -> None:
        """Make a voter a learner; return once committed (raises as `promote`)."""
        await self._propose_and_wait(lambda now: self._core.demote(node_id, now))

    async def remove_member(self, node_id: str) -> None:
        """Take a voter or learner out of the configuration; return once committed (raises
        as `promote`)."""
        await self._propose_and_wait(lambda now: self._core.remove_node(node_id, now))

    async def transfer_leadership(self, target: str) -> bool:
        """Hand leadership to voter `target`; say whether this node stopped leading within
        twice the longest election timeout (the target then normally leads).

        Raises:
            NotLeaderError: this node is not the leader.
            ConfigChangeError: `target` is not another voter.
        """
        await self._run(lambda now: self._core.transfer_leadership(target, now))
        with trio.move_on_after(2 * self._core.timings.election_timeout_max_s):
            while self._soft.role == "leader":
                await self.wait_soft_state_change()
        return self._soft.role != "leader"

    async def _propose_and_wait(self, call: Callable[[float], tuple[int, int, Ready]]) -> None:
        proposal: _Proposal | None = None

        def propose(now: float) -> Ready:
            nonlocal proposal
            index, term, ready = call(now)
            proposal = self._proposals[index] = _Proposal(term=term)
            return ready

        await self._run(propose)
        assert proposal is not None
        await proposal.done.wait()
        if proposal.error is not None:
            raise proposal.error

    async def read_barrier(self) -> None:
        """Return once this node's state reflects every write committed before the call.

        Raises:
            NotLeaderError: this node is not the leader.
            UnavailableError: leadership was lost before the read could be confirmed.
        """
        request_id = f"r{next(self._read_ids)}"
        read = self._reads[request_id] = _Read()
        try:
            await self._run(lambda now: self._core.read_index(request_id, now))
            await read.done.wait()
        finally:
            self._reads.pop(request_id, None)
        if read.failed:
            raise UnavailableError("leadership was lost before the read was confirmed; retry")

    # --- the loop ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle inbound messages and timers until cancelled."""
        task_status.started()
        while True:
            message: RaftMessage | None = None
            with trio.move_on_at(self._core.next_deadline):
                message = await self._inbox.receive()
            if message is not None:
                await self._run(functools.partial(self._step, message))
            elif trio.current_time() >= self._core.next_deadline:
                await self._run(self._core.tick)

    def _step(self, message: RaftMessage, now: float) -> Ready:
        return self._core.step(message, now)

    async def _run(self, call: Callable[[float], Ready]) -> None:
        async with self._lock:
            deadline = self._core.next_deadline
            ready = call(trio.current_time())
            await self._handle(ready)
            if self._core.next_deadline < deadline:
                self._wake()
        if self._stepped is not None:
            self._stepped.set()
            self._stepped = None

    async def _wait_step(self) -> None:
        """Wait until the core handled one more message, timer or call."""
        if self._stepped is None:
            self._stepped = trio.Event()
        await self._stepped.wait()

    def _wake(self) -> None:
        # The serve loop sleeps until the deadline it saw; an earlier one needs a nudge.
        # A full inbox means the loop is about to run anyway.
        with contextlib.suppress(trio.WouldBlock):
            self._inbox_send.send_nowait(None)

    async def _handle(self, ready: Ready) -> None:
        if not ready:
            return
        if ready.snapshot or ready.truncate_from is not None or ready.entries or ready.hard_state:
            await self._blocking(functools.partial(self._storage.persist, ready))
        for to, message in ready.messages:
            self._send(to, message)
        if ready.committed:
            settled = await self._blocking(functools.partial(self._apply, ready.committed))
            for proposal in settled:
                proposal.done.set()
            self._applied_changed.set()
            self._applied_changed = trio.Event()
        self._answer_reads(ready)
        if ready.soft_state is not None:
            self._on_soft_state(ready.soft_state)
        if self._core.wants_snapshot:
            await self._blocking(self._compact)

    async def _blocking(self, call: Callable[[], _T]) -> _T:
        if self._in_thread:
            return await trio.to_thread.run_sync(call)
        return call()

    # --- applying ------------------------------------------------------------------------

    def _apply(self, entries: tuple[Entry, ...]) -> list[_Proposal]:
        """Apply committed entries in order; return the proposals they settled."""
        settled: list[_Proposal] = []
        for entry in entries:
            error: BaseException | None = None
            if entry.kind == "command":
                try:
                    self._state.apply(decode_command(entry.data), index=entry.index)
                except SpearError as exc:
                    error = exc
            proposal = self._proposals.pop(entry.index, None)
            if proposal is not None:
                if proposal.term != entry.term:
                    error = WriteLostError(
                        "the write was not committed because leadership changed; retry it"
                    )
                proposal.error = error
                settled.append(proposal)
        return settled

    def _compact(self) -> None:
        applied = self._core.applied_index
        snapshot = self._core.make_snapshot(applied, self._state.snapshot())
        self._storage.save_snapshot(snapshot)
        self._core.compact(snapshot)

    def _answer_reads(self, ready: Ready) -> None:
        for read_state in ready.read_states:
            read = self._reads.get(read_state.request_id)
            if read is not None:
                read.index = read_state.index
        applied = self._core.applied_index
        for read in self._reads.values():
            if read.index is not None and read.index <= applied:
                read.done.set()
        for request_id in ready.failed_reads:
            read = self._reads.get(request_id)
            if read is not None:
                read.failed = True
                read.done.set()

    def _on_soft_state(self, soft: SoftState) -> None:
        previous, self._soft = self._soft, soft
        if soft.role != "leader" and previous.role == "leader":
            self._fail_proposals()
        log.info("raft: %s in term %d (leader %s)", soft.role, soft.term, soft.leader_id)
        self._changed.set()
        self._changed = trio.Event()

    def _fail_proposals(self) -> None:
        # Entries of a deposed leader may still commit under the next leader; the client
        # learns the outcome by retrying with its idempotency key.
        for proposal in self._proposals.values():
            proposal.error = WriteUnknownError(
                "leadership changed before the write was confirmed; retry it with the same"
                " idempotency key"
            )
            proposal.done.set()
        self._proposals.clear()
