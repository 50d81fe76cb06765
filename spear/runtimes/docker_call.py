"""One per-call container run: its captures, stop reason, timings and verdict, and the
exchange over its attach stream (stdin in and half-closed, stdout and stderr out)."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Final

import trio

from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.docker_stream import STDERR, FrameReader
from spear.runtimes.outcomes import (
    SUCCEEDED,
    LogCapture,
    OutputCapture,
    Verdict,
    early_outcome,
    failed,
    output_overflowed,
    timed_out,
)

READ_CHUNK_BYTES: Final = 65536


class Call:
    """One call's container, captures, stop reason and timings."""

    __slots__ = (
        "container_id",
        "execution",
        "exit_code",
        "failure",
        "logs",
        "oom_killed",
        "output",
        "spawned",
        "spec",
        "started",
        "stop_reason",
        "timeout_s",
    )

    def __init__(self, spec: FunctionSpec, timeout_s: float, started: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.started = started
        self.spawned = started
        self.execution = ""
        self.container_id: str | None = None
        self.output = OutputCapture(spec.max_output_bytes)
        self.logs = LogCapture(spec.max_log_bytes)
        self.stop_reason: ErrorCode | None = None
        self.failure: str | None = None
        self.exit_code: int | None = None
        self.oom_killed: bool | None = False  # see oom_verdict

    def stop(self, reason: ErrorCode) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def outcome(self) -> RunOutcome:
        if self.failure is not None:
            return early_outcome(failed(ErrorCode.START_FAILED, self.failure))
        done = time.perf_counter()
        return self._verdict().outcome(
            self.output, self.logs, acquire_s=self.spawned - self.started, run_s=done - self.spawned
        )

    def _verdict(self) -> Verdict:
        if self.stop_reason is ErrorCode.TIMEOUT:
            return timed_out(self.timeout_s)
        if self.stop_reason is ErrorCode.OUTPUT_LIMIT:
            return output_overflowed(self.output.limit)
        code = -1 if self.exit_code is None else self.exit_code
        if code == 0:
            return SUCCEEDED
        oom = oom_verdict("the container", self.oom_killed, self.spec.memory_limit_bytes, code)
        if oom is not None:
            return oom
        return failed(ErrorCode.EXIT_NONZERO, f"the container exited with code {code}", code)


def oom_verdict(
    what: str, oom_killed: bool | None, memory_limit_bytes: int, code: int
) -> Verdict | None:
    """MEMORY_LIMIT for a container the OOM killer ended (`oom_killed` True: the daemon said
    so; None: a SIGKILL it did not record, see DockerRuntime._wait), else None."""
    if oom_killed:
        message = (
            f"{what} was killed by the kernel's OOM killer at its memory_limit_bytes"
            f" ({memory_limit_bytes})"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message, code)
    if oom_killed is None:
        message = (
            f"{what} was killed by a SIGKILL that spear did not send (exit code {code}): most"
            f" likely the kernel's OOM killer at its memory_limit_bytes ({memory_limit_bytes}),"
            " though the daemon did not record it"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message, code)
    return None


async def exchange(call: Call, stream: trio.SocketStream, data: bytes) -> None:
    """Send `data` then half-close stdin, while reading frames until the stream ends."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_feed, stream, data)
        frames = FrameReader()
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await stream.receive_some(READ_CHUNK_BYTES):
                for stream_id, payload in frames.feed(chunk):
                    if stream_id == STDERR:
                        call.logs.write(payload)
                    elif not call.output.write(payload):
                        call.stop(ErrorCode.OUTPUT_LIMIT)
                        break
                if call.stop_reason is not None:
                    break
        # A function that never read its stdin may leave the feeder blocked.
        nursery.cancel_scope.cancel()


async def _feed(stream: trio.SocketStream, data: bytes) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if data:
            await stream.send_all(data)
        await stream.send_eof()
