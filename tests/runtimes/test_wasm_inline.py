"""Short guests run on the event loop's thread; long ones move to worker threads."""

from __future__ import annotations

import math

import trio
import trio.lowlevel

from spear.demo import upper_wasm
from spear.model import ExecStatus
from spear.runtimes import WasmRuntime
from spear.runtimes.wasm import INLINE_STRIKES
from tests.runtimes import guests
from tests.runtimes.test_wasm_runtime import WasmSpec

FOREVER = math.inf
# Counts down from 2^28 and exits 0: tens of milliseconds, far past the 2 ms inline budget.
BUSY = """(module (memory (export "memory") 1)
  (func (export "_start") (local $i i64)
    (local.set $i (i64.const 268435456))
    (loop $l
      (local.set $i (i64.sub (local.get $i) (i64.const 1)))
      (br_if $l (i64.ne (local.get $i) (i64.const 0))))))"""


async def test_a_short_guest_runs_inline(wasm: WasmRuntime, wasm_spec: WasmSpec) -> None:
    spec = wasm_spec(upper_wasm())
    for _ in range(5):
        outcome = await wasm.run(spec, b"inline", deadline=FOREVER)
        assert outcome.output == b"INLINE"
    stats = wasm.statistics()
    # A run the OS preempts past the budget may fall back; most must not.
    assert stats["inline_runs"] >= 3
    assert stats["inline_runs"] + stats["inline_fallbacks"] == 5


async def test_a_long_guest_falls_back_to_a_thread_and_finishes(
    wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(guests.wasm(BUSY), timeout_s=30.0)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        outcome = await wasm.run(spec, b"", deadline=FOREVER)
        nursery.cancel_scope.cancel()
    assert outcome.status is ExecStatus.SUCCEEDED, outcome.error_message
    stats = wasm.statistics()
    assert (stats["inline_runs"], stats["inline_fallbacks"]) == (0, 1)
    assert ticks > 10  # the loop kept running while the guest ran in its thread


async def test_repeated_fallbacks_move_a_module_to_threads(
    wasm: WasmRuntime, wasm_spec: WasmSpec
) -> None:
    spec = wasm_spec(guests.wasm(BUSY), timeout_s=30.0)
    for _ in range(INLINE_STRIKES + 2):
        outcome = await wasm.run(spec, b"", deadline=FOREVER)
        assert outcome.status is ExecStatus.SUCCEEDED
    assert wasm.statistics()["inline_fallbacks"] == INLINE_STRIKES
    # another module is not affected
    assert (await wasm.run(wasm_spec(upper_wasm()), b"a", deadline=FOREVER)).output == b"A"
    stats = wasm.statistics()
    assert stats["inline_runs"] + stats["inline_fallbacks"] == INLINE_STRIKES + 1
