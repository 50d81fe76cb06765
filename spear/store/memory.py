"""The memory backend: the store contract without a disk, for tests and the cluster simulator.

Keys live in a sorted list (bisect) beside a dict of values: O(log n) reads and range starts,
O(n) inserts, which is fine for the data sizes of tests and simulations. Nothing survives
`close()`; "durable" means "visible to every later call".
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator

from spear.store.base import KeyRange, Put, Row, Store, WriteOp


class MemoryStore(Store):
    """An ordered in-memory map with the full store contract (atomic batches, CAS)."""

    backend = "memory"

    def __init__(self) -> None:
        super().__init__(None)
        self._keys: list[bytes] = []
        self._values: dict[bytes, bytes] = {}

    def _get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def _put(self, key: bytes, value: bytes) -> None:
        if key not in self._values:
            insort(self._keys, key)
        self._values[key] = value

    def _delete(self, key: bytes) -> bool:
        if self._values.pop(key, None) is None:
            return False
        del self._keys[bisect_left(self._keys, key)]
        return True

    def _scan(self, key_range: KeyRange, limit: int | None, *, reverse: bool) -> list[Row]:
        high = key_range.high
        start = bisect_left(self._keys, key_range.low)
        stop = len(self._keys) if high is None else bisect_left(self._keys, high)
        keys = self._keys[start:stop]
        if reverse:
            keys.reverse()
        if limit is not None:
            keys = keys[:limit]
        return [(key, self._values[key]) for key in keys]

    def _write_batch(self, ops: Iterator[WriteOp]) -> None:
        # Stage the whole batch first: only a fully read batch touches the map, and applying
        # the staged changes cannot fail.
        staged: dict[bytes, bytes | None] = {}
        for op in ops:
            staged[op.key] = op.value if isinstance(op, Put) else None
        for key, value in staged.items():
            if value is None:
                self._delete(key)
            else:
                self._put(key, value)

    def _close(self) -> None:
        self._keys.clear()
        self._values.clear()
