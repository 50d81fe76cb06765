"""Process worker instances with real `python -m spear.worker` processes: the Instance contract,
limits, crashes, protocol violations, concurrency, cancellation and the process group."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from spear.config import ProcessConfig
from spear.errors import RuntimeFailure, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes import ProcessRuntime
from spear.runtimes.base import PER_CALL, WORKER, check_mode
from spear.runtimes.process_verdicts import FUNCTION_ERROR, WORKER_LOST
from spear.runtimes.process_worker import ProcessInstance, WorkerSettings
from tests.runtimes.conftest import MiB, function_spec, wait_gone

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FOREVER = math.inf
#: bound on any single test step that waits for a real process
STEP_S = 20.0
#: how long a SIGKILLed process may take to disappear from the process table


def worker_spec(*command: str, **fields: Any) -> FunctionSpec:
    """A process task in mode worker; its PYTHONPATH reaches spear and worker_handlers."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return function_spec(runtime="process", mode=WORKER, command=command, env=env, **fields)


def sdk(target: str, *args: str, **fields: Any) -> FunctionSpec:
    """A task served by `python -m spear.worker worker_handlers:<target>`."""
    command = (sys.executable, "-m", "spear.worker", f"worker_handlers:{target}", *args)
    return worker_spec(*command, **fields)


@asynccontextmanager
async def open_instance(
    runtime: ProcessRuntime, spec: FunctionSpec
) -> AsyncIterator[ProcessInstance]:
    with trio.fail_after(STEP_S):
        instance = await runtime.start_instance(spec)
    assert isinstance(instance, ProcessInstance)
    try:
        yield instance
    finally:
        await instance.aclose()


async def call(instance: ProcessInstance, data: bytes, deadline: float = FOREVER) -> Any:
    with trio.fail_after(STEP_S):
        return await instance.invoke(data, deadline=deadline, execution_id="ex-test")


async def wait_exit(pid: int) -> None:
    """Block (in a thread) until child `pid` has exited, without reaping it."""
    await trio.to_thread.run_sync(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT)


