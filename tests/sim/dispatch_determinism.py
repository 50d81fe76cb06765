"""Replayable DispatchSim runs: thread calls run inline and ids come from counters (see
tests.sim.dispatch_sim)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

import spear.roles.sms as sms_module
from spear.model import ExecutionId, TaskId

T = TypeVar("T")


@contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    real = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, real)


async def _inline_run_sync(fn: Callable[..., T], *args: Any, **_: Any) -> T:
    """`trio.to_thread.run_sync` for the simulation: the call runs inline, so virtual time
    cannot move while it runs (the store calls it wraps are in-memory)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Inline thread calls and counter-made ids (see the docstring of tests.sim.dispatch_sim)."""
    executions = itertools.count(1)
    tasks = itertools.count(1)

    def execution_id(now_s: float) -> ExecutionId:
        return ExecutionId(f"ex-{int(now_s * 1000) & 0xFFFFFFFFFFFF:012x}{next(executions):08x}")

    def task_id() -> TaskId:
        return TaskId(f"tk-{seed & 0xFFFFFFFF:08x}{next(tasks):08x}")

    with (
        _patched(trio.to_thread, "run_sync", _inline_run_sync),
        _patched(sms_module, "new_execution_id", execution_id),
        _patched(sms_module, "new_task_id", task_id),
    ):
        yield
