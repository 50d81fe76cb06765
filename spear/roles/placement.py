"""Placement: which Spearlet runs an invocation, as plain bookkeeping (no I/O, no clock, no trio).

The leader keeps one `Placer`. Gossip and the Spearlets' resource reports feed it one
`NodeView` per node (`update`, `remove`); each invocation asks `place` for a `Ticket` naming
its node and hands the ticket back with `release` when it ends. Between two reports of a node
the placer's own count of the tickets it holds open there is the freshest thing it knows, so
open tickets outlive updates and steer the next choices.

Rules (docs/placement.md says the same for users):

- A node *fits* a demand when it is alive, not draining, offers the runtime, carries every
  label asked for, is the pinned node if one is pinned, is not excluded, has room (fewer open
  tickets than its `slots`) and, when both are known, at least the demand's memory available.
  Suspect nodes are used only when no alive node fits; dead and left nodes never.
- Among fitting nodes: first those with a warm idle instance of the task (the report's count
  minus the tickets of that task placed there since that count was reported), then the least
  loaded (open tickets per slot, then the CPU pressure of the last report in steps of 10 %),
  ties broken in favour of the demand's `prefer` node (the one that received the
  invocation: no hop the data does not need), else by the RNG, so a seeded placer repeats
  its choices.
- A refusal names the rule that left no node: `UnavailableError` (503) when the cluster cannot
  run the demand now (no node alive, none offers the runtime or the labels, the pinned node is
  unknown, gone, draining or excluded), `SaturatedError` (429) when nodes fit but every one
  is full or short of memory.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from spear.errors import SaturatedError, UnavailableError

#: the SWIM states a NodeView may carry
STATES = frozenset({"alive", "suspect", "dead", "left"})
_LIVE = frozenset({"alive", "suspect"})
#: CPU pressure is ranked in steps of 1 / _PRESSURE_STEPS: finer differences in a sample a
#: report interval old are noise, and leaving them to the RNG spreads a burst instead
_PRESSURE_STEPS = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeView:
    """What the leader knows of one node: its gossip state and its last resource report.

    Attributes:
        node_id: the node's permanent id.
        state: its SWIM state, "alive", "suspect", "dead" or "left".
        draining: `spear nodes drain` was asked: no new work, running work finishes.
        runtimes: the runtimes it offers ("wasm", "process", "docker").
        labels: its node.labels, matched against a task's placement.labels.
        slots: executions it accepts at once (its node.max_running); 0 takes nothing.
        cpu_count: logical CPUs, to read `load_1m` per CPU.
        cpu_percent: system CPU use in the last report, 0-100.
        load_1m: the 1-minute load average in the last report.
        memory_available_bytes: memory available in the last report; 0 = unknown.
        warm_idle: task id -> warm instances of that task idle at the last report.
    """

    node_id: str
    state: str
    draining: bool = False
    runtimes: frozenset[str]
    labels: Mapping[str, str] = field(default_factory=dict)
    slots: int
    cpu_count: int = 1
    cpu_percent: float = 0.0
    load_1m: float = 0.0
    memory_available_bytes: int = 0
    warm_idle: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("NodeView.node_id must be non-empty")
        if self.state not in STATES:
            raise ValueError(
                f"NodeView.state must be one of alive, suspect, dead, left, got {self.state!r}"
            )
        for name in ("slots", "memory_available_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"NodeView.{name} must be >= 0, got {getattr(self, name)}")
        if self.cpu_count < 1:
            raise ValueError(f"NodeView.cpu_count must be >= 1, got {self.cpu_count}")
        if not (self.cpu_percent >= 0 and self.load_1m >= 0):  # also refuses NaN
            raise ValueError(
                "NodeView.cpu_percent and load_1m must be >= 0, "
                f"got {self.cpu_percent} and {self.load_1m}"
            )
        for task_id, idle in self.warm_idle.items():
            if idle < 0:
                raise ValueError(f"NodeView.warm_idle[{task_id!r}] must be >= 0, got {idle}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Demand:
    """What one invocation needs of a node.

    Attributes:
        task_id: the task invoked (its warm instances attract it).
        runtime: the runtime the task needs.
        labels: the task's placement.labels; a node must carry every key with that value.
        node_id: the task's placement.node_id pin; None = any node.
        memory_bytes: the task's memory limit; 0 = do not check memory.
        exclude: nodes not to use (e.g. the one where this invocation just failed).
        prefer: the node that received the invocation: among equally ranked nodes it wins,
            so the data takes no hop it does not need.
    """

    task_id: str
    runtime: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node_id: str | None = None
    memory_bytes: int = 0
    exclude: frozenset[str] = frozenset()
    prefer: str | None = None

    def __post_init__(self) -> None:
        if not self.task_id or not self.runtime:
            raise ValueError(
                f"Demand.task_id and runtime must be non-empty, got {self.task_id!r} "
                f"and {self.runtime!r}"
            )
        if self.memory_bytes < 0:
            raise ValueError(f"Demand.memory_bytes must be >= 0, got {self.memory_bytes}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """One placement, counted on its node until `Placer.release`.

    Attributes:
        node_id: the node chosen.
        task_id: the task placed.
        warm: the node was expected to hold an idle warm instance of the task for it.
        serial: unique among the tickets of one placer.
    """

    node_id: str
    task_id: str
    warm: bool
    serial: int


@dataclass(eq=False, slots=True)
class _Count:
    """Open tickets of one task on one node, placed since its idle count was reported."""

    n: int = 0


@dataclass(eq=False, slots=True)
class _Node:
    """A node's view, the parts of it `_choose` reads (flattened for speed), and the
    placer's own counts for the node (kept while tickets are open, even without a view)."""

    node_id: str
    view: NodeView | None = None
    #: alive or suspect, and not draining: may take work at all
    usable: bool = False
    suspect: bool = False
    runtimes: frozenset[str] = frozenset()
    labels: frozenset[tuple[str, str]] = frozenset()
    slots: int = 0
    memory: int = 0
    warm_idle: Mapping[str, int] = field(default_factory=dict)
    #: CPU pressure of the last report, in steps of 1 / _PRESSURE_STEPS
    pressure: int = 0
    in_flight: int = 0
    warm_used: dict[str, _Count] = field(default_factory=dict)

    def show(self, view: NodeView | None) -> None:
        """Take `view` as the node's view (None: forget it, keep the counts)."""
        self.view = view
        if view is None:
            self.usable = False
            return
        self.usable = view.state in _LIVE and not view.draining
        self.suspect = view.state == "suspect"
        self.runtimes = frozenset(view.runtimes)
        self.labels = frozenset(view.labels.items())
        self.slots = view.slots
        self.memory = view.memory_available_bytes
        self.warm_idle = view.warm_idle
        pressure = max(view.cpu_percent / 100, view.load_1m / view.cpu_count)
        self.pressure = int(pressure * _PRESSURE_STEPS)


