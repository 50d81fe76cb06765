"""The contract every function runtime keeps (DESIGN.md section 5).

A runtime turns a FunctionSpec plus input bytes into a RunOutcome. Function-level failures
(a non-zero exit, a trap, a timeout, a limit) are outcomes, never exceptions; exceptions are
for a task or artifact the runtime refuses (ValidationError, ArtifactError) or a broken host
(RuntimeFailure). Cancellation is trio's: when the caller's scope is cancelled, `run` stops
the guest for real (epoch interrupt, process-group kill) before `trio.Cancelled` leaves it.
"""

from __future__ import annotations

import math
from typing import Any, Final, Protocol

import trio

from spear.errors import ValidationError
from spear.model import FunctionSpec, RunOutcome

#: the instance mode this release implements in every runtime
PER_CALL: Final = "per-call"


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

    async def run(self, spec: FunctionSpec, data: bytes, *, deadline: float) -> RunOutcome:
        """Run the function once with `data` on stdin; `deadline` is a `trio.current_time()`.

        The effective timeout is `min(spec.timeout_s, deadline - now)`. Never raises for a
        function-level failure; raises `trio.Cancelled` only after the guest has stopped.
        """
        ...

    async def aclose(self) -> None:
        """Release what the runtime holds (threads, temp dirs); idempotent."""
        ...


def check_mode(runtime: str, spec: FunctionSpec) -> None:
    """Refuse modes this release does not implement yet."""
    if spec.mode != PER_CALL:
        raise ValidationError(
            f"mode {spec.mode!r} is not supported by runtime {runtime!r} yet; use {PER_CALL!r}",
            field="mode",
        )


def effective_timeout_s(spec: FunctionSpec, deadline: float) -> float:
    """Seconds this run may take: the task's timeout, shortened by the caller's deadline."""
    if math.isinf(deadline):
        return spec.timeout_s
    return min(spec.timeout_s, deadline - trio.current_time())
