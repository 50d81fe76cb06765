"""SWIM/Lifeguard timing knobs and the four profiles of research/mesh.md §B.

The values follow hashicorp/memberlist's LAN/local configurations (DefaultLANConfig,
DefaultLocalConfig) with the adjustments §B argues for CPython: LAN is the production
default, LAN_FAST is opt-in once event-loop stalls are measured small, LOOPBACK is for
real-clock integration tests on one noisy machine, SIM keeps LAN ratios for virtual time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from spear.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class SwimTimings:
    """Every timing and sizing knob of the membership core.

    Attributes:
        probe_interval_s: one probe round per interval (stretched by local health).
        probe_timeout_s: how long a direct ping waits before indirect probes start (~p99 RTT).
        indirect_checks: helpers asked to probe a silent target (k).
        suspicion_mult: minimum suspicion = mult * max(1, log10 n) * probe interval.
        suspicion_max_mult: maximum suspicion = this * minimum (Lifeguard starts there).
        awareness_max_multiplier: local health stretches probing at most this many times.
        gossip_interval_s: how often queued updates are pushed to `gossip_fanout` members.
        gossip_fanout: members per gossip round.
        retransmit_mult: retransmit budget = mult * ceil(log10(n + 1)), at least n - 1 below 10.
        push_pull_interval_s: full-state exchange period (scaled past 32 members).
        gossip_to_dead_s: dead members keep receiving gossip this long, so they can refute.
        reconnect_interval_s: period of the push-pull attempts to dead members.
        tombstone_expiry_s: dead and left members are forgotten after this long.
        max_updates_per_message: updates piggybacked on one probe, ack or gossip message.
    """

    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_mult: int = 6
    awareness_max_multiplier: int = 8
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    push_pull_interval_s: float = 30.0
    gossip_to_dead_s: float = 30.0
    reconnect_interval_s: float = 30.0
    tombstone_expiry_s: float = 86_400.0
    max_updates_per_message: int = 16

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value <= 0:
                raise ConfigError(f"mesh.{item.name} must be > 0, got {value}")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError(
                f"mesh.probe_timeout_s must be < mesh.probe_interval_s "
                f"({self.probe_interval_s}), got {self.probe_timeout_s}"
            )
        if self.suspicion_max_mult < 1:
            raise ConfigError(
                f"mesh.suspicion_max_mult must be >= 1, got {self.suspicion_max_mult}"
            )

    def push_pull_period_s(self, n: int) -> float:
        """The push-pull period for `n` members: memberlist's pushPullScale, which slows
        anti-entropy past 32 members so its total load grows only logarithmically."""
        if n <= 32:
            return self.push_pull_interval_s
        return self.push_pull_interval_s * (math.ceil(math.log2(n) - 5) + 1)


LAN = SwimTimings()
LAN_FAST = SwimTimings(
    probe_interval_s=0.5,
    probe_timeout_s=0.2,
    suspicion_max_mult=4,
    gossip_interval_s=0.1,
    push_pull_interval_s=15.0,
    gossip_to_dead_s=15.0,
    reconnect_interval_s=15.0,
)
LOOPBACK = SwimTimings(
    probe_interval_s=0.25,
    probe_timeout_s=0.1,
    indirect_checks=2,
    suspicion_mult=3,
    suspicion_max_mult=4,
    awareness_max_multiplier=4,
    gossip_interval_s=0.05,
    retransmit_mult=3,
    push_pull_interval_s=2.0,
    gossip_to_dead_s=2.0,
    reconnect_interval_s=1.0,
    tombstone_expiry_s=300.0,
)
SIM = SwimTimings()

PROFILES: dict[str, SwimTimings] = {
    "lan": LAN,
    "lan-fast": LAN_FAST,
    "loopback": LOOPBACK,
    "sim": SIM,
}
