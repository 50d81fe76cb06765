"""SWIM wire messages: what one membership core sends another, and their append-only tags.

Every message is a frozen, slotted, keyword-only dataclass whose fields are only int, float,
str, bool, None, tuples of those, or nested message dataclasses, so a generic CBOR codec can
carry them given `SWIM_MESSAGES` (tag -> class). Nested classes (the metadata, the three
member updates, a push-pull entry) are registered too, because the updates travel as a
heterogeneous tuple and the codec must tag each one. Tags are append-only: never rename or
reuse one; add a new tag for a new shape.

Every message names its sender (`source_id`) and, where the receiver must answer, the
address to answer to (`source_address`): the core never infers anything from the link a
message came in on (a closed or reopened connection means nothing to it).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The membership protocol versions this build speaks; checked at every push-pull.
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberMeta:
    """What a node says about itself; gossiped with every alive update.

    Attributes:
        node_id: permanent unique id (never derived from the address, never reused).
        name: human-readable node name.
        mesh_address: "host:port" of the node's mesh listener; where probes are sent.
        http_address: "host:port" of its HTTP gateway.
        voter: whether the node is eligible to be a Raft voter.
        runtimes: the runtimes this node offers ("wasm", "process", "docker").
        labels: sorted (key, value) pairs used by placement.
        has_raft_state: whether the node already holds Raft state (Consul-style bootstrap
            only proceeds when no visible node has any).
        bootstrap_expect: its raft.bootstrap_expect (bootstrap waits for agreement on it).
        cpu_count: logical CPUs the node offers.
        memory_bytes: memory the node offers.
        features: protocol features beyond the base that this node's version speaks (e.g.
            "sync-direct"); a node uses one with a peer only if the peer lists it, so nodes
            of different versions work together during a rolling upgrade.
    """

    node_id: str
    name: str
    mesh_address: str
    http_address: str = ""
    voter: bool = False
    runtimes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    has_raft_state: bool = False
    bootstrap_expect: int = 0
    cpu_count: int = 0
    memory_bytes: int = 0
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AliveUpdate:
    """`node_id` is alive at `incarnation` with `meta`; only that node raises its incarnation."""

    node_id: str
    incarnation: int
    meta: MemberMeta


@dataclass(frozen=True, slots=True, kw_only=True)
class SuspectUpdate:
    """`accuser` suspects `node_id` at `incarnation` (its probes went unanswered)."""

    node_id: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadUpdate:
    """`accuser` declares `node_id` dead at `incarnation`; accuser == node_id means it left."""

    node_id: str
    incarnation: int
    accuser: str


Update = AliveUpdate | SuspectUpdate | DeadUpdate


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberEntry:
    """One member in a push-pull state exchange; `state` is a MemberState value."""

    meta: MemberMeta
    incarnation: int
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """A probe. `target_id` ("" when unknown) lets a node refuse a probe meant for another
    node that used to live at its address. Updates ride along (piggybacking)."""

    seq: int
    target_id: str
    source_id: str
    source_address: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PingRequest:
    """Ask a helper to probe `target_id` at `target_address` for us (an indirect probe)."""

    seq: int
    target_id: str
    target_address: str
    source_id: str
    source_address: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """The answer to a Ping (or, relayed by a helper, to a PingRequest) with sequence `seq`."""

    seq: int
    source_id: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """A helper's word that the target of PingRequest `seq` stayed silent for a probe timeout:
    it proves the path prober <-> helper works, so the prober does not blame itself."""

    seq: int
    source_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Gossip:
    """Updates sent to a few random members every gossip interval."""

    source_id: str
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPull:
    """A full-state exchange (anti-entropy). A request (`reply=False`) is answered with the
    receiver's own state (`reply=True`); `join` marks the first exchange of a joining node.
    Peers whose protocol ranges do not overlap refuse to merge."""

    source_id: str
    source_address: str
    protocol_min: int
    protocol_max: int
    join: bool
    reply: bool
    members: tuple[MemberEntry, ...]


SWIM_MESSAGES: dict[str, type] = {
    "swim.meta": MemberMeta,
    "swim.alive": AliveUpdate,
    "swim.suspect": SuspectUpdate,
    "swim.dead": DeadUpdate,
    "swim.member": MemberEntry,
    "swim.ping": Ping,
    "swim.ping_request": PingRequest,
    "swim.ack": Ack,
    "swim.nack": Nack,
    "swim.gossip": Gossip,
    "swim.push_pull": PushPull,
}
