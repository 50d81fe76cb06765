"""Warm worker instances of the docker runtime: one long-running container serving many calls.

The container's process speaks spear.worker_protocol on its stdin and stdout, reached through
the attach socket (stdout and stderr multiplexed, see docker_stream); its stderr is the logs.
Requests go one at a time (a lock): the caller holding it writes the request frame and reads
until the answer, so no task runs in the background and an idle instance reads nothing (the
logs it wrote meanwhile go to the next request). `healthy` peeks at the socket to notice a
container that exited while idle.

What ends an instance (it is then unhealthy and its container removed with force):
- a request reaches its deadline (that request times out: the worker cannot be asked to give
  one request up reliably, so the container goes);
- a request is cancelled (the container is removed, shielded, before `trio.Cancelled`
  leaves `invoke`);
- the container exits or closes the stream (the request in flight fails with the exit code;
  `memory_limit` when the kernel's OOM killer ended it);
- the worker breaks the protocol (an oversized frame is that request's `output_limit`);
- `aclose`.

This module does not import the docker SDK: the runtime hands it a `ContainerHost`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from typing import Final, Protocol

import trio

from spear.errors import FrameTooLargeError, RuntimeFailure, WireError
from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.docker_call import oom_verdict
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
from spear.worker_protocol import DEFAULT_CONTENT_TYPE, Completed, HostSession, Response

READ_CHUNK_BYTES: Final = 256 * 1024
#: frame bytes allowed beyond max_output_bytes (map keys, content type, an error message)
FRAME_SLACK_BYTES: Final = 64 * 1024
#: stderr kept from before the hello (quoted when a start fails)
START_LOG_BYTES: Final = 4096


class ContainerHost(Protocol):
    """What an instance needs from the runtime that started its container."""

    async def wait_exit(self, container_id: str) -> tuple[int, bool | None]:
        """The exit code of a container that stopped, and whether it was OOM-killed (None:
        most likely)."""
        ...

    async def remove(self, container_id: str) -> None:
        """Kill and remove a container (forced); never raises."""
        ...


class DockerInstance:
    """A worker container of one task (the `Instance` protocol of spear.runtimes.base)."""

    def __init__(
        self, spec: FunctionSpec, container_id: str, raw: socket.socket, *, host: ContainerHost
    ) -> None:
        """Take over a started container's attach socket (`raw`, owned from here on)."""
        self.container_id = container_id
        self._spec = spec
        self._raw = raw
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        self._host = host
        self._session = HostSession(max_frame_bytes=spec.max_output_bytes + FRAME_SLACK_BYTES)
        self._frames = FrameReader()
        self._lock = trio.Lock()
        self._pending_logs = LogCapture(spec.max_log_bytes)
        self._dead: str | None = None

    async def wait_ready(self, deadline: float) -> None:
        """Read until the worker's hello frame (`deadline`: a `trio.current_time()`).

        Raises:
            RuntimeFailure: the worker exited, broke the protocol or said nothing in time;
                the message quotes its first logs.
        """
        with trio.move_on_at(deadline):
            while not self._session.ready:
                try:
                    chunk = await self._stream.receive_some(READ_CHUNK_BYTES)
                    if not chunk:
                        raise RuntimeFailure(self._start_failure("exited before its hello frame"))
                    self._route(chunk, self._pending_logs)
                except WireError as exc:
                    raise RuntimeFailure(self._start_failure(f"broke the protocol: {exc}")) from exc
                except trio.BrokenResourceError as exc:
                    raise RuntimeFailure(self._start_failure("closed its stream")) from exc
            return
        raise RuntimeFailure(self._start_failure("sent no hello frame within the task's timeout"))

    # --- the Instance protocol ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the worker stopped serving (peeks for a stream the container closed)."""
        if self._dead is None and not self._lock.locked():
            try:
                if self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self._dead = "the worker container exited while idle"
            except BlockingIOError:
                pass
            except OSError as exc:
                self._dead = f"the worker container's stream failed: {exc}"
        return self._dead is None

    async def invoke(self, data: bytes, *, deadline: float, execution_id: str) -> RunOutcome:
        if not self.healthy:
            return early_outcome(failed(ErrorCode.EXIT_NONZERO, f"{self._dead}"))
        async with self._lock:
            return await self._invoke(data, deadline, execution_id)

    async def aclose(self) -> None:
        """Remove the container (forced) and close the stream; idempotent."""
        with trio.CancelScope(shield=True):
            await self._kill(self._dead or "the instance was closed")

    # --- one request --------------------------------------------------------------------

    async def _invoke(self, data: bytes, deadline: float, execution_id: str) -> RunOutcome:
        started = time.perf_counter()
        now = trio.current_time()
        end = min(now + self._spec.timeout_s, deadline)
        if end <= now:
            return early_outcome(timed_out(0.0))
        if self._dead is not None:
            return early_outcome(failed(ErrorCode.EXIT_NONZERO, self._dead))
        logs, self._pending_logs = self._pending_logs, LogCapture(self._spec.max_log_bytes)
        output = OutputCapture(self._spec.max_output_bytes)
        verdict: Verdict | None = None
        try:
            with trio.move_on_at(end):
                verdict = await self._exchange(data, execution_id, end, output, logs)
            if verdict is None:
                verdict = timed_out(end - now)
                await self._kill("a request reached its deadline")
        finally:
            if verdict is None:  # cancelled: the request cannot be taken back
                with trio.CancelScope(shield=True):
                    await self._kill("a request was cancelled")
        outcome = verdict.outcome(output, logs, acquire_s=0.0, run_s=time.perf_counter() - started)
        return _warm(outcome)

    async def _exchange(
        self, data: bytes, execution_id: str, end: float, output: OutputCapture, logs: LogCapture
    ) -> Verdict:
        _id, frame = self._session.start_request(
            execution_id=execution_id,
            data=data,
            content_type=DEFAULT_CONTENT_TYPE,
            deadline=end,
            now=trio.current_time(),
        )
        try:
            await self._stream.send_all(frame)
            while True:
                chunk = await self._stream.receive_some(READ_CHUNK_BYTES)
                if not chunk:
                    return await self._lost()
                response = self._route(chunk, logs)
                if response is not None:
                    return _answer(response, output)
        except trio.BrokenResourceError:
            return await self._lost()
        except FrameTooLargeError:
            await self._kill("the worker sent a frame over its size limit")
            return output_overflowed(output.limit)
        except WireError as exc:
            await self._kill(f"the worker broke the protocol: {exc}")
            return failed(ErrorCode.EXIT_NONZERO, f"the worker broke the protocol: {exc}")

    def _route(self, chunk: bytes, logs: LogCapture) -> Response | None:
        """Feed received bytes: stderr to `logs`, stdout to the session; return an answer."""
        answer: Response | None = None
        for stream_id, payload in self._frames.feed(chunk):
            if stream_id == STDERR:
                logs.write(payload)
                continue
            for event in self._session.receive(payload):
                if isinstance(event, Completed):
                    answer = event.response
        return answer

    async def _lost(self) -> Verdict:
        """The container closed its stream mid-request: how it ended."""
        code, oom_killed = await self._host.wait_exit(self.container_id)
        await self._kill(f"the worker container exited with code {code}")
        limit = self._spec.memory_limit_bytes
        oom = oom_verdict("the worker container", oom_killed, limit, code)
        if oom is not None:
            return oom
        message = f"the worker container exited with code {code} during the request"
        return failed(ErrorCode.EXIT_NONZERO, message, code)

    async def _kill(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        if self._raw.fileno() >= 0:
            self._session.close()
            await self._stream.aclose()
            await self._host.remove(self.container_id)

    def _start_failure(self, what: str) -> str:
        tail = self._pending_logs.getvalue()[:START_LOG_BYTES].decode(errors="replace").strip()
        logs = f"; its logs: {tail}" if tail else ""
        return f"the worker container of task {self._spec.name!r} {what}{logs}"


def _answer(response: Response, output: OutputCapture) -> Verdict:
    if not response.ok:
        code = ErrorCode.MEMORY_LIMIT if response.error_code == "memory_limit" else None
        message = f"the function failed: {response.error_message} ({response.error_code})"
        return failed(code or ErrorCode.EXIT_NONZERO, message)
    if not output.write(response.data):
        return output_overflowed(output.limit)
    return SUCCEEDED


def _warm(outcome: RunOutcome) -> RunOutcome:
    """The outcome as a warm instance reports it (the pool marks a fresh instance cold)."""
    return replace(outcome, cold=False)
