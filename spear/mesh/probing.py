"""Probe bookkeeping: the randomized round-robin order, one probe round, indirect relays.

SWIM's time-bounded completeness comes from the order: walk a shuffled list of members,
reshuffle after each pass, insert newcomers at random positions; any live member is then
probed at least once every 2n - 1 rounds (research/mesh.md rule 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random  # annotations only: randomness is passed in, never created


class ProbeOrder:
    """A shuffled ring of node ids walked one probe at a time."""

    __slots__ = ("_ids", "_index", "_members", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._ids: list[str] = []
        # The same ids as a set: a join storm adds n members to each of n tables, and a
        # membership test on the list would make that cubic.
        self._members: set[str] = set()
        self._index = 0

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._members

    def add(self, node_id: str) -> None:
        """Insert a new member at a random position (never twice)."""
        if node_id in self._members:
            return
        self._members.add(node_id)
        self._ids.insert(self._rng.randrange(len(self._ids) + 1), node_id)  # = randint(0, n)

    def remove(self, node_id: str) -> None:
        """Forget a member, keeping the walk's position over the others."""
        if node_id not in self._members:
            return
        self._members.discard(node_id)
        position = self._ids.index(node_id)
        del self._ids[position]
        if position < self._index:
            self._index -= 1

    def sample(self, k: int, accept: Callable[[str], bool]) -> list[str]:
        """Up to `k` distinct random members for which `accept(id)` holds.

        Tries random picks first (cheap in a large, mostly healthy cluster) and falls back
        to a full scan when they do not find enough.
        """
        chosen: list[str] = []
        if not self._ids or k <= 0:
            return chosen
        for _ in range(4 * k):
            node_id = self._ids[self._rng.randrange(len(self._ids))]
            if node_id not in chosen and accept(node_id):
                chosen.append(node_id)
                if len(chosen) == k:
                    return chosen
        rest = [i for i in self._ids if i not in chosen and accept(i)]
        return chosen + self._rng.sample(rest, min(k - len(chosen), len(rest)))

    def next(self, probeable: Callable[[str], bool]) -> str | None:
        """The next member to probe for which `probeable(id)` holds, or None if none does.

        Reaching the end of the ring reshuffles it (one pass visits every member once).
        """
        for _ in range(len(self._ids) + 1):
            if self._index >= len(self._ids):
                self._rng.shuffle(self._ids)
                self._index = 0
                if not self._ids:
                    return None
            node_id = self._ids[self._index]
            self._index += 1
            if probeable(node_id):
                return node_id
        return None


@dataclass(slots=True, kw_only=True)
class ProbeRound:
    """The probe in flight: a direct ping, then indirect pings at `direct_deadline`, a
    verdict at `end` (start + the awareness-scaled probe interval)."""

    seq: int
    target_id: str
    target_address: str
    direct_deadline: float
    end: float
    #: the target's incarnation when the round started: a silence convicts only that one
    incarnation: int = 0
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    acked: bool = False


@dataclass(slots=True, kw_only=True)
class Relay:
    """A PingRequest this node is serving as helper: our ping `seq` stands for the
    requester's `requester_seq`; a Nack goes back at `nack_deadline` if the target is silent,
    and a late ack is still relayed until `expires`."""

    requester_id: str
    requester_address: str
    requester_seq: int
    nack_deadline: float
    expires: float
    nacked: bool = False
