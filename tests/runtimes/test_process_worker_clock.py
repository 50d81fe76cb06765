"""Deadlines of process worker requests under both of trio's clocks: the real one, where the
pump's timerfd enforces them, and a test's MockClock, where cancel scopes do."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import trio
import trio.testing

from spear.model import ExecStatus, FunctionSpec
from spear.runtimes import ProcessRuntime
from spear.runtimes.base import WORKER
from spear.runtimes.process_worker import ProcessInstance
from tests.runtimes.conftest import function_spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEP_S = 20.0


def sleeper(timeout_s: float) -> FunctionSpec:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    command = (sys.executable, "-m", "spear.worker", "worker_handlers:sleep")
    return function_spec(
        runtime="process", mode=WORKER, command=command, env=env, timeout_s=timeout_s
    )


async def test_the_timer_path_on_the_real_clock(process: ProcessRuntime) -> None:
    with trio.fail_after(STEP_S):
        instance = await process.start_instance(sleeper(0.2))
    assert isinstance(instance, ProcessInstance)
    try:
        assert instance._clock_offset is not None
        with trio.fail_after(STEP_S):
            quick = await instance.invoke(b"0", deadline=math.inf, execution_id="ex-1")
            late = await instance.invoke(b"60", deadline=math.inf, execution_id="ex-2")
        assert quick.status is ExecStatus.SUCCEEDED
        assert late.status is ExecStatus.TIMEOUT
        assert not instance.healthy
    finally:
        await instance.aclose()


async def test_cancel_scopes_under_a_mock_clock(
    process: ProcessRuntime, mock_clock: trio.testing.MockClock
) -> None:
    # Jump only once the loop idled 3 s: the worker starts (and says hello) in real time.
    mock_clock.autojump_threshold = 3.0
    instance = await process.start_instance(sleeper(3600.0))
    assert isinstance(instance, ProcessInstance)
    try:
        assert instance._clock_offset is None
        started = trio.current_time()
        outcome = await instance.invoke(b"7200", deadline=math.inf, execution_id="ex-1")
        assert outcome.status is ExecStatus.TIMEOUT
        assert trio.current_time() - started >= 3600.0
    finally:
        await instance.aclose()
