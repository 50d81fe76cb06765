"""Which store backends the store tests run on, and where each one keeps its files.

The optional backends (rocksdb, lmdb) are skipped when their package is missing, except in CI
(`CI=true`), where a missing package fails the run instead of hiding it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from spear.store import BACKENDS

if TYPE_CHECKING:
    from _pytest.mark import ParameterSet

PERSISTENT = tuple(name for name in BACKENDS if name != "memory")
_PACKAGES = {"rocksdb": "rocksdict", "lmdb": "lmdb"}


def skip_marks(backend: str) -> list[pytest.MarkDecorator]:
    """A skip mark if `backend`'s optional package is missing (none in CI, where it must fail)."""
    package = _PACKAGES.get(backend)
    if package is None or importlib.util.find_spec(package) is not None:
        return []
    if os.environ.get("CI") == "true":
        return []  # let the test fail on the missing package
    reason = f"store.backend = {backend!r} needs {package}: pip install 'spear[{backend}]'"
    return [pytest.mark.skip(reason=reason)]


def backend_params(backends: tuple[str, ...] = BACKENDS) -> list[ParameterSet]:
    """`pytest.param`s for `backends`, each id'd by name and skipped if its package is missing."""
    return [pytest.param(name, id=name, marks=skip_marks(name)) for name in backends]


def store_path(directory: Path, backend: str) -> Path | None:
    """Where a `backend` store lives under `directory` (None for memory)."""
    return None if backend == "memory" else directory / f"store.{backend}"
