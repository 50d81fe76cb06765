"""RaftSim: N real Raft cores as simulated processes, a faulty network, clients, an observer.

Use it as an async context manager inside a test running under `autojump_clock`:

    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(3, writes=20)
        leader = await sim.wait_for_leader()
        sim.crash(leader.name)
        ...
        await sim.settle()          # the liveness phase + final checks

Everything random derives from `seed`: the network (per link), each core's RNG (per node and
process incarnation), each client, and the nemesis RNG `sim.rng` scenarios draw from.

Clients write `key=value` with the key as the idempotency key. Each attempt goes to the node
the client believes leads (the last NotLeader hint, else a random node) and ends as one of:
"ok" (the entry was applied at the (index, term) it was proposed at), "fail" (certainly not
written: the node refused or was down), "unknown" (timed out: may or may not be written).
Clients retry the same key until "ok", so after the liveness phase every write is done.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from tests.sim.disk import SimDisk
from tests.sim.invariants import Ack, LivenessViolation, RaftObserver
from tests.sim.net import Latency, SimNet
from tests.sim.process import NodeClock, Process
from tests.sim.raft_adapter import (
    APPEND_TYPES,
    ConfigChangeError,
    NotLeaderError,
    RaftTimings,
    bootstrap_cluster,
    new_core,
    sim_timings,
)
from tests.sim.raft_node import DriverFactory, RaftDriver


@dataclass(frozen=True, slots=True)
class ReadOp:
    """One successful linearizable read (virtual timestamps; `served_at`: the applied index
    the value was read at)."""

    client: str
    key: str
    value: str | None
    node: str
    invoked: float
    ended: float
    served_at: int


@dataclass(frozen=True, slots=True)
class Op:
    """One client attempt, for the history (virtual timestamps)."""

    client: str
    key: str
    value: str
    node: str
    invoked: float
    ended: float
    outcome: str
    index: int = 0
    term: int = 0


class RaftSim:
    """The simulated Raft cluster (see the module docstring).

    Args:
        seed: the one seed everything derives from.
        voters: how many voter nodes (named n1..nN).
        timings: Raft timings (default: the SIM profile).
        driver: the driver class (a broken variant for "test the tester").
        core_class: a RaftCore subclass to run instead (a broken variant, same purpose).
        codec: deliver encoded bytes through this codec.
        disk_lose: what a crash loses of unsynced writes ("all" or a random "prefix").
    """

    def __init__(
        self,
        seed: int,
        *,
        voters: int = 3,
        timings: RaftTimings | None = None,
        latency: Latency | None = None,
        driver: DriverFactory = RaftDriver,
        codec: Any = None,
        disk_lose: Literal["all", "prefix"] = "all",
        client_timeout_s: float = 5.0,
        core_class: type | None = None,
        standbys: int = 0,
        clocks: dict[str, NodeClock] | None = None,
    ) -> None:
        self.seed = seed
        self.timings = timings or sim_timings()
        self.net = SimNet(seed, latency=latency, codec=codec)
        self.names = [f"n{i}" for i in range(1, voters + standbys + 1)]
        #: the bootstrap voters; the other names are standbys with no Raft state
        self.voters = self.names[:voters]
        self.rng = random.Random(f"{seed}:nemesis")
        self.observer = RaftObserver(append_message_types=APPEND_TYPES)
        self.client_timeout_s = client_timeout_s
        self.history: list[Op] = []
        self.reads: list[ReadOp] = []
        self._driver = driver
        self._core_class = core_class
        self.procs = {
            name: Process(
                name,
                net=self.net,
                disk=SimDisk(random.Random(f"{seed}:disk:{name}"), lose=disk_lose),
                factory=lambda proc: self._driver(proc, self),
                clock=(clocks or {}).get(name),
            )
            for name in self.names
        }
        #: node name -> crash on its next persist, between write and fsync (§C13)
        self.crash_during_persist: dict[str, bool] = {}
        self._nursery: trio.Nursery | None = None
        self._clients: list[trio.Event] = []

    def make_core(self, **kwargs: Any) -> Any:
        """Build one RaftCore with the simulation's timings (called by the drivers)."""
        return new_core(timings=self.timings, core_class=self._core_class, **kwargs)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the simulation is not running"
        return self._nursery

    def node(self, name: str) -> RaftDriver:
        driver = self.procs[name].driver
        assert isinstance(driver, RaftDriver), f"{name} is down"
        return driver

    def up_nodes(self) -> list[RaftDriver]:
        return [p.driver for p in self.procs.values() if isinstance(p.driver, RaftDriver)]

    def leader(self) -> RaftDriver | None:
        """The live leader of the highest term, if any."""
        leaders = [n for n in self.up_nodes() if n.core.role == "leader"]
        return max(leaders, key=lambda n: n.core.term) if leaders else None

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for proc in self.procs.values():
            proc.start(nursery)
        bootstrap_cluster([self.node(n) for n in self.voters], self.voters)

    # -- nemesis ---------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        self.procs[name].crash()

    def restart(self, name: str) -> None:
        self.procs[name].restart(self.nursery)

    def pause(self, name: str, duration_s: float) -> None:
        self.procs[name].pause(duration_s)

    def others(self, name: str) -> list[str]:
        return [n for n in self.names if n != name]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait, step by step, until `predicate()` holds; fail (liveness) at the bound."""
        with trio.move_on_after(timeout_s):
            while not predicate():
                await self.observer.wait_step()
            return
        raise LivenessViolation(f"liveness: {what} not within {timeout_s} s (seed {self.seed})")

    async def wait_for_leader(
        self,
        timeout_s: float = 30.0,
        *,
        among: Sequence[str] | None = None,
        quorum: bool = True,
    ) -> RaftDriver:
        """The leader once one exists whose term a majority of live nodes share; with
        `among`, only a leader from those nodes counts; with `quorum=False`, any live leader
        (its followers may not have heard yet)."""
        found: list[RaftDriver] = []

        def ready() -> bool:
            leader = self.leader()
            if leader is None or (among is not None and leader.name not in among):
                return False
            if not quorum or self._majority_follows(leader):
                found[:] = [leader]
                return True
            return False

        await self.wait_for(ready, timeout_s, "a leader followed by a majority")
        return found[0]

    def _majority_follows(self, leader: RaftDriver) -> bool:
        voters = leader.core.voters
        followers = [
            n
            for n in self.up_nodes()
            if n.name in voters
            and n.core.term == leader.core.term
            and n.core.leader_id == leader.name
        ]
        return len(followers) * 2 > len(voters)

    def members(self) -> list[RaftDriver]:
        """The live nodes in the current leader's configuration (all live nodes if none)."""
        leader = self.leader()
        if leader is None:
            return self.up_nodes()
        members = leader.core.membership.members
        return [n for n in self.up_nodes() if n.name in members]

    # -- clients ---------------------------------------------------------------------------

    def start_clients(self, count: int, *, writes: int, gap_s: float = 0.05) -> None:
        """Start `count` clients, each writing `writes` keys one after another."""
        for i in range(count):
            done = trio.Event()
            self._clients.append(done)
            rng = random.Random(f"{self.seed}:client:{i}")
            self.nursery.start_soon(self._client, f"c{i}", rng, writes, gap_s, done)

    async def _client(
        self, name: str, rng: random.Random, writes: int, gap_s: float, done: trio.Event
    ) -> None:
        hint: str | None = None
        for n in range(writes):
            key, value = f"{name}-{n}", f"v{rng.randrange(10**6)}"
            while True:
                target = hint if hint is not None else rng.choice(self.names)
                op, hint = await self._attempt(name, target, key, value)
                self.history.append(op)
                if op.outcome == "ok":
                    break
                await trio.sleep(rng.uniform(0.05, 0.2))
            await trio.sleep(rng.uniform(0, gap_s))
        done.set()

    async def _attempt(
        self, client: str, target: str, key: str, value: str
    ) -> tuple[Op, str | None]:
        start = trio.current_time()
        proc = self.procs[target]
        if not isinstance(proc.driver, RaftDriver) or proc.paused_until > start:
            return Op(client, key, value, target, start, start, "fail"), None
        try:
            proposal = proc.driver.propose(f"{key}={value}".encode())
        except NotLeaderError as exc:
            hint = getattr(exc, "leader_id", None)
            return Op(client, key, value, target, start, start, "fail"), hint
        with trio.move_on_after(self.client_timeout_s):
            await proposal.done.wait()
        end = trio.current_time()
        outcome = {"ok": "ok", "lost": "fail"}.get(proposal.outcome, "unknown")
        op = Op(client, key, value, target, start, end, outcome, proposal.index, proposal.term)
        if outcome == "ok":
            ack = Ack(proposal.index, proposal.term, key, value, end)
            leaders = [n for n in self.up_nodes() if n.core.role == "leader"]
            self.observer.record_ack(ack, leaders)
        return op, (target if outcome == "ok" else None)

    def start_readers(self, count: int, *, reads: int, gap_s: float = 0.4) -> None:
        """Start `count` clients, each reading `reads` keys (linearizable reads), mostly
        keys already acknowledged to a writer, some not yet."""
        for i in range(count):
            done = trio.Event()
            self._clients.append(done)
            rng = random.Random(f"{self.seed}:reader:{i}")
            self.nursery.start_soon(self._reader, f"r{i}", rng, reads, gap_s, done)

    async def _reader(
        self, name: str, rng: random.Random, reads: int, gap_s: float, done: trio.Event
    ) -> None:
        hint: str | None = None
        while not self.observer.acks:  # reads start once writes are being acknowledged
            await self.observer.wait_step()
        for _ in range(reads):
            acks = self.observer.acks
            if acks and rng.random() < 0.8:
                key = rng.choice(acks[-10:]).key  # the newest acks are the ones at risk
            else:
                key = f"c{rng.randrange(3)}-{rng.randrange(10)}"
            while True:  # retried until served, like a write
                # Now and then a random node despite the hint: a stale node must refuse.
                if hint is None or rng.random() < 0.3:
                    hint = rng.choice(self.names)
                target = hint
                hint, ok = await self._read_attempt(name, target, key)
                if ok:
                    break
                await trio.sleep(rng.uniform(0.05, 0.2))
            await trio.sleep(rng.uniform(gap_s / 4, gap_s))
        done.set()

    async def _read_attempt(self, client: str, target: str, key: str) -> tuple[str | None, bool]:
        """One read attempt: (the node to try next, whether it was served)."""
        start = trio.current_time()
        proc = self.procs[target]
        if not isinstance(proc.driver, RaftDriver) or proc.paused_until > start:
            return None, False
        try:
            read = proc.driver.read(key)
        except NotLeaderError as exc:
            return getattr(exc, "leader_id", None), False
        with trio.move_on_after(self.client_timeout_s):
            await read.done.wait()
        if read.outcome == "ok":
            op = ReadOp(client, key, read.value, target, start, trio.current_time(), read.served_at)
            self.reads.append(op)
            return target, True
        return None, False

    async def change_config(self, change: str, node_id: str, *, timeout_s: float = 30.0) -> None:
        """Have the leader make one configuration change; retry (on whichever node leads)
        until it is committed or the leader's configuration already shows it."""

        def done() -> bool:
            leader = self.leader()
            if leader is None:
                return False
            m = leader.core.membership
            configs = [e.index for e in leader.log if e.kind == "config"]
            if configs and configs[-1] > leader.core.commit_index:
                return False  # the latest configuration is not committed yet
            return {
                "add_learner": node_id in m.members,
                "promote": node_id in m.voters,
                "remove_node": node_id not in m.members,
            }[change]

        with trio.fail_after(timeout_s):
            while not done():
                leader = await self.wait_for_leader(timeout_s)
                try:
                    proposal = leader.change_config(change, node_id)
                except (NotLeaderError, ConfigChangeError):
                    await trio.sleep(0.2)
                    continue
                with trio.move_on_after(self.client_timeout_s):
                    await proposal.done.wait()
                if proposal.outcome != "ok":
                    await trio.sleep(0.2)

    # -- liveness phase --------------------------------------------------------------------

    async def settle(self, *, bound_s: float = 60.0) -> None:
        """Heal every fault, restart every node, then require, within `bound_s`: a leader, all
        client writes done, every node applied up to the leader's commit; then check I5."""
        self.net.heal()
        self.net.set_all(drop_probability=0.0, duplicate_probability=0.0)
        for proc in self.procs.values():
            proc.paused_until = 0.0
            proc.starve_delay = None
            if not proc.up:
                proc.start(self.nursery)
        with trio.move_on_after(bound_s) as scope:
            for done in self._clients:
                await done.wait()
            await self.wait_for(self._converged, bound_s, "convergence")
        if scope.cancelled_caught:
            pending = sum(1 for d in self._clients if not d.is_set())
            leader = self.leader()
            raise LivenessViolation(
                f"liveness: not settled within {bound_s} s of healing: {pending} clients "
                f"pending, leader {leader and leader.name}, (node, commit, applied) "
                f"{[(n.name, n.core.commit_index, n.kv.applied_index) for n in self.up_nodes()]}"
            )
        self.observer.check_final_state(self.members())

    def _converged(self) -> bool:
        """One leader followed by a majority, which committed an entry of its term, and every
        live node applied up to its commit index."""
        leader = self.leader()
        if leader is None or not self._majority_follows(leader):
            return False
        target = leader.core.commit_index
        committed = leader.entry_at(target)
        if committed is None or committed.term != leader.core.term:
            return False  # the leader's own no-op is not committed yet: its commit may lag
        return all(n.kv.applied_index >= target for n in self.members())


@asynccontextmanager
async def open_raft_sim(seed: int, **kwargs: Any) -> AsyncIterator[RaftSim]:
    """Run a RaftSim for the body of the `async with`; every process stops at exit."""
    sim = RaftSim(seed, **kwargs)
    async with trio.open_nursery() as nursery:
        await sim.start(nursery)
        yield sim
        nursery.cancel_scope.cancel()
