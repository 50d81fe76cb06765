"""Every backend against a dict: hypothesis drives random call sequences, the dict is the oracle.

Keys come from a tiny alphabet around the awkward bytes (0x00, 0xff) so that prefixes,
overwrites, CAS races against the model and `start_after` edges happen often. Persistent
backends are also closed and reopened at random points.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spear.store import Delete, Put, Row, Store, WriteOp, open_store
from tests.store.backends import skip_marks, store_path

ALPHABET = [b"\x00", b"\x01", b"a", b"\xfe", b"\xff"]
KEYS = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=3).map(b"".join)
PREFIXES = st.lists(st.sampled_from(ALPHABET), max_size=2).map(b"".join)
VALUES = st.binary(max_size=8)
OPS: st.SearchStrategy[list[WriteOp]] = st.lists(
    st.one_of(st.builds(Put, KEYS, VALUES), st.builds(Delete, KEYS)), max_size=6
)
SETTINGS = settings(max_examples=20, stateful_step_count=25, deadline=None)


def model_scan(
    model: dict[bytes, bytes],
    prefix: bytes,
    start_after: bytes | None,
    limit: int | None,
    reverse: bool,
) -> list[Row]:
    """What `Store.scan` must return, computed the slow and obvious way."""
    rows = sorted(model.items(), reverse=reverse)
    rows = [(key, value) for key, value in rows if key.startswith(prefix)]
    if start_after is not None:
        rows = [row for row in rows if (row[0] < start_after if reverse else row[0] > start_after)]
    return rows if limit is None else rows[:limit]


class StoreAgainstDict(RuleBasedStateMachine):
    """Apply the same calls to a store and to a dict; every answer must agree."""

    backend: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory(prefix="spear-store-model-")
        self.path = store_path(Path(self.directory.name), self.backend)
        self.store: Store = open_store(self.backend, self.path)
        self.model: dict[bytes, bytes] = {}

    @rule(key=KEYS, value=VALUES)
    def put(self, key: bytes, value: bytes) -> None:
        self.store.put(key, value)
        self.model[key] = value

    @rule(key=KEYS)
    def get(self, key: bytes) -> None:
        assert self.store.get(key) == self.model.get(key)

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        assert self.store.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(ops=OPS)
    def write_batch(self, ops: list[WriteOp]) -> None:
        self.store.write_batch(ops)
        for op in ops:
            if isinstance(op, Put):
                self.model[op.key] = op.value
            else:
                self.model.pop(op.key, None)

    @rule(ops=OPS, bad_at=st.integers(min_value=0, max_value=6))
    def write_failing_batch(self, ops: list[WriteOp], bad_at: int) -> None:
        broken: list[object] = [*ops[:bad_at], object(), *ops[bad_at:]]
        with pytest.raises(TypeError):
            self.store.write_batch(broken)  # type: ignore[arg-type]

    @rule(
        key=KEYS,
        expected=st.none() | VALUES,
        new=st.none() | VALUES,
        expect_current=st.booleans(),
    )
    def compare_and_set(
        self, key: bytes, expected: bytes | None, new: bytes | None, expect_current: bool
    ) -> None:
        if expect_current:  # otherwise a random guess almost never matches
            expected = self.model.get(key)
        swapped = self.store.compare_and_set(key, expected, new)
        assert swapped == (self.model.get(key) == expected)
        if swapped and new is None:
            self.model.pop(key, None)
        elif swapped and new is not None:
            self.model[key] = new

    @rule(
        prefix=PREFIXES,
        start_after=st.none() | KEYS,
        limit=st.none() | st.integers(min_value=0, max_value=4),
        reverse=st.booleans(),
    )
    def scan(
        self, prefix: bytes, start_after: bytes | None, limit: int | None, reverse: bool
    ) -> None:
        got = self.store.scan(prefix, start_after=start_after, limit=limit, reverse=reverse)
        assert got == model_scan(self.model, prefix, start_after, limit, reverse)

    @precondition(lambda self: self.path is not None)
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = open_store(self.backend, self.path)

    @invariant()
    def holds_exactly_the_model(self) -> None:
        assert self.store.scan(b"") == sorted(self.model.items())

    def teardown(self) -> None:
        self.store.close()
        self.directory.cleanup()


class MemoryAgainstDict(StoreAgainstDict):
    backend = "memory"


class SqliteAgainstDict(StoreAgainstDict):
    backend = "sqlite"


class RocksdbAgainstDict(StoreAgainstDict):
    backend = "rocksdb"


class LmdbAgainstDict(StoreAgainstDict):
    backend = "lmdb"


def _test_case(machine: type[StoreAgainstDict]) -> type:
    case = machine.TestCase
    case.settings = SETTINGS
    for mark in skip_marks(machine.backend):
        case = mark(case)
    return case


TestMemoryAgainstDict = _test_case(MemoryAgainstDict)
TestSqliteAgainstDict = _test_case(SqliteAgainstDict)
TestRocksdbAgainstDict = _test_case(RocksdbAgainstDict)
TestLmdbAgainstDict = _test_case(LmdbAgainstDict)
