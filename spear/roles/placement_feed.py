"""What the leader's Placer knows of each node: gossip, reports, leases and drain, combined.

Each node's `NodeView` is rebuilt from its gossip member (state, labels), its last resource
report (runtimes, slots, CPU, memory, warm idle instances), the drained set of the replicated
state, and its lease: a node the leader has not heard from within `sms.spearlet_lease_ms` is
shown as dead, so placement stops choosing it no later than its lease runs out (and before the
failure detector declares it dead, on the default timings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spear.mesh import Member
from spear.roles.dispatcher import Dispatcher
from spear.roles.nodes import NodeReport, NodeService, ReportAck
from spear.roles.placement import NodeView
from spear.roles.state import SmsState


class PlacementFeed:
    """Feeds the Placer of a Dispatcher (pure bookkeeping: time is the caller's `now`)."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        nodes: NodeService,
        state: SmsState,
        members: Callable[[], Sequence[Member]],
    ) -> None:
        self._dispatcher = dispatcher
        self._nodes = nodes
        self._state = state
        self._members = members

    def on_report(self, report: NodeReport, now: float) -> ReportAck:
        """A node's report reached the leader: registry, lease and view."""
        ack = self._nodes.on_report(report, now)
        self._dispatcher.leases.heard(report.node_id, now, report.lease_epoch)
        # Only this node's view changed; the others (and members gone) follow in `refresh`.
        for member in self._members():
            if member.node_id == report.node_id:
                draining = member.node_id in self._state.drained()
                self._dispatcher.placer.update(self._view(member, now, draining))
        return ack

    def refresh(self, now: float) -> None:
        """Rebuild every node's view (members that left gossip are dropped)."""
        placer = self._dispatcher.placer
        drained = self._state.drained()
        seen: set[str] = set()
        for member in self._members():
            seen.add(member.node_id)
            placer.update(self._view(member, now, member.node_id in drained))
        for view in placer.views():
            if view.node_id not in seen:
                placer.remove(view.node_id)

    def _view(self, member: Member, now: float, draining: bool) -> NodeView:
        received = self._nodes.report_of(member.node_id)
        live = self._dispatcher.leases.live(member.node_id, now)
        state = member.state.value if live else "dead"
        if received is None:
            return NodeView(
                node_id=member.node_id,
                state=state,
                draining=draining,
                runtimes=frozenset(member.meta.runtimes),
                labels=dict(member.meta.labels),
                slots=0,
            )
        report = received[0]
        resources = report.resources
        return NodeView(
            node_id=member.node_id,
            state=state,
            draining=draining,
            runtimes=frozenset(report.runtimes),
            labels=dict(member.meta.labels),
            slots=max(report.slots, 0),  # a peer's report is checked, never trusted
            cpu_count=_int(resources.get("cpu_count"), 1),
            cpu_percent=_float(resources.get("cpu_percent")),
            load_1m=_float(resources.get("load_1m")),
            memory_available_bytes=_int(resources.get("memory_available_bytes"), 0),
            warm_idle={
                task: max(gauges.get("idle", 0), 0) for task, gauges in report.pools.items()
            },
        )


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and value >= default else default


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0
