"""One WASM guest run's state, shared by its trio task, its worker thread and the engine.

The trio task may ask it to stop (cancel); the engine's epoch callback asks `should_stop` at
every tick and traps the guest when it says so; the guest's stdin is read from it and its
stdout and stderr written to it (wasm_engine's fd_read and fd_write), which stops it on overflow;
the sleeping `poll_oneoff` waits on it. Plain attribute writes under the GIL are enough for
the flags: each is set once and only read elsewhere.
"""

from __future__ import annotations

import threading
import time

from spear.model import ErrorCode, FunctionSpec, RunOutcome
from spear.runtimes.outcomes import (
    CANCELLED,
    LogCapture,
    OutputCapture,
    Verdict,
    output_overflowed,
    timed_out,
)


class GuestRun:
    """Limits, stop requests, captures and timings of one run."""

    __slots__ = (
        "_stop_event",
        "deadline",
        "logs",
        "output",
        "ready",
        "run_id",
        "spec",
        "started",
        "stdin",
        "stdin_pos",
        "stdout_to_logs",
        "stop_reason",
        "timeout_s",
    )

    def __init__(self, spec: FunctionSpec, run_id: int, timeout_s: float, started: float):
        """
        Args:
            spec: the function.
            run_id: unique in this process (the engine callbacks find the run by it).
            timeout_s: the effective timeout, from now.
            started: `time.perf_counter()` when the caller asked for the run.
        """
        self.spec = spec
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.started = started
        self.ready = started  # when the guest's entry point is called
        self.deadline = time.monotonic() + timeout_s
        self.output = OutputCapture(spec.max_output_bytes)
        self.logs = LogCapture(spec.max_log_bytes)
        self.stop_reason: ErrorCode | None = None
        self._stop_event: threading.Event | None = None
        #: what the guest reads on fd 0, and how far it read (wasm_engine's fd_read)
        self.stdin: bytes = b""
        self.stdin_pos = 0
        #: a reactor's stdout goes to the invocation's logs (its output is the return value)
        self.stdout_to_logs = False

    def stop(self, reason: ErrorCode) -> None:
        """Ask the guest to stop (from any thread); it traps at its next epoch check."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._stop_event is not None:
            self._stop_event.set()

    def should_stop(self) -> bool:
        """True once stopped or past the deadline (then the reason is TIMEOUT)."""
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = ErrorCode.TIMEOUT
        return self.stop_reason is not None

    def sleep(self, seconds: float) -> bool:
        """Sleep for the guest (its thread); False if the run was stopped meanwhile."""
        if self._stop_event is None:
            self._stop_event = threading.Event()
        if self.stop_reason is None:
            self._stop_event.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))
        return not self.should_stop()

    def read_stdin(self, size: int) -> bytes:
        """The next at most `size` bytes of stdin (empty at its end)."""
        start = self.stdin_pos
        chunk = self.stdin[start : start + size]
        self.stdin_pos = start + len(chunk)
        return chunk

    def on_stdout(self, data: bytes) -> None:
        # Past the limit the bytes are dropped and the guest is stopped at the next tick.
        if not self.output.write(data) and self.stop_reason is None:
            self.stop_reason = ErrorCode.OUTPUT_LIMIT

    def stop_verdict(self) -> Verdict | None:
        """The verdict a stop request imposes, whatever the guest did after it."""
        if self.stop_reason is ErrorCode.TIMEOUT:
            return timed_out(self.timeout_s)
        if self.stop_reason is ErrorCode.OUTPUT_LIMIT:
            return output_overflowed(self.output.limit)
        if self.stop_reason is ErrorCode.CANCELLED:
            return CANCELLED
        return None

    def outcome(self, verdict: Verdict) -> RunOutcome:
        done = time.perf_counter()
        return verdict.outcome(
            self.output,
            self.logs,
            acquire_s=self.ready - self.started,
            run_s=done - self.ready,
        )
