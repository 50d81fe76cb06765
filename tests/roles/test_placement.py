"""The placement core (pure): every rule that filters nodes, the ranking, the counts of open
tickets across updates, and every refusal with its message."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from spear.errors import SaturatedError, UnavailableError
from spear.mesh.members import MemberState
from spear.roles.placement import Demand, NodeView, Placer

TASK = "tk-0000000000000001"


def view(node_id: str, **fields: Any) -> NodeView:
    base: dict[str, Any] = {"state": "alive", "runtimes": frozenset({"wasm"}), "slots": 4}
    return NodeView(node_id=node_id, **(base | fields))


def demand(**fields: Any) -> Demand:
    return Demand(**({"task_id": TASK, "runtime": "wasm"} | fields))


def placer(*views: NodeView, seed: int = 0) -> Placer:
    p = Placer(rng=random.Random(seed))
    for v in views:
        p.update(v)
    return p


def chosen(p: Placer, d: Demand, times: int = 200) -> set[str]:
    """The nodes `d` lands on over `times` placements, each released at once."""
    seen = set()
    for _ in range(times):
        ticket = p.place(d)
        seen.add(ticket.node_id)
        p.release(ticket)
    return seen


# --- the rules that filter nodes --------------------------------------------------------------


def test_dead_and_left_nodes_are_never_chosen() -> None:
    p = placer(view("a", state="dead"), view("b", state="left"), view("c"))
    assert chosen(p, demand()) == {"c"}


def test_a_suspect_node_is_used_only_when_no_alive_node_fits() -> None:
    p = placer(view("s", state="suspect"), view("a", slots=1))
    first = p.place(demand())
    assert first.node_id == "a"
    assert p.place(demand()).node_id == "s"  # "a" is full now
    p.release(first)
    assert p.place(demand()).node_id == "a"


def test_a_draining_node_takes_no_new_work() -> None:
    p = placer(view("a", draining=True), view("b"))
    assert chosen(p, demand()) == {"b"}


def test_only_nodes_offering_the_runtime_are_chosen() -> None:
    p = placer(view("a"), view("b", runtimes=frozenset({"docker", "process"})))
    assert chosen(p, demand(runtime="docker")) == {"b"}
    assert chosen(p, demand(runtime="wasm")) == {"a"}


def test_every_label_asked_for_must_match() -> None:
    p = placer(
        view("a", labels={"zone": "a"}),
        view("b", labels={"zone": "b", "gpu": "yes"}),
        view("c", labels={"zone": "b"}),
    )
    assert chosen(p, demand(labels={"zone": "b", "gpu": "yes"})) == {"b"}
    assert chosen(p, demand(labels={"zone": "b"})) == {"b", "c"}
    assert chosen(p, demand()) == {"a", "b", "c"}


def test_a_pin_takes_only_the_pinned_node() -> None:
    p = placer(view("a"), view("b"), view("c"))
    assert chosen(p, demand(node_id="b")) == {"b"}


def test_excluded_nodes_are_left_out() -> None:
    p = placer(view("a"), view("b"), view("c"))
    assert chosen(p, demand(exclude=frozenset({"a", "c"}))) == {"b"}


def test_a_node_takes_no_more_than_its_slots() -> None:
    p = placer(view("a", slots=2), view("b", slots=0), view("c", slots=1))
    tickets = [p.place(demand()) for _ in range(3)]
    assert Counter(t.node_id for t in tickets) == {"a": 2, "c": 1}
    assert (p.in_flight("a"), p.in_flight("b"), p.in_flight("c")) == (2, 0, 1)
    with pytest.raises(SaturatedError):
        p.place(demand())


def test_memory_is_checked_when_both_sides_know_it() -> None:
    gib = 1 << 30
    p = placer(
        view("small", memory_available_bytes=gib),
        view("big", memory_available_bytes=4 * gib),
        view("unknown"),  # 0: no report yet, not a reason to refuse
    )
    assert chosen(p, demand(memory_bytes=2 * gib)) == {"big", "unknown"}
    assert chosen(p, demand(memory_bytes=gib)) == {"small", "big", "unknown"}
    assert chosen(p, demand()) == {"small", "big", "unknown"}


# --- the ranking -------------------------------------------------------------------------------


def test_a_node_with_a_warm_idle_instance_comes_first() -> None:
    p = placer(view("cold"), view("warm", warm_idle={TASK: 1}, cpu_percent=95.0, load_1m=3.0))
    ticket = p.place(demand())
    assert (ticket.node_id, ticket.warm) == ("warm", True)
    other = p.place(demand(task_id="tk-other"))  # warm for another task only
    assert (other.node_id, other.warm) == ("cold", False)


def test_a_burst_uses_each_warm_instance_once_then_the_least_loaded() -> None:
    p = placer(view("warm", warm_idle={TASK: 2}), view("cold"))
    tickets = [p.place(demand()) for _ in range(4)]
    assert [(t.node_id, t.warm) for t in tickets[:2]] == [("warm", True)] * 2
    # warm instances used up: least loaded now, the cold node (0/4) before warm (2/4)
    assert [(t.node_id, t.warm) for t in tickets[2:]] == [("cold", False)] * 2
    p.release(tickets[0])
    again = p.place(demand())
    assert (again.node_id, again.warm) == ("warm", True)


def test_a_report_that_changes_the_idle_count_restarts_the_warm_estimate() -> None:
    warm = view("warm", warm_idle={TASK: 1})
    p = placer(warm, view("cold"))
    first = p.place(demand())
    assert first.warm
    assert not p.place(demand()).warm  # the one idle instance is taken
    # gossip alone (same report figures, a new view object): still taken
    p.update(view("warm", warm_idle={TASK: 1}, state="alive"))
    assert not p.place(demand()).warm
    # a new report counting two idle instances: the new count already saw what ran before
    p.update(view("warm", warm_idle={TASK: 2}))
    assert [p.place(demand()).warm for _ in range(3)] == [True, True, False]
    p.release(first)  # counted against the old estimate: does not free a new one
    assert not p.place(demand()).warm


def test_the_least_loaded_node_comes_next_by_in_flight_per_slot() -> None:
    p = placer(view("a", slots=8), view("b", slots=2))
    placed = Counter(p.place(demand()).node_id for _ in range(5))
    # 0/8 vs 0/2 tie, then b at 1/2 loses to a at <= 3/8 ...: a takes 4, b takes 1
    assert placed == {"a": 4, "b": 1}


def test_cpu_and_load_per_cpu_break_equal_in_flight() -> None:
    busy_cpu = view("busy-cpu", cpu_percent=80.0)
    busy_load = view("busy-load", cpu_count=2, load_1m=1.8)  # 0.9 per CPU
    calm = view("calm", cpu_count=8, load_1m=1.8, cpu_percent=20.0)  # 0.225 per CPU
    p = placer(busy_cpu, busy_load, calm)
    assert chosen(p, demand()) == {"calm"}


def test_pressure_differences_under_ten_percent_are_ties() -> None:
    p = placer(view("a", cpu_percent=31.0), view("b", cpu_percent=38.0))
    assert chosen(p, demand()) == {"a", "b"}


def test_ties_are_broken_by_the_rng_and_repeat_with_the_seed() -> None:
    def run(seed: int) -> list[str]:
        p = placer(view("a"), view("b"), view("c"), seed=seed)
        return [p.place(demand()).node_id for _ in range(12)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert set(run(7)) == {"a", "b", "c"}


# --- counts of open tickets --------------------------------------------------------------------


def test_an_update_keeps_the_open_tickets() -> None:
    p = placer(view("a", slots=1), view("b", slots=1))
    ticket = p.place(demand())
    p.update(view(ticket.node_id, slots=1, cpu_percent=5.0))
    assert p.in_flight(ticket.node_id) == 1
    other = p.place(demand())
    assert other.node_id != ticket.node_id
    with pytest.raises(SaturatedError):
        p.place(demand())


def test_a_removed_node_is_not_chosen_and_its_tickets_still_release() -> None:
    p = placer(view("a"), view("b"))
    ticket = p.place(demand(node_id="a"))
    p.remove("a")
    p.remove("nobody")  # unknown: nothing to do
    assert [v.node_id for v in p.views()] == ["b"]
    assert chosen(p, demand()) == {"b"}
    assert p.in_flight("a") == 1
    p.update(view("a", slots=1))  # back before its ticket ended: still counted
    assert chosen(p, demand()) == {"b"}
    p.remove("a")
    p.release(ticket)
    assert p.in_flight("a") == 0
    p.update(view("a"))
    assert [v.node_id for v in p.views()] == ["b", "a"]


def test_a_node_back_after_removal_keeps_its_warm_estimate() -> None:
    p = placer(view("a", warm_idle={TASK: 1}), view("b"))
    ticket = p.place(demand())
    assert (ticket.node_id, ticket.warm) == ("a", True)
    p.remove("a")
    p.update(view("a", warm_idle={TASK: 1}))  # the same report: its instance is still taken
    second = p.place(demand(node_id="a"))
    assert not second.warm
    p.release(ticket)
    p.release(second)
    assert p.place(demand(node_id="a")).warm


def test_a_ticket_released_twice_counts_once() -> None:
    p = placer(view("a", warm_idle={TASK: 1}))
    first, second = p.place(demand()), p.place(demand())
    p.release(first)
    p.release(first)
    assert p.in_flight("a") == 1
    assert not p.place(demand()).warm  # `second` still holds the one warm instance
    p.release(second)


def test_views_are_the_latest_in_first_added_order() -> None:
    p = placer(view("b"), view("a"))
    p.update(view("b", draining=True))
    assert [(v.node_id, v.draining) for v in p.views()] == [("b", True), ("a", False)]


# --- refusals ----------------------------------------------------------------------------------


def refusal(p: Placer, d: Demand) -> UnavailableError:
    with pytest.raises(UnavailableError) as info:
        p.place(d)
    return info.value


@pytest.mark.parametrize(
    ("views", "asked", "message"),
    [
        ((), {}, "no node is alive to run task 'tk-0000000000000001'; start a node"),
        (
            (view("a", state="dead"), view("b", state="left")),
            {},
            "no node is alive to run task 'tk-0000000000000001'",
        ),
        (
            (view("a", runtimes=frozenset({"process", "wasm"})),),
            {"runtime": "docker"},
            "no alive node offers runtime 'docker' (they offer process, wasm); "
            "enable runtimes.docker on a node",
        ),
        (
            (view("a", labels={"zone": "a"}),),
            {"labels": {"zone": "b"}},
            "no alive node offering runtime 'wasm' has the labels placement.labels = "
            "{'zone': 'b'}; set them in node.labels on a node or change the task's "
            "placement.labels",
        ),
        (
            (view("a", draining=True),),
            {},
            "every node that fits task 'tk-0000000000000001' is draining; undrain one",
        ),
        (
            (view("a"),),
            {"exclude": frozenset({"a"})},
            "every node that fits task 'tk-0000000000000001' already failed this invocation",
        ),
        ((), {"node_id": "x"}, "placement.node_id 'x' is not a known node; start it or change"),
        ((view("x", state="dead"),), {"node_id": "x"}, "placement.node_id 'x' is dead; restart"),
        (
            (view("x", state="left"),),
            {"node_id": "x"},
            "placement.node_id 'x' has left the cluster; restart it",
        ),
        (
            (view("x"),),
            {"node_id": "x", "runtime": "docker"},
            "placement.node_id 'x' does not offer runtime 'docker'; enable runtimes.docker there",
        ),
        (
            (view("x"),),
            {"node_id": "x", "labels": {"gpu": "yes"}},
            "placement.node_id 'x' lacks the labels placement.labels = {'gpu': 'yes'}",
        ),
        (
            (view("x", draining=True), view("y")),
            {"node_id": "x"},
            "placement.node_id 'x' is draining; undrain it",
        ),
        (
            (view("x"),),
            {"node_id": "x", "exclude": frozenset({"x"})},
            "placement.node_id 'x' already failed this invocation",
        ),
    ],
)
def test_a_cluster_that_cannot_run_the_demand_answers_unavailable(
    views: tuple[NodeView, ...], asked: dict[str, Any], message: str
) -> None:
    error = refusal(placer(*views), demand(**asked))
    assert type(error) is UnavailableError
    assert str(error).startswith(message), str(error)


def test_full_nodes_answer_saturated_with_the_counts() -> None:
    p = placer(view("a", slots=1), view("b", slots=2), view("c", runtimes=frozenset({"docker"})))
    for _ in range(3):
        p.place(demand())
    error = refusal(p, demand())
    assert isinstance(error, SaturatedError)
    assert str(error) == (
        "every node that fits task 'tk-0000000000000001' is full (3 executions in flight in "
        "3 slots on 2 node(s)); retry later or raise node.max_running"
    )


def test_a_full_pinned_node_answers_saturated() -> None:
    p = placer(view("x", slots=1), view("y"))
    p.place(demand(node_id="x"))
    error = refusal(p, demand(node_id="x"))
    assert isinstance(error, SaturatedError)
    assert "(1 executions in flight in 1 slots on 1 node(s))" in str(error)


def test_nodes_short_of_memory_answer_saturated_naming_memory_limit_bytes() -> None:
    p = placer(view("a", memory_available_bytes=1000), view("b", memory_available_bytes=3000))
    error = refusal(p, demand(memory_bytes=4096))
    assert isinstance(error, SaturatedError)
    assert str(error) == (
        "no node that fits task 'tk-0000000000000001' has its memory_limit_bytes = 4096 "
        "available (at most 3000); retry later or lower the task's memory_limit_bytes"
    )


def test_refusals_carry_the_configured_retry_after() -> None:
    p = Placer(rng=random.Random(0), retry_after_s=2.5)
    assert refusal(p, demand()).retry_after_s == 2.5
    p.update(view("a", slots=0))
    assert refusal(p, demand()).retry_after_s == 2.5


def test_a_refusal_counts_nothing() -> None:
    p = placer(view("a", slots=1))
    ticket = p.place(demand())
    for _ in range(3):
        refusal(p, demand())
    assert p.in_flight("a") == 1
    p.release(ticket)
    assert p.in_flight("a") == 0


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"node_id": ""}, "NodeView.node_id must be non-empty"),
        ({"state": "gone"}, "NodeView.state must be one of alive, suspect, dead, left, got 'gone'"),
        ({"slots": -1}, "NodeView.slots must be >= 0, got -1"),
        ({"memory_available_bytes": -5}, "NodeView.memory_available_bytes must be >= 0, got -5"),
        ({"cpu_count": 0}, "NodeView.cpu_count must be >= 1, got 0"),
        ({"cpu_percent": float("nan")}, "NodeView.cpu_percent and load_1m must be >= 0"),
        ({"load_1m": -0.5}, "NodeView.cpu_percent and load_1m must be >= 0, got 0.0 and -0.5"),
        ({"warm_idle": {TASK: -1}}, f"NodeView.warm_idle['{TASK}'] must be >= 0, got -1"),
    ],
)
def test_a_bad_node_view_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"node_id": "a", "state": "alive", "runtimes": frozenset(), "slots": 1}
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        NodeView(**(base | fields))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task_id": ""}, "Demand.task_id and runtime must be non-empty, got '' and 'wasm'"),
        ({"runtime": ""}, "Demand.task_id and runtime must be non-empty"),
        ({"memory_bytes": -1}, "Demand.memory_bytes must be >= 0, got -1"),
    ],
)
def test_a_bad_demand_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        demand(**fields)


def test_a_mesh_state_enum_is_a_valid_state() -> None:
    p = placer(view("a", state=MemberState.SUSPECT))
    assert p.place(demand()).node_id == "a"


def test_a_tie_goes_to_the_preferred_node_but_load_still_wins() -> None:
    placer = Placer(rng=random.Random(3))
    for node_id in ("n1", "n2", "n3"):
        placer.update(
            NodeView(node_id=node_id, state="alive", runtimes=frozenset({"wasm"}), slots=4)
        )
    demand = Demand(task_id="tk-1", runtime="wasm", prefer="n2")
    first = placer.place(demand)
    assert first.node_id == "n2"
    placer.release(first)
    assert placer.place(demand).node_id == "n2"  # n2 now holds one: the others are lighter
    assert placer.place(demand).node_id in ("n1", "n3")
