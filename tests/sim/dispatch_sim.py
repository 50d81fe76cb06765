"""DispatchSim: the real dispatch path of N nodes in one process, under trio's MockClock.

Each node runs the real parts that spear.roles.execution_plane wires on a real node: its
FunctionService with its Fence, its Dispatcher with its LeaseBook and Placer, a NodeService and
a PlacementFeed feeding that Placer, the real `serve_reports` loop, and a TaskService whose
`serve_async_workers` runs while the node leads. What is simulated around them:

- the replicated state: one SmsState over the memory store stands for the Raft log. A commit
  is applied after a quorum round trip, and only by the leader of the newest term while it
  reaches a majority (a deposed leader's commit fails, as its AppendEntries would);
- Raft itself, as a small model ticking every `raft_tick_s`: a leader heartbeats the nodes it
  reaches (they learn its term and id), steps down when it learns a higher term or has not
  reached a majority for `check_quorum_s` (until then it still takes reports and results, as
  `leads_now` would let it), and a follower that has not heard a leader for its election
  timeout and reaches a majority is elected in a new term. Leading starts the node's
  `serve_async_workers` in its own cancel scope; stepping down cancels that scope;
- a fake Spearlet per node (`SimSpearlet`) whose `execute` runs for a seeded virtual time and
  records every run in the `RunTracker`;
- `DispatchNet`: requests and one-way sends with seeded latency and loss, and partitions that
  either drop messages or hold them until the heal and then deliver them after a random
  retransmission delay (what TCP does on a mesh link that stays open through a partition);
- crashes (the node's whole nursery is cancelled: nothing it ran runs on; messages to it are
  lost) and restarts (a new incarnation: a fresh Fence, LeaseBook and TaskService, the same
  node id and its persisted Raft term).

Invariants checked as the run goes (a violation stops the run at once, naming the rule):

- I6: one execution id never runs at overlapping virtual times (on two nodes, or twice on one);
- I7: no FunctionService accepts a dispatch whose term is lower than one its Fence has seen;
- attempts: no committed record counts more attempts than its task's retry.max_attempts;

and by `settle`, once every fault is healed, within a bound: every accepted execution is in the
state and terminal (succeeded; failed or timeout and dead-lettered; cancelled only if a client
asked), its history numbers its attempts 1..n with n <= retry.max_attempts, it ran at most that
often, and a success was really run to success on the node its record names.

A violation that one of KNOWN_BUGS explains is raised as `KnownBug`: an I6 break whose new run
is of an attempt the leader had already superseded, or executions left running on a live
Spearlet that does not hold them (settle stops waiting once only such executions remain for
KNOWN_STUCK_S). A crash cancels the node's tasks, so its shielded cleanup still runs, but a
crashed node commits nothing and sends nothing.

Two process-wide stand-ins keep a seed replayable: `trio.to_thread.run_sync` runs inline (a
real thread lets the autojump clock move while it runs), and the TaskService's execution and
task ids come from a counter instead of `secrets`.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import trio

import spear.roles.sms as sms_module
from spear.config import SmsConfig
from spear.errors import ConflictError, SpearError, UnavailableError
from spear.mesh import (
    LinkClosedError,
    Member,
    MemberMeta,
    MemberState,
    NotLeaderError,
    PeerUnreachableError,
    RemoteError,
    RequestTimeoutError,
)
from spear.model import (
    ErrorCode,
    ExecStatus,
    ExecutionId,
    ExecutionRecord,
    FunctionSpec,
    RetrySpec,
    RunOutcome,
    TaskId,
    TaskRecord,
    TaskSpec,
)
from spear.roles import ArtifactStore, SmsState, Spearlet, TaskService
from spear.roles.dispatch import (
    Dispatch,
    DispatchCancel,
    DispatchProbe,
    DispatchRefused,
    ExecutionResult,
    ResultAck,
)
from spear.roles.dispatcher import Dispatcher
from spear.roles.function_service import Answer, FunctionService
from spear.roles.nodes import NodeReport, NodeService, ReportAck, serve_reports
from spear.roles.placement import Placer
from spear.roles.placement_feed import PlacementFeed
from spear.roles.state import Command, PutExecution
from spear.store.memory import MemoryStore
from tests.sim.invariants import InvariantViolation, LivenessViolation
from tests.sim.net import Latency

T = TypeVar("T")
PartitionMode = Literal["drop", "hold"]

#: bugs of the code under test that this simulator found, by name (both fixed: the second by
#: lease epochs, the first by probing attempts); a run whose only violations are of these
#: raises `KnownBug`, naming them
KNOWN_BUGS: dict[str, str] = {
    "orphaned-attempt": (
        "an attempt committed as running on a live Spearlet that does not hold it stays "
        "running forever: the leader gives an attempt up only when the Spearlet's lease is "
        "lost, and this Spearlet keeps reporting (its dispatch was lost, or refused while the "
        "leader that sent it lost its term, or the Spearlet restarted within its lease)"
    ),
    "stale-attempt-admitted": (
        "a dispatch delayed past the lapse of its Spearlet's lease is admitted once the lease "
        "is renewed, while the leader already runs the next attempt elsewhere (I6)"
    ),
}


#: how long every unfinished execution must stay held by known bugs before `settle` stops
#: waiting: past a held message's flush, the accept timeout and a lease
KNOWN_STUCK_S = 20.0


class KnownBug(InvariantViolation):
    """A violation that one of KNOWN_BUGS explains (`bugs`: their names)."""

    def __init__(self, message: str, *, bugs: tuple[str, ...]) -> None:
        super().__init__(message)
        self.bugs = bugs


@dataclass(frozen=True, slots=True, kw_only=True)
class SimTimings:
    """The simulation's timings (the defaults are spear's own where spear has one)."""

    report_interval_s: float = 1.0  # node.report_interval_ms
    lease_s: float = 4.0  # sms.spearlet_lease_ms
    slots: int = 4  # node.max_running of every node
    raft_tick_s: float = 0.1
    check_quorum_s: float = 1.0
    election_timeout_s: tuple[float, float] = (1.0, 2.0)
    quorum_rtt_s: tuple[float, float] = (0.001, 0.01)
    refresh_s: float = 0.25  # execution_plane.REFRESH_S
    result_timeout_s: float = 5.0  # execution_plane.RESULT_TIMEOUT_S
    flush_s: float = 3.0  # held messages arrive within this after the heal (TCP RTO)
    prepare_s: float = 1.5  # a task's first prepare (compile) takes up to this


# --- what ran where ------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One run of an execution on a Spearlet (virtual times; `end` None while it runs)."""

    execution_id: str
    node_id: str
    incarnation: int
    start: float
    end: float | None = None
    #: how the function ended; None when it was cut (cancelled, or its node crashed)
    status: str | None = None


