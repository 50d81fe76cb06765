"""How invocations on a process worker end: verdicts for answers, crashes and stops, and the
RunOutcome they make (see spear.runtimes.process_worker for when each applies)."""

from __future__ import annotations

import time
from typing import Final

from spear.model import ErrorCode, ExecStatus, RunOutcome
from spear.runtimes.outcomes import LogCapture, OutputCapture, Verdict, failed, output_overflowed
from spear.runtimes.process_spawn import MEMORY_MARKERS, signal_name
from spear.worker_protocol import DEFAULT_CONTENT_TYPE, Response

#: error codes a worker may answer with that spear knows; any other is FUNCTION_ERROR
WORKER_ERROR_CODES: Final = {"memory_limit": ErrorCode.MEMORY_LIMIT}
FUNCTION_ERROR: Final = ErrorCode.FUNCTION_ERROR
WORKER_LOST: Final = ErrorCode.WORKER_LOST


def how(code: int) -> str:
    """'exited with code 3' or 'was killed by SIGKILL' for an exit status (-signal)."""
    return f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"


def gone(reason: str) -> Verdict:
    """A request on (or for) an instance that stopped serving for `reason`."""
    return failed(WORKER_LOST, f"the worker instance stopped serving: {reason}")


def closed() -> Verdict:
    return failed(WORKER_LOST, "the worker instance was closed while serving this request")


def stopped_for_another() -> Verdict:
    message = "the worker was stopped because another request on it passed its deadline"
    return failed(WORKER_LOST, message)


def crashed(
    code: int, logs: LogCapture, memory_limit_bytes: int, *, oom_killed: bool | None = None
) -> Verdict:
    """A request in flight when the worker exited with `code`; `logs` are the request's.

    `oom_killed`: whether the kernel's OOM killer acted in the worker's cgroup; None under
    rlimits, where an allocation failure in the logs tells a memory limit instead.
    """
    if oom_killed:
        message = (
            f"the worker {how(code)}: its cgroup passed memory_limit_bytes"
            f" ({memory_limit_bytes}) and the kernel's OOM killer stopped it"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message, code)
    if oom_killed is None and logs.contains(MEMORY_MARKERS):
        message = (
            f"the worker {how(code)} after an allocation failed under its memory_limit_bytes"
            f" ({memory_limit_bytes}, enforced as RLIMIT_AS)"
        )
        return failed(ErrorCode.MEMORY_LIMIT, message, code)
    return failed(WORKER_LOST, f"the worker {how(code)} while serving this request", code)


def answered(
    response: Response, logs: bytes, max_output_bytes: int, started: float, sent: float
) -> RunOutcome:
    """The outcome of a request the worker answered (`ok`, or with an error)."""
    if response.ok and len(response.data) <= max_output_bytes:  # the usual answer, built here
        done = time.perf_counter()
        return RunOutcome(
            status=ExecStatus.SUCCEEDED,
            output=response.data,
            logs=logs,
            content_type=response.content_type,
            cold=False,
            timings_ms={"acquire": (sent - started) * 1000, "run": (done - sent) * 1000},
        )
    if not response.ok:
        code = WORKER_ERROR_CODES.get(response.error_code, FUNCTION_ERROR)
        message = f"the function failed ({response.error_code}): {response.error_message}"
        return outcome(failed(code, message), logs, started, sent)
    output = OutputCapture(max_output_bytes)
    output.write(response.data)  # keeps exactly the first max_output_bytes bytes
    verdict = output_overflowed(max_output_bytes)
    return outcome(verdict, logs, started, sent, output.getvalue(), response.content_type)


def outcome(
    verdict: Verdict,
    logs: bytes,
    started: float,
    sent: float,
    output: bytes = b"",
    content_type: str = DEFAULT_CONTENT_TYPE,
) -> RunOutcome:
    """A warm (`cold` False) outcome; `started` and `sent` are `time.perf_counter()` values
    of the call and of the request leaving (the "acquire" and "run" timings split there)."""
    done = time.perf_counter()
    return RunOutcome(
        status=verdict.status,
        output=output,
        logs=logs,
        content_type=content_type,
        error_code=verdict.error_code,
        error_message=verdict.message,
        exit_code=verdict.exit_code,
        cold=False,
        timings_ms={"acquire": (sent - started) * 1000, "run": (done - sent) * 1000},
    )
