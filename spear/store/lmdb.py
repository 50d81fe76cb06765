"""The lmdb backend (the `spear[lmdb]` extra): a copy-on-write B-tree for read-mostly data.

It stands in for Sled, which has no maintained Python binding: one memory-mapped file, reads
without copies or locks in the engine, and a commit that syncs (`sync=True`,
`metasync=True`) before it returns. Every call runs its own transaction from start to commit
in the calling thread, as lmdb requires of write transactions.

The map size is lmdb's hard cap on the file; it starts at `INITIAL_MAP_BYTES` and doubles
whenever a write finds the map full (the failed transaction is aborted and retried), up to
`MAX_MAP_BYTES`. Keys are limited to 511 bytes, lmdb's compiled-in limit, which is why the
store contract applies that limit to every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import lmdb

from spear.errors import StoreError
from spear.store.base import KeyRange, Put, Row, Store, WriteOp

#: the first map size (virtual address space reserved, not disk used)
INITIAL_MAP_BYTES = 1 << 30
#: the map never grows past this; a write beyond it fails with StoreError
MAX_MAP_BYTES = 1 << 40

T = TypeVar("T")


class LmdbStore(Store):
    """A store in an lmdb environment directory (data.mdb + lock.mdb)."""

    backend = "lmdb"
    _native_errors = (lmdb.Error, OSError)

    def __init__(self, path: Path, *, map_bytes: int = INITIAL_MAP_BYTES) -> None:
        """Open (creating if needed) the environment directory `path`.

        Args:
            path: the environment directory.
            map_bytes: the first map size (lmdb raises it to the size of existing data);
                writes grow it as they need.
        """
        super().__init__(path)
        try:
            self._env = lmdb.open(
                str(path),
                map_size=map_bytes,
                subdir=True,
                max_dbs=0,
                sync=True,
                metasync=True,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StoreError(
                f"store.path {path} cannot be opened as an lmdb environment: {exc}"
            ) from exc

    def _get(self, key: bytes) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(key)

    def _put(self, key: bytes, value: bytes) -> None:
        self._write(lambda txn: txn.put(key, value))

    def _delete(self, key: bytes) -> bool:
        return self._write(lambda txn: txn.delete(key))

    def _scan(self, key_range: KeyRange, limit: int | None, *, reverse: bool) -> list[Row]:
        rows: list[Row] = []
        with self._env.begin() as txn, txn.cursor() as cursor:
            if not reverse:
                found = cursor.set_range(key_range.low)
            elif key_range.high is None:
                found = cursor.last()
            else:
                # set_range lands on the first key >= high (or nowhere): step back below it
                found = cursor.prev() if cursor.set_range(key_range.high) else cursor.last()
            while found and (limit is None or len(rows) < limit):
                key = cursor.key()
                if key not in key_range:
                    break
                rows.append((key, cursor.value()))
                found = cursor.prev() if reverse else cursor.next()
        return rows

    def _write_batch(self, ops: Iterator[WriteOp]) -> None:
        read: list[WriteOp] = []  # the ops taken from `ops` so far, replayed after a map resize

        def apply(txn: lmdb.Transaction) -> None:
            for op in read:
                _apply(txn, op)
            for op in ops:  # an iterator: a retry resumes where the failed attempt stopped
                read.append(op)
                _apply(txn, op)

        self._write(apply)

    def _compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        def swap(txn: lmdb.Transaction) -> bool:
            if txn.get(key) != expected:
                return False
            if new is None:
                txn.delete(key)
            else:
                txn.put(key, new)
            return True

        return self._write(swap)

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run `body` in one write transaction, growing the map and retrying when it is full."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self._grow_map()

    def _grow_map(self) -> None:
        size = self._env.info()["map_size"]
        if size >= MAX_MAP_BYTES:
            raise StoreError(f"{self._describe()} is full at its maximum map size of {size} bytes")
        # Safe here: the store lock is held, so this process has no transaction open.
        self._env.set_mapsize(min(size * 2, MAX_MAP_BYTES))

    def _close(self) -> None:
        self._env.close()


def _apply(txn: lmdb.Transaction, op: WriteOp) -> None:
    if isinstance(op, Put):
        txn.put(op.key, op.value)
    else:
        txn.delete(op.key)
