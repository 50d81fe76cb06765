"""How runs end: bounded captures of stdout and stderr, verdicts, and the RunOutcome they make.

Output has a hard limit: past it the run fails with OUTPUT_LIMIT and the runtime stops the
guest, so a capture never holds more than its limit. Logs are best effort: past the limit the
rest is dropped, the run goes on, and the logs end with a note saying how much was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from spear.model import ErrorCode, ExecStatus, RunOutcome


class OutputCapture:
    """Collects a stream up to `limit` bytes; `overflowed` once a write would pass it.

    Writes arrive from one thread or task at a time, so there is no lock.
    """

    __slots__ = ("_chunks", "limit", "overflowed", "size")

    def __init__(self, limit: int) -> None:
        self.limit: Final = limit
        self.size = 0
        self.overflowed = False
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> bool:
        """Keep `data` if it fits; return False (and drop it) once the limit is passed."""
        if self.overflowed:
            return False
        if self.size + len(data) > self.limit:
            # Keep what fits, so the stored output is exactly the first `limit` bytes.
            room = self.limit - self.size
            if room > 0:
                self._chunks.append(data[:room])
                self.size += room
            self.overflowed = True
            return False
        self._chunks.append(data)
        self.size += len(data)
        return True

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


class LogCapture:
    """Collects a stream up to `limit` bytes, then counts what it drops."""

    __slots__ = ("_chunks", "dropped", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit: Final = limit
        self.size = 0
        self.dropped = 0
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) <= room:
            self._chunks.append(data)
            self.size += len(data)
            return
        if room > 0:
            self._chunks.append(data[:room])
            self.size += room
        self.dropped += len(data) - max(room, 0)

    def contains(self, needles: tuple[bytes, ...]) -> bool:
        """Whether any of `needles` is in the captured logs."""
        body = b"".join(self._chunks)
        return any(needle in body for needle in needles)

    def note(self, text: str) -> None:
        """Append a line from spear itself (kept even when the guest's logs were cut)."""
        self._chunks.append(f"[spear] {text}\n".encode())

    def getvalue(self) -> bytes:
        body = b"".join(self._chunks)
        if self.dropped:
            body += (
                f"\n[spear] logs truncated: {self.dropped} more bytes were dropped after"
                f" runtimes.max_log_bytes ({self.limit})\n"
            ).encode()
        return body


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a run ended, before its output, logs and timings are attached."""

    status: ExecStatus
    error_code: ErrorCode | None = None
    message: str | None = None
    exit_code: int | None = None

    def outcome(
        self, output: OutputCapture, logs: LogCapture, *, acquire_s: float, run_s: float
    ) -> RunOutcome:
        return RunOutcome(
            status=self.status,
            output=output.getvalue(),
            logs=logs.getvalue(),
            error_code=self.error_code,
            error_message=self.message,
            exit_code=self.exit_code,
            cold=True,
            timings_ms={"acquire": acquire_s * 1000, "run": run_s * 1000},
        )


SUCCEEDED: Final = Verdict(ExecStatus.SUCCEEDED, exit_code=0)
CANCELLED: Final = Verdict(ExecStatus.CANCELLED, ErrorCode.CANCELLED, "the execution was cancelled")


def timed_out(timeout_s: float) -> Verdict:
    message = f"the function did not finish within its timeout of {timeout_s:.3f} s"
    return Verdict(ExecStatus.TIMEOUT, ErrorCode.TIMEOUT, message)


def output_overflowed(limit: int) -> Verdict:
    message = (
        f"the function wrote more than runtimes.max_output_bytes ({limit}) to stdout"
        " and was stopped"
    )
    return Verdict(ExecStatus.FAILED, ErrorCode.OUTPUT_LIMIT, message)


def failed(code: ErrorCode, message: str, exit_code: int | None = None) -> Verdict:
    return Verdict(ExecStatus.FAILED, code, message, exit_code)


def early_outcome(verdict: Verdict, logs: str = "") -> RunOutcome:
    """The outcome of a run that ended before its function started."""
    return RunOutcome(
        status=verdict.status,
        logs=f"[spear] {logs}\n".encode() if logs else b"",
        error_code=verdict.error_code,
        error_message=verdict.message,
        cold=True,
    )
