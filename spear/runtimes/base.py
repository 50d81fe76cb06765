"""The contract every function runtime keeps (DESIGN.md section 5).

A runtime turns a FunctionSpec plus input bytes into a RunOutcome. Function-level failures
(a non-zero exit, a trap, a timeout, a limit) are outcomes, never exceptions; exceptions are
for a task or artifact the runtime refuses (ValidationError, ArtifactError) or a broken host
(RuntimeFailure). Cancellation is trio's: when the caller's scope is cancelled, `run` stops
the guest for real (epoch interrupt, process-group kill) before `trio.Cancelled` leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Final, Protocol

import trio

from spear.errors import ValidationError
from spear.model import FunctionSpec, RunOutcome

#: a fresh instance per invocation: stdin -> stdout, exit code 0 = success
PER_CALL: Final = "per-call"
#: a warm instance serving many invocations over the framed protocol (DESIGN.md section 5)
WORKER: Final = "worker"


class Instance(Protocol):
    """One warm instance of a task in mode `worker`, started by `Runtime.start_instance`.

    The InstancePool owns instances: it starts them, hands each to at most
    `max_concurrency` callers at once, and evicts one whose `healthy` turns False (a crash, a
    protocol violation, a timed-out request that could not be stopped cleanly).
    """

    @property
    def healthy(self) -> bool:
        """False once the instance can no longer serve (the pool then evicts it)."""
        ...

    async def invoke(self, data: bytes, *, deadline: float, execution_id: str) -> RunOutcome:
        """Serve one invocation; `deadline` is a `trio.current_time()`.

        Function-level failures are outcomes (as in `Runtime.run`); `cold` in the outcome is
        False (the pool marks the first request of a fresh instance cold). Safe to call
        concurrently when the task allows `max_concurrency > 1`. On cancellation the request
        is abandoned; an instance that cannot abandon it cleanly marks itself unhealthy.
        """
        ...

    async def aclose(self) -> None:
        """Stop the instance for real (kill, remove) and release its resources; idempotent."""
        ...


class Runtime(Protocol):
    """One way of running functions on this host (wasm, process, docker)."""

    name: str

    def describe(self) -> dict[str, Any]:
        """`{"available": bool, "version": str, "modes": [...]}` plus runtime details."""
        ...

    def validate_task(self, spec: FunctionSpec) -> None:
        """Check a task definition against this runtime.

        Raises:
            ValidationError: naming the field and the rule it breaks.
        """
        ...

    def validate_artifact(self, data: bytes) -> None:
        """Check artifact bytes (blocking: callers run it in a worker thread).

        Raises:
            ArtifactError: one sentence saying what is wrong with the artifact.
        """
        ...

    async def prepare(self, spec: FunctionSpec) -> None:
        """Warm a task (compile and cache its module, stage its executable).

        Raises:
            ValidationError: the task breaks a rule of this runtime.
            ArtifactError: the artifact is not valid for this runtime.
            RuntimeFailure: the artifact cannot be read or staged on this node.
        """
        ...

    async def run(
        self, spec: FunctionSpec, data: bytes, *, deadline: float, execution_id: str = ""
    ) -> RunOutcome:
        """Run the function once with `data` on stdin; `deadline` is a `trio.current_time()`.

        `execution_id` names the run where the runtime shows it (e.g. a container label).

        The effective timeout is `min(spec.timeout_s, deadline - now)`. Never raises for a
        function-level failure; raises `trio.Cancelled` only after the guest has stopped.
        """
        ...

    async def start_instance(self, spec: FunctionSpec) -> Instance:
        """Start one warm instance of a task in mode `worker` (ready to serve on return).

        Raises:
            RuntimeFailure: the instance could not be started (the caller counts it as a
                failed cold start).
        """
        ...

    async def aclose(self) -> None:
        """Release what the runtime holds (threads, temp dirs); idempotent."""
        ...


def check_mode(runtime: str, spec: FunctionSpec, modes: Collection[str] = (PER_CALL,)) -> None:
    """Refuse a task whose mode is not among the runtime's supported `modes`.

    Raises:
        ValidationError: naming the mode, the runtime and the modes it supports.
    """
    if spec.mode not in modes:
        supported = ", ".join(repr(mode) for mode in modes)
        raise ValidationError(
            f"mode {spec.mode!r} is not supported by runtime {runtime!r}; use one of {supported}",
            field="mode",
        )


def effective_timeout_s(spec: FunctionSpec, deadline: float) -> float:
    """Seconds this run may take: the task's timeout, shortened by the caller's deadline."""
    if math.isinf(deadline):
        return spec.timeout_s
    return min(spec.timeout_s, deadline - trio.current_time())
