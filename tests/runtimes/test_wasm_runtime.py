"""The WASM runtime against hand-written WAT guests: contract, limits, cancellation, cache.

These run real guests on real threads, so time is real: limits are a few hundred ms and the
assertions are about outcomes, never about how long something took (except "promptly": well
under the run's own timeout).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from spear.config import WasmConfig
from spear.demo import upper_wasm
from spear.errors import ArtifactError, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes import WasmRuntime
from tests.runtimes import guests
from tests.runtimes.conftest import MiB

WasmSpec = Callable[..., FunctionSpec]
FOREVER = math.inf


async def test_upper_succeeds_with_timings(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(upper_wasm())
    await wasm.prepare(spec)
    outcome = await wasm.run(spec, b"hello, spear", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"HELLO, SPEAR"
    assert outcome.exit_code == 0
    assert outcome.error_code is None
    assert outcome.cold is True
    assert set(outcome.timings_ms) == {"acquire", "run"}
    assert all(value >= 0 for value in outcome.timings_ms.values())


async def test_large_input_streams_through(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    outcome = await wasm.run(
        wasm_spec(upper_wasm(), max_output_bytes=4 * MiB), data, deadline=FOREVER
    )
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == data.upper()


async def test_stdio_follows_the_wasi_rules(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    # stdin, stdout and stderr are served from host memory (wasm_engine's fd_read, fd_write)
    outcome = await wasm.run(
        wasm_spec(guests.wasm(guests.STDIO_RULES)), b"abcdef", deadline=FOREVER
    )
    assert outcome.status is ExecStatus.SUCCEEDED, outcome.error_message
    errnos, data = outcome.output[:3], outcome.output[3:]
    assert list(errnos) == [8, 8, 21]  # EBADF, EBADF, EFAULT
    assert data == b"abcdef"  # one read filled both buffers, one write sent both


async def test_env_is_exactly_the_task_env(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.ENV_COUNT), env={"A": "1", "B": "2"})
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.output == b"2"


async def test_trap_is_reported(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    outcome = await wasm.run(wasm_spec(guests.wasm(guests.TRAP)), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.TRAP
    assert outcome.error_message is not None
    assert "unreachable" in outcome.error_message
    assert b"backtrace" in outcome.logs


async def test_exit_code_3(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    outcome = await wasm.run(wasm_spec(guests.wasm(guests.EXIT_3)), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.EXIT_NONZERO
    assert outcome.exit_code == 3


async def test_infinite_loop_times_out(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    outcome = await wasm.run(
        wasm_spec(guests.wasm(guests.LOOP), timeout_s=0.2), b"", deadline=FOREVER
    )
    assert outcome.status is ExecStatus.TIMEOUT
    assert outcome.error_code is ErrorCode.TIMEOUT
    assert wasm.statistics()["running"] == 0


async def test_caller_deadline_shortens_the_timeout(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.LOOP), timeout_s=60.0)
    outcome = await wasm.run(spec, b"", deadline=trio.current_time() + 0.2)
    assert outcome.status is ExecStatus.TIMEOUT


async def test_expired_deadline_does_not_start(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(upper_wasm())
    outcome = await wasm.run(spec, b"x", deadline=trio.current_time() - 1)
    assert outcome.status is ExecStatus.TIMEOUT
    assert wasm.statistics()["compiles"] == 0


async def test_sleeping_guest_times_out_promptly(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.sleep(60 * 10**9)), timeout_s=0.3)
    started = time.monotonic()
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert time.monotonic() - started < 10  # not the guest's 60 s sleep
    assert wasm.statistics()["running"] == 0


async def test_short_sleep_completes(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    outcome = await wasm.run(wasm_spec(guests.wasm(guests.sleep(10**6))), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"ok"


async def test_fuel_exhaustion(tmp_path: Path, wasm_spec: WasmSpec) -> None:
    runtime = WasmRuntime(WasmConfig(fuel=10_000), cache_dir=tmp_path / "fuel-cache")
    try:
        outcome = await runtime.run(wasm_spec(guests.wasm(guests.LOOP)), b"", deadline=FOREVER)
    finally:
        await runtime.aclose()
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.FUEL_EXHAUSTED


async def test_memory_grow_past_the_limit(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.GROW), memory_limit_bytes=4 * 65536)
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT
    assert outcome.error_message is not None
    assert "memory_limit_bytes" in outcome.error_message


async def test_initial_memory_over_the_limit(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.BIG_MEMORY), memory_limit_bytes=4 * 65536)
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT


async def test_output_over_the_limit_stops_the_guest(
    wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(guests.wasm(guests.spew(1)), max_output_bytes=1000, timeout_s=30.0)
    started = time.monotonic()
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.OUTPUT_LIMIT
    assert len(outcome.output) <= 1000
    assert time.monotonic() - started < 10  # stopped, not timed out
    assert wasm.statistics()["running"] == 0


async def test_stderr_is_captured_as_logs(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    outcome = await wasm.run(wasm_spec(guests.wasm(guests.log_lines(3))), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"done"
    assert outcome.logs == b"log line 0123456789012345678901\n" * 3


async def test_logs_are_truncated_and_the_run_goes_on(
    wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(guests.wasm(guests.log_lines(100)), max_log_bytes=100)
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"done"
    assert outcome.logs.startswith(b"log line")
    assert b"logs truncated: 3100 more bytes" in outcome.logs


async def test_endless_logs_still_time_out(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.spew(2)), max_log_bytes=100, timeout_s=0.2)
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert b"logs truncated" in outcome.logs


async def test_cancel_stops_the_guest_thread(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(guests.wasm(guests.LOOP), timeout_s=60.0)
    await wasm.prepare(spec)
    outcomes = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                outcomes.append(await wasm.run(spec, b"", deadline=FOREVER))

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert wasm.statistics()["running"] == 1
            started = time.monotonic()
            scope.cancel()
    assert scope.cancelled_caught
    assert outcomes == []
    # run() raised Cancelled only after the thread ended: its limiter token is back
    assert wasm.statistics()["running"] == 0
    assert time.monotonic() - started < 5  # one epoch tick, in fact


async def test_runs_beyond_the_thread_limit_queue(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(upper_wasm())
    results: list[bytes] = []

    async def call(i: int) -> None:
        outcome = await wasm.run(spec, b"call %d" % i, deadline=FOREVER)
        results.append(outcome.output)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(call, i)
    assert sorted(results) == sorted(b"CALL %d" % i for i in range(10))
    assert wasm.statistics()["compiles"] == 1


async def test_no_free_thread_before_the_deadline(tmp_path: Path, wasm_spec: WasmSpec) -> None:
    runtime = WasmRuntime(
        WasmConfig(max_threads=1, inline_budget_ms=0), cache_dir=tmp_path / "one-thread"
    )
    busy = wasm_spec(guests.wasm(guests.LOOP), timeout_s=60.0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(runtime.run, busy, b"", deadline=FOREVER))
            await trio.testing.wait_all_tasks_blocked()
            spec = wasm_spec(upper_wasm(), timeout_s=0.1)
            outcome = await runtime.run(spec, b"x", deadline=FOREVER)
            nursery.cancel_scope.cancel()
    finally:
        await runtime.aclose()
    assert outcome.status is ExecStatus.TIMEOUT
    assert b"no guest thread was free" in outcome.logs


async def test_runs_in_real_time_under_a_mock_clock(
    autojump_clock: trio.testing.MockClock, wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    # The guest's deadline is kept in real time: virtual time racing ahead while the trio
    # task waits for the thread must not time it out.
    spec = wasm_spec(guests.wasm(guests.sleep(50 * 10**6)), timeout_s=5.0)
    outcome = await wasm.run(spec, b"", deadline=trio.current_time() + 5.0)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"ok"


async def test_bad_artifacts_are_refused(wasm: WasmRuntime) -> None:
    with pytest.raises(ArtifactError, match="not a WASM module"):
        wasm.validate_artifact(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ArtifactError, match="not a WASM module"):
        wasm.validate_artifact(guests.TRAP.encode())
    with pytest.raises(ArtifactError, match="fails to compile"):
        wasm.validate_artifact(b"\0asm\x01\x00\x00\x00garbage")
    with pytest.raises(ArtifactError, match="no `_start` export"):
        wasm.validate_artifact(guests.wasm(guests.NO_START))
    with pytest.raises(ArtifactError, match="env::host_log"):
        wasm.validate_artifact(guests.wasm(guests.UNKNOWN_IMPORT))
    wasm.validate_artifact(upper_wasm())


async def test_broken_artifact_fails_the_run_not_the_caller(
    wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    outcome = await wasm.run(wasm_spec(b"not wasm"), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.START_FAILED


async def test_task_validation(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    with pytest.raises(ValidationError, match="mode 'bogus' is not supported") as info:
        wasm.validate_task(wasm_spec(upper_wasm(), mode="bogus"))
    assert info.value.field == "mode"
    with pytest.raises(ValidationError, match="needs an artifact") as info:
        wasm.validate_task(wasm_spec(upper_wasm(), artifact_path=None, artifact_sha256=None))
    assert info.value.field == "artifact"


async def test_compile_cache_is_reused_by_a_new_runtime(
    tmp_path: Path, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(upper_wasm())
    first = WasmRuntime(WasmConfig(), cache_dir=tmp_path / "shared-cache")
    try:
        await first.prepare(spec)
        assert first.statistics()["compiles"] == 1
    finally:
        await first.aclose()
    second = WasmRuntime(WasmConfig(), cache_dir=tmp_path / "shared-cache")
    try:
        await second.prepare(spec)
        outcome = await second.run(spec, b"warm", deadline=FOREVER)
        stats = second.statistics()
    finally:
        await second.aclose()
    assert outcome.output == b"WARM"
    assert stats["compiles"] == 0
    assert stats["disk_hits"] == 1


async def test_cache_of_another_engine_setting_is_not_read(
    tmp_path: Path, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(upper_wasm())
    for fuel, expected_compiles in ((0, 1), (1_000_000, 1), (0, 0)):
        runtime = WasmRuntime(WasmConfig(fuel=fuel), cache_dir=tmp_path / "cache")
        try:
            await runtime.prepare(spec)
            assert runtime.statistics()["compiles"] == expected_compiles
        finally:
            await runtime.aclose()


async def test_corrupt_cache_file_is_recompiled(tmp_path: Path, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(upper_wasm())
    cache = tmp_path / "cache"
    first = WasmRuntime(WasmConfig(), cache_dir=cache)
    await first.prepare(spec)
    await first.aclose()
    for cached in cache.glob("*.cwasm"):
        cached.write_bytes(b"corrupt")
    second = WasmRuntime(WasmConfig(), cache_dir=cache)
    try:
        outcome = await second.run(spec, b"ok", deadline=FOREVER)
        stats = second.statistics()
    finally:
        await second.aclose()
    assert outcome.output == b"OK"
    assert stats["disk_errors"] == 1
    assert stats["compiles"] == 1


async def test_describe(wasm: WasmRuntime) -> None:
    described = wasm.describe()
    assert described["available"] is True
    assert described["modes"] == ["per-call", "worker"]
    assert described["worker_max_concurrency"] == 1
    assert described["version"].startswith("wasmtime ")
