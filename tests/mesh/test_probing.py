"""Randomized round-robin probe order: time-bounded completeness."""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from spear.mesh.probing import ProbeOrder


@given(
    seed=st.integers(min_value=0, max_value=2**32),
    n=st.integers(min_value=1, max_value=30),
    extra=st.integers(min_value=0, max_value=10),
)
def test_every_member_is_probed_within_2n_minus_1_rounds(seed: int, n: int, extra: int) -> None:
    order = ProbeOrder(random.Random(seed))
    ids = [f"m{i}" for i in range(n)]
    for node_id in ids:
        order.add(node_id)
    picks = [order.next(lambda _: True) for _ in range(4 * n + extra)]
    for node_id in ids:
        positions = [i for i, pick in enumerate(picks) if pick == node_id]
        assert positions and positions[0] < n
        assert all(b - a <= 2 * n - 1 for a, b in itertools.pairwise(positions))


def test_one_pass_visits_each_member_once() -> None:
    order = ProbeOrder(random.Random(7))
    for node_id in ("a", "b", "c", "d"):
        order.add(node_id)
    assert sorted(order.next(lambda _: True) or "" for _ in range(4)) == ["a", "b", "c", "d"]


def test_unprobeable_members_are_skipped_and_none_when_nobody_qualifies() -> None:
    order = ProbeOrder(random.Random(1))
    for node_id in ("a", "b", "c"):
        order.add(node_id)
    assert {order.next(lambda i: i != "b") for _ in range(10)} == {"a", "c"}
    assert order.next(lambda _: False) is None
    assert ProbeOrder(random.Random(1)).next(lambda _: True) is None


def test_removed_members_are_not_probed_and_adding_twice_is_a_no_op() -> None:
    order = ProbeOrder(random.Random(3))
    for node_id in ("a", "b", "c", "a"):
        order.add(node_id)
    order.next(lambda _: True)
    order.remove("b")
    order.remove("zz")
    picks = [order.next(lambda _: True) for _ in range(6)]
    assert "b" not in picks and "b" not in order
    assert picks.count("a") == picks.count("c") == 3


@given(
    seed=st.integers(min_value=0, max_value=2**32),
    n=st.integers(min_value=0, max_value=40),
    k=st.integers(min_value=0, max_value=5),
    excluded=st.sets(st.integers(min_value=0, max_value=40)),
)
def test_sample_returns_distinct_accepted_members_and_enough_of_them(
    seed: int, n: int, k: int, excluded: set[int]
) -> None:
    order = ProbeOrder(random.Random(seed))
    for i in range(n):
        order.add(f"m{i}")
    accepted = {f"m{i}" for i in range(n) if i not in excluded}
    chosen = order.sample(k, lambda node_id: node_id in accepted)
    assert len(chosen) == len(set(chosen)) == min(k, len(accepted))
    assert set(chosen) <= accepted
