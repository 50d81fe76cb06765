"""The in-memory Raft log of one node: a snapshot base followed by contiguous entries.

Indexes start at 1; index 0 with term 0 is the empty prefix every log shares. Entries up to
`snapshot_index` are compacted away; `term_at` still knows the snapshot's own term so the
log-matching check works right after a compaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from spear.mesh.raft_types import Entry, RaftStateError, Snapshot


class RaftLog:
    """Entries after an optional snapshot. Raises RaftStateError on inconsistent input."""

    def __init__(self, snapshot: Snapshot | None, entries: Sequence[Entry]) -> None:
        self.snapshot = snapshot
        self._entries: list[Entry] = []
        for entry in entries:
            if entry.index <= self.snapshot_index:
                continue  # a crash between snapshot and log truncation leaves these behind
            self._check_next(entry)
            self._entries.append(entry)

    def _check_next(self, entry: Entry) -> None:
        if entry.index != self.last_index + 1:
            raise RaftStateError(
                f"log entry index {entry.index} does not follow {self.last_index};"
                " the raft log in the store has a gap"
            )
        if entry.term < self.last_term:
            raise RaftStateError(
                f"log entry {entry.index} has term {entry.term} below the previous term"
                f" {self.last_term}; the raft log in the store is corrupt"
            )

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.index if self.snapshot is not None else 0

    @property
    def snapshot_term(self) -> int:
        return self.snapshot.term if self.snapshot is not None else 0

    @property
    def first_index(self) -> int:
        """The first index still held as an entry (may be last_index + 1 when empty)."""
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self.snapshot_index

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    def __len__(self) -> int:
        return len(self._entries)

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if compacted away or beyond the end."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return None
        return self._entries[index - self.first_index].term

    def entry(self, index: int) -> Entry:
        """The entry at `index`; it must be held (first_index <= index <= last_index)."""
        return self._entries[index - self.first_index]

    def slice(self, start: int, stop: int) -> list[Entry]:
        """Held entries with start <= index < stop."""
        lo = max(start, self.first_index) - self.first_index
        hi = min(stop, self.last_index + 1) - self.first_index
        return self._entries[lo:hi] if hi > lo else []

    def matches(self, index: int, term: int) -> bool:
        """Whether this log holds an entry (or the snapshot point) at `index` of `term`."""
        return self.term_at(index) == term

    def append(self, entry: Entry) -> None:
        """Append one entry right after the last one."""
        self._check_next(entry)
        self._entries.append(entry)

    def truncate_from(self, index: int) -> None:
        """Drop every entry with an index >= `index` (never the snapshot)."""
        if index <= self.snapshot_index:
            raise ValueError(f"cannot truncate at {index}, at or below the snapshot index")
        del self._entries[index - self.first_index :]

    def compact(self, snapshot: Snapshot) -> None:
        """Adopt `snapshot` as the base and drop the entries it covers.

        If the log holds the snapshot's point with its term, later entries are kept;
        otherwise the whole log is replaced by the snapshot.
        """
        if snapshot.index <= self.snapshot_index:
            return
        keep = self.matches(snapshot.index, snapshot.term)
        rest = self.slice(snapshot.index + 1, self.last_index + 1) if keep else []
        self.snapshot = snapshot
        self._entries = rest

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft's election restriction: is (last_term, last_index) at least as recent as ours?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def conflict_hint(self, prev_index: int) -> tuple[int, int]:
        """For a rejected prev_index: (first index of our term there, that term), or
        (last_index + 1, 0) when our log is shorter."""
        term = self.term_at(prev_index)
        if term is None or prev_index > self.last_index:
            return self.last_index + 1, 0
        index = prev_index
        while index - 1 > self.snapshot_index and self.term_at(index - 1) == term:
            index -= 1
        return index, term

    def last_index_of_term(self, term: int) -> int | None:
        """The last index holding an entry of `term`, or None."""
        for entry in reversed(self._entries):
            if entry.term == term:
                return entry.index
            if entry.term < term:
                return None
        return None

    def last_config_entry(self, upto: int | None = None) -> Entry | None:
        """The latest held "config" entry with index <= `upto` (default: the whole log)."""
        stop = self.last_index if upto is None else min(upto, self.last_index)
        for index in range(stop, self.snapshot_index, -1):
            entry = self.entry(index)
            if entry.kind == "config":
                return entry
        return None
