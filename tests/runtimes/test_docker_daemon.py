"""The docker runtime and its daemon: registration checks, reaping at start, a missing daemon."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest
import trio

from spear.config import DockerConfig, RuntimesConfig
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.runtimes import open_runtime_manager
from spear.runtimes.docker import LABEL_NODE, DockerRuntime
from tests.docker_env import BUSYBOX, labelled_containers
from tests.runtimes.conftest import function_spec

MiB = 1024 * 1024


@pytest.mark.docker
async def test_a_missing_image_is_refused_at_registration(
    docker_runtime: DockerRuntime,
) -> None:
    spec = function_spec(runtime="docker", image="spear/never-loaded:0")
    with pytest.raises(ValidationError, match="pull_policy is 'never'") as info:
        await docker_runtime.prepare(spec)
    assert info.value.field == "image"
    assert "'spear/never-loaded:0' is not on this node's docker daemon" in str(info.value)


@pytest.mark.docker
async def test_task_rules(docker_runtime: DockerRuntime) -> None:
    small = function_spec(runtime="docker", image=BUSYBOX, memory_limit_bytes=1 * MiB)
    with pytest.raises(ValidationError, match="at least 6291456") as info:
        docker_runtime.validate_task(small)
    assert info.value.field == "memory_limit_bytes"
    with_artifact = function_spec(runtime="docker", image=BUSYBOX, artifact_sha256="0" * 64)
    with pytest.raises(ValidationError, match="takes no artifact") as info:
        docker_runtime.validate_task(with_artifact)
    assert info.value.field == "artifact"
    docker_runtime.validate_task(function_spec(runtime="docker", image=BUSYBOX, mode="worker"))
    batch = function_spec(runtime="docker", image=BUSYBOX, mode="batch")
    with pytest.raises(ValidationError, match="mode must be 'per-call' or 'worker'") as info:
        docker_runtime.validate_task(batch)
    assert info.value.field == "mode"
    with pytest.raises(ArtifactError):
        docker_runtime.validate_artifact(b"\x7fELF")
    await docker_runtime.prepare(function_spec(runtime="docker", image=BUSYBOX))
    assert docker_runtime.statistics()["images"] == 1


@pytest.mark.docker
async def test_leftovers_of_this_node_are_removed_at_start(
    docker_api: docker.APIClient, docker_node_label: str
) -> None:
    # what a node killed mid-call leaves: one running and one created container
    for command in (["sleep", "60"], ["true"]):
        created = docker_api.create_container(
            BUSYBOX, command, labels={LABEL_NODE: docker_node_label}, network_disabled=True
        )
        if command[0] == "sleep":
            docker_api.start(created["Id"])
    other = docker_api.create_container(BUSYBOX, ["true"], labels={LABEL_NODE: "someone-else"})
    try:
        assert len(labelled_containers(docker_api, docker_node_label)) == 2
        runtime = await trio.to_thread.run_sync(
            lambda: DockerRuntime.connect(DockerConfig(), node_label=docker_node_label)
        )
        await runtime.aclose()
        assert runtime.statistics()["removed_at_start"] == 2
        assert labelled_containers(docker_api, docker_node_label) == []
        assert docker_api.inspect_container(other["Id"])["Id"] == other["Id"]
    finally:
        docker_api.remove_container(other["Id"], force=True)


@pytest.mark.docker
async def test_the_manager_offers_docker_when_the_daemon_answers(
    docker_api: docker.APIClient, tmp_path: Path
) -> None:
    async with open_runtime_manager(RuntimesConfig(), data_dir=tmp_path, node_id="nd-1") as manager:
        assert isinstance(manager.get("docker"), DockerRuntime)
        described = manager.describe()["docker"]
    assert described["available"] is True
    assert described["version"] == docker_api.version()["Version"]
    assert described["modes"] == ["per-call", "worker"]
    assert described["worker_max_concurrency"] == 1


async def test_a_dead_daemon_leaves_docker_unavailable_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"unix://{tmp_path}/no-daemon.sock"
    monkeypatch.setenv("DOCKER_HOST", dead)
    async with open_runtime_manager(RuntimesConfig(), data_dir=tmp_path) as manager:
        assert "docker" not in manager.available
        described = manager.describe()["docker"]
        with pytest.raises(ValidationError) as info:
            manager.get("docker")
    assert described["available"] is False
    assert described["reason"].startswith(f"the docker daemon at {dead} does not answer (")
    assert info.value.field == "runtime"
    assert "runtime 'docker' is not available on this node" in str(info.value)
    assert "runtimes.docker.host (or DOCKER_HOST)" in str(info.value)


async def test_connect_names_the_configured_host(tmp_path: Path) -> None:
    dead = f"unix://{tmp_path}/configured.sock"
    with pytest.raises(RuntimeFailure, match=f"the docker daemon at {dead} does not answer"):
        await trio.to_thread.run_sync(
            lambda: DockerRuntime.connect(DockerConfig(host=dead), node_label="x")
        )


async def test_disabled_docker_says_how_to_enable_it(tmp_path: Path) -> None:
    config = RuntimesConfig(docker=DockerConfig(enabled=False))
    async with open_runtime_manager(config, data_dir=tmp_path) as manager:
        with pytest.raises(ValidationError, match=r"runtimes\.docker\.enabled = false"):
            manager.get("docker")
