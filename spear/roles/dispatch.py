"""Dispatch between the leader and the Spearlets: the messages and the pure rules.

The leader places an invocation and sends it to the chosen Spearlet as a `Dispatch` carrying
`(term, leader_id)` (DESIGN.md section 3). A sync invocation a follower received is placed
by the leader at the follower's request (`SyncPlace`), but the follower itself sends the
leader's `Dispatch`, with the input, to the chosen Spearlet and reports how it ended
(`SyncOutcome`): the data never passes through the leader. A sync dispatch is answered with
its `ExecutionResult`; an async one is answered `DispatchAccepted` at once, and the Spearlet later
delivers the `ExecutionResult` to whichever node leads then, again and again until a
`ResultAck` says it is committed.

Two pure cores hold the rules, so that the simulator can drive them too:

- `Fence` (on every Spearlet): refuses a command from a term lower than one already seen
  (but for a cancel of at least the term its execution was admitted under), refuses an
  execution id that is already running here (one id never runs twice at once), and
  keeps the Spearlet's *lease*: an async dispatch is taken only while the Spearlet holds a lease,
  renewed by each acknowledged resource report for `lease_s` from the moment the report was
  *sent*. When the lease lapses the Spearlet cancels its async executions itself.
  Each lease a Spearlet regains after it lapsed is a new *epoch*, carried in its reports; an
  async dispatch carries the epoch the leader last heard of, and one from an older epoch (a
  dispatch held up in a partition that outlived the lease) is refused: the leader may have
  run that attempt elsewhere meanwhile.
- `LeaseBook` (on the leader): when it last heard each Spearlet. It declares a Spearlet's work
  lost only once `lease_s` plus a margin have passed since then, that is after the Spearlet has
  certainly stopped it; only then is an attempt run again elsewhere. A new leader counts from
  the moment it began to lead.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from spear.model import RetrySpec

#: the share of the lease added on the leader's side for clock-rate differences, and a floor
LEASE_MARGIN_SHARE = 0.1
LEASE_MARGIN_MIN_S = 0.2

RefusalCode = Literal["stale_term", "duplicate", "no_lease", "stale_lease", "superseded", "refused"]
#: attempts a Spearlet remembers having answered "not held" for (it refuses them later)
MAX_TOMBSTONES = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """Run an execution here (request, leader -> Spearlet)."""

    term: int
    leader_id: str
    execution_id: str
    attempt: int
    mode: Literal["sync", "async"]
    task: bytes  # the task's record as CBOR: a learner may not have applied it yet
    data: bytes
    timeout_ms: int  # what is left of the invocation's one deadline
    acquire_timeout_ms: int  # -1: wait for an instance until the deadline
    lease_epoch: int = 0  # async: the Spearlet's lease epoch the leader last heard of


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchAccepted:
    """An async dispatch was taken; its result follows as an ExecutionResult request."""

    execution_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchRefused:
    """The dispatch did not start here (it certainly did not run)."""

    execution_id: str
    code: str  # a RefusalCode, or an error code of spear.errors (e.g. "saturated")
    message: str
    retry_after_s: float = 0.0
    #: the request field a refusal for invalid input names ("" when none)
    field: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchCancel:
    """Stop a running execution (one-way, leader -> Spearlet)."""

    term: int
    leader_id: str
    execution_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchProbe:
    """Does this Spearlet still hold these attempts, running or with a result to deliver?
    (request, leader -> Spearlet). One answered "no" is refused if its dispatch comes later."""

    term: int
    leader_id: str
    execution_ids: tuple[str, ...]
    attempts: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeAnswer:
    """For each probed attempt, in order: whether it is held here."""

    held: tuple[bool, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionResult:
    """How one attempt ended (the reply to a sync dispatch; a request to the leader for async)."""

    execution_id: str
    attempt: int
    node_id: str
    status: str
    error_code: str | None = None
    error_message: str | None = None
    exit_code: int | None = None
    cold: bool = True
    timings_ms: dict[str, float] = field(default_factory=dict)
    output: bytes = b""
    logs: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultAck:
    """The leader has the result durably (or no longer wants it): stop delivering it."""

    execution_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPlace:
    """Place a sync invocation this follower received (request, follower -> leader).

    Answered `SyncPlaced` (send the dispatch there), `SyncRecorded` (it ran on the leader,
    or an invocation with the same idempotency key has ended: its record and output) or
    `DispatchRefused` (no node can take it; `code` is an error code of spear.errors).

    A small input travels with the request (`inline`): placed on the leader, the invocation
    runs there at once, and the answer is its record and output (one round trip instead of
    three); placed elsewhere, the follower sends the input there as for a large one.
    """

    task: str  # the task's id or name, as the client gave it
    input_bytes: int
    timeout_ms: int = 0  # the client's own deadline; 0: none
    idempotency_key: str = ""  # "": none
    execution_id: str = ""  # placing it again: the node chosen before could not be reached
    exclude: tuple[str, ...] = ()
    inline: bool = False
    data: bytes = b""  # the input, when inline
    placement_id: str = ""  # chosen by the follower: what a `SyncWithdraw` names


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPlaced:
    """Where a follower's sync invocation runs: the leader's dispatch, complete but for its
    input (the follower adds it and sends it to `dispatch`'s node itself)."""

    node_id: str
    dispatch: Dispatch
    record: bytes  # the execution's record as the leader keeps it (CBOR)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRun:
    """Run the sync invocation you placed on yourself, with this input (request, follower
    -> leader): the leader keeps the output it makes. Answered `SyncRecorded` (the record and
    output) or `DispatchRefused`."""

    execution_id: str
    data: bytes
    timeout_ms: int  # the placed dispatch's


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncOutcome:
    """How a sync invocation placed for this follower ended (request, follower -> leader);
    without a result it did not run (its node refused it). Answered `SyncRecorded`."""

    execution_id: str
    result: ExecutionResult | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncWithdraw:
    """The follower stopped waiting for the answer to its `SyncPlace` (its client hung up)
    and will neither dispatch nor report it (one-way, follower -> leader): a placement made
    for it is taken back, its record ends cancelled, a run on the leader is stopped."""

    placement_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRecorded:
    """The leader's record of a sync invocation (CBOR), with its output when the asker lacks
    it (an earlier invocation with the same idempotency key)."""

    record: bytes
    output: bytes = b""


#: append-only wire tags
#: the feature (MemberMeta.features) of nodes that take the direct path's messages
#: (SyncPlace, SyncRun, SyncOutcome, SyncWithdraw); a follower sends them only to a leader
#: that lists it, and relays over HTTP to any other
SYNC_DIRECT = "sync-direct"

DISPATCH_MESSAGES: dict[str, type] = {
    "dispatch.run": Dispatch,
    "dispatch.accepted": DispatchAccepted,
    "dispatch.refused": DispatchRefused,
    "dispatch.cancel": DispatchCancel,
    "dispatch.result": ExecutionResult,
    "dispatch.result_ack": ResultAck,
    "dispatch.probe": DispatchProbe,
    "dispatch.probe_answer": ProbeAnswer,
    "dispatch.sync_place": SyncPlace,
    "dispatch.sync_placed": SyncPlaced,
    "dispatch.sync_outcome": SyncOutcome,
    "dispatch.sync_recorded": SyncRecorded,
    "dispatch.sync_run": SyncRun,
    "dispatch.sync_withdraw": SyncWithdraw,
}


@dataclass(slots=True)
class _Running:
    attempt: int
    term: int
    mode: str


class Fence:
    """A Spearlet's rules for commands from leaders (pure: fed `now`)."""

    def __init__(self) -> None:
        self.term = 0
        self.lease_until = -math.inf
        self.epoch = 0
        self._running: dict[str, _Running] = {}
        self._tombstones: dict[tuple[str, int], None] = {}  # insertion-ordered, bounded

    def renew(self, term: int, sent_at: float, lease_s: float, *, now: float | None = None) -> None:
        """A leader of `term` acknowledged the report this Spearlet sent at `sent_at`; `now`
        (default `sent_at`) is when the ack came: a lease regained after it lapsed is a new
        epoch."""
        if term < self.term:
            return
        self.term = term
        if not self.holds_lease(sent_at if now is None else now):
            self.epoch += 1
        self.lease_until = max(self.lease_until, sent_at + lease_s)

    def holds_lease(self, now: float) -> bool:
        return now < self.lease_until

    def observe(self, term: int) -> bool:
        """Whether a command of `term` may be acted on (and remember the highest term)."""
        if term < self.term:
            return False
        self.term = term
        return True

    def may_cancel(self, execution_id: str, term: int) -> bool:
        """Whether a cancel of `term` may stop that execution: one of the highest term seen
        may (and that term is remembered), and so may one of at least the term the execution
        was admitted under (a follower cancels with its placement's term: a newer leader
        heard of meanwhile does not make that cancel stale)."""
        if self.observe(term):
            return True
        running = self._running.get(execution_id)
        return running is not None and term >= running.term

    def admit(self, dispatch: Dispatch, now: float) -> tuple[RefusalCode, str] | None:
        """Take a dispatch as running, or say why not."""
        if not self.observe(dispatch.term):
            return "stale_term", (
                f"dispatch from term {dispatch.term} refused: this node has seen term {self.term}"
            )
        if dispatch.execution_id in self._running:
            return "duplicate", f"execution {dispatch.execution_id} is already running here"
        if (dispatch.execution_id, dispatch.attempt) in self._tombstones:
            return "superseded", (
                f"attempt {dispatch.attempt} of {dispatch.execution_id} was given up here"
            )
        if dispatch.mode == "async" and not self.holds_lease(now):
            return "no_lease", "this node holds no lease from the leader yet (or it lapsed)"
        if dispatch.mode == "async" and dispatch.lease_epoch != self.epoch:
            return "stale_lease", (
                f"dispatch for lease epoch {dispatch.lease_epoch}; this node holds epoch"
                f" {self.epoch} (its lease lapsed since: the attempt may run elsewhere)"
            )
        self._running[dispatch.execution_id] = _Running(
            attempt=dispatch.attempt, term=dispatch.term, mode=dispatch.mode
        )
        return None

    def finish(self, execution_id: str) -> None:
        self._running.pop(execution_id, None)

    def running(self, execution_id: str) -> bool:
        return execution_id in self._running

    def probe(self, execution_id: str, attempt: int) -> bool:
        """Whether that attempt runs here; if not, it is refused should its dispatch come."""
        running = self._running.get(execution_id)
        if running is not None and running.attempt == attempt:
            return True
        self._tombstones[(execution_id, attempt)] = None
        while len(self._tombstones) > MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]
        return False

    def lapsed(self, now: float) -> list[str]:
        """The async executions to stop because the lease lapsed."""
        if self.holds_lease(now):
            return []
        return [e for e, r in self._running.items() if r.mode == "async"]