class RunTracker:
    """Every run of every execution, checked for I6 as each one starts."""

    def __init__(self, sim: DispatchSim) -> None:
        self._sim = sim
        self.runs: dict[str, list[Run]] = {}

    def start(self, execution_id: str, node_id: str, incarnation: int) -> Run:
        now = trio.current_time()
        runs = self.runs.setdefault(execution_id, [])
        for other in runs:
            if other.end is None:
                self._sim.fail(
                    "I6",
                    f"execution {execution_id} starts on {node_id} while it runs on "
                    f"{other.node_id} (incarnation {other.incarnation}) since t={other.start:.3f}",
                    known=self._sim.why_rerun(execution_id, node_id),
                )
        run = Run(execution_id, node_id, incarnation, now)
        runs.append(run)
        self._sim.changed()
        return run

    def end(self, run: Run, status: str | None) -> None:
        run.end = trio.current_time()
        run.status = status
        self._sim.changed()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a task's function behaves in the simulation, read from its `env`."""

    run_s: tuple[float, float] = (0.2, 3.0)
    fail_probability: float = 0.0

    @classmethod
    def of(cls, task: TaskRecord) -> Behaviour:
        env = task.spec.env
        low, _, high = env.get("SIM_RUN_S", "0.2-3.0").partition("-")
        return cls((float(low), float(high)), float(env.get("SIM_FAIL", "0")))

    def env(self) -> dict[str, str]:
        return {
            "SIM_RUN_S": f"{self.run_s[0]}-{self.run_s[1]}",
            "SIM_FAIL": str(self.fail_probability),
        }


class SimSpearlet:
    """A fake Spearlet (the duck type the FunctionService, Dispatcher and TaskService use).

    `execute` sleeps a seeded virtual time, then succeeds or fails per the task's `Behaviour`
    (or times out when that time exceeds the deadline); `cancel` stops it as the real one does
    (reason "lease" ends it as a `node_lost` failure, any other reason as cancelled).
    """

    def __init__(
        self, *, node_id: str, incarnation: int, rng: random.Random, sim: DispatchSim
    ) -> None:
        self.node_id = node_id
        self._incarnation = incarnation
        self._rng = rng
        self._sim = sim
        self._prepared: set[TaskId] = set()
        self._running: dict[ExecutionId, trio.CancelScope] = {}
        self._reasons: dict[ExecutionId, str] = {}
        self._outcomes: Counter[str] = Counter()

    def function_spec(self, task: TaskRecord) -> FunctionSpec:
        s = task.spec
        return FunctionSpec(
            task_id=task.task_id,
            name=s.name,
            runtime=s.runtime,
            mode=s.mode,
            artifact_path=None,
            artifact_sha256=None,
            command=tuple(s.command),
            image=None,
            env=dict(s.env),
            timeout_s=(s.timeout_ms or 30_000) / 1000,
            memory_limit_bytes=s.memory_limit_bytes or 128 << 20,
            max_output_bytes=1 << 20,
            max_log_bytes=1 << 20,
        )

    def offers(self, runtime: str) -> bool:
        return runtime == "process"

    def why_not(self, runtime: str) -> str:
        return f"runtime {runtime!r} is not simulated"

    async def prepare(self, task: TaskRecord) -> None:
        """The first prepare of a task takes a while (a compile), later ones nothing."""
        if task.task_id not in self._prepared:
            await trio.sleep(self._rng.uniform(0, self._sim.timings.prepare_s))
            self._prepared.add(task.task_id)

    def prewarm(self, task: TaskRecord) -> None:
        """Per-call tasks only: nothing to warm."""

    async def forget(self, task_id: TaskId) -> None:
        self._prepared.discard(task_id)

    async def execute(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        *,
        timeout_s: float | None = None,
        acquire_timeout_s: float | None = None,
    ) -> RunOutcome:
        if execution_id in self._running:
            raise ConflictError(f"execution {execution_id} is already running on this node")
        spec = self.function_spec(task)
        budget = spec.timeout_s if timeout_s is None else min(spec.timeout_s, timeout_s)
        behaviour = Behaviour.of(task)
        duration = self._rng.uniform(*behaviour.run_s)
        fails = self._rng.random() < behaviour.fail_probability
        run = self._sim.tracker.start(execution_id, self.node_id, self._incarnation)
        status: ExecStatus | None = None
        try:
            with trio.CancelScope() as scope:
                self._running[execution_id] = scope
                try:
                    await trio.sleep(min(duration, budget))
                    if duration > budget:
                        status = ExecStatus.TIMEOUT
                    else:
                        status = ExecStatus.FAILED if fails else ExecStatus.SUCCEEDED
                finally:
                    del self._running[execution_id]
        finally:
            self._sim.tracker.end(run, None if status is None else status.value)
        outcome = self._outcome(execution_id, status, data)
        self._outcomes[outcome.status.value] += 1
        return outcome

    def _outcome(
        self, execution_id: ExecutionId, status: ExecStatus | None, data: bytes
    ) -> RunOutcome:
        reason = self._reasons.pop(execution_id, None)
        if status is ExecStatus.SUCCEEDED:
            return RunOutcome(status=status, output=b"done:" + data)
        if status is ExecStatus.FAILED:
            return RunOutcome(
                status=status,
                error_code=ErrorCode.EXIT_NONZERO,
                error_message="the function failed (simulated)",
                exit_code=1,
            )
        if status is ExecStatus.TIMEOUT:
            return RunOutcome(
                status=status, error_code=ErrorCode.TIMEOUT, error_message="it timed out"
            )
        if reason == "lease":
            return RunOutcome(
                status=ExecStatus.FAILED,
                error_code=ErrorCode.NODE_LOST,
                error_message=f"node {self.node_id} lost contact with the leader and stopped it",
            )
        return RunOutcome(
            status=ExecStatus.CANCELLED,
            error_code=ErrorCode.CANCELLED,
            error_message="the execution was cancelled by request",
        )

    def cancel(self, execution_id: ExecutionId, *, reason: str = "request") -> bool:
        scope = self._running.get(execution_id)
        if scope is None:
            return False
        self._reasons[execution_id] = reason
        scope.cancel()
        return True

    def running_count(self) -> int:
        return len(self._running)

    def statistics(self) -> dict[str, Any]:
        return {"running": len(self._running), "outcomes": dict(self._outcomes), "pools": {}}


