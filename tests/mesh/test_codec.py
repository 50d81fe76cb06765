"""The mesh message codec: round trips, strict decoding, forward compatibility, hostile input."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NewType

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spear import wire
from spear.errors import FrameTooLargeError, WireError
from spear.mesh.codec import MessageCodec
from spear.mesh.raft_messages import RAFT_MESSAGES
from spear.mesh.swim_messages import SWIM_MESSAGES

NodeId = NewType("NodeId", str)


class Role(enum.Enum):
    VOTER = "voter"
    LEARNER = "learner"


@dataclass(frozen=True, slots=True, kw_only=True)
class Meta:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    node: NodeId
    incarnation: int
    meta: Meta


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    node: NodeId
    incarnation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Gossip:
    sender: NodeId
    updates: tuple[Alive | Dead, ...] = ()
    weight: float = 1.0
    flag: bool = False
    blob: bytes = b""
    note: str | None = None
    role: Role = Role.VOTER
    mode: Literal["fast", "slow"] = "slow"
    extra: Mapping[str, int] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")


REGISTRY: dict[str, type[Any]] = {"t.gossip": Gossip, "t.alive": Alive, "t.dead": Dead}
CODEC = MessageCodec(REGISTRY)

node_ids = st.text(max_size=8).map(NodeId)
metas = st.builds(
    Meta,
    name=st.text(max_size=8),
    labels=st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=3).map(tuple),
)
updates = st.one_of(
    st.builds(Alive, node=node_ids, incarnation=st.integers(0, 2**63), meta=metas),
    st.builds(Dead, node=node_ids, incarnation=st.integers(-(2**63), 2**63)),
)
gossips = st.builds(
    Gossip,
    sender=node_ids,
    updates=st.lists(updates, max_size=4).map(tuple),
    weight=st.floats(allow_nan=False),
    flag=st.booleans(),
    blob=st.binary(max_size=16),
    note=st.none() | st.text(max_size=8),
    role=st.sampled_from(Role),
    mode=st.sampled_from(["fast", "slow"]),
    extra=st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    pair=st.tuples(st.integers(), st.text(max_size=4)),
)


@given(gossips, st.integers(0, 2**32), st.text(max_size=8))
def test_round_trip_keeps_every_field_and_the_envelope(msg: Gossip, id_: int, sender: str) -> None:
    decoded = CODEC.decode(CODEC.encode(msg, id=id_, sender=sender))
    assert decoded.message == msg
    assert (decoded.id, decoded.sender) == (id_, sender)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        CODEC.decode(data)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "sender",
                    "updates",
                    "node",
                    "incarnation",
                    "meta",
                    "$t",
                    "name",
                    "weight",
                    "role",
                    "mode",
                    "extra",
                    "pair",
                    "labels",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@given(st.sampled_from(["t.gossip", "t.alive", "t.dead"]), cbor_values)
def test_hostile_bodies_raise_only_wire_errors(tag: str, body: Any) -> None:
    data = wire.dumps({"v": 1, "type": tag, "id": 0, "from": "x", "body": body})
    try:
        decoded = CODEC.decode(data)
    except WireError:
        return
    assert type(decoded.message) is REGISTRY[tag]


@given(gossips)
def test_a_mutated_field_type_is_refused_naming_the_field(msg: Gossip) -> None:
    body = CODEC.to_body(msg)
    body["flag"] = 1  # an int is not a bool
    with pytest.raises(WireError, match=r"t\.gossip\.flag must be a boolean"):
        CODEC.from_body("t.gossip", body)


def test_unknown_extra_keys_are_ignored() -> None:
    body = {**CODEC.to_body(Dead(node=NodeId("a"), incarnation=3)), "added_in_v2": [1, 2]}
    assert CODEC.from_body("t.dead", body) == Dead(node=NodeId("a"), incarnation=3)


def test_missing_required_field_is_refused() -> None:
    with pytest.raises(WireError, match=r"t\.dead\.incarnation is missing"):
        CODEC.from_body("t.dead", {"node": "a"})


def test_missing_field_with_default_takes_the_default() -> None:
    assert CODEC.from_body("t.gossip", {"sender": "a"}) == Gossip(sender=NodeId("a"))


def test_unknown_tag_is_refused() -> None:
    data = wire.dumps({"v": 1, "type": "t.nope", "id": 0, "from": "x", "body": {}})
    with pytest.raises(WireError, match=r"unknown message type 't\.nope'"):
        CODEC.decode(data)


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"node": "a", "incarnation": True}, "incarnation must be an integer"),
        ({"node": 5, "incarnation": 1}, "node must be a string"),
        ({"node": "a", "incarnation": "1"}, "incarnation must be an integer"),
        ([1, 2], "must be a map"),
    ],
)
def test_wrong_types_are_refused_without_coercion(body: Any, rule: str) -> None:
    with pytest.raises(WireError, match=rule):
        CODEC.from_body("t.dead", body)


def test_union_members_are_chosen_by_their_nested_tag() -> None:
    alive = Alive(node=NodeId("b"), incarnation=2, meta=Meta(name="b"))
    body = CODEC.to_body(
        Gossip(sender=NodeId("a"), updates=(alive, Dead(node=NodeId("c"), incarnation=1)))
    )
    assert [u["$t"] for u in body["updates"]] == ["t.alive", "t.dead"]
    body["updates"][1]["$t"] = "t.gossip"  # a registered tag that is not a member of the union
    with pytest.raises(WireError, match=r"updates\[1\] matches none"):
        CODEC.from_body("t.gossip", body)


def test_an_int_is_accepted_for_a_float() -> None:
    body = {**CODEC.to_body(Gossip(sender=NodeId("a"))), "weight": 3}
    assert CODEC.from_body("t.gossip", body).weight == 3.0


def test_huge_integer_for_a_float_is_a_wire_error() -> None:
    body = {**CODEC.to_body(Gossip(sender=NodeId("a"))), "weight": 10**400}
    with pytest.raises(WireError, match="out of range"):
        CODEC.from_body("t.gossip", body)


def test_deeply_nested_garbage_is_a_wire_error() -> None:
    deep = b"\x81" * 100_000 + b"\x80"  # an array nested 100,000 deep
    with pytest.raises(WireError):
        CODEC.decode(deep)
    assert (
        CODEC.decode(CODEC.encode(Dead(node=NodeId("a"), incarnation=1))).message.incarnation == 1
    )


def test_frame_over_the_cap_is_refused_before_parsing() -> None:
    data = CODEC.encode(Gossip(sender=NodeId("a"), blob=b"x" * 5000))
    with pytest.raises(FrameTooLargeError):
        CODEC.decode(data, max_bytes=4096)


def test_encoding_an_unregistered_message_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="Meta is not a registered mesh message"):
        CODEC.encode(Meta(name="x"))


def test_unsupported_field_types_fail_when_the_codec_is_built() -> None:
    @dataclass(frozen=True)
    class Bad:
        values: list[int]

    with pytest.raises(TypeError, match="cannot carry"):
        MessageCodec({"t.bad": Bad})


def test_registering_a_class_twice_or_a_non_dataclass_fails() -> None:
    with pytest.raises(TypeError, match="registered twice"):
        MessageCodec({"a": Dead, "b": Dead})
    with pytest.raises(TypeError, match="must be a dataclass"):
        MessageCodec({"a": int})
    with pytest.raises(TypeError, match=r"registered twice: t\.dead"):
        CODEC.extended({"t.dead": Meta})


def test_extended_codec_knows_both_registries() -> None:
    codec = CODEC.extended({"t.meta": Meta})
    assert "t.meta" in codec and "t.gossip" in codec
    assert codec.decode(codec.encode(Meta(name="m"))).message == Meta(name="m")


MESH_CODEC = MessageCodec({**RAFT_MESSAGES, **SWIM_MESSAGES})


@pytest.mark.parametrize("tag", sorted(MESH_CODEC.registry))
def test_every_raft_and_swim_message_round_trips(tag: str) -> None:
    @settings(max_examples=10, suppress_health_check=list(HealthCheck), deadline=None)
    @given(st.from_type(MESH_CODEC.registry[tag]))
    def round_trip(message: Any) -> None:
        assume(message == message)  # a NaN float is never equal to itself
        assert MESH_CODEC.decode(MESH_CODEC.encode(message)).message == message

    round_trip()
