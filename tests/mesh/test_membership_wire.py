"""SWIM messages cross the mesh codec unchanged (spear.mesh.codec carries SWIM_MESSAGES)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from spear.mesh.codec import MessageCodec
from spear.mesh.members import EventKind
from spear.mesh.swim_messages import (
    SWIM_MESSAGES,
    Ack,
    AliveUpdate,
    DeadUpdate,
    Gossip,
    MemberEntry,
    MemberMeta,
    Nack,
    Ping,
    PingRequest,
    PushPull,
    SuspectUpdate,
)
from tests.mesh.swim_harness import SwimCluster

CODEC = MessageCodec(SWIM_MESSAGES)

text = st.text(max_size=12)
metas = st.builds(
    MemberMeta,
    node_id=text,
    name=text,
    mesh_address=text,
    http_address=text,
    voter=st.booleans(),
    runtimes=st.lists(text, max_size=3).map(tuple),
    labels=st.lists(st.tuples(text, text), max_size=3).map(tuple),
    has_raft_state=st.booleans(),
    bootstrap_expect=st.integers(min_value=0, max_value=9),
    cpu_count=st.integers(min_value=0, max_value=1024),
    memory_bytes=st.integers(min_value=0, max_value=2**48),
)
incarnations = st.integers(min_value=0, max_value=2**40)
updates = st.one_of(
    st.builds(AliveUpdate, node_id=text, incarnation=incarnations, meta=metas),
    st.builds(SuspectUpdate, node_id=text, incarnation=incarnations, accuser=text),
    st.builds(DeadUpdate, node_id=text, incarnation=incarnations, accuser=text),
)
update_tuples = st.lists(updates, max_size=4).map(tuple)
seqs = st.integers(min_value=0, max_value=2**32)
states = st.sampled_from(["alive", "suspect", "dead", "left"])
entries = st.builds(MemberEntry, meta=metas, incarnation=incarnations, state=states)
messages = st.one_of(
    st.builds(
        Ping, seq=seqs, target_id=text, source_id=text, source_address=text, updates=update_tuples
    ),
    st.builds(
        PingRequest,
        seq=seqs,
        target_id=text,
        target_address=text,
        source_id=text,
        source_address=text,
        updates=update_tuples,
    ),
    st.builds(Ack, seq=seqs, source_id=text, updates=update_tuples),
    st.builds(Nack, seq=seqs, source_id=text),
    st.builds(Gossip, source_id=text, updates=update_tuples),
    st.builds(
        PushPull,
        source_id=text,
        source_address=text,
        protocol_min=st.integers(0, 9),
        protocol_max=st.integers(0, 9),
        join=st.booleans(),
        reply=st.booleans(),
        members=st.lists(entries, max_size=3).map(tuple),
    ),
)


@given(messages)
def test_every_swim_message_round_trips(message: object) -> None:
    assert CODEC.decode(CODEC.encode(message, sender="n1")).message == message


def test_tags_are_namespaced_and_unique() -> None:
    assert all(tag.startswith("swim.") for tag in SWIM_MESSAGES)
    assert len(set(SWIM_MESSAGES.values())) == len(SWIM_MESSAGES)


def test_a_cluster_works_with_every_message_through_the_codec() -> None:
    cluster = SwimCluster(seed=8, codec=CODEC)
    names = cluster.start(4)
    cluster.run_for(5.0)
    cluster.crash("n4")
    cluster.run_for(40.0)
    for observer in names[:3]:
        assert cluster.first_seen(EventKind.DEAD, "n4", observer) is not None
    assert cluster.verdicts(EventKind.DEAD) and all(
        s.event.member.node_id == "n4" for s in cluster.verdicts(EventKind.DEAD)
    )
