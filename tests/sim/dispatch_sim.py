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

The parts live in their own modules: the fake Spearlet and the observed FunctionService in
`dispatch_spearlet`, the network in `dispatch_net`, one node in `dispatch_node`, the
replayability stand-ins in `dispatch_determinism`; this module holds the simulation itself
(the Raft model, the clients, the invariant checks and `settle`).

Two process-wide stand-ins keep a seed replayable: `trio.to_thread.run_sync` runs inline (a
real thread lets the autojump clock move while it runs), and the TaskService's execution and
task ids come from a counter instead of `secrets`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import trio

from spear.config import SmsConfig
from spear.errors import ConflictError, SpearError, UnavailableError
from spear.mesh import (
    Member,
    MemberMeta,
    MemberState,
)
from spear.model import (
    ErrorCode,
    ExecStatus,
    ExecutionId,
    ExecutionRecord,
    RetrySpec,
    TaskId,
    TaskRecord,
    TaskSpec,
)
from spear.roles import SmsState
from spear.roles.dispatch import (
    Dispatch,
    DispatchRefused,
)
from spear.roles.function_service import Answer
from spear.roles.state import Command, PutExecution
from spear.store.memory import MemoryStore
from tests.sim.dispatch_determinism import deterministic
from tests.sim.dispatch_net import DispatchNet
from tests.sim.dispatch_node import SimNode
from tests.sim.dispatch_spearlet import (
    Behaviour,
    DispatchSeen,
    ObservedFunctionService,
    Run,
    RunTracker,
)
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
