"""The node registry (the SMS NodeService, DESIGN.md section 4): resource reports, status, drain.

Every node, a lone one too, runs `serve_reports`: every `node.report_interval_ms` it sends the
leader a NodeReport (its host metrics, execution slots, running executions and instance
pools) and gets a ReportAck with the leader's term. The leader's NodeService keeps the last
report of each node and, with the gossip view and the drained set of the replicated state,
answers `GET /api/v1/nodes`, `/api/v1/nodes/{node}` and `/api/v1/resources`. The leader
reports to itself with a local call, not a message.

A member's status, as the leader sees it (`interval` is node.report_interval_ms):

    online   gossip says alive and its last report is at most ONLINE_INTERVALS old
    suspect  gossip says suspect, or it is alive and its report is late (or has not come yet)
    offline  gossip says dead or left, or nothing was heard from it for OFFLINE_INTERVALS

`draining` is separate: a drained node is given no new work while its running work finishes.
Drain is a replicated command (DrainNode), so a new leader keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from spear.errors import NotFoundError, SpearError, UnavailableError, WireError
from spear.host import Metric
from spear.mesh import Inbound, Member, MemberMeta, MemberState
from spear.roles.state import Command, DrainNode, SmsState

log = logging.getLogger(__name__)

#: a report this many intervals old still counts as current (online)
ONLINE_INTERVALS = 3
#: a node not heard from for this many intervals is offline, whatever gossip says
OFFLINE_INTERVALS = 10
#: the gauges of each instance pool in a report, summed per runtime in /api/v1/resources
POOL_GAUGES = ("instances", "idle", "busy", "waiting", "max_instances")
#: executions a node runs at once when node.max_running is 0, per CPU
SLOTS_PER_CPU = 8
#: reports woken early go at most this many times per interval
WAKE_SPACING = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeReport:
    """A node's resource report (request, to the leader, every node.report_interval_ms).

    Attributes:
        seq: increases with every report; a restarted node starts above its earlier runs.
        resources: HostMetrics.sample(): cpu_count, cpu_percent, memory, disk, load, platform.
        slots: executions the node runs at once (node.max_running resolved).
        running: executions running on the node now.
        pools: task_id -> the pool's gauges (POOL_GAUGES).
        runtimes: the runtimes the node offers.
    """

    node_id: str
    seq: int
    resources: dict[str, Metric]
    slots: int
    running: int
    pools: dict[str, dict[str, int]]
    runtimes: tuple[str, ...]
    lease_epoch: int = 0  # the epoch of the dispatch lease the node holds (spear.roles.dispatch)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportAck:
    """The leader's answer to a NodeReport."""

    term: int
    leader_id: str


#: append-only wire tags
NODE_MESSAGES: dict[str, type] = {"node.report": NodeReport, "node.report_ack": ReportAck}


def resolve_slots(max_running: int, cpu_count: int) -> int:
    """node.max_running, where 0 means SLOTS_PER_CPU per CPU."""
    return max_running if max_running > 0 else SLOTS_PER_CPU * max(cpu_count, 1)


