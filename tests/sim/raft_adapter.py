"""The one place the simulator names spear's Raft core API (spear.mesh.raft*).

Everything the simulator needs from the core comes through here, so an API change in the
core is one edit: the core class, its timings, the NotLeader error, the AppendEntries message
(for the fencing check), bootstrap, and the codec registry for delivering encoded bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spear.mesh.codec import MessageCodec
from spear.mesh.raft import RaftCore
from spear.mesh.raft_messages import RAFT_MESSAGES, RAFT_VALUES, AppendEntries
from spear.mesh.raft_types import SIM, ConfigChangeError, NotLeaderError, RaftTimings

if TYPE_CHECKING:
    from tests.sim.raft_node import RaftDriver

__all__ = [
    "APPEND_TYPES",
    "ConfigChangeError",
    "NotLeaderError",
    "RaftTimings",
    "bootstrap_cluster",
    "new_core",
    "raft_codec",
    "sim_timings",
]

#: messages that carry log entries from a leader (fenced by term: I7)
APPEND_TYPES: tuple[type, ...] = (AppendEntries,)


def sim_timings() -> RaftTimings:
    """The SIM profile: LAN ratios, small batches, an early snapshot threshold."""
    return SIM


def new_core(*, core_class: type | None = None, **kwargs: Any) -> Any:
    """A RaftCore (or `core_class`) restarted from durable state (empty = brand-new node)."""
    return (core_class or RaftCore)(**kwargs)


def bootstrap_cluster(nodes: Sequence[RaftDriver], voters: Sequence[str]) -> None:
    """Bootstrap every fresh node with the same voter set (Consul-style, all agree)."""
    for node in nodes:
        node.handle(node.core.bootstrap(tuple(voters), node.proc.now()))


def raft_codec() -> MessageCodec:
    """A codec for every Raft message and nested value."""
    return MessageCodec({**RAFT_MESSAGES, **RAFT_VALUES})
