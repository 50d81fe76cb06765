"""The retransmit queue of membership updates (memberlist's TransmitLimitedQueue, by count).

Each queued update is about one node; a newer update about the same node replaces the older
one. Updates are handed out least-transmitted first and, within a tier, newest first; each
is sent at most `retransmit_limit(mult, n)` times, then dropped. Push-pull anti-entropy, not
this queue, is what guarantees completeness (research/mesh.md §1.5).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from spear.mesh.swim_messages import AliveUpdate, Update


def retransmit_limit(mult: int, n: int) -> int:
    """How often one update is sent when `n` members are known: mult * ceil(log10(n + 1)),
    raised to n - 1 below 10 members so a small cluster still reaches every peer directly."""
    limit = mult * math.ceil(math.log10(n + 1))
    if n < 10:
        limit = max(limit, n - 1)
    return max(1, limit)


@dataclass(slots=True)
class _Queued:
    update: Update
    seq: int
    #: the update's subject when it is an alive update (never sent to that node), else None
    subject_alive: str | None
    transmits: int = 0


class BroadcastQueue:
    """Updates waiting to be piggybacked or gossiped, one per subject node.

    Updates are kept in tiers by transmission count, each tier a heap of negated queue
    numbers (newest first), so taking the few least-sent, newest updates costs O(log n)
    per update rather than a scan or a sorted insert (a mass join queues one update per
    member on every member). A replaced update leaves a stale number in its heap, skipped
    when it surfaces. Each tier also counts its live updates, so a take skips empty tiers
    and stops as soon as a tier has given what it holds, without draining stale numbers
    (a take in a large cluster is per message sent, the hottest path of the core).
    """

    __slots__ = ("_budgets", "_by_node", "_by_seq", "_live", "_mult", "_seq", "_tiers")

    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._by_node: dict[str, _Queued] = {}
        self._by_seq: dict[int, _Queued] = {}
        #: tier t (updates sent t times): a heap of negated queue numbers, and its live count
        self._tiers: list[list[int]] = [[]]
        self._live: list[int] = [0]
        self._budgets: dict[int, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_node)

    def queue(self, update: Update) -> None:
        """Queue `update`, replacing (invalidating) any queued update about the same node."""
        old = self._by_node.get(update.node_id)
        if old is not None:
            del self._by_seq[old.seq]
            self._live[old.transmits] -= 1
        self._seq += 1
        subject = update.node_id if isinstance(update, AliveUpdate) else None
        item = _Queued(update=update, seq=self._seq, subject_alive=subject)
        self._by_node[update.node_id] = item
        self._by_seq[item.seq] = item
        heapq.heappush(self._tiers[0], -item.seq)
        self._live[0] += 1

    def take(self, limit: int, n: int, *, recipient: str = "") -> tuple[Update, ...]:
        """Up to `limit` updates to send now, counting one transmission for each.

        Args:
            limit: most updates to return.
            n: members known now (sets the retransmit budget).
            recipient: node id of the receiver, if known: its own alive update is not sent
                to it (it would learn nothing and the transmission would be wasted).
        """
        if limit <= 0 or not self._by_node:
            return ()
        chosen = self._choose(limit, recipient)
        budget = self._budgets.get(n)
        if budget is None:
            budget = self._budgets[n] = retransmit_limit(self._mult, n)
        by_node, by_seq, tiers, live = self._by_node, self._by_seq, self._tiers, self._live
        push = heapq.heappush
        for item in chosen:
            transmits = item.transmits = item.transmits + 1
            if transmits >= budget:
                del by_node[item.update.node_id]
                del by_seq[item.seq]
                continue
            if transmits == len(tiers):
                tiers.append([])
                live.append(0)
            push(tiers[transmits], -item.seq)
            live[transmits] += 1
        return tuple([item.update for item in chosen])

    def _choose(self, limit: int, recipient: str) -> list[_Queued]:
        """The first `limit` live updates by (transmits, newest first), not counting the
        recipient's own alive update; each is taken out of its tier."""
        chosen: list[_Queued] = []
        by_seq, live = self._by_seq, self._live
        pop = heapq.heappop
        for transmits, heap in enumerate(self._tiers):
            count = live[transmits]
            if not count:
                heap.clear()  # only stale numbers are left in it
                continue
            skipped: int | None = None
            while count:
                key = pop(heap)
                item = by_seq.get(-key)
                if item is None or item.transmits != transmits:
                    continue  # replaced by a newer update, or moved to a later tier
                count -= 1
                if item.subject_alive == recipient:
                    skipped = key  # one update per node: at most one is skipped
                    continue
                chosen.append(item)
                if len(chosen) == limit:
                    break
            if skipped is not None:
                heapq.heappush(heap, skipped)
                count += 1
            live[transmits] = count
            if len(chosen) == limit:
                break
        return chosen

    def pending(self, node_id: str) -> Update | None:
        """The queued update about `node_id`, if any."""
        item = self._by_node.get(node_id)
        return None if item is None else item.update
