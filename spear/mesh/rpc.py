"""Request/response correlation with deadlines, sans-I/O: the pending-request table.

The transport numbers each request, remembers who may answer it and until when, and asks this
table what to do with every reply frame. The table never sleeps and never reads a clock: it is
given `now` and returns verdicts. It is generic over the waiter `W` the driver attaches to a
request (a trio channel in the transport, a plain object in tests and the simulator).

Rules:
- Request ids are positive, increasing and never reused by one table (id 0 means "no reply
  wanted" on the wire).
- A reply is accepted only from the peer the request went to, only while the request is
  pending; a duplicate, late (after expiry or cancel) or unsolicited reply is ignored and
  counted, never an error: the peer may simply be slow.
- A unary request ends with its first reply. A stream takes any number of items and ends with
  an end frame or an error frame; each item pushes its deadline out by the stream's idle
  timeout, so a long stream lives as long as it keeps talking.
- `expire(now)` removes and returns every request whose deadline has passed; `fail_peer(peer)`
  removes and returns every request waiting on a peer whose link broke.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

W = TypeVar("W")


class ReplyKind(Enum):
    """What a reply frame does to its request."""

    REPLY = "reply"  # the one answer of a unary request
    ITEM = "item"  # one item of a stream
    END = "end"  # a stream's normal end
    ERROR = "error"  # the responder failed the request (unary or stream)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict(Generic[W]):
    """An accepted reply: who waits for it and whether the request is now finished."""

    waiter: W
    finished: bool


@dataclass(slots=True, kw_only=True)
class _Pending(Generic[W]):
    peer: Hashable
    deadline: float
    stream: bool
    idle_timeout_s: float
    waiter: W


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcStatistics:
    pending: int
    opened: int
    completed: int
    expired: int
    failed: int
    ignored_replies: int


class RpcTable(Generic[W]):
    """Pending requests by id; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending[W]] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap; stale entries skipped lazily
        self._next_id = 1
        self._opened = self._completed = self._expired = self._failed = self._ignored = 0

    def open(
        self, *, peer: Hashable, now: float, timeout_s: float, waiter: W, stream: bool = False
    ) -> int:
        """Register a request to `peer`; return its id. `timeout_s` must be > 0.

        For a stream, `timeout_s` is the idle timeout: the longest wait for the next item.
        """
        if not timeout_s > 0:
            raise ValueError(f"request timeout_s must be > 0, got {timeout_s}")
        request_id = self._next_id
        self._next_id += 1
        deadline = now + timeout_s
        self._pending[request_id] = _Pending(
            peer=peer, deadline=deadline, stream=stream, idle_timeout_s=timeout_s, waiter=waiter
        )
        heapq.heappush(self._deadlines, (deadline, request_id))
        self._opened += 1
        return request_id

    def on_reply(
        self, *, peer: Hashable, request_id: int, kind: ReplyKind, now: float
    ) -> Verdict[W] | None:
        """The waiter a reply frame goes to, or None if the frame must be ignored."""
        entry = self._pending.get(request_id)
        if entry is None or entry.peer != peer or not _fits(entry.stream, kind):
            self._ignored += 1
            return None
        if kind is ReplyKind.ITEM:
            entry.deadline = now + entry.idle_timeout_s
            heapq.heappush(self._deadlines, (entry.deadline, request_id))
            return Verdict(waiter=entry.waiter, finished=False)
        del self._pending[request_id]
        self._completed += 1
        return Verdict(waiter=entry.waiter, finished=True)

    def cancel(self, request_id: int) -> W | None:
        """Forget a request its caller gave up on; later replies to it are ignored."""
        entry = self._pending.pop(request_id, None)
        return None if entry is None else entry.waiter

    def expire(self, now: float) -> list[W]:
        """Remove and return the waiters of every request whose deadline is <= now."""
        out: list[W] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, request_id = heapq.heappop(self._deadlines)
            entry = self._pending.get(request_id)
            if entry is not None and entry.deadline == deadline:
                del self._pending[request_id]
                self._expired += 1
                out.append(entry.waiter)
        return out

    def fail_peer(self, peer: Hashable) -> list[W]:
        """Remove and return the waiters of every request sent to `peer` (its link broke)."""
        ids = [rid for rid, entry in self._pending.items() if entry.peer == peer]
        self._failed += len(ids)
        return [self._pending.pop(rid).waiter for rid in ids]

    def deadline_of(self, request_id: int) -> float | None:
        """When a pending request expires (None if it is not pending)."""
        entry = self._pending.get(request_id)
        return None if entry is None else entry.deadline

    def next_deadline(self) -> float | None:
        """The earliest deadline of a pending request, or None if nothing is pending."""
        while self._deadlines:
            deadline, request_id = self._deadlines[0]
            entry = self._pending.get(request_id)
            if entry is not None and entry.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def __len__(self) -> int:
        return len(self._pending)

    def statistics(self) -> RpcStatistics:
        """Counters since the table was made."""
        return RpcStatistics(
            pending=len(self._pending),
            opened=self._opened,
            completed=self._completed,
            expired=self._expired,
            failed=self._failed,
            ignored_replies=self._ignored,
        )


def _fits(stream: bool, kind: ReplyKind) -> bool:
    if kind is ReplyKind.ERROR:
        return True
    return kind is not ReplyKind.REPLY if stream else kind is ReplyKind.REPLY
