"""The retransmit queue of membership updates (memberlist's TransmitLimitedQueue, by count).

Each queued update is about one node; a newer update about the same node replaces the older
one. Updates are handed out least-transmitted first and, within a tier, newest first; each
is sent at most `retransmit_limit(mult, n)` times, then dropped. Push-pull anti-entropy, not
this queue, is what guarantees completeness (research/mesh.md §1.5).
"""

from __future__ import annotations

import bisect
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


class _Tier:
    """The updates sent a given number of times: queue numbers ascending (newest last),
    and the updates in the same order."""

    __slots__ = ("seqs", "updates")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.updates: list[Update] = []

    def find(self, seq: int, lo: int = 0) -> int:
        """The position of `seq` in this tier, or -1."""
        seqs = self.seqs
        pos = bisect.bisect_left(seqs, seq, lo)
        return pos if pos < len(seqs) and seqs[pos] == seq else -1


class BroadcastQueue:
    """Updates waiting to be piggybacked or gossiped, one per subject node.

    Updates are kept in tiers by transmission count, each tier in queue order (newest
    last). A take is per message sent, the hottest path of the core in a large cluster (a
    mass join queues one update per member on every member), so it works on runs rather
    than single updates: the newest updates of a tier are one slice off its end, and they
    move to the next tier as one sorted run, spliced in where it belongs. A replaced update
    is removed from its tier at once (a bisection per tier), so no tier holds anything stale.
    """

    __slots__ = ("_budgets", "_by_node", "_low", "_mult", "_seq", "_tiers")

    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._by_node: dict[str, _Queued] = {}
        #: tier t: the updates sent t times
        self._tiers: list[_Tier] = [_Tier()]
        #: no tier below this one holds anything (a take skips them: once a mass join's
        #: updates have gone out a few times, the low tiers stay empty)
        self._low = 0
        self._budgets: dict[int, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_node)

    def queue(self, update: Update) -> None:
        """Queue `update`, replacing (removing) any queued update about the same node."""
        old = self._by_node.get(update.node_id)
        if old is not None:
            for tier in self._tiers:
                pos = tier.find(old.seq)
                if pos >= 0:
                    del tier.seqs[pos], tier.updates[pos]
                    break
        self._seq += 1
        subject = update.node_id if isinstance(update, AliveUpdate) else None
        self._by_node[update.node_id] = _Queued(update=update, seq=self._seq, subject_alive=subject)
        self._low = 0
        tier = self._tiers[0]
        tier.seqs.append(self._seq)  # the newest number: the tier stays sorted
        tier.updates.append(update)

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
        budget = self._budgets.get(n)
        if budget is None:
            budget = self._budgets[n] = retransmit_limit(self._mult, n)
        skip = self._by_node.get(recipient) if recipient else None
        skip_seq = skip.seq if skip is not None and skip.subject_alive == recipient else 0
        chosen: list[Update] = []
        runs: list[tuple[int, list[int], list[Update]]] = []
        tiers = self._tiers
        first = -1
        room = limit
        for transmits in range(self._low, len(tiers)):
            tier = tiers[transmits]
            seqs = tier.seqs
            if not seqs:
                continue
            if first < 0:
                first = transmits
            updates = tier.updates
            start = len(seqs) - room
            if start < 0:
                start = 0
            # The recipient's own alive update stays queued; the next older one is taken.
            at = tier.find(skip_seq, start) if skip_seq and skip_seq >= seqs[start] else -1
            if at >= 0 and start > 0:
                start -= 1
            if start:
                run_seqs, run_updates = seqs[start:], updates[start:]
                del seqs[start:], updates[start:]
            else:  # the whole tier (often one update, late in a dissemination): no copies
                run_seqs, run_updates = seqs, updates
                seqs = tier.seqs = []
                updates = tier.updates = []
            if at >= 0:
                seqs.append(run_seqs.pop(at - start))  # newer than everything left
                updates.append(run_updates.pop(at - start))
            if run_seqs:
                chosen.extend(reversed(run_updates))
                runs.append((transmits + 1, run_seqs, run_updates))
                room -= len(run_seqs)
                if not room:
                    break
        if first >= 0:
            # Runs only move up, to tiers above `first`.
            self._low = first if tiers[first].seqs else first + 1
        for transmits, run_seqs, run_updates in runs:
            if transmits >= budget:
                by_node = self._by_node
                for update in run_updates:
                    del by_node[update.node_id]
            else:
                self._splice(transmits, run_seqs, run_updates)
        return tuple(chosen)

    def _splice(self, transmits: int, seqs: list[int], updates: list[Update]) -> None:
        """Insert a sorted run of updates into tier `transmits`."""
        tiers = self._tiers
        while transmits >= len(tiers):
            tiers.append(_Tier())
        tier = tiers[transmits]
        if not tier.seqs:  # the run's lists are the take's own: the tier adopts them
            tier.seqs, tier.updates = seqs, updates
            return
        if tier.seqs[-1] < seqs[0]:
            tier.seqs.extend(seqs)
            tier.updates.extend(updates)
            return
        lo = bisect.bisect_left(tier.seqs, seqs[0])
        hi = bisect.bisect_left(tier.seqs, seqs[-1], lo)
        if lo == hi:
            tier.seqs[lo:lo] = seqs
            tier.updates[lo:lo] = updates
            return
        # Interleaved with the tier (numbers are unique): splice the run in blocks, each
        # the part of the run that falls between two neighbours in the tier (usually two:
        # older and newer updates than the tier holds).
        tier_seqs, tier_updates = tier.seqs, tier.updates
        start = 0
        while start < len(seqs):
            lo = bisect.bisect_left(tier_seqs, seqs[start], lo)
            end = len(seqs)
            if lo < len(tier_seqs):
                end = bisect.bisect_left(seqs, tier_seqs[lo], start)
            tier_seqs[lo:lo] = seqs[start:end]
            tier_updates[lo:lo] = updates[start:end]
            lo += end - start
            start = end

    def pending(self, node_id: str) -> Update | None:
        """The queued update about `node_id`, if any."""
        item = self._by_node.get(node_id)
        return None if item is None else item.update
