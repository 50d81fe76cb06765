"""WASM worker mode: warm reactor instances under real wasmtime (spear/runtimes/wasm_reactor.py).

The guests are tests/programs/reactor_upper.wat and reactor_misbehave.wat (one failure mode
per first input byte; see its header).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from spear.config import WasmConfig
from spear.demo import upper_wasm
from spear.errors import ArtifactError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec, RunOutcome
from spear.runtimes import WasmRuntime, wat_to_wasm
from spear.runtimes.base import Instance
from tests.conftest import require_real_part
from tests.runtimes.conftest import MiB
from tests.wasm_programs import ZIG_CACHE_DIR, compiler_available

WasmSpec = Callable[..., FunctionSpec]
FOREVER = math.inf
PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


def reactor(name: str) -> bytes:
    return wat_to_wasm((PROGRAMS / f"{name}.wat").read_text())


@pytest.fixture
def worker_spec(wasm_spec: WasmSpec) -> WasmSpec:
    """`worker_spec(module=misbehave, **fields)`: a mode-worker spec with small limits."""

    def make(module: bytes | None = None, **fields: object) -> FunctionSpec:
        module = reactor("reactor_misbehave") if module is None else module
        defaults: dict[str, object] = {
            "mode": "worker",
            "timeout_s": 5.0,
            "memory_limit_bytes": MiB,
        }
        return wasm_spec(module, **{**defaults, **fields})

    return make


@pytest.fixture
async def instance(wasm: WasmRuntime, worker_spec: WasmSpec) -> AsyncIterator[Instance]:
    started = await wasm.start_instance(worker_spec(max_output_bytes=1000))
    try:
        yield started
    finally:
        await started.aclose()


async def call(instance: Instance, data: bytes, deadline: float = FOREVER) -> RunOutcome:
    return await instance.invoke(data, deadline=deadline, execution_id="ex-test")


async def test_upper_in_wat(wasm: WasmRuntime, worker_spec: WasmSpec) -> None:
    assert "worker" in wasm.describe()["modes"]
    upper = await wasm.start_instance(worker_spec(reactor("reactor_upper")))
    try:
        for text in (b"hello, worker", b"", b"x" * 200_000, b"again"):
            outcome = await call(upper, text)
            assert outcome.status is ExecStatus.SUCCEEDED, outcome.error_message
            assert outcome.output == text.upper()
            assert outcome.cold is False
            assert set(outcome.timings_ms) == {"acquire", "run"}
        assert upper.healthy
    finally:
        await upper.aclose()


async def test_state_survives_many_calls(instance: Instance) -> None:
    # _initialize set the counter to 100; every call adds one
    for expected in range(101, 401):
        outcome = await call(instance, b"c")
        assert int.from_bytes(outcome.output, "little") == expected
    assert instance.healthy


async def test_instances_do_not_share_state(wasm: WasmRuntime, worker_spec: WasmSpec) -> None:
    first = await wasm.start_instance(worker_spec())
    second = await wasm.start_instance(worker_spec())
    try:
        await call(first, b"c")
        assert (await call(first, b"c")).output == (102).to_bytes(4, "little")
        assert (await call(second, b"c")).output == (101).to_bytes(4, "little")
    finally:
        await first.aclose()
        await second.aclose()


async def test_logs_go_to_the_call(instance: Instance) -> None:
    outcome = await call(instance, b"w-echo")
    assert (outcome.output, outcome.logs) == (b"w-echo", b"log line\n")
    assert (await call(instance, b"e")).logs == b""


async def test_handler_reported_failure_keeps_the_instance(instance: Instance) -> None:
    outcome = await call(instance, b"f")
    assert (outcome.status, outcome.error_code, outcome.exit_code) == (
        ExecStatus.FAILED,
        ErrorCode.EXIT_NONZERO,
        7,
    )
    assert instance.healthy
    assert (await call(instance, b"e-ok")).output == b"e-ok"


async def test_trap_fails_and_makes_the_instance_unhealthy(instance: Instance) -> None:
    outcome = await call(instance, b"t")
    assert (outcome.status, outcome.error_code) == (ExecStatus.FAILED, ErrorCode.TRAP)
    assert "unreachable" in (outcome.error_message or "")
    assert b"backtrace" in outcome.logs
    assert not instance.healthy
    refused = await call(instance, b"e")
    assert (refused.status, refused.error_code) == (ExecStatus.FAILED, ErrorCode.START_FAILED)


async def test_timeout_stops_an_endless_loop(wasm: WasmRuntime, worker_spec: WasmSpec) -> None:
    looping = await wasm.start_instance(worker_spec(timeout_s=0.2))
    try:
        before = trio.current_time()
        outcome = await call(looping, b"l")
        assert (outcome.status, outcome.error_code) == (ExecStatus.TIMEOUT, ErrorCode.TIMEOUT)
        assert trio.current_time() - before < 2.0
        assert not looping.healthy
        assert wasm.statistics()["running"] == 0
    finally:
        await looping.aclose()


async def test_a_sleeping_call_leaves_the_loop_and_stops_at_its_deadline(
    wasm: WasmRuntime, worker_spec: WasmSpec
) -> None:
    sleeper = await wasm.start_instance(worker_spec(timeout_s=0.2))
    try:
        before = trio.current_time()
        outcome = await call(sleeper, b"s")
        assert outcome.status is ExecStatus.TIMEOUT
        assert trio.current_time() - before < 2.0
        assert wasm.statistics()["inline_fallbacks"] == 1  # not slept on the loop's thread
    finally:
        await sleeper.aclose()


async def test_the_callers_deadline_shortens_the_timeout(instance: Instance) -> None:
    expired = await call(instance, b"e", deadline=trio.current_time() - 1)
    assert expired.status is ExecStatus.TIMEOUT
    assert instance.healthy  # it never reached the guest
    outcome = await call(instance, b"l", deadline=trio.current_time() + 0.1)
    assert outcome.status is ExecStatus.TIMEOUT


async def test_memory_limit(instance: Instance) -> None:
    outcome = await call(instance, b"g")
    assert (outcome.status, outcome.error_code) == (ExecStatus.FAILED, ErrorCode.MEMORY_LIMIT)
    assert f"memory_limit_bytes ({MiB})" in (outcome.error_message or "")
    assert not instance.healthy


async def test_output_limit_keeps_the_first_bytes(instance: Instance) -> None:
    outcome = await call(instance, b"o")
    assert (outcome.status, outcome.error_code) == (ExecStatus.FAILED, ErrorCode.OUTPUT_LIMIT)
    assert "runtimes.max_output_bytes (1000)" in (outcome.error_message or "")
    assert len(outcome.output) == 1000
    # the guest returned normally: its state is intact
    assert instance.healthy
    assert (await call(instance, b"c")).output == (101).to_bytes(4, "little")


async def test_output_outside_memory_is_a_trap(instance: Instance) -> None:
    outcome = await call(instance, b"x")
    assert (outcome.status, outcome.error_code) == (ExecStatus.FAILED, ErrorCode.TRAP)
    assert "past the end of its memory" in (outcome.error_message or "")
    assert not instance.healthy


async def test_cancel_stops_a_long_call_promptly(wasm: WasmRuntime, instance: Instance) -> None:
    before = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await call(instance, b"l")
    assert scope.cancelled_caught
    assert trio.current_time() - before < 1.0
    assert wasm.statistics()["running"] == 0  # the guest thread has ended
    assert not instance.healthy


async def test_aclose_stops_a_running_call(wasm: WasmRuntime, instance: Instance) -> None:
    outcomes: list[RunOutcome] = []

    async def long_call() -> None:
        outcomes.append(await call(instance, b"l"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_call)
        await trio.testing.wait_all_tasks_blocked()  # the call waits for its guest thread
        await instance.aclose()
        await instance.aclose()  # idempotent
    assert outcomes[0].status is ExecStatus.CANCELLED
    assert not instance.healthy


async def test_one_call_at_a_time(instance: Instance) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, instance, b"l", trio.current_time() + 0.3)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await call(instance, b"e")


async def test_a_long_call_falls_back_to_a_thread_on_a_fresh_instance(
    wasm: WasmRuntime, instance: Instance
) -> None:
    assert (await call(instance, b"c")).output == (101).to_bytes(4, "little")
    busy = await call(instance, b"b-busy")
    assert (busy.status, busy.output) == (ExecStatus.SUCCEEDED, b"b-busy")
    assert wasm.statistics()["inline_fallbacks"] == 1
    # the stopped inline attempt lost the instance's state, as a replacement would
    assert (await call(instance, b"c")).output == (101).to_bytes(4, "little")
    assert instance.healthy


async def test_fuel_is_refilled_per_call(tmp_path: Path, worker_spec: WasmSpec) -> None:
    runtime = WasmRuntime(WasmConfig(fuel=100_000), cache_dir=tmp_path / "fuel-cache")
    try:
        fueled = await runtime.start_instance(worker_spec())
        for _ in range(50):  # each call burns some fuel; a refill keeps them going
            assert (await call(fueled, b"c")).status is ExecStatus.SUCCEEDED
        outcome = await call(fueled, b"l")
        assert outcome.error_code is ErrorCode.FUEL_EXHAUSTED
        assert not fueled.healthy
        await fueled.aclose()
    finally:
        await runtime.aclose()


async def test_modules_must_match_the_mode(
    wasm: WasmRuntime, wasm_spec: WasmSpec, worker_spec: WasmSpec
) -> None:
    wasm.validate_artifact(reactor("reactor_upper"))  # an upload accepts both kinds
    with pytest.raises(ArtifactError, match="needs a reactor module"):
        await wasm.start_instance(worker_spec(upper_wasm()))
    per_call = wasm_spec(reactor("reactor_upper"))
    with pytest.raises(ArtifactError, match="is a reactor"):
        await wasm.prepare(per_call)
    outcome = await wasm.run(per_call, b"x", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.START_FAILED
    with pytest.raises(ValidationError, match="mode 'elastic' is not supported") as info:
        wasm.validate_task(wasm_spec(upper_wasm(), mode="elastic"))
    assert info.value.field == "mode"


async def test_one_call_per_instance_is_the_rule(wasm: WasmRuntime) -> None:
    assert wasm.describe()["worker_max_concurrency"] == 1
    wasm.validate_concurrency(1)
    with pytest.raises(ValidationError, match=r"pool\.max_concurrency must be 1") as info:
        wasm.validate_concurrency(4)
    assert info.value.field == "pool.max_concurrency"


@pytest.mark.parametrize(
    ("wat", "message"),
    [
        (
            '(module (memory (export "memory") 1)'
            ' (func (export "spear_alloc") (param i32) (result i32) i32.const 0)'
            ' (func (export "spear_handle") (param i32 i32) (result i32) i32.const 0))',
            r"`spear_handle` export must be a function \(i32, i32\) -> i64",
        ),
        (
            '(module (memory 1) (func (export "spear_alloc") (param i32) (result i32) i32.const 0)'
            ' (func (export "spear_handle") (param i32 i32) (result i64) i64.const 0))',
            "must export its linear memory",
        ),
    ],
)
async def test_bad_reactor_exports(wasm: WasmRuntime, wat: str, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        wasm.validate_artifact(wat_to_wasm(wat))


async def test_a_failing_initialize_fails_the_start(
    wasm: WasmRuntime, worker_spec: WasmSpec
) -> None:
    trapping = wat_to_wasm(
        '(module (memory (export "memory") 1) (func (export "_initialize") unreachable)'
        ' (func (export "spear_alloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "spear_handle") (param i32 i32) (result i64) i64.const 0))'
    )
    with pytest.raises(RuntimeFailure, match="did not start: the function trapped"):
        await wasm.start_instance(worker_spec(trapping))
    endless = wat_to_wasm(
        '(module (memory (export "memory") 1) (func (export "_initialize") (loop $l (br $l)))'
        ' (func (export "spear_alloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "spear_handle") (param i32 i32) (result i64) i64.const 0))'
    )
    with pytest.raises(RuntimeFailure, match="did not finish within its timeout"):
        await wasm.start_instance(worker_spec(endless, timeout_s=0.2))
    assert wasm.statistics()["running"] == 0
    four_pages = wat_to_wasm(
        '(module (memory (export "memory") 4)'
        ' (func (export "spear_alloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "spear_handle") (param i32 i32) (result i64) i64.const 0))'
    )
    with pytest.raises(RuntimeFailure, match="needs more memory than its memory_limit_bytes"):
        await wasm.start_instance(worker_spec(four_pages, memory_limit_bytes=2 * 65536))


@pytest.fixture(scope="session")
def c_reactor(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """tests/programs/reactor_upper.c built as a wasm32-wasi reactor with zig."""
    ok, reason = compiler_available()
    require_real_part("the zig C compiler", ok, reason)
    out = tmp_path_factory.mktemp("reactors") / "reactor_upper.wasm"
    cache = {"ZIG_GLOBAL_CACHE_DIR": str(ZIG_CACHE_DIR), "ZIG_LOCAL_CACHE_DIR": str(ZIG_CACHE_DIR)}
    argv = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-wasi"]
    argv += ["-mexec-model=reactor", "-O2", "-s", str(PROGRAMS / "reactor_upper.c"), "-o", str(out)]
    subprocess.run(argv, env={**os.environ, **cache}, check=True, capture_output=True, timeout=600)
    return out.read_bytes()


@pytest.mark.compiler
async def test_upper_in_c(wasm: WasmRuntime, worker_spec: WasmSpec, c_reactor: bytes) -> None:
    # wasi-libc's reactor starts with 16 MiB of stack and data
    spec = worker_spec(c_reactor, memory_limit_bytes=64 * MiB, max_output_bytes=4 * MiB)
    upper = await wasm.start_instance(spec)
    try:
        # growing inputs make malloc grow memory and the output buffer; shrinking ones reuse it
        for size in (0, 1, 100, 70_000, 3 * MiB, 10, 500):
            text = (b"abcxyz" * (size // 6 + 1))[:size]
            outcome = await call(upper, text)
            assert outcome.status is ExecStatus.SUCCEEDED, outcome.error_message
            assert outcome.output == text.upper()
        assert upper.healthy
    finally:
        await upper.aclose()


async def test_closing_the_runtime_closes_its_instances(
    tmp_path: Path, worker_spec: WasmSpec
) -> None:
    runtime = WasmRuntime(WasmConfig(), cache_dir=tmp_path / "own-cache")
    left_open = await runtime.start_instance(worker_spec())
    await runtime.aclose()
    assert not left_open.healthy
    with pytest.raises(RuntimeFailure, match="closed"):
        await runtime.start_instance(worker_spec())
