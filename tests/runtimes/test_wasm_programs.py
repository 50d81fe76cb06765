"""Real C programs (tests/programs/*.c) compiled to wasm32-wasi and run by the WASM runtime."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes import WasmRuntime
from tests.runtimes.conftest import MiB

pytestmark = pytest.mark.compiler

WasmSpec = Callable[..., FunctionSpec]
FOREVER = math.inf


async def test_upper(
    wasm: WasmRuntime, wasm_spec: WasmSpec, compiled_wasm: dict[str, Path]
) -> None:
    module = compiled_wasm["upper"].read_bytes()
    wasm.validate_artifact(module)
    spec = wasm_spec(module)
    await wasm.prepare(spec)
    outcome = await wasm.run(spec, b"hello from c\n", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"HELLO FROM C\n"
    assert outcome.logs == b""


async def test_wordcount_with_logs(
    wasm: WasmRuntime, wasm_spec: WasmSpec, compiled_wasm: dict[str, Path]
) -> None:
    spec = wasm_spec(compiled_wasm["wordcount"].read_bytes())
    outcome = await wasm.run(spec, b"one two  three\nfour\n", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"4\n"
    assert outcome.logs == b"wordcount: 20 bytes read\n"


async def test_c_output_limit(
    wasm: WasmRuntime, wasm_spec: WasmSpec, compiled_wasm: dict[str, Path]
) -> None:
    spec = wasm_spec(compiled_wasm["upper"].read_bytes(), max_output_bytes=1000)
    outcome = await wasm.run(spec, b"x" * MiB, deadline=FOREVER)
    assert outcome.error_code is ErrorCode.OUTPUT_LIMIT
    assert len(outcome.output) <= 1000


async def test_c_malloc_failure_is_a_memory_limit(
    wasm: WasmRuntime, wasm_spec: WasmSpec, compiled_wasm: dict[str, Path]
) -> None:
    spec = wasm_spec(compiled_wasm["alloc"].read_bytes(), memory_limit_bytes=64 * MiB)
    outcome = await wasm.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT
    assert outcome.exit_code == 1
    assert outcome.logs.startswith(b"alloc: malloc failed after ")


async def test_c_memory_limit_too_small_to_start(
    wasm: WasmRuntime, wasm_spec: WasmSpec, compiled_wasm: dict[str, Path]
) -> None:
    # zig links wasm32-wasi programs with a 16 MiB initial memory (stack and data).
    spec = wasm_spec(compiled_wasm["upper"].read_bytes(), memory_limit_bytes=8 * MiB)
    outcome = await wasm.run(spec, b"x", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT
