"""The placement core under random clusters and operations (hypothesis), checked against a
plain model: a placement always fits its node, a fitting node is never refused, the best
ranked node wins, open tickets count exactly and return to zero, a seed repeats its choices."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from spear.errors import SaturatedError, UnavailableError
from spear.roles.placement import Demand, NodeView, Placer, Ticket

NODES = ("n0", "n1", "n2", "n3", "n4", "n5")
TASKS = ("t1", "t2")
RUNTIMES = ("wasm", "process", "docker")
LABELS = {"zone": ("a", "b"), "gpu": ("yes",)}


# Weighted towards nodes and demands that fit, so that most examples exercise the choice
# among several fitting nodes, not only refusals.
def often(common: Any, *rare: Any) -> st.SearchStrategy[Any]:
    """`common` six times out of seven, else one of `rare`."""
    return st.sampled_from((common,) * 6 * len(rare) + rare)


label_sets = st.dictionaries(
    st.sampled_from(sorted(LABELS)), st.sampled_from(("a", "b", "yes")), max_size=1
)
views = st.builds(
    NodeView,
    node_id=st.sampled_from(NODES),
    state=st.sampled_from(("alive",) * 4 + ("suspect",) * 2 + ("dead", "left")),
    draining=often(False, True),
    runtimes=often(frozenset({"wasm", "process"}), frozenset(), frozenset({"docker"})),
    labels=label_sets,
    slots=st.sampled_from((0, 1, 2, 2, 3, 8)),
    cpu_count=st.integers(1, 4),
    cpu_percent=st.floats(0, 100),
    load_1m=st.floats(0, 8),
    memory_available_bytes=st.sampled_from((0, 1000, 4000)),
    warm_idle=st.dictionaries(st.sampled_from(TASKS), st.integers(0, 2)),
)
demands = st.builds(
    Demand,
    task_id=st.sampled_from(TASKS),
    runtime=often("wasm", "process", "docker"),
    labels=often({}, {"zone": "a"}, {"gpu": "yes"}),
    node_id=often(None, *NODES),
    memory_bytes=often(0, 500, 2000, 5000),
    exclude=often(frozenset(), *(frozenset({n}) for n in NODES)),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("update"), views),
        st.tuples(st.just("remove"), st.sampled_from(NODES)),
        st.tuples(st.just("place"), demands),
        st.tuples(st.just("place"), demands),
        st.tuples(st.just("release"), st.integers(0, 100)),
    ),
    max_size=60,
)


def matches(v: NodeView, d: Demand) -> bool:
    """Every rule but room and memory (what decides UnavailableError vs SaturatedError)."""
    return (
        v.state in ("alive", "suspect")
        and not v.draining
        and d.runtime in v.runtimes
        and all(v.labels.get(k) == value for k, value in d.labels.items())
        and (d.node_id is None or d.node_id == v.node_id)
        and v.node_id not in d.exclude
    )


def fits(v: NodeView, in_flight: int, d: Demand) -> bool:
    memory_ok = not (d.memory_bytes and v.memory_available_bytes) or (
        v.memory_available_bytes >= d.memory_bytes
    )
    return matches(v, d) and in_flight < v.slots and memory_ok


@dataclass
class Model:
    """What the placer should know: the latest views and the open tickets."""

    views: dict[str, NodeView] = field(default_factory=dict)
    open: list[Ticket] = field(default_factory=list)

    def in_flight(self, node_id: str) -> int:
        return sum(1 for t in self.open if t.node_id == node_id)

    def fitting(self, d: Demand) -> list[NodeView]:
        return [v for v in self.views.values() if fits(v, self.in_flight(v.node_id), d)]


def run(ops: list[tuple[str, Any]], seed: int, model: Model | None = None) -> list[str]:
    """Apply `ops` to a placer, checking it against the model after each; the outcomes."""
    model = model or Model()
    placer = Placer(rng=random.Random(seed))
    outcomes = []
    for kind, arg in ops:
        if kind == "update":
            placer.update(arg)
            model.views[arg.node_id] = arg
        elif kind == "remove":
            placer.remove(arg)
            model.views.pop(arg, None)
        elif kind == "release" and model.open:
            placer.release(model.open.pop(arg % len(model.open)))
        elif kind == "place":
            outcomes.append(place_and_check(placer, model, arg))
        for node_id in NODES:
            assert placer.in_flight(node_id) == model.in_flight(node_id)
        assert {v.node_id: v for v in placer.views()} == model.views
    for ticket in model.open:
        placer.release(ticket)
    assert [placer.in_flight(n) for n in NODES] == [0] * len(NODES)
    return outcomes


def place_and_check(placer: Placer, model: Model, d: Demand) -> str:
    fitting = model.fitting(d)
    try:
        ticket = placer.place(d)
    except UnavailableError as exc:
        assert not fitting, f"refused although {[v.node_id for v in fitting]} fit: {exc}"
        saturated = any(matches(v, d) for v in model.views.values())
        assert isinstance(exc, SaturatedError) == saturated, exc
        return f"{type(exc).__name__}: {exc}"
    node = model.views[ticket.node_id]
    assert node in fitting
    if node.state == "suspect":
        assert all(v.state == "suspect" for v in fitting), "suspect chosen over an alive node"
    assert ticket.task_id == d.task_id
    model.open.append(ticket)
    return ticket.node_id


@given(operations, st.integers(0, 2**32))
def test_placements_fit_refusals_are_true_and_counts_return_to_zero(
    ops: list[tuple[str, Any]], seed: int
) -> None:
    run(ops, seed)


@given(operations, st.integers(0, 2**32))
def test_the_same_seed_makes_the_same_choices(ops: list[tuple[str, Any]], seed: int) -> None:
    assert run(ops, seed) == run(ops, seed)


def rank(v: NodeView, in_flight: int, placed_warm: int, task_id: str) -> tuple[Any, ...]:
    """The ranking rule as docs/placement.md states it."""
    warm = v.warm_idle.get(task_id, 0) - placed_warm > 0
    pressure = int(max(v.cpu_percent / 100, v.load_1m / v.cpu_count) * 10)
    return (v.state != "alive", not warm, in_flight / v.slots, pressure)


@given(
    st.lists(views, min_size=2, max_size=len(NODES), unique_by=lambda v: v.node_id),
    st.lists(demands, max_size=30),
    st.integers(0, 2**32),
)
def test_the_best_ranked_fitting_node_wins(
    cluster: list[NodeView], asked: list[Demand], seed: int
) -> None:
    placer = Placer(rng=random.Random(seed))
    for v in cluster:
        placer.update(v)
    model = Model(views={v.node_id: v for v in cluster})
    placed: Counter[tuple[str, str]] = Counter()  # (node, task) -> placements, none released
    for d in asked:
        ranks = {
            v.node_id: rank(v, model.in_flight(v.node_id), placed[v.node_id, d.task_id], d.task_id)
            for v in model.fitting(d)
        }
        if not ranks:
            continue
        ticket = placer.place(d)
        assert ranks[ticket.node_id] == min(ranks.values())
        assert ticket.warm == (not ranks[ticket.node_id][1])
        placed[ticket.node_id, d.task_id] += 1
        model.open.append(ticket)
