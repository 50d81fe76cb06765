"""The mesh: the authenticated WebSocket transport, SWIM + Lifeguard membership and the
Raft-lite core (DESIGN.md section 3).

The protocol cores (`Membership`, `RaftCore`) are pure state machines fed messages and `now`;
`serve_transport` is the trio driver of the links. The node's roles (spear.roles.gossip,
spear.roles.replication, spear.roles.cluster) drive the cores over the transport.
"""

from spear.mesh.codec import Decoded, MessageCodec
from spear.mesh.handshake import (
    AuthenticationError,
    JoinTokenError,
    join_token,
    new_cluster_key,
    parse_join_token,
)
from spear.mesh.inbound import Inbound, Responder
from spear.mesh.links import (
    LinkClosedError,
    PeerUnreachableError,
    RemoteError,
    RequestTimeoutError,
    TransportClosedError,
    TransportSettings,
)
from spear.mesh.members import EventKind, Member, MemberEvent, MembershipStatistics, MemberState
from spear.mesh.membership import Membership, Output
from spear.mesh.raft import RaftCore
from spear.mesh.raft_config import BootstrapCandidate, choose_bootstrap_voters
from spear.mesh.raft_messages import RAFT_MESSAGES, RaftMessage
from spear.mesh.raft_types import PROFILES as RAFT_PROFILES
from spear.mesh.raft_types import (
    BootstrapError,
    ConfigChangeError,
    Entry,
    HardState,
    NotLeaderError,
    RaftStateError,
    RaftTimings,
    ReadState,
    Ready,
    Snapshot,
    SoftState,
)
from spear.mesh.swim_messages import SWIM_MESSAGES, MemberMeta
from spear.mesh.swim_timings import PROFILES as SWIM_PROFILES
from spear.mesh.swim_timings import SwimTimings
from spear.mesh.transport import Transport, TransportStatistics, serve_transport

__all__ = [
    "RAFT_MESSAGES",
    "RAFT_PROFILES",
    "SWIM_MESSAGES",
    "SWIM_PROFILES",
    "AuthenticationError",
    "BootstrapCandidate",
    "BootstrapError",
    "ConfigChangeError",
    "Decoded",
    "Entry",
    "EventKind",
    "HardState",
    "Inbound",
    "JoinTokenError",
    "LinkClosedError",
    "Member",
    "MemberEvent",
    "MemberMeta",
    "MemberState",
    "Membership",
    "MembershipStatistics",
    "MessageCodec",
    "NotLeaderError",
    "Output",
    "PeerUnreachableError",
    "RaftCore",
    "RaftMessage",
    "RaftStateError",
    "RaftTimings",
    "ReadState",
    "Ready",
    "RemoteError",
    "RequestTimeoutError",
    "Responder",
    "Snapshot",
    "SoftState",
    "SwimTimings",
    "Transport",
    "TransportClosedError",
    "TransportSettings",
    "TransportStatistics",
    "choose_bootstrap_voters",
    "join_token",
    "new_cluster_key",
    "parse_join_token",
    "serve_transport",
]
