"""The store contract: a durable, ordered map from bytes to bytes that every backend keeps.

Rules every backend keeps (the contract suite in tests/store proves them for each one):

* Keys are 1 to `MAX_KEY_BYTES` bytes (LMDB's limit, applied everywhere so data can move
  between backends); values are any bytes, empty included. Order is byte-lexicographic.
* A write is durable when its call returns (each backend syncs its log before acknowledging).
* `write_batch` and `compare_and_set` are atomic: all of it is applied, or none of it.
* The API is synchronous and thread-safe: one lock serialises every call, so trio code runs
  writes with `trio.to_thread.run_sync` and never sees a half-applied change.
* Backend exceptions become `StoreError` (cause kept); use after `close()` raises
  `StoreClosedError`; a caller's type or size mistake raises `TypeError` / `ValueError`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, ParamSpec, Self, TypeAlias, TypeVar

from spear.errors import StoreClosedError, StoreError

#: the longest key any backend accepts (LMDB's compiled-in limit)
MAX_KEY_BYTES = 511

Row: TypeAlias = tuple[bytes, bytes]
P = ParamSpec("P")
T = TypeVar("T")


def check_key(key: object) -> bytes:
    """Return `key` if it is a valid store key, else raise TypeError or ValueError."""
    if not isinstance(key, bytes):
        raise TypeError(f"a store key must be bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(
            f"a store key must be 1 to {MAX_KEY_BYTES} bytes long, got {len(key)} bytes"
            f" ({key[:32]!r})"
        )
    return key


def check_value(value: object) -> bytes:
    """Return `value` if it is bytes, else raise TypeError."""
    if not isinstance(value, bytes):
        raise TypeError(f"a store value must be bytes, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Put:
    """Set `key` to `value` (one op of a `write_batch`)."""

    key: bytes
    value: bytes

    def __post_init__(self) -> None:
        check_key(self.key)
        check_value(self.value)


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove `key` if it exists (one op of a `write_batch`)."""

    key: bytes

    def __post_init__(self) -> None:
        check_key(self.key)


WriteOp: TypeAlias = Put | Delete