@dataclass(frozen=True, slots=True)
class DispatchSeen:
    """How a FunctionService answered one dispatch."""

    node_id: str
    incarnation: int
    attempt: int
    term: int
    arrived_at: float
    lease_left_s: float
    answer: str  # "accepted" or the refusal code


class ObservedFunctionService(FunctionService):
    """The real FunctionService, with the I7 check around every dispatch it answers."""

    def __init__(self, *, sim: DispatchSim, incarnation: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sim = sim
        self.incarnation = incarnation

    async def handle(self, dispatch: Dispatch) -> Answer:
        seen = self.fence.term
        lease_left_s = self.fence.lease_until - trio.current_time()
        answer = await super().handle(dispatch)
        self._sim.on_dispatch_answer(self, dispatch, seen, lease_left_s, answer)
        return answer


# --- the network ---------------------------------------------------------------------------


@dataclass(slots=True)
class NetCounters:
    requests: int = 0
    sends: int = 0
    dropped: int = 0
    cut: int = 0
    held: int = 0
    lost_in_crash: int = 0


class _Reply:
    """Where the answer of one request lands."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: object = None
        self.error: SpearError | None = None

    def set(self, value: object = None, error: SpearError | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()

    async def get(self) -> object:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DispatchNet:
    """Requests and one-way sends between the simulated nodes (see the module docstring).

    A request to a node that is down fails at once (`PeerUnreachableError`: connection refused,
    it certainly did not arrive); one whose node crashes before answering fails with
    `LinkClosedError`; a lost request or answer shows as `RequestTimeoutError` at the timeout;
    a refusal by the handler (a `SpearError`) comes back as `RemoteError` with its code.
    """

    def __init__(self, seed: int, sim: DispatchSim) -> None:
        self._seed = seed
        self._sim = sim
        self.latency = Latency()
        self.drop_probability = 0.0
        self._cuts: dict[tuple[str, str], PartitionMode] = {}
        self._healed = trio.Event()
        self._rngs: dict[tuple[str, str], random.Random] = {}
        self.counters = NetCounters()

    # --- faults --------------------------------------------------------------------------

    def cut(self, a: str, b: str, mode: PartitionMode) -> None:
        """Cut both directions between `a` and `b`."""
        self._cuts[(a, b)] = self._cuts[(b, a)] = mode

    def isolate(self, name: str, mode: PartitionMode) -> None:
        for other in self._sim.names:
            if other != name:
                self.cut(name, other, mode)

    def heal(self) -> None:
        """End every partition; held messages go on after a retransmission delay."""
        self._cuts.clear()
        self._healed.set()
        self._healed = trio.Event()

    def connected(self, a: str, b: str) -> bool:
        return a == b or ((a, b) not in self._cuts and (b, a) not in self._cuts)

    # --- carrying ------------------------------------------------------------------------

    def _rng(self, src: str, dst: str) -> random.Random:
        rng = self._rngs.get((src, dst))
        if rng is None:
            rng = self._rngs[(src, dst)] = random.Random(f"{self._seed}:dnet:{src}->{dst}")
        return rng

    async def _carry(self, src: str, dst: str) -> bool:
        """Move one message from `src` to `dst`: whether it arrived."""
        rng = self._rng(src, dst)
        if self.drop_probability and rng.random() < self.drop_probability:
            self.counters.dropped += 1
            return False
        await trio.sleep(self.latency.sample(rng))
        held = False
        while (mode := self._cuts.get((src, dst))) is not None:
            if mode == "drop":
                self.counters.cut += 1
                return False
            if not held:
                self.counters.held += 1
                held = True
            await self._healed.wait()
            await trio.sleep(rng.uniform(0, self._sim.timings.flush_s))
        return True

    async def request(self, node: SimNode, dst: str, message: object, timeout_s: float) -> object:
        """Send a request from `node` to `dst` and return the answer (see the class)."""
        if not node.alive:  # a crashed node's cleanup sends nothing
            raise LinkClosedError(f"node {node.name} is down")
        src = node.name
        self.counters.requests += 1
        target = self._sim.up(dst)
        if target is None:
            raise PeerUnreachableError(f"node {dst} refused the connection (it is down)")
        box = _Reply()
        self._sim.nursery.start_soon(self._request, src, target, message, box)
        with trio.move_on_after(timeout_s):
            return await box.get()
        raise RequestTimeoutError(
            f"{type(message).__name__} to {dst} got no answer within {timeout_s:g} s"
        )

    async def _request(self, src: str, target: SimNode, message: object, box: _Reply) -> None:
        if not await self._carry(src, target.name):
            return
        if not target.alive:
            self.counters.lost_in_crash += 1
            box.set(error=LinkClosedError(f"the link to {target.name} closed"))
            return
        target.nursery.start_soon(self._answer, src, target, message, box)

    async def _answer(self, src: str, target: SimNode, message: object, box: _Reply) -> None:
        answered = False
        value: object = None
        error: SpearError | None = None
        try:
            try:
                value = await target.answer(message)
            except RemoteError as exc:
                error = exc
            except SpearError as exc:
                error = RemoteError(str(exc), code=exc.code, peer_id=target.name)
            answered = True
        finally:
            if not answered:  # the node crashed while answering: its links break
                box.set(error=LinkClosedError(f"the link to {target.name} closed"))
        self._sim.nursery.start_soon(self._reply, target.name, src, box, value, error)

    async def _reply(
        self, src: str, dst: str, box: _Reply, value: object, error: SpearError | None
    ) -> None:
        if await self._carry(src, dst):
            box.set(value, error)

    def send(self, node: SimNode, dst: str, message: object) -> None:
        """One way from `node` to `dst`, best effort, never blocks."""
        self.counters.sends += 1
        target = self._sim.up(dst)
        if node.alive and target is not None:
            self._sim.nursery.start_soon(self._send, node.name, target, message)

    async def _send(self, src: str, target: SimNode, message: object) -> None:
        if await self._carry(src, target.name) and target.alive:
            target.on_message(message)


# --- one node ------------------------------------------------------------------------------


class SimNode:
    """One incarnation of one node: the real execution-plane parts and its Raft view."""

    def __init__(self, sim: DispatchSim, name: str, incarnation: int) -> None:
        timings = sim.timings
        self.sim = sim
        self.name = name
        self.incarnation = incarnation
        self.alive = True
        # Raft, as the model sees this node
        self.term = sim.persisted_terms.get(name, 0)
        self.leader_hint: str | None = None
        self.leads = False  # its Raft role is leader (in self.term)
        self.quorum_at = 0.0  # the last tick it reached a majority, while it leads
        self.heard_at = trio.current_time()
        self.election_timeout_s = sim.raft_rng.uniform(*timings.election_timeout_s)
        self.serving = False  # serve_async_workers has started (LeaderServices.service)
        self._serving_changed = trio.Event()
        self.lead_running = False
        self._lead_scope: trio.CancelScope | None = None
        self._leader_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.scope = trio.CancelScope()
        tag = f"{sim.seed}:{name}:{incarnation}"
        self._rng = random.Random(f"{tag}:commit")
        self.spearlet = SimSpearlet(
            node_id=name, incarnation=incarnation, rng=random.Random(f"{tag}:spearlet"), sim=sim
        )
        as_spearlet = cast(Spearlet, self.spearlet)  # duck-typed
        self.functions = ObservedFunctionService(
            sim=sim,
            incarnation=incarnation,
            spearlet=as_spearlet,
            deliver=self._deliver,
            ensure_file=_have_file,
        )
        self.dispatcher = Dispatcher(
            spearlet=as_spearlet,
            functions=self.functions,
            placer=Placer(rng=random.Random(f"{tag}:placer")),
            request=lambda dst, message, timeout_s: sim.net.request(self, dst, message, timeout_s),
            send=lambda dst, message: sim.net.send(self, dst, message),
            term=lambda: self.term,
            lease_s=timings.lease_s,
        )
        self.registry = NodeService(
            local=sim.members()[sim.names.index(name)].meta,
            state=sim.state,
            commit=self.commit,
            interval_s=timings.report_interval_s,
            members=sim.members,
            voters=lambda: sim.names,
            term=lambda: self.term,
        )
        self.feed = PlacementFeed(
            dispatcher=self.dispatcher, nodes=self.registry, state=sim.state, members=sim.members
        )
        self.service = TaskService(
            config=sim.sms_config,
            state=sim.state,
            spearlet=as_spearlet,
            functions=self.functions,
            dispatcher=self.dispatcher,
            artifacts=cast(ArtifactStore, None),  # the simulation uploads no files
            commit=self.commit,
            wall_clock=trio.current_time,
            rng=random.Random(f"{tag}:sms"),
        )
        self.dispatcher.on_term_start = self._on_term_start
        self._seq = int(trio.current_time() * 1000)  # above the seqs of earlier incarnations

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, f"{self.name} is not running"
        return self._nursery

    def taking(self) -> bool:
        """execution_plane's `taking_as_leader`: it serves as leader and holds quorum contact."""
        return (
            self.alive
            and self.leads
            and self.serving
            and trio.current_time() - self.quorum_at < self.sim.timings.check_quorum_s
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The node's life: its FunctionService, reports and view refresh (until it crashes)."""
        timings = self.sim.timings
        with self.scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.functions.serve)
                nursery.start_soon(self._refresh_views)
                await nursery.start(
                    lambda task_status: serve_reports(
                        interval_s=timings.report_interval_s,
                        make_report=lambda _: self._report(),
                        send=self._send_report,
                        on_ack=self._on_ack,
                        wake=self._leader_changed_wait,
                        task_status=task_status,
                    )
                )
                task_status.started()

    def crash(self) -> None:
        self.alive = False
        self.serving = False
        self.scope.cancel()

    # --- Raft, as the model drives it ----------------------------------------------------------

    def learn(self, term: int, leader: str) -> None:
        """A heartbeat (or vote) of `leader` in `term` reached this node."""
        if term < self.term:
            return
        if term > self.term:
            self.step_down()
            self.term = term
            self.sim.persisted_terms[self.name] = term
        self.heard_at = trio.current_time()
        if self.leader_hint != leader:
            self.leader_hint = leader
            self._leader_changed.set()
            self._leader_changed = trio.Event()

    def start_leading(self, term: int) -> None:
        self.term = term
        self.sim.persisted_terms[self.name] = term
        self.leads = True
        self.quorum_at = trio.current_time()
        self.learn(term, self.name)
        self._lead_scope = trio.CancelScope()
        self.lead_running = True
        self.nursery.start_soon(self._lead, self._lead_scope)

    def step_down(self) -> None:
        """Leadership lost: the leader's services stop at once (serve_leadership)."""
        if self.leads:
            self.leads = False
            self.serving = False
            if self._lead_scope is not None:
                self._lead_scope.cancel()
            self.sim.changed()

    async def _lead(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.service.serve_async_workers)
                    self._set_serving(True)
        finally:
            self._set_serving(False)
            self.lead_running = False

    async def commit(self, command: Command) -> None:
        """The Raft commit: a quorum round trip, then the command is applied (commit = apply).

        Raises:
            NotLeaderError: this node does not lead the newest term (or lost it meanwhile).
        """
        rng = self._rng
        while True:
            self._check_leads()
            if self.sim.reaches_quorum(self.name):
                break
            await trio.sleep(self.sim.timings.raft_tick_s)  # waits for quorum or a step-down
        await trio.sleep(rng.uniform(*self.sim.timings.quorum_rtt_s))
        self._check_leads()
        self.sim.on_commit(command)
        self.sim.state.apply(command)
        self.sim.changed()

    def _check_leads(self) -> None:
        if not (self.alive and self.leads and self.term == self.sim.term):
            raise NotLeaderError(
                f"node {self.name} does not lead term {self.sim.term}",
                leader_id=self.sim.leader,
            )

    # --- the execution plane (as execution_plane.serve_execution_plane wires it) -----------------

    def _report(self) -> NodeReport:
        self._seq += 1  # one counter for both senders, as execution_plane's next_seq
        return NodeReport(
            node_id=self.name,
            seq=self._seq,
            resources={"cpu_count": 1, "cpu_percent": 10.0},
            slots=self.sim.timings.slots,
            running=self.spearlet.running_count(),
            pools={},
            runtimes=("process",),
            lease_epoch=self.functions.fence.epoch,
        )

    async def _send_report(self, report: NodeReport) -> ReportAck:
        if self.taking():
            return self.feed.on_report(report, trio.current_time())
        leader = self.leader_hint
        if leader is None:
            raise UnavailableError("no leader is known to send the resource report to")
        interval_s = self.sim.timings.report_interval_s
        reply = await self.sim.net.request(self, leader, report, interval_s)
        if not isinstance(reply, ReportAck):
            raise SpearError(f"the leader answered a report with {type(reply).__name__}")
        return reply

    def _on_ack(self, ack: ReportAck, sent_at: float) -> None:
        self.functions.renew(ack.term, sent_at, self.sim.timings.lease_s)

    def _on_term_start(self) -> None:
        now = trio.current_time()
        self._on_ack(self.feed.on_report(self._report(), now), now)

    async def _leader_changed_wait(self) -> None:
        await self._leader_changed.wait()

    async def _deliver(self, result: ExecutionResult) -> ResultAck | None:
        if self.taking():
            return await self.service.on_result(result)
        leader = self.leader_hint
        if leader is None:
            return None
        timeout_s = self.sim.timings.result_timeout_s
        reply = await self.sim.net.request(self, leader, result, timeout_s)
        return reply if isinstance(reply, ResultAck) else None

    async def _refresh_views(self) -> None:
        while True:
            if not self.serving:
                await self._serving_changed.wait()
                continue
            self.feed.refresh(trio.current_time())
            await trio.sleep(self.sim.timings.refresh_s)

    def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        self._serving_changed.set()
        self._serving_changed = trio.Event()
        self.sim.changed()

    async def answer(self, message: object) -> object:
        """A request from another node (execution_plane's router)."""
        if isinstance(message, Dispatch):
            return await self.functions.handle(message)
        if isinstance(message, DispatchProbe):
            return self.functions.probe(message)
        if isinstance(message, NodeReport):
            if self.taking():
                return self.feed.on_report(message, trio.current_time())
            raise RemoteError(
                "this node does not lead; report to the leader",
                code="not_leader",
                peer_id=self.name,
            )
        if isinstance(message, ExecutionResult):
            ack = await self.service.on_result(message) if self.taking() else None
            if ack is None:
                raise RemoteError(
                    "this node does not take results now", code="not_leader", peer_id=self.name
                )
            return ack
        raise RemoteError(
            f"unexpected request {type(message).__name__}", code="bad_request", peer_id=self.name
        )

    def on_message(self, message: object) -> None:
        """A one-way message from another node."""
        if isinstance(message, DispatchCancel):
            self.functions.cancel(message)


async def _have_file(file_id: str) -> bool:
    return True  # the simulated tasks have no artifact


# --- the simulation ------------------------------------------------------------------------


class DispatchSim:
    """N simulated nodes, their network, the Raft model and the invariant checks.

    Args:
        seed: every random choice derives from it.
        nodes: how many nodes (named n1..nN; all voters and Spearlets).
        timings: the simulation's timings.
    """

    def __init__(self, seed: int, *, nodes: int = 3, timings: SimTimings | None = None) -> None:
        self.seed = seed
        self.timings = timings or SimTimings()
        self.rng = random.Random(f"{seed}:nemesis")
        #: the Raft model's own draws (election timeouts), apart from the scenario's
        self.raft_rng = random.Random(f"{seed}:raft")
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.state = SmsState(MemoryStore())
        self.sms_config = SmsConfig(spearlet_lease_ms=int(self.timings.lease_s * 1000))
        self.net = DispatchNet(seed, self)
        self.tracker = RunTracker(self)
        self.nodes: dict[str, SimNode | None] = dict.fromkeys(self.names)
        self.incarnations: Counter[str] = Counter()
        self.persisted_terms: dict[str, int] = {}
        self.term = 0
        self.leader: str | None = None
        self.leaders: list[tuple[float, int, str]] = []
        self.tasks: dict[TaskId, TaskRecord] = {}
        #: execution id -> its task, for every execution a client got accepted
        self.accepted: dict[ExecutionId, TaskId] = {}
        self.cancel_requested: set[ExecutionId] = set()
        #: the answers of the FunctionServices to every dispatch, by (execution id, attempt)
        self.dispatches: dict[tuple[str, int], list[DispatchSeen]] = {}
        #: dispatch answers by code ("accepted" or the refusal's)
        self.refusals: Counter[str] = Counter()
        #: (message, the known bug that explains it or None), in the order found
        self.violations: list[tuple[str, str | None]] = []
        self._members = [
            Member(
                meta=MemberMeta(node_id=name, name=name, mesh_address=f"{name}:7946"),
                state=MemberState.ALIVE,
                incarnation=0,
                state_changed_at=0.0,
            )
            for name in self.names
        ]
        self._changed = trio.Event()
        self._clients: list[trio.Event] = []
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the simulation is not running"
        return self._nursery

    def members(self) -> list[Member]:
        """The gossip view: every node alive (leases, not gossip, tell the leader who is gone)."""
        return self._members

    def up(self, name: str) -> SimNode | None:
        node = self.nodes[name]
        return node if node is not None and node.alive else None

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n is not None and n.alive]

    def serving_leader(self) -> SimNode | None:
        """The leader of the newest term, once it serves (what a client reaches)."""
        node = self.up(self.leader) if self.leader is not None else None
        return node if node is not None and node.taking() else None

    # --- checks ------------------------------------------------------------------------------

    def fail(self, rule: str, detail: str, *, known: str | None = None) -> None:
        """Record a violation and stop the run (spear's code may be the caller: no raise)."""
        message = f"{rule} broken at t={trio.current_time():.3f}: {detail} (seed {self.seed})"
        self.violations.append((message, known))
        self.nursery.cancel_scope.cancel()

    def raise_violation(self, cause: BaseException | None = None) -> None:
        """Raise the first violation found, if any (a KnownBug if a known bug explains it)."""
        if not self.violations:
            return
        message, known = self.violations[0]
        if known is not None:
            raise KnownBug(f"{message} [known bug {known}]", bugs=(known,)) from cause
        raise InvariantViolation(message) from cause

    def why_rerun(self, execution_id: str, node_id: str) -> str | None:
        """The known bug behind a run of a superseded attempt starting on `node_id`, if so."""
        record = self.state.execution(execution_id)
        seen = [
            d
            for (e, attempt), answers in self.dispatches.items()
            if e == execution_id
            for d in answers
            if d.node_id == node_id and d.answer == "accepted"
        ]
        if record is None or not seen:
            return None
        latest = max(seen, key=lambda d: d.arrived_at)
        return "stale-attempt-admitted" if latest.attempt < record.attempts else None

    def on_dispatch_answer(
        self,
        functions: ObservedFunctionService,
        dispatch: Dispatch,
        seen: int,
        lease_left_s: float,
        answer: Answer,
    ) -> None:
        """Check I7 and log the answer (`seen`, `lease_left_s`: the Fence's term and lease
        when the dispatch arrived)."""
        code = answer.code if isinstance(answer, DispatchRefused) else "accepted"
        self.refusals[code] += 1
        self.dispatches.setdefault((dispatch.execution_id, dispatch.attempt), []).append(
            DispatchSeen(
                node_id=functions.node_id,
                incarnation=functions.incarnation,
                attempt=dispatch.attempt,
                term=dispatch.term,
                arrived_at=trio.current_time(),
                lease_left_s=lease_left_s,
                answer=code,
            )
        )
        if code == "accepted" and dispatch.term < seen:
            self.fail(
                "I7",
                f"{functions.node_id} accepted {dispatch.execution_id} attempt "
                f"{dispatch.attempt} from term {dispatch.term} after it had seen term {seen}",
            )

    def on_commit(self, command: Command) -> None:
        if not isinstance(command, PutExecution):
            return
        record = command.record
        task = self.state.find_task(record.task_id)
        if task is not None and record.attempts > task.spec.retry.max_attempts:
            self.fail(
                "attempts",
                f"{record.execution_id} committed with {record.attempts} attempts, more than "
                f"retry.max_attempts = {task.spec.retry.max_attempts}",
            )

    def changed(self) -> None:
        """Something a `wait_for` condition may read changed."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until `predicate()` holds (re-checked on every change); fail at the bound."""
        with trio.move_on_after(timeout_s):
            while not predicate():
                await self._changed.wait()
            return
        raise LivenessViolation(f"liveness: {what} not within {timeout_s} s (seed {self.seed})")

    # --- nodes and Raft --------------------------------------------------------------------------

    async def start(self) -> None:
        for name in self.names:
            await self._boot(name)
        self.nursery.start_soon(self._raft)
        await self.wait_for(lambda: self.serving_leader() is not None, 30.0, "a first leader")

    async def _boot(self, name: str) -> None:
        self.incarnations[name] += 1
        node = SimNode(self, name, self.incarnations[name])
        self.nodes[name] = node
        await self.nursery.start(node.run)

    def crash(self, name: str) -> None:
        node = self.up(name)
        if node is not None:
            node.crash()
            self.changed()

    async def restart(self, name: str) -> None:
        if self.up(name) is None:
            await self._boot(name)

    def reaches_quorum(self, name: str) -> bool:
        reached = [n for n in self.up_nodes() if self.net.connected(name, n.name)]
        return len(reached) * 2 > len(self.names)

    async def _raft(self) -> None:
        while True:
            self._tick(trio.current_time())
            await trio.sleep(self.timings.raft_tick_s)

    def _tick(self, now: float) -> None:
        for node in self.up_nodes():
            if not node.leads:
                continue
            if self.reaches_quorum(node.name):
                node.quorum_at = now
            elif now - node.quorum_at >= self.timings.check_quorum_s:
                node.step_down()
                continue
            for other in self.up_nodes():
                if not self.net.connected(node.name, other.name):
                    continue
                if other.term > node.term and other.leader_hint is not None:
                    node.learn(other.term, other.leader_hint)  # its answer names a newer term
                    break
                other.learn(node.term, node.name)
        for node in self.up_nodes():
            if (
                not node.leads
                and not node.lead_running
                and now - node.heard_at > node.election_timeout_s
                and self.reaches_quorum(node.name)
            ):
                self.elect(node.name)
                return

    def elect(self, name: str) -> None:
        """`name` wins an election in a new term; the nodes it reaches learn it at once."""
        node = self.up(name)
        assert node is not None and not node.lead_running, f"{name} cannot lead now"
        self.term += 1
        self.leader = name
        self.leaders.append((trio.current_time(), self.term, name))
        node.start_leading(self.term)
        for other in self.up_nodes():
            if self.net.connected(name, other.name):
                other.learn(self.term, name)
                other.election_timeout_s = self.raft_rng.uniform(*self.timings.election_timeout_s)
        self.changed()

    def transfer_leadership(self) -> str | None:
        """Elect another node now (a leadership transfer); the old leader learns the new
        term at its next heartbeat and steps down. Returns the new leader, if any could be."""
        candidates = [
            n.name
            for n in self.up_nodes()
            if n.name != self.leader and not n.lead_running and self.reaches_quorum(n.name)
        ]
        if not candidates:
            return None
        chosen = self.rng.choice(candidates)
        self.elect(chosen)
        return chosen

    # --- tasks and clients -----------------------------------------------------------------------

    async def register(
        self, name: str, behaviour: Behaviour, retry: RetrySpec, *, timeout_ms: int = 30_000
    ) -> TaskRecord:
        spec = TaskSpec(
            name=name,
            runtime="process",
            command=["/bin/true"],
            env=behaviour.env(),
            timeout_ms=timeout_ms,
            retry=retry,
        )
        while True:
            await self.wait_for(lambda: self.serving_leader() is not None, 30.0, "a leader")
            leader = self.serving_leader()
            assert leader is not None
            try:
                record = await leader.service.register_task(spec)
            except ConflictError:
                found = self.state.find_task(name)
                assert found is not None
                record = found
            except UnavailableError:  # leadership moved meanwhile
                await trio.sleep(0.1)
                continue
            self.tasks[record.task_id] = record
            return record

    def start_client(
        self, task: TaskRecord, count: int, *, over_s: float, cancel_probability: float = 0.0
    ) -> None:
        """One client: `count` async invocations spread over about `over_s` virtual seconds,
        each retried with its idempotency key until accepted."""
        index = len(self._clients)
        done = trio.Event()
        self._clients.append(done)
        rng = random.Random(f"{self.seed}:client:{index}")
        self.nursery.start_soon(
            self._client, f"c{index}", task, count, over_s, cancel_probability, rng, done
        )

    async def _client(
        self,
        name: str,
        task: TaskRecord,
        count: int,
        over_s: float,
        cancel_probability: float,
        rng: random.Random,
        done: trio.Event,
    ) -> None:
        for i in range(count):
            await trio.sleep(rng.uniform(0, 2 * over_s / count))
            execution_id = await self._invoke(task, f"{name}-{i}", rng)
            if rng.random() < cancel_probability:
                self.nursery.start_soon(self._cancel, execution_id, rng.uniform(0, 3), rng)
        done.set()

    async def _invoke(self, task: TaskRecord, key: str, rng: random.Random) -> ExecutionId:
        while True:
            leader = self.serving_leader()
            if leader is None:
                await self._changed.wait()
                continue
            try:
                record, _ = await leader.service.invoke_async(
                    task.task_id, key.encode(), idempotency_key=key
                )
            except SpearError:
                await trio.sleep(rng.uniform(0.05, 0.3))
                continue
            self.accepted[record.execution_id] = task.task_id
            return record.execution_id

    async def _cancel(self, execution_id: ExecutionId, after_s: float, rng: random.Random) -> None:
        await trio.sleep(after_s)
        while True:
            leader = self.serving_leader()
            if leader is None:
                await self._changed.wait()
                continue
            self.cancel_requested.add(execution_id)
            try:
                await leader.service.cancel(execution_id)
            except ConflictError:
                return  # it had ended already
            except SpearError:
                await trio.sleep(rng.uniform(0.05, 0.3))
                continue
            return

    def running_now(self) -> list[Run]:
        return [r for runs in self.tracker.runs.values() for r in runs if r.end is None]

    # --- the end -----------------------------------------------------------------------------

    async def settle(self, *, bound_s: float = 60.0, restart: bool = True) -> None:
        """Heal every fault (restart the nodes that are down unless `restart` is False), then
        require, within `bound_s`: every client done, and every accepted execution terminal
        and consistent (see the module docstring)."""
        healed_at = trio.current_time()
        self.net.heal()
        self.net.drop_probability = 0.0
        self.net.latency = Latency()
        if restart:
            for name in self.names:
                await self.restart(name)
        settled = False
        with trio.move_on_after(bound_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_only_known_bugs_hold, nursery.cancel_scope)
                for done in self._clients:
                    await done.wait()
                await self.wait_for(self._all_terminal, bound_s, "every accepted execution ending")
                settled = True
                nursery.cancel_scope.cancel()
        if settled:
            self.check_final()
            return
        pending = sum(1 for d in self._clients if not d.is_set())
        stuck = self.unfinished()
        message = (
            f"liveness: not settled {trio.current_time() - healed_at:.0f} s after healing "
            f"(bound {bound_s:g} s; seed {self.seed}): "
            f"{pending} clients pending; {len(stuck)} unfinished: "
            + "; ".join(f"{what} [{bug or 'unexplained'}]" for what, bug in stuck[:8])
        )
        bugs = {bug for _, bug in stuck}
        if pending == 0 and None not in bugs:
            raise KnownBug(message, bugs=tuple(sorted(b for b in bugs if b is not None)))
        raise LivenessViolation(f"{message} | {self.summary()}")

    async def _stop_when_only_known_bugs_hold(self, scope: trio.CancelScope) -> None:
        """End the liveness wait early once every unfinished execution has been held by a
        known bug for KNOWN_STUCK_S (it never recovers from one: the rest of the bound would
        only cost wall time)."""
        since: float | None = None
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            stuck = self.unfinished()
            clients_done = all(done.is_set() for done in self._clients)
            if stuck and clients_done and all(bug is not None for _, bug in stuck):
                since = now if since is None else since
                if now - since >= KNOWN_STUCK_S:
                    scope.cancel()
                    return
            else:
                since = None

    def _all_terminal(self) -> bool:
        for execution_id in self.accepted:
            record = self.state.execution(execution_id)
            if record is None or not record.status.terminal:
                return False
        return True

    def unfinished(self) -> list[tuple[str, str | None]]:
        """Each accepted execution not ended: what it is, and the known bug that explains it."""
        stuck: list[tuple[str, str | None]] = []
        for execution_id in self.accepted:
            record = self.state.execution(execution_id)
            if record is None:
                stuck.append((f"{execution_id} lost (no record)", None))
            elif not record.status.terminal:
                what = (
                    f"{execution_id} {record.status.value} attempt {record.attempts} on "
                    f"{record.node_id} ({self.dispatch_story(execution_id)})"
                )
                stuck.append((what, self._why_stuck(record)))
        return stuck

    def _why_stuck(self, record: ExecutionRecord) -> str | None:
        """The known bug that keeps `record` running, or None."""
        node = self.up(record.node_id) if record.node_id is not None else None
        if record.status is not ExecStatus.RUNNING or node is None:
            return None
        if node.functions.holds(record.execution_id):
            return None
        return "orphaned-attempt"

    def dispatch_story(self, execution_id: str) -> str:
        """How the FunctionServices answered each attempt's dispatch (for a failure message)."""
        parts = [
            f"attempt {attempt}: "
            + ", ".join(
                f"{d.answer} by {d.node_id}#{d.incarnation} at {d.arrived_at:.2f}" for d in seen
            )
            for (e, attempt), seen in sorted(self.dispatches.items())
            if e == execution_id
        ]
        return "; ".join(parts) or "no dispatch arrived"

    def check_final(self) -> None:
        """Every accepted execution is stored, terminal and consistent with what ran."""
        for execution_id, task_id in self.accepted.items():
            record = self.state.execution(execution_id)
            if record is None:
                raise InvariantViolation(f"accepted execution {execution_id} was lost")
            task = self.tasks[task_id]
            problem = _final_problem(record, task.spec.retry, execution_id in self.cancel_requested)
            runs = self.tracker.runs.get(execution_id, [])
            if problem is None and len(runs) > task.spec.retry.max_attempts:
                problem = f"it ran {len(runs)} times: {_describe_runs(runs)}"
            ran_ok = any(r.node_id == record.node_id and r.status == "succeeded" for r in runs)
            if problem is None and record.status is ExecStatus.SUCCEEDED and not ran_ok:
                problem = f"succeeded on {record.node_id}, where no run succeeded"
            if problem is not None:
                raise InvariantViolation(
                    f"execution {execution_id} (seed {self.seed}): {problem}; record "
                    f"{record.status.value} attempts={record.attempts} "
                    f"dead_letter={record.dead_letter} history={list(record.history)}"
                )

    def summary(self) -> str:
        statuses = Counter(
            r.status.value if (r := self.state.execution(e)) is not None else "lost"
            for e in self.accepted
        )
        return (
            f"seed {self.seed}: {len(self.names)} nodes, {len(self.accepted)} accepted "
            f"{dict(statuses)}, terms {self.term}, refusals {dict(self.refusals)}, "
            f"net {self.net.counters}"
        )


