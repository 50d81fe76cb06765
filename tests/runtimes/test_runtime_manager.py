"""The RuntimeManager: which runtimes a node offers, lookups, descriptions, lifetime."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spear.config import DockerConfig, ProcessConfig, RuntimesConfig, WasmConfig
from spear.demo import upper_wasm
from spear.errors import RuntimeFailure, ValidationError
from spear.model import ExecStatus
from spear.runtimes import ProcessRuntime, WasmRuntime, open_runtime_manager
from tests.runtimes.conftest import ArtifactFactory, function_spec
from tests.runtimes.test_worker_instance import worker_spec


async def test_defaults_offer_wasm_and_process(tmp_path: Path) -> None:
    config = RuntimesConfig(docker=DockerConfig(enabled=False))
    async with open_runtime_manager(config, data_dir=tmp_path) as manager:
        assert isinstance(manager.get("wasm"), WasmRuntime)
        assert isinstance(manager.get("process"), ProcessRuntime)
        assert manager.available == ["wasm", "process"]
        described = manager.describe()
    assert described["wasm"]["available"] is True
    assert described["process"]["available"] is True
    assert described["docker"] == {
        "available": False,
        "reason": "disabled (runtimes.docker.enabled = false)",
        "modes": [],
    }
    assert (tmp_path / "wasm-cache").is_dir()
    assert (tmp_path / "work" / "artifacts").is_dir()


async def test_unknown_and_unavailable_runtimes(tmp_path: Path) -> None:
    config = RuntimesConfig(wasm=WasmConfig(enabled=False), docker=DockerConfig(enabled=False))
    async with open_runtime_manager(config, data_dir=tmp_path) as manager:
        with pytest.raises(ValidationError, match=r"runtimes\.docker\.enabled = false") as info:
            manager.get("docker")
        assert info.value.field == "runtime"
        with pytest.raises(ValidationError, match=r"runtimes\.wasm\.enabled = false"):
            manager.get("wasm")
        with pytest.raises(ValidationError, match="'lambda' is unknown") as info:
            manager.get("lambda")
        assert info.value.field == "runtime"
        assert manager.describe()["wasm"]["available"] is False


async def test_relative_dirs_are_under_the_data_dir(tmp_path: Path) -> None:
    config = RuntimesConfig(
        wasm=WasmConfig(cache_dir="compiled"), process=ProcessConfig(work_dir="scratch")
    )
    async with open_runtime_manager(config, data_dir=tmp_path):
        pass
    assert (tmp_path / "compiled").is_dir()
    assert (tmp_path / "scratch" / "artifacts").is_dir()


async def test_runs_through_the_manager(tmp_path: Path, artifact: ArtifactFactory) -> None:
    path, sha = artifact(upper_wasm())
    spec = function_spec(artifact_path=path, artifact_sha256=sha)
    async with open_runtime_manager(RuntimesConfig(), data_dir=tmp_path / "data") as manager:
        runtime = manager.get(spec.runtime)
        runtime.validate_task(spec)
        await runtime.prepare(spec)
        outcome = await runtime.run(spec, b"abc", deadline=math.inf)
        stats = manager.statistics()
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"ABC"
    assert stats["wasm"]["compiles"] == 1


async def test_process_worker_bounds_come_from_the_config(tmp_path: Path) -> None:
    process = ProcessConfig(worker_start_timeout_ms=200, worker_cancel_grace_ms=0)
    config = RuntimesConfig(process=process, docker=DockerConfig(enabled=False))
    spec = worker_spec("sleep", "30", timeout_s=0.05)  # never says hello
    async with open_runtime_manager(config, data_dir=tmp_path) as manager:
        with pytest.raises(RuntimeFailure, match=r"no hello frame within 0\.200 s"):
            await manager.get("process").start_instance(spec)
