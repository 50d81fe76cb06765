"""The execution plane of a node: its FunctionService, resource reports, and (while it leads)
the registry, placement and dispatch of the whole cluster's invocations.

`serve_execution_plane` runs on every node beside the mesh role:

- the FunctionService, which runs what leaders dispatch here and delivers async results to
  whichever node leads;
- the report loop: every `node.report_interval_ms` a NodeReport goes to the leader (a local
  call on the leader itself); each ack renews this Spearlet's lease;
- the router of the mesh messages of both: reports and results are taken only while this
  node leads and may answer as leader (a leader paused past its check-quorum window acks
  nothing, so it renews no lease it could not stand behind);
- on the leader, the refresh of the placer's views as gossip and leases change;
- the direct path of sync invocations a follower receives: the follower's side
  (`DirectInvoke`, attached to the node's forwarding app) and the leader's (`SyncDesk`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from spear.config import Config
from spear.host import HostMetrics
from spear.mesh import Inbound
from spear.roles.cluster import ClusterHandle
from spear.roles.direct_invoke import DirectInvoke
from spear.roles.direct_sync import SyncDesk
from spear.roles.dispatch import (
    DISPATCH_MESSAGES,
    SYNC_DIRECT,
    Dispatch,
    DispatchCancel,
    DispatchProbe,
    DispatchRefused,
    ExecutionResult,
    ResultAck,
    SyncOutcome,
    SyncPlace,
    SyncPlaced,
    SyncRun,
    SyncWithdraw,
)
from spear.roles.dispatcher import REPLY_GRACE_S, Dispatcher
from spear.roles.function_service import FunctionService
from spear.roles.leadership import LeaderServices
from spear.roles.nodes import (
    NODE_MESSAGES,
    NodeReport,
    NodeService,
    ReportAck,
    answer_report,
    pool_gauges,
    report_sender,
    resolve_slots,
    serve_reports,
)
from spear.roles.placement import Placer
from spear.roles.placement_feed import PlacementFeed
from spear.roles.spearlet import Spearlet
from spear.roles.state import Command, SmsState

log = logging.getLogger(__name__)

#: the mesh messages of the execution plane (given to serve_cluster)
PLANE_MESSAGES: dict[str, type] = {**NODE_MESSAGES, **DISPATCH_MESSAGES}
#: how long a Spearlet waits for the leader to take a result before offering it again
RESULT_TIMEOUT_S = 5.0
#: how often the leader rebuilds its placement views (leases run out between reports)
REFRESH_S = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionPlane:
    functions: FunctionService
    dispatcher: Dispatcher
    nodes: NodeService
    feed: PlacementFeed
    desk: SyncDesk
    direct: DirectInvoke


def build_execution_plane(
    config: Config,
    *,
    mesh: ClusterHandle,
    spearlet: Spearlet,
    state: SmsState,
    leader: LeaderServices,
) -> ExecutionPlane:
    """The plane's parts, wired to each other (started by `serve_execution_plane`)."""
    node_id = spearlet.node_id
    replicator = mesh.replicator
    taking_as_leader = partial(_takes_as_leader, leader, mesh)

    async def deliver(result: ExecutionResult) -> ResultAck | None:
        if taking_as_leader():
            assert leader.service is not None
            return await leader.service.on_result(result)
        address = mesh.leader_mesh()
        if address is None:
            return None
        reply = await mesh.transport.request(address, result, timeout_s=RESULT_TIMEOUT_S)
        return reply if isinstance(reply, ResultAck) else None

    functions = FunctionService(spearlet=spearlet, deliver=deliver, ensure_file=mesh.ensure_file)
    dispatcher = Dispatcher(
        spearlet=spearlet,
        functions=functions,
        placer=Placer(rng=random.Random()),
        request=mesh.request,
        send=mesh.send,
        term=lambda: replicator.soft_state.term,
        lease_s=config.sms.spearlet_lease_ms / 1000,
    )
    local = mesh.gossip.member(node_id)
    assert local is not None

    async def commit(command: Command) -> None:
        await replicator.commit(command)
        feed.refresh(trio.current_time())  # a drain takes effect on the next placement

    nodes = NodeService(
        local=local.meta,
        state=state,
        commit=commit,
        interval_s=config.node.report_interval_ms / 1000,
        members=mesh.gossip.members,
        voters=lambda: replicator.core.voters,
        term=lambda: replicator.soft_state.term,
    )
    feed = PlacementFeed(
        dispatcher=dispatcher, nodes=nodes, state=state, members=mesh.gossip.members
    )

    def speaks_direct(node_id: str) -> bool:
        member = mesh.gossip.member(node_id)
        return member is not None and SYNC_DIRECT in member.meta.features

    direct = DirectInvoke(
        functions=functions,
        request=mesh.request,
        send=mesh.send,
        leader_id=lambda: replicator.soft_state.leader_id,
        speaks_direct=speaks_direct,
        term=lambda: replicator.soft_state.term,
        max_body_bytes=config.gateway.max_invoke_body_bytes,
        place_timeout_s=config.runtimes.max_timeout_ms / 1000 + REPLY_GRACE_S,
    )
    return ExecutionPlane(
        functions=functions,
        dispatcher=dispatcher,
        nodes=nodes,
        feed=feed,
        desk=SyncDesk(dispatcher=dispatcher),
        direct=direct,
    )


