"""The retransmit queue: budget, invalidation, and order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.mesh.broadcasts import BroadcastQueue, retransmit_limit
from spear.mesh.swim_messages import AliveUpdate, DeadUpdate, MemberMeta, SuspectUpdate


@pytest.mark.parametrize(
    ("n", "limit"),
    [(1, 4), (2, 4), (5, 4), (9, 8), (10, 8), (99, 8), (100, 12), (999, 12), (1000, 16)],
)
def test_budget_is_mult_ceil_log10_with_a_floor_of_n_minus_1_below_10(n: int, limit: int) -> None:
    assert retransmit_limit(4, n) == limit


def _alive(node: str, incarnation: int = 0) -> AliveUpdate:
    meta = MemberMeta(node_id=node, name=node, mesh_address=f"{node}:1")
    return AliveUpdate(node_id=node, incarnation=incarnation, meta=meta)


def test_a_newer_update_about_a_node_replaces_the_older_one() -> None:
    queue = BroadcastQueue(4)
    queue.queue(_alive("a"))
    suspect = SuspectUpdate(node_id="a", incarnation=0, accuser="b")
    queue.queue(suspect)
    assert len(queue) == 1
    assert queue.take(10, 5) == (suspect,)


def test_least_sent_first_then_newest_first() -> None:
    queue = BroadcastQueue(4)
    old, new = _alive("a"), _alive("b")
    queue.queue(old)
    queue.queue(new)
    assert queue.take(1, 5) == (new,)
    assert queue.take(1, 5) == (old,)  # new was sent once, old never
    newest = DeadUpdate(node_id="c", incarnation=1, accuser="x")
    queue.queue(newest)
    assert queue.take(3, 5) == (newest, new, old)


@given(n=st.integers(min_value=1, max_value=200), takes=st.integers(min_value=0, max_value=40))
def test_an_update_is_sent_exactly_budget_times_then_dropped(n: int, takes: int) -> None:
    queue = BroadcastQueue(4)
    queue.queue(_alive("a"))
    sent = sum(len(queue.take(5, n)) for _ in range(takes))
    assert sent == min(takes, retransmit_limit(4, n))
    assert (queue.pending("a") is None) == (takes >= retransmit_limit(4, n))


@dataclass
class _Model:
    update: AliveUpdate
    seq: int
    transmits: int = 0


queue_ops = st.tuples(st.just("queue"), st.sampled_from("abcdef"), st.integers(0, 3))
take_ops = st.tuples(st.just("take"), st.integers(0, 4), st.sampled_from(["", "a", "b"]))


@given(st.lists(st.one_of(queue_ops, take_ops), max_size=60), st.integers(1, 12))
def test_the_queue_behaves_like_a_sort_by_transmits_then_newest(
    ops: list[tuple[str, object, object]], n: int
) -> None:
    """Against a reference model re-sorted on every take (memberlist orders the same way)."""
    queue = BroadcastQueue(4)
    model: dict[str, _Model] = {}
    for seq, (op, x, y) in enumerate(ops):
        if op == "queue":
            assert isinstance(x, str) and isinstance(y, int)
            queue.queue(_alive(x, y))
            model[x] = _Model(update=_alive(x, y), seq=seq)
            continue
        assert isinstance(x, int) and isinstance(y, str)
        ordered = sorted(model, key=lambda k: (model[k].transmits, -model[k].seq))
        expected = [k for k in ordered if k != y][:x]
        assert queue.take(x, n, recipient=y) == tuple(model[k].update for k in expected)
        for key in expected:
            model[key].transmits += 1
            if model[key].transmits >= retransmit_limit(4, n):
                del model[key]
    assert len(queue) == len(model)
