"""Fixtures for the runtime tests: FunctionSpecs, artifacts on disk, open runtimes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from spear.config import ProcessConfig, WasmConfig
from spear.model import FunctionSpec, TaskId
from spear.runtimes import ProcessRuntime, WasmRuntime

MiB = 1024 * 1024
#: how long a killed process may take to disappear (a bound, not a sleep)
GONE_WITHIN_S = 5.0


async def wait_gone(pid: int) -> bool:
    """True once `pid` is gone or a zombie (nobody may reap orphans here), within a bound."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await trio.sleep(0.01)
    return False


SpecFactory = Callable[..., FunctionSpec]
ArtifactFactory = Callable[[bytes], tuple[Path, str]]


def function_spec(**fields: Any) -> FunctionSpec:
    """A FunctionSpec with small test limits; keyword arguments override fields."""
    spec = FunctionSpec(
        task_id=TaskId("tk-0000000000000000"),
        name="fn",
        runtime="wasm",
        mode="per-call",
        artifact_path=None,
        artifact_sha256=None,
        command=(),
        image=None,
        env={},
        timeout_s=10.0,
        memory_limit_bytes=64 * MiB,
        max_output_bytes=1 * MiB,
        max_log_bytes=64 * 1024,
    )
    return replace(spec, **fields)


@pytest.fixture
def artifact(tmp_path: Path) -> ArtifactFactory:
    """Store bytes as a content-addressed artifact file: `path, sha256 = artifact(data)`."""
    files = tmp_path / "files"
    files.mkdir()

    def store(data: bytes) -> tuple[Path, str]:
        sha = hashlib.sha256(data).hexdigest()
        path = files / sha
        path.write_bytes(data)
        return path, sha

    return store


@pytest.fixture
def wasm_spec(artifact: ArtifactFactory) -> Callable[..., FunctionSpec]:
    """`wasm_spec(module_bytes, **fields)`: a wasm FunctionSpec for that module."""

    def make(module: bytes, **fields: Any) -> FunctionSpec:
        path, sha = artifact(module)
        return function_spec(**{"artifact_path": path, "artifact_sha256": sha, **fields})

    return make


@pytest.fixture
async def wasm(tmp_path: Path) -> AsyncIterator[WasmRuntime]:
    runtime = WasmRuntime(WasmConfig(max_threads=2), cache_dir=tmp_path / "wasm-cache")
    try:
        yield runtime
    finally:
        await runtime.aclose()


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "work")
    try:
        yield runtime
    finally:
        await runtime.aclose()
