"""DispatchSim's network: requests and one-way sends with seeded latency, loss, partitions
and crashes (see tests.sim.dispatch_sim)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import trio

from spear.errors import SpearError
from spear.mesh import (
    LinkClosedError,
    PeerUnreachableError,
    RemoteError,
    RequestTimeoutError,
)
from tests.sim.net import Latency

if TYPE_CHECKING:
    from tests.sim.dispatch_node import SimNode
    from tests.sim.dispatch_sim import DispatchSim

T = TypeVar("T")
PartitionMode = Literal["drop", "hold"]


@dataclass(slots=True)
class NetCounters:
    requests: int = 0
    sends: int = 0
    dropped: int = 0
    cut: int = 0
    held: int = 0
    lost_in_crash: int = 0


class _Reply:
    """Where the answer of one request lands."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: object = None
        self.error: SpearError | None = None

    def set(self, value: object = None, error: SpearError | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()

    async def get(self) -> object:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DispatchNet:
    """Requests and one-way sends between the simulated nodes (see tests.sim.dispatch_sim).

    A request to a node that is down fails at once (`PeerUnreachableError`: connection refused,
    it certainly did not arrive); one whose node crashes before answering fails with
    `LinkClosedError`; a lost request or answer shows as `RequestTimeoutError` at the timeout;
    a refusal by the handler (a `SpearError`) comes back as `RemoteError` with its code.
    """

    def __init__(self, seed: int, sim: DispatchSim) -> None:
        self._seed = seed
        self._sim = sim
        self.latency = Latency()
        self.drop_probability = 0.0
        self._cuts: dict[tuple[str, str], PartitionMode] = {}
        self._healed = trio.Event()
        self._rngs: dict[tuple[str, str], random.Random] = {}
        self.counters = NetCounters()

    # --- faults --------------------------------------------------------------------------

    def cut(self, a: str, b: str, mode: PartitionMode) -> None:
        """Cut both directions between `a` and `b`."""
        self._cuts[(a, b)] = self._cuts[(b, a)] = mode

    def isolate(self, name: str, mode: PartitionMode) -> None:
        for other in self._sim.names:
            if other != name:
                self.cut(name, other, mode)

    def heal(self) -> None:
        """End every partition; held messages go on after a retransmission delay."""
        self._cuts.clear()
        self._healed.set()
        self._healed = trio.Event()

    def connected(self, a: str, b: str) -> bool:
        return a == b or ((a, b) not in self._cuts and (b, a) not in self._cuts)

    # --- carrying ------------------------------------------------------------------------

    def _rng(self, src: str, dst: str) -> random.Random:
        rng = self._rngs.get((src, dst))
        if rng is None:
            rng = self._rngs[(src, dst)] = random.Random(f"{self._seed}:dnet:{src}->{dst}")
        return rng

    async def _carry(self, src: str, dst: str) -> bool:
        """Move one message from `src` to `dst`: whether it arrived."""
        rng = self._rng(src, dst)
        if self.drop_probability and rng.random() < self.drop_probability:
            self.counters.dropped += 1
            return False
        await trio.sleep(self.latency.sample(rng))
        held = False
        while (mode := self._cuts.get((src, dst))) is not None:
            if mode == "drop":
                self.counters.cut += 1
                return False
            if not held:
                self.counters.held += 1
                held = True
            await self._healed.wait()
            await trio.sleep(rng.uniform(0, self._sim.timings.flush_s))
        return True

    async def request(self, node: SimNode, dst: str, message: object, timeout_s: float) -> object:
        """Send a request from `node` to `dst` and return the answer (see the class)."""
        if not node.alive:  # a crashed node's cleanup sends nothing
            raise LinkClosedError(f"node {node.name} is down")
        src = node.name
        self.counters.requests += 1
        target = self._sim.up(dst)
        if target is None:
            raise PeerUnreachableError(f"node {dst} refused the connection (it is down)")
        box = _Reply()
        self._sim.nursery.start_soon(self._request, src, target, message, box)
        with trio.move_on_after(timeout_s):
            return await box.get()
        raise RequestTimeoutError(
            f"{type(message).__name__} to {dst} got no answer within {timeout_s:g} s"
        )

    async def _request(self, src: str, target: SimNode, message: object, box: _Reply) -> None:
        if not await self._carry(src, target.name):
            return
        if not target.alive:
            self.counters.lost_in_crash += 1
            box.set(error=LinkClosedError(f"the link to {target.name} closed"))
            return
        target.nursery.start_soon(self._answer, src, target, message, box)

    async def _answer(self, src: str, target: SimNode, message: object, box: _Reply) -> None:
        answered = False
        value: object = None
        error: SpearError | None = None
        try:
            try:
                value = await target.answer(message)
            except RemoteError as exc:
                error = exc
            except SpearError as exc:
                error = RemoteError(str(exc), code=exc.code, peer_id=target.name)
            answered = True
        finally:
            if not answered:  # the node crashed while answering: its links break
                box.set(error=LinkClosedError(f"the link to {target.name} closed"))
        self._sim.nursery.start_soon(self._reply, target.name, src, box, value, error)

    async def _reply(
        self, src: str, dst: str, box: _Reply, value: object, error: SpearError | None
    ) -> None:
        if await self._carry(src, dst):
            box.set(value, error)

    def send(self, node: SimNode, dst: str, message: object) -> None:
        """One way from `node` to `dst`, best effort, never blocks."""
        self.counters.sends += 1
        target = self._sim.up(dst)
        if node.alive and target is not None:
            self._sim.nursery.start_soon(self._send, node.name, target, message)

    async def _send(self, src: str, target: SimNode, message: object) -> None:
        if await self._carry(src, target.name) and target.alive:
            target.on_message(message)
