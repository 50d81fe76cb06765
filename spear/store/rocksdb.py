"""The rocksdb backend (rocksdict, the `spear[rocksdb]` extra): an LSM tree for write-heavy logs.

Every write goes through rocksdb's WAL with `WriteOptions.sync = True`, so it is on disk when
the call returns; a batch is one rocksdb `WriteBatch`, atomic by construction. rocksdict
pickles keys and values unless `raw_mode=True` is set on both `Options` and `WriteBatch`:
this module sets it on both, so the files hold the caller's bytes.

rocksdb locks its directory: one process (and one open store) at a time. That, with the store
lock, is what makes the generic read-then-write compare-and-set atomic here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import rocksdict

from spear.errors import StoreError
from spear.store.base import KeyRange, Put, Row, Store, WriteOp

#: rocksdb's own info logs (LOG, LOG.old.*) kept in the store directory
KEEP_INFO_LOG_FILES = 3


def _options() -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_paranoid_checks(True)
    options.set_keep_log_file_num(KEEP_INFO_LOG_FILES)
    return options


class RocksStore(Store):
    """A store in a rocksdb directory; keys and values stored raw (no pickling)."""

    backend = "rocksdb"
    # rocksdict raises bare Exception (DbClosedError included) for every rocksdb failure.
    _native_errors = (Exception,)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._db = rocksdict.Rdict(str(path), options=_options())
        except Exception as exc:
            raise StoreError(
                f"store.path {path} cannot be opened as a rocksdb directory: {exc}"
            ) from exc
        self._synced = rocksdict.WriteOptions()
        self._synced.sync = True

    def _get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def _put(self, key: bytes, value: bytes) -> None:
        self._db.put(key, value, self._synced)

    def _delete(self, key: bytes) -> bool:
        # rocksdb deletes blindly; look first so the answer is right and a miss costs no sync.
        if self._db.get(key) is None:
            return False
        self._db.delete(key, self._synced)
        return True

    def _scan(self, key_range: KeyRange, limit: int | None, *, reverse: bool) -> list[Row]:
        # ReadOptions iterate bounds proved unreliable in rocksdict 0.3.29: bound by hand.
        rows: list[Row] = []
        cursor = self._db.iter()
        try:
            if not reverse:
                cursor.seek(key_range.low)
            elif key_range.high is None:
                cursor.seek_to_last()
            else:
                cursor.seek_for_prev(key_range.high)
                if cursor.valid() and bytes(cursor.key()) >= key_range.high:
                    cursor.prev()
            while cursor.valid() and (limit is None or len(rows) < limit):
                key = bytes(cursor.key())
                if key not in key_range:
                    break
                rows.append((key, bytes(cursor.value())))
                if reverse:
                    cursor.prev()
                else:
                    cursor.next()
            cursor.status()  # raises if the iteration stopped on an error, not at the end
        finally:
            # A live iterator keeps the database (and its LOCK) open after close().
            del cursor
        return rows

    def _write_batch(self, ops: Iterator[WriteOp]) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        for op in ops:
            if isinstance(op, Put):
                batch.put(op.key, op.value)
            else:
                batch.delete(op.key)
        self._db.write(batch, self._synced)

    def _close(self) -> None:
        self._db.close()
