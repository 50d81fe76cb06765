"""The docker runtime: a fresh container per call (the CGI/watchdog contract), or warm worker
containers (docker_worker); the docker SDK's only importer, which translates its errors into
spear's. docker_call holds one call's captures and verdict, docker_stream the sockets.

A call is one container: created with the task's image, command and env, attached to before it
starts (so no output is missed), fed the input on stdin (then half-closed), read until the
attach stream ends (stdout = output, stderr = logs, demultiplexed), waited for, and always
removed. Create, attach and start share one worker-thread hop; the attach stream itself is
read on the trio loop (the daemon's socket is handed to trio), so a call holds a thread only
for the short daemon requests.

Limits and how they hold:
- time: a trio deadline on the whole call; at it the container is removed with force (SIGKILL)
  and the call times out. Cancellation removes it the same way, shielded, before
  `trio.Cancelled` leaves `run`.
- memory: `memory_limit_bytes` as the cgroup limit with swap equal to it (no swap); the
  kernel's OOM kill is read from the container state and reported as MEMORY_LIMIT, and so is
  a SIGKILL that spear did not send and the daemon did not record as one (see `_wait`). The
  /tmp tmpfs (`tmp_size_bytes`) counts against the same limit.
- CPU: a quota of `cpus` (nano_cpus); processes: `pids_limit`.
- isolation: network `none` by default (only `lo`), read-only root filesystem,
  no-new-privileges, labels `spear.node`/`spear.task`/`spear.execution` on every container so a
  node that was killed reaps what it left at its next start.
- output: past `max_output_bytes` the container is removed at once (OUTPUT_LIMIT).

Daemon calls that block go through `trio.to_thread.run_sync` with one CapacityLimiter
(`max_api_calls`); every call that may wait on the guest (`wait`) is abandoned on cancellation
and made to return by the forced removal that always follows.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Final, TypeVar

import docker
import docker.errors
import docker.utils
import requests.exceptions
import trio

from spear.config import DockerConfig
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.base import PER_CALL, WORKER, effective_timeout_s
from spear.runtimes.docker_call import Call, exchange
from spear.runtimes.docker_stream import own_socket, probe
from spear.runtimes.docker_worker import DockerInstance
from spear.runtimes.outcomes import early_outcome, timed_out

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_NODE: Final = "spear.node"
LABEL_TASK: Final = "spear.task"
LABEL_EXECUTION: Final = "spear.execution"
#: the daemon refuses smaller memory limits
MIN_MEMORY_BYTES: Final = 6 * 1024 * 1024
#: how long the forced removal after a call may take before it is logged and abandoned
REMOVE_S: Final = 30.0
#: exit code of a process killed by SIGKILL (the OOM killer's signal)
SIGKILL_EXIT: Final = 137
#: how often, and how far apart, a SIGKILLed container's OOM flag is read again
OOM_RECHECKS: Final = 5
OOM_RECHECK_S: Final = 0.05
#: exceptions the SDK raises for a daemon that refuses, fails or does not answer
DAEMON_ERRORS: Final = (docker.errors.DockerException, requests.exceptions.RequestException)
DEFAULT_HOST: Final = "unix:///var/run/docker.sock"


def open_api(config: DockerConfig) -> docker.APIClient:
    """A client of the daemon `config.host` (else DOCKER_HOST, else the default socket) names,
    checked to answer (blocking).

    Raises:
        RuntimeFailure: the daemon cannot be reached; the message says where and why.
    """
    kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
    if config.host:
        kwargs["base_url"] = config.host
    where = kwargs.get("base_url") or DEFAULT_HOST
    try:
        probe(where, config.api_timeout_s)
        return docker.APIClient(
            **kwargs,
            version="auto",
            timeout=config.api_timeout_s,
            max_pool_size=config.max_api_calls,
        )
    except (*DAEMON_ERRORS, OSError) as exc:
        raise RuntimeFailure(
            f"the docker daemon at {where} does not answer ({_reason(exc)});"
            " start it or set runtimes.docker.host (or DOCKER_HOST)"
        ) from exc


class DockerRuntime:
    """Runs functions in containers, per call or as warm workers (see the module docstring)."""

    name = "docker"

    def __init__(self, config: DockerConfig, *, node_label: str, api: docker.APIClient) -> None:
        """Use a connected client; `connect` is the usual way in.

        Args:
            config: the `[runtimes.docker]` section.
            node_label: the value of the `spear.node` label on this node's containers.
            api: a client whose daemon answered.
        """
        self._config = config
        self._node = node_label
        self._api = api
        self._version = str(api.version().get("Version", "unknown"))
        self._limiter = trio.CapacityLimiter(config.max_api_calls)
        self._images: set[str] = set()
        self._running = 0
        self._runs = 0
        self._removed_at_start = 0
        self._instances = 0

    @classmethod
    def connect(cls, config: DockerConfig, *, node_label: str) -> DockerRuntime:
        """Connect to the daemon and remove containers this node left behind (blocking).

        Raises:
            RuntimeFailure: the daemon cannot be reached; the message says where and why.
        """
        api = open_api(config)
        try:
            runtime = cls(config, node_label=node_label, api=api)
            runtime._removed_at_start = runtime._reap()
        except DAEMON_ERRORS as exc:
            api.close()
            raise RuntimeFailure(
                f"the docker daemon at {api.base_url} failed at start ({_reason(exc)})"
            ) from exc
        return runtime

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": self._version,
            "modes": [PER_CALL, WORKER],
            # a worker container serves one request at a time (see docker_worker)
            "worker_max_concurrency": 1,
            "network": self._config.network,
            "pull_policy": self._config.pull_policy,
        }

    def validate_task(self, spec: FunctionSpec) -> None:
        if spec.mode not in (PER_CALL, WORKER):
            raise ValidationError(
                f"mode must be {PER_CALL!r} or {WORKER!r}, got {spec.mode!r}", field="mode"
            )
        if not spec.image:
            raise ValidationError("runtime 'docker' needs an image", field="image")
        if spec.artifact_sha256 is not None:
            raise ValidationError(
                "runtime 'docker' takes no artifact: build the code into the image",
                field="artifact",
            )
        if spec.memory_limit_bytes < MIN_MEMORY_BYTES:
            raise ValidationError(
                f"memory_limit_bytes must be at least {MIN_MEMORY_BYTES} for runtime 'docker'"
                f" (the daemon's minimum), got {spec.memory_limit_bytes}",
                field="memory_limit_bytes",
            )

    def validate_artifact(self, data: bytes) -> None:
        raise ArtifactError("runtime 'docker' takes no artifact: build the code into the image")

    async def prepare(self, spec: FunctionSpec) -> None:
        """Check the task and that its image is on the daemon (pulled per `pull_policy`).

        Raises:
            ValidationError: (field "image") the image is missing and may not be pulled, or
                the pull failed.
            RuntimeFailure: the daemon does not answer.
        """
        self.validate_task(spec)
        assert spec.image is not None
        if spec.image not in self._images:
            await self._call(self._ensure_image, spec.image)
            self._images.add(spec.image)

    async def run(
        self, spec: FunctionSpec, data: bytes, *, deadline: float, execution_id: str = ""
    ) -> RunOutcome:
        call = Call(spec, effective_timeout_s(spec, deadline), time.perf_counter())
        if call.timeout_s <= 0:
            return early_outcome(timed_out(max(call.timeout_s, 0.0)))
        call.execution = execution_id or "run-" + secrets.token_hex(8)
        self._running += 1
        self._runs += 1
        try:
            with trio.move_on_after(call.timeout_s) as guard:
                await self._run(call, data)
            if guard.cancelled_caught:
                call.stop(ErrorCode.TIMEOUT)
        finally:
            self._running -= 1
            if call.container_id is not None:
                with trio.CancelScope(shield=True):
                    await self._remove(call.container_id)
        return call.outcome()

    async def start_instance(self, spec: FunctionSpec) -> DockerInstance:
        """Start a worker container and wait (up to the task's timeout) for its hello frame.

        Raises:
            RuntimeFailure: the container could not be created or started, exited, broke
                the protocol or said nothing in time; the message says which.
        """
        call = Call(spec, spec.timeout_s, time.perf_counter())
        call.execution = "worker-" + secrets.token_hex(8)
        try:
            raw = await self._call(self._create_and_start, call)
        except BaseException:
            if call.container_id is not None:
                with trio.CancelScope(shield=True):
                    await self.remove(call.container_id)
            raise
        assert call.container_id is not None
        instance = DockerInstance(spec, call.container_id, raw, host=self)
        self._instances += 1
        try:
            await instance.wait_ready(trio.current_time() + spec.timeout_s)
        except BaseException:
            await instance.aclose()
            raise
        return instance

    async def wait_exit(self, container_id: str) -> tuple[int, bool | None]:
        """The exit code of a stopped container (-1 if unknown) and whether it was OOM-killed
        (None: most likely, see `_wait`)."""
        try:
            return await self._call(self._wait, container_id, abandon=True)
        except RuntimeFailure:
            return -1, False

    async def remove(self, container_id: str) -> None:
        """Kill and remove a container (forced); logs, never raises, when the daemon fails."""
        await self._remove(container_id)

    async def aclose(self) -> None:
        """Close the daemon connections (every call removes its own container)."""
        self._api.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "running": self._running,
            "runs": self._runs,
            "images": len(self._images),
            "removed_at_start": self._removed_at_start,
            "instances_started": self._instances,
        }

    # --- one call -----------------------------------------------------------------------

    async def _run(self, call: Call, data: bytes) -> None:
        try:
            raw = await self._call(self._create_and_start, call)
            call.spawned = time.perf_counter()
            async with trio.SocketStream(trio.socket.from_stdlib_socket(raw)) as stream:
                await exchange(call, stream, data)
            if call.stop_reason is None:
                assert call.container_id is not None
                # Abandoned on cancellation: the forced removal that follows makes it return.
                call.exit_code, call.oom_killed = await self._call(
                    self._wait, call.container_id, abandon=True
                )
        except RuntimeFailure as exc:
            # The daemon refused or failed (a missing image, a dead daemon): the call fails,
            # the node does not.
            call.failure = str(exc)

    def _create_and_start(self, call: Call) -> socket.socket:
        """Create the container, attach to it, start it; return the attach socket (blocking)."""
        spec = call.spec
        assert spec.image is not None
        created = self._api.create_container(
            spec.image,
            command=list(spec.command) or None,
            environment=dict(spec.env),
            working_dir=getattr(spec, "working_dir", None) or None,
            labels={
                LABEL_NODE: self._node,
                LABEL_TASK: str(spec.task_id),
                LABEL_EXECUTION: call.execution,
            },
            stdin_open=True,
            stop_signal="SIGKILL",
            host_config=self._host_config(spec),
        )
        call.container_id = str(created["Id"])
        attached = self._api.attach_socket(
            call.container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        )
        raw = own_socket(attached)
        try:
            self._api.start(call.container_id)
        except BaseException:
            raw.close()
            raise
        return raw

    def _host_config(self, spec: FunctionSpec) -> dict[str, Any]:
        config = self._config
        tmpfs = (
            {"/tmp": f"size={config.tmp_size_bytes},mode=1777"} if config.tmp_size_bytes else None
        )
        host_config: dict[str, Any] = self._api.create_host_config(
            mem_limit=spec.memory_limit_bytes,
            memswap_limit=spec.memory_limit_bytes,
            nano_cpus=int(config.cpus * 1e9) or None,
            pids_limit=config.pids_limit,
            network_mode=config.network,
            read_only=config.read_only_rootfs,
            security_opt=["no-new-privileges"],
            tmpfs=tmpfs,
        )
        return host_config

    def _wait(self, container_id: str) -> tuple[int, bool | None]:
        """The exit code and whether the kernel's OOM killer ended the container (blocking).

        Call it only for a container spear did not kill. True: the daemon recorded the OOM
        kill. None: a SIGKILL (137) the daemon did not record as one, most likely the OOM
        killer's all the same: nothing inside a container can SIGKILL its first process, and
        the daemon loses the OOM event of a container killed right after it starts (about 1
        call in 10 on a loaded machine; containerd issue 8180). False: not an OOM kill.
        """
        status = self._api.wait(container_id)
        code = int(status.get("StatusCode", -1))
        if code == 0:
            return code, False
        oom_killed = self._oom_killed(container_id)
        # The daemon records the OOM event apart from the exit: a SIGKILL (137) that spear did
        # not send may still turn out to be the OOM killer's; look again, briefly.
        for _ in range(OOM_RECHECKS):
            if oom_killed or code != SIGKILL_EXIT:
                break
            time.sleep(OOM_RECHECK_S)  # a worker thread, never the event loop
            oom_killed = self._oom_killed(container_id)
        if code == SIGKILL_EXIT and not oom_killed:
            return code, None
        return code, oom_killed

    def _oom_killed(self, container_id: str) -> bool:
        state = self._api.inspect_container(container_id).get("State", {})
        return bool(state.get("OOMKilled"))

    async def _remove(self, container_id: str) -> None:
        """Kill and remove a container (forced); log, never raise, when the daemon fails."""
        with trio.move_on_after(REMOVE_S) as guard:
            try:
                await self._call(self._force_remove, container_id, abandon=True)
            except RuntimeFailure as exc:
                log.warning("cannot remove container %s: %s", container_id[:12], exc)
        if guard.cancelled_caught:
            log.warning("removing container %s took over %.0f s", container_id[:12], REMOVE_S)

    def _force_remove(self, container_id: str) -> None:
        with suppress(docker.errors.NotFound):
            self._api.remove_container(container_id, force=True)

    # --- images and leftovers -----------------------------------------------------------

    def _ensure_image(self, image: str) -> None:
        """Make sure `image` is on the daemon, pulling it when the policy allows (blocking)."""
        try:
            self._api.inspect_image(image)
            return
        except docker.errors.ImageNotFound:
            pass
        if self._config.pull_policy == "never":
            raise ValidationError(
                f"image {image!r} is not on this node's docker daemon and"
                " runtimes.docker.pull_policy is 'never'; load it there first"
                " (docker load, docker import) or set the policy to 'if-missing'",
                field="image",
            )
        repository, tag = docker.utils.parse_repository_tag(image)
        try:
            self._api.pull(repository, tag=tag or "latest", timeout=self._config.pull_timeout_s)
        except DAEMON_ERRORS as exc:
            raise ValidationError(
                f"image {image!r} could not be pulled ({_reason(exc)}); check the name and"
                " that the daemon reaches the registry",
                field="image",
            ) from exc

    def _reap(self) -> int:
        """Remove every container labelled with this node (left by a killed node; blocking)."""
        leftovers = self._api.containers(all=True, filters={"label": f"{LABEL_NODE}={self._node}"})
        for container in leftovers:
            self._force_remove(str(container["Id"]))
        if leftovers:
            log.info("removed %d containers this node left behind", len(leftovers))
        return len(leftovers)

    # --- threads ------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        """Run a blocking daemon call in a worker thread; daemon errors become RuntimeFailure."""

        def guarded() -> T:
            try:
                return fn(*args)
            except DAEMON_ERRORS as exc:
                raise RuntimeFailure(f"the docker daemon failed: {_reason(exc)}") from exc

        return await trio.to_thread.run_sync(
            guarded, limiter=self._limiter, abandon_on_cancel=abandon
        )


def _reason(exc: BaseException) -> str:
    """The daemon's own words for an SDK error, on one line."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