def _final_problem(record: ExecutionRecord, retry: RetrySpec, cancel_asked: bool) -> str | None:
    """What is wrong with a settled execution's record, or None."""
    if not record.status.terminal:
        return "it has not ended"
    if record.attempts > retry.max_attempts:
        return f"{record.attempts} attempts, more than retry.max_attempts {retry.max_attempts}"
    numbers = [h.get("attempt") for h in record.history if "attempt" in h]
    if numbers != list(range(1, record.attempts + 1)):
        return f"its history numbers its attempts {numbers}"
    if record.status is ExecStatus.CANCELLED:
        return None if cancel_asked else "cancelled, but no client asked"
    if record.status is ExecStatus.SUCCEEDED:
        last = record.history[-1].get("status") if record.history else None
        return None if last == "succeeded" else f"succeeded, but its last attempt was {last}"
    if not record.dead_letter:
        return f"{record.status.value} without being dead-lettered"
    expired = (record.error or {}).get("code") == ErrorCode.EXPIRED.value
    if record.attempts != retry.max_attempts and not expired:
        return f"dead-lettered after {record.attempts} of {retry.max_attempts} attempts"
    return None


def _describe_runs(runs: list[Run]) -> str:
    return ", ".join(
        f"{r.node_id}#{r.incarnation} {r.start:.2f}-{r.end if r.end is None else round(r.end, 2)}"
        f" {r.status}"
        for r in runs
    )


