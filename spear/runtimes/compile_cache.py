"""Compiled artifacts per sha256: an in-memory LRU over an on-disk cache of compiled code.

Runtime-neutral: the runtime supplies how to compile, serialize, load and link. The disk key
is sha256(settings key + artifact sha256), so a compiler version or setting that changes
the settings key never reads another's files. Files are written atomically (temp + rename);
an unusable file is recompiled and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from spear.errors import RuntimeFailure

log = logging.getLogger(__name__)

Compiled = TypeVar("Compiled")
Ready = TypeVar("Ready")


@dataclass(frozen=True, slots=True, kw_only=True)
class Compiler(Generic[Compiled, Ready]):
    """How one runtime turns artifact bytes into something it can run (all blocking).

    compile: artifact bytes to compiled code; raises ArtifactError for bad bytes.
    serialize: compiled code to bytes for the disk cache.
    deserialize: a cache file back to compiled code, or None if the file is unusable.
    link: compiled code to what a run needs (e.g. an InstancePre); may raise ArtifactError.
    """

    compile: Callable[[bytes], Compiled]
    serialize: Callable[[Compiled], bytes]
    deserialize: Callable[[Path], Compiled | None]
    link: Callable[[Compiled], Ready]


class CompileCache(Generic[Compiled, Ready]):
    """Thread-safe: `_lock` guards the dicts (never held while compiling), and a per-artifact
    gate makes concurrent loads of one artifact compile it once."""

    def __init__(
        self,
        compiler: Compiler[Compiled, Ready],
        *,
        cache_dir: Path,
        settings_key: str,
        capacity: int,
        suffix: str = ".bin",
    ) -> None:
        self._compiler = compiler
        self._suffix = suffix
        self._dir = cache_dir
        self._settings_key = settings_key
        self._capacity = capacity
        self._lru: OrderedDict[str, Ready] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0, "disk_errors": 0}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("compile cache %s is unusable (%s): compiling every time", cache_dir, exc)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "memory_entries": len(self._lru)}

    def peek(self, sha256: str) -> Ready | None:
        with self._lock:
            ready = self._lru.get(sha256)
            if ready is not None:
                self._lru.move_to_end(sha256)
                self._stats["memory_hits"] += 1
            return ready

    def load(self, sha256: str, *, data: bytes | None = None, path: Path | None = None) -> Ready:
        """The artifact ready to run, from memory, disk or a fresh compile (blocking).

        Args:
            sha256: the artifact's sha256 (trusted: artifacts are content-addressed).
            data, path: the artifact's bytes, or the file to read them from if needed.

        Raises:
            ArtifactError: the compiler refuses the bytes.
            RuntimeFailure: the artifact file cannot be read.
        """
        ready = self.peek(sha256)
        if ready is not None:
            return ready
        with self._lock:
            gate = self._loading.setdefault(sha256, threading.Lock())
        with gate:  # one load per artifact at a time; the others wait, then find it in memory
            try:
                return self.peek(sha256) or self._load(sha256, data, path)
            finally:
                with self._lock:
                    self._loading.pop(sha256, None)

    def _load(self, sha256: str, data: bytes | None, path: Path | None) -> Ready:
        key = hashlib.sha256(f"{self._settings_key}|{sha256}".encode()).hexdigest()
        cached = self._dir / f"{key}{self._suffix}"
        compiled = self._read(cached)
        if compiled is None:
            compiled = self._compiler.compile(_read_artifact(path) if data is None else data)
            self._count("compiles")
            self._write(cached, compiled)
        ready = self._compiler.link(compiled)
        with self._lock:
            self._lru[sha256] = ready
            while len(self._lru) > self._capacity:
                self._lru.popitem(last=False)
        return ready

    def _read(self, cached: Path) -> Compiled | None:
        if not cached.exists():
            return None
        compiled = self._compiler.deserialize(cached)
        self._count("disk_errors" if compiled is None else "disk_hits")
        return compiled

    def _write(self, cached: Path, compiled: Compiled) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=self._dir, suffix=".tmp", delete=False) as fh:
                fh.write(self._compiler.serialize(compiled))
            os.replace(fh.name, cached)
        except OSError as exc:
            log.warning("cannot write the compiled artifact to %s: %s", cached, exc)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


def _read_artifact(path: Path | None) -> bytes:
    if path is None:
        raise RuntimeFailure("the task has no artifact file on this node")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RuntimeFailure(f"cannot read artifact {path}: {exc.strerror}") from exc