class Placer:
    """Chooses the node for each invocation and counts what it placed until released.

    Not thread-safe; the leader calls it from its one trio thread.
    """

    def __init__(self, *, rng: random.Random, retry_after_s: float = 1.0) -> None:
        """`rng` breaks ties (seed it for the simulator); `retry_after_s` goes into refusals."""
        self._rng = rng
        self._retry_after_s = retry_after_s
        self._nodes: dict[str, _Node] = {}
        self._open: dict[int, tuple[_Node, _Count | None]] = {}
        self._serial = 0

    # --- the cluster view ------------------------------------------------------------------

    def update(self, view: NodeView) -> None:
        """Insert or replace a node's view; its open tickets stay counted.

        A task whose idle count the new view changes starts a fresh warm estimate (the new
        count already saw the tickets placed before it); one whose count is unchanged, as in
        an update from gossip alone, keeps counting the tickets placed since.
        """
        node = self._nodes.get(view.node_id)
        if node is None:
            node = self._nodes[view.node_id] = _Node(node_id=view.node_id)
        elif node.warm_used and node.warm_idle is not view.warm_idle:
            old, new = node.warm_idle, view.warm_idle
            for task_id in [t for t in node.warm_used if new.get(t, 0) != old.get(t, 0)]:
                del node.warm_used[task_id]
        node.show(view)

    def remove(self, node_id: str) -> None:
        """Forget a node's view (no-op if unknown); its open tickets stay counted."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        if node.in_flight:
            node.show(None)
        else:
            del self._nodes[node_id]

    def views(self) -> list[NodeView]:
        """The known nodes' views, in the order they were first added."""
        return [node.view for node in self._nodes.values() if node.view is not None]

    def in_flight(self, node_id: str) -> int:
        """Open tickets on a node (0 if unknown)."""
        node = self._nodes.get(node_id)
        return 0 if node is None else node.in_flight

    # --- placing ---------------------------------------------------------------------------

    def place(self, demand: Demand) -> Ticket:
        """Choose the node for `demand` and count the placement there until `release`.

        Raises:
            SaturatedError: nodes fit, but every one is full or short of memory (429).
            UnavailableError: no node can run the demand now; the message names the rule.
        """
        node = self._choose(demand)
        if node is None:
            raise self._refusal(demand)
        task_id = demand.task_id
        count = None
        warm = False
        idle = node.warm_idle.get(task_id, 0) if node.warm_idle else 0
        if idle:
            count = node.warm_used.get(task_id)
            if count is None:
                count = node.warm_used[task_id] = _Count()
            warm = count.n < idle
            count.n += 1
        node.in_flight += 1
        self._serial += 1
        self._open[self._serial] = (node, count)
        return Ticket(node_id=node.node_id, task_id=task_id, warm=warm, serial=self._serial)

    def release(self, ticket: Ticket) -> None:
        """The ticket's invocation ended; a ticket released twice counts once."""
        entry = self._open.pop(ticket.serial, None)
        if entry is None:
            return
        node, count = entry
        node.in_flight -= 1
        if count is not None:
            count.n -= 1
        if not node.in_flight and node.view is None and self._nodes.get(ticket.node_id) is node:
            del self._nodes[ticket.node_id]

    def _choose(self, demand: Demand) -> _Node | None:
        """The best fitting node, or None; one pass over the nodes."""
        task_id, runtime, exclude = demand.task_id, demand.runtime, demand.exclude
        memory = demand.memory_bytes
        labels = frozenset(demand.labels.items())
        nodes: Iterable[_Node]
        if demand.node_id is None:
            nodes = self._nodes.values()
        else:
            pinned = self._nodes.get(demand.node_id)
            nodes = () if pinned is None else (pinned,)
        best: list[_Node] = []
        best_rank: tuple[bool, bool, float, int] | None = None
        for node in nodes:
            if (
                not node.usable
                or node.in_flight >= node.slots
                or runtime not in node.runtimes
                or (exclude and node.node_id in exclude)
                or (labels and not labels <= node.labels)
                or (memory and 0 < node.memory < memory)
            ):
                continue
            idle = node.warm_idle.get(task_id, 0) if node.warm_idle else 0
            if idle:
                count = node.warm_used.get(task_id)
                cold = count is not None and count.n >= idle
            else:
                cold = True
            rank = (node.suspect, cold, node.in_flight / node.slots, node.pressure)
            if best_rank is None or rank < best_rank:
                best_rank = rank
                best = [node]
            elif rank == best_rank:
                best.append(node)
        if len(best) > 1:
            if demand.prefer is not None:
                for node in best:
                    if node.node_id == demand.prefer:
                        return node
            return best[self._rng.randrange(len(best))]
        return best[0] if best else None

    # --- refusals --------------------------------------------------------------------------

    def _refusal(self, demand: Demand) -> UnavailableError:
        """Why nothing fits: the first rule, in the order below, that left no node."""
        if demand.node_id is not None:
            return self._pinned_refusal(demand, demand.node_id)
        task, runtime = demand.task_id, demand.runtime
        views = [v for v in self.views() if v.state in _LIVE]
        if not views:
            return self._unavailable(
                f"no node is alive to run task {task!r}; start a node or wait for one to rejoin"
            )
        offered = sorted({r for v in views for r in v.runtimes})
        views = [v for v in views if runtime in v.runtimes]
        if not views:
            return self._unavailable(
                f"no alive node offers runtime {runtime!r} (they offer "
                f"{', '.join(offered) or 'none'}); enable runtimes.{runtime} on a node"
            )
        labels = tuple(demand.labels.items())
        views = [v for v in views if _has_labels(v, labels)]
        if not views:
            return self._unavailable(
                f"no alive node offering runtime {runtime!r} has the labels "
                f"placement.labels = {dict(demand.labels)!r}; set them in node.labels on a "
                "node or change the task's placement.labels"
            )
        views = [v for v in views if not v.draining]
        if not views:
            return self._unavailable(
                f"every node that fits task {task!r} is draining; undrain one or add a node"
            )
        views = [v for v in views if v.node_id not in demand.exclude]
        if not views:
            return self._unavailable(
                f"every node that fits task {task!r} already failed this invocation"
            )
        return self._saturated(demand, views)

    def _pinned_refusal(self, demand: Demand, pin: str) -> UnavailableError:
        node = self._nodes.get(pin)
        view = None if node is None else node.view
        subject = f"placement.node_id {pin!r}"
        if view is None:
            reason = "is not a known node; start it or change the task's placement.node_id"
        elif view.state not in _LIVE:
            gone = "is dead" if view.state == "dead" else "has left the cluster"
            reason = f"{gone}; restart it or change the task's placement.node_id"
        elif demand.runtime not in view.runtimes:
            reason = (
                f"does not offer runtime {demand.runtime!r}; enable runtimes.{demand.runtime} "
                "there or change the task's placement.node_id"
            )
        elif not _has_labels(view, tuple(demand.labels.items())):
            reason = (
                f"lacks the labels placement.labels = {dict(demand.labels)!r}; set them in "
                "its node.labels or change the task's placement"
            )
        elif view.draining:
            reason = "is draining; undrain it or change the task's placement.node_id"
        elif pin in demand.exclude:
            reason = "already failed this invocation"
        else:
            return self._saturated(demand, [view])
        return self._unavailable(f"{subject} {reason}")

    def _saturated(self, demand: Demand, views: list[NodeView]) -> SaturatedError:
        """The refusal for nodes that fit but have no room or memory."""
        task = demand.task_id
        memory = demand.memory_bytes
        roomy = [v for v in views if self.in_flight(v.node_id) < v.slots]
        short = [v for v in roomy if memory and 0 < v.memory_available_bytes < memory]
        if roomy and len(short) == len(roomy):
            most = max(v.memory_available_bytes for v in short)
            message = (
                f"no node that fits task {task!r} has its memory_limit_bytes = {memory} "
                f"available (at most {most}); retry later or lower the task's "
                "memory_limit_bytes"
            )
        else:
            busy = sum(self.in_flight(v.node_id) for v in views)
            slots = sum(v.slots for v in views)
            message = (
                f"every node that fits task {task!r} is full ({busy} executions in flight "
                f"in {slots} slots on {len(views)} node(s)); retry later or raise "
                "node.max_running"
            )
        return SaturatedError(message, retry_after_s=self._retry_after_s)

    def _unavailable(self, message: str) -> UnavailableError:
        return UnavailableError(message, retry_after_s=self._retry_after_s)


def _has_labels(view: NodeView, labels: tuple[tuple[str, str], ...]) -> bool:
    node_labels = view.labels
    return all(node_labels.get(key) == value for key, value in labels)
