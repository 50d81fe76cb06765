"""WASM worker mode against its floors, and the two worker variants side by side.

    python bench/wasm_worker_bench.py [--calls N] [--reactor FILE]

1. Warm reactor: `await Instance.invoke()` of tests/programs/reactor_upper.wat (and FILE, a
   reactor such as reactor_upper.c built with `zig cc -target wasm32-wasi
   -mexec-model=reactor`) against a bare wasmtime embedder calling the same exports on a warm
   instance: spear_alloc, Memory.write, spear_handle, Memory.read (issue target: <= 2x). The
   bare spear_handle call alone is printed too, and a lower floor: the same four steps
   through `wasmtime_func_call_unchecked` and ctypes (the C API path spear itself uses).
2. Cold starts. Worker: `start_instance` + the first `invoke` + `aclose` against a bare
   new Store + instantiate + `_initialize` + one call of the exports. Per-call:
   `await WasmRuntime.run()` of the demo WASI command against a bare new
   Store + WasiConfig (stdin file, stdout_custom) + InstancePre.instantiate + `_start`
   (issue target: p50 <= 1.5 ms).
3. The variants: the reactor instance against a WASI command held warm, reading
   length-prefixed frames (4-byte big-endian length, then the payload) from its stdin and
   writing answers the same way. wasmtime-py feeds stdin only from a file, so the command
   reads a FIFO and runs `_start` forever on a thread of its own; each answer arrives through
   stdout_custom on a wasmtime thread and is handed to trio with `run_sync_soon`. Payloads are
   raw bytes, not CBOR maps: the framed variant's figure is a lower bound.

Medians and 99th percentiles in ms; ratios against the floor's median, measured in this run.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

import trio
import wasmtime

from spear.config import WasmConfig
from spear.demo import upper_wasm
from spear.model import FunctionSpec
from spear.runtimes import WasmRuntime, wat_to_wasm
from spear.runtimes.wasm_engine import RawFunc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.floors import BareWasm  # noqa: E402
from bench.timing import bench_spec, measure, measure_async, report  # noqa: E402

INPUT = b"hello, spear! " * 8
WARMUP = 200

#: a WASI command serving length-prefixed frames on stdin/stdout until stdin ends
FRAMED_UPPER = """
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; 0..4 length in, 32..40 iovec, 48 nread/nwritten, 1020..1024 length out, 1024.. payload
  (func $read_exact (param $ptr i32) (param $len i32) (result i32)
    (local $got i32)
    (block $full
      (loop $more
        (br_if $full (i32.ge_u (local.get $got) (local.get $len)))
        (i32.store (i32.const 32) (i32.add (local.get $ptr) (local.get $got)))
        (i32.store (i32.const 36) (i32.sub (local.get $len) (local.get $got)))
        (if (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 48))
          (then (return (i32.const 0))))
        (if (i32.eqz (i32.load (i32.const 48))) (then (return (i32.const 0))))
        (local.set $got (i32.add (local.get $got) (i32.load (i32.const 48))))
        (br $more)))
    (i32.const 1))
  (func $be (param $at i32) (result i32)
    (i32.or (i32.or (i32.shl (i32.load8_u (local.get $at)) (i32.const 24))
                    (i32.shl (i32.load8_u offset=1 (local.get $at)) (i32.const 16)))
            (i32.or (i32.shl (i32.load8_u offset=2 (local.get $at)) (i32.const 8))
                    (i32.load8_u offset=3 (local.get $at)))))
  (func (export "_start")
    (local $len i32) (local $i i32) (local $c i32)
    (loop $frame
      (if (i32.eqz (call $read_exact (i32.const 0) (i32.const 4))) (then (return)))
      (local.set $len (call $be (i32.const 0)))
      (if (i32.eqz (call $read_exact (i32.const 1024) (local.get $len))) (then (return)))
      (local.set $i (i32.const 0))
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
          (local.set $c (i32.load8_u offset=1024 (local.get $i)))
          (if (i32.and (i32.ge_u (local.get $c) (i32.const 97))
                       (i32.le_u (local.get $c) (i32.const 122)))
            (then (i32.store8 offset=1024 (local.get $i) (i32.sub (local.get $c) (i32.const 32)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      ;; the length right before the payload, so that one iovec (one write) holds the frame
      (i32.store8 (i32.const 1020) (i32.shr_u (local.get $len) (i32.const 24)))
      (i32.store8 (i32.const 1021) (i32.shr_u (local.get $len) (i32.const 16)))
      (i32.store8 (i32.const 1022) (i32.shr_u (local.get $len) (i32.const 8)))
      (i32.store8 (i32.const 1023) (local.get $len))
      (i32.store (i32.const 32) (i32.const 1020))
      (i32.store (i32.const 36) (i32.add (local.get $len) (i32.const 4)))
      (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))
      (br $frame))))
"""


def spec(module_path: Path, module: bytes, mode: str) -> FunctionSpec:
    return bench_spec(
        "wasm",
        mode=mode,
        artifact_path=module_path,
        artifact_sha256=hashlib.sha256(module).hexdigest(),
        memory_limit_bytes=64 << 20,
    )


def report52(label: str, times: list[float], floor: list[float] | None) -> None:
    report(label, times, floor, width=52, digits=4)


def _linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    return linker


class BareReactor:
    """The warm floor: what any wasmtime embedder does to call a reactor's exports."""

    def __init__(
        self,
        module: bytes,
        engine: wasmtime.Engine | None = None,
        pre: wasmtime.InstancePre | None = None,
    ) -> None:
        engine = engine or wasmtime.Engine()
        pre = pre or _linker(engine).instantiate_pre(wasmtime.Module(engine, module))
        self.store = wasmtime.Store(engine)
        self.store.set_wasi(wasmtime.WasiConfig())
        exports = pre.instantiate(self.store).exports(self.store)
        init = exports.get("_initialize")
        if isinstance(init, wasmtime.Func):
            init(self.store)
        memory, alloc, handle = exports["memory"], exports["spear_alloc"], exports["spear_handle"]
        assert isinstance(memory, wasmtime.Memory)
        assert isinstance(alloc, wasmtime.Func) and isinstance(handle, wasmtime.Func)
        self.memory, self.alloc, self.handle = memory, alloc, handle
        self.raw_alloc = RawFunc(self.store, alloc)
        self.raw_handle = RawFunc(self.store, handle)

    def call_unchecked(self, data: bytes) -> bytes:
        """The same steps through the C API's unchecked call and ctypes copies."""
        ptr = self.raw_alloc.i32(len(data))
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        ctypes.memmove(base + ptr, data, len(data))
        packed = self.raw_handle.i64(ptr, len(data))
        return ctypes.string_at(base + (packed & 0xFFFFFFFF), packed >> 32)

    def call(self, data: bytes) -> bytes:
        ptr = self.alloc(self.store, len(data))
        assert isinstance(ptr, int)
        self.memory.write(self.store, data, ptr)
        packed = self.handle(self.store, ptr, len(data))
        assert isinstance(packed, int)
        out = packed & 0xFFFFFFFF
        return bytes(self.memory.read(self.store, out, out + (packed >> 32)))


class FramedCommand:
    """Variant 2: a WASI command held warm on a thread of its own, fed through a FIFO."""

    def __init__(self, module: bytes, work: Path) -> None:
        fifo = work / "stdin.fifo"
        os.mkfifo(fifo)
        # O_RDWR never blocks on a FIFO and keeps a writer, so the guest's open does not block
        self.fd = os.open(fifo, os.O_RDWR)
        self.token = trio.lowlevel.current_trio_token()
        self.pending = bytearray()
        self.answer: bytes | None = None
        self.ready = trio.Event()
        engine = wasmtime.Engine()
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        wasi = wasmtime.WasiConfig()
        wasi.stdin_file = str(fifo)
        wasi.stdout_custom = self._on_stdout
        self.store = wasmtime.Store(engine)
        self.store.set_wasi(wasi)
        start = linker.instantiate(self.store, wasmtime.Module(engine, module)).exports(self.store)[
            "_start"
        ]
        assert isinstance(start, wasmtime.Func)
        self.thread = threading.Thread(target=start, args=(self.store,), daemon=True)
        self.thread.start()

    def _on_stdout(self, data: bytes) -> None:  # a wasmtime thread
        self.pending += data
        if len(self.pending) >= 4:
            size = int.from_bytes(self.pending[:4], "big")
            if len(self.pending) >= 4 + size:
                self.answer = bytes(self.pending[4 : 4 + size])
                del self.pending[: 4 + size]
                self.token.run_sync_soon(self.ready.set)

    async def invoke(self, data: bytes) -> bytes:
        self.ready = trio.Event()
        os.write(self.fd, len(data).to_bytes(4, "big") + data)
        await self.ready.wait()
        assert self.answer is not None
        return self.answer

    def close(self) -> None:
        os.close(self.fd)  # the last writer: the guest reads EOF and returns
        self.thread.join(timeout=5)
        self.store.close()


async def bench_warm(
    runtime: WasmRuntime, name: str, module: bytes, calls: int, work: Path
) -> None:
    path = work / f"{hashlib.sha256(module).hexdigest()}.wasm"
    path.write_bytes(module)
    instance = await runtime.start_instance(spec(path, module, "worker"))
    bare = BareReactor(module)
    try:
        got = await instance.invoke(INPUT, deadline=math.inf, execution_id="ex")
        assert got.output == bare.call(INPUT) == bare.call_unchecked(INPUT) == INPUT.upper()

        async def invoke() -> object:
            return await instance.invoke(INPUT, deadline=math.inf, execution_id="ex")

        ptr = bare.alloc(bare.store, len(INPUT))
        bare.memory.write(bare.store, INPUT, ptr)
        floor = measure(lambda: bare.call(INPUT), calls, warmup=WARMUP)
        print(f"warm reactor, {name} ({len(module)} bytes), {len(INPUT)}-byte input:")
        report52("floor: bare alloc + write + spear_handle + read", floor, None)
        report52(
            "bare spear_handle call alone",
            measure(lambda: bare.handle(bare.store, ptr, len(INPUT)), calls, warmup=WARMUP),
            floor,
        )
        spear = await measure_async(invoke, calls, warmup=WARMUP)
        report52("spear await Instance.invoke()", spear, floor)
        unchecked = measure(lambda: bare.call_unchecked(INPUT), calls, warmup=WARMUP)
        report52("lower floor: the same, unchecked call + ctypes", unchecked, floor)
        report52("spear await Instance.invoke(), vs the lower floor", spear, unchecked)
    finally:
        await instance.aclose()


async def bench_worker_start(runtime: WasmRuntime, calls: int, work: Path) -> None:
    module = wat_to_wasm((REPO / "tests/programs/reactor_upper.wat").read_text())
    path = work / "start-reactor.wasm"
    path.write_bytes(module)
    fn = spec(path, module, "worker")
    await runtime.prepare(fn)

    async def start_call_close() -> object:
        instance = await runtime.start_instance(fn)
        outcome = await instance.invoke(INPUT, deadline=math.inf, execution_id="ex")
        await instance.aclose()
        return outcome

    def bare() -> object:
        return BareReactor(module, engine, pre).call(INPUT)

    engine = wasmtime.Engine()
    pre = _linker(engine).instantiate_pre(wasmtime.Module(engine, module))
    floor = measure(bare, calls, warmup=WARMUP)
    print("worker cold start, reactor_upper.wat, first call included:")
    report52("floor: bare Store + instantiate + _initialize + call", floor, None)
    report52(
        "spear start_instance + invoke + aclose",
        await measure_async(start_call_close, calls, warmup=WARMUP),
        floor,
    )


async def bench_cold(runtime: WasmRuntime, calls: int, work: Path) -> None:
    module = upper_wasm()
    path = work / "upper.wasm"
    path.write_bytes(module)
    fn = spec(path, module, "per-call")
    await runtime.prepare(fn)
    bare = BareWasm(module)
    assert bare.run(INPUT) == (await runtime.run(fn, INPUT, deadline=math.inf)).output

    async def run() -> object:
        return await runtime.run(fn, INPUT, deadline=math.inf)

    floor = measure(lambda: bare.run(INPUT), calls, warmup=WARMUP)
    print("per-call cold start, demo upper.wat:")
    report52("floor: bare instantiate + _start", floor, None)
    report52("spear await WasmRuntime.run()", await measure_async(run, calls, warmup=WARMUP), floor)
    stats = runtime.statistics()
    print(f"  (inline runs {stats['inline_runs']}, fallbacks {stats['inline_fallbacks']})")


async def bench_variants(runtime: WasmRuntime, calls: int, work: Path) -> None:
    module = wat_to_wasm((REPO / "tests/programs/reactor_upper.wat").read_text())
    path = work / "variant-reactor.wasm"
    path.write_bytes(module)
    reactor = await runtime.start_instance(spec(path, module, "worker"))
    framed = FramedCommand(wat_to_wasm(FRAMED_UPPER), work)
    try:
        assert await framed.invoke(INPUT) == INPUT.upper()

        async def via_reactor() -> object:
            return await reactor.invoke(INPUT, deadline=math.inf, execution_id="ex")

        reactor_times = await measure_async(via_reactor, calls, warmup=WARMUP)
        print("worker variants, upper-casing, one warm instance each:")
        report52("1. reactor: await Instance.invoke()", reactor_times, None)
        framed_times = await measure_async(lambda: framed.invoke(INPUT), calls, warmup=WARMUP)
        report52("2. WASI command, frames over FIFO stdin / stdout", framed_times, reactor_times)
    finally:
        framed.close()
        await reactor.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--reactor", type=Path, action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runtime = WasmRuntime(WasmConfig(), cache_dir=work / "wasm-cache")
        try:
            wat = wat_to_wasm((REPO / "tests/programs/reactor_upper.wat").read_text())
            await bench_warm(runtime, "reactor_upper.wat", wat, args.calls, work)
            for extra in args.reactor:
                await bench_warm(runtime, extra.name, extra.read_bytes(), args.calls, work)
            await bench_worker_start(runtime, max(args.calls // 5, 300), work)
            await bench_cold(runtime, max(args.calls // 2, 500), work)
            await bench_variants(runtime, args.calls, work)
        finally:
            await runtime.aclose()


if __name__ == "__main__":
    sys.exit(trio.run(main))
