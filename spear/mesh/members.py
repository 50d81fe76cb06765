"""Members as the membership core sees them: states, the public view, and change events."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from spear.mesh.swim_messages import MemberMeta


class MemberState(enum.StrEnum):
    """A member's state; "left" is a graceful exit, "dead" a failure verdict."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    @property
    def gone(self) -> bool:
        """Dead or left: not probed, not counted as a live member."""
        return self in GONE


#: the states of members that are not probed and not counted as live
GONE = frozenset({MemberState.DEAD, MemberState.LEFT})


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One member of the cluster view (what /api/v1/cluster lists).

    Attributes:
        meta: the member's own description of itself.
        state: alive, suspect, dead or left.
        incarnation: the member's incarnation number as last heard.
        state_changed_at: `now` (core time) when `state` was entered.
    """

    meta: MemberMeta
    state: MemberState
    incarnation: int
    state_changed_at: float

    @property
    def node_id(self) -> str:
        return self.meta.node_id


class EventKind(enum.StrEnum):
    """What happened to a member."""

    JOINED = "joined"  # first heard of, or back after having left
    UPDATED = "updated"  # metadata changed while alive
    SUSPECT = "suspect"
    ALIVE = "alive"  # alive again after suspect or dead
    DEAD = "dead"
    LEFT = "left"
    REMOVED = "removed"  # tombstone expired: forgotten


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberEvent:
    """A change in the view, reported in `Output.events` in the order it happened."""

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipStatistics:
    """Counters and gauges of one membership core (for /metrics and tests).

    Attributes:
        alive, suspect, dead, left: members per state (self included).
        incarnation: this node's incarnation.
        health_score: the local-health (awareness) score, 0 = healthy.
        probes: probe rounds started; probes_failed: rounds that ended without an ack.
        indirect_probes: PingRequests sent; refutations: alive updates sent about self.
        suspicions: suspicions started here; deaths_declared: suspicions this node let expire.
        push_pulls: push-pull requests sent; incompatible_peers: push-pulls refused.
        queued_updates: updates waiting in the retransmit queue.
        messages_sent: messages returned for sending so far.
    """

    alive: int
    suspect: int
    dead: int
    left: int
    incarnation: int
    health_score: int
    probes: int
    probes_failed: int
    indirect_probes: int
    refutations: int
    suspicions: int
    deaths_declared: int
    push_pulls: int
    incompatible_peers: int
    queued_updates: int
    messages_sent: int
