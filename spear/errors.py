"""spear's exception tree: every error spear raises on purpose derives from SpearError.

The tree separates local misuse (bad config, bad requests) from remote misbehaviour (a peer
or a guest breaking a contract), and "we closed it" from "it broke":

    SpearError
    ├── ConfigError            a setting is unknown or has a bad value (dotted key + rule)
    ├── ValidationError        a client request breaks a rule (field + rule), HTTP 400/413/422
    ├── NotFoundError          the named task, file or execution does not exist, HTTP 404
    ├── ConflictError          the name is taken / the state forbids it, HTTP 409
    ├── UnavailableError       the service cannot take the request now, HTTP 503 (+ Retry-After)
    │   └── SaturatedError     a task's instances or every fitting node are full, HTTP 429
    ├── StoreError             the embedded store failed (I/O, corruption), HTTP 500 never leaks
    │   └── StoreClosedError   used after close (our own misuse)
    ├── WireError              a frame could not be encoded or decoded (peer misbehaviour)
    │   └── FrameTooLargeError
    └── RuntimeFailure         a runtime could not run a function at all (not a function failure)
        └── ArtifactError      an artifact is not valid for its runtime (e.g. not WASM)

A function that fails, traps or times out is *not* an exception: it is an execution result
whose status says so (see spear.model.ExecutionResult).
"""

from __future__ import annotations


class SpearError(Exception):
    """Root of every error spear raises on purpose."""

    #: machine-readable code used in HTTP error bodies ({"error": code, "message": ...})
    code = "internal"


class ConfigError(SpearError):
    """A configuration key is unknown or its value breaks a rule; the message names the key."""

    code = "bad_config"


class ValidationError(SpearError):
    """A client request breaks a rule; the message names the field and the rule."""

    code = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLargeError(ValidationError):
    """A request body is larger than the configured limit."""

    code = "payload_too_large"


class NotFoundError(SpearError):
    """The named object does not exist."""

    code = "not_found"


class ConflictError(SpearError):
    """The request conflicts with what exists (a duplicate name, a finished execution)."""

    code = "conflict"


class UnavailableError(SpearError):
    """The service cannot take the request now; retrying later may succeed."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SaturatedError(UnavailableError):
    """A task's instances are all busy and none freed up within its acquire deadline, or every
    node that fits an invocation is full (its `node.max_running` executions are running).

    HTTP 429 with Retry-After: the platform works, it is at its configured capacity
    (`pool.max_instances` x `pool.max_concurrency`, `pool.max_waiters` callers queued; the
    nodes' slots).
    """

    code = "saturated"


class StoreError(SpearError):
    """The embedded store failed (I/O error, corrupt file, backend missing)."""

    code = "store_error"


class StoreClosedError(StoreError):
    """The store was used after it was closed (a bug in the caller)."""

    code = "store_closed"


class WireError(SpearError):
    """A frame could not be encoded or decoded; the peer that sent it misbehaved."""

    code = "bad_frame"


class FrameTooLargeError(WireError):
    """A frame is larger than the configured cap."""

    code = "frame_too_large"


class RuntimeFailure(SpearError):
    """A runtime could not start a function at all (missing runtime, broken host)."""

    code = "runtime_failure"


class ArtifactError(RuntimeFailure):
    """An artifact is not valid for its runtime (e.g. bytes that are not a WASM module)."""

    code = "bad_artifact"


def rebuild(
    kind: type[SpearError],
    message: str,
    *,
    field: str | None = None,
    retry_after_s: float = 1.0,
) -> SpearError:
    """An error of `kind` as a peer named it (an HTTP error body, a mesh refusal): the field a
    ValidationError names, the wait an UnavailableError asks for."""
    if issubclass(kind, ValidationError):
        return kind(message, field=field)
    if issubclass(kind, UnavailableError):
        return kind(message, retry_after_s=retry_after_s)
    return kind(message)
