"""spear's embedded store: a durable, ordered bytes-to-bytes map behind one small interface.

    store = open_store("sqlite", data_dir / "store.sqlite")
    store.write_batch([Put(b"task/1", doc), Delete(b"taskname/old")])
    rows = store.scan(b"task/", limit=100)

Backends (`store.backend`): "sqlite" (the default, one WAL file), "memory" (tests and the
simulator), "rocksdb" (the `spear[rocksdb]` extra) and "lmdb" (the `spear[lmdb]` extra).
The contract they all keep is written in `spear.store.base`; docs/store.md says which to pick.
The API is synchronous and thread-safe: from trio, run writes with `trio.to_thread.run_sync`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spear.errors import ConfigError, StoreError
from spear.store.base import MAX_KEY_BYTES, Delete, Put, Row, Store, WriteOp

__all__ = [
    "BACKENDS",
    "MAX_KEY_BYTES",
    "Delete",
    "Put",
    "Row",
    "Store",
    "WriteOp",
    "open_store",
]

#: every `store.backend` name, the default first
BACKENDS: tuple[str, ...] = ("sqlite", "memory", "rocksdb", "lmdb")

#: the third-party package each optional backend needs, and the extra that installs it
_OPTIONAL = {"rocksdb": "rocksdict", "lmdb": "lmdb"}


def open_store(backend: str, path: Path | None) -> Store:
    """Open (creating if needed) the store of kind `backend` at `path`.

    Args:
        backend: one of `BACKENDS`.
        path: the file (sqlite) or directory (rocksdb, lmdb) of the store; its parent
            directories are created. Ignored by "memory", required by the others.

    Raises:
        ConfigError: `backend` is unknown, or `path` is None for a persistent backend.
        StoreError: the optional package is missing, or `path` holds something that is not
            a store of that kind (the message names the path).
    """
    if backend not in BACKENDS:
        choices = ", ".join(repr(name) for name in BACKENDS)
        raise ConfigError(f"store.backend must be one of {choices}, got {backend!r}")
    if backend == "memory":
        from spear.store.memory import MemoryStore

        return MemoryStore()
    if path is None:
        raise ConfigError(f"store.path must be set for store.backend = {backend!r}")
    store_class = _store_class(backend)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"store.path {path} cannot be created: {exc}") from exc
    return store_class(path)


def _store_class(backend: str) -> Callable[[Path], Store]:
    """Import a persistent backend's module (only now: the optional ones may be missing)."""
    try:
        if backend == "sqlite":
            from spear.store.sqlite import SqliteStore

            return SqliteStore
        if backend == "rocksdb":
            from spear.store.rocksdb import RocksStore

            return RocksStore
        from spear.store.lmdb import LmdbStore

        return LmdbStore
    except ImportError as exc:
        package = _OPTIONAL.get(backend)
        if package is None or exc.name != package:
            raise
        raise StoreError(
            f"store.backend = {backend!r} needs the {package} package:"
            f" pip install 'spear[{backend}]'"
        ) from exc