async def serve_execution_plane(
    config: Config,
    plane: ExecutionPlane,
    *,
    mesh: ClusterHandle,
    spearlet: Spearlet,
    host: HostMetrics,
    runtimes: tuple[str, ...],
    leader: LeaderServices,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the execution plane until cancelled (see the module docstring)."""
    lease_s = config.sms.spearlet_lease_ms / 1000
    interval_s = config.node.report_interval_ms / 1000
    functions, feed = plane.functions, plane.feed
    taking_as_leader = partial(_takes_as_leader, leader, mesh)

    def make_report(seq: int) -> NodeReport:
        resources = host.sample()
        cpu_count = resources.get("cpu_count")
        return NodeReport(
            node_id=spearlet.node_id,
            seq=seq,
            resources=resources,
            slots=resolve_slots(
                config.node.max_running, cpu_count if isinstance(cpu_count, int) else 1
            ),
            running=spearlet.running_count(),
            pools=pool_gauges(spearlet.statistics()["pools"]),
            runtimes=runtimes,
            lease_epoch=functions.fence.epoch,
        )

    # above every seq of this node's earlier runs: the incarnation rises at every start
    seq = [mesh.incarnation]

    def next_seq() -> int:
        seq[0] += 1
        return seq[0]

    send = report_sender(
        registry=feed,
        leads=taking_as_leader,
        leader_address=mesh.leader_mesh,
        transport=mesh.transport,
        timeout_s=interval_s,
    )

    def on_ack(ack: ReportAck, sent_at: float) -> None:
        functions.renew(ack.term, sent_at, lease_s)

    def on_term_start() -> None:
        plane.desk.reset()
        # The new leader hears itself at once: its own Spearlet is placeable before the
        # first interval, and holds a lease for async work.
        now = trio.current_time()
        on_ack(feed.on_report(make_report(next_seq()), now), now)
        feed.refresh(now)  # every other node: no lease until it reports to this term

    plane.dispatcher.on_term_start = on_term_start

    async def wake() -> None:
        await leader.wait_change()

    async with trio.open_nursery() as nursery:
        await nursery.start(functions.serve)
        nursery.start_soon(_route, mesh.app_inbound, plane, leader, taking_as_leader, nursery)
        nursery.start_soon(_refresh_views, plane, leader)
        nursery.start_soon(plane.desk.watch_origins, lambda: leader.service)
        await nursery.start(
            lambda task_status: serve_reports(
                interval_s=interval_s,
                make_report=lambda _: make_report(next_seq()),
                send=send,
                on_ack=on_ack,
                wake=wake,
                task_status=task_status,
            )
        )
        task_status.started()


def _takes_as_leader(leader: LeaderServices, mesh: ClusterHandle) -> bool:
    """Whether this node may take reports and results as leader now (it serves, and a pause
    past its check-quorum window has not made that stale)."""
    return leader.service is not None and mesh.replicator.leads_now()


async def _route(
    inbound_channel: trio.MemoryReceiveChannel[Inbound],
    plane: ExecutionPlane,
    leader: LeaderServices,
    taking_as_leader: Callable[[], bool],
    nursery: trio.Nursery,
) -> None:
    async for inbound in inbound_channel:
        message = inbound.message
        reply = inbound.reply
        if isinstance(message, DispatchCancel):
            plane.functions.cancel(message)
        elif isinstance(message, DispatchProbe) and reply is not None:
            await reply.send(plane.functions.probe(message))
        elif isinstance(message, SyncWithdraw):
            if leader.service is not None and taking_as_leader():
                plane.desk.withdraw_placement(leader.service, message)
        elif reply is None:
            continue
        elif isinstance(message, Dispatch):
            nursery.start_soon(_answer_dispatch, plane.functions, message, inbound)
        elif isinstance(message, NodeReport):
            now = trio.current_time()
            await answer_report(inbound, plane.feed, leading=taking_as_leader(), now=now)
        elif isinstance(message, ExecutionResult):
            nursery.start_soon(_answer_result, leader, message, inbound, taking_as_leader)
        elif isinstance(message, SyncPlace | SyncRun | SyncOutcome):
            nursery.start_soon(_answer_sync, plane.desk, leader, message, inbound, taking_as_leader)


async def _answer_dispatch(functions: FunctionService, message: Dispatch, inbound: Inbound) -> None:
    assert inbound.reply is not None
    await inbound.reply.send(await functions.handle(message))


async def _answer_result(
    leader: LeaderServices,
    message: ExecutionResult,
    inbound: Inbound,
    taking_as_leader: Callable[[], bool],
) -> None:
    assert inbound.reply is not None
    ack = None
    service = leader.service
    if service is not None and taking_as_leader():
        ack = await service.on_result(message)
    if ack is None:
        inbound.reply.fail_nowait("not_leader", "this node does not take results now")
    else:
        await inbound.reply.send(ack)


async def _answer_sync(
    desk: SyncDesk,
    leader: LeaderServices,
    message: SyncPlace | SyncRun | SyncOutcome,
    inbound: Inbound,
    taking_as_leader: Callable[[], bool],
) -> None:
    """A follower's sync invocation: place it, or record how it ended (as leader only)."""
    assert inbound.reply is not None
    service = leader.service
    if service is None or not taking_as_leader():
        execution_id = message.execution_id
        refused = DispatchRefused(
            execution_id=execution_id,
            code="unavailable",
            message="this node does not lead now; retry shortly",
            retry_after_s=1.0,
        )
        await inbound.reply.send(refused)
    elif isinstance(message, SyncPlace):
        responder = inbound.reply
        answer = await desk.place(service, message, inbound.peer_id, lambda: responder.cancelled)
        if isinstance(answer, SyncPlaced) and responder.cancelled:
            desk.withdraw(service, answer.dispatch.execution_id)
        await responder.send(answer)
    elif isinstance(message, SyncRun):
        responder = inbound.reply
        await responder.send(
            await desk.run(service, message, inbound.peer_id, lambda: responder.cancelled)
        )
    else:
        await inbound.reply.send(desk.settle(service, message, inbound.peer_id))


async def _refresh_views(plane: ExecutionPlane, leader: LeaderServices) -> None:
    while True:
        if leader.service is not None:
            plane.feed.refresh(trio.current_time())
        await trio.sleep(REFRESH_S)
