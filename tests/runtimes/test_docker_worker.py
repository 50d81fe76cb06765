"""Docker worker instances against the real daemon: a warm container serving many calls.

The image spear/busybox-worker:1 (scripts/dockerd images) runs tests/programs/
docker_upper_worker.c: it upper-cases each request; "crash", "sleep", "fail" and "log" are
its test hooks.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import docker
import docker.errors
import pytest
import trio

from spear.errors import RuntimeFailure
from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes.docker import DockerRuntime
from spear.runtimes.docker_worker import DockerInstance
from tests.docker_env import BUSYBOX, labelled_containers
from tests.runtimes.conftest import function_spec

pytestmark = pytest.mark.docker

WORKER_IMAGE = "spear/busybox-worker:1"


@pytest.fixture
def worker_spec(docker_api: docker.APIClient) -> FunctionSpec:
    try:
        docker_api.inspect_image(WORKER_IMAGE)
    except docker.errors.ImageNotFound:
        from tests.conftest import require_real_part

        require_real_part(f"the test image {WORKER_IMAGE}", False, "run: scripts/dockerd images")
    return function_spec(runtime="docker", mode="worker", image=WORKER_IMAGE, timeout_s=30.0)


@pytest.fixture
async def instance(
    docker_runtime: DockerRuntime, worker_spec: FunctionSpec
) -> AsyncIterator[DockerInstance]:
    await docker_runtime.prepare(worker_spec)
    started = await docker_runtime.start_instance(worker_spec)
    try:
        yield started
    finally:
        await started.aclose()


async def invoke(instance: DockerInstance, data: bytes, timeout_s: float = 30.0) -> ExecStatus:
    outcome = await instance.invoke(
        data, deadline=trio.current_time() + timeout_s, execution_id="ex-test"
    )
    return outcome.status


async def test_a_warm_container_serves_many_calls(
    instance: DockerInstance, docker_runtime: DockerRuntime
) -> None:
    for word in (b"one", b"two", b"three"):
        outcome = await instance.invoke(word, deadline=math.inf, execution_id="ex-1")
        assert outcome.status is ExecStatus.SUCCEEDED
        assert outcome.output == word.upper()
        assert outcome.cold is False
    assert instance.healthy
    assert docker_runtime.statistics()["instances_started"] == 1


async def test_logs_and_function_errors_keep_the_instance(instance: DockerInstance) -> None:
    logged = await instance.invoke(b"log", deadline=math.inf, execution_id="ex-1")
    assert logged.output == b"LOG"
    refused = await instance.invoke(b"fail", deadline=math.inf, execution_id="ex-2")
    # The daemon copies the container's stderr and stdout separately: a line written just
    # before the answer may reach the host after it, and then belongs to the next request.
    assert logged.logs + refused.logs == b"worker log line\n"
    assert refused.status is ExecStatus.FAILED
    assert refused.error_code is ErrorCode.EXIT_NONZERO
    assert refused.error_message == "the function failed: the input asked to fail (bad_input)"
    assert instance.healthy
    assert await invoke(instance, b"again") is ExecStatus.SUCCEEDED


async def test_a_crash_mid_request_fails_it_and_ends_the_instance(
    instance: DockerInstance, docker_api: docker.APIClient, docker_node_label: str
) -> None:
    outcome = await instance.invoke(b"crash", deadline=math.inf, execution_id="ex-1")
    assert outcome.status is ExecStatus.FAILED
    assert outcome.exit_code == 3
    assert outcome.error_message == "the worker container exited with code 3 during the request"
    assert not instance.healthy
    assert labelled_containers(docker_api, docker_node_label) == []
    after = await instance.invoke(b"x", deadline=math.inf, execution_id="ex-2")
    assert after.status is ExecStatus.FAILED


async def test_a_request_past_its_deadline_times_out_and_removes_the_container(
    instance: DockerInstance, docker_api: docker.APIClient, docker_node_label: str
) -> None:
    outcome = await instance.invoke(
        b"sleep", deadline=trio.current_time() + 1.5, execution_id="ex-1"
    )
    assert outcome.status is ExecStatus.TIMEOUT
    assert not instance.healthy
    assert labelled_containers(docker_api, docker_node_label) == []


async def test_cancelling_a_request_removes_the_container(
    instance: DockerInstance, docker_api: docker.APIClient, docker_node_label: str
) -> None:
    with trio.move_on_after(1.0) as scope:
        await instance.invoke(b"sleep", deadline=math.inf, execution_id="ex-1")
    assert scope.cancelled_caught
    assert not instance.healthy
    assert labelled_containers(docker_api, docker_node_label) == []


async def test_a_worker_that_never_says_hello_fails_to_start(
    docker_runtime: DockerRuntime, docker_api: docker.APIClient, docker_node_label: str
) -> None:
    spec = function_spec(
        runtime="docker",
        mode="worker",
        image=BUSYBOX,
        command=("sh", "-c", "echo boom >&2; exit 1"),
        timeout_s=30.0,
    )
    with pytest.raises(RuntimeFailure, match="exited before its hello frame; its logs: boom"):
        await docker_runtime.start_instance(spec)
    assert labelled_containers(docker_api, docker_node_label) == []