class CallHome:
    """A loopback listener that handlers `call_home` to: proof that they are running."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.port: int = listener.socket.getsockname()[1]
        self.streams: list[trio.SocketStream] = []

    async def accept_started(self) -> None:
        with trio.fail_after(STEP_S):
            stream = await self.listener.accept()
            assert await stream.receive_some(16) == b"started"
        self.streams.append(stream)

    async def release_all(self) -> None:
        for stream in self.streams:
            await stream.send_all(b"go")


@pytest.fixture
async def home() -> AsyncIterator[CallHome]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        home = CallHome(listener)
        yield home
        for stream in home.streams:
            await stream.aclose()


# --- the contract ---------------------------------------------------------------------------


async def test_a_warm_worker_serves_many_invocations(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("upper")) as instance:
        assert instance.healthy and instance.max_concurrency == 1
        for word in (b"one", b"two", b"three"):
            outcome = await call(instance, word)
            assert outcome.status is ExecStatus.SUCCEEDED
            assert outcome.output == word.upper()
            assert outcome.cold is False and outcome.exit_code is None
            assert set(outcome.timings_ms) == {"acquire", "run"}
            # the request's own logs: the logger line (with the execution id) and a print
            assert b"[ex-test] upper of" in outcome.logs
            assert outcome.logs.count(b"a stray print goes to the logs") == 1
        assert process.statistics()["worker_instances"] == 1
    assert process.statistics()["worker_instances"] == 0


async def test_the_handler_sees_its_context_and_a_clean_environment(
    process: ProcessRuntime,
) -> None:
    async with open_instance(process, sdk("describe", timeout_s=5.0)) as instance:
        outcome = await instance.invoke(
            b"", deadline=trio.current_time() + 2.0, execution_id="ex-42", content_type="text/csv"
        )
    assert outcome.content_type == "application/json"
    doc = json.loads(outcome.output)
    assert doc["execution_id"] == "ex-42" and doc["content_type"] == "text/csv"
    assert 1.0 < doc["remaining_s"] <= 2.0  # the shorter of the caller's deadline and timeout
    assert set(doc["env"]) <= {"PATH", "LANG", "TZ", "PYTHONPATH", "LC_CTYPE"}


async def test_large_input_and_output_pass_through_full_pipes(process: ProcessRuntime) -> None:
    data = os.urandom(3 * MiB)  # far beyond a pipe's 64 KiB: partial writes, queued frames
    async with open_instance(process, sdk("upper", max_output_bytes=4 * MiB)) as instance:
        for _ in range(2):
            outcome = await call(instance, data)
            assert outcome.status is ExecStatus.SUCCEEDED
            assert outcome.output == data.upper()


async def test_a_handler_exception_fails_that_request_only(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("fail")) as instance:
        outcome = await call(instance, b"bad input")
        assert outcome.status is ExecStatus.FAILED
        assert outcome.error_code is FUNCTION_ERROR
        assert outcome.error_message == (
            "the function failed (handler_error): ValueError: boom: bad input"
        )
        assert b"Traceback" in outcome.logs and b"ValueError: boom" in outcome.logs
        assert instance.healthy
        assert (await call(instance, b"again")).error_message.endswith("boom: again")


async def test_a_handler_returning_no_bytes_fails_with_a_clear_message(
    process: ProcessRuntime,
) -> None:
    async with open_instance(process, sdk("bad_result")) as instance:
        outcome = await call(instance, b"")
    assert outcome.error_message == (
        "the function failed (bad_result): the handler returned int; it must return bytes or str"
    )


async def test_a_crash_mid_request_fails_it_and_the_instance(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("crash")) as instance:
        outcome = await call(instance, b"")
        assert outcome.status is ExecStatus.FAILED
        assert outcome.error_code is WORKER_LOST
        assert outcome.exit_code == 7
        assert outcome.error_message == "the worker exited with code 7 while serving this request"
        assert b"about to crash" in outcome.logs
        assert not instance.healthy
        later = await call(instance, b"")
        assert later.error_message == ("the worker instance stopped serving: it exited with code 7")


async def test_a_worker_dying_while_idle_turns_unhealthy(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("upper")) as instance:
        pid = instance.statistics()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, 9)
        await wait_exit(pid)
        assert not instance.healthy


async def test_a_request_past_its_deadline_times_out_and_kills_the_worker(
    process: ProcessRuntime,
) -> None:
    async with open_instance(process, sdk("sleep", timeout_s=0.3)) as instance:
        pid = instance.statistics()["pid"]
        assert isinstance(pid, int)
        outcome = await call(instance, b"30")
        assert outcome.status is ExecStatus.TIMEOUT
        assert outcome.error_code is ErrorCode.TIMEOUT
        assert outcome.error_message == "the function did not finish within its timeout of 0.300 s"
        assert not instance.healthy
        await wait_exit(pid)  # killed: it returns long before the 30 s sleep ends


async def test_a_callers_deadline_shortens_the_timeout(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("sleep", timeout_s=30.0)) as instance:
        outcome = await call(instance, b"30", deadline=trio.current_time() + 0.2)
        assert outcome.status is ExecStatus.TIMEOUT
        late = await instance.invoke(b"1", deadline=trio.current_time(), execution_id="ex-late")
        assert late.status is ExecStatus.TIMEOUT  # answered at once, nothing sent


async def test_a_request_already_late_is_not_sent(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("upper")) as instance:
        late = await instance.invoke(b"x", deadline=trio.current_time(), execution_id="ex-1")
        assert late.status is ExecStatus.TIMEOUT
        assert instance.healthy


async def test_output_over_the_limit_fails_the_request_but_keeps_the_worker(
    process: ProcessRuntime,
) -> None:
    async with open_instance(process, sdk("big", max_output_bytes=1000)) as instance:
        outcome = await call(instance, b"1001")
        assert outcome.error_code is ErrorCode.OUTPUT_LIMIT
        assert outcome.output == b"x" * 1000
        assert instance.healthy
        assert (await call(instance, b"1000")).status is ExecStatus.SUCCEEDED


async def test_an_oversized_frame_is_an_output_limit_and_costs_the_worker(
    process: ProcessRuntime,
) -> None:
    async with open_instance(process, sdk("big", max_output_bytes=1000)) as instance:
        outcome = await call(instance, str(MiB).encode())
        assert outcome.error_code is ErrorCode.OUTPUT_LIMIT
        assert not instance.healthy


async def test_an_allocation_over_the_memory_limit_fails_the_request(
    process: ProcessRuntime,
) -> None:
    spec = sdk("hog", memory_limit_bytes=256 * MiB)
    async with open_instance(process, spec) as instance:
        outcome = await call(instance, str(1024 * MiB).encode())
        assert outcome.error_code is ErrorCode.MEMORY_LIMIT
        assert b"MemoryError" in outcome.logs
        assert instance.healthy  # Python survives a MemoryError
        assert (await call(instance, str(MiB).encode())).status is ExecStatus.SUCCEEDED


# --- concurrency and cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["async_call_home", "call_home"])
async def test_n_requests_run_at_once_on_one_instance(
    process: ProcessRuntime, home: CallHome, target: str
) -> None:
    n = 4
    outcomes: list[Any] = []
    async with open_instance(process, sdk(target, "--concurrency", str(n))) as instance:
        assert instance.max_concurrency == n

        async def one() -> None:
            outcomes.append(await call(instance, str(home.port).encode()))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
            for _ in range(n):  # all n handlers are running before any may finish
                await home.accept_started()
            await home.release_all()
    assert [o.output for o in outcomes] == [b"done go"] * n


async def test_a_timeout_fails_the_other_requests_on_the_instance(
    process: ProcessRuntime, home: CallHome
) -> None:
    outcomes: dict[str, Any] = {}
    async with open_instance(process, sdk("async_call_home", "--concurrency", "2")) as instance:

        async def one(name: str, timeout_s: float) -> None:
            deadline = trio.current_time() + timeout_s
            outcomes[name] = await call(instance, str(home.port).encode(), deadline)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "patient", STEP_S / 2)
            await home.accept_started()
            nursery.start_soon(one, "hasty", 0.3)  # neither is ever released
        assert not instance.healthy
    assert outcomes["hasty"].status is ExecStatus.TIMEOUT
    assert outcomes["patient"].error_code is WORKER_LOST
    assert outcomes["patient"].error_message == (
        "the worker was stopped because another request on it passed its deadline"
    )


async def test_requests_beyond_the_workers_concurrency_wait_for_a_slot(
    process: ProcessRuntime,
) -> None:
    outputs: list[bytes] = []
    async with open_instance(process, sdk("upper")) as instance:

        async def one(word: bytes) -> None:
            outputs.append((await call(instance, word)).output)

        async with trio.open_nursery() as nursery:
            for word in (b"a", b"b", b"c"):
                nursery.start_soon(one, word)
        assert instance.healthy
    assert sorted(outputs) == [b"A", b"B", b"C"]


async def test_cancelling_an_async_request_keeps_the_worker(tmp_path: Path, home: CallHome) -> None:
    # a grace far beyond the worker's answer time, so a busy machine cannot fail the test
    settings = WorkerSettings(cancel_grace_s=STEP_S)
    process = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "w", worker_settings=settings)
    async with open_instance(process, sdk("async_call_home")) as instance:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, instance, str(home.port).encode())
            await home.accept_started()
            nursery.cancel_scope.cancel()
        assert instance.healthy  # the worker answered the cancel frame in time
        assert (await call(instance, b"next")).output == b"NEXT"


async def test_a_cancelled_caller_is_cancelled_also_when_the_answer_is_in_at_once(
    tmp_path: Path,
) -> None:
    # On one CPU the worker mostly answers before the host's write returns, and the call
    # then awaits nothing for its answer: it must still be a cancel point.
    settings = WorkerSettings(cancel_grace_s=STEP_S)
    process = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "w", worker_settings=settings)
    async with open_instance(process, sdk("upper")) as instance:
        for _ in range(20):
            with trio.CancelScope() as scope:
                scope.cancel()
                await call(instance, b"x")
            assert scope.cancelled_caught
        assert instance.healthy
        assert (await call(instance, b"next")).output == b"NEXT"


async def test_cancelling_a_request_the_worker_cannot_stop_kills_it(
    process: ProcessRuntime, home: CallHome
) -> None:
    async with open_instance(process, sdk("call_home")) as instance:
        pid = instance.statistics()["pid"]
        assert isinstance(pid, int)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, instance, str(home.port).encode())
            await home.accept_started()
            nursery.cancel_scope.cancel()
        assert not instance.healthy
        await wait_exit(pid)


async def test_aclose_kills_the_whole_process_group(process: ProcessRuntime) -> None:
    async with open_instance(process, sdk("fork_child")) as instance:
        child = int((await call(instance, b"")).output)
        assert psutil.pid_exists(child)
    assert not instance.healthy
    assert await wait_gone(child)
    await instance.aclose()  # idempotent


async def test_the_runtime_closes_instances_left_open(process: ProcessRuntime) -> None:
    instance = await process.start_instance(sdk("upper"))
    await process.aclose()
    assert not instance.healthy


# --- starting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (sdk("no_such_handler"), "exited with code 2; its last logs: spear.worker:"),
        (
            worker_spec(sys.executable, "-m", "spear.worker", "no_such_module:handle"),
            "cannot import module 'no_such_module'",
        ),
        (worker_spec("printf", "hello"), "broke the worker protocol (frame of"),
        (worker_spec("/bin/sh", "-c", "echo no >&2; exit 3"), "exited with code 3; its last"),
    ],
)
async def test_a_worker_that_does_not_start_is_a_runtime_failure(
    process: ProcessRuntime, spec: FunctionSpec, reason: str
) -> None:
    with pytest.raises(RuntimeFailure, match="the worker did not start: ") as info:
        with trio.fail_after(STEP_S):
            await process.start_instance(spec)
    assert reason in str(info.value)
    assert process.statistics()["worker_instances"] == 0


async def test_a_worker_that_says_nothing_is_killed_at_the_start_timeout(tmp_path: Path) -> None:
    settings = WorkerSettings(start_timeout_s=0.2)
    quick = ProcessRuntime(ProcessConfig(), work_dir=tmp_path / "quick", worker_settings=settings)
    with pytest.raises(RuntimeFailure, match=r"it sent no hello frame within 0\.300 s"):
        await quick.start_instance(worker_spec("sleep", "30", timeout_s=0.3))
    assert quick.statistics()["worker_instances"] == 0


async def test_a_command_that_cannot_run_is_a_runtime_failure(process: ProcessRuntime) -> None:
    with pytest.raises(RuntimeFailure, match="not an executable on this node's PATH"):
        await process.start_instance(worker_spec("no-such-command-xyz"))


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("unknown-id", "answered request 999, not in flight"), ("garbage", "malformed CBOR")],
)
async def test_a_protocol_violation_fails_the_request_and_the_worker(
    process: ProcessRuntime, mode: str, reason: str
) -> None:
    spec = worker_spec(sys.executable, str(HERE / "worker_handlers.py"), mode)
    async with open_instance(process, spec) as instance:
        outcome = await call(instance, b"x")
        assert outcome.error_code is WORKER_LOST
        assert reason in outcome.error_message
        assert not instance.healthy


# --- the runtime's modes -------------------------------------------------------------------


async def test_the_process_runtime_offers_both_modes(process: ProcessRuntime) -> None:
    assert process.describe()["modes"] == [PER_CALL, WORKER]
    process.validate_task(sdk("upper"))


def test_check_mode_names_the_supported_modes() -> None:
    spec = function_spec(mode=WORKER)
    check_mode("wasm", spec, (PER_CALL, WORKER))
    with pytest.raises(ValidationError, match="use one of 'per-call'") as info:
        check_mode("wasm", spec)
    assert info.value.field == "mode"
    assert (
        str(info.value) == "mode 'worker' is not supported by runtime 'wasm'; use one of 'per-call'"
    )
