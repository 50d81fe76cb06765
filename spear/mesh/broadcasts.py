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
    transmits: int = 0


class BroadcastQueue:
    """Updates waiting to be piggybacked or gossiped, one per subject node.

    Updates are kept in tiers by transmission count, each tier a heap of negated queue
    numbers (newest first), so taking the few least-sent, newest updates costs O(log n)
    per update rather than a scan or a sorted insert (a mass join queues one update per
    member on every member). A replaced update leaves a stale number in its heap, skipped
    when it surfaces.
    """

    __slots__ = ("_by_node", "_by_seq", "_mult", "_seq", "_tiers")

    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._by_node: dict[str, _Queued] = {}
        self._by_seq: dict[int, _Queued] = {}
        self._tiers: dict[int, list[int]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_node)

    def queue(self, update: Update) -> None:
        """Queue `update`, replacing (invalidating) any queued update about the same node."""
        old = self._by_node.get(update.node_id)
        if old is not None:
            del self._by_seq[old.seq]
        self._seq += 1
        item = _Queued(update=update, seq=self._seq)
        self._by_node[update.node_id] = item
        self._by_seq[item.seq] = item
        heapq.heappush(self._tiers.setdefault(0, []), -item.seq)

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
        chosen: list[_Queued] = []
        by_seq, tiers = self._by_seq, self._tiers
        for transmits in sorted(tiers):
            heap = tiers[transmits]
            skipped: list[int] = []
            while heap and len(chosen) < limit:
                key = heapq.heappop(heap)
                item = by_seq.get(-key)
                if item is None or item.transmits != transmits:
                    continue  # replaced by a newer update, or sent its budget
                if item.update.node_id == recipient and isinstance(item.update, AliveUpdate):
                    skipped.append(key)
                    continue
                chosen.append(item)
            for key in skipped:
                heapq.heappush(heap, key)
            if not heap:
                del tiers[transmits]
            if len(chosen) >= limit:
                break
        budget = retransmit_limit(self._mult, n)
        for item in chosen:
            item.transmits += 1
            if item.transmits >= budget:
                del self._by_node[item.update.node_id]
                del by_seq[item.seq]
            else:
                heapq.heappush(tiers.setdefault(item.transmits, []), -item.seq)
        return tuple(item.update for item in chosen)

    def pending(self, node_id: str) -> Update | None:
        """The queued update about `node_id`, if any."""
        item = self._by_node.get(node_id)
        return None if item is None else item.update
