"""spear's shared vocabulary: ids, task definitions, invocations, results and execution records.

Task definitions are pydantic models because they arrive from clients and must be validated
field by field (the gateway derives its OpenAPI schema from them). Everything on the hot path
(invocations, run outcomes, records) is a frozen slotted dataclass.
"""

from __future__ import annotations

import enum
import os
import random
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

NodeId = NewType("NodeId", str)
TaskId = NewType("TaskId", str)
ExecutionId = NewType("ExecutionId", str)
FileId = NewType("FileId", str)

TASK_ID_RE = re.compile(r"^tk-[0-9a-f]{16}$")
EXECUTION_ID_RE = re.compile(r"^ex-[0-9a-f]{20}$")
FILE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"

RuntimeName = Literal["wasm", "process", "docker"]
ModeName = Literal["per-call", "worker"]
RUNTIMES: tuple[str, ...] = ("wasm", "process", "docker")
MAX_MEMORY_LIMIT_BYTES = 1 << 40  # 1 TiB


def new_task_id() -> TaskId:
    return TaskId("tk-" + secrets.token_hex(8))


#: the random part of execution ids: seeded from the OS once, then cheap (one id per
#: invocation; `secrets` would cost a getrandom syscall each). Ids name executions, they are
#: not secrets: nothing is authorized by knowing one.
_ids = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


def new_execution_id(now_s: float) -> ExecutionId:
    """A time-ordered execution id: 48 bits of milliseconds, then 32 random bits."""
    return ExecutionId(f"ex-{int(now_s * 1000) & 0xFFFFFFFFFFFF:012x}{_ids.getrandbits(32):08x}")


def new_node_id() -> NodeId:
    return NodeId("nd-" + secrets.token_hex(8))


class ExecStatus(enum.StrEnum):
    """The life of an execution. The last four are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (ExecStatus.PENDING, ExecStatus.RUNNING)


class ErrorCode(enum.StrEnum):
    """Why a function's execution did not succeed (the `error.code` of a record)."""

    EXIT_NONZERO = "exit_nonzero"
    TRAP = "trap"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    FUEL_EXHAUSTED = "fuel_exhausted"
    CANCELLED = "cancelled"
    START_FAILED = "start_failed"
    NODE_LOST = "node_lost"
    FUNCTION_ERROR = "function_error"  # a worker answered with an error
    WORKER_LOST = "worker_lost"  # a worker crashed, broke the protocol or was killed
    EXPIRED = "expired"  # an async execution did not start within retry.max_event_age_s


# --- task definitions (validated client input) ---------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolSpec(_Spec):
    """Warm-instance pool settings of one task in mode `worker`; unset keys come from `[pool]`."""

    min_instances: int | None = Field(default=None, ge=0, le=1024, strict=True)
    max_instances: int | None = Field(default=None, ge=1, le=1024, strict=True)
    max_concurrency: int | None = Field(default=None, ge=1, le=1024, strict=True)
    idle_timeout_s: float | None = Field(default=None, gt=0, le=86400)
    max_requests: int | None = Field(
        default=None, ge=0, strict=True, description="requests before recycling; 0 = never"
    )
    acquire_timeout_ms: int | None = Field(
        default=None, ge=0, le=900_000, strict=True, description="wait for a free instance"
    )
    max_waiters: int | None = Field(default=None, ge=0, le=100_000, strict=True)


class PlacementSpec(_Spec):
    labels: dict[str, str] = Field(default_factory=dict)
    node_id: str | None = None


class RetrySpec(_Spec):
    """How an async execution is retried (a sync one never is: its caller decides)."""

    max_attempts: int = Field(default=2, ge=1, le=10, strict=True, description="runs at most")
    backoff_ms: int = Field(
        default=1000, ge=0, le=3_600_000, strict=True, description="wait before the 2nd attempt"
    )
    max_backoff_ms: int = Field(
        default=60_000, ge=0, le=3_600_000, strict=True, description="doubling stops here"
    )
    max_event_age_s: int = Field(
        default=21_600,
        ge=1,
        le=604_800,
        strict=True,
        description="an execution not started this long after it was accepted is dead-lettered",
    )


