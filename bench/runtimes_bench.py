"""Per-call cost of the function runtimes against their floors, measured in the same run.

    python bench/runtimes_bench.py [--calls N] [--wasm FILE]

WASM floor: a bare wasmtime per-call run of the same module (new Store + WasiConfig with a
stdin temp file and stdout_custom, InstancePre.instantiate, `_start`), on the calling thread.
spear is measured twice: the worker-thread part of a run (what the floor does, plus limits,
epoch watch and captures), and the whole `await WasmRuntime.run()` (plus the trio thread hop).
Process floor: `trio.run_process(["cat"])` with the same input; spear: `ProcessRuntime.run`.
Medians and 99th percentiles in ms; ratios against the floor's median.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import trio

from spear.config import ProcessConfig, WasmConfig
from spear.demo import upper_wasm
from spear.runtimes import ProcessRuntime, WasmRuntime
from spear.runtimes.guest import GuestRun

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.floors import BareWasm  # noqa: E402
from bench.timing import bench_spec, measure, measure_async, report  # noqa: E402

INPUT = b"hello, spear! " * 8
WARMUP = 50


async def bench_wasm(name: str, module: bytes, calls: int, work: Path) -> None:
    path = work / f"{name}.wasm"
    path.write_bytes(module)
    fn = bench_spec("wasm", artifact_path=path, artifact_sha256=hashlib.sha256(module).hexdigest())
    runtime = WasmRuntime(WasmConfig(), cache_dir=work / "wasm-cache")
    try:
        await runtime.prepare(fn)
        bare = BareWasm(module)
        assert bare.run(INPUT) == (await runtime.run(fn, INPUT, deadline=math.inf)).output
        ids = iter(range(1, 1 << 62))

        def core() -> object:
            run = GuestRun(fn, next(ids), fn.timeout_s, time.perf_counter())
            return runtime._execute(run, INPUT)

        async def whole() -> object:
            return await runtime.run(fn, INPUT, deadline=math.inf)

        floor = measure(lambda: bare.run(INPUT), calls, warmup=WARMUP)
        print(f"wasm per-call, {name} ({len(module)} bytes):")
        report("floor: bare wasmtime instantiate + _start", floor, None)
        report("spear worker-thread part of run()", measure(core, calls, warmup=WARMUP), floor)
        report(
            "spear await WasmRuntime.run()", await measure_async(whole, calls, warmup=WARMUP), floor
        )
    finally:
        await runtime.aclose()


async def bench_process(calls: int, work: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=work / "work")
    fn = bench_spec("process", command=("cat",))

    async def bare() -> object:
        return await trio.run_process(["cat"], stdin=INPUT, capture_stdout=True)

    async def whole() -> object:
        return await runtime.run(fn, INPUT, deadline=math.inf)

    floor = await measure_async(bare, calls, warmup=WARMUP)
    print("process per-call, cat:")
    report("floor: trio.run_process(['cat'])", floor, None)
    report(
        "spear await ProcessRuntime.run()", await measure_async(whole, calls, warmup=WARMUP), floor
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--wasm", type=Path, action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        await bench_wasm("demo upper.wat", upper_wasm(), args.calls, work)
        for extra in args.wasm:
            await bench_wasm(extra.name, extra.read_bytes(), args.calls, work)
        await bench_process(max(args.calls // 10, 100), work)


if __name__ == "__main__":
    sys.exit(trio.run(main))
