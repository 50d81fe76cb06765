"""The store contract (spear.store.base), proved on every backend with real files."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spear.errors import ConfigError, StoreClosedError, StoreError
from spear.store import MAX_KEY_BYTES, Delete, Put, Store, WriteOp, open_store
from tests.store.backends import PERSISTENT, backend_params, store_path

Reopen = Callable[[], Store]

#: keys whose byte order differs from naive expectations (0x00 and 0xff bytes, prefixes)
ODD_KEYS = [b"\x00", b"\x00\xff", b"a", b"a\x00", b"a\xfe", b"a\xff", b"a\xff\x00", b"a\xff\xff"]
ODD_KEYS += [b"b", b"\xfe\xff", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=backend_params(PERSISTENT))
def persistent_backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[Store]:
    with open_store(backend, store_path(tmp_path, backend)) as opened:
        yield opened


@pytest.fixture
def reopen(persistent_backend: str, tmp_path: Path) -> Iterator[Reopen]:
    """Open the persistent store again (the caller closes the previous one first)."""
    opened: list[Store] = []

    def again() -> Store:
        opened.append(open_store(persistent_backend, store_path(tmp_path, persistent_backend)))
        return opened[-1]

    yield again
    for each in opened:
        each.close()


def fill(store: Store, keys: list[bytes]) -> None:
    store.write_batch([Put(key, b"v" + key) for key in keys])


def test_get_put_overwrite_delete(store: Store) -> None:
    assert store.get(b"k") is None
    store.put(b"k", b"one")
    assert store.get(b"k") == b"one"
    store.put(b"k", b"two")
    assert store.get(b"k") == b"two"
    assert store.delete(b"k") is True
    assert store.get(b"k") is None
    assert store.delete(b"k") is False


def test_empty_value_is_not_absent(store: Store) -> None:
    store.put(b"empty", b"")
    assert store.get(b"empty") == b""
    assert store.scan(b"empty") == [(b"empty", b"")]
    assert store.compare_and_set(b"empty", None, b"x") is False
    assert store.compare_and_set(b"empty", b"", b"x") is True


def test_binary_keys_in_byte_order(store: Store) -> None:
    fill(store, list(reversed(ODD_KEYS)))
    assert [key for key, _ in store.scan(b"")] == sorted(ODD_KEYS)
    for key in ODD_KEYS:
        assert store.get(key) == b"v" + key
    large = bytes(range(256)) * 8
    store.put(b"\xff" * MAX_KEY_BYTES, large)
    assert store.get(b"\xff" * MAX_KEY_BYTES) == large


@pytest.mark.parametrize("prefix", [b"", b"a", b"a\xff", b"\xff", b"\xff\xff", b"\x00", b"zz"])
def test_scan_prefix(store: Store, prefix: bytes) -> None:
    fill(store, ODD_KEYS)
    expected = [(key, b"v" + key) for key in sorted(ODD_KEYS) if key.startswith(prefix)]
    assert store.scan(prefix) == expected
    assert store.scan(prefix, reverse=True) == expected[::-1]
    assert store.scan(prefix, limit=2) == expected[:2]
    assert store.scan(prefix, limit=2, reverse=True) == expected[::-1][:2]


@pytest.mark.parametrize("reverse", [False, True], ids=["ascending", "descending"])
@pytest.mark.parametrize("prefix", [b"", b"a", b"\xff"])
def test_scan_pages_with_start_after(store: Store, prefix: bytes, reverse: bool) -> None:
    fill(store, ODD_KEYS)
    everything = store.scan(prefix, reverse=reverse)
    pages: list[list[tuple[bytes, bytes]]] = []
    after: bytes | None = None
    while page := store.scan(prefix, start_after=after, limit=2, reverse=reverse):
        pages.append(page)
        after = page[-1][0]
    assert [row for page in pages for row in page] == everything
    assert all(len(page) == 2 for page in pages[:-1])


def test_scan_start_after_keys_that_are_not_stored(store: Store) -> None:
    fill(store, [b"p/1", b"p/3", b"p/5"])
    assert [k for k, _ in store.scan(b"p/", start_after=b"p/2")] == [b"p/3", b"p/5"]
    assert [k for k, _ in store.scan(b"p/", start_after=b"p/4", reverse=True)] == [b"p/3", b"p/1"]
    # a start_after outside the prefix: before it keeps all, past it keeps none
    assert len(store.scan(b"p/", start_after=b"a")) == 3
    assert store.scan(b"p/", start_after=b"q") == []
    assert len(store.scan(b"p/", start_after=b"q", reverse=True)) == 3
    assert store.scan(b"p/", start_after=b"a", reverse=True) == []
    assert store.scan(b"p/", start_after=b"p/", reverse=True) == []


def test_scan_limits(store: Store) -> None:
    fill(store, ODD_KEYS)
    assert store.scan(b"", limit=0) == []
    assert len(store.scan(b"", limit=len(ODD_KEYS) + 5)) == len(ODD_KEYS)
    with pytest.raises(ValueError, match="scan limit must be >= 0"):
        store.scan(b"", limit=-1)


def test_write_batch_applies_ops_in_order(store: Store) -> None:
    store.put(b"gone", b"x")
    store.write_batch(
        [Put(b"a", b"1"), Put(b"b", b"2"), Delete(b"gone"), Put(b"a", b"3"), Delete(b"b")]
    )
    assert store.scan(b"") == [(b"a", b"3")]
    store.write_batch([])
    assert store.scan(b"") == [(b"a", b"3")]


def test_write_batch_that_fails_midway_applies_nothing(store: Store) -> None:
    store.put(b"kept", b"old")
    ops: list[object] = [Put(b"new1", b"1"), Delete(b"kept"), Put(b"kept", b"changed")]
    ops += ["not an op", Put(b"new2", b"2")]
    with pytest.raises(TypeError, match="Put or Delete ops, got str at index 3"):
        store.write_batch(ops)  # type: ignore[arg-type]
    assert store.scan(b"") == [(b"kept", b"old")]
    store.write_batch([Put(b"after", b"ok")])  # the store is still usable
    assert store.get(b"after") == b"ok"


def test_compare_and_set(store: Store) -> None:
    assert store.compare_and_set(b"k", b"x", b"y") is False  # absent, not "x"
    assert store.get(b"k") is None
    assert store.compare_and_set(b"k", None, b"1") is True  # create if absent
    assert store.compare_and_set(b"k", None, b"2") is False  # exists now
    assert store.compare_and_set(b"k", b"2", b"3") is False
    assert store.get(b"k") == b"1"
    assert store.compare_and_set(b"k", b"1", b"2") is True
    assert store.get(b"k") == b"2"
    assert store.compare_and_set(b"k", b"2", None) is True  # delete
    assert store.get(b"k") is None
    assert store.compare_and_set(b"k", None, None) is True  # absent stays absent


def test_compare_and_set_is_atomic_across_threads(store: Store) -> None:
    threads, increments = 4, 25

    def increment() -> None:
        done = 0
        while done < increments:
            current = store.get(b"counter")
            new = str(int(current or b"0") + 1).encode()
            done += store.compare_and_set(b"counter", current, new)

    workers = [threading.Thread(target=increment) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert store.get(b"counter") == str(threads * increments).encode()


def test_bad_keys_and_values_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="1 to 511 bytes long, got 0 bytes"):
        store.put(b"", b"v")
    with pytest.raises(ValueError, match="got 512 bytes"):
        store.get(b"k" * (MAX_KEY_BYTES + 1))
    with pytest.raises(TypeError, match="a store key must be bytes, got str"):
        store.put("k", b"v")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a store value must be bytes, got bytearray"):
        store.put(b"k", bytearray(b"v"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a store value must be bytes"):
        Put(b"k", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a store value must be bytes"):
        store.compare_and_set(b"k", "old", None)  # type: ignore[arg-type]
    assert store.scan(b"") == []


def test_close_is_idempotent_and_use_after_close_fails(store: Store) -> None:
    store.put(b"k", b"v")
    store.close()
    store.close()
    assert store.closed
    uses: list[Callable[[], object]] = [
        lambda: store.get(b"k"),
        lambda: store.put(b"k", b"v"),
        lambda: store.delete(b"k"),
        lambda: store.scan(b""),
        lambda: store.write_batch([Put(b"k", b"v")]),
        lambda: store.compare_and_set(b"k", None, b"v"),
    ]
    for use in uses:
        with pytest.raises(StoreClosedError, match=f"the {store.backend} store .* is closed"):
            use()


def test_context_manager_closes(backend: str, tmp_path: Path) -> None:
    with open_store(backend, store_path(tmp_path, backend)) as store:
        store.put(b"k", b"v")
    assert store.closed
    assert store.backend == backend
    assert store.path == store_path(tmp_path, backend)


def test_reopen_keeps_every_acknowledged_write(reopen: Reopen) -> None:
    store = reopen()
    fill(store, ODD_KEYS)
    store.put(b"single", b"1")
    store.delete(b"a")
    store.compare_and_set(b"b", b"vb", b"swapped")
    store.close()
    store = reopen()
    expected = {key: b"v" + key for key in ODD_KEYS if key != b"a"}
    expected |= {b"single": b"1", b"b": b"swapped"}
    assert store.scan(b"") == sorted(expected.items())


def test_a_file_that_is_not_a_store_gives_store_error(
    persistent_backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StoreError, match=re.escape(str(path))) as caught:
        open_store(persistent_backend, path)
    assert caught.value.__cause__ is not None


def test_a_backend_failure_in_use_gives_store_error(reopen: Reopen) -> None:
    store = reopen()
    store.put(b"k", b"v")
    # Close the engine behind the store's back: its next call fails inside the backend library.
    engine = {"sqlite": "_conn", "rocksdb": "_db", "lmdb": "_env"}[store.backend]
    getattr(store, engine).close()
    with pytest.raises(StoreError, match=f"the {store.backend} store at .* could not read a key"):
        store.get(b"k")
    with pytest.raises(StoreError, match="could not write a batch") as caught:
        store.write_batch([Put(b"k", b"w")])
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value, StoreClosedError)
    with contextlib.suppress(StoreError):  # rocksdb refuses to close an engine closed twice
        store.close()
    assert store.closed


@pytest.mark.parametrize("backend_name", backend_params(("rocksdb", "lmdb")))
def test_a_corrupt_store_directory_gives_store_error(backend_name: str, tmp_path: Path) -> None:
    garbage_file = {"rocksdb": "CURRENT", "lmdb": "data.mdb"}[backend_name]
    path = tmp_path / "store"
    path.mkdir()
    (path / garbage_file).write_bytes(b"garbage\n" * 2000)
    with pytest.raises(StoreError, match=re.escape(str(path))):
        open_store(backend_name, path)


def test_sqlite_store_is_one_wal_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    with open_store("sqlite", path) as store:
        store.put(b"k", b"v")
        with sqlite3.connect(path) as peer:
            assert peer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert peer.execute("SELECT key, value FROM kv").fetchall() == [(b"k", b"v")]
        peer.close()


def test_lmdb_map_grows_when_full(tmp_path: Path) -> None:
    pytest.importorskip("lmdb")
    from spear.store.lmdb import LmdbStore

    with LmdbStore(tmp_path / "store.lmdb", map_bytes=64 * 1024) as store:
        ops: list[WriteOp] = [Put(b"big/%03d" % i, bytes(4096)) for i in range(64)]
        store.write_batch(ops)
        assert len(store.scan(b"big/")) == 64


def test_open_store_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.backend must be one of 'sqlite', .* got 'x'"):
        open_store("x", tmp_path / "s")
    with pytest.raises(
        ConfigError, match=re.escape("store.path must be set for store.backend = 'sqlite'")
    ):
        open_store("sqlite", None)
    with open_store("memory", None) as store:
        assert store.path is None


@pytest.mark.parametrize(("backend_name", "package"), [("rocksdb", "rocksdict"), ("lmdb", "lmdb")])
def test_a_missing_optional_package_gives_store_error(
    backend_name: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    monkeypatch.delitem(sys.modules, f"spear.store.{backend_name}", raising=False)
    message = f"store.backend = '{backend_name}' needs the {package} package: "
    message += f"pip install 'spear[{backend_name}]'"
    with pytest.raises(StoreError) as caught:
        open_store(backend_name, tmp_path / "s")
    assert str(caught.value) == message