class TaskSpec(_Spec):
    """A function definition as a client registers it (DESIGN.md section 6)."""

    name: str = Field(pattern=NAME_PATTERN, description="unique name; may not start with 'tk-'")
    runtime: RuntimeName
    mode: ModeName = "per-call"
    artifact: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="file_id of an uploaded artifact"
    )
    command: list[str] = Field(default_factory=list, max_length=256)
    image: str | None = Field(default=None, min_length=1, max_length=256)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_ms: int | None = Field(
        default=None, ge=1, strict=True, description="default: runtimes.default_timeout_ms"
    )
    memory_limit_bytes: int | None = Field(
        default=None,
        ge=65536,
        le=MAX_MEMORY_LIMIT_BYTES,
        strict=True,
        description="default: runtimes.default_memory_limit_bytes",
    )
    description: str = Field(default="", max_length=1024)
    pool: PoolSpec = Field(default_factory=PoolSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)

    @model_validator(mode="after")
    def _check_runtime_fields(self) -> TaskSpec:
        if self.name.startswith("tk-"):
            raise _field_error("name", "name may not start with 'tk-' (reserved for task ids)")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key:
                raise _field_error("env", f"env key {key!r} must be non-empty without '=' or NUL")
            if "\0" in value:
                raise _field_error("env", f"env value of {key!r} may not contain NUL bytes")
        if any("\0" in arg for arg in self.command):
            raise _field_error("command", "command arguments may not contain NUL bytes")
        if self.runtime == "wasm" and self.artifact is None:
            message = "runtime 'wasm' needs an artifact (the file_id of a WASM module)"
            raise _field_error("artifact", message)
        if self.runtime == "process" and self.artifact is None and not self.command:
            raise _field_error("command", "runtime 'process' needs a command or an artifact")
        if self.runtime == "docker" and self.image is None:
            raise _field_error("image", "runtime 'docker' needs an image")
        return self

    def inapplicable_field(self) -> tuple[str, str] | None:
        """A field set that this runtime or mode ignores, and why: (field, message); None
        if there is none. Checked when a task is registered (a stored definition is taken
        as it is: one stored before the rule must still load)."""
        if self.image is not None and self.runtime != "docker":
            return "image", f"image applies to runtime 'docker' only, not {self.runtime!r}"
        if self.artifact is not None and self.runtime == "docker":
            return "artifact", "artifact applies to runtimes 'wasm' and 'process', not 'docker'"
        if self.mode != "worker" and self.pool.model_dump(exclude_none=True):
            return "pool", f"pool applies to mode 'worker' only, not {self.mode!r}"
        return None


def _field_error(field: str, message: str) -> PydanticCustomError:
    """A rule of a whole definition that one field breaks: its message, and the field in the
    error's context (the gateway names it in its 422)."""
    return PydanticCustomError("task_field", message, {"field": field})


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """A registered task: the client's spec plus what spear assigned."""

    task_id: TaskId
    spec: TaskSpec
    created_at: float

    @property
    def name(self) -> str:
        return self.spec.name

    def to_doc(self) -> dict[str, Any]:
        return {"task_id": self.task_id, **self.spec.model_dump(), "created_at": self.created_at}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> TaskRecord:
        body = {k: v for k, v in doc.items() if k not in ("task_id", "created_at")}
        return cls(
            task_id=TaskId(doc["task_id"]),
            spec=TaskSpec.model_validate(body),
            created_at=float(doc["created_at"]),
        )


# --- what a runtime is given and gives back ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FunctionSpec:
    """Everything a runtime needs to run one task, limits resolved against the config."""

    task_id: TaskId
    name: str
    runtime: str
    mode: str
    artifact_path: Path | None
    artifact_sha256: str | None
    command: tuple[str, ...]
    image: str | None
    env: Mapping[str, str]
    timeout_s: float
    memory_limit_bytes: int
    max_output_bytes: int
    max_log_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOutcome:
    """What one run of a function produced (DESIGN.md section 5)."""

    status: ExecStatus
    output: bytes = b""
    logs: bytes = b""
    content_type: str = "application/octet-stream"
    error_code: ErrorCode | None = None
    error_message: str | None = None
    exit_code: int | None = None
    cold: bool = True
    #: phases in milliseconds: "acquire" (cold start / instance acquisition) and "run"
    timings_ms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionRecord:
    """The record of one execution, as `GET /api/v1/executions/{id}` shows it."""

    execution_id: ExecutionId
    task_id: TaskId
    task_name: str
    mode: Literal["sync", "async"]
    status: ExecStatus
    node_id: NodeId | None = None
    attempts: int = 0
    error: Mapping[str, str] | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    cold: bool | None = None
    exit_code: int | None = None
    output_bytes: int = 0
    idempotency_key: str | None = None
    #: async only: when the next attempt may start (wall clock), after a failed one
    retry_at: float | None = None
    #: async only: its attempts are used up (or it aged out) without success
    dead_letter: bool = False
    #: async only: one entry per attempt that ended: attempt, node_id, status, error, times
    history: tuple[Mapping[str, Any], ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "mode": self.mode,
            "status": self.status.value,
            "node_id": self.node_id,
            "attempts": self.attempts,
            "error": dict(self.error) if self.error else None,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timings": dict(self.timings_ms),
            "cold": self.cold,
            "exit_code": self.exit_code,
            "output_bytes": self.output_bytes,
            "idempotency_key": self.idempotency_key,
            "retry_at": self.retry_at,
            "dead_letter": self.dead_letter,
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ExecutionRecord:
        return cls(
            execution_id=ExecutionId(doc["execution_id"]),
            task_id=TaskId(doc["task_id"]),
            task_name=str(doc["task_name"]),
            mode=doc["mode"],
            status=ExecStatus(doc["status"]),
            node_id=NodeId(doc["node_id"]) if doc.get("node_id") else None,
            attempts=int(doc.get("attempts", 0)),
            error=doc.get("error"),
            created_at=float(doc.get("created_at", 0.0)),
            started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            timings_ms=dict(doc.get("timings") or {}),
            cold=doc.get("cold"),
            exit_code=doc.get("exit_code"),
            output_bytes=int(doc.get("output_bytes", 0)),
            idempotency_key=doc.get("idempotency_key"),
            retry_at=doc.get("retry_at"),
            dead_letter=bool(doc.get("dead_letter", False)),
            history=tuple(doc.get("history") or ()),
        )
