"""SimDisk: one node's simulated disk, a write buffer plus fsync.

Writes land in a volatile buffer; `fsync()` makes everything buffered durable in order. A
crash discards the buffer: by default all of it, or (with `lose="prefix"`) a random suffix,
keeping a random prefix, since a real disk may already have written some unsynced pages in
order. `durable()` is what a restarted process reads back.

The Raft driver keeps its durable state here as a record log:

- `("hard_state", HardState)` replaces the hard state;
- `("truncate", index)` drops log entries from `index` on;
- `("entries", (Entry, ...))` appends entries;
- `("snapshot", Snapshot)` installs a snapshot and drops the entries it covers.

`RaftDurable.replay(records)` folds the durable records into the state a core restarts from.
The disk knows nothing of Raft: records are opaque pairs, so a broken driver (one that skips
a record, or sends before fsync) is something the simulator can model and catch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Record = tuple[str, Any]


@dataclass(slots=True)
class DiskStatistics:
    """Counters for one disk."""

    writes: int = 0
    fsyncs: int = 0
    lost_on_crash: int = 0


class SimDisk:
    """A write buffer plus fsync; a crash loses what was not fsynced.

    Args:
        rng: decides how much of the buffer survives a crash in `prefix` mode.
        lose: "all" drops every unsynced record on crash; "prefix" keeps a random prefix.
    """

    def __init__(self, rng: random.Random, *, lose: Literal["all", "prefix"] = "all") -> None:
        self._rng = rng
        self._lose = lose
        self._durable: list[Record] = []
        self._buffer: list[Record] = []
        self.statistics = DiskStatistics()

    def write(self, record: Record) -> None:
        """Buffer one record (not durable until `fsync`)."""
        self._buffer.append(record)
        self.statistics.writes += 1

    def fsync(self) -> None:
        """Make every buffered record durable, in order."""
        if self._buffer:
            self._durable.extend(self._buffer)
            self._buffer.clear()
        self.statistics.fsyncs += 1

    @property
    def unsynced(self) -> int:
        return len(self._buffer)

    def crash(self) -> None:
        """Lose the buffer (all of it, or a random suffix in `prefix` mode)."""
        keep = 0
        if self._lose == "prefix" and self._buffer:
            keep = self._rng.randrange(len(self._buffer) + 1)
        self._durable.extend(self._buffer[:keep])
        self.statistics.lost_on_crash += len(self._buffer) - keep
        self._buffer.clear()

    def durable(self) -> list[Record]:
        """The records a restarted process reads back."""
        return list(self._durable)

    def compact(self, records: Iterable[Record]) -> None:
        """Replace the durable records by an equivalent, shorter list (log compaction)."""
        self._durable = list(records)


@dataclass(slots=True)
class RaftDurable:
    """The Raft state folded out of a record log: hard state, log entries, snapshot."""

    hard_state: Any = None
    entries: list[Any] = field(default_factory=list)
    snapshot: Any = None

    @classmethod
    def replay(cls, records: Iterable[Record]) -> RaftDurable:
        """Fold records in order (see the module docstring for their meaning)."""
        state = cls()
        for kind, value in records:
            state.apply(kind, value)
        return state

    def apply(self, kind: str, value: Any) -> None:
        if kind == "hard_state":
            self.hard_state = value
        elif kind == "truncate":
            self.entries = [e for e in self.entries if e.index < value]
        elif kind == "entries":
            self.entries.extend(value)
        elif kind == "snapshot":
            self.snapshot = value
            self.entries = [e for e in self.entries if e.index > value.index]
        else:
            raise ValueError(f"unknown disk record kind {kind!r}")