class LeaseBook:
    """The leader's view of its Spearlets' leases (pure: fed `now`)."""

    def __init__(self, *, lease_s: float, since: float) -> None:
        """
        Args:
            since: when this node began to lead: no Spearlet's lease is assumed older.
        """
        self.lease_s = lease_s
        self.margin_s = max(LEASE_MARGIN_MIN_S, lease_s * LEASE_MARGIN_SHARE)
        self._since = since
        self._heard: dict[str, float] = {}
        self._epochs: dict[str, int] = {}

    def heard(self, node_id: str, now: float, epoch: int = 0) -> None:
        """A report of the node (with its lease epoch then) came at `now`."""
        if now >= self._heard.get(node_id, -math.inf):
            self._heard[node_id] = now
            self._epochs[node_id] = epoch

    def epoch_of(self, node_id: str) -> int:
        """The lease epoch of the node's latest report (stamped on async dispatches)."""
        return self._epochs.get(node_id, 0)

    def last_heard(self, node_id: str) -> float:
        return max(self._heard.get(node_id, -math.inf), self._since)

    def expires_at(self, node_id: str) -> float:
        """When the node has certainly stopped the work it was given before now."""
        return self.last_heard(node_id) + self.lease_s + self.margin_s

    def lost(self, node_id: str, now: float) -> bool:
        return now >= self.expires_at(node_id)

    def live(self, node_id: str, now: float) -> bool:
        """Whether the node reported within its lease (it may take async work)."""
        return node_id in self._heard and now < self._heard[node_id] + self.lease_s


def retry_delay_s(retry: RetrySpec, failed_attempts: int, rng: random.Random) -> float:
    """The wait before the next attempt: exponential backoff with equal jitter.

    The n-th failure waits between half and all of `backoff_ms * 2**(n-1)` (capped at
    `max_backoff_ms`), so retries of many executions that failed together spread out.
    """
    if failed_attempts <= 0 or retry.backoff_ms == 0:
        return 0.0
    base = min(retry.backoff_ms * 2 ** min(failed_attempts - 1, 32), retry.max_backoff_ms)
    return float(base / 2 + rng.uniform(0, base / 2)) / 1000