# --- determinism ---------------------------------------------------------------------------


@contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    real = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, real)


async def _inline_run_sync(fn: Callable[..., T], *args: Any, **_: Any) -> T:
    """`trio.to_thread.run_sync` for the simulation: the call runs inline, so virtual time
    cannot move while it runs (the store calls it wraps are in-memory)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Inline thread calls and counter-made ids (see the module docstring)."""
    executions = itertools.count(1)
    tasks = itertools.count(1)

    def execution_id(now_s: float) -> ExecutionId:
        return ExecutionId(f"ex-{int(now_s * 1000) & 0xFFFFFFFFFFFF:012x}{next(executions):08x}")

    def task_id() -> TaskId:
        return TaskId(f"tk-{seed & 0xFFFFFFFF:08x}{next(tasks):08x}")

    with (
        _patched(trio.to_thread, "run_sync", _inline_run_sync),
        _patched(sms_module, "new_execution_id", execution_id),
        _patched(sms_module, "new_task_id", task_id),
    ):
        yield


@asynccontextmanager
async def open_dispatch_sim(seed: int, **kwargs: Any) -> AsyncIterator[DispatchSim]:
    """Run a DispatchSim for the body of the `async with`; a violation found meanwhile stops
    the body and is raised as `InvariantViolation`."""
    sim = DispatchSim(seed, **kwargs)
    with deterministic(seed):
        try:
            async with trio.open_nursery() as nursery:
                sim._nursery = nursery
                await sim.start()
                yield sim
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            sim.raise_violation(group)
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
    sim.raise_violation()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out
