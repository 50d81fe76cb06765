"""Raft-lite cluster configurations: voters and learners, how a "config" entry encodes them,
quorum arithmetic, and the Consul-style choice of the bootstrap voters.

A "config" log entry carries the *whole* new configuration (not a delta), encoded as
canonical JSON so every node that bootstraps the same voters writes byte-identical entries.
Configurations change one server at a time; a node uses the latest configuration in its log,
committed or not (Raft thesis §4.1), which is what keeps the rule restart-safe without
persisting the commit index.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from spear.mesh.raft_types import RaftStateError


@dataclass(frozen=True, slots=True, kw_only=True)
class Membership:
    """A configuration: voters decide elections and commits; learners only receive the log."""

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """Canonical bytes for a "config" entry."""
        doc = {"voters": sorted(self.voters), "learners": sorted(self.learners)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        """Parse a "config" entry; raise RaftStateError if it is not one."""
        try:
            doc = json.loads(data)
            voters = tuple(str(v) for v in doc["voters"])
            learners = tuple(str(v) for v in doc["learners"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RaftStateError(f"malformed raft config entry {data[:80]!r}: {exc}") from exc
        return cls(voters=voters, learners=learners)

    @property
    def quorum(self) -> int:
        """Votes (or matching replicas) needed among the voters."""
        return len(self.voters) // 2 + 1

    @property
    def members(self) -> tuple[str, ...]:
        return self.voters + self.learners

    def with_learner(self, node_id: str) -> Membership:
        return Membership(voters=self.voters, learners=(*self.learners, node_id))

    def with_voter(self, node_id: str) -> Membership:
        learners = tuple(n for n in self.learners if n != node_id)
        return Membership(voters=(*self.voters, node_id), learners=learners)

    def with_demoted(self, node_id: str) -> Membership:
        voters = tuple(n for n in self.voters if n != node_id)
        return Membership(voters=voters, learners=(*self.learners, node_id))

    def without(self, node_id: str) -> Membership:
        return Membership(
            voters=tuple(n for n in self.voters if n != node_id),
            learners=tuple(n for n in self.learners if n != node_id),
        )


def quorum_index(values: Iterable[int], quorum: int) -> int:
    """The largest value that at least `quorum` of `values` reach (0 if too few values)."""
    ordered = sorted(values, reverse=True)
    return ordered[quorum - 1] if len(ordered) >= quorum else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BootstrapCandidate:
    """A voter-eligible node as gossip shows it."""

    node_id: str
    has_raft_state: bool
    bootstrap_expect: int


def choose_bootstrap_voters(
    candidates: Iterable[BootstrapCandidate], expect: int
) -> tuple[str, ...] | None:
    """The initial voters, or None while bootstrapping must wait or must not happen.

    Consul's rule: once `expect` voter-eligible nodes are visible, all of them configured
    with the same `expect`, and none reports Raft state, the `expect` lowest node ids are the
    voters. Every node computes the same answer from the same view; a node bootstraps only
    if its own id is in the answer.

    Args:
        candidates: the visible voter-eligible nodes, this one included.
        expect: this node's `raft.bootstrap_expect`.
    """
    seen = {c.node_id: c for c in candidates}
    if expect < 1 or len(seen) < expect:
        return None
    if any(c.has_raft_state or c.bootstrap_expect != expect for c in seen.values()):
        return None
    return tuple(sorted(seen)[:expect])
