"""The sqlite backend: the default embedded store, one file in WAL mode, synced on every commit.

One connection (`check_same_thread=False`) serves every thread; the store's lock serialises
it. `journal_mode=WAL` with `synchronous=FULL` makes each commit fsync the WAL before it
returns, so an acknowledged write survives a crash of the process or of the machine.
Single statements run in autocommit mode; batches and compare-and-set run in one
`BEGIN IMMEDIATE` transaction, which also keeps them atomic against another process that
opens the same file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spear.errors import StoreError
from spear.store.base import KeyRange, Put, Row, Store, WriteOp

#: how long a statement waits for another process's write lock before failing
BUSY_TIMEOUT_S = 10.0

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
_GET = "SELECT value FROM kv WHERE key = ?"
_PUT = (
    "INSERT INTO kv (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_DELETE = "DELETE FROM kv WHERE key = ?"


def _connect(path: Path) -> sqlite3.Connection:
    """Open `path` in WAL + synchronous=FULL mode with the kv table, or raise StoreError."""
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreError(f"store.path {path} cannot be opened as a sqlite database: {exc}") from exc
    try:
        # The first statement reads the header: a file that is not a database fails here.
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":
            raise StoreError(
                f"store.path {path} must support sqlite's WAL journal mode, got {mode!r};"
                " put it on a local file system"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SCHEMA)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"store.path {path} is not a usable sqlite database: {exc}") from exc
    except StoreError:
        conn.close()
        raise
    return conn


class SqliteStore(Store):
    """A store in one sqlite file: table `kv(key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID`."""

    backend = "sqlite"
    _native_errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._conn = _connect(path)

    def _get(self, key: bytes) -> bytes | None:
        row = self._conn.execute(_GET, (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def _put(self, key: bytes, value: bytes) -> None:
        self._conn.execute(_PUT, (key, value))

    def _delete(self, key: bytes) -> bool:
        return self._conn.execute(_DELETE, (key,)).rowcount > 0

    def _scan(self, key_range: KeyRange, limit: int | None, *, reverse: bool) -> list[Row]:
        # BLOBs compare with memcmp, shorter first on a tie: byte-lexicographic order.
        where = "key >= ?" if key_range.high is None else "key >= ? AND key < ?"
        bounds = (key_range.low,) if key_range.high is None else (key_range.low, key_range.high)
        order = "DESC" if reverse else "ASC"
        sql = f"SELECT key, value FROM kv WHERE {where} ORDER BY key {order} LIMIT ?"
        rows = self._conn.execute(sql, (*bounds, -1 if limit is None else limit)).fetchall()
        return [(bytes(key), bytes(value)) for key, value in rows]

    def _write_batch(self, ops: Iterator[WriteOp]) -> None:
        with self._transaction():
            for op in ops:
                if isinstance(op, Put):
                    self._conn.execute(_PUT, (op.key, op.value))
                else:
                    self._conn.execute(_DELETE, (op.key,))

    def _compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        with self._transaction():
            return super()._compare_and_set(key, expected, new)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed (and synced) on success, rolled back on any error."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        self._conn.close()
