"""Fixtures for tests against the real Docker daemon (`scripts/dockerd start && scripts/dockerd
images`; `scripts/test` does both and exports DOCKER_HOST).

Tests that use them are marked `@pytest.mark.docker`. Without a daemon or the test image they
skip locally and fail under CI=true (`require_real_part`).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import docker
import docker.errors
import pytest
import trio

from spear.config import DockerConfig
from spear.errors import RuntimeFailure
from spear.runtimes.docker import LABEL_NODE, DockerRuntime, open_api

#: the busybox image `scripts/dockerd images` builds with `docker import`
BUSYBOX: Final = "spear/busybox:1"
SETUP: Final = (
    "as root, run: scripts/dockerd start && scripts/dockerd images && eval $(scripts/dockerd env)"
)


@pytest.fixture(scope="session")
def docker_api() -> Iterator[docker.APIClient]:
    """A low-level client of the daemon DOCKER_HOST names, with the test image loaded."""
    api: docker.APIClient | None = None
    reason = ""
    try:
        api = open_api(DockerConfig(api_timeout_s=60))
        api.inspect_image(BUSYBOX)
    except docker.errors.ImageNotFound:
        reason = f"the test image {BUSYBOX} is not loaded"
    except RuntimeFailure as exc:
        reason = str(exc)
    if reason:
        from tests.conftest import require_real_part  # tests.conftest imports this module

        if api is not None:
            api.close()
        require_real_part("the docker daemon", False, f"{reason} ({SETUP})")
    assert api is not None
    yield api
    api.close()


@pytest.fixture
def docker_node_label() -> str:
    """A `spear.node` label of this test's own (tests in parallel never reap each other)."""
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture
async def docker_runtime(
    docker_api: docker.APIClient, docker_node_label: str
) -> AsyncIterator[DockerRuntime]:
    """A DockerRuntime on the test daemon; afterwards no container of this test may be left."""
    runtime = await trio.to_thread.run_sync(
        lambda: DockerRuntime.connect(DockerConfig(), node_label=docker_node_label)
    )
    try:
        yield runtime
    finally:
        await runtime.aclose()
    left = labelled_containers(docker_api, docker_node_label)
    assert left == [], f"containers left behind: {left}"


def labelled_containers(api: docker.APIClient, docker_node_label: str) -> list[dict[str, Any]]:
    """Every container (running or not) carrying `spear.node=docker_node_label`."""
    found: list[dict[str, Any]] = api.containers(
        all=True, filters={"label": f"{LABEL_NODE}={docker_node_label}"}
    )
    return found
