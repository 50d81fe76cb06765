"""One node of DispatchSim: one incarnation of the real execution-plane parts and its view
of the Raft model (see tests.sim.dispatch_sim)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, TypeVar, cast

import trio

from spear.errors import SpearError, UnavailableError
from spear.mesh import (
    NotLeaderError,
    RemoteError,
)
from spear.roles import ArtifactStore, Spearlet, TaskService
from spear.roles.dispatch import (
    Dispatch,
    DispatchCancel,
    DispatchProbe,
    ExecutionResult,
    ResultAck,
)
from spear.roles.dispatcher import Dispatcher
from spear.roles.nodes import NodeReport, NodeService, ReportAck, serve_reports
from spear.roles.placement import Placer
from spear.roles.placement_feed import PlacementFeed
from spear.roles.state import Command
from tests.sim.dispatch_spearlet import ObservedFunctionService, SimSpearlet

if TYPE_CHECKING:
    from tests.sim.dispatch_sim import DispatchSim

T = TypeVar("T")


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