def pool_gauges(pools: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """A report's `pools` from the Spearlet's pool statistics (`{task_id: {gauge: n, ...}}`):
    only POOL_GAUGES, as ints (a gauge the statistics lack is 0)."""
    return {
        task_id: {
            gauge: value if isinstance(value := stats.get(gauge), int) else 0
            for gauge in POOL_GAUGES
        }
        for task_id, stats in pools.items()
    }


@dataclass(frozen=True, slots=True)
class _Received:
    report: NodeReport
    at: float


class NodeService:
    """The leader's node registry; one per node for its life (it answers only while leading).

    No clock inside: time is the caller's `now` (trio's clock, so that the status rules run
    under a test's explicit times), and changes go through the `commit` callable.
    """

    def __init__(
        self,
        *,
        local: MemberMeta,
        state: SmsState,
        commit: Callable[[Command], Awaitable[None]],
        interval_s: float,
        members: Callable[[], Sequence[Member]] | None = None,
        voters: Callable[[], Collection[str]] | None = None,
        term: Callable[[], int] | None = None,
    ) -> None:
        """
        Args:
            local: this node's gossip metadata (for a node with no mesh, its only member).
            state: the replicated state: its drained set, and each pool's task runtime.
            commit: makes a command durable and applies it (on a cluster node the Raft
                driver's `commit`).
            interval_s: node.report_interval_ms in seconds.
            members: the gossip view (GossipDriver.members); default: this node alone.
            voters: the Raft voters; default: this node alone.
            term: the Raft term answered in each ReportAck; default: always 1.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.node_id = local.node_id
        self._alone = (
            Member(meta=local, state=MemberState.ALIVE, incarnation=0, state_changed_at=0),
        )
        self._state = state
        self._commit = commit
        self._interval_s = interval_s
        self._members = members or (lambda: self._alone)
        self._voters = voters or (lambda: (self.node_id,))
        self._term = term or (lambda: 1)
        self._reports: dict[str, _Received] = {}
        self._first_seen: dict[str, float] = {}

    # --- reports -----------------------------------------------------------------------------

    def on_report(self, report: NodeReport, now: float) -> ReportAck:
        """Take a node's report (a duplicate or an older one is ignored); answer the ack."""
        last = self._reports.get(report.node_id)
        # A seq not above the last one is a late duplicate, unless the reports of that run
        # stopped long ago (the node restarted with a seq it should not have used).
        if (
            last is None
            or report.seq > last.report.seq
            or now - last.at > ONLINE_INTERVALS * self._interval_s
        ):
            self._reports[report.node_id] = _Received(report, now)
        if len(self._reports) > 2 * len(self._members()) + 16:
            self._forget_non_members()
        return ReportAck(term=self._term(), leader_id=self.node_id)

    def report_of(self, node_id: str) -> tuple[NodeReport, float] | None:
        """A node's last report and when it came (`now` of on_report), or None."""
        received = self._reports.get(node_id)
        return None if received is None else (received.report, received.at)

    def _forget_non_members(self) -> None:
        known = {m.node_id for m in self._members()}
        for node_id in [n for n in self._reports if n not in known]:
            del self._reports[node_id]
            self._first_seen.pop(node_id, None)

    # --- status ------------------------------------------------------------------------------

    def status_of(self, member: Member, now: float) -> str:
        """online, suspect or offline (see the module docstring)."""
        if member.state in (MemberState.DEAD, MemberState.LEFT):
            return "offline"
        received = self._reports.get(member.node_id)
        heard_at = received.at if received else self._first_seen.setdefault(member.node_id, now)
        age_s = now - heard_at
        if age_s > OFFLINE_INTERVALS * self._interval_s:
            return "offline"
        if member.state is MemberState.SUSPECT or received is None:
            return "suspect"
        return "online" if age_s <= ONLINE_INTERVALS * self._interval_s else "suspect"

    def is_drained(self, node_id: str) -> bool:
        return node_id in self._state.drained()

    def resolve(self, ref: str) -> Member:
        """A member by node id or by name.

        Raises:
            NotFoundError: no member has that id or name.
        """
        members = self._members()
        for member in members:
            if member.node_id == ref:
                return member
        named = [m for m in members if m.meta.name == ref]
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(m.node_id for m in named)
            raise NotFoundError(f"{len(named)} nodes are named {ref!r} ({ids}); give a node id")
        raise NotFoundError(
            f"node {ref!r} is not a member of this cluster (give a node id or name)"
        )

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, ref: str, enable: bool = True) -> str:
        """Stop (enable) or resume placing new work on a node; return its node id once the
        change is committed.

        Raises:
            NotFoundError: no member has that id or name.
        """
        node_id = self.resolve(ref).node_id
        if self.is_drained(node_id) != enable:
            await self._commit(DrainNode(node_id=node_id, draining=enable))
        return node_id

    # --- documents -----------------------------------------------------------------------------

    def nodes(self, now: float) -> dict[str, Any]:
        """The `GET /api/v1/nodes` document."""
        return {"nodes": [self._doc(m, now) for m in self._members()]}

    def node(self, ref: str, now: float) -> dict[str, Any]:
        """One node's document, by id or name (NotFoundError if it is not a member)."""
        return self._doc(self.resolve(ref), now)

    def resources(self, now: float) -> dict[str, Any]:
        """The `GET /api/v1/resources` document: each reporting node's resources and pool
        capacity per runtime, and the totals of the nodes that are not offline."""
        items: list[dict[str, Any]] = []
        totals: dict[str, Any] = dict.fromkeys(
            ("nodes", "cpu_count", "memory_total_bytes", "memory_available_bytes"), 0
        )
        totals |= {"running": 0, "slots": 0, "capacity": {}}
        for member in self._members():
            received = self._reports.get(member.node_id)
            if received is None:
                continue
            report, status = received.report, self.status_of(member, now)
            capacity = self._capacity(report.pools)
            items.append(
                {
                    "node_id": member.node_id,
                    "name": member.meta.name,
                    "status": status,
                    "draining": self.is_drained(member.node_id),
                    "report_age_ms": _age_ms(now, received.at),
                    "running": report.running,
                    "slots": report.slots,
                    **report.resources,
                    "pools": report.pools,
                    "capacity": capacity,
                }
            )
            if status != "offline":
                _add_totals(totals, report, capacity)
        return {"resources": items, "totals": totals}

    def _doc(self, member: Member, now: float) -> dict[str, Any]:
        meta, received = member.meta, self._reports.get(member.node_id)
        report = received.report if received else None
        return {
            "node_id": member.node_id,
            "name": meta.name,
            "status": self.status_of(member, now),
            "state": member.state.value,
            "draining": self.is_drained(member.node_id),
            "voter": member.node_id in self._voters(),
            "leader": member.node_id == self.node_id,
            "http_address": meta.http_address,
            "mesh_address": meta.mesh_address,
            "labels": dict(meta.labels),
            "runtimes": list(report.runtimes if report else meta.runtimes),
            "running": report.running if report else None,
            "slots": report.slots if report else None,
            "resources": dict(report.resources) if report else None,
            "pools": report.pools if report else {},
            "report_age_ms": _age_ms(now, received.at) if received else None,
        }

    def _capacity(self, pools: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
        """The pools' gauges summed per runtime (a pool of a task unknown here is skipped)."""
        capacity: dict[str, dict[str, int]] = {}
        for task_id, gauges in pools.items():
            task = self._state.find_task(task_id)
            if task is None:
                continue
            sums = capacity.setdefault(task.spec.runtime, dict.fromkeys(POOL_GAUGES, 0))
            for gauge in POOL_GAUGES:
                sums[gauge] += gauges.get(gauge, 0)
        return capacity

    # --- the mesh ----------------------------------------------------------------------------


def _age_ms(now: float, at: float) -> float:
    return round(max(now - at, 0.0) * 1000, 1)


def _add_totals(totals: dict[str, Any], report: NodeReport, capacity: Mapping[str, Any]) -> None:
    totals["nodes"] += 1
    totals["running"] += report.running
    totals["slots"] += report.slots
    for key in ("cpu_count", "memory_total_bytes", "memory_available_bytes"):
        value = report.resources.get(key)
        if isinstance(value, int):
            totals[key] += value
    for runtime, gauges in capacity.items():
        sums = totals["capacity"].setdefault(runtime, dict.fromkeys(POOL_GAUGES, 0))
        for gauge in POOL_GAUGES:
            sums[gauge] += gauges[gauge]


# --- sending and taking reports ------------------------------------------------------------


class ReportTaker(Protocol):
    """What takes a report on the leader: the NodeService, or what feeds placement too."""

    def on_report(self, report: NodeReport, now: float) -> ReportAck: ...


async def answer_report(inbound: Inbound, taker: ReportTaker, *, leading: bool, now: float) -> bool:
    """Answer a NodeReport from a peer; False if the message is not one.

    A node that does not lead refuses it ("not_leader"): the sender learns the leader from
    gossip and Raft and sends its next report there.
    """
    message = inbound.message
    if not isinstance(message, NodeReport):
        return False
    if inbound.reply is None:
        return True
    if not leading:
        inbound.reply.fail_nowait("not_leader", "this node does not lead; report to the leader")
        return True
    await inbound.reply.send(taker.on_report(message, now))
    return True


class RequestTransport(Protocol):
    """What the report sender asks of the mesh transport (spear.mesh.Transport)."""

    async def request(self, address: str, message: object, *, timeout_s: float) -> Any: ...


def report_sender(
    *,
    registry: ReportTaker,
    leads: Callable[[], bool],
    leader_address: Callable[[], str | None],
    transport: RequestTransport | None,
    timeout_s: float,
) -> Callable[[NodeReport], Awaitable[ReportAck]]:
    """The `send` of serve_reports: a local call while this node leads, else a mesh request
    to the leader.

    Args:
        leads: whether this node leads now.
        leader_address: the mesh address of the leader (None while none is known).
        transport: the mesh transport (None for a node with no mesh: it always leads).
        timeout_s: the longest one request may take (at most the report interval).
    """

    async def send(report: NodeReport) -> ReportAck:
        if leads():
            return registry.on_report(report, trio.current_time())
        address = leader_address()
        if address is None or transport is None:
            raise UnavailableError("no leader is known to send the resource report to")
        reply = await transport.request(address, report, timeout_s=timeout_s)
        if not isinstance(reply, ReportAck):
            raise WireError(f"the leader answered a resource report with {type(reply).__name__}")
        return reply

    return send


async def serve_reports(
    *,
    interval_s: float,
    make_report: Callable[[int], NodeReport],
    send: Callable[[NodeReport], Awaitable[ReportAck]],
    on_ack: Callable[[ReportAck, float], None] | None = None,
    first_seq: int = 1,
    wake: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a report every `interval_s` until cancelled, the first one at once.

    Args:
        make_report: builds the report with the seq given (first_seq, then one more each
            time); a caller that numbers its reports itself may ignore it.
        send: delivers it and returns the leader's ack (see report_sender).
        on_ack: called with each ack and the trio time its report was sent.
        first_seq: the first report's seq; above every seq of the node's earlier runs.
        wake: returns when a report should go at once instead of at the next interval (a
            new leader: it learns every node's resources without waiting an interval).

    An attempt that fails (no leader, a broken link, a refusal) is logged at debug level and
    the next interval (or wake) tries again; no attempt runs longer than one interval.
    """
    wait_for_wake = wake or trio.sleep_forever
    task_status.started()
    seq = first_seq
    while True:
        sent_at = trio.current_time()
        report = make_report(seq)
        seq += 1
        with trio.move_on_at(sent_at + interval_s) as attempt:
            try:
                ack = await send(report)
            except SpearError as exc:
                log.debug("resource report %d was not delivered: %s", report.seq, exc)
            else:
                if on_ack is not None:
                    on_ack(ack, sent_at)
        if attempt.cancelled_caught:
            log.debug("resource report %d got no answer within %.3f s", report.seq, interval_s)
        with trio.move_on_at(sent_at + interval_s):
            await wait_for_wake()
            # A wake that keeps firing must not turn the loop into a flood of reports.
            await trio.sleep_until(sent_at + interval_s / WAKE_SPACING)
