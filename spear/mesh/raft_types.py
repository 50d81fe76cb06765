"""Raft-lite data: timings and their profiles, log entries, durable state, Ready, errors.

Everything here is a frozen value the pure core (spear.mesh.raft) hands to its driver or
takes back from it. Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

from spear.errors import ConfigError, ConflictError, StoreError, UnavailableError

if TYPE_CHECKING:
    from spear.mesh.raft_messages import RaftMessage

Role = Literal["follower", "pre-candidate", "candidate", "leader", "learner"]
EntryKind = Literal["noop", "command", "config"]
ENTRY_KINDS: tuple[str, ...] = ("noop", "command", "config")


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftTimings:
    """The Raft timers of one profile (research/mesh.md, table B).

    The check-quorum window and the leader-stickiness window both equal
    `election_timeout_min_s`; every election draws its timeout uniformly from
    [election_timeout_min_s, election_timeout_max_s).
    """

    heartbeat_interval_s: float
    election_timeout_min_s: float
    election_timeout_max_s: float
    append_timeout_s: float
    max_entries_per_append: int
    snapshot_threshold_entries: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"raft.{f.name} must be a finite number > 0, got {value!r}")
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            raise ConfigError(
                f"raft.election_timeout_max_s ({self.election_timeout_max_s}) must be greater"
                f" than raft.election_timeout_min_s ({self.election_timeout_min_s})"
            )
        if self.heartbeat_interval_s * 2 > self.election_timeout_min_s:
            raise ConfigError(
                f"raft.heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half"
                f" of raft.election_timeout_min_s ({self.election_timeout_min_s})"
            )


LAN = RaftTimings(
    heartbeat_interval_s=0.1,
    election_timeout_min_s=1.0,
    election_timeout_max_s=2.0,
    append_timeout_s=0.5,
    max_entries_per_append=64,
    snapshot_threshold_entries=8192,
)
# Below research/mesh.md's [0.5, 1.0): crash -> new leader is mostly the earliest of the
# surviving voters' timeouts, so the p50 target (0.7 s with real processes: D2) needs
# [0.4, 0.8) (0.52 s p50 in the simulator, 0.52-0.58 s measured). Eight heartbeats per
# shortest timeout; the price is that an event loop stalled for 0.4 s (the check-quorum
# window too) costs an election that LAN's 1 s would ride out (docs/cluster.md).
LAN_FAST = RaftTimings(
    heartbeat_interval_s=0.05,
    election_timeout_min_s=0.4,
    election_timeout_max_s=0.8,
    append_timeout_s=0.25,
    max_entries_per_append=64,
    snapshot_threshold_entries=8192,
)
LOOPBACK = RaftTimings(
    heartbeat_interval_s=0.05,
    election_timeout_min_s=0.3,
    election_timeout_max_s=0.6,
    append_timeout_s=0.2,
    max_entries_per_append=64,
    snapshot_threshold_entries=256,
)
# Production ratios in virtual time, but small batches and an early snapshot threshold so
# the simulator exercises multi-round catch-up and InstallSnapshot.
SIM = RaftTimings(
    heartbeat_interval_s=0.1,
    election_timeout_min_s=1.0,
    election_timeout_max_s=2.0,
    append_timeout_s=0.5,
    max_entries_per_append=8,
    snapshot_threshold_entries=64,
)
PROFILES: dict[str, RaftTimings] = {
    "lan": LAN,
    "lan-fast": LAN_FAST,
    "loopback": LOOPBACK,
    "sim": SIM,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One log entry. `kind` is "noop" (a leader's first entry), "command" (state machine
    data) or "config" (a full voter/learner configuration, see raft_config)."""

    index: int
    term: int
    kind: str
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: int = 0
    voted_for: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The applied state machine at `index` (of `term`), with the configuration then."""

    index: int
    term: int
    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadState:
    """A linearizable read is safe once the state machine has applied `index`."""

    request_id: str
    index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftState:
    """Volatile state the driver may want to react to (leadership watcher, gateway)."""

    role: Role
    term: int
    leader_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """What the driver must do after a core call, in this order.

    1. Durably write (fsync all of it before step 2):
       `snapshot` if set (it replaces the stored snapshot and every stored entry; a Ready
       with a snapshot also sets `truncate_from` to its index + 1), then delete stored
       entries with index >= `truncate_from` if set, then append `entries`, then
       `hard_state` if set.
    2. Send `messages`, each to its node id (losing some is fine; Raft retries).
    3. Apply `snapshot` (if set) to the state machine, then `committed` entries in order.
    4. Answer reads: each `ReadState` once applied >= its index; fail `failed_reads`.
    5. React to `soft_state` (set only when role, term or leader changed).

    `bool(ready)` is False when there is nothing to do.
    """

    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    truncate_from: int | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[tuple[str, RaftMessage], ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    failed_reads: tuple[str, ...] = ()
    soft_state: SoftState | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) not in (None, ()) for f in fields(self))


class NotLeaderError(UnavailableError):
    """This node cannot take the request because it is not the leader (HTTP 503).

    Attributes:
        leader_id: the leader this node knows of in its current term, or None.
    """

    code = "not_leader"

    def __init__(self, message: str, *, leader_id: str | None) -> None:
        super().__init__(message)
        self.leader_id = leader_id


class ConfigChangeError(ConflictError):
    """A configuration change was refused: one is pending, the node is unknown or not
    caught up, or the change would leave no voter."""

    code = "config_change_refused"


class BootstrapError(ConflictError):
    """Bootstrap was asked of a node that already has Raft state, or with bad voters."""

    code = "already_bootstrapped"


class RaftStateError(StoreError):
    """The durable Raft state handed to the core is inconsistent (a gap, a bad term)."""

    code = "raft_state_corrupt"
