"""Warm worker instances of the process runtime: one process serving many invocations.

The process speaks spear.worker_protocol on its stdin and stdout (HostSession keeps the
protocol state); its stderr is the logs. No task runs in the background: the callers of
`invoke` take turns holding the *pump* role (waiting on the pipes and moving bytes for every
request in flight), and the role passes to another waiting caller when its holder's answer
has arrived. An idle instance reads nothing; `healthy` notices a worker that died meanwhile.
A caller reads stdout once right after writing its request, before it waits: a worker woken
on the caller's CPU has mostly answered by then, and the call then needs no wait (it still
passes a checkpoint, so it stays a cancel point).

What stops an instance (it is then unhealthy, its process group is killed, and every
request in flight fails):
- a request reaches its deadline (that request's outcome is `timeout`; the worker cannot be
  asked to give one request up reliably, so the process goes);
- the worker exits or closes its pipes (a crash: the requests in flight fail with the exit
  status; `memory_limit` if the kernel's OOM killer acted in the instance's cgroup, or, under
  rlimits, if their logs show an allocation failure under RLIMIT_AS);
- the worker breaks the protocol (a bad or oversized frame, an unknown id); an oversized
  frame while one request is in flight is that request's `output_limit`;
- a cancelled request is not answered within `WorkerSettings.cancel_grace_s` (the cancelled
  caller waits that long, shielded, for the worker to give up the request cleanly);
- `aclose`.

An answer larger than `max_output_bytes` (but within the frame cap) fails that request with
`output_limit` and keeps the instance. Logs: every stderr chunk read while requests are in
flight goes to the logs of each of them (exact with one request at a time); what arrives
while none is in flight is kept as a short tail for start failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from spear.errors import FrameTooLargeError, RuntimeFailure, WireError
from spear.model import ExecStatus, FunctionSpec, RunOutcome
from spear.runtimes import process_verdicts as verdicts
from spear.runtimes.base import effective_timeout_s
from spear.runtimes.cgroups import Cgroup
from spear.runtimes.outcomes import LogCapture, Verdict, output_overflowed, timed_out
from spear.runtimes.process_pipes import READ_CHUNK_BYTES, WorkerPipes
from spear.runtimes.process_spawn import Child, exit_status, kill_group, spawn
from spear.worker_protocol import (
    DEFAULT_CONTENT_TYPE,
    Completed,
    Discarded,
    Event,
    HostSession,
    Ready,
    Response,
)

#: frame bytes allowed beyond max_output_bytes (map keys, content type, an error message)
FRAME_SLACK_BYTES: Final = 64 * 1024
#: bound on reaping a killed worker in `aclose`
REAP_TIMEOUT_S: Final = 5.0
#: stderr kept from the times no request is in flight (shown when a start fails)
LOG_TAIL_BYTES: Final = 4096
_SUCCEEDED: Final = ExecStatus.SUCCEEDED


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """How long a process worker may take to start, and to answer a cancelled request."""

    #: bound on the start, up to the hello frame (a task with a longer timeout gets that)
    start_timeout_s: float = 30.0
    #: how long a cancelled request may take to be answered before the worker is killed
    cancel_grace_s: float = 0.5


class _Waiter:
    """One request in flight: its logs, then its answer or the verdict that replaced it."""

    __slots__ = (
        "capture",
        "content_type",
        "done",
        "max_log_bytes",
        "output",
        "response",
        "timeout_s",
        "verdict",
        "wake",
    )

    def __init__(self, max_log_bytes: int, timeout_s: float = 0.0) -> None:
        self.timeout_s = timeout_s
        self.max_log_bytes = max_log_bytes
        self.capture: LogCapture | None = None  # made at the first chunk: most requests log none
        self.output: bytes | None = None  # an `ok` answer (the usual one) ...
        self.content_type = DEFAULT_CONTENT_TYPE
        self.response: Response | None = None  # ... or any other
        self.verdict: Verdict | None = None
        self.done = False
        self.wake: trio.Event | None = None  # made when the waiter waits without the pump

    @property
    def logs(self) -> LogCapture:
        if self.capture is None:
            self.capture = LogCapture(self.max_log_bytes)
        return self.capture

    def log_bytes(self) -> bytes:
        return b"" if self.capture is None else self.capture.getvalue()

    def answer(self, output: bytes, content_type: str) -> None:
        self.output, self.content_type, self.done = output, content_type, True
        if self.wake is not None:
            self.wake.set()

    def finish(self, response: Response | None = None, verdict: Verdict | None = None) -> None:
        self.response, self.verdict, self.done = response, verdict, True
        if self.wake is not None:
            self.wake.set()


class ProcessInstance:
    """A worker process of one task (the `Instance` protocol of spear.runtimes.base)."""

    def __init__(
        self,
        spec: FunctionSpec,
        proc: Child,
        pipes: WorkerPipes,
        *,
        on_close: Callable[[ProcessInstance], None],
        cancel_grace_s: float,
        cgroup: Cgroup | None = None,
    ) -> None:
        self._spec = spec
        self._cgroup = cgroup
        self._cancel_grace_s = cancel_grace_s
        self._proc = proc
        self._pipes = pipes
        self._on_close = on_close
        self._session = HostSession(max_frame_bytes=spec.max_output_bytes + FRAME_SLACK_BYTES)
        self._waiters: dict[int, _Waiter] = {}
        self._slots = trio.lowlevel.ParkingLot()
        self._parked = 0  # callers parked in _slots (a ParkingLot's len() is a Python call)
        self._pumping = False
        self._tail = bytearray()
        self._dead: str | None = None
        self._closed = False
        # trio time minus CLOCK_MONOTONIC when deadlines can go to the pipes' timer (trio's
        # SystemClock); None under another clock (a test's MockClock): cancel scopes then
        self._clock_offset = _system_clock_offset() if pipes.has_timer else None

    @classmethod
    async def start(
        cls,
        spec: FunctionSpec,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        on_close: Callable[[ProcessInstance], None],
        settings: WorkerSettings,
        cgroup: Cgroup | None = None,
    ) -> ProcessInstance:
        """Spawn the worker and wait for its hello frame (see WorkerSettings).

        `cgroup` (which `argv` joins) becomes the instance's: killed with it, removed by
        `aclose`, also when the start fails.

        Raises:
            RuntimeFailure: the process could not start, exited, broke the protocol or said
                nothing in time; the message quotes its last logs.
        """
        pipes = WorkerPipes()
        stdin, stdout, stderr = pipes.child_fds()
        try:
            proc = await spawn(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)
        except BaseException as exc:
            pipes.close()
            if cgroup is not None:
                with trio.CancelScope(shield=True):
                    await cgroup.remove()
            if isinstance(exc, (OSError, ValueError)):  # ValueError: a NUL byte in argv or env
                raise RuntimeFailure(f"cannot start the worker: {exc}") from exc
            raise
        pipes.attach(proc.pid)
        instance = cls(
            spec,
            proc,
            pipes,
            on_close=on_close,
            cancel_grace_s=settings.cancel_grace_s,
            cgroup=cgroup,
        )
        try:
            await instance._await_hello(max(settings.start_timeout_s, spec.timeout_s))
        except BaseException:
            await instance.aclose()
            raise
        return instance

    # --- the Instance protocol ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the worker stopped serving (checks that its process is still alive)."""
        if self._dead is None and self._pipes.exited():
            self._lost()
        return self._dead is None

    @property
    def max_concurrency(self) -> int:
        """Requests the worker serves at once (from its hello)."""
        return self._session.max_concurrency

    async def invoke(
        self,
        data: bytes,
        *,
        deadline: float,
        execution_id: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> RunOutcome:
        """Serve one invocation (the contract of `Instance.invoke`).

        Waits for a free slot of the worker's concurrency, sends the request and waits for
        its answer until `min(deadline, now + timeout)`; past it the worker is killed and the
        outcome is `timeout`. On cancellation the worker is sent a cancel frame and given
        `cancel_grace_s` to answer, else it is killed; then `trio.Cancelled` propagates.
        """
        started = time.perf_counter()
        offset = self._clock_offset
        if offset is not None:  # trio's time without asking trio (a few calls less)
            now = started + offset
            timeout_s = min(self._spec.timeout_s, deadline - now)  # effective_timeout_s
        else:
            now = trio.current_time()
            timeout_s = effective_timeout_s(self._spec, deadline)
        if timeout_s <= 0:  # never send a request that is late already: it would cost the worker
            return verdicts.outcome(timed_out(0.0), b"", started, started)
        due = now + timeout_s
        session = self._session
        if not session.has_room or self._dead is not None:
            with trio.move_on_at(due):
                await self._acquire_slot()
            if self._dead is not None:
                return verdicts.outcome(verdicts.gone(self._dead), b"", started, started)
            if not session.has_room:
                return verdicts.outcome(timed_out(timeout_s), b"", started, started)
            now = trio.current_time()
        id_, frame = session.start_request(
            execution_id=execution_id, data=data, content_type=content_type, deadline=due, now=now
        )
        waiter = self._waiters[id_] = _Waiter(self._spec.max_log_bytes, timeout_s)
        sent = time.perf_counter()
        pipes = self._pipes
        try:
            try:  # _send inlined
                pipes.send(frame)
            except BrokenPipeError:
                self._lost()
            if offset is not None:  # the pump enforces the deadline (_expire)
                pipes.arm(due - offset)
                if self._pumping:
                    await self._until_done(waiter)
                else:  # _until_done inlined: the usual caller pumps for itself
                    self._pumping = True
                    try:
                        # A worker woken on this CPU has often answered by the time the
                        # write returns: one read before waiting (as trio's streams do)
                        # spares the wait's registration and wake-up.
                        if self._dead is None and not pipes.sending:
                            early = pipes.read_stdout()
                            if early != b"":  # an answer, or None: the end of stdout
                                self._pumped(early)
                        answered_at_once = waiter.done
                        while not waiter.done and self._dead is None:
                            await pipes.wait()
                            self._pump()
                    finally:
                        self._pumping = False
                        if len(self._waiters) > 1:  # someone else may need the pump now
                            self._pass_pump()
                    if answered_at_once:  # nothing awaited yet: this call's cancel point
                        await trio.lowlevel.checkpoint()
            else:
                with trio.move_on_at(due):
                    await self._until_done(waiter)
                if not waiter.done:
                    self._die("a request passed its deadline", self._timeout_verdicts({id_}))
        except trio.Cancelled:
            await self._abandon(id_, waiter)
            raise
        finally:
            if not waiter.done:  # an exception other than trio's: the request is lost
                self._die("an invocation was interrupted", self._lost_verdict)
            del self._waiters[id_]
        return self._answer_outcome(waiter, started, sent)

    async def aclose(self) -> None:
        """Kill the worker's process group, reap it (bounded) and close the pipes."""
        if self._closed:
            return
        self._closed = True
        self._die("the instance was closed", self._closed_verdict)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(REAP_TIMEOUT_S):
                await self._proc.wait()
            if self._cgroup is not None:
                await self._cgroup.remove()
        self._pipes.close()
        self._on_close(self)

    def statistics(self) -> dict[str, object]:
        return {
            "pid": self._proc.pid,
            "healthy": self._dead is None,
            "in_flight": self._session.in_flight,
            "max_concurrency": self._session.max_concurrency,
        }

    # --- the pump -------------------------------------------------------------------------

    async def _until_done(self, waiter: _Waiter) -> None:
        """Return once `waiter` is answered or failed, pumping the pipes whenever no one else
        does."""
        while not waiter.done:
            if self._pumping:
                wake = waiter.wake = trio.Event()
                await wake.wait()
                continue
            self._pumping = True
            try:
                while not waiter.done and self._dead is None:
                    await self._pipes.wait()
                    self._pump()
            finally:
                self._pumping = False
                if len(self._waiters) > 1:  # someone else may need the pump now
                    self._pass_pump()

    def _pass_pump(self) -> None:
        for other in self._waiters.values():
            if not other.done:
                if other.wake is not None:
                    other.wake.set()
                return

    def _pump(self) -> None:
        """Move whatever is ready: queued frames out; answers and logs in; notice an exit
        and, on the timer path, a request past its deadline."""
        if self._dead is not None:  # the pipes may be closed already
            return
        pipes = self._pipes
        broken = False
        if pipes.sending:
            try:
                pipes.flush()
            except BrokenPipeError:
                broken = True
        self._pumped(pipes.read_stdout(), broken)

    def _pumped(self, chunk: bytes | None, broken: bool = False) -> None:
        """`_pump` once stdout was read (`chunk`) and queued frames were flushed."""
        pipes = self._pipes
        # stderr after stdout: a worker writes a request's logs before its answer, so every
        # log line of the answers in `chunk` is there by now
        logs = pipes.read_stderr()
        if logs:
            if len(logs) == READ_CHUNK_BYTES:
                logs += pipes.read_stderr()
            self._take_logs(logs)
        if chunk:
            answer = self._session.receive_answer(chunk)
            if answer is not None:  # the usual read: one `ok` answer
                self._waiters[answer[0]].answer(answer[1], answer[2])
                if self._parked:
                    self._slots.unpark()
            elif not self._receive(chunk):
                return
        if pipes.disarm_fired():
            self._expire()
        # level-triggered: bytes still unread wake the next wait; an exit is looked for
        # only when nothing came (stdout may close a moment before the exit can be seen)
        if broken or (not chunk and not logs and self._dead is None and pipes.exited()):
            while logs := pipes.read_stderr():
                self._take_logs(logs)
            self._lost()
        elif chunk is None and not pipes.watches_exit:
            self._lost()

    def _expire(self) -> None:
        """The timer fired: stop the worker if a request is past its deadline, else re-arm."""
        if self._dead is not None or self._clock_offset is None:
            return
        late = self._session.expired(trio.current_time())
        if late:
            self._die("a request passed its deadline", self._timeout_verdicts(set(late)))
        elif self._session.in_flight:
            self._pipes.arm(self._session.next_deadline - self._clock_offset)

    def _receive(self, chunk: bytes) -> bool:
        """Handle bytes from stdout; False if they broke the protocol (the worker is gone)."""
        try:
            events = self._session.receive(chunk)
        except WireError as exc:
            self._violation(exc)
            return False
        for event in events:
            self._HANDLERS[type(event)](self, event)
        return True

    def _handle_ready(self, event: Event) -> None:
        """The hello: nothing to do beyond what the session recorded."""

    def _handle_completed(self, event: Event) -> None:
        assert isinstance(event, Completed)
        self._waiters[event.response.id].finish(response=event.response)
        if self._parked:
            self._slots.unpark()

    def _handle_discarded(self, event: Event) -> None:
        assert isinstance(event, Discarded)
        self._waiters[event.id].finish()
        if self._parked:
            self._slots.unpark()

    _HANDLERS: Final[dict[type, Callable[[ProcessInstance, Event], None]]] = {
        Ready: _handle_ready,
        Completed: _handle_completed,
        Discarded: _handle_discarded,
    }

    def _take_logs(self, chunk: bytes) -> None:
        if not chunk:
            return
        live = [w for w in self._waiters.values() if not w.done]
        for waiter in live:
            waiter.logs.write(chunk)
        if not live:
            self._tail += chunk
            del self._tail[:-LOG_TAIL_BYTES]

    def _send(self, frame: bytes) -> None:
        try:
            self._pipes.send(frame)
        except BrokenPipeError:
            self._lost()

    # --- starting, slots, cancellation ------------------------------------------------------

    async def _await_hello(self, timeout_s: float) -> None:
        hello = _Waiter(LOG_TAIL_BYTES)
        self._waiters[0] = hello  # ids start at 1: 0 is this pseudo-request's
        try:
            with trio.move_on_after(timeout_s):
                while not self._session.ready and self._dead is None:
                    await self._pipes.wait()
                    self._pump()
        finally:
            del self._waiters[0]
        self._tail += hello.log_bytes()
        if not self._session.ready:
            reason = self._dead or f"it sent no hello frame within {timeout_s:.3f} s"
            tail = self._tail.decode(errors="replace").strip()
            logs = f"; its last logs: {tail[-1000:]}" if tail else ""
            raise RuntimeFailure(f"the worker did not start: {reason}{logs}")

    async def _acquire_slot(self) -> None:
        while self._dead is None and self._session.in_flight >= self._session.max_concurrency:
            self._parked += 1
            try:
                await self._slots.park()
            finally:
                self._parked -= 1

    async def _abandon(self, id_: int, waiter: _Waiter) -> None:
        if waiter.done or self._dead is not None:
            return
        grace_s = self._cancel_grace_s
        self._send(self._session.cancel(id_, now=trio.current_time(), grace_s=grace_s))
        with trio.CancelScope(shield=True), trio.move_on_after(grace_s):
            await self._until_done(waiter)
        if not waiter.done:
            message = f"it did not answer a cancelled request within {grace_s} s"
            self._die(message, self._lost_verdict)

    # --- how an instance stops --------------------------------------------------------------

    def _die(self, reason: str, verdict: Callable[[int, _Waiter], Verdict]) -> None:
        """Stop serving for `reason`: kill the group, fail every request in flight."""
        if self._dead is not None:
            return
        self._dead = reason
        kill_group(self._proc.pid)
        if self._cgroup is not None:
            self._cgroup.kill()
        for id_ in self._session.close():
            waiter = self._waiters.get(id_)
            if waiter is not None and not waiter.done:
                waiter.finish(verdict=verdict(id_, waiter))
        hello = self._waiters.get(0)
        if hello is not None:
            hello.finish()
        self._slots.unpark_all()

    def _lost(self) -> None:
        """The worker exited or closed a pipe."""
        code = exit_status(self._proc.pid)
        if code is None:
            self._die("it closed its stdin or stdout", self._lost_verdict)
        else:
            self._die(f"it {verdicts.how(code)}", self._crash_verdict(code))

    def _violation(self, exc: WireError) -> None:
        reason = f"it broke the worker protocol ({exc})"
        live = [i for i, w in self._waiters.items() if i and not w.done]
        if isinstance(exc, FrameTooLargeError) and len(live) == 1:
            limit = self._spec.max_output_bytes
            self._die(reason, lambda _i, _w: output_overflowed(limit))
        else:
            self._die(reason, self._lost_verdict)

    def _lost_verdict(self, _id: int, _waiter: _Waiter) -> Verdict:
        return verdicts.gone(self._dead or "")

    def _closed_verdict(self, _id: int, _waiter: _Waiter) -> Verdict:
        return verdicts.closed()

    def _crash_verdict(self, code: int) -> Callable[[int, _Waiter], Verdict]:
        limit = self._spec.memory_limit_bytes
        cgroup = self._cgroup
        oom = None if cgroup is None else cgroup.oom_kills() > 0
        return lambda _id, waiter: verdicts.crashed(code, waiter.logs, limit, oom_killed=oom)

    def _timeout_verdicts(self, late: set[int]) -> Callable[[int, _Waiter], Verdict]:
        def verdict(id_: int, waiter: _Waiter) -> Verdict:
            if id_ in late:
                return timed_out(waiter.timeout_s)
            return verdicts.stopped_for_another()

        return verdict

    def _answer_outcome(self, waiter: _Waiter, started: float, sent: float) -> RunOutcome:
        output = waiter.output
        logs = b"" if waiter.capture is None else waiter.capture.getvalue()  # log_bytes()
        limit = self._spec.max_output_bytes
        if output is not None and len(output) <= limit:  # the usual answer, built here
            done = time.perf_counter()
            return RunOutcome(
                status=_SUCCEEDED,
                output=output,
                logs=logs,
                content_type=waiter.content_type,
                cold=False,
                timings_ms={"acquire": (sent - started) * 1000, "run": (done - sent) * 1000},
            )
        response = waiter.response
        if output is not None:
            response = Response(id=0, ok=True, data=output, content_type=waiter.content_type)
        if response is None:
            assert waiter.verdict is not None
            return verdicts.outcome(waiter.verdict, logs, started, sent)
        return verdicts.answered(response, logs, limit, started, sent)


def _system_clock_offset() -> float | None:
    """trio's time minus `time.perf_counter()` (CLOCK_MONOTONIC on Linux) when trio runs on
    its SystemClock, which adds a fixed offset to it; None under any other clock."""
    clock = trio.lowlevel.current_clock()
    offset = getattr(clock, "offset", None)
    if type(clock).__name__ != "SystemClock" or not isinstance(offset, float):
        return None
    return offset