def checked_ops(ops: Iterable[object]) -> Iterator[WriteOp]:
    """Yield `ops`, raising TypeError at the first one that is not a Put or a Delete.

    Backends consume this inside their transaction, so a bad op midway aborts the whole batch
    through the same rollback path as a failed write.
    """
    for index, op in enumerate(ops):
        if not isinstance(op, Put | Delete):
            raise TypeError(
                f"a store batch holds Put or Delete ops, got {type(op).__name__} at index {index}"
            )
        yield op


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix`; None if there is none.

    Trailing 0xff bytes cannot be incremented, so they are dropped first:
    b"a\\xff" -> b"b", and b"\\xff\\xff" (or b"") -> None, meaning no upper bound.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The keys `low <= key < high` (`high` None: no upper bound) that a scan visits."""

    low: bytes
    high: bytes | None

    @classmethod
    def for_scan(cls, prefix: bytes, start_after: bytes | None, *, reverse: bool) -> KeyRange:
        """The range of keys starting with `prefix` that come after `start_after` in scan order.

        Ascending, "after" means greater; in a reverse scan it means smaller, so a page's last
        key is the next page's `start_after` in both directions.
        """
        low, high = prefix, prefix_end(prefix)
        if start_after is not None:
            if reverse:
                high = start_after if high is None else min(high, start_after)
            else:
                # the smallest byte string greater than start_after is start_after + b"\0"
                low = max(low, start_after + b"\x00")
        return cls(low, high)

    @property
    def empty(self) -> bool:
        return self.high is not None and self.low >= self.high

    def __contains__(self, key: bytes) -> bool:
        return self.low <= key and (self.high is None or key < self.high)


class Store(abc.ABC):
    """An open store. Subclasses implement the `_`-prefixed methods, called under the lock.

    Attributes:
        backend: the backend's name as written in `store.backend`.
    """

    backend: ClassVar[str]
    #: the backend library's exception types, translated to StoreError at this edge
    _native_errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._closed = False

    @property
    def path(self) -> Path | None:
        """Where the store lives on disk (None for the memory backend)."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, or None if there is none."""
        check_key(key)
        return self._run("read a key", self._get, key)

    def put(self, key: bytes, value: bytes) -> None:
        """Set `key` to `value`; durable when this returns."""
        check_key(key)
        check_value(value)
        self._run("write a key", self._put, key, value)

    def delete(self, key: bytes) -> bool:
        """Remove `key`; True if it existed. Durable when this returns."""
        check_key(key)
        return self._run("delete a key", self._delete, key)

    def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Row]:
        """The `(key, value)` rows whose key starts with `prefix`, in key order.

        Args:
            prefix: only keys starting with these bytes (b"" for every key).
            start_after: skip keys up to and including this one in scan order (for paging:
                pass the last key of the previous page).
            limit: at most this many rows (None: all).
            reverse: descending key order.
        """
        if not isinstance(prefix, bytes):
            raise TypeError(f"a scan prefix must be bytes, got {type(prefix).__name__}")
        if start_after is not None and not isinstance(start_after, bytes):
            raise TypeError(f"scan start_after must be bytes, got {type(start_after).__name__}")
        if limit is not None and limit < 0:
            raise ValueError(f"scan limit must be >= 0 or None, got {limit}")
        key_range = KeyRange.for_scan(prefix, start_after, reverse=reverse)
        if key_range.empty or limit == 0:
            return self._run("scan keys", list[Row])  # no rows, but a closed store still fails
        return self._run("scan keys", self._scan, key_range, limit, reverse=reverse)

    def write_batch(self, ops: Sequence[WriteOp]) -> None:
        """Apply every op in order, atomically: all of them or, on any error, none."""
        self._run("write a batch", self._write_batch, checked_ops(ops))

    def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        """Atomically set `key` to `new` if its value is `expected`; False if it is not.

        None as `expected` means "absent"; None as `new` deletes the key.
        """
        check_key(key)
        for value in (expected, new):
            if value is not None:
                check_value(value)
        return self._run("compare and set a key", self._compare_and_set, key, expected, new)

    def close(self) -> None:
        """Release the store's files; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._close()
            except self._native_errors as exc:
                raise StoreError(f"{self._describe()} could not be closed cleanly: {exc}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.backend} {state} path={self._path}>"

    def _describe(self) -> str:
        where = "in memory" if self._path is None else f"at {self._path}"
        return f"the {self.backend} store {where}"

    def _run(self, action: str, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call(*args)` holding the lock, refusing a closed store, translating backend errors.

        `action` completes "could not ..." in the StoreError message.
        """
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"{self._describe()} is closed; it cannot {action}")
            try:
                return call(*args, **kwargs)
            except (StoreError, TypeError, ValueError):
                raise  # ours: already a StoreError, or the caller's mistake
            except self._native_errors as exc:
                raise StoreError(f"{self._describe()} could not {action}: {exc}") from exc

    def _compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        """Generic CAS: atomic because the lock is held and one process owns the store."""
        if self._get(key) != expected:
            return False
        if new is None:
            self._delete(key)
        else:
            self._put(key, new)
        return True

    @abc.abstractmethod
    def _get(self, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def _put(self, key: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    def _delete(self, key: bytes) -> bool: ...

    @abc.abstractmethod
    def _scan(self, key_range: KeyRange, limit: int | None, *, reverse: bool) -> list[Row]:
        """Rows in `key_range` (never empty), ascending or descending, at most `limit`."""

    @abc.abstractmethod
    def _write_batch(self, ops: Iterator[WriteOp]) -> None:
        """Apply `ops` in one transaction; an exception while iterating them aborts it all."""

    @abc.abstractmethod
    def _close(self) -> None: ...
